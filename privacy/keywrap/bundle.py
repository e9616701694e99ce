"""The HE secret key wrapped for one silo (X25519, HKDF, AES-GCM), signed by the key holder."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsilo.privacy.keywrap.kem import KemKeyPair, kem_public_fingerprint
from fedsilo.privacy.keywrap.wire import (
    KEM_PUBLIC_BYTES,
    KeyWrapError,
    MAX_SECRET_BYTES,
    NONCE_BYTES,
    _BUNDLE_MAGIC,
    _LABEL,
    _RESEND,
    _TAG_BYTES,
    _as_bytes,
    _aware_now,
    _check_name,
    _check_params_fingerprint,
    _check_pem_field,
    _check_run_id,
    _check_size,
    _decode,
    _encode,
    _lp,
    _text,
    _x25519_public,
)
from fedsilo.privacy.signed import SIGNATURE_BYTES, check_silo_certificate, own_signer, sign, verify


# Wire order of WrappedKey's fields (the signature comes last and is not signed).
_BUNDLE_FIELDS = (
    "run_id",
    "issuer",
    "recipient",
    "params_fingerprint",
    "ephemeral_public",
    "nonce",
    "ciphertext",
    "issuer_certificate",
    "signature",
)


_TEXT_FIELDS = frozenset({"run_id", "issuer", "recipient", "params_fingerprint"})


@dataclass(frozen=True, kw_only=True)
class WrappedKey:
    """The HE secret key wrapped for one silo, signed by the key holder.

    The coordinator relays `to_bytes` as opaque bytes: it sees the names, the parameter
    fingerprint and the sizes, never the key, and cannot change a byte unnoticed.
    Wire layout (all lengths unsigned 32-bit big-endian)::

        "FSKW" | version (1 byte, = 1)
        | len | run_id (UTF-8)         | len | issuer (ASCII name)
        | len | recipient (ASCII name) | len | params_fingerprint (64 lowercase hex)
        | len | ephemeral_public (32)  | len | nonce (12)
        | len | ciphertext (AES-256-GCM, tag included)
        | len | issuer_certificate (PEM)
        | len | signature (64)

    Nothing may follow the signature. The signature covers every byte before the
    signature's own length field (`signed_bytes`): raw ``r || s`` (32 bytes each) of
    ECDSA P-256 / SHA-256, or an Ed25519 signature, by the issuer's certificate key.

    Attributes:
        run_id: The run the key belongs to.
        issuer: The key holder silo's name; its certificate's CN.
        recipient: The silo this copy is for.
        params_fingerprint: SHA-256 hex of the HE parameters the key belongs to.
        ephemeral_public: The fresh X25519 public key used for this recipient.
        nonce: The AES-GCM nonce (96 bits).
        ciphertext: AES-256-GCM output (the secret, then the 16-byte tag).
        issuer_certificate: The key holder's certificate, PEM.
        signature: The key holder's signature over `signed_bytes`.
    """

    run_id: str
    issuer: str
    recipient: str
    params_fingerprint: str
    ephemeral_public: bytes
    nonce: bytes
    ciphertext: bytes = field(repr=False)
    issuer_certificate: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for name in _BUNDLE_FIELDS:
            if name not in _TEXT_FIELDS:
                object.__setattr__(self, name, _as_bytes(getattr(self, name), name))
        _check_run_id(self.run_id)
        _check_name(self.issuer, "issuer")
        _check_name(self.recipient, "recipient")
        _check_params_fingerprint(self.params_fingerprint)
        _check_size("ephemeral_public", self.ephemeral_public, KEM_PUBLIC_BYTES)
        _check_size("nonce", self.nonce, NONCE_BYTES)
        _check_size("signature", self.signature, SIGNATURE_BYTES)
        if not _TAG_BYTES < len(self.ciphertext) <= MAX_SECRET_BYTES + _TAG_BYTES:
            raise KeyWrapError(
                f"key bundle field ciphertext has {len(self.ciphertext)} bytes, expected "
                f"{_TAG_BYTES + 1} to {MAX_SECRET_BYTES + _TAG_BYTES}; {_RESEND}"
            )
        _check_pem_field(self.issuer_certificate, "issuer_certificate")

    def signed_bytes(self) -> bytes:
        """The bytes the issuer signs: the encoding of every field but the signature.

        Returns:
            A prefix of `to_bytes`.
        """
        return _encode(_BUNDLE_MAGIC, [self._field_bytes(n) for n in _BUNDLE_FIELDS[:-1]])

    def to_bytes(self) -> bytes:
        """The canonical encoding the coordinator relays.

        Returns:
            The bytes; see the class docstring for the layout.
        """
        return self.signed_bytes() + _lp(self.signature)

    @classmethod
    def from_bytes(cls, blob: bytes) -> WrappedKey:
        """Parses `to_bytes` output. Does not verify anything but the format.

        Args:
            blob: The bytes received from the coordinator.

        Returns:
            The parsed bundle.

        Raises:
            KeyWrapError: If the bytes are truncated, damaged, of another version, or
                not a key bundle at all.
        """
        parts = _decode(blob, _BUNDLE_MAGIC, len(_BUNDLE_FIELDS), what="key bundle")
        values: dict[str, object] = {}
        for name, raw in zip(_BUNDLE_FIELDS, parts):
            values[name] = _text(raw, name, "key bundle") if name in _TEXT_FIELDS else raw
        return cls(**values)  # type: ignore[arg-type]

    def _field_bytes(self, name: str) -> bytes:
        value = getattr(self, name)
        return value.encode("utf-8") if isinstance(value, str) else value


def wrap_key(
    *,
    secret: bytes,
    run_id: str,
    issuer: str,
    issuer_certificate_pem: bytes,
    issuer_private_key_pem: bytes,
    params_fingerprint: str,
    recipient: str,
    recipient_public: bytes,
) -> WrappedKey:
    """Wraps the HE secret key for one silo; the key holder calls it once per recipient.

    A fresh ephemeral X25519 key is agreed with ``recipient_public``; HKDF-SHA256
    (salt = SHA-256 of the run id; info binds the protocol version, run id, issuer,
    recipient, parameter fingerprint and both public keys) gives an AES-256-GCM key;
    the secret is encrypted under a random 96-bit nonce with associated data binding
    the run id, issuer, recipient and parameter fingerprint; the issuer then signs
    `WrappedKey.signed_bytes`.

    Args:
        secret: The serialized HE secret context (opaque bytes).
        run_id: The current run.
        issuer: This (key holder) silo's name; must be its certificate's CN.
        issuer_certificate_pem: This silo's federation certificate (role silo).
        issuer_private_key_pem: That certificate's private key (ECDSA P-256 or Ed25519).
        params_fingerprint: SHA-256 hex of the HE parameters the key belongs to.
        recipient: The silo this copy is for.
        recipient_public: Its 32-byte X25519 public key, as published when it joined
            (check it first with `verify_kem_announcement` if it came via the coordinator).

    Returns:
        The signed bundle; send ``bundle.to_bytes()`` through the coordinator.

    Raises:
        KeyWrapError: If an input is unusable: empty or oversized secret, bad name or
            fingerprint, a recipient key that is not 32 bytes, a certificate that is not
            this silo's, or a private key that does not belong to the certificate.
    """
    secret = _as_bytes(secret, "secret")
    if not 0 < len(secret) <= MAX_SECRET_BYTES:
        raise KeyWrapError(
            f"the HE secret key to wrap is {len(secret)} bytes; it must be 1 to "
            f"{MAX_SECRET_BYTES} bytes"
        )
    _check_run_id(run_id)
    _check_name(issuer, "issuer")
    _check_name(recipient, "recipient")
    _check_params_fingerprint(params_fingerprint)
    recipient_key = _x25519_public(recipient_public, f"silo {recipient!r}'s KEM public key")
    cert_pem = _as_bytes(issuer_certificate_pem, "issuer certificate")
    signer = own_signer(
        cert_pem, issuer_private_key_pem, name=issuer, purpose="key bundles", error=KeyWrapError
    )

    ephemeral = x25519.X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    try:
        shared = ephemeral.exchange(recipient_key)
    except ValueError:
        raise KeyWrapError(
            f"silo {recipient!r}'s KEM public key is invalid (a degenerate X25519 point); ask "
            "that silo to re-join the run with a new KEM key"
        ) from None
    aead_key = _derive_key(
        shared,
        run_id=run_id,
        issuer=issuer,
        recipient=recipient,
        params_fingerprint=params_fingerprint,
        ephemeral_public=ephemeral_public,
        recipient_public=bytes(recipient_public),
    )
    nonce = os.urandom(NONCE_BYTES)
    aad = _associated_data(run_id, issuer, recipient, params_fingerprint)
    ciphertext = AESGCM(aead_key).encrypt(nonce, secret, aad)
    unsigned = WrappedKey(
        run_id=run_id,
        issuer=issuer,
        recipient=recipient,
        params_fingerprint=params_fingerprint,
        ephemeral_public=ephemeral_public,
        nonce=nonce,
        ciphertext=ciphertext,
        issuer_certificate=cert_pem,
        signature=bytes(SIGNATURE_BYTES),
    )
    signature = sign(signer, unsigned.signed_bytes())
    return WrappedKey(**{**_fields(unsigned), "signature": signature})


def verify_bundle(
    blob: bytes,
    *,
    run_id: str,
    recipient: str,
    ca_pem: bytes,
    expected_issuer: str,
    params_fingerprint: str,
    now: dt.datetime | None = None,
) -> WrappedKey:
    """Checks everything about a key bundle that needs no secret: format, run, recipient, issuer, the
    issuer's certificate against the CA, the signature and the HE parameters. The recipient runs it
    before it decrypts (`unwrap_key`); the coordinator runs it when the key holder publishes, so a
    bundle no recipient would accept is refused at the door.

    Returns:
        The parsed bundle.

    Raises:
        KeyWrapError: If the bundle would be refused; the message says why.
        ValueError: If ``now`` is not timezone-aware.
    """
    now = _aware_now(now)
    _check_params_fingerprint(params_fingerprint)
    bundle = WrappedKey.from_bytes(blob)
    if bundle.run_id != run_id:
        raise KeyWrapError(
            f"refusing a key bundle made for run {bundle.run_id!r}: this silo is in run "
            f"{run_id!r}, so the bundle was replayed from another run (or mixed up by the "
            f"coordinator); do not use it, and {_RESEND} for run {run_id!r}"
        )
    if bundle.recipient != recipient:
        raise KeyWrapError(
            f"refusing a key bundle addressed to silo {bundle.recipient!r}: this silo is "
            f"{recipient!r}, so it is the wrong recipient; the coordinator delivered another silo's "
            f"bundle: ask the coordinator operator to deliver the one for {recipient!r}"
        )
    if bundle.issuer != expected_issuer:
        raise KeyWrapError(
            f"refusing a key bundle issued by {bundle.issuer!r}: the key holder of run "
            f"{run_id!r} is {expected_issuer!r}, and only the key holder may hand out the "
            "key; tell the federation operator if this repeats"
        )
    issuer_key = check_silo_certificate(
        bundle.issuer_certificate,
        ca_pem,
        name=bundle.issuer,
        now=now,
        whose=f"the key holder's certificate ({bundle.issuer!r}) in the key bundle",
        consequence="do not use the bundle",
        error=KeyWrapError,
    )
    if not verify(issuer_key, bundle.signature, bundle.signed_bytes()):
        raise KeyWrapError(
            f"refusing the key bundle from {bundle.issuer!r}: its signature does not match "
            f"{bundle.issuer!r}'s certificate, so it was tampered with or substituted on the way "
            "(e.g. by the coordinator or another silo); do not use it, tell the federation "
            f"operator, and {_RESEND}"
        )
    if bundle.params_fingerprint != params_fingerprint:
        raise KeyWrapError(
            f"refusing the key bundle from {bundle.issuer!r}: it is for HE parameters "
            f"{bundle.params_fingerprint[:16]}..., but this silo expects "
            f"{params_fingerprint[:16]}...; the key holder and this silo disagree on the "
            "encryption parameters: check both run the same fedsilo version and run settings"
        )
    return bundle


def unwrap_key(
    blob: bytes,
    *,
    run_id: str,
    me: str,
    my_keypair: KemKeyPair,
    ca_pem: bytes,
    expected_issuer: str,
    params_fingerprint: str,
    now: dt.datetime | None = None,
) -> bytes:
    """Checks a key bundle received through the coordinator and returns the HE secret key.

    Checks, in order: the format; the run id (a bundle replayed from another run is
    refused); the recipient; the issuer; the issuer's certificate against the
    federation CA (issued by it, within validity, role silo, CN == issuer); the
    signature; the HE parameter fingerprint; and only then decrypts.

    Args:
        blob: The bytes received (``WrappedKey.to_bytes()`` from the key holder).
        run_id: The run this silo is in.
        me: This silo's name (its certificate's CN).
        my_keypair: The KEM key pair whose public key this silo published for this run.
        ca_pem: The federation CA certificate (``ca.pem``), PEM bytes.
        expected_issuer: The run's key holder silo, as this silo determines it.
        params_fingerprint: SHA-256 hex of the HE parameters this silo expects.
        now: The time to check certificates against (timezone-aware); defaults to now.

    Returns:
        The HE secret key bytes.

    Raises:
        KeyWrapError: If the bundle is refused; the message says why and what to do.
        ValueError: If ``now`` is not timezone-aware.
        TypeError: If ``my_keypair`` is not a `KemKeyPair`.
    """
    if not isinstance(my_keypair, KemKeyPair):
        raise TypeError(f"my_keypair must be a KemKeyPair, not {type(my_keypair).__name__}")
    bundle = verify_bundle(blob, run_id=run_id, recipient=me, ca_pem=ca_pem, expected_issuer=expected_issuer,
                           params_fingerprint=params_fingerprint, now=now)
    ephemeral = _x25519_public(bundle.ephemeral_public, "the bundle's ephemeral key")
    mine = my_keypair.public_bytes()
    try:
        shared = my_keypair.private_key.exchange(ephemeral)
    except ValueError:
        shared = None
    secret = None
    if shared is not None:
        aead_key = _derive_key(
            shared,
            run_id=bundle.run_id,
            issuer=bundle.issuer,
            recipient=bundle.recipient,
            params_fingerprint=bundle.params_fingerprint,
            ephemeral_public=bundle.ephemeral_public,
            recipient_public=mine,
        )
        aad = _associated_data(
            bundle.run_id, bundle.issuer, bundle.recipient, bundle.params_fingerprint
        )
        try:
            secret = AESGCM(aead_key).decrypt(bundle.nonce, bundle.ciphertext, aad)
        except InvalidTag:
            secret = None
    if secret is None:
        raise KeyWrapError(
            f"the key bundle from {bundle.issuer!r} is genuine but was not encrypted for this "
            f"silo's key (KEM key {kem_public_fingerprint(mine)}): this silo's KEM key file "
            f"probably changed after it joined run {run_id!r}; re-join the run so the key "
            "holder wraps the key for the current KEM key"
        )
    return secret


def _fields(bundle: WrappedKey) -> dict[str, object]:
    return {name: getattr(bundle, name) for name in _BUNDLE_FIELDS}


def _derive_key(
    shared: bytes,
    *,
    run_id: str,
    issuer: str,
    recipient: str,
    params_fingerprint: str,
    ephemeral_public: bytes,
    recipient_public: bytes,
) -> bytes:
    info = _LABEL + b" aead-key\x00" + b"".join(
        _lp(p)
        for p in (
            run_id.encode("utf-8"),
            issuer.encode("ascii"),
            recipient.encode("ascii"),
            params_fingerprint.encode("ascii"),
            ephemeral_public,
            recipient_public,
        )
    )
    salt = hashlib.sha256(run_id.encode("utf-8")).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(shared)


def _associated_data(run_id: str, issuer: str, recipient: str, params_fingerprint: str) -> bytes:
    return _LABEL + b" aad\x00" + b"".join(
        _lp(p.encode("utf-8")) for p in (run_id, issuer, recipient, params_fingerprint)
    )
