"""Tests for the federation PKI, including real mTLS gRPC over loopback."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import stat
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.privacy import pki
from fedsilo.privacy.pki import CertificateError, Identity, Role
from fedsilo.privacy.pki import storage as pki_storage

UTC = dt.timezone.utc
NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,62}"


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _ext(cert: x509.Certificate, ext_type: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(ext_type)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclass(frozen=True, kw_only=True)
class Federation:
    """Two CAs and a set of leaf certificates used throughout the tests."""

    ca_dir: Path
    ca: pki.CaPaths
    foreign_ca_dir: Path
    foreign_ca: pki.CaPaths
    coordinator: pki.IssuedPaths
    silo: pki.IssuedPaths
    admin: pki.IssuedPaths
    expired_silo: pki.IssuedPaths
    future_silo: pki.IssuedPaths
    foreign_silo: pki.IssuedPaths
    foreign_coordinator: pki.IssuedPaths
    mismatched_coordinator: pki.IssuedPaths


def _make_federation(root: Path) -> Federation:
    ca_dir, foreign_dir = root / "ca", root / "foreign-ca"
    out, foreign_out = root / "certs", root / "foreign-certs"
    ca = pki.init_ca(ca_dir)
    foreign_ca = pki.init_ca(foreign_dir, common_name="some other federation CA")
    now = _now()
    hosts = ["localhost", "127.0.0.1"]
    return Federation(
        ca_dir=ca_dir,
        ca=ca,
        foreign_ca_dir=foreign_dir,
        foreign_ca=foreign_ca,
        coordinator=pki.issue_certificate(
            ca_dir, out, role=Role.COORDINATOR, name="coordinator", hosts=hosts
        ),
        silo=pki.issue_certificate(ca_dir, out, role=Role.SILO, name="hospital-a"),
        admin=pki.issue_certificate(ca_dir, out, role=Role.ADMIN, name="study-lead"),
        expired_silo=pki.issue_certificate(
            ca_dir,
            out,
            role=Role.SILO,
            name="hospital-old",
            valid_days=1,
            not_before=now - dt.timedelta(days=10),
        ),
        future_silo=pki.issue_certificate(
            ca_dir,
            out,
            role=Role.SILO,
            name="hospital-future",
            valid_days=30,
            not_before=now + dt.timedelta(days=2),
        ),
        foreign_silo=pki.issue_certificate(
            foreign_dir, foreign_out, role=Role.SILO, name="hospital-a"
        ),
        foreign_coordinator=pki.issue_certificate(
            foreign_dir, foreign_out, role=Role.COORDINATOR, name="coordinator", hosts=hosts
        ),
        mismatched_coordinator=pki.issue_certificate(
            ca_dir, out, role=Role.COORDINATOR, name="coordinator-elsewhere",
            hosts=["fl.example.org"],
        ),
    )


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return _make_federation(tmp_path_factory.mktemp("pki"))


# --- validate_name ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["hospital-a", "a", "0", "site_1.eu-west", "a" * 63, "x..y", "9lives"]
)
def test_validate_name_accepts(name: str) -> None:
    assert pki.validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "Hospital-A", "-a", ".hidden", "_a", "a" * 64, "a/b", "../x", "a b", "a\n",
     "hospital-a\n", "é", "a:b"],
)
def test_validate_name_rejects_and_names_value(name: str) -> None:
    with pytest.raises(ValueError, match="invalid name") as info:
        pki.validate_name(name)
    assert repr(name) in str(info.value)


@given(st.from_regex(NAME_PATTERN, fullmatch=True))
def test_validate_name_accepts_everything_the_pattern_allows(name: str) -> None:
    assert pki.validate_name(name) == name


# --- load_pem --------------------------------------------------------------------------


def test_load_pem_reads_pem(fed: Federation) -> None:
    assert pki.load_pem(fed.ca.cert).startswith(b"-----BEGIN CERTIFICATE-----")


def test_load_pem_missing_file_message(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        pki.load_pem(missing)
    assert str(missing) in str(info.value)


def test_load_pem_rejects_non_pem(tmp_path: Path) -> None:
    der = tmp_path / "cert.der"
    der.write_bytes(b"\x30\x82\x01\x00garbage")
    with pytest.raises(CertificateError, match="not a PEM file"):
        pki.load_pem(der)


# --- init_ca ---------------------------------------------------------------------------


def test_init_ca_writes_p256_ca(tmp_path: Path) -> None:
    paths = pki.init_ca(tmp_path / "ca", common_name="Test CA", valid_days=100)
    assert paths == pki.CaPaths(cert=tmp_path / "ca" / "ca.pem", key=tmp_path / "ca" / "ca.key")
    assert _mode(paths.key) == 0o600
    cert = _cert(paths.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    _ext(cert, x509.SubjectKeyIdentifier)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=100)
    assert cert.not_valid_before_utc <= _now()
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    # Written atomically: no temp files left behind.
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca.key", "ca.pem"]


def test_init_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    paths = pki.init_ca(tmp_path)
    before_cert, before_key = paths.cert.read_bytes(), paths.key.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite a federation CA") as info:
        pki.init_ca(tmp_path)
    assert str(paths.cert) in str(info.value)
    assert paths.cert.read_bytes() == before_cert
    assert paths.key.read_bytes() == before_key


def test_init_ca_refuses_when_only_key_exists(tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="ca.key"):
        pki.init_ca(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == b"precious"
    assert not (tmp_path / "ca.pem").exists()


def test_init_ca_overwrite_replaces(tmp_path: Path) -> None:
    first = pki.init_ca(tmp_path)
    old_key = first.key.read_bytes()
    second = pki.init_ca(tmp_path, overwrite=True)
    assert second.key.read_bytes() != old_key
    assert _mode(second.key) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem"]


@pytest.mark.parametrize("days", [0, -1, 1.5, True])
def test_init_ca_rejects_bad_valid_days(tmp_path: Path, days: object) -> None:
    with pytest.raises(ValueError, match="valid_days"):
        pki.init_ca(tmp_path, valid_days=days)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


# --- issue_certificate -----------------------------------------------------------------


def test_issue_silo_certificate(fed: Federation) -> None:
    assert fed.silo.cert.name == "hospital-a.pem" and fed.silo.key.name == "hospital-a.key"
    assert _mode(fed.silo.key) == 0o600
    cert, ca = _cert(fed.silo.cert), _cert(fed.ca.cert)
    cert.verify_directly_issued_by(ca)
    subject = {a.oid: a.value for a in cert.subject}
    assert subject == {
        NameOID.COMMON_NAME: "hospital-a",
        NameOID.ORGANIZATIONAL_UNIT_NAME: "silo",
        NameOID.ORGANIZATION_NAME: "fedsilo",
    }
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hospital-a"]
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    assert _ext(cert, x509.KeyUsage).value.digital_signature
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(ca, x509.SubjectKeyIdentifier).value.digest
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=365)


def test_issue_coordinator_certificate_hosts(fed: Federation) -> None:
    cert = _cert(fed.coordinator.cert)
    eku = set(_ext(cert, x509.ExtendedKeyUsage).value)
    assert eku == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        "coordinator"
    )


def test_issue_coordinator_only_given_hosts(tmp_path: Path, fed: Federation) -> None:
    paths = pki.issue_certificate(
        fed.ca_dir, tmp_path, role=Role.COORDINATOR, name="coord",
        hosts=["FL.Example.org", "10.0.0.5", "::1", "fl.example.org"],
    )
    san = _ext(_cert(paths.cert), x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]


def test_issue_coordinator_requires_host(tmp_path: Path, fed: Federation) -> None:
    with pytest.raises(ValueError, match="needs at least one host"):
        pki.issue_certificate(fed.ca_dir, tmp_path, role=Role.COORDINATOR, name="coord")
    assert not list(tmp_path.iterdir())


def test_issue_silo_rejects_hosts(tmp_path: Path, fed: Federation) -> None:
    with pytest.raises(ValueError, match="only coordinator certificates carry host names"):
        pki.issue_certificate(
            fed.ca_dir, tmp_path, role=Role.SILO, name="hospital-b", hosts=["a.example"]
        )


def test_issue_hosts_as_single_string_is_a_type_error(tmp_path: Path, fed: Federation) -> None:
    with pytest.raises(TypeError, match="'localhost'"):
        pki.issue_certificate(
            fed.ca_dir, tmp_path, role=Role.COORDINATOR, name="coord", hosts="localhost"
        )


@pytest.mark.parametrize("host", ["", "bad host", "-x.example", "a..b", "*.example.org", "é.fr"])
def test_issue_rejects_bad_host(tmp_path: Path, fed: Federation, host: str) -> None:
    with pytest.raises(ValueError, match="invalid host") as info:
        pki.issue_certificate(
            fed.ca_dir, tmp_path, role=Role.COORDINATOR, name="coord", hosts=[host]
        )
    assert repr(host) in str(info.value)


@pytest.mark.parametrize("name", ["Hospital-A", "../escape", "", "a" * 64])
def test_issue_rejects_bad_name_before_writing(tmp_path: Path, fed: Federation, name: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="invalid name"):
        pki.issue_certificate(fed.ca_dir, out, role=Role.SILO, name=name)
    assert not out.exists()


def test_issue_rejects_string_role(tmp_path: Path, fed: Federation) -> None:
    with pytest.raises(ValueError, match="invalid role 'silo'"):
        pki.issue_certificate(
            fed.ca_dir, tmp_path, role="silo", name="x"  # type: ignore[arg-type]
        )


def test_issue_refuses_to_overwrite(tmp_path: Path, fed: Federation) -> None:
    first = pki.issue_certificate(fed.ca_dir, tmp_path, role=Role.SILO, name="hospital-c")
    before = first.cert.read_bytes(), first.key.read_bytes()
    with pytest.raises(FileExistsError, match="certificate named 'hospital-c'") as info:
        pki.issue_certificate(fed.ca_dir, tmp_path, role=Role.ADMIN, name="hospital-c")
    assert str(first.cert) in str(info.value)
    assert (first.cert.read_bytes(), first.key.read_bytes()) == before
    again = pki.issue_certificate(
        fed.ca_dir, tmp_path, role=Role.ADMIN, name="hospital-c", overwrite=True
    )
    assert again.key.read_bytes() != before[1]
    assert _mode(again.key) == 0o600
    assert pki.identity_from_pem(again.cert.read_bytes()) == Identity(
        role=Role.ADMIN, name="hospital-c"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hospital-c.key", "hospital-c.pem"]


def test_issue_refuses_when_only_key_exists(tmp_path: Path, fed: Federation) -> None:
    (tmp_path / "hospital-d.key").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="hospital-d.key"):
        pki.issue_certificate(fed.ca_dir, tmp_path, role=Role.SILO, name="hospital-d")
    assert (tmp_path / "hospital-d.key").read_bytes() == b"keep me"
    assert not (tmp_path / "hospital-d.pem").exists()


def test_issue_without_hard_links(
    tmp_path: Path, fed: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(pki_storage.os, "link", no_links)
    paths = pki.issue_certificate(fed.ca_dir, tmp_path, role=Role.SILO, name="hospital-e")
    assert _mode(paths.key) == 0o600
    assert pki.check_certificate(paths.cert, fed.ca.cert, key_path=paths.key).name == "hospital-e"
    with pytest.raises(FileExistsError):
        pki.issue_certificate(fed.ca_dir, tmp_path, role=Role.SILO, name="hospital-e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hospital-e.key", "hospital-e.pem"]


def test_issue_cannot_clobber_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    with pytest.raises(ValueError, match="would overwrite the CA files"):
        pki.issue_certificate(tmp_path, tmp_path, role=Role.SILO, name="ca", overwrite=True)


def test_issue_without_ca(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no federation CA"):
        pki.issue_certificate(tmp_path, tmp_path / "out", role=Role.SILO, name="hospital-a")


def test_issue_with_mismatched_ca_key(tmp_path: Path, fed: Federation) -> None:
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / "ca.pem").write_bytes(fed.ca.cert.read_bytes())
    (ca_dir / "ca.key").write_bytes(fed.foreign_ca.key.read_bytes())
    with pytest.raises(CertificateError, match="does not match CA certificate"):
        pki.issue_certificate(ca_dir, tmp_path, role=Role.SILO, name="hospital-a")


def test_issue_must_not_outlive_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca", valid_days=30)
    with pytest.raises(ValueError, match="after the CA expires"):
        pki.issue_certificate(tmp_path / "ca", tmp_path, role=Role.SILO, name="s", valid_days=31)


def test_issue_rejects_naive_not_before(tmp_path: Path, fed: Federation) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        pki.issue_certificate(
            fed.ca_dir, tmp_path, role=Role.SILO, name="s", not_before=dt.datetime(2030, 1, 1)
        )


def test_issue_not_before_sets_window(fed: Federation) -> None:
    cert = _cert(fed.expired_silo.cert)
    assert cert.not_valid_after_utc < _now()
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=1)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.from_regex(NAME_PATTERN, fullmatch=True), role=st.sampled_from(list(Role)))
def test_issue_then_identity_round_trip(
    tmp_path_factory: pytest.TempPathFactory, fed: Federation, name: str, role: Role
) -> None:
    out = tmp_path_factory.mktemp("roundtrip")
    hosts = ["localhost"] if role is Role.COORDINATOR else ()
    paths = pki.issue_certificate(fed.ca_dir, out, role=role, name=name, hosts=hosts)
    expected = Identity(role=role, name=name)
    assert pki.identity_from_pem(paths.cert.read_bytes()) == expected
    assert pki.check_certificate(paths.cert, fed.ca.cert, key_path=paths.key) == expected


# --- identity_from_pem -----------------------------------------------------------------


def test_identity_from_pem_each_role(fed: Federation) -> None:
    assert pki.identity_from_pem(fed.silo.cert.read_bytes()) == Identity(
        role=Role.SILO, name="hospital-a"
    )
    assert pki.identity_from_pem(fed.admin.cert.read_bytes()) == Identity(
        role=Role.ADMIN, name="study-lead"
    )
    assert pki.identity_from_pem(fed.coordinator.cert.read_bytes()) == Identity(
        role=Role.COORDINATOR, name="coordinator"
    )
    assert pki.identity_from_pem(fed.silo.cert.read_text()) == Identity(  # type: ignore[arg-type]
        role=Role.SILO, name="hospital-a"
    )


def test_identity_is_frozen_keyword_only() -> None:
    ident = Identity(role=Role.SILO, name="hospital-a")
    with pytest.raises(AttributeError):
        ident.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Identity(Role.SILO, "hospital-a")  # type: ignore[misc]


def test_identity_from_pem_garbage() -> None:
    with pytest.raises(CertificateError, match="not a valid PEM certificate"):
        pki.identity_from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateError):
        pki.identity_from_pem(b"")


def test_identity_from_pem_ca_cert_has_no_role(fed: Federation) -> None:
    with pytest.raises(CertificateError, match="exactly one OU"):
        pki.identity_from_pem(fed.ca.cert.read_bytes())


def _self_signed(subject: list[x509.NameAttribute]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(subject)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        (
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsilo"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "auditor"),
                x509.NameAttribute(NameOID.COMMON_NAME, "x"),
            ],
            "unknown role OU='auditor'",
        ),
        (
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evilcorp"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "silo"),
                x509.NameAttribute(NameOID.COMMON_NAME, "x"),
            ],
            "not a fedsilo certificate",
        ),
        (
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsilo"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "silo"),
            ],
            "exactly one CN",
        ),
        (
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsilo"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "silo"),
                x509.NameAttribute(NameOID.COMMON_NAME, "Bad Name"),
            ],
            "invalid CN",
        ),
    ],
)
def test_identity_from_pem_rejects_bad_subjects(
    subject: list[x509.NameAttribute], message: str
) -> None:
    with pytest.raises(CertificateError, match=message):
        pki.identity_from_pem(_self_signed(subject))


# --- check_certificate -----------------------------------------------------------------


def test_check_certificate_ok(fed: Federation) -> None:
    assert pki.check_certificate(fed.silo.cert, fed.ca.cert, key_path=fed.silo.key) == Identity(
        role=Role.SILO, name="hospital-a"
    )
    assert pki.check_certificate(fed.coordinator.cert, fed.ca.cert) == Identity(
        role=Role.COORDINATOR, name="coordinator"
    )


def test_check_certificate_foreign_ca(fed: Federation) -> None:
    with pytest.raises(
        CertificateError,
        match=r"certificate hospital-a\.pem was not issued by the federation CA in ca\.pem",
    ) as info:
        pki.check_certificate(fed.foreign_silo.cert, fed.ca.cert)
    assert "some other federation CA" in str(info.value)


def test_check_certificate_expired_message(fed: Federation) -> None:
    cert = _cert(fed.expired_silo.cert)
    expiry = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(CertificateError) as info:
        pki.check_certificate(fed.expired_silo.cert, fed.ca.cert)
    assert str(info.value).startswith(f"certificate hospital-old.pem expired on {expiry}")


def test_check_certificate_expired_at_given_now(tmp_path: Path, fed: Federation) -> None:
    # A whole-day window starting tomorrow at midnight UTC (inside the CA's validity).
    start = _now().replace(hour=0, minute=0, second=0, microsecond=0) + dt.timedelta(days=1)
    end = start + dt.timedelta(days=1)
    paths = pki.issue_certificate(
        fed.ca_dir, tmp_path, role=Role.SILO, name="hospital-a", not_before=start, valid_days=1
    )
    with pytest.raises(CertificateError) as info:
        pki.check_certificate(paths.cert, fed.ca.cert, now=end + dt.timedelta(hours=1))
    expected = f"certificate hospital-a.pem expired on {end:%Y-%m-%d}T00:00:00Z"
    assert str(info.value).startswith(expected), str(info.value)
    # The same certificate, checked at an instant inside its window.
    assert pki.check_certificate(
        paths.cert, fed.ca.cert, now=start + dt.timedelta(hours=12)
    ) == Identity(role=Role.SILO, name="hospital-a")


def test_check_certificate_not_yet_valid(fed: Federation) -> None:
    start = _cert(fed.future_silo.cert).not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(
        CertificateError, match=rf"hospital-future\.pem is not valid until {start}.*clock"
    ):
        pki.check_certificate(fed.future_silo.cert, fed.ca.cert)


def test_check_certificate_expired_ca(tmp_path: Path, fed: Federation) -> None:
    with pytest.raises(CertificateError, match=r"the federation CA ca\.pem expired on"):
        pki.check_certificate(fed.silo.cert, fed.ca.cert, now=_now() + dt.timedelta(days=4000))


def test_check_certificate_wrong_key(fed: Federation) -> None:
    with pytest.raises(
        CertificateError,
        match=r"private key study-lead\.key does not belong to certificate hospital-a\.pem",
    ):
        pki.check_certificate(fed.silo.cert, fed.ca.cert, key_path=fed.admin.key)


def test_check_certificate_key_is_not_a_key(fed: Federation) -> None:
    with pytest.raises(CertificateError, match="not a valid PEM private key"):
        pki.check_certificate(fed.silo.cert, fed.ca.cert, key_path=fed.silo.cert)


def test_check_certificate_encrypted_key(tmp_path: Path, fed: Federation) -> None:
    key = serialization.load_pem_private_key(fed.silo.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(CertificateError, match="password-protected"):
        pki.check_certificate(fed.silo.cert, fed.ca.cert, key_path=locked)


def test_check_certificate_swapped_arguments(fed: Federation) -> None:
    with pytest.raises(CertificateError, match=r"hospital-a\.pem is not a CA certificate"):
        pki.check_certificate(fed.ca.cert, fed.silo.cert)
    with pytest.raises(CertificateError, match=r"ca\.pem is a CA certificate, not an agent"):
        pki.check_certificate(fed.ca.cert, fed.ca.cert)


def test_check_certificate_missing_files(tmp_path: Path, fed: Federation) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pki.check_certificate(tmp_path / "hospital-z.pem", fed.ca.cert)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pki.check_certificate(fed.silo.cert, fed.ca.cert, key_path=tmp_path / "missing.key")


def test_check_certificate_rejects_naive_now(fed: Federation) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        pki.check_certificate(fed.silo.cert, fed.ca.cert, now=dt.datetime(2030, 1, 1))


# --- real gRPC over loopback with mTLS -------------------------------------------------

WHOAMI = "/fedsilo.test.Probe/WhoAmI"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# Fresh subchannels per channel, so one test's connection state never leaks into another's.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
RPC_TIMEOUT_S = 5


class _RecordingInterceptor(grpc.ServerInterceptor):
    """Records every RPC that reaches the application, whichever handler serves it."""

    def __init__(self) -> None:
        self.methods: list[str] = []
        self._lock = threading.Lock()

    def intercept_service(  # type: ignore[no-untyped-def]
        self, continuation, handler_call_details
    ):
        with self._lock:
            self.methods.append(handler_call_details.method)
        return continuation(handler_call_details)


@dataclass(frozen=True, kw_only=True)
class Coordinator:
    """A running mTLS gRPC server on loopback."""

    port: int
    seen: _RecordingInterceptor


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    identity = pki.identity_from_pem(context.auth_context()["x509_pem_cert"][0])
    return f"{identity.role.value}:{identity.name}".encode()


def _start_server(
    fed: Federation, server_cert: pki.IssuedPaths
) -> tuple[grpc.Server, Coordinator]:
    seen = _RecordingInterceptor()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[seen])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "fedsilo.test.Probe", {"WhoAmI": grpc.unary_unary_rpc_method_handler(_whoami)}
            )
        ]
    )
    credentials = grpc.ssl_server_credentials(
        [(server_cert.key.read_bytes(), server_cert.cert.read_bytes())],
        root_certificates=fed.ca.cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port != 0
    server.start()
    return server, Coordinator(port=port, seen=seen)


@pytest.fixture(scope="module")
def coordinator(fed: Federation) -> Iterator[Coordinator]:
    server, running = _start_server(fed, fed.coordinator)
    yield running
    server.stop(grace=None)


def _channel(
    port: int, client: pki.IssuedPaths | None, *, ca: Path, host: str = "127.0.0.1"
) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    return grpc.secure_channel(f"{host}:{port}", credentials, options=CHANNEL_OPTIONS)


def _whoami_call(
    port: int, client: pki.IssuedPaths | None, *, ca: Path, host: str = "127.0.0.1"
) -> bytes:
    with _channel(port, client, ca=ca, host=host) as channel:
        return channel.unary_unary(WHOAMI)(b"", timeout=RPC_TIMEOUT_S)


def _refusal(port: int, client: pki.IssuedPaths | None, *, ca: Path) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _whoami_call(port, client, ca=ca)
    return info.value


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_grpc_silo_is_identified_by_its_certificate(
    fed: Federation, coordinator: Coordinator, host: str
) -> None:
    assert _whoami_call(coordinator.port, fed.silo, ca=fed.ca.cert, host=host) == (
        b"silo:hospital-a"
    )
    assert _whoami_call(coordinator.port, fed.admin, ca=fed.ca.cert, host=host) == (
        b"admin:study-lead"
    )


def test_grpc_health_check_over_mtls(fed: Federation, coordinator: Coordinator) -> None:
    with _channel(coordinator.port, fed.silo, ca=fed.ca.cert) as channel:
        grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_auth_context_carries_pem(fed: Federation, coordinator: Coordinator) -> None:
    seen: dict[str, list[bytes]] = {}

    def capture(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.update(context.auth_context())
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(
            "fedsilo.test.Probe", {"WhoAmI": grpc.unary_unary_rpc_method_handler(capture)}
        )]
    )
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(fed.coordinator.key.read_bytes(), fed.coordinator.cert.read_bytes())],
            root_certificates=fed.ca.cert.read_bytes(),
            require_client_auth=True,
        ),
    )
    server.start()
    try:
        _whoami_call(port, fed.silo, ca=fed.ca.cert)
    finally:
        server.stop(grace=None)
    assert seen["transport_security_type"] == [b"ssl"]
    assert seen["x509_common_name"] == [b"hospital-a"]
    assert len(seen["x509_pem_cert"]) == 1
    assert x509.load_pem_x509_certificate(seen["x509_pem_cert"][0]) == _cert(fed.silo.cert)


# What the CLIENT sees when the coordinator refuses its certificate (grpcio 1.85, TLS 1.3):
#   StatusCode.UNAVAILABLE, details
#   "failed to connect to all addresses; last error: UNAVAILABLE:
#    ipv4:127.0.0.1:<port>: Socket closed"     (one line)
# identical for every reason. The server closes the connection without a TLS alert, so the
# reason (PEER_DID_NOT_RETURN_A_CERTIFICATE, CERTIFICATE_VERIFY_FAILED: unable to get local
# issuer certificate / certificate has expired / certificate is not yet valid) appears only in
# the coordinator's log. `check_certificate` is how an agent finds out locally.
@pytest.mark.parametrize(
    "client_name", [None, "foreign_silo", "expired_silo", "future_silo"],
    ids=["no-client-cert", "foreign-ca", "expired", "not-yet-valid"],
)
def test_grpc_refuses_bad_client_certificates(
    fed: Federation, coordinator: Coordinator, client_name: str | None
) -> None:
    client = getattr(fed, client_name) if client_name else None
    before = len(coordinator.seen.methods)
    error = _refusal(coordinator.port, client, ca=fed.ca.cert)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    details = error.details()
    assert details.startswith("failed to connect to all addresses"), details
    assert details.endswith(f"ipv4:127.0.0.1:{coordinator.port}: Socket closed"), details
    # No handler, health included, was ever reached.
    assert coordinator.seen.methods[before:] == []
    with _channel(coordinator.port, client, ca=fed.ca.cert) as channel:
        with pytest.raises(grpc.RpcError) as health_info:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S
            )
    assert health_info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert coordinator.seen.methods[before:] == []


def test_grpc_client_refuses_foreign_server_certificate(fed: Federation) -> None:
    server, impostor = _start_server(fed, fed.foreign_coordinator)
    try:
        error = _refusal(impostor.port, fed.silo, ca=fed.ca.cert)
    finally:
        server.stop(grace=None)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    details = error.details()
    assert "Tls handshake failed" in details, details
    assert "CERTIFICATE_VERIFY_FAILED" in details, details
    assert "unable to get local issuer certificate" in details, details
    assert impostor.seen.methods == []


def test_grpc_client_refuses_server_certificate_for_other_host(fed: Federation) -> None:
    server, elsewhere = _start_server(fed, fed.mismatched_coordinator)
    try:
        error = _refusal(elsewhere.port, fed.silo, ca=fed.ca.cert)
    finally:
        server.stop(grace=None)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "Hostname Verification Check failed" in error.details(), error.details()
    assert elsewhere.seen.methods == []


def test_grpc_coordinator_down_is_connection_refused(fed: Federation) -> None:
    port = _free_port()
    error = _refusal(port, fed.silo, ca=fed.ca.cert)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    details = error.details()
    assert details.startswith("failed to connect to all addresses"), details
    assert details.endswith(
        f"ipv4:127.0.0.1:{port}: Failed to connect to remote host: Connection refused"
    ), details
    assert "Socket closed" not in details and "Tls handshake failed" not in details
