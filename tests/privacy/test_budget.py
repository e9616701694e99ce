"""Tests for a silo's signed privacy budget statement (privacy/budget.py)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.privacy import pki, signed
from fedsilo.privacy.budget import (
    BUDGET_FORMAT,
    BudgetError,
    BudgetStatement,
    load_budget,
    save_budget,
    sign_budget,
)
from fedsilo.privacy.pki import Role

SILO_A = "hospital-a"
SILO_B = "hospital-b"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Party:
    """A certificate holder: its name, certificate and key (PEM)."""

    name: str
    cert: bytes = dataclasses.field(repr=False)
    key: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fed:
    """A federation CA with two silos, an admin, and a foreign CA with a same-named silo."""

    ca: bytes = dataclasses.field(repr=False)
    foreign_ca: bytes = dataclasses.field(repr=False)
    a: Party
    b: Party
    admin_a: Party
    foreign_a: Party


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Fed:
    root = tmp_path_factory.mktemp("budget-pki")
    ca = pki.init_ca(root / "ca")
    foreign = pki.init_ca(root / "foreign-ca")

    def issue(ca_dir: str, out: str, role: Role, name: str) -> Party:
        paths = pki.issue_certificate(root / ca_dir, root / out, role=role, name=name)
        return Party(name=name, cert=paths.cert.read_bytes(), key=paths.key.read_bytes())

    return Fed(
        ca=ca.cert.read_bytes(),
        foreign_ca=foreign.cert.read_bytes(),
        a=issue("ca", "certs", Role.SILO, SILO_A),
        b=issue("ca", "certs", Role.SILO, SILO_B),
        admin_a=issue("ca", "admin", Role.ADMIN, SILO_A),
        foreign_a=issue("foreign-ca", "foreign", Role.SILO, SILO_A),
    )


def _sign(party: Party, epsilon: float = 8.0, delta: float = 1e-5) -> BudgetStatement:
    return sign_budget(
        silo=party.name,
        epsilon=epsilon,
        delta=delta,
        certificate_pem=party.cert,
        private_key_pem=party.key,
    )


def _resign(statement: BudgetStatement, signer: Party, **changes: Any) -> BudgetStatement:
    """The statement with ``changes``, carrying and signed by ``signer``'s certificate/key."""
    forged = dataclasses.replace(statement, certificate=signer.cert.decode("ascii"), **changes)
    key = signed.load_signing_key(signer.key)
    return dataclasses.replace(forged, signature=signed.sign(key, forged.canonical_bytes()))


@pytest.fixture(scope="module")
def statement(fed: Fed) -> BudgetStatement:
    return _sign(fed.a)


def test_round_trip_through_json_dict_and_file(
    fed: Fed, statement: BudgetStatement, tmp_path: Path
) -> None:
    assert (statement.silo, statement.epsilon, statement.delta) == (SILO_A, 8.0, 1e-5)
    statement.verify(ca_pem=fed.ca)
    statement.verify(ca_pem=fed.ca.decode("ascii"))
    text = statement.to_json()
    assert BudgetStatement.from_json(text) == statement
    assert BudgetStatement.from_json(text.encode("ascii")) == statement
    assert BudgetStatement.from_json(statement.to_dict()) == statement
    data = json.loads(text)
    assert data["format"] == BUDGET_FORMAT
    assert data["epsilon"] == "8.0" and data["delta"] == "1e-05"
    assert text == json.dumps(data, sort_keys=True, separators=(",", ":"))
    unsigned = json.loads(statement.canonical_bytes())
    assert "signature" not in unsigned and {**unsigned, "signature": data["signature"]} == data

    path = save_budget(statement, tmp_path / "privacy_budget.json")
    assert path.read_text("ascii") == text
    assert load_budget(path) == statement
    assert load_budget(tmp_path / "missing.json") is None
    assert [p.name for p in tmp_path.iterdir()] == ["privacy_budget.json"]  # no temp file left


@SETTINGS
@given(data=st.data())
def test_any_changed_byte_is_refused(
    fed: Fed, statement: BudgetStatement, data: st.DataObject
) -> None:
    raw = bytearray(statement.to_json().encode("ascii"))
    position = data.draw(st.integers(0, len(raw) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != raw[position]), label="byte")
    raw[position] = value
    with pytest.raises(BudgetError):
        BudgetStatement.from_json(bytes(raw)).verify(ca_pem=fed.ca)


def test_other_spellings_are_refused(statement: BudgetStatement) -> None:
    text = statement.to_json()
    for other in (
        json.dumps(json.loads(text), sort_keys=True),  # whitespace
        text + "\n",
        text.replace('"epsilon":"8.0"', '"epsilon":"8.00"'),
        text.replace(statement.signature.hex(), statement.signature.hex().upper()),
    ):
        with pytest.raises(BudgetError):
            BudgetStatement.from_json(other)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("epsilon"), "epsilon"),
        (lambda d: d.update(extra="1"), "extra"),
        (lambda d: d.update(format="fedsilo-budget-v0"), "format"),
        (lambda d: d.update(epsilon="0.0"), "epsilon"),
        (lambda d: d.update(epsilon="-1.0"), "epsilon"),
        (lambda d: d.update(epsilon="inf"), "epsilon"),
        (lambda d: d.update(epsilon=8.0), "epsilon"),
        (lambda d: d.update(delta="1.0"), "delta"),
        (lambda d: d.update(delta="0.0"), "delta"),
        (lambda d: d.update(silo="Hospital A"), "silo"),
        (lambda d: d.update(created_at="2024-13-01T00:00:00.000000Z"), "created_at"),
        (lambda d: d.update(certificate="not a certificate"), "certificate"),
        (lambda d: d.update(signature="00"), "signature"),
    ],
)
def test_malformed_statements_are_refused_naming_the_field(
    statement: BudgetStatement, change: Any, field: str
) -> None:
    data = statement.to_dict()
    change(data)
    with pytest.raises(BudgetError, match=field):
        BudgetStatement.from_json(data)
    with pytest.raises(BudgetError, match=field):
        BudgetStatement.from_json(json.dumps(data, sort_keys=True, separators=(",", ":")))


@pytest.mark.parametrize(
    ("epsilon", "delta", "field"),
    [
        (0.0, 1e-5, "epsilon"),
        (-1.0, 1e-5, "epsilon"),
        (math.inf, 1e-5, "epsilon"),
        (math.nan, 1e-5, "epsilon"),
        (True, 1e-5, "epsilon"),
        ("8", 1e-5, "epsilon"),
        (8.0, 0.0, "delta"),
        (8.0, 1.0, "delta"),
        (8.0, math.nan, "delta"),
        (8.0, None, "delta"),
    ],
)
def test_sign_refuses_bad_values_naming_the_field(
    fed: Fed, epsilon: Any, delta: Any, field: str
) -> None:
    with pytest.raises(ValueError, match=f"field {field}"):
        _sign(fed.a, epsilon=epsilon, delta=delta)


def test_sign_refuses_a_certificate_that_is_not_this_silos(fed: Fed) -> None:
    with pytest.raises(BudgetError, match="not to silo"):
        sign_budget(silo=SILO_B, epsilon=1.0, delta=1e-5, certificate_pem=fed.a.cert,
                    private_key_pem=fed.a.key)
    with pytest.raises(BudgetError, match="admin"):
        sign_budget(silo=SILO_A, epsilon=1.0, delta=1e-5, certificate_pem=fed.admin_a.cert,
                    private_key_pem=fed.admin_a.key)
    with pytest.raises(BudgetError, match="does not belong"):
        sign_budget(silo=SILO_A, epsilon=1.0, delta=1e-5, certificate_pem=fed.a.cert,
                    private_key_pem=fed.b.key)
    with pytest.raises(ValueError, match="field silo"):
        sign_budget(silo="Hospital A", epsilon=1.0, delta=1e-5, certificate_pem=fed.a.cert,
                    private_key_pem=fed.a.key)


def test_verify_refuses_foreign_ca_admin_and_other_silo(
    fed: Fed, statement: BudgetStatement
) -> None:
    with pytest.raises(BudgetError, match="not issued by this federation's CA") as info:
        statement.verify(ca_pem=fed.foreign_ca)
    assert info.value.field == "certificate"
    with pytest.raises(BudgetError, match="not issued by this federation's CA"):
        _resign(statement, fed.foreign_a).verify(ca_pem=fed.ca)
    with pytest.raises(BudgetError, match="admin") as info:
        _resign(statement, fed.admin_a).verify(ca_pem=fed.ca)
    assert info.value.field == "certificate"
    # Silo a signs a statement claiming to be silo b's: its certificate is not b's.
    with pytest.raises(BudgetError, match="posing as another"):
        _resign(statement, fed.a, silo=SILO_B).verify(ca_pem=fed.ca)
    # Silo b's certificate on silo a's statement, signed with a's key.
    swapped = dataclasses.replace(statement, certificate=fed.b.cert.decode("ascii"))
    with pytest.raises(BudgetError):
        swapped.verify(ca_pem=fed.ca)
    # A field changed after signing.
    with pytest.raises(BudgetError, match="signature") as info:
        dataclasses.replace(statement, epsilon=80.0).verify(ca_pem=fed.ca)
    assert info.value.field == "signature"


def test_statement_validates_itself_naming_the_field(statement: BudgetStatement) -> None:
    for change, field in (
        ({"signature": b"\x00" * 3}, "signature"),
        ({"certificate": "x"}, "certificate"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"silo": ""}, "silo"),
    ):
        with pytest.raises(ValueError, match=f"field {field}"):
            dataclasses.replace(statement, **change)


def test_load_refuses_a_damaged_file(statement: BudgetStatement, tmp_path: Path) -> None:
    path = tmp_path / "privacy_budget.json"
    path.write_text(statement.to_json().replace('"8.0"', '"9.0"'), "ascii")
    assert load_budget(path) is not None  # parses; only verify() catches the signature
    path.write_text(statement.to_json() + "\n", "ascii")
    with pytest.raises(BudgetError, match="canonical"):
        load_budget(path)
    path.write_bytes(b"\xff" * 10)
    with pytest.raises(BudgetError, match="UTF-8"):
        load_budget(path)
