"""Signed KEM public keys, so the coordinator cannot swap a silo's key for its own."""

from __future__ import annotations

import datetime as dt

from fedsilo.privacy.keywrap.wire import (
    KEM_PUBLIC_BYTES,
    KeyWrapError,
    _ANNOUNCE_MAGIC,
    _LEN,
    _as_bytes,
    _aware_now,
    _check_name,
    _check_pem_field,
    _check_run_id,
    _decode,
    _encode,
    _lp,
    _text,
    _x25519_public,
)
from fedsilo.privacy.signed import SIGNATURE_BYTES, check_silo_certificate, own_signer, sign, verify


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
    signer = own_signer(
        cert_pem, private_key_pem, name=silo, purpose="KEM key announcements", error=KeyWrapError
    )
    signed = _encode(
        _ANNOUNCE_MAGIC, [run_id.encode("utf-8"), silo.encode("ascii"), bytes(public), cert_pem]
    )
    return signed + _lp(sign(signer, signed))


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
    silo_key = check_silo_certificate(
        cert_pem,
        ca_pem,
        name=silo,
        now=now,
        whose=f"silo {silo!r}'s certificate in its KEM key announcement",
        consequence="do not wrap the key for this KEM key",
        error=KeyWrapError,
    )
    signed = _as_bytes(blob, what)[: -(SIGNATURE_BYTES + _LEN.size)]
    if not verify(silo_key, signature, signed):
        raise KeyWrapError(
            f"refusing silo {silo!r}'s KEM key: its signature does not match {silo!r}'s "
            "certificate, so it was tampered with or substituted on the way (e.g. by the "
            f"coordinator); do not wrap the key for it, tell the federation operator, and ask "
            f"silo {silo!r} to re-join the run"
        )
    _x25519_public(public, f"silo {silo!r}'s KEM public key")
    return public
