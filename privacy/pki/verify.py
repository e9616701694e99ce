"""Reading and checking federation certificates: the identity they carry, issuer, validity, key."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.privacy.pki.clock import _fmt, _require_aware, _utcnow
from fedsilo.privacy.pki.names import ORGANIZATION, CertificateError, Identity, Role, validate_name
from fedsilo.privacy.pki.storage import _load_cert, _load_private_key


def identity_from_pem(cert_pem: bytes) -> Identity:
    """Reads the identity from a federation leaf certificate.

    Does not verify the certificate: use it on a peer certificate the TLS layer has
    already verified, e.g. ``context.auth_context()["x509_pem_cert"][0]`` in a
    gRPC handler, or after `check_certificate`.

    Args:
        cert_pem: The PEM-encoded certificate.

    Returns:
        The role (from the OU) and name (from the CN).

    Raises:
        CertificateError: If the certificate cannot be parsed, is not from the
            ``fedsilo`` organization, or lacks a valid OU role or CN name.
    """
    if isinstance(cert_pem, str):
        cert_pem = cert_pem.encode("ascii")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"peer certificate is not a valid PEM certificate: {exc}") from None
    return _identity(cert)


def check_certificate(
    cert_path: Path,
    ca_path: Path,
    *,
    now: dt.datetime | None = None,
    key_path: Path | None = None,
) -> Identity:
    """Pre-flight check an agent runs on its own certificate before dialing.

    Checks that the certificate was issued by this federation CA, that both are
    within their validity windows, that it is a leaf usable for its role, and
    (if ``key_path`` is given) that the private key belongs to it.

    Args:
        cert_path: The agent's certificate, e.g. ``hospital-a.pem``.
        ca_path: The federation CA certificate, ``ca.pem``.
        now: The time to check against (timezone-aware); defaults to the current time.
        key_path: The agent's private key, e.g. ``hospital-a.key``.

    Returns:
        The identity the certificate carries.

    Raises:
        FileNotFoundError: If a file is missing.
        CertificateError: With a message saying what is wrong and what to do.
    """
    cert_path, ca_path = Path(cert_path), Path(ca_path)
    now = _utcnow() if now is None else _require_aware(now, "now")
    cert = _load_cert(cert_path)
    ca_cert = _load_cert(ca_path)
    label = cert_path.name

    ca_constraints = _extension(ca_cert, x509.BasicConstraints)
    if ca_constraints is None or not ca_constraints.ca:
        raise CertificateError(
            f"{ca_path.name} is not a CA certificate; pass the federation CA file (ca.pem)"
        )
    _check_window(ca_cert, f"the federation CA {ca_path.name}", now)

    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise CertificateError(
            f"{label} is a CA certificate, not an agent certificate; pass this "
            "site's own certificate (e.g. hospital-a.pem)"
        )
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(
            f"certificate {label} was not issued by the federation CA in {ca_path.name} "
            f"(issued by {cert.issuer.rfc4514_string()!r}, this CA is "
            f"{ca_cert.subject.rfc4514_string()!r}); ask the federation operator for a "
            "certificate from this federation's CA, or for the matching ca.pem"
        ) from None
    _check_window(cert, f"certificate {label}", now)

    identity = _identity(cert, label=label)
    eku = _extension(cert, x509.ExtendedKeyUsage)
    needed, needed_name = (
        (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth")
        if identity.role is Role.COORDINATOR
        else (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")
    )
    if eku is not None and needed not in eku:
        raise CertificateError(
            f"certificate {label} is not usable as a {identity.role.value} certificate "
            f"(missing extended key usage {needed_name}); ask the federation operator to "
            "re-issue it"
        )

    if key_path is not None:
        key_path = Path(key_path)
        key = _load_private_key(key_path)
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise CertificateError(
                f"private key {key_path.name} does not belong to certificate {label}; "
                f"use the .key file that was issued together with {label}"
            )
    return identity


def _extension(cert: x509.Certificate, ext_type: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(ext_type).value
    except x509.ExtensionNotFound:
        return None


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _identity(cert: x509.Certificate, *, label: str = "peer certificate") -> Identity:
    subject = cert.subject
    orgs = subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    units = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    shown = subject.rfc4514_string()
    if [a.value for a in orgs] != [ORGANIZATION]:
        raise CertificateError(
            f"{label} subject {shown!r} is not a fedsilo certificate (O != {ORGANIZATION!r})"
        )
    if len(units) != 1:
        raise CertificateError(f"{label} subject {shown!r} must have exactly one OU (the role)")
    if len(names) != 1:
        raise CertificateError(f"{label} subject {shown!r} must have exactly one CN (the name)")
    try:
        role = Role(units[0].value)
    except ValueError:
        raise CertificateError(
            f"{label} has unknown role OU={units[0].value!r}; expected one of "
            f"{[r.value for r in Role]}"
        ) from None
    name = str(names[0].value)
    try:
        validate_name(name)
    except ValueError as exc:
        raise CertificateError(f"{label} has an invalid CN: {exc}") from None
    return Identity(role=role, name=name)


def _check_window(cert: x509.Certificate, label: str, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            f"{label} is not valid until {_fmt(cert.not_valid_before_utc)} "
            f"(it is now {_fmt(now)}); check this machine's clock"
        )
    if now > cert.not_valid_after_utc:
        raise CertificateError(
            f"{label} expired on {_fmt(cert.not_valid_after_utc)}; "
            "ask the federation operator for a new certificate"
        )
