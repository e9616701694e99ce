"""Upload statements: a silo's signature over exactly what it uploaded, verifiable against the CA."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.privacy import pki
from fedsilo.privacy.pki import Role
from fedsilo.privacy.upload_statement import (
    UPLOAD_STATEMENT_FORMAT,
    UploadStatement,
    UploadStatementError,
    sign_upload_statement,
    statement_signer,
)

SHA = "ab" * 32


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: bytes
    a: pki.IssuedPaths
    b: pki.IssuedPaths
    other_ca_a: pki.IssuedPaths


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = pki.init_ca(root / "ca")
    pki.init_ca(root / "other")
    return Pki(ca=ca.cert.read_bytes(),
               a=pki.issue_certificate(root / "ca", root / "out", role=Role.SILO, name="hospital-a"),
               b=pki.issue_certificate(root / "ca", root / "out", role=Role.SILO, name="hospital-b"),
               other_ca_a=pki.issue_certificate(root / "other", root / "other-out", role=Role.SILO, name="hospital-a"))


def sign(paths: pki.IssuedPaths, silo: str = "hospital-a", **kw: object) -> UploadStatement:
    args: dict[str, object] = dict(run_id="run-1", round=3, silo=silo, sha256=SHA, payload_bytes=4096)
    args.update(kw)
    return sign_upload_statement(**args, certificate_pem=paths.cert.read_bytes(),  # type: ignore[arg-type]
                                 private_key_pem=paths.key.read_bytes())


def check(statement: UploadStatement, ca: bytes, **kw: object) -> None:
    args: dict[str, object] = dict(run_id="run-1", round=3, silo="hospital-a", sha256=SHA, payload_bytes=4096)
    args.update(kw)
    UploadStatement.from_json(statement.to_json()).verify(ca_pem=ca, **args)  # type: ignore[arg-type]


def test_a_signed_statement_round_trips_and_verifies(keys: Pki) -> None:
    s = sign(keys.a)
    data = json.loads(s.to_json())
    assert data["format"] == UPLOAD_STATEMENT_FORMAT
    assert (data["run_id"], data["round"], data["silo"], data["sha256"], data["payload_bytes"]) == (
        "run-1", 3, "hospital-a", SHA, 4096)
    assert UploadStatement.from_json(s.to_json()) == s
    check(s, keys.ca)


@pytest.mark.parametrize(("field", "value"), [("run_id", "run-2"), ("round", 4), ("silo", "hospital-b"),
                                               ("sha256", "cd" * 32), ("payload_bytes", 4095)])
def test_a_statement_for_another_upload_is_refused_naming_the_field(keys: Pki, field: str, value: object) -> None:
    with pytest.raises(UploadStatementError, match=f"upload statement {field} is") as info:
        check(sign(keys.a), keys.ca, **{field: value})
    assert info.value.field == field


def test_another_silos_key_or_another_ca_does_not_verify(keys: Pki) -> None:
    with pytest.raises(UploadStatementError):  # hospital-b's certificate cannot sign as hospital-a
        sign(keys.b, silo="hospital-a")
    with pytest.raises(UploadStatementError) as info:
        check(sign(keys.other_ca_a), keys.ca)
    assert info.value.field == "certificate"


def test_a_changed_statement_does_not_verify(keys: Pki) -> None:
    s = sign(keys.a)
    forged = dataclasses.replace(s, sha256="cd" * 32)  # the signature was over the old digest
    with pytest.raises(UploadStatementError) as info:
        check(forged, keys.ca, sha256="cd" * 32)
    assert info.value.field == "signature"


@pytest.mark.parametrize("text", ["", "{}", "not json", '{"format": "fedsilo-upload-statement-v1"}'])
def test_malformed_text_is_refused(text: str) -> None:
    with pytest.raises(UploadStatementError):
        UploadStatement.from_json(text)


def test_non_canonical_text_is_refused(keys: Pki) -> None:
    text = json.dumps(json.loads(sign(keys.a).to_json()), indent=1)
    with pytest.raises(UploadStatementError):
        UploadStatement.from_json(text)


@settings(max_examples=25, deadline=None)
@given(rnd=st.integers(1, 10**6), size=st.integers(1, 2**40), digest=st.binary(min_size=32, max_size=32))
def test_the_signer_signs_exactly_what_it_is_given(keys: Pki, rnd: int, size: int, digest: bytes) -> None:
    signer = statement_signer(run_id="run-1", silo="hospital-a", certificate_pem=keys.a.cert.read_bytes(),
                              private_key_pem=keys.a.key.read_bytes())
    s = UploadStatement.from_json(signer(rnd, digest.hex(), size))
    s.verify(ca_pem=keys.ca, run_id="run-1", round=rnd, silo="hospital-a", sha256=digest.hex(), payload_bytes=size)


def test_field_values_out_of_range_are_refused(keys: Pki, tmp_path: Path) -> None:
    for kw in ({"round": 0}, {"payload_bytes": 0}, {"sha256": "AB" * 32}, {"sha256": "ab"}):
        with pytest.raises(ValueError):
            sign(keys.a, **kw)
