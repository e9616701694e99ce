"""Checks that a certificate is a silo's, issued by the federation CA and valid at a given time."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedsilo.privacy.pki import CertificateError, Role, identity_from_pem
from fedsilo.privacy.signed.keys import (
    CERT_PARSE_ERRORS,
    PublicKey,
    SignatureError,
    as_bytes,
    parse_certificate,
)


def _extension(cert: x509.Certificate, ext_type: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(ext_type).value
    except x509.ExtensionNotFound:
        return None
    except CERT_PARSE_ERRORS:  # duplicate or malformed extensions
        return _MALFORMED


_MALFORMED = object()


def _describe(get_name: Callable[[], x509.Name]) -> str:
    try:
        return repr(get_name().rfc4514_string())
    except ValueError:
        return "an unreadable name"


def _fmt(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_silo_certificate(
    cert_pem: bytes,
    ca_pem: bytes,
    *,
    name: str,
    now: dt.datetime,
    whose: str,
    consequence: str,
    error: type[Exception] = SignatureError,
) -> PublicKey:
    """`pki.check_certificate` for PEM bytes, plus role silo and CN == ``name``.

    Args:
        cert_pem: The certificate to check, PEM.
        ca_pem: The federation CA certificate, PEM.
        name: The silo it must belong to (its CN).
        now: The time it (and the CA) must be valid at, timezone-aware.
        whose: Names the certificate in messages.
        consequence: What the reader should do, for messages.
        error: The exception to raise.

    Returns:
        The certificate's public key, to verify the signature with.

    Raises:
        error: Saying what is wrong with the certificate.
    """
    # `cryptography` parses certificate fields lazily: a damaged certificate can load
    # and only fail (ValueError) when a field is read, so every read is covered here.
    try:
        cert = _check_silo_certificate_fields(
            cert_pem, ca_pem, name=name, now=now, whose=whose, consequence=consequence, error=error
        )
        return cert.public_key()  # type: ignore[return-value]
    except CERT_PARSE_ERRORS:
        raise error(
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
    error: type[Exception] = SignatureError,
) -> x509.Certificate:
    ca = parse_certificate(
        as_bytes(ca_pem, "CA certificate", error=error), "the federation CA (ca.pem)", error
    )
    ca_constraints = _extension(ca, x509.BasicConstraints)
    if not isinstance(ca_constraints, x509.BasicConstraints) or not ca_constraints.ca:
        raise error(
            "the CA certificate given is not a CA certificate; pass the federation CA file "
            "(ca.pem)"
        )
    if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
        raise error(
            f"the federation CA (ca.pem) is outside its validity ({_fmt(ca.not_valid_before_utc)}"
            f" to {_fmt(ca.not_valid_after_utc)}, now {_fmt(now)}); check this machine's clock "
            "or ask the federation operator for the current ca.pem"
        )
    cert = parse_certificate(cert_pem, whose, error)
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is _MALFORMED or (
        isinstance(constraints, x509.BasicConstraints) and constraints.ca
    ):
        raise error(
            f"{whose} is not a silo certificate (it is a CA or malformed); {consequence}"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise error(
            f"{whose} was not issued by this federation's CA (issued by "
            f"{_describe(lambda: cert.issuer)}, this CA is {_describe(lambda: ca.subject)}), "
            f"so it did not come from a member of this federation; {consequence} and tell the "
            "federation operator"
        ) from None
    if now < cert.not_valid_before_utc:
        raise error(
            f"{whose} is not valid until {_fmt(cert.not_valid_before_utc)} (it is now "
            f"{_fmt(now)}); check this machine's clock"
        )
    if now > cert.not_valid_after_utc:
        raise error(
            f"{whose} expired on {_fmt(cert.not_valid_after_utc)}; {consequence}: ask "
            f"{name!r} to get a new certificate from the federation operator and send it again"
        )
    try:
        identity = identity_from_pem(cert_pem)
    except CertificateError as exc:
        raise error(f"{whose} is unusable: {exc}; {consequence}") from None
    if identity.role is not Role.SILO:
        raise error(
            f"{whose} belongs to the {identity.role.value} {identity.name!r}, not to a silo; "
            "only a silo may hand out or receive the HE key (the coordinator and admins must "
            f"never hold it); {consequence} and tell the federation operator"
        )
    if identity.name != name:
        raise error(
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
        raise error(
            f"{whose} is not usable for signing as a silo (key usage); {consequence} and ask "
            "the federation operator to re-issue it"
        )
    return cert
