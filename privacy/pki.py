"""Federation PKI: the CA, agent certificates, and the identities they carry."""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.core.atomic import atomic_write_with
from fedsilo.core.validators import is_silo_name

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

CA_CERT_FILENAME = "ca.pem"
CA_KEY_FILENAME = "ca.key"
ORGANIZATION = "fedsilo"

_DNS_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Certificates start this long before "now" so that a silo whose clock runs a little
# behind the operator's machine does not see a brand-new certificate as "not yet valid".
_CLOCK_SKEW = dt.timedelta(minutes=5)
_KEY_MODE = 0o600
_CERT_MODE = 0o644


class Role(enum.Enum):
    """Who a certificate belongs to; carried in the subject's OU."""

    COORDINATOR = "coordinator"
    SILO = "silo"
    ADMIN = "admin"


class CertificateError(Exception):
    """A certificate or key is unusable: wrong CA, outside its validity, or malformed."""


@dataclass(frozen=True, kw_only=True)
class Identity:
    """The authenticated identity a federation certificate carries.

    Attributes:
        role: What the holder is allowed to act as.
        name: The holder's name (the certificate's CN), e.g. ``hospital-a``.
    """

    role: Role
    name: str


@dataclass(frozen=True, kw_only=True)
class CaPaths:
    """Where `init_ca` wrote the federation CA.

    Attributes:
        cert: The CA certificate (``ca.pem``); every agent needs a copy.
        key: The CA private key (``ca.key``, mode 0600); keep it with the operator only.
    """

    cert: Path
    key: Path


@dataclass(frozen=True, kw_only=True)
class IssuedPaths:
    """Where `issue_certificate` wrote a leaf certificate and its key.

    Attributes:
        cert: The leaf certificate (``<name>.pem``).
        key: The leaf private key (``<name>.key``, mode 0600).
    """

    cert: Path
    key: Path


def validate_name(name: str) -> str:
    """Checks that a certificate name is safe as a CN and as a file name.

    Args:
        name: A silo, admin or coordinator name such as ``hospital-a``.

    Returns:
        The name, unchanged.

    Raises:
        ValueError: If the name is not 1-63 characters of lowercase letters, digits,
            ``.``, ``_`` or ``-`` starting with a letter or digit.
    """
    if not is_silo_name(name):
        raise ValueError(
            f"invalid name {name!r}: use 1-63 characters of lowercase letters, digits, "
            "'.', '_' or '-', starting with a letter or digit (e.g. 'hospital-a')"
        )
    return name


def load_pem(path: Path | str) -> bytes:
    """Reads a PEM file (certificate or key).

    Args:
        path: The file to read.

    Returns:
        The file's bytes.

    Raises:
        FileNotFoundError: If the file does not exist.
        CertificateError: If the file is not PEM (e.g. a DER or empty file).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"PEM file {str(path)!r} does not exist; check the path") from None
    if b"-----BEGIN " not in data:
        raise CertificateError(
            f"{str(path)!r} is not a PEM file (expected a '-----BEGIN ...' block)"
        )
    return data


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


# --- helpers -----------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _fmt(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _require_aware(when: dt.datetime, what: str) -> dt.datetime:
    if not isinstance(when, dt.datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{what}={when!r} must be a timezone-aware datetime (e.g. UTC)")
    return when.astimezone(dt.timezone.utc)


def _check_valid_days(valid_days: int) -> None:
    if isinstance(valid_days, bool) or not isinstance(valid_days, int) or valid_days < 1:
        raise ValueError(f"invalid valid_days {valid_days!r}: must be a positive integer")


def _resolve(path: Path) -> Path:
    return path.expanduser().resolve(strict=False)


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


def _extension(cert: x509.Certificate, ext_type: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(ext_type).value
    except x509.ExtensionNotFound:
        return None


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_cert(path: Path) -> x509.Certificate:
    data = load_pem(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"{path.name} is not a valid PEM certificate: {exc}") from None


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = load_pem(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(
            f"private key {path.name} is password-protected; fedsilo needs an unencrypted key"
        ) from None
    except ValueError as exc:
        raise CertificateError(f"{path.name} is not a valid PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(
            f"private key {path.name} is a {type(key).__name__}, expected an ECDSA key"
        )
    return key


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


def _refuse_existing(paths: Sequence[Path], *, what: str, hint: str) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FileExistsError(
            f"refusing to overwrite {what}: {', '.join(existing)} already exist(s); {hint}"
        )


def _write_pair(
    cert_path: Path,
    cert: x509.Certificate,
    key_path: Path,
    key: ec.EllipticCurvePrivateKey,
    *,
    overwrite: bool,
) -> None:
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(key_path, key_bytes, mode=_KEY_MODE, overwrite=overwrite)
    try:
        _write_atomic(
            cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=_CERT_MODE,
            overwrite=overwrite,
        )
    except BaseException:
        if not overwrite:
            key_path.unlink(missing_ok=True)
        raise


def _write_atomic(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Writes via a temp file in the same directory, then renames (or links) it in.

    With ``overwrite`` this is `atomic_write_with` (the temp file is ``mode`` before any
    byte is written). Without it the temp file is created 0600 by `tempfile.mkstemp`, so
    key material is never readable by others, even briefly, and the final name is claimed
    with a hard link, which fails if the name already exists.
    """
    if overwrite:
        def write(handle: BinaryIO) -> None:
            os.fchmod(handle.fileno(), mode)  # also when a stale temporary file was looser
            handle.write(data)

        atomic_write_with(path, write, mode=mode)
        return
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(
                f"refusing to overwrite {str(path)!r}: it already exists"
            ) from None
        except OSError:
            # No hard links on this filesystem: check, then rename (tiny race window).
            if path.exists():
                raise FileExistsError(
                    f"refusing to overwrite {str(path)!r}: it already exists"
                ) from None
            os.replace(tmp, path)
        else:
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
