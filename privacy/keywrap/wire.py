"""The key ceremony's binary wire format: constants, errors, length-prefixed fields and checks."""

from __future__ import annotations

import datetime as dt
import struct

from cryptography.hazmat.primitives.asymmetric import x25519

from fedsilo.core.validators import is_hex64
from fedsilo.privacy.pki import validate_name
from fedsilo.privacy.signed import MAX_RUN_ID_BYTES, as_bytes, is_printable_run_id


PROTOCOL_VERSION = 1
KEM_PUBLIC_BYTES = 32
NONCE_BYTES = 12
MAX_SECRET_BYTES = 256 * 1024 * 1024
_BUNDLE_MAGIC = b"FSKW"
_ANNOUNCE_MAGIC = b"FSKA"
_LABEL = b"fedsilo-keywrap-v1"
_TAG_BYTES = 16
_MAX_CERT_BYTES = 16 * 1024
_LEN = struct.Struct(">I")
_RESEND = "ask the key holder to send the key bundle again through the coordinator"


class KeyWrapError(Exception):
    """A key bundle, KEM key or announcement was refused; the message says why and what to do."""


def _as_bytes(value: object, what: str) -> bytes:
    return as_bytes(value, what, error=KeyWrapError)


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
    if not is_printable_run_id(run_id):
        raise KeyWrapError(
            f"invalid run id {run_id!r}: expected 1 to {MAX_RUN_ID_BYTES} bytes of printable "
            "text; the key bundle may be damaged"
        )


def _check_name(name: object, what: str) -> None:
    try:
        validate_name(name)  # type: ignore[arg-type]
    except ValueError as exc:
        raise KeyWrapError(f"invalid {what} silo name: {exc}") from None


def _check_params_fingerprint(value: object) -> None:
    if not is_hex64(value):
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
