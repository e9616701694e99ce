"""Federation PKI: the CA, agent certificates, and the identities they carry."""

from __future__ import annotations

from fedsilo.privacy.pki.issue import init_ca, issue_certificate
from fedsilo.privacy.pki.names import (
    CA_CERT_FILENAME,
    CA_KEY_FILENAME,
    ORGANIZATION,
    CaPaths,
    CertificateError,
    Identity,
    IssuedPaths,
    Role,
    validate_name,
)
from fedsilo.privacy.pki.storage import load_pem
from fedsilo.privacy.pki.verify import check_certificate, identity_from_pem

__all__ = [
    "CA_CERT_FILENAME",
    "CA_KEY_FILENAME",
    "ORGANIZATION",
    "CaPaths",
    "CertificateError",
    "Identity",
    "IssuedPaths",
    "Role",
    "check_certificate",
    "identity_from_pem",
    "init_ca",
    "issue_certificate",
    "load_pem",
    "validate_name",
]
