"""Key ceremony: the HE secret key wrapped per silo (X25519, HKDF, AES-GCM) and signed."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedsilo.privacy.pki import CertificateError, Role, identity_from_pem, validate_name

__all__ = [
    "KEM_PUBLIC_BYTES",
    "MAX_SECRET_BYTES",
    "NONCE_BYTES",
    "PROTOCOL_VERSION",
    "SIGNATURE_BYTES",
    "KemKeyPair",
    "KeyWrapError",
    "WrappedKey",
    "announce_kem_public",
    "kem_public_fingerprint",
    "unwrap_key",
    "verify_kem_announcement",
    "wrap_key",
]

PROTOCOL_VERSION = 1
KEM_PUBLIC_BYTES = 32
NONCE_BYTES = 12
SIGNATURE_BYTES = 64
MAX_SECRET_BYTES = 256 * 1024 * 1024

_BUNDLE_MAGIC = b"FSKW"
_ANNOUNCE_MAGIC = b"FSKA"
_LABEL = b"fedsilo-keywrap-v1"
_TAG_BYTES = 16
_MAX_RUN_ID_BYTES = 256
_MAX_CERT_BYTES = 16 * 1024
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
_LEN = struct.Struct(">I")
_KEY_MODE = 0o600

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
_RESEND = "ask the key holder to send the key bundle again through the coordinator"


class KeyWrapError(Exception):
    """A key bundle, KEM key or announcement was refused; the message says why and what to do."""


# --- KEM key pair ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class KemKeyPair:
    """A silo's X25519 key pair for one run; its public half is published when it joins.

    Attributes:
        private_key: The X25519 private key. Never leaves the silo.
    """

    private_key: x25519.X25519PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, x25519.X25519PrivateKey):
            raise TypeError(
                f"private_key must be an X25519PrivateKey, not {type(self.private_key).__name__}"
            )

    @classmethod
    def generate(cls) -> KemKeyPair:
        """Creates a fresh key pair.

        Returns:
            A new key pair; call `save` before publishing its public key.
        """
        return cls(private_key=x25519.X25519PrivateKey.generate())

    def public_bytes(self) -> bytes:
        """The public key to publish when joining a run.

        Returns:
            The 32-byte raw X25519 public key.
        """
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def save(self, path: Path | str) -> Path:
        """Writes the private key as PEM (PKCS#8), mode 0600, atomically.

        The key goes to a temporary file in the same directory (created 0600), is
        flushed to disk, then renamed over ``path``, so a crash leaves either the old
        file or the new one, never half of one.

        Args:
            path: Where to write, e.g. ``state/<run_id>/kem.key``. Its directory must exist.

        Returns:
            The path written.

        Raises:
            KeyWrapError: If the file cannot be written.
        """
        path = Path(path)
        data = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            _write_atomic(path, data)
        except OSError as exc:
            raise KeyWrapError(
                f"cannot write the KEM key to {str(path)!r}: {exc.strerror or exc}; check that "
                "the directory exists and this silo agent may write to it"
            ) from None
        return path

    @classmethod
    def load(cls, path: Path | str) -> KemKeyPair:
        """Reads a key pair written by `save` (PEM PKCS#8) or a raw 32-byte private key.

        Args:
            path: The key file.

        Returns:
            The key pair.

        Raises:
            KeyWrapError: If the file is missing, unreadable, or not an X25519 private key.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyWrapError(
                f"KEM key file {str(path)!r} does not exist; this silo cannot receive the run's "
                "encryption key without it: re-join the run to create and publish a new one"
            ) from None
        except OSError as exc:
            raise KeyWrapError(
                f"cannot read KEM key file {str(path)!r}: {exc.strerror or exc}; check its "
                "permissions (it should be readable by the silo agent only, mode 0600)"
            ) from None
        if data.lstrip().startswith(b"-----BEGIN "):
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except TypeError:
                raise KeyWrapError(
                    f"KEM key file {str(path)!r} is password-protected; fedsilo needs the "
                    "unencrypted key it wrote itself: re-join the run to create a new one"
                ) from None
            except (ValueError, UnsupportedAlgorithm):
                key = None
            if not isinstance(key, x25519.X25519PrivateKey):
                raise KeyWrapError(
                    f"KEM key file {str(path)!r} does not hold an X25519 private key; it may have "
                    "been overwritten by another file: re-join the run to create a new one"
                )
            return cls(private_key=key)
        if len(data) == KEM_PUBLIC_BYTES:
            return cls(private_key=x25519.X25519PrivateKey.from_private_bytes(data))
        raise KeyWrapError(
            f"KEM key file {str(path)!r} is neither a PEM private key nor a raw 32-byte key "
            f"({len(data)} bytes); re-join the run to create a new one"
        )


def kem_public_fingerprint(public: bytes) -> str:
    """A short, stable name for a KEM public key, for logs and for comparing by eye.

    Args:
        public: A 32-byte raw X25519 public key.

    Returns:
        ``"sha256:"`` followed by the first 32 hex digits of the key's SHA-256.

    Raises:
        KeyWrapError: If ``public`` is not 32 bytes.
    """
    public = _as_bytes(public, "KEM public key")
    if len(public) != KEM_PUBLIC_BYTES:
        raise KeyWrapError(
            f"a KEM public key is {KEM_PUBLIC_BYTES} bytes, this one is {len(public)}"
        )
    return "sha256:" + hashlib.sha256(public).hexdigest()[:32]


# --- the key bundle -----------------------------------------------------------------


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
    signer = _own_signer(cert_pem, issuer_private_key_pem, name=issuer, purpose="key bundles")

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
    signature = _sign(signer, unsigned.signed_bytes())
    return WrappedKey(**{**_fields(unsigned), "signature": signature})


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
    now = _aware_now(now)
    if not isinstance(my_keypair, KemKeyPair):
        raise TypeError(f"my_keypair must be a KemKeyPair, not {type(my_keypair).__name__}")
    _check_params_fingerprint(params_fingerprint)
    bundle = WrappedKey.from_bytes(blob)
    if bundle.run_id != run_id:
        raise KeyWrapError(
            f"refusing a key bundle made for run {bundle.run_id!r}: this silo is in run "
            f"{run_id!r}, so the bundle was replayed from another run (or mixed up by the "
            f"coordinator); do not use it, and {_RESEND} for run {run_id!r}"
        )
    if bundle.recipient != me:
        raise KeyWrapError(
            f"refusing a key bundle addressed to silo {bundle.recipient!r}: this silo is "
            f"{me!r}, so it is the wrong recipient; the coordinator delivered another silo's "
            f"bundle: ask the coordinator operator to deliver the one for {me!r}"
        )
    if bundle.issuer != expected_issuer:
        raise KeyWrapError(
            f"refusing a key bundle issued by {bundle.issuer!r}: the key holder of run "
            f"{run_id!r} is {expected_issuer!r}, and only the key holder may hand out the "
            "key; tell the federation operator if this repeats"
        )
    issuer_key = _check_silo_certificate(
        bundle.issuer_certificate,
        ca_pem,
        name=bundle.issuer,
        now=now,
        whose=f"the key holder's certificate ({bundle.issuer!r}) in the key bundle",
        consequence="do not use the bundle",
    )
    if not _verify(issuer_key, bundle.signature, bundle.signed_bytes()):
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


# --- signed KEM public keys -----------------------------------------------------------


def announce_kem_public(
    *,
    run_id: str,
    silo: str,
    public: bytes,
    certificate_pem: bytes,
    private_key_pem: bytes,
) -> bytes:
    """Signs a silo's KEM public key so the coordinator cannot swap it for its own.

    The key holder receives every silo's KEM public key through the coordinator; if it
    accepted an unsigned key, the coordinator could substitute its own and read the HE
    secret key. Publish this instead of the bare key; the key holder checks it with
    `verify_kem_announcement` before calling `wrap_key`.

    Wire layout (lengths unsigned 32-bit big-endian)::

        "FSKA" | version (1 byte, = 1) | len | run_id | len | silo | len | public (32)
        | len | certificate (PEM) | len | signature (64)

    The signature covers every byte before the signature's length field.

    Args:
        run_id: The run being joined.
        silo: This silo's name; must be its certificate's CN.
        public: ``KemKeyPair.public_bytes()``.
        certificate_pem: This silo's federation certificate (role silo).
        private_key_pem: That certificate's private key.

    Returns:
        The signed announcement (opaque bytes for the coordinator).

    Raises:
        KeyWrapError: If an input is unusable (see `wrap_key`).
    """
    _check_run_id(run_id)
    _check_name(silo, "silo")
    _x25519_public(public, "the KEM public key")
    cert_pem = _as_bytes(certificate_pem, "certificate")
    signer = _own_signer(cert_pem, private_key_pem, name=silo, purpose="KEM key announcements")
    signed = _encode(
        _ANNOUNCE_MAGIC, [run_id.encode("utf-8"), silo.encode("ascii"), bytes(public), cert_pem]
    )
    return signed + _lp(_sign(signer, signed))


def verify_kem_announcement(
    blob: bytes,
    *,
    run_id: str,
    expected_silo: str,
    ca_pem: bytes,
    now: dt.datetime | None = None,
) -> bytes:
    """Checks a silo's signed KEM public key (from `announce_kem_public`).

    Args:
        blob: The announcement as relayed by the coordinator.
        run_id: The current run.
        expected_silo: The enrolled silo the key should belong to.
        ca_pem: The federation CA certificate, PEM bytes.
        now: The time to check certificates against (timezone-aware); defaults to now.

    Returns:
        The silo's 32-byte KEM public key, safe to pass to `wrap_key`.

    Raises:
        KeyWrapError: If the announcement is damaged, for another run or silo, not
            signed by that silo's federation certificate, or tampered with.
        ValueError: If ``now`` is not timezone-aware.
    """
    now = _aware_now(now)
    raw_run, raw_silo, public, cert_pem, signature = _decode(
        blob, _ANNOUNCE_MAGIC, 5, what="KEM key announcement"
    )
    what = "KEM key announcement"
    announced_run = _text(raw_run, "run_id", what)
    silo = _text(raw_silo, "silo", what)
    _check_pem_field(cert_pem, "certificate")
    if announced_run != run_id:
        raise KeyWrapError(
            f"refusing a KEM key announcement for run {announced_run!r}: this is run "
            f"{run_id!r}, so it was replayed from another run; ask silo {expected_silo!r} to "
            "re-join the run"
        )
    if silo != expected_silo:
        raise KeyWrapError(
            f"refusing a KEM key announcement from silo {silo!r} offered as silo "
            f"{expected_silo!r}; the coordinator mixed up silos or substituted a key: tell the "
            "federation operator"
        )
    if len(public) != KEM_PUBLIC_BYTES or len(signature) != SIGNATURE_BYTES:
        raise KeyWrapError(
            f"the KEM key announcement from {silo!r} is damaged (wrong field size); ask silo "
            f"{silo!r} to re-join the run"
        )
    silo_key = _check_silo_certificate(
        cert_pem,
        ca_pem,
        name=silo,
        now=now,
        whose=f"silo {silo!r}'s certificate in its KEM key announcement",
        consequence="do not wrap the key for this KEM key",
    )
    signed = _as_bytes(blob, what)[: -(SIGNATURE_BYTES + _LEN.size)]
    if not _verify(silo_key, signature, signed):
        raise KeyWrapError(
            f"refusing silo {silo!r}'s KEM key: its signature does not match {silo!r}'s "
            "certificate, so it was tampered with or substituted on the way (e.g. by the "
            f"coordinator); do not wrap the key for it, tell the federation operator, and ask "
            f"silo {silo!r} to re-join the run"
        )
    _x25519_public(public, f"silo {silo!r}'s KEM public key")
    return public


# --- helpers -----------------------------------------------------------------------


def _fields(bundle: WrappedKey) -> dict[str, object]:
    return {name: getattr(bundle, name) for name in _BUNDLE_FIELDS}


def _as_bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise KeyWrapError(f"{what} must be bytes, not {type(value).__name__}")


def _lp(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def _encode(magic: bytes, parts: list[bytes]) -> bytes:
    return magic + bytes([PROTOCOL_VERSION]) + b"".join(_lp(p) for p in parts)


def _decode(blob: object, magic: bytes, count: int, *, what: str) -> list[bytes]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise KeyWrapError(f"a {what} must be bytes, not {type(blob).__name__}")
    data = bytes(blob)
    retry = _RESEND if what == "key bundle" else "ask the silo to re-join the run"
    header = len(magic) + 1
    if len(data) < header:
        if magic.startswith(data[: len(magic)]):
            raise KeyWrapError(
                f"the {what} is truncated: only {len(data)} bytes arrived (the transfer was "
                f"cut off); {retry}"
            )
        raise KeyWrapError(
            f"this is not a fedsilo {what} (it is {len(data)} bytes of something else)"
        )
    if data[: len(magic)] != magic:
        raise KeyWrapError(
            f"this is not a fedsilo {what} (it does not start with {magic.decode()!r}); check "
            "that the coordinator and this silo run matching fedsilo versions"
        )
    version = data[len(magic)]
    if version != PROTOCOL_VERSION:
        raise KeyWrapError(
            f"the {what} uses format version {version}, this fedsilo understands version "
            f"{PROTOCOL_VERSION}; run the same fedsilo version on every silo"
        )
    parts: list[bytes] = []
    offset = header
    for index in range(count):
        if len(data) - offset < _LEN.size:
            raise KeyWrapError(
                f"the {what} is truncated: it ends after {len(data)} bytes, inside field "
                f"{index + 1} of {count} (the transfer was cut off); {retry}"
            )
        (length,) = _LEN.unpack_from(data, offset)
        offset += _LEN.size
        if length > len(data) - offset:
            raise KeyWrapError(
                f"the {what} is truncated or damaged: field {index + 1} of {count} claims "
                f"{length} bytes but only {len(data) - offset} remain; {retry}"
            )
        parts.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise KeyWrapError(
            f"the {what} is damaged: {len(data) - offset} unexpected bytes follow its last "
            f"field; {retry}"
        )
    return parts


def _text(raw: bytes, name: str, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyWrapError(
            f"the {what} is damaged: field {name} is not valid text; "
            + (_RESEND if what == "key bundle" else "ask the silo to re-join the run")
        ) from None


def _check_run_id(run_id: object) -> None:
    if (
        not isinstance(run_id, str)
        or not run_id
        or not run_id.isprintable()
        or len(run_id.encode("utf-8")) > _MAX_RUN_ID_BYTES
    ):
        raise KeyWrapError(
            f"invalid run id {run_id!r}: expected 1 to {_MAX_RUN_ID_BYTES} bytes of printable "
            "text; the key bundle may be damaged"
        )


def _check_name(name: object, what: str) -> None:
    try:
        validate_name(name)  # type: ignore[arg-type]
    except ValueError as exc:
        raise KeyWrapError(f"invalid {what} silo name: {exc}") from None


def _check_params_fingerprint(value: object) -> None:
    if not isinstance(value, str) or _FINGERPRINT_RE.fullmatch(value) is None:
        raise KeyWrapError(
            f"invalid HE parameter fingerprint {value!r}: expected the 64 lowercase hex "
            "digits of a SHA-256"
        )


def _check_size(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise KeyWrapError(
            f"key bundle field {name} has {len(value)} bytes, expected {size}; the bundle is "
            f"damaged: {_RESEND}"
        )


def _check_pem_field(value: bytes, name: str) -> None:
    if not 0 < len(value) <= _MAX_CERT_BYTES or not value.startswith(b"-----BEGIN CERTIFICATE"):
        raise KeyWrapError(
            f"field {name} is not a PEM certificate of at most {_MAX_CERT_BYTES} bytes; the "
            "data is damaged or was not made by fedsilo"
        )


def _aware_now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.timezone.utc)
    if not isinstance(now, dt.datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now={now!r} must be a timezone-aware datetime (e.g. UTC)")
    return now.astimezone(dt.timezone.utc)


def _x25519_public(value: object, what: str) -> x25519.X25519PublicKey:
    raw = _as_bytes(value, what)
    if len(raw) != KEM_PUBLIC_BYTES:
        raise KeyWrapError(
            f"{what} has {len(raw)} bytes, expected {KEM_PUBLIC_BYTES} (a raw X25519 key)"
        )
    return x25519.X25519PublicKey.from_public_bytes(raw)


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


# What `cryptography` raises on a damaged certificate, at load time or when a field is read.
_CERT_PARSE_ERRORS = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
_SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
_PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def _load_signing_key(pem: bytes) -> _SigningKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise KeyWrapError(
            "the certificate's private key is password-protected; fedsilo needs the "
            "unencrypted .key file issued with the certificate"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyWrapError(
            "the certificate's private key is not a readable PEM private key; pass the .key "
            "file issued together with the certificate"
        ) from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise KeyWrapError(
        f"the certificate's private key is a {type(key).__name__}; fedsilo signs key "
        "bundles with ECDSA P-256 or Ed25519 certificate keys only"
    )


def _own_signer(cert_pem: bytes, key_pem: object, *, name: str, purpose: str) -> _SigningKey:
    """Loads this silo's certificate key after checking it is silo ``name``'s."""
    cert = _parse_certificate(cert_pem, f"this silo's certificate ({name!r})")
    try:
        identity = identity_from_pem(cert_pem)
    except CertificateError as exc:
        raise KeyWrapError(f"this silo's certificate cannot sign {purpose}: {exc}") from None
    if identity.role is not Role.SILO or identity.name != name:
        raise KeyWrapError(
            f"the certificate given to sign {purpose} belongs to {identity.role.value} "
            f"{identity.name!r}, not to silo {name!r}; pass silo {name!r}'s own certificate "
            "and key"
        )
    signer = _load_signing_key(_as_bytes(key_pem, "certificate private key"))
    try:
        matches = _spki(signer.public_key()) == _spki(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        matches = False
    if not matches:
        raise KeyWrapError(
            f"the private key given does not belong to silo {name!r}'s certificate; use the "
            ".key file issued together with that certificate"
        )
    return signer


def _sign(key: _SigningKey, message: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _verify(public_key: object, signature: bytes, message: bytes) -> bool:
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
            return True
        if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
            public_key.curve, ec.SECP256R1
        ):
            r = int.from_bytes(signature[:32], "big")
            s = int.from_bytes(signature[32:], "big")
            public_key.verify(
                encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256())
            )
            return True
    except (InvalidSignature, ValueError):
        return False
    return False


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _parse_certificate(pem: bytes, label: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except _CERT_PARSE_ERRORS:
        raise KeyWrapError(
            f"{label} is not a readable PEM certificate; the data is damaged or not a "
            "federation certificate"
        ) from None


def _extension(cert: x509.Certificate, ext_type: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(ext_type).value
    except x509.ExtensionNotFound:
        return None
    except _CERT_PARSE_ERRORS:  # duplicate or malformed extensions
        return _MALFORMED


_MALFORMED = object()


def _describe(get_name: Callable[[], x509.Name]) -> str:
    try:
        return repr(get_name().rfc4514_string())
    except ValueError:
        return "an unreadable name"


def _fmt(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_silo_certificate(
    cert_pem: bytes,
    ca_pem: bytes,
    *,
    name: str,
    now: dt.datetime,
    whose: str,
    consequence: str,
) -> _PublicKey:
    """`pki.check_certificate` for PEM bytes, plus role silo and CN == ``name``.

    Returns:
        The certificate's public key, to verify the signature with.
    """
    # `cryptography` parses certificate fields lazily: a damaged certificate can load
    # and only fail (ValueError) when a field is read, so every read is covered here.
    try:
        cert = _check_silo_certificate_fields(
            cert_pem, ca_pem, name=name, now=now, whose=whose, consequence=consequence
        )
        return cert.public_key()  # type: ignore[return-value]
    except _CERT_PARSE_ERRORS:
        raise KeyWrapError(
            f"{whose} is damaged and cannot be read; {consequence} and tell the federation "
            "operator if this repeats"
        ) from None


def _check_silo_certificate_fields(
    cert_pem: bytes,
    ca_pem: bytes,
    *,
    name: str,
    now: dt.datetime,
    whose: str,
    consequence: str,
) -> x509.Certificate:
    ca = _parse_certificate(_as_bytes(ca_pem, "CA certificate"), "the federation CA (ca.pem)")
    ca_constraints = _extension(ca, x509.BasicConstraints)
    if not isinstance(ca_constraints, x509.BasicConstraints) or not ca_constraints.ca:
        raise KeyWrapError(
            "the CA certificate given is not a CA certificate; pass the federation CA file "
            "(ca.pem)"
        )
    if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
        raise KeyWrapError(
            f"the federation CA (ca.pem) is outside its validity ({_fmt(ca.not_valid_before_utc)}"
            f" to {_fmt(ca.not_valid_after_utc)}, now {_fmt(now)}); check this machine's clock "
            "or ask the federation operator for the current ca.pem"
        )
    cert = _parse_certificate(cert_pem, whose)
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is _MALFORMED or (
        isinstance(constraints, x509.BasicConstraints) and constraints.ca
    ):
        raise KeyWrapError(
            f"{whose} is not a silo certificate (it is a CA or malformed); {consequence}"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise KeyWrapError(
            f"{whose} was not issued by this federation's CA (issued by "
            f"{_describe(lambda: cert.issuer)}, this CA is {_describe(lambda: ca.subject)}), "
            f"so it did not come from a member of this federation; {consequence} and tell the "
            "federation operator"
        ) from None
    if now < cert.not_valid_before_utc:
        raise KeyWrapError(
            f"{whose} is not valid until {_fmt(cert.not_valid_before_utc)} (it is now "
            f"{_fmt(now)}); check this machine's clock"
        )
    if now > cert.not_valid_after_utc:
        raise KeyWrapError(
            f"{whose} expired on {_fmt(cert.not_valid_after_utc)}; {consequence}: ask "
            f"{name!r} to get a new certificate from the federation operator and send it again"
        )
    try:
        identity = identity_from_pem(cert_pem)
    except CertificateError as exc:
        raise KeyWrapError(f"{whose} is unusable: {exc}; {consequence}") from None
    if identity.role is not Role.SILO:
        raise KeyWrapError(
            f"{whose} belongs to the {identity.role.value} {identity.name!r}, not to a silo; "
            "only a silo may hand out or receive the HE key (the coordinator and admins must "
            f"never hold it); {consequence} and tell the federation operator"
        )
    if identity.name != name:
        raise KeyWrapError(
            f"{whose} is silo {identity.name!r}'s, not {name!r}'s: one silo is posing as "
            f"another; {consequence} and tell the federation operator"
        )
    eku = _extension(cert, x509.ExtendedKeyUsage)
    usage = _extension(cert, x509.KeyUsage)
    if (
        eku is _MALFORMED
        or usage is _MALFORMED
        or (isinstance(eku, x509.ExtendedKeyUsage) and ExtendedKeyUsageOID.CLIENT_AUTH not in eku)
        or (isinstance(usage, x509.KeyUsage) and not usage.digital_signature)
    ):
        raise KeyWrapError(
            f"{whose} is not usable for signing as a silo (key usage); {consequence} and ask "
            "the federation operator to re-issue it"
        )
    return cert


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _KEY_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
