"""Key ceremony: the HE secret key wrapped per silo (X25519, HKDF, AES-GCM) and signed."""

from fedsilo.privacy.keywrap.wire import (
    KEM_PUBLIC_BYTES,
    KeyWrapError,
    MAX_SECRET_BYTES,
    NONCE_BYTES,
    PROTOCOL_VERSION,
)
from fedsilo.privacy.signed import SIGNATURE_BYTES
from fedsilo.privacy.keywrap.kem import KemKeyPair, kem_public_fingerprint
from fedsilo.privacy.keywrap.bundle import WrappedKey, _BUNDLE_FIELDS, unwrap_key, verify_bundle, wrap_key
from fedsilo.privacy.keywrap.announce import announce_kem_public, verify_kem_announcement

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
    "verify_bundle",
    "verify_kem_announcement",
    "wrap_key",
]
