"""Tests for the key ceremony: wrapping the HE secret key for each silo."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.privacy import keywrap, pki
from fedsilo.privacy.keywrap import bundle as keywrap_bundle
from fedsilo.privacy.keywrap import (
    KemKeyPair,
    KeyWrapError,
    WrappedKey,
    announce_kem_public,
    kem_public_fingerprint,
    unwrap_key,
    verify_kem_announcement,
    wrap_key,
)
from fedsilo.privacy.pki import Role

UTC = dt.timezone.utc
RUN = "run-2024-07-01"
HOLDER = "hospital-a"
RECIPIENTS = ("hospital-b", "hospital-c", "hospital-d")
FP = hashlib.sha256(b"ckks N=4096 [40,40] scale=2^40").hexdigest()
OTHER_FP = hashlib.sha256(b"bfv N=4096 t=786433").hexdigest()
FIELDS = keywrap._BUNDLE_FIELDS
TAMPERED = "tampered with or substituted"

# Fuzzed certificates make `cryptography` warn about malformed name attributes.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")


@dataclass(frozen=True, kw_only=True)
class Party:
    """A certificate holder: its name, certificate and key (PEM)."""

    name: str
    cert: bytes = dataclasses.field(repr=False)
    key: bytes = dataclasses.field(repr=False)


@dataclass(frozen=True, kw_only=True)
class Federation:
    """One federation CA, its members, and a few impostors."""

    ca: bytes = dataclasses.field(repr=False)
    silos: dict[str, Party]
    kem: dict[str, KemKeyPair]
    coordinator: Party
    admin_named_holder: Party
    foreign_holder: Party
    expired_holder: Party


def _party(paths: pki.IssuedPaths, name: str) -> Party:
    return Party(name=name, cert=paths.cert.read_bytes(), key=paths.key.read_bytes())


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("keywrap")
    ca_dir = root / "ca"
    ca = pki.init_ca(ca_dir)
    pki.init_ca(root / "foreign-ca")
    silos = {
        name: _party(pki.issue_certificate(ca_dir, root / "certs", role=Role.SILO, name=name), name)
        for name in (HOLDER, *RECIPIENTS)
    }
    now = dt.datetime.now(UTC)
    return Federation(
        ca=ca.cert.read_bytes(),
        silos=silos,
        kem={name: KemKeyPair.generate() for name in silos},
        coordinator=_party(
            pki.issue_certificate(
                ca_dir, root / "certs", role=Role.COORDINATOR, name="coordinator",
                hosts=["localhost"],
            ),
            "coordinator",
        ),
        admin_named_holder=_party(
            pki.issue_certificate(ca_dir, root / "admin", role=Role.ADMIN, name=HOLDER), HOLDER
        ),
        foreign_holder=_party(
            pki.issue_certificate(
                root / "foreign-ca", root / "foreign", role=Role.SILO, name=HOLDER
            ),
            HOLDER,
        ),
        expired_holder=_party(
            pki.issue_certificate(
                ca_dir, root / "expired", role=Role.SILO, name=HOLDER, valid_days=30,
                not_before=now - dt.timedelta(days=60),
            ),
            HOLDER,
        ),
    )


def _wrap(
    fed: Federation,
    recipient: str = "hospital-b",
    *,
    secret: bytes = b"ckks-secret-context" * 8,
    run_id: str = RUN,
    issuer: Party | None = None,
    fingerprint: str = FP,
    recipient_public: bytes | None = None,
) -> WrappedKey:
    issuer = fed.silos[HOLDER] if issuer is None else issuer
    return wrap_key(
        secret=secret,
        run_id=run_id,
        issuer=issuer.name,
        issuer_certificate_pem=issuer.cert,
        issuer_private_key_pem=issuer.key,
        params_fingerprint=fingerprint,
        recipient=recipient,
        recipient_public=(
            fed.kem[recipient].public_bytes() if recipient_public is None else recipient_public
        ),
    )


def _unwrap(
    fed: Federation,
    blob: bytes,
    me: str = "hospital-b",
    *,
    run_id: str = RUN,
    keypair: KemKeyPair | None = None,
    expected_issuer: str = HOLDER,
    fingerprint: str = FP,
    now: dt.datetime | None = None,
) -> bytes:
    return unwrap_key(
        blob,
        run_id=run_id,
        me=me,
        my_keypair=fed.kem[me] if keypair is None else keypair,
        ca_pem=fed.ca,
        expected_issuer=expected_issuer,
        params_fingerprint=fingerprint,
        now=now,
    )


def _resign(bundle: WrappedKey, signer: Party, **changes: object) -> bytes:
    """Re-signs a bundle, as written in the wire spec, with someone else's certificate."""
    forged = dataclasses.replace(bundle, issuer_certificate=signer.cert, **changes)
    key = serialization.load_pem_private_key(signer.key, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    r, s = decode_dss_signature(key.sign(forged.signed_bytes(), ec.ECDSA(hashes.SHA256())))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return dataclasses.replace(forged, signature=signature).to_bytes()


def _field_spans(blob: bytes) -> dict[str, tuple[int, int]]:
    """Where each field's content lies in the blob, read straight from the wire layout."""
    spans: dict[str, tuple[int, int]] = {}
    offset = 5
    for name in FIELDS:
        (length,) = struct.unpack_from(">I", blob, offset)
        spans[name] = (offset + 4, offset + 4 + length)
        offset += 4 + length
    assert offset == len(blob)
    return spans


@pytest.fixture(scope="module")
def blob(fed: Federation) -> bytes:
    return _wrap(fed).to_bytes()


# --- happy path and wire format ----------------------------------------------------------


def test_round_trip_for_several_recipients(fed: Federation) -> None:
    secret = os.urandom(300_000)
    blobs = {r: _wrap(fed, r, secret=secret).to_bytes() for r in RECIPIENTS}
    for recipient, data in blobs.items():
        assert _unwrap(fed, data, recipient) == secret
    parsed = [WrappedKey.from_bytes(b) for b in blobs.values()]
    assert len({p.ephemeral_public for p in parsed}) == len(RECIPIENTS)
    assert len({p.nonce for p in parsed}) == len(RECIPIENTS)
    assert len({p.ciphertext for p in parsed}) == len(RECIPIENTS)
    assert len(parsed[0].ciphertext) == len(secret) + 16


def test_wrapping_twice_for_one_recipient_uses_fresh_ephemeral_keys(fed: Federation) -> None:
    first, second = _wrap(fed), _wrap(fed)
    assert first.ephemeral_public != second.ephemeral_public
    assert first.ciphertext != second.ciphertext


def test_coordinator_visible_blob_does_not_contain_the_secret(fed: Federation) -> None:
    secret = bytes(range(256)) * 40
    data = _wrap(fed, secret=secret).to_bytes()
    assert secret not in data
    windows = {secret[i : i + 16] for i in range(0, len(secret) - 16)}
    assert not any(data[i : i + 16] in windows for i in range(len(data) - 16))
    holder_key = serialization.load_pem_private_key(fed.silos[HOLDER].key, password=None)
    assert isinstance(holder_key, ec.EllipticCurvePrivateKey)
    scalar = holder_key.private_numbers().private_value.to_bytes(32, "big")
    assert scalar not in data and fed.silos[HOLDER].key not in data


def test_wire_layout_is_canonical_and_documented(fed: Federation, blob: bytes) -> None:
    assert blob[:4] == b"FSKW" and blob[4] == keywrap.PROTOCOL_VERSION == 1
    spans = _field_spans(blob)
    bundle = WrappedKey.from_bytes(blob)
    for name, (start, end) in spans.items():
        value = getattr(bundle, name)
        assert blob[start:end] == (value.encode() if isinstance(value, str) else value)
    assert bundle.to_bytes() == blob
    sig_start = spans["signature"][0]
    assert bundle.signed_bytes() == blob[: sig_start - 4]
    assert len(bundle.ephemeral_public) == 32 and len(bundle.nonce) == 12
    assert len(bundle.signature) == 64
    assert bundle.issuer_certificate == fed.silos[HOLDER].cert
    assert "ciphertext" not in repr(bundle) and "signature" not in repr(bundle)


def test_construction_matches_the_spec(fed: Federation) -> None:
    """Decrypts independently: X25519, HKDF-SHA256 (salt, info) and AES-256-GCM (AAD)."""
    secret = b"independently decrypted"
    bundle = _wrap(fed, secret=secret)
    me = fed.kem["hospital-b"]

    def lp(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    names = [RUN.encode(), HOLDER.encode(), b"hospital-b", FP.encode()]
    shared = me.private_key.exchange(
        x25519.X25519PublicKey.from_public_bytes(bundle.ephemeral_public)
    )
    info = b"fedsilo-keywrap-v1 aead-key\x00" + b"".join(
        lp(p) for p in (*names, bundle.ephemeral_public, me.public_bytes())
    )
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=hashlib.sha256(RUN.encode()).digest(), info=info
    ).derive(shared)
    aad = b"fedsilo-keywrap-v1 aad\x00" + b"".join(lp(p) for p in names)
    assert AESGCM(key).decrypt(bundle.nonce, bundle.ciphertext, aad) == secret
    with pytest.raises(InvalidTag):
        AESGCM(key).decrypt(bundle.nonce, bundle.ciphertext, aad + b"x")


# --- every refusal -----------------------------------------------------------------------


def _replace_byte(blob: bytes, index: int, value: int) -> bytes:
    return blob[:index] + bytes([value]) + blob[index + 1 :]


# field -> (where in the field, how to change the byte, what the refusal must say)
FIELD_CASES = {
    "run_id": (0, lambda b: ord("s"), r"made for run 'sun-2024-07-01'.*replayed from another run"),
    "issuer": (-1, lambda b: ord("z"), r"issued by 'hospital-z'.*key holder of run"),
    "recipient": (-1, lambda b: ord("c"), r"addressed to silo 'hospital-c'.*wrong recipient"),
    "params_fingerprint": (5, lambda b: ord("0") if b != ord("0") else ord("1"), TAMPERED),
    "ephemeral_public": (0, lambda b: b ^ 0x01, TAMPERED),
    "nonce": (3, lambda b: b ^ 0x80, TAMPERED),
    "ciphertext": (-1, lambda b: b ^ 0x01, TAMPERED),
    "issuer_certificate": (
        200,
        lambda b: ord("A") if b != ord("A") else ord("B"),
        r"not issued by this federation's CA|not a readable PEM certificate",
    ),
    "signature": (10, lambda b: b ^ 0x01, TAMPERED),
}


@pytest.mark.parametrize("field_name", FIELDS)
def test_a_changed_byte_in_each_field_is_refused_with_its_reason(
    fed: Federation, blob: bytes, field_name: str
) -> None:
    where, change, message = FIELD_CASES[field_name]
    start, end = _field_spans(blob)[field_name]
    index = start + where if where >= 0 else end + where
    tampered = _replace_byte(blob, index, change(blob[index]))
    with pytest.raises(KeyWrapError, match=message):
        _unwrap(fed, tampered)


@pytest.mark.parametrize(
    ("index", "message"),
    [(0, "not a fedsilo key bundle"), (4, "format version"), (5, "truncated|damaged")],
)
def test_changed_header_or_length_is_refused(
    fed: Federation, blob: bytes, index: int, message: str
) -> None:
    with pytest.raises(KeyWrapError, match=message):
        _unwrap(fed, _replace_byte(blob, index, blob[index] ^ 0x01))


def test_every_single_bit_flip_is_refused(fed: Federation, blob: bytes) -> None:
    for index in range(len(blob)):
        with pytest.raises(KeyWrapError):
            _unwrap(fed, _replace_byte(blob, index, blob[index] ^ 0x01))


@settings(max_examples=300, deadline=None)
@given(position=st.floats(0, 1, exclude_max=True), delta=st.integers(1, 255))
def test_any_single_byte_change_is_refused(
    fed: Federation, blob: bytes, position: float, delta: int
) -> None:
    index = int(position * len(blob))
    with pytest.raises(KeyWrapError):
        _unwrap(fed, _replace_byte(blob, index, blob[index] ^ delta))


def test_every_truncation_is_refused(fed: Federation, blob: bytes) -> None:
    for length in range(len(blob)):
        with pytest.raises(KeyWrapError, match="truncated"):
            _unwrap(fed, blob[:length])


def test_trailing_bytes_are_refused(fed: Federation, blob: bytes) -> None:
    with pytest.raises(KeyWrapError, match="unexpected bytes follow"):
        _unwrap(fed, blob + b"\x00")


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=2048), keep_header=st.booleans())
def test_garbage_is_refused(fed: Federation, garbage: bytes, keep_header: bool) -> None:
    data = b"FSKW\x01" + garbage if keep_header else garbage
    with pytest.raises(KeyWrapError):
        _unwrap(fed, data)


def test_not_bytes_is_refused(fed: Federation) -> None:
    with pytest.raises(KeyWrapError, match="must be bytes"):
        _unwrap(fed, "FSKW")  # type: ignore[arg-type]


def test_another_silo_signing_a_substitute_key_is_refused(fed: Federation) -> None:
    # hospital-c makes its own "secret key" for hospital-b, names the real key holder as
    # issuer and attaches its (public) certificate, but can only sign with its own key.
    substitute = _wrap(fed, secret=b"attacker-chosen key", issuer=fed.silos["hospital-c"])
    forged = dataclasses.replace(
        substitute, issuer=HOLDER, issuer_certificate=fed.silos[HOLDER].cert
    ).to_bytes()
    with pytest.raises(KeyWrapError, match=rf"signature does not match.*{TAMPERED}"):
        _unwrap(fed, forged)


def test_another_silo_signing_with_its_own_certificate_is_refused(fed: Federation) -> None:
    forged = _resign(_wrap(fed), fed.silos["hospital-c"])
    with pytest.raises(KeyWrapError, match="is silo 'hospital-c''s, not 'hospital-a''s"):
        _unwrap(fed, forged)


def test_another_silo_as_issuer_is_refused(fed: Federation) -> None:
    honest_but_wrong = _wrap(fed, issuer=fed.silos["hospital-c"]).to_bytes()
    with pytest.raises(KeyWrapError, match="issued by 'hospital-c'.*only the key holder"):
        _unwrap(fed, honest_but_wrong)


def test_the_coordinator_re_signing_is_refused(fed: Federation) -> None:
    forged = _resign(_wrap(fed), fed.coordinator)
    with pytest.raises(KeyWrapError, match="belongs to the coordinator 'coordinator', not to a"):
        _unwrap(fed, forged)


def test_issuer_certificate_with_another_role_is_refused(fed: Federation) -> None:
    forged = _resign(_wrap(fed), fed.admin_named_holder)
    with pytest.raises(KeyWrapError, match="belongs to the admin 'hospital-a', not to a silo"):
        _unwrap(fed, forged)


def test_issuer_certificate_from_a_foreign_ca_is_refused(fed: Federation) -> None:
    data = _wrap(fed, issuer=fed.foreign_holder).to_bytes()
    with pytest.raises(KeyWrapError, match="was not issued by this federation's CA"):
        _unwrap(fed, data)


def test_expired_issuer_certificate_is_refused(fed: Federation) -> None:
    data = _wrap(fed, issuer=fed.expired_holder).to_bytes()
    with pytest.raises(KeyWrapError, match="expired on .*new certificate"):
        _unwrap(fed, data)


def test_issuer_certificate_checked_against_the_given_time(fed: Federation, blob: bytes) -> None:
    later = dt.datetime.now(UTC) + dt.timedelta(days=400)
    with pytest.raises(KeyWrapError, match="expired on"):
        _unwrap(fed, blob, now=later)
    with pytest.raises(ValueError, match="timezone-aware"):
        _unwrap(fed, blob, now=dt.datetime.now())


def test_wrong_recipient_is_refused(fed: Federation, blob: bytes) -> None:
    with pytest.raises(KeyWrapError, match="addressed to silo 'hospital-b'.*wrong recipient"):
        _unwrap(fed, blob, "hospital-c")


def test_bundle_replayed_from_another_run_is_refused(fed: Federation) -> None:
    old = _wrap(fed, run_id="run-2024-06-01").to_bytes()
    with pytest.raises(
        KeyWrapError, match="made for run 'run-2024-06-01'.*replayed from another run"
    ):
        _unwrap(fed, old)


def test_different_params_fingerprint_is_refused(fed: Federation) -> None:
    data = _wrap(fed, fingerprint=OTHER_FP).to_bytes()
    with pytest.raises(KeyWrapError, match="for HE parameters .*disagree"):
        _unwrap(fed, data)


def test_wrong_kem_private_key_is_refused(fed: Federation, blob: bytes) -> None:
    with pytest.raises(KeyWrapError, match="not encrypted for this silo's key"):
        _unwrap(fed, blob, keypair=KemKeyPair.generate())


def test_nothing_is_decrypted_before_the_signature_verifies(
    fed: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bytes] = []
    real = keywrap_bundle.AESGCM

    class Spy:
        def __init__(self, key: bytes) -> None:
            self._aead = real(key)

        def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
            calls.append(data)
            return self._aead.decrypt(nonce, data, aad)

    forged = _resign(_wrap(fed), fed.silos["hospital-c"])
    bundle = WrappedKey.from_bytes(_wrap(fed).to_bytes())
    bad_signature = dataclasses.replace(bundle, signature=bytes(64)).to_bytes()
    monkeypatch.setattr(keywrap_bundle, "AESGCM", Spy)
    for data in (forged, bad_signature):
        with pytest.raises(KeyWrapError):
            _unwrap(fed, data)
    assert calls == []
    assert _unwrap(fed, bundle.to_bytes()) and len(calls) == 1


# --- the key holder's side ------------------------------------------------------------------


def test_wrap_refuses_a_key_that_is_not_the_certificate_s(fed: Federation) -> None:
    impostor = Party(name=HOLDER, cert=fed.silos[HOLDER].cert, key=fed.silos["hospital-c"].key)
    with pytest.raises(KeyWrapError, match="does not belong to silo 'hospital-a''s certificate"):
        _wrap(fed, issuer=impostor)


def test_wrap_refuses_a_certificate_that_is_not_the_issuer_s(fed: Federation) -> None:
    for wrong in (
        Party(name=HOLDER, cert=fed.silos["hospital-c"].cert, key=fed.silos["hospital-c"].key),
        Party(name=HOLDER, cert=fed.admin_named_holder.cert, key=fed.admin_named_holder.key),
    ):
        with pytest.raises(KeyWrapError, match="not to silo 'hospital-a'"):
            _wrap(fed, issuer=wrong)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"recipient_public": b"\x01" * 31}, "has 31 bytes, expected 32"),
        ({"secret": b""}, "is 0 bytes"),
        ({"fingerprint": "ABC"}, "invalid HE parameter fingerprint"),
        ({"run_id": ""}, "invalid run id"),
        ({"recipient": "Hospital B"}, "invalid recipient silo name"),
    ],
)
def test_wrap_refuses_bad_inputs(fed: Federation, changes: dict, message: str) -> None:
    recipient = changes.pop("recipient", "hospital-b")
    public = changes.pop("recipient_public", fed.kem["hospital-b"].public_bytes())
    with pytest.raises(KeyWrapError, match=message):
        _wrap(fed, recipient, recipient_public=public, **changes)


def test_ed25519_certificate_keys_work(fed: Federation, tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ca_paths = pki.init_ca(ca_dir)
    ca_key = serialization.load_pem_private_key(ca_paths.key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_paths.cert.read_bytes())
    key = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(UTC) - dt.timedelta(minutes=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsilo"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "silo"),
                    x509.NameAttribute(NameOID.COMMON_NAME, HOLDER),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    holder = Party(
        name=HOLDER,
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    data = _wrap(fed, secret=b"k" * 100, issuer=holder).to_bytes()
    assert unwrap_key(
        data, run_id=RUN, me="hospital-b", my_keypair=fed.kem["hospital-b"],
        ca_pem=ca_paths.cert.read_bytes(), expected_issuer=HOLDER, params_fingerprint=FP,
    ) == b"k" * 100
    bundle = WrappedKey.from_bytes(data)
    forged = dataclasses.replace(bundle, signature=bytes(64)).to_bytes()
    with pytest.raises(KeyWrapError, match=TAMPERED):
        unwrap_key(
            forged, run_id=RUN, me="hospital-b", my_keypair=fed.kem["hospital-b"],
            ca_pem=ca_paths.cert.read_bytes(), expected_issuer=HOLDER, params_fingerprint=FP,
        )


# --- KEM key pairs and their announcements -------------------------------------------------


def test_kem_key_pair_save_and_load(tmp_path: Path) -> None:
    pair = KemKeyPair.generate()
    path = pair.save(tmp_path / "kem.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert KemKeyPair.load(path).public_bytes() == pair.public_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kem.key"]
    replacement = KemKeyPair.generate()
    replacement.save(path)
    assert KemKeyPair.load(path).public_bytes() == replacement.public_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(pair.public_bytes()) == 32 and "private_key" not in repr(pair)


def test_kem_key_pair_loads_raw_keys(tmp_path: Path) -> None:
    pair = KemKeyPair.generate()
    raw = pair.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    (tmp_path / "kem.raw").write_bytes(raw)
    assert KemKeyPair.load(tmp_path / "kem.raw").public_bytes() == pair.public_bytes()


def test_kem_key_pair_load_refuses_bad_files(fed: Federation, tmp_path: Path) -> None:
    with pytest.raises(KeyWrapError, match="does not exist.*re-join"):
        KemKeyPair.load(tmp_path / "missing.key")
    (tmp_path / "garbage.key").write_bytes(b"not a key at all")
    with pytest.raises(KeyWrapError, match="neither a PEM private key nor a raw 32-byte key"):
        KemKeyPair.load(tmp_path / "garbage.key")
    (tmp_path / "ecdsa.key").write_bytes(fed.silos[HOLDER].key)
    with pytest.raises(KeyWrapError, match="does not hold an X25519 private key"):
        KemKeyPair.load(tmp_path / "ecdsa.key")
    with pytest.raises(KeyWrapError, match="cannot write the KEM key"):
        KemKeyPair.generate().save(tmp_path / "no-such-dir" / "kem.key")


def test_kem_public_fingerprint() -> None:
    a, b = KemKeyPair.generate().public_bytes(), KemKeyPair.generate().public_bytes()
    assert kem_public_fingerprint(a) == "sha256:" + hashlib.sha256(a).hexdigest()[:32]
    assert kem_public_fingerprint(a) != kem_public_fingerprint(b)
    with pytest.raises(KeyWrapError, match="32 bytes"):
        kem_public_fingerprint(a[:-1])


def _announce(fed: Federation, silo: str = "hospital-b", run_id: str = RUN) -> bytes:
    party = fed.silos[silo]
    return announce_kem_public(
        run_id=run_id, silo=silo, public=fed.kem[silo].public_bytes(),
        certificate_pem=party.cert, private_key_pem=party.key,
    )


def test_kem_announcement_round_trip_and_refusals(fed: Federation) -> None:
    data = _announce(fed)
    public = fed.kem["hospital-b"].public_bytes()
    check = {"run_id": RUN, "expected_silo": "hospital-b", "ca_pem": fed.ca}
    assert verify_kem_announcement(data, **check) == public
    # The coordinator swaps in its own KEM key: the signature no longer matches.
    index = data.index(public)
    swapped = data[:index] + KemKeyPair.generate().public_bytes() + data[index + 32 :]
    with pytest.raises(KeyWrapError, match=TAMPERED):
        verify_kem_announcement(swapped, **check)
    with pytest.raises(KeyWrapError, match="from silo 'hospital-c' offered as silo 'hospital-b'"):
        verify_kem_announcement(_announce(fed, "hospital-c"), **check)
    with pytest.raises(KeyWrapError, match="replayed from another run"):
        verify_kem_announcement(_announce(fed, run_id="run-old"), **check)
    for length in range(len(data)):
        with pytest.raises(KeyWrapError, match="truncated|not a fedsilo"):
            verify_kem_announcement(data[:length], **check)
    for index in range(0, len(data), 7):
        with pytest.raises(KeyWrapError):
            verify_kem_announcement(_replace_byte(data, index, data[index] ^ 0x20), **check)
