"""Issuing federation certificates: creating the CA and signing agent certificates with it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.privacy.pki.clock import _fmt, _require_aware, _utcnow
from fedsilo.privacy.pki.names import (
    CA_CERT_FILENAME,
    CA_KEY_FILENAME,
    ORGANIZATION,
    CaPaths,
    CertificateError,
    IssuedPaths,
    Role,
    validate_name,
)
from fedsilo.privacy.pki.storage import (
    _load_cert,
    _load_private_key,
    _refuse_existing,
    _resolve,
    _write_pair,
)
from fedsilo.privacy.pki.verify import _extension, _spki

_DNS_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Certificates start this long before "now" so that a silo whose clock runs a little
# behind the operator's machine does not see a brand-new certificate as "not yet valid".
_CLOCK_SKEW = dt.timedelta(minutes=5)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Key usage of a CA certificate (signs certificates and CRLs) or a leaf (signs only: TLS and documents)."""
    return x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def init_ca(
    directory: Path,
    *,
    common_name: str = "fedsilo federation CA",
    valid_days: int = 3650,
    overwrite: bool = False,
) -> CaPaths:
    """Creates the federation CA: ``ca.pem`` and ``ca.key`` in ``directory``.

    The key is ECDSA P-256 and the certificate is self-signed with SHA-256, with
    BasicConstraints(ca=True, path_length=0): it can issue agent certificates only.

    Args:
        directory: Where to write the files; created (mode 0700) if missing.
        common_name: The CA's CN.
        valid_days: How long the CA is valid.
        overwrite: Replace an existing CA. Every certificate it issued stops working.

    Returns:
        The paths written.

    Raises:
        FileExistsError: If a CA already exists there and ``overwrite`` is False.
        ValueError: If ``valid_days`` is not a positive integer or ``common_name`` is empty.
    """
    _check_valid_days(valid_days)
    if not isinstance(common_name, str) or not common_name.strip():
        raise ValueError(f"invalid CA common_name {common_name!r}: must be non-empty")
    directory = Path(directory)
    paths = CaPaths(cert=directory / CA_CERT_FILENAME, key=directory / CA_KEY_FILENAME)
    if not overwrite:
        _refuse_existing(
            (paths.cert, paths.key), what="a federation CA", hint="pass overwrite=True"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    not_before = _utcnow() - _CLOCK_SKEW
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    _write_pair(paths.cert, cert, paths.key, key, overwrite=overwrite)
    return paths


def issue_certificate(
    ca_dir: Path,
    out_dir: Path,
    *,
    role: Role,
    name: str,
    hosts: Sequence[str] = (),
    valid_days: int = 365,
    not_before: dt.datetime | None = None,
    overwrite: bool = False,
) -> IssuedPaths:
    """Issues a leaf certificate and key signed by the federation CA.

    The subject is ``CN=name, OU=role.value, O=fedsilo``. Coordinator certificates
    carry serverAuth and clientAuth and a SAN entry per host (DNS name or IP
    address); silo and admin certificates carry clientAuth and ``DNS:name``.

    Args:
        ca_dir: Directory holding ``ca.pem`` and ``ca.key``.
        out_dir: Where to write ``<name>.pem`` and ``<name>.key``; created if missing.
        role: The holder's role.
        name: The holder's name; see `validate_name`.
        hosts: Coordinator only: the DNS names and IP addresses agents dial. At least
            one is required; nothing (not even ``localhost``) is added implicitly.
        valid_days: How long the certificate is valid from ``not_before``.
        not_before: Start of validity (timezone-aware). Defaults to five minutes ago.
            Tests use a past value to make already-expired certificates.
        overwrite: Replace an existing certificate and key of the same name.

    Returns:
        The paths written.

    Raises:
        FileExistsError: If ``<name>.pem`` or ``<name>.key`` exists and ``overwrite``
            is False.
        FileNotFoundError: If the CA files are missing.
        ValueError: For a bad name, host, role/host combination, validity, or a
            certificate that would outlive the CA.
        CertificateError: If the CA files are unusable or the CA has expired.
    """
    if not isinstance(role, Role):
        raise ValueError(f"invalid role {role!r}: expected one of {[r.name for r in Role]}")
    validate_name(name)
    _check_valid_days(valid_days)
    if isinstance(hosts, (str, bytes)):
        raise TypeError(f"hosts must be a sequence of strings, not a single string {hosts!r}")
    host_list = _normalize_hosts(hosts)
    if role is Role.COORDINATOR and not host_list:
        raise ValueError(
            f"coordinator certificate {name!r} needs at least one host "
            "(the DNS name or IP address silos dial, e.g. 'fl.example.org' or '10.0.0.5')"
        )
    if role is not Role.COORDINATOR and host_list:
        raise ValueError(
            f"hosts {list(hosts)!r} given for a {role.value} certificate; "
            "only coordinator certificates carry host names"
        )
    if not_before is None:
        not_before = _utcnow() - _CLOCK_SKEW
    else:
        not_before = _require_aware(not_before, "not_before")
    not_after = not_before + dt.timedelta(days=valid_days)

    ca_dir = Path(ca_dir)
    out_dir = Path(out_dir)
    paths = IssuedPaths(cert=out_dir / f"{name}.pem", key=out_dir / f"{name}.key")
    ca_paths = CaPaths(cert=ca_dir / CA_CERT_FILENAME, key=ca_dir / CA_KEY_FILENAME)
    if {_resolve(paths.cert), _resolve(paths.key)} & {
        _resolve(ca_paths.cert),
        _resolve(ca_paths.key),
    }:
        raise ValueError(f"name {name!r} would overwrite the CA files in {str(ca_dir)!r}")
    ca_cert, ca_key = _load_ca(ca_paths)
    now = _utcnow()
    if now > ca_cert.not_valid_after_utc:
        raise CertificateError(
            f"the federation CA {str(ca_paths.cert)!r} expired on "
            f"{_fmt(ca_cert.not_valid_after_utc)}; create a new CA and re-issue all certificates"
        )
    if not_after > ca_cert.not_valid_after_utc:
        raise ValueError(
            f"valid_days={valid_days} would make {name!r} valid until {_fmt(not_after)}, "
            f"after the CA expires on {_fmt(ca_cert.not_valid_after_utc)}; use fewer days"
        )
    if not overwrite:
        _refuse_existing(
            (paths.cert, paths.key),
            what=f"a certificate named {name!r}",
            hint="choose another name or pass overwrite=True",
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    if role is Role.COORDINATOR:
        eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        san: list[x509.GeneralName] = [_general_name(h) for h in host_list]
    else:
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
        san = [x509.DNSName(name)]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(paths.cert, cert, paths.key, key, overwrite=overwrite)
    return paths


def _check_valid_days(valid_days: int) -> None:
    if isinstance(valid_days, bool) or not isinstance(valid_days, int) or valid_days < 1:
        raise ValueError(f"invalid valid_days {valid_days!r}: must be a positive integer")


def _normalize_hosts(hosts: Sequence[str]) -> list[str]:
    result: list[str] = []
    for host in hosts:
        if not isinstance(host, str):
            raise ValueError(f"invalid host {host!r}: must be a string")
        try:
            normalized = str(ipaddress.ip_address(host))
        except ValueError:
            normalized = host.lower()
            labels = normalized.split(".")
            if (
                not normalized
                or len(normalized) > 253
                or any(_DNS_LABEL_RE.fullmatch(label) is None for label in labels)
            ):
                raise ValueError(
                    f"invalid host {host!r}: expected a DNS name such as "
                    "'fl.example.org' or an IP address such as '10.0.0.5'"
                ) from None
        if normalized not in result:
            result.append(normalized)
    return result


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = _extension(ca_cert, x509.SubjectKeyIdentifier)
    if ski is not None:
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    public_key = ca_cert.public_key()
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)  # type: ignore[arg-type]


def _load_ca(paths: CaPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not paths.cert.exists() or not paths.key.exists():
        missing = [str(p) for p in (paths.cert, paths.key) if not p.exists()]
        raise FileNotFoundError(
            f"no federation CA in {str(paths.cert.parent)!r} (missing {', '.join(missing)}); "
            "create one with init_ca first"
        )
    cert = _load_cert(paths.cert)
    key = _load_private_key(paths.key)
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise CertificateError(
            f"CA key {str(paths.key)!r} does not match CA certificate {str(paths.cert)!r}"
        )
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise CertificateError(f"{str(paths.cert)!r} is not a CA certificate")
    return cert, key
