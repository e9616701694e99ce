"""Certificate keys: load a silo's own signing key, sign, and verify raw 64-byte signatures."""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from fedsilo.privacy.pki import CertificateError, Role, identity_from_pem

SIGNATURE_BYTES = 64

# What `cryptography` raises on a damaged certificate, at load time or when a field is read.
CERT_PARSE_ERRORS = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class SignatureError(Exception):
    """A certificate, signing key or signature was refused; the message says why and what to do."""


# --- signing and verifying ---------------------------------------------------------------


def sign(key: SigningKey, message: bytes) -> bytes:
    """Signs ``message`` with a certificate key: raw ``r || s`` for ECDSA P-256, or Ed25519."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def verify(public_key: object, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` (as `sign` makes it) over ``message`` verifies with ``public_key``."""
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


def as_bytes(value: object, what: str, *, error: type[Exception] = SignatureError) -> bytes:
    """``value`` as bytes (from bytes, bytearray or memoryview), else raises ``error``."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise error(f"{what} must be bytes, not {type(value).__name__}")


def load_signing_key(pem: bytes, *, error: type[Exception] = SignatureError) -> SigningKey:
    """Loads an unencrypted ECDSA P-256 or Ed25519 private key (PEM), else raises ``error``."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise error(
            "the certificate's private key is password-protected; fedsilo needs the "
            "unencrypted .key file issued with the certificate"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise error(
            "the certificate's private key is not a readable PEM private key; pass the .key "
            "file issued together with the certificate"
        ) from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise error(
        f"the certificate's private key is a {type(key).__name__}; fedsilo signs key "
        "bundles with ECDSA P-256 or Ed25519 certificate keys only"
    )


def own_signer(
    cert_pem: bytes,
    key_pem: object,
    *,
    name: str,
    purpose: str,
    error: type[Exception] = SignatureError,
) -> SigningKey:
    """Loads this silo's certificate key after checking it is silo ``name``'s own.

    Args:
        cert_pem: This silo's federation certificate (role silo), PEM.
        key_pem: That certificate's private key, PEM.
        name: This silo's name; must be the certificate's CN.
        purpose: What will be signed, for messages (e.g. "key bundles").
        error: The exception to raise.

    Returns:
        The signing key.

    Raises:
        error: If the certificate is not silo ``name``'s or the key is not its key.
    """
    cert = parse_certificate(cert_pem, f"this silo's certificate ({name!r})", error)
    try:
        identity = identity_from_pem(cert_pem)
    except CertificateError as exc:
        raise error(f"this silo's certificate cannot sign {purpose}: {exc}") from None
    if identity.role is not Role.SILO or identity.name != name:
        raise error(
            f"the certificate given to sign {purpose} belongs to {identity.role.value} "
            f"{identity.name!r}, not to silo {name!r}; pass silo {name!r}'s own certificate "
            "and key"
        )
    signer = load_signing_key(as_bytes(key_pem, "certificate private key", error=error), error=error)
    try:
        matches = _spki(signer.public_key()) == _spki(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        matches = False
    if not matches:
        raise error(
            f"the private key given does not belong to silo {name!r}'s certificate; use the "
            ".key file issued together with that certificate"
        )
    return signer


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def parse_certificate(
    pem: bytes, label: str, error: type[Exception] = SignatureError
) -> x509.Certificate:
    """Loads a PEM certificate, else raises ``error`` saying ``label`` is unreadable."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except CERT_PARSE_ERRORS:
        raise error(
            f"{label} is not a readable PEM certificate; the data is damaged or not a "
            "federation certificate"
        ) from None
