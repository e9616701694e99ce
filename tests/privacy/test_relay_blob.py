"""A relayed blob is a signed document (privacy/relay_blob.py): a receiver knows which silo sealed it."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.privacy import pki, signed
from fedsilo.privacy.pki import Role
from fedsilo.privacy.relay_blob import RELAY_BLOB_FORMAT, RelayBlob, RelayBlobError, sign_relay_blob

RUN = "relay-run"
PURPOSE = "style-bank"


@dataclasses.dataclass(frozen=True)
class Party:
    """A certificate holder."""

    name: str
    cert: bytes = dataclasses.field(repr=False)
    key: bytes = dataclasses.field(repr=False)


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The federation CA, a foreign CA, silos a and b, an admin named like silo a, and a foreign silo a."""
    root = tmp_path_factory.mktemp("relay-pki")
    ca = pki.init_ca(root / "ca")
    foreign = pki.init_ca(root / "foreign")

    def issue(ca_dir: str, out: str, role: Role, name: str) -> Party:
        paths = pki.issue_certificate(root / ca_dir, root / out, role=role, name=name)
        return Party(name, paths.cert.read_bytes(), paths.key.read_bytes())

    return {"ca": ca.cert.read_bytes(), "foreign_ca": foreign.cert.read_bytes(),
            "a": issue("ca", "certs", Role.SILO, "hospital-a"), "b": issue("ca", "certs", Role.SILO, "hospital-b"),
            "admin_a": issue("ca", "admin", Role.ADMIN, "hospital-a"),
            "foreign_a": issue("foreign", "foreign-certs", Role.SILO, "hospital-a")}


def _blob(party: Party, payload: bytes = b"sealed bytes", purpose: str = PURPOSE) -> RelayBlob:
    return sign_relay_blob(run_id=RUN, purpose=purpose, silo=party.name, payload=payload,
                           certificate_pem=party.cert, private_key_pem=party.key)


def _resign(doc: RelayBlob, signer: Party, **changes: object) -> RelayBlob:
    forged = dataclasses.replace(doc, certificate=signer.cert.decode("ascii"), **changes)
    return dataclasses.replace(forged, signature=signed.sign(signed.load_signing_key(signer.key),
                                                             forged.canonical_bytes()))


def test_round_trip_and_verify(pem: dict) -> None:
    doc = _blob(pem["a"])
    text = doc.to_json()
    assert json.loads(text)["format"] == RELAY_BLOB_FORMAT
    back = RelayBlob.from_json(text.encode("ascii"))
    assert back == doc and back.payload == b"sealed bytes"
    back.verify(ca_pem=pem["ca"], run_id=RUN, purpose=PURPOSE, silo="hospital-a")


@pytest.mark.parametrize("want, fragment", [
    ({"run_id": "another-run"}, "run_id is 'relay-run', expected 'another-run'"),
    ({"purpose": "rdn-stats"}, "purpose is 'style-bank', expected 'rdn-stats'"),
    ({"silo": "hospital-b"}, "silo is 'hospital-a', expected 'hospital-b'"),
])
def test_a_blob_for_another_run_purpose_or_silo_is_refused(pem: dict, want: dict, fragment: str) -> None:
    where = {"run_id": RUN, "purpose": PURPOSE, "silo": "hospital-a", **want}
    with pytest.raises(RelayBlobError, match=fragment):
        _blob(pem["a"]).verify(ca_pem=pem["ca"], **where)


def test_forged_blobs_are_refused(pem: dict) -> None:
    doc = _blob(pem["a"])
    where = {"run_id": RUN, "purpose": PURPOSE}
    with pytest.raises(RelayBlobError, match="not issued by this federation's CA") as info:
        doc.verify(ca_pem=pem["foreign_ca"], silo="hospital-a", **where)
    assert info.value.field == "certificate"
    with pytest.raises(RelayBlobError, match="not issued by this federation's CA"):
        _resign(doc, pem["foreign_a"]).verify(ca_pem=pem["ca"], silo="hospital-a", **where)
    with pytest.raises(RelayBlobError, match="admin"):
        _resign(doc, pem["admin_a"]).verify(ca_pem=pem["ca"], silo="hospital-a", **where)
    # silo a passes its own blob off as silo b's: the shared run secret cannot tell, the signature can
    with pytest.raises(RelayBlobError, match="posing as another"):
        _resign(doc, pem["a"], silo="hospital-b").verify(ca_pem=pem["ca"], silo="hospital-b", **where)
    with pytest.raises(RelayBlobError, match="signature") as info:
        dataclasses.replace(doc, payload=b"other bytes").verify(ca_pem=pem["ca"], silo="hospital-a", **where)
    assert info.value.field == "signature"


def test_malformed_and_non_canonical_text_is_refused_naming_the_field(pem: dict) -> None:
    data = json.loads(_blob(pem["a"]).to_json())
    with pytest.raises(RelayBlobError, match="canonical"):
        RelayBlob.from_json(json.dumps(data, indent=1))
    for name, value, fragment in (("payload", "not base64!", "not base64"), ("purpose", "Style Bank", "purpose"),
                                  ("silo", "Hospital A", "silo"), ("format", "fedsilo-relay-blob-v0", "format")):
        with pytest.raises(RelayBlobError, match=fragment) as info:
            RelayBlob.from_json({**data, name: value})
        assert info.value.field == name
    with pytest.raises(RelayBlobError):
        RelayBlob.from_json(b"\x00\x01 not json")
    with pytest.raises(ValueError, match="payload"):
        sign_relay_blob(run_id=RUN, purpose=PURPOSE, silo="hospital-a", payload=b"", certificate_pem=pem["a"].cert,
                        private_key_pem=pem["a"].key)
    with pytest.raises(RelayBlobError, match="certificate"):
        sign_relay_blob(run_id=RUN, purpose=PURPOSE, silo="hospital-b", payload=b"x", certificate_pem=pem["a"].cert,
                        private_key_pem=pem["a"].key)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(min_size=1, max_size=256), flip=st.integers(min_value=0, max_value=10_000))
def test_any_changed_payload_byte_fails_verification(pem: dict, payload: bytes, flip: int) -> None:
    doc = _blob(pem["b"], payload)
    doc.verify(ca_pem=pem["ca"], run_id=RUN, purpose=PURPOSE, silo="hospital-b")
    bad = bytearray(payload)
    bad[flip % len(bad)] ^= 0x01
    with pytest.raises(RelayBlobError, match="signature"):
        dataclasses.replace(doc, payload=bytes(bad)).verify(ca_pem=pem["ca"], run_id=RUN, purpose=PURPOSE,
                                                            silo="hospital-b")
