"""Signed documents: one base for what a silo signs with its federation certificate key.

Ledger entries, budget statements and relay blobs (`fedsilo.privacy.relay_blob`: what a silo
publishes through the sealed relay) are `SignedDocument` subclasses (canonical JSON); wrapped
keys and key announcements (`fedsilo.privacy.keywrap`) sign their binary encodings with the same
keys (`own_signer`, `sign`) and check them the same way (`check_silo_certificate`, `verify`).
"""

from fedsilo.privacy.signed.certificates import check_silo_certificate
from fedsilo.privacy.signed.document import SignedDocument
from fedsilo.privacy.signed.fields import (
    CREATED_AT_FORMAT,
    MAX_CERT_CHARS,
    MAX_RUN_ID_BYTES,
    DocumentError,
    FieldError,
    canonical_json,
    check_created_at,
    delta_field,
    exact_keys,
    float_text,
    is_printable_run_id,
    now_text,
    parse_created_at,
    parse_enum,
    parse_float,
    parse_int,
    parse_json_object,
    parse_optional_float,
    parse_signature_hex,
    parse_str,
    real,
)
from fedsilo.privacy.signed.keys import (
    CERT_PARSE_ERRORS,
    SIGNATURE_BYTES,
    PublicKey,
    SignatureError,
    SigningKey,
    as_bytes,
    load_signing_key,
    own_signer,
    parse_certificate,
    sign,
    verify,
)

__all__ = [
    "CERT_PARSE_ERRORS",
    "CREATED_AT_FORMAT",
    "MAX_CERT_CHARS",
    "MAX_RUN_ID_BYTES",
    "SIGNATURE_BYTES",
    "DocumentError",
    "FieldError",
    "PublicKey",
    "SignatureError",
    "SignedDocument",
    "SigningKey",
    "as_bytes",
    "canonical_json",
    "check_created_at",
    "check_silo_certificate",
    "delta_field",
    "exact_keys",
    "float_text",
    "is_printable_run_id",
    "load_signing_key",
    "now_text",
    "own_signer",
    "parse_certificate",
    "parse_created_at",
    "parse_enum",
    "parse_float",
    "parse_int",
    "parse_json_object",
    "parse_optional_float",
    "parse_signature_hex",
    "parse_str",
    "real",
    "sign",
    "verify",
]
