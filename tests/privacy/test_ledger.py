"""Tests for the per-silo privacy ledger: hash chain, signatures, crash safety, mirror."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedsilo.privacy import ledger, pki, signed
from fedsilo.privacy.accounting import BudgetAccountant
from fedsilo.privacy.ledger import (
    GENESIS_HASH,
    DuplicateEntryError,
    EntryStatus,
    GuaranteeScope,
    Ledger,
    LedgerEntry,
    LedgerError,
    LedgerMirror,
    Mechanism,
    Neighbouring,
    UploadGuarantee,
    check_cumulative,
    verify_chain,
)
from fedsilo.privacy.pki import Role

SILO_A = "hospital-a"
SILO_B = "hospital-b"
RUN = "run-2024-07-01"
REPO = Path(__file__).resolve().parents[2]
SIGNED_FIELDS = sorted(
    f.name for f in dataclasses.fields(LedgerEntry) if f.name != "signature"
)


@dataclass(frozen=True, kw_only=True)
class Party:
    """A certificate holder: its name, certificate and key (PEM), and where they are."""

    name: str
    cert: bytes = dataclasses.field(repr=False)
    key: bytes = dataclasses.field(repr=False)
    cert_path: Path
    key_path: Path


@dataclass(frozen=True, kw_only=True)
class Pki:
    """One federation CA, two silos, and certificates that must not sign ledgers."""

    ca: bytes = dataclasses.field(repr=False)
    foreign_ca: bytes = dataclasses.field(repr=False)
    a: Party
    b: Party
    foreign_a: Party
    foreign_c: Party
    coordinator: Party
    admin_a: Party


def _party(paths: pki.IssuedPaths, name: str) -> Party:
    return Party(
        name=name,
        cert=paths.cert.read_bytes(),
        key=paths.key.read_bytes(),
        cert_path=paths.cert,
        key_path=paths.key,
    )


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("ledger-pki")
    ca = pki.init_ca(root / "ca")
    foreign_ca = pki.init_ca(root / "foreign-ca")

    def issue(ca_dir: str, out: str, role: Role, name: str, **kw: Any) -> Party:
        paths = pki.issue_certificate(root / ca_dir, root / out, role=role, name=name, **kw)
        return _party(paths, name)

    return Pki(
        ca=ca.cert.read_bytes(),
        foreign_ca=foreign_ca.cert.read_bytes(),
        a=issue("ca", "certs", Role.SILO, SILO_A),
        b=issue("ca", "certs", Role.SILO, SILO_B),
        foreign_a=issue("foreign-ca", "foreign", Role.SILO, SILO_A),
        foreign_c=issue("foreign-ca", "foreign", Role.SILO, "hospital-c"),
        coordinator=issue("ca", "coord", Role.COORDINATOR, "coordinator", hosts=["localhost"]),
        admin_a=issue("ca", "admin", Role.ADMIN, SILO_A),
    )


def _open(path: Path, party: Party) -> Ledger:
    return Ledger.open(
        path, silo=party.name, certificate_pem=party.cert, private_key_pem=party.key
    )


def _release(round_: int, cumulative: float, **changes: Any) -> dict[str, Any]:
    """A record-level DP-SGD release (q=0.04, σ=1.5, 2250 steps)."""
    fields: dict[str, Any] = {
        "run_id": RUN,
        "round": round_,
        "upload_index": 0,
        "mechanism": Mechanism.SUBSAMPLED_GAUSSIAN,
        "neighbouring": Neighbouring.RECORD,
        "noise_multiplier": 1.5,
        "sample_rate": 0.04,
        "steps": 2250,
        "clip_norm": 1.0,
        "delta": 1e-5,
        "epsilon_rdp": 7.3291,
        "rdp_order": 6.0,
        "cumulative_epsilon": cumulative,
    }
    fields.update(changes)
    return fields


def _silo_release(round_: int, cumulative: float, **changes: Any) -> dict[str, Any]:
    """A silo-level Gaussian release on the whole update (σ=1, one step)."""
    silo_level: dict[str, Any] = {
        "mechanism": Mechanism.GAUSSIAN,
        "neighbouring": Neighbouring.SILO,
        "noise_multiplier": 1.0,
        "sample_rate": 1.0,
        "steps": 1,
        "epsilon_rdp": 4.7285,
        "rdp_order": 3.5,
    }
    return _release(round_, cumulative, **{**silo_level, **changes})


def _distributed(round_: int, cumulative: float, upload_cumulative: float) -> dict[str, Any]:
    """Silo-level noise shared among K=4 silos: σ=1 on the sum, σ/2 on one upload."""
    return _silo_release(
        round_,
        cumulative,
        guarantee_scope=GuaranteeScope.AGGREGATE,
        single_upload=UploadGuarantee(
            noise_multiplier=0.5,
            epsilon_rdp=11.2,
            rdp_order=2.5,
            epsilon_prv=10.9,
            cumulative_epsilon=upload_cumulative,
        ),
    )


def _build_chain(path: Path, party: Party) -> list[LedgerEntry]:
    """Four entries covering both relations, distributed noise and an optional PRV ε: two of
    format v1 (RDP only), then two of v2 (PLD beside RDP, PLD and RDP governing): an old
    ledger continued by this fedsilo."""
    with _open(path, party) as book:
        return [
            book.append(**_release(1, 7.3291, epsilon_prv=7.0123)),
            book.append(**_distributed(1, 4.7285, 11.2)),
            book.append(**_release(2, 10.4, upload_index=1, epsilon_pld=6.7688, cumulative_epsilon_pld=9.6,
                                   accountant=BudgetAccountant.PLD)),
            book.append(
                **_silo_release(
                    2,
                    6.5,
                    epsilon_pld=4.3811,
                    cumulative_epsilon_pld=6.1,
                    accountant=BudgetAccountant.RDP,
                    single_upload=UploadGuarantee(
                        noise_multiplier=1.0,
                        epsilon_rdp=4.7285,
                        rdp_order=3.5,
                        cumulative_epsilon=13.9,
                        epsilon_pld=4.3811,
                        cumulative_epsilon_pld=12.8,
                    ),
                )
            ),
        ]


@pytest.fixture(scope="module")
def chain(fed: Pki, tmp_path_factory: pytest.TempPathFactory) -> list[LedgerEntry]:
    return _build_chain(tmp_path_factory.mktemp("chain") / "ledger.db", fed.a)


def _resign(entry: LedgerEntry, signer: Party, **changes: Any) -> LedgerEntry:
    """The entry with ``changes``, re-signed with ``signer``'s certificate and key."""
    forged = dataclasses.replace(
        entry, certificate=signer.cert.decode("ascii"), **changes
    )
    key = signed.load_signing_key(signer.key)
    return dataclasses.replace(forged, signature=signed.sign(key, forged.canonical_bytes()))


def _relink(entries: list[LedgerEntry], signer: Party) -> list[LedgerEntry]:
    """Renumbers and re-links a list of entries and re-signs them all (a well-formed forgery)."""
    result: list[LedgerEntry] = []
    for index, entry in enumerate(entries, start=1):
        prev = GENESIS_HASH if not result else result[-1].entry_hash()
        result.append(_resign(entry, signer, seq=index, prev_hash=prev))
    return result


def _bad_seq(entries: list[Any], fed: Pki, **kw: Any) -> int | None:
    try:
        verify_chain(entries, ca_pem=fed.ca, **kw)
    except LedgerError as exc:
        assert exc.seq is not None
        assert f"seq {exc.seq}" in str(exc)
        return exc.seq
    return None


# --- append, read, encode -------------------------------------------------------------


def test_append_and_read_back(fed: Pki, tmp_path: Path) -> None:
    with _open(tmp_path / "state" / "ledger.db", fed.a) as book:
        assert book.last() is None and book.entries() == []
        written = [
            book.append(**_release(1, 7.3291, epsilon_prv=7.0123)),
            book.append(**_distributed(1, 4.7285, 11.2)),
            book.append(**_release(2, 10.4, upload_index=1)),
        ]
        assert book.entries() == written
        assert book.last() == written[-1]
        assert book.entry(2) == written[1]
        assert book.entries(Neighbouring.RECORD) == [written[0], written[2]]
        assert all(book.status(e.seq) is EntryStatus.RELEASED for e in written)
    first, second, third = written
    assert [e.seq for e in written] == [1, 2, 3]
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.entry_hash() and third.prev_hash == second.entry_hash()
    assert {e.silo for e in written} == {SILO_A}
    assert first.certificate.encode() == fed.a.cert
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first.created_at)
    assert first.mechanism is Mechanism.SUBSAMPLED_GAUSSIAN
    assert (first.noise_multiplier, first.sample_rate, first.steps) == (1.5, 0.04, 2250)
    assert first.epsilon_prv == 7.0123 and third.epsilon_prv is None
    assert first.guarantee_scope is GuaranteeScope.SINGLE_UPLOAD and first.single_upload is None
    assert second.single_upload is not None and second.single_upload.noise_multiplier == 0.5
    verify_chain(written, ca_pem=fed.ca, expected_silo=SILO_A)


def test_json_round_trip_and_canonical_encoding(chain: list[LedgerEntry]) -> None:
    for entry in chain:
        text = entry.to_json()
        assert LedgerEntry.from_json(text) == entry
        assert LedgerEntry.from_json(text.encode()) == entry
        assert LedgerEntry.from_json(json.loads(text)) == entry
        assert LedgerEntry.from_json(entry.to_dict()) == entry
        data = json.loads(entry.canonical_bytes())
        v2 = entry.accountant is not None
        assert "signature" not in data
        assert data["format"] == (ledger.ENTRY_FORMAT if v2 else "fedsilo-ledger-entry-v1")
        v2_only = {"epsilon_pld", "cumulative_epsilon_pld", "accountant"}
        assert set(data) == {"format", *SIGNED_FIELDS} - (set() if v2 else v2_only)
        # Floats travel as their exact repr strings; sorted keys, no whitespace.
        assert data["delta"] == "1e-05"
        assert data["cumulative_epsilon"] == repr(entry.cumulative_epsilon)
        compact = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        assert entry.canonical_bytes() == compact.encode("ascii")
        assert entry.to_json() == json.dumps(
            entry.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        )
        assert json.loads(text)["signature"] == entry.signature.hex()
    assert chain[1].to_dict()["single_upload"]["noise_multiplier"] == "0.5"


def test_from_json_refuses_other_spellings_of_the_same_entry(chain: list[LedgerEntry]) -> None:
    entry = chain[0]
    data = entry.to_dict()
    variants = {
        "whitespace": json.dumps(data, sort_keys=True),
        "key order": json.dumps(dict(reversed(list(data.items()))), separators=(",", ":")),
        "upper-case hex": entry.to_json().replace(
            entry.signature.hex(), entry.signature.hex().upper()
        ),
        "exponent case": entry.to_json().replace('"1e-05"', '"1E-05"'),
        "number instead of string": entry.to_json().replace('"1e-05"', "1e-05"),
    }
    for what, text in variants.items():
        assert text != entry.to_json(), what
        with pytest.raises(LedgerError):
            LedgerEntry.from_json(text)
    for mapping in (
        {**data, "delta": "1E-05"},
        {**data, "delta": 1e-05},
        {**data, "signature": data["signature"].upper()},
        {**data, "steps": 2250.0},
        {**data, "extra": 1},
        {k: v for k, v in data.items() if k != "run_id"},
        {**data, "format": "fedsilo-ledger-entry-v0"},
    ):
        with pytest.raises(LedgerError):
            LedgerEntry.from_json(mapping)
    with pytest.raises(LedgerError, match="duplicate field"):
        LedgerEntry.from_json('{"seq":1,"seq":1}')
    with pytest.raises(LedgerError, match="UTF-8"):
        LedgerEntry.from_json(b"\xff\xfe")


_finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    noise=_finite.filter(lambda x: x > 0),
    q=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    eps=st.floats(min_value=0.0, allow_infinity=False),
    order=st.floats(min_value=1.0, exclude_min=True, allow_infinity=False),
    prv=st.none() | st.floats(min_value=0.0, allow_infinity=False),
    delta=st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True),
    run_id=st.text(st.characters(codec="utf-8").filter(str.isprintable), min_size=1, max_size=20),
    ints=st.tuples(st.integers(0, 10**9), st.integers(0, 9), st.integers(1, 10**6)),
)
def test_any_valid_entry_survives_json_exactly(
    chain: list[LedgerEntry],
    noise: float,
    q: float,
    eps: float,
    order: float,
    prv: float | None,
    delta: float,
    run_id: str,
    ints: tuple[int, int, int],
) -> None:
    entry = dataclasses.replace(
        chain[0],
        run_id=run_id,
        round=ints[0],
        upload_index=ints[1],
        steps=ints[2],
        noise_multiplier=noise,
        sample_rate=q,
        epsilon_rdp=eps,
        rdp_order=order,
        epsilon_prv=prv,
        cumulative_epsilon=eps,
        delta=delta,
    )
    again = LedgerEntry.from_json(entry.to_json())
    assert again == entry
    assert again.canonical_bytes() == entry.canonical_bytes()
    assert again.noise_multiplier == noise and again.sample_rate == q and again.delta == delta


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field_name"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"noise_multiplier": True}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"epsilon_rdp": -0.1}, "epsilon_rdp"),
        ({"epsilon_rdp": float("inf")}, "epsilon_rdp"),
        ({"rdp_order": 1.0}, "rdp_order"),
        ({"epsilon_prv": -1.0}, "epsilon_prv"),
        ({"cumulative_epsilon": -1.0}, "cumulative_epsilon"),
        ({"round": -1}, "round"),
        ({"upload_index": "0"}, "upload_index"),
        ({"run_id": ""}, "run_id"),
        ({"run_id": "run\n1"}, "run_id"),
        ({"mechanism": "gaussian"}, "mechanism"),
        ({"neighbouring": "record"}, "neighbouring"),
        ({"guarantee_scope": "aggregate"}, "guarantee_scope"),
        ({"mechanism": Mechanism.GAUSSIAN}, "sample_rate"),
        ({"guarantee_scope": GuaranteeScope.AGGREGATE}, "single_upload"),
        ({"single_upload": {"noise_multiplier": 1.0}}, "single_upload"),
        (
            {
                "single_upload": UploadGuarantee(
                    noise_multiplier=2.0, epsilon_rdp=7.3291, rdp_order=6.0, cumulative_epsilon=1.0
                )
            },
            "single_upload.noise_multiplier",
        ),
        ({"seq": 5}, "seq"),
        ({"signature": b"x" * 64}, "signature"),
        ({"prev_hash": GENESIS_HASH}, "prev_hash"),
        ({"created_at": "2024-01-01T00:00:00Z"}, "created_at"),
        ({"certificate": "x"}, "certificate"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_append_refuses_malformed_fields_naming_them(
    fed: Pki, tmp_path: Path, change: dict[str, Any], field_name: str
) -> None:
    with _open(tmp_path / "ledger.db", fed.a) as book:
        book.append(**_release(1, 1.0))
        with pytest.raises(ValueError, match=re.escape(field_name)):
            book.append(**_release(2, 2.0, **change))
        assert [e.seq for e in book.entries()] == [1]


def test_append_refuses_missing_fields(fed: Pki, tmp_path: Path) -> None:
    with _open(tmp_path / "ledger.db", fed.a) as book:
        fields = _release(1, 1.0)
        del fields["clip_norm"]
        with pytest.raises(ValueError, match="clip_norm"):
            book.append(**fields)
        assert book.entries() == []


def test_upload_guarantee_validates_itself() -> None:
    with pytest.raises(ValueError, match=r"single_upload\.rdp_order"):
        UploadGuarantee(
            noise_multiplier=1.0, epsilon_rdp=1.0, rdp_order=0.5, cumulative_epsilon=1.0
        )
    with pytest.raises(ValueError, match=r"single_upload\.noise_multiplier"):
        UploadGuarantee(noise_multiplier=-1, epsilon_rdp=1.0, rdp_order=2.0, cumulative_epsilon=1.0)


def test_accountant_enums_with_the_same_values_are_accepted(fed: Pki, tmp_path: Path) -> None:
    import enum

    class AccountantMechanism(enum.Enum):
        SUBSAMPLED_GAUSSIAN = "subsampled_gaussian"
        GAUSSIAN = "gaussian"

    class AccountantRelation(enum.StrEnum):
        RECORD = "record"
        SILO = "silo"

    with _open(tmp_path / "ledger.db", fed.a) as book:
        entry = book.append(
            **_release(
                1,
                1.0,
                mechanism=AccountantMechanism.SUBSAMPLED_GAUSSIAN,
                neighbouring=AccountantRelation.RECORD,
            )
        )
        with pytest.raises(ValueError, match="neighbouring"):
            book.append(**_release(2, 1.0, neighbouring=AccountantRelation.RECORD.value))
    assert entry.mechanism is Mechanism.SUBSAMPLED_GAUSSIAN
    assert entry.neighbouring is Neighbouring.RECORD


# --- cumulative ε per relation ----------------------------------------------------------


def test_cumulative_is_kept_per_relation(fed: Pki, tmp_path: Path) -> None:
    with _open(tmp_path / "ledger.db", fed.a) as book:
        assert book.cumulative(Neighbouring.RECORD) == 0.0 == book.cumulative(Neighbouring.SILO)
        book.append(**_release(1, 7.0))
        book.append(**_silo_release(1, 4.7))
        book.append(**_release(2, 9.0))
        assert book.cumulative(Neighbouring.RECORD) == 9.0
        assert book.cumulative(Neighbouring.SILO) == 4.7
        # A silo-level figure below the record-level one is fine: they never add up.
        book.append(**_silo_release(2, 5.0))
        assert book.cumulative(Neighbouring.SILO) == 5.0
        with pytest.raises(ValueError, match="cumulative_epsilon 8.5.*record-level"):
            book.append(**_release(3, 8.5))
        with pytest.raises(ValueError, match="cumulative_epsilon 4.9.*silo-level"):
            book.append(**_silo_release(3, 4.9))
        assert [e.seq for e in book.entries()] == [1, 2, 3, 4]
        book.append(**_release(3, 9.0))  # equal is not a decrease
        assert book.cumulative(Neighbouring.RECORD) == 9.0


def test_distributed_noise_states_both_guarantees(fed: Pki, tmp_path: Path) -> None:
    with _open(tmp_path / "ledger.db", fed.a) as book:
        book.append(**_silo_release(1, 4.7))
        assert book.cumulative(Neighbouring.SILO, scope=GuaranteeScope.AGGREGATE) == 4.7
        assert book.cumulative(Neighbouring.SILO, scope=GuaranteeScope.SINGLE_UPLOAD) == 4.7
        entry = book.append(**_distributed(2, 6.0, 11.2))
        assert entry.guarantee(GuaranteeScope.AGGREGATE).noise_multiplier == 1.0
        assert entry.guarantee(GuaranteeScope.SINGLE_UPLOAD).noise_multiplier == 0.5
        assert book.cumulative(Neighbouring.SILO, scope=GuaranteeScope.AGGREGATE) == 6.0
        assert book.cumulative(Neighbouring.SILO) == 11.2  # default: the conservative figure
        # Once stated, the single-upload cumulative must be carried by every later entry.
        with pytest.raises(ValueError, match="single_upload None"):
            book.append(**_silo_release(3, 7.0))
        with pytest.raises(ValueError, match=r"single_upload\.cumulative_epsilon 10\.0"):
            book.append(**_distributed(3, 7.0, 10.0))
        book.append(
            **_silo_release(
                3,
                7.0,
                single_upload=UploadGuarantee(
                    noise_multiplier=1.0, epsilon_rdp=4.7285, rdp_order=3.5, cumulative_epsilon=12.0
                ),
            )
        )
        assert book.cumulative(Neighbouring.SILO) == 12.0
        # The record-level relation is unaffected.
        book.append(**_release(1, 1.0))
        verify_chain(book.entries(), ca_pem=fed.ca)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(list(Neighbouring)), st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0])),
        min_size=1,
        max_size=7,
    )
)
def test_cumulative_never_decreases(fed: Pki, steps: list[tuple[Neighbouring, float]]) -> None:
    model = {relation: 0.0 for relation in Neighbouring}
    with tempfile.TemporaryDirectory() as tmp, _open(Path(tmp) / "ledger.db", fed.a) as book:
        for index, (relation, value) in enumerate(steps):
            maker = _release if relation is Neighbouring.RECORD else _silo_release
            before = book.entries()
            if value < model[relation]:
                with pytest.raises(ValueError, match="cumulative_epsilon"):
                    book.append(**maker(index, value))
                assert book.entries() == before
            else:
                book.append(**maker(index, value))
                model[relation] = value
            assert {r: book.cumulative(r) for r in Neighbouring} == model
        history = {r: [e.cumulative_epsilon for e in book.entries(r)] for r in Neighbouring}
        assert all(h == sorted(h) for h in history.values())
        verify_chain(book.entries(), ca_pem=fed.ca)


def test_check_cumulative_against_a_recomputation(fed: Pki, tmp_path: Path) -> None:
    def summed(history: Any, scope: GuaranteeScope) -> float:  # a stand-in accountant
        return sum(e.guarantee(scope).epsilon_rdp for e in history)

    with _open(tmp_path / "ledger.db", fed.a) as book:
        book.append(**_release(1, 1.0, epsilon_rdp=1.0))
        book.append(**_silo_release(1, 2.0, epsilon_rdp=2.0))
        book.append(**_release(2, 2.5, epsilon_rdp=1.5))
        check_cumulative(book.entries(), summed)
        book.append(**_release(3, 2.5, epsilon_rdp=0.5))  # stored 2.5, recomputed 3.0
        with pytest.raises(LedgerError, match="seq 4") as info:
            check_cumulative(book.entries(), summed)
        assert info.value.seq == 4
        check_cumulative(book.entries(), summed, tolerance=0.6)


# --- the chain --------------------------------------------------------------------------------


def test_chain_verifies_as_objects_json_and_dicts(fed: Pki, chain: list[LedgerEntry]) -> None:
    verify_chain(chain, ca_pem=fed.ca, expected_silo=SILO_A)
    verify_chain([e.to_json() for e in chain], ca_pem=fed.ca.decode())
    verify_chain([e.to_json().encode() for e in chain], ca_pem=fed.ca)
    verify_chain(json.loads(json.dumps([e.to_dict() for e in chain], indent=2)), ca_pem=fed.ca)
    verify_chain([], ca_pem=fed.ca)


def _field_span(text: str, key: str, value: Any) -> tuple[int, int]:
    fragment = f'"{key}":' + json.dumps(value, sort_keys=True, separators=(",", ":"))
    start = text.index(fragment)
    return start, start + len(fragment)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, 3),
    key=st.sampled_from(["format", "signature", *SIGNED_FIELDS]),
    where=st.floats(0.0, 1.0, exclude_max=True),
    mask=st.integers(1, 255),
)
def test_flipping_any_byte_of_any_field_names_that_entry(
    fed: Pki, chain: list[LedgerEntry], index: int, key: str, where: float, mask: int
) -> None:
    assume(key in chain[index].to_dict())  # the PLD fields are in the v2 entries (2 and 3) only
    texts = [e.to_json().encode("ascii") for e in chain]
    start, end = _field_span(texts[index].decode(), key, chain[index].to_dict()[key])
    position = start + int(where * (end - start))
    tampered = bytearray(texts[index])
    tampered[position] ^= mask
    texts[index] = bytes(tampered)
    assert _bad_seq(texts, fed) == index + 1


@pytest.mark.parametrize("name", [n for n in SIGNED_FIELDS if n not in ("seq", "prev_hash")])
def test_changing_a_field_without_re_signing_is_caught(
    fed: Pki, chain: list[LedgerEntry], name: str
) -> None:
    other = {
        "silo": SILO_B,
        "run_id": "run-other",
        "round": 99,
        "upload_index": 7,
        "mechanism": Mechanism.GAUSSIAN,
        "neighbouring": Neighbouring.SILO,
        "noise_multiplier": 0.7,
        "sample_rate": 1.0,
        "steps": 3,
        "clip_norm": 2.0,
        "delta": 1e-6,
        "epsilon_rdp": 0.5,
        "rdp_order": 32.0,
        "epsilon_prv": 0.4,
        "cumulative_epsilon": 99.0,
        "guarantee_scope": GuaranteeScope.AGGREGATE,
        "single_upload": chain[1].single_upload,
        "epsilon_pld": 0.3,
        "cumulative_epsilon_pld": 98.0,
        "accountant": BudgetAccountant.RDP,  # entries[2] is governed by PLD
        "created_at": "2030-01-01T00:00:00.000000Z",
        "certificate": fed.b.cert.decode(),
    }[name]
    entries = list(chain)
    changes = {name: other}
    if name == "mechanism":
        changes["sample_rate"] = 1.0
    if name == "guarantee_scope":
        changes["single_upload"] = chain[1].single_upload
    if name == "single_upload":  # the same per-release values, a different cumulative
        changes[name] = dataclasses.replace(entries[2].guarantee(GuaranteeScope.AGGREGATE),
                                            cumulative_epsilon=50.0)
    entries[2] = dataclasses.replace(entries[2], **changes)
    assert _bad_seq(entries, fed) == 3


def test_reordering_deleting_inserting_or_duplicating_entries_is_caught(
    fed: Pki, chain: list[LedgerEntry]
) -> None:
    assert _bad_seq(chain, fed) is None
    assert _bad_seq([chain[1], chain[0], *chain[2:]], fed) == 1
    assert _bad_seq([chain[0], chain[2], chain[1], chain[3]], fed) == 2
    assert _bad_seq(chain[1:], fed) == 1
    assert _bad_seq([chain[0], *chain[2:]], fed) == 2
    assert _bad_seq([*chain[:2], chain[1], *chain[2:]], fed) == 3
    # Truncating the end is not detectable from the entries alone (the mirror holds the rest).
    assert _bad_seq(chain[:3], fed) is None
    # An inserted entry with the right seq but no link to its predecessor.
    inserted = _resign(chain[2], fed.a, seq=3, prev_hash=chain[0].entry_hash())
    assert _bad_seq([*chain[:2], inserted, *chain[2:]], fed) == 3
    # A seq gap in an otherwise linked and signed chain (e.g. a silo's buggy ledger).
    gapped = _relink(chain[:2], fed.a)
    gapped[1] = _resign(gapped[1], fed.a, seq=4)
    with pytest.raises(LedgerError, match="seq 2.*says seq 4") as info:
        verify_chain(gapped, ca_pem=fed.ca)
    assert info.value.seq == 2
    # Renumbering after a deletion without re-linking.
    renumbered = [chain[0], *(_resign(e, fed.a, seq=e.seq - 1) for e in chain[2:])]
    assert _bad_seq(renumbered, fed) == 2


def test_a_fully_relinked_forgery_still_needs_the_silo_key(
    fed: Pki, chain: list[LedgerEntry]
) -> None:
    # Even a well-formed rewrite needs a key: with silo B's, every entry is flagged from seq 1.
    forged = _relink([chain[0], *chain[2:]], fed.b)
    assert _bad_seq(forged, fed) == 1
    # With the silo's own key it verifies: the mirror, not the chain, catches rewritten history.
    assert _bad_seq(_relink([chain[0], *chain[2:]], fed.a), fed) is None


def test_another_silos_signature_is_caught(
    fed: Pki, chain: list[LedgerEntry], tmp_path: Path
) -> None:
    # Silo B signs an entry that claims to be silo A's.
    entries = list(chain)
    entries[1] = _resign(chain[1], fed.b)
    with pytest.raises(LedgerError, match=r"seq 2.*hospital-b.*not 'hospital-a'") as info:
        verify_chain(entries, ca_pem=fed.ca)
    assert info.value.seq == 2
    # Silo A's certificate, silo B's signature.
    key_b = signed.load_signing_key(fed.b.key)
    entries[1] = dataclasses.replace(
        chain[1], signature=signed.sign(key_b, chain[1].canonical_bytes())
    )
    with pytest.raises(LedgerError, match="seq 2.*signature"):
        verify_chain(entries, ca_pem=fed.ca)
    # Silo B's own, genuine entry spliced into A's chain.
    b_entry = _build_chain(tmp_path / "b.db", fed.b)[2]
    spliced = _resign(b_entry, fed.b, seq=3, prev_hash=chain[1].entry_hash())
    with pytest.raises(LedgerError, match="seq 3.*hospital-b.*hospital-a"):
        verify_chain([*chain[:2], spliced], ca_pem=fed.ca)
    # B's genuine ledger is not A's.
    b_chain = _build_chain(tmp_path / "b2.db", fed.b)
    verify_chain(b_chain, ca_pem=fed.ca, expected_silo=SILO_B)
    assert _bad_seq(b_chain, fed, expected_silo=SILO_A) == 1


def test_certificates_not_from_the_ca_or_not_a_silos_are_caught(
    fed: Pki, chain: list[LedgerEntry], tmp_path: Path
) -> None:
    foreign = _build_chain(tmp_path / "foreign.db", fed.foreign_a)
    with pytest.raises(LedgerError, match="seq 1.*not issued by this federation's CA"):
        verify_chain(foreign, ca_pem=fed.ca)
    # One foreign-CA entry in the middle of a genuine chain.
    entries = list(chain)
    entries[2] = _resign(chain[2], fed.foreign_a)
    assert _bad_seq(entries, fed) == 3
    for impostor in (fed.coordinator, fed.admin_a):
        entries[2] = _resign(chain[2], impostor)
        with pytest.raises(LedgerError, match="seq 3.*not to a silo"):
            verify_chain(entries, ca_pem=fed.ca)
    # The CA itself is not a silo either.
    with pytest.raises(LedgerError, match="seq 1"):
        verify_chain([dataclasses.replace(chain[0], certificate=fed.ca.decode())], ca_pem=fed.ca)


def test_open_refuses_the_wrong_certificate_or_key(fed: Pki, tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with pytest.raises(LedgerError, match="does not belong"):
        Ledger.open(path, silo=SILO_A, certificate_pem=fed.a.cert, private_key_pem=fed.b.key)
    with pytest.raises(LedgerError, match="not to silo 'hospital-a'"):
        Ledger.open(path, silo=SILO_A, certificate_pem=fed.b.cert, private_key_pem=fed.b.key)
    with pytest.raises(LedgerError):
        Ledger.open(
            path, silo=SILO_A, certificate_pem=fed.admin_a.cert, private_key_pem=fed.admin_a.key
        )
    _open(path, fed.a).close()
    with pytest.raises(LedgerError, match="not silo 'hospital-b'"):
        _open(path, fed.b)


# --- durability and crash safety --------------------------------------------------------------


def test_reopen_keeps_entries_and_continues_the_chain(fed: Pki, tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.db"
    with _open(path, fed.a) as book:
        first = [book.append(**_release(r, float(r))) for r in range(1, 4)]
        pending = book.reserve(**_silo_release(3, 1.0))
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()
    with _open(path, fed.a) as book:
        assert book.entries() == [*first, pending]
        assert book.pending() == [pending]
        following = book.append(**_release(4, 4.0))
        assert following.seq == 5 and following.prev_hash == pending.entry_hash()
        assert book.cumulative(Neighbouring.RECORD) == 4.0
        assert book.cumulative(Neighbouring.SILO) == 1.0
        book.verify(ca_pem=fed.ca)


def test_reserve_commit_abandon(fed: Pki, tmp_path: Path) -> None:
    with _open(tmp_path / "ledger.db", fed.a) as book:
        held = book.reserve(**_release(1, 2.0))
        assert book.status(held.seq) is EntryStatus.PENDING and book.pending() == [held]
        assert book.cumulative(Neighbouring.RECORD) == 2.0  # counted from the reservation
        with pytest.raises(ValueError, match="pending reservation seq 1"):
            book.reserve(**_release(1, 3.0))
        with pytest.raises(ValueError, match="pending reservation seq 1"):
            book.append(**_release(1, 3.0))
        assert [e.seq for e in book.entries()] == [1]
        # Another upload of the round, or the other relation, is a different release.
        other = book.reserve(**_release(1, 3.0, upload_index=1))
        silo = book.reserve(**_silo_release(1, 1.0))
        assert book.commit(held.seq) == held
        assert book.commit(held.seq) == held  # idempotent
        with pytest.raises(ValueError, match="already released"):
            book.abandon(held.seq)
        book.abandon(other.seq)
        book.abandon(other.seq)
        with pytest.raises(ValueError, match="already abandoned"):
            book.commit(other.seq)
        assert book.cumulative(Neighbouring.RECORD) == 3.0  # abandoning refunds nothing
        assert book.pending() == [silo]
        # The round's reservation can be retried now that the first one is resolved.
        retry = book.reserve(**_release(1, 4.0))
        assert [book.status(s) for s in (1, 2, 3, 4)] == [
            EntryStatus.RELEASED,
            EntryStatus.ABANDONED,
            EntryStatus.PENDING,
            EntryStatus.PENDING,
        ]
        assert retry.seq == 4
        with pytest.raises(ValueError, match="no such entry"):
            book.commit(99)
        book.verify(ca_pem=fed.ca)


def test_sqlite_refuses_rewrites_and_rewritten_rows_fail_verification(
    fed: Pki, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.db"
    with _open(path, fed.a) as book:
        for r in range(1, 4):
            book.append(**_release(r, float(r)))
    raw = sqlite3.connect(path)
    try:
        for sql in (
            "DELETE FROM entries WHERE seq = 2",
            "UPDATE entries SET entry_json = '{}' WHERE seq = 2",
            "UPDATE entries SET status = 'pending' WHERE seq = 2",
        ):
            with pytest.raises(sqlite3.DatabaseError, match="append-only|pending"):
                raw.execute(sql)
        # Someone with write access drops the trigger and edits an entry in place.
        text = raw.execute("SELECT entry_json FROM entries WHERE seq = 2").fetchone()[0]
        raw.execute("DROP TRIGGER entries_append_only_update")
        raw.execute(
            "UPDATE entries SET entry_json = ? WHERE seq = 2",
            (text.replace('"cumulative_epsilon":"2.0"', '"cumulative_epsilon":"1.5"'),),
        )
        raw.commit()
    finally:
        raw.close()
    with _open(path, fed.a) as book, pytest.raises(LedgerError, match="seq 2") as info:
        book.verify(ca_pem=fed.ca)
    assert info.value.seq == 2


_CHILD = textwrap.dedent(
    """
    import sys
    from fedsilo.privacy.ledger import Ledger, Mechanism, Neighbouring

    db, cert, key, run = sys.argv[1:5]
    book = Ledger.open(db, silo="hospital-a", certificate_pem=open(cert, "rb").read(),
                       private_key_pem=open(key, "rb").read())
    # Recovery: reservations whose outcome is unknown stay counted; this agent gives them up.
    for held in book.pending():
        book.abandon(held.seq)
        print("abandoned", held.seq, flush=True)
    print("ready", flush=True)
    cumulative = {r: book.cumulative(r) for r in Neighbouring}
    i = 0
    while True:
        i += 1
        relation = Neighbouring.SILO if i % 3 == 0 else Neighbouring.RECORD
        cumulative[relation] += 0.25
        silo = relation is Neighbouring.SILO
        held = book.reserve(
            run_id=run, round=i, upload_index=0,
            mechanism=Mechanism.GAUSSIAN if silo else Mechanism.SUBSAMPLED_GAUSSIAN,
            neighbouring=relation, noise_multiplier=1.1, sample_rate=1.0 if silo else 0.01,
            steps=1 if silo else 100, clip_norm=1.0, delta=1e-5, epsilon_rdp=0.25,
            rdp_order=8.0, cumulative_epsilon=cumulative[relation],
        )
        print("reserved", held.seq, flush=True)
        book.commit(held.seq)
        print("committed", held.seq, flush=True)
    """
)


def test_sigkill_at_random_points_loses_no_committed_entry(fed: Pki, tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    path = tmp_path / "state" / "ledger.db"
    reserved: set[int] = set()
    committed: set[int] = set()
    durable = 0  # entries in the ledger after the previous child
    for attempt in range(7):
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(path),
                str(fed.a.cert_path),
                str(fed.a.key_path),
                f"run-{attempt}",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stderr is not None
        if attempt % 3 == 0:
            # Kill at a random time from spawn: often while it imports, opens or recovers.
            time.sleep(rng.uniform(0.0, 0.6))
        else:
            line = child.stdout.readline()
            while line.startswith("abandoned"):
                line = child.stdout.readline()
            assert line == "ready\n", (line, child.stderr.read())
            time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        out, err = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, err
        mine: dict[str, set[int]] = {"reserved": set(), "committed": set()}
        # a SIGKILL can land mid-line: only newline-terminated lines were fully reported
        for line in out.split("\n")[:-1]:
            word, _, number = line.partition(" ")
            if word in mine:
                mine[word].add(int(number))
        # The child reports each reservation's commit before the next reservation, so at
        # most its last reservation can be unreported as committed.
        assert mine["reserved"] - mine["committed"] <= {max(mine["reserved"], default=0)}
        reserved |= mine["reserved"]
        committed |= mine["committed"]

        context = f"(seed {seed}, kill {attempt + 1})"
        if not path.exists():
            continue
        with _open(path, fed.a) as book:
            book.verify(ca_pem=fed.ca)
            seqs = [e.seq for e in book.entries()]
            assert seqs == list(range(1, len(seqs) + 1)), context
            assert reserved <= set(seqs), context
            # Each child makes at most one entry durable that it never got to report (its last
            # one); over several kills such entries add up, one per child at most.
            assert len(seqs) - durable <= len(mine["reserved"]) + 1, context
            durable = len(seqs)
            for seq in committed:
                assert book.status(seq) is EntryStatus.RELEASED, context
            # Each reservation counted exactly once, abandoned or not: ε = 0.25 per entry.
            for relation in Neighbouring:
                count = len(book.entries(relation))
                assert book.cumulative(relation) == pytest.approx(0.25 * count), context
    assert len(reserved) >= 10, f"the children wrote too little to test anything (seed {seed})"
    with _open(path, fed.a) as book:
        before = book.last()
        assert before is not None
        after = book.append(**_release(1000, book.cumulative(Neighbouring.RECORD)))
        assert after.seq == before.seq + 1 and after.prev_hash == before.entry_hash()
        book.verify(ca_pem=fed.ca)


# --- the coordinator's mirror ---------------------------------------------------------------------


@pytest.fixture()
def two_ledgers(fed: Pki, tmp_path: Path) -> Iterator[tuple[list[LedgerEntry], list[LedgerEntry]]]:
    yield _build_chain(tmp_path / "a.db", fed.a), _build_chain(tmp_path / "b.db", fed.b)


def _flip_signature_digit(text: str) -> str:
    index = text.index('"signature":"') + len('"signature":"') + 5
    digit = text[index]
    assert digit in "0123456789abcdef"
    return text[:index] + ("1" if digit == "0" else "0") + text[index + 1 :]


def _mirror_state(mirror: LedgerMirror) -> dict[str, list[str]]:
    return {silo: [e.to_json() for e in mirror.entries(silo)] for silo in mirror.silos()}


def test_mirror_accepts_valid_sequences_and_survives_reopen(
    fed: Pki, tmp_path: Path, two_ledgers: tuple[list[LedgerEntry], list[LedgerEntry]]
) -> None:
    a, b = two_ledgers
    path = tmp_path / "coordinator" / "mirror.db"
    with LedgerMirror.open(path) as mirror:
        for ea, eb in zip(a[:2], b[:2]):
            assert mirror.accept(ea.to_json(), ca_pem=fed.ca, expected_silo=SILO_A) == ea
            assert mirror.accept(eb.to_json().encode(), ca_pem=fed.ca) == eb
    with LedgerMirror.open(path) as mirror:
        for entry in a[2:]:
            mirror.accept(entry.to_json(), ca_pem=fed.ca)
        assert mirror.silos() == [SILO_A, SILO_B]
        assert mirror.entries(SILO_A) == a and mirror.entries(SILO_B) == b[:2]
        assert mirror.last(SILO_A) == a[-1] and mirror.last("hospital-z") is None
        # The budget figure is the governing accountant's: PLD for the last record-level entry
        # (9.6, its RDP figure 10.4), RDP for the last silo-level one.
        assert mirror.cumulative(SILO_A, Neighbouring.RECORD) == 9.6
        assert mirror.cumulative(SILO_A, Neighbouring.SILO) == 13.9
        assert mirror.cumulative(SILO_A, Neighbouring.SILO, scope=GuaranteeScope.AGGREGATE) == 6.5
        assert mirror.cumulative(SILO_B, Neighbouring.SILO) == 11.2
        verify_chain(mirror.entries(SILO_A), ca_pem=fed.ca, expected_silo=SILO_A)


def test_mirror_rejects_bad_entries_without_changing_state(
    fed: Pki, tmp_path: Path, two_ledgers: tuple[list[LedgerEntry], list[LedgerEntry]]
) -> None:
    a, b = two_ledgers
    with LedgerMirror.open(tmp_path / "mirror.db") as mirror:
        mirror.accept(a[0].to_json(), ca_pem=fed.ca)
        mirror.accept(a[1].to_json(), ca_pem=fed.ca)
        mirror.accept(b[0].to_json(), ca_pem=fed.ca)
        state = _mirror_state(mirror)
        forked = _build_chain(tmp_path / "fork.db", fed.a)  # another ledger for the same silo
        tampered = a[2].to_json().replace('"round":2', '"round":3')
        signed_by_b = _resign(a[2], fed.b)
        foreign_c = _build_chain(tmp_path / "f.db", fed.foreign_c)
        foreign_a = _build_chain(tmp_path / "fa.db", fed.foreign_a)
        rejections: list[tuple[str, Any, str]] = [
            ("tampered", tampered, "seq 3.*signature"),
            ("flipped byte", _flip_signature_digit(a[2].to_json()), "seq 3.*signature"),
            ("not JSON", "{", "not valid JSON"),
            ("replayed", a[0].to_json(), "already mirrored"),
            ("fork", forked[1].to_json(), "different entry seq 2"),
            ("out of order", a[3].to_json(), "out of order.*send seq 3 first"),
            ("other silo's key", signed_by_b.to_json(), "seq 3.*hospital-b"),
            ("foreign CA", foreign_c[0].to_json(), "seq 1.*CA"),
            ("foreign CA, known name", foreign_a[0].to_json(), "different entry seq 1"),
        ]
        for what, payload, pattern in rejections:
            with pytest.raises(LedgerError, match=pattern):
                mirror.accept(payload, ca_pem=fed.ca)
            assert _mirror_state(mirror) == state, what
        with pytest.raises(DuplicateEntryError):
            mirror.accept(a[1].to_json(), ca_pem=fed.ca)
        with pytest.raises(LedgerError, match="sent by silo 'hospital-b'"):
            mirror.accept(a[2].to_json(), ca_pem=fed.ca, expected_silo=SILO_B)
        with pytest.raises(LedgerError, match="seq 2.*CA"):
            mirror.accept(b[1].to_json(), ca_pem=fed.foreign_ca)
        assert _mirror_state(mirror) == state
        # The genuine next entries are still accepted afterwards.
        mirror.accept(a[2].to_json(), ca_pem=fed.ca)
        mirror.accept(a[3].to_json(), ca_pem=fed.ca)
        assert mirror.entries(SILO_A) == a


def test_mirror_refuses_a_decreasing_cumulative_even_if_signed(fed: Pki, tmp_path: Path) -> None:
    # A buggy or malicious agent signs an entry that lowers its cumulative ε.
    with _open(tmp_path / "a.db", fed.a) as book:
        good = book.append(**_release(1, 5.0))
    lowered = _resign(
        dataclasses.replace(good, seq=2, prev_hash=good.entry_hash()), fed.a, cumulative_epsilon=4.0
    )
    with LedgerMirror.open(tmp_path / "mirror.db") as mirror:
        mirror.accept(good.to_json(), ca_pem=fed.ca)
        with pytest.raises(LedgerError, match="seq 2.*cumulative"):
            mirror.accept(lowered.to_json(), ca_pem=fed.ca)
        assert mirror.entries(SILO_A) == [good]
    with pytest.raises(LedgerError, match="seq 2.*cumulative"):
        verify_chain([good, lowered], ca_pem=fed.ca)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.sampled_from(["format", "signature", *SIGNED_FIELDS]),
    where=st.floats(0.0, 1.0, exclude_max=True),
    mask=st.integers(1, 255),
)
def test_mirror_rejects_any_flipped_byte(
    fed: Pki, chain: list[LedgerEntry], key: str, where: float, mask: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp, LedgerMirror.open(Path(tmp) / "m.db") as mirror:
        for entry in chain[:2]:
            mirror.accept(entry.to_json(), ca_pem=fed.ca)
        state = _mirror_state(mirror)
        text = chain[2].to_json().encode()
        start, end = _field_span(text.decode(), key, chain[2].to_dict()[key])
        tampered = bytearray(text)
        tampered[start + int(where * (end - start))] ^= mask
        with pytest.raises(LedgerError):
            mirror.accept(bytes(tampered), ca_pem=fed.ca)
        assert _mirror_state(mirror) == state
        mirror.accept(text, ca_pem=fed.ca)


def test_a_damaged_certificate_is_a_ledger_error_not_a_crash(fed: Pki, tmp_path: Path) -> None:
    """One changed character inside an entry's embedded certificate: refused as LedgerError."""
    with _open(tmp_path / "l.sqlite", fed.a) as led:
        entry = led.append(**_release(1, 7.0))
    text = entry.to_json()
    start = text.index("MII") + 200
    refused = 0
    for ch in "AB+/":
        if text[start] == ch:
            continue
        bad = text[:start] + ch + text[start + 1:]
        with LedgerMirror.open(tmp_path / f"m{ch.encode().hex()}.sqlite") as mirror:
            with pytest.raises(LedgerError):
                mirror.accept(bad, ca_pem=fed.ca)
            assert mirror.silos() == []
        with pytest.raises(LedgerError):
            verify_chain([bad], ca_pem=fed.ca)
        refused += 1
    assert refused >= 3
