"""Tests for privacy audit reports (privacy/audit.py): build, write, verify, tamper."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.privacy import accounting, pki
from fedsilo.privacy.accounting import LEDGER_RDP_ORDERS, BudgetAccountant, PldAccountant, RdpAccountant, Release
from fedsilo.privacy.audit import (
    REPORT_FORMAT,
    THREAT_MODEL,
    AuditError,
    VerifyResult,
    build_report,
    report_summary,
    resfim_disclosures,
    verify_report,
    write_disclosures,
    write_report,
)
from fedsilo.privacy.budget import (
    BUDGET_FILE,
    BUDGETS_DIR,
    CA_FILE,
    LEDGER_FILE,
    MIRROR_FILE,
    save_budget,
    sign_budget,
)
from fedsilo.privacy.ledger import (
    GuaranteeScope,
    Ledger,
    LedgerEntry,
    LedgerMirror,
    Mechanism,
    Neighbouring,
    UploadGuarantee,
)
from fedsilo.privacy.pki import Role

SILO_A = "hospital-a"
SILO_B = "hospital-b"
DELTA = 1e-5
ACCOUNTANT = RdpAccountant(orders=LEDGER_RDP_ORDERS)
PLD = PldAccountant()
TAMPER_SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Party:
    """A certificate holder: its name, certificate and key (PEM)."""

    name: str
    cert: bytes = dataclasses.field(repr=False)
    key: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fed:
    """A federation CA with two silos, and a foreign CA."""

    ca: bytes = dataclasses.field(repr=False)
    foreign_ca: bytes = dataclasses.field(repr=False)
    a: Party
    b: Party


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Fed:
    root = tmp_path_factory.mktemp("audit-pki")
    ca = pki.init_ca(root / "ca")
    foreign = pki.init_ca(root / "foreign-ca")

    def issue(name: str) -> Party:
        paths = pki.issue_certificate(root / "ca", root / "certs", role=Role.SILO, name=name)
        return Party(name=name, cert=paths.cert.read_bytes(), key=paths.key.read_bytes())

    return Fed(
        ca=ca.cert.read_bytes(),
        foreign_ca=foreign.cert.read_bytes(),
        a=issue(SILO_A),
        b=issue(SILO_B),
    )


class Spender:
    """Appends releases to a real ledger with every ε computed by the RDP accountant.

    Keeps each relation's history for both observers: the aggregate (noise multiplier σ)
    and one upload (σ/√K when the noise is shared among K silos, else σ).
    """

    def __init__(self, book: Ledger) -> None:
        self.book = book
        self.history: dict[Neighbouring, list[tuple[Release, Release]]] = {}
        self.has_block: set[Neighbouring] = set()

    def spend(
        self,
        *,
        run: str,
        round_: int,
        relation: Neighbouring,
        sigma: float,
        q: float = 1.0,
        steps: int = 1,
        upload: int = 0,
        silos: int | None = None,
        prv: float | None = None,
        cumulative_error: float = 0.0,
        epsilon_error: float = 0.0,
        governing: BudgetAccountant | None = None,
        pld_error: float = 0.0,
        omit_pld: bool = False,
    ) -> LedgerEntry:
        """Appends one release; ``silos`` = K means noise distributed among K silos.

        ``prv`` is the PRV ε as a fraction of the RDP one; ``*_error`` add a deliberate
        error to the stored (aggregate) figures, which are still signed. ``governing`` makes
        a version-2 entry (PLD beside RDP; ``pld_error`` on its cumulative PLD figure,
        ``omit_pld`` leaves the PLD figures out); None a version-1 (RDP-only) one.
        """
        mechanism = Mechanism.GAUSSIAN if q == 1.0 else Mechanism.SUBSAMPLED_GAUSSIAN
        upload_sigma = sigma if silos is None else sigma / math.sqrt(silos)

        def release(noise: float) -> Release:
            return Release(
                mechanism=accounting.Mechanism(mechanism.value),
                neighbouring=accounting.Neighbouring(relation.value),
                noise_multiplier=noise,
                sample_rate=q,
                steps=steps,
            )

        pair = (release(sigma), release(upload_sigma))
        prefix = self.history.setdefault(relation, []) + [pair]
        alone = ACCOUNTANT.epsilon([pair[0]], delta=DELTA)
        alone_upload = ACCOUNTANT.epsilon([pair[1]], delta=DELTA)
        total = ACCOUNTANT.epsilon([p[0] for p in prefix], delta=DELTA).epsilon
        total_upload = ACCOUNTANT.epsilon([p[1] for p in prefix], delta=DELTA).epsilon
        fields: dict[str, Any] = {
            "run_id": run,
            "round": round_,
            "upload_index": upload,
            "mechanism": mechanism,
            "neighbouring": relation,
            "noise_multiplier": sigma,
            "sample_rate": q,
            "steps": steps,
            "clip_norm": 1.0,
            "delta": DELTA,
            "epsilon_rdp": alone.epsilon + epsilon_error,
            "rdp_order": alone.order,
            "epsilon_prv": None if prv is None else alone.epsilon * prv,
            "cumulative_epsilon": total + cumulative_error,
        }
        pld: dict[str, Any] = {}
        upload_pld: dict[str, Any] = {}
        if governing is not None:
            fields["accountant"] = governing
            if not omit_pld:
                pld = {"epsilon_pld": PLD.epsilon([pair[0]], delta=DELTA).epsilon,
                       "cumulative_epsilon_pld": PLD.epsilon([p[0] for p in prefix], delta=DELTA).epsilon + pld_error}
                upload_pld = {"epsilon_pld": PLD.epsilon([pair[1]], delta=DELTA).epsilon,
                              "cumulative_epsilon_pld": PLD.epsilon([p[1] for p in prefix], delta=DELTA).epsilon}
                fields.update(pld)
        if silos is not None:
            fields["guarantee_scope"] = GuaranteeScope.AGGREGATE
            fields["single_upload"] = UploadGuarantee(
                noise_multiplier=upload_sigma,
                epsilon_rdp=alone_upload.epsilon,
                rdp_order=alone_upload.order,
                cumulative_epsilon=total_upload,
                **upload_pld,
            )
            self.has_block.add(relation)
        elif relation in self.has_block:
            fields["single_upload"] = UploadGuarantee(
                noise_multiplier=sigma,
                epsilon_rdp=fields["epsilon_rdp"],
                rdp_order=alone.order,
                epsilon_prv=fields["epsilon_prv"],
                cumulative_epsilon=total_upload,
                **{**upload_pld, "epsilon_pld": pld.get("epsilon_pld")},
            )
        entry = self.book.append(**fields)
        self.history[relation] = prefix
        return entry


def _open(path: Path, party: Party) -> Ledger:
    return Ledger.open(path, silo=party.name, certificate_pem=party.cert,
                       private_key_pem=party.key)


def _history_a(spender: Spender) -> None:
    """Silo a: DP-SGD (record-level) and distributed silo-level noise, over two runs: run 1
    written by a fedsilo before PLD (version-1 entries), run 2 by this one, its record-level
    budget governed by PLD and its silo-level one by RDP."""
    record = {"relation": Neighbouring.RECORD, "sigma": 1.1, "q": 0.02, "steps": 40}
    silo = {"relation": Neighbouring.SILO, "sigma": 2.0, "silos": 4}
    spender.spend(run="run-1", round_=1, prv=0.9, **record)
    spender.spend(run="run-1", round_=1, **silo)
    spender.spend(run="run-1", round_=2, **record)
    spender.spend(run="run-1", round_=2, **silo)
    spender.spend(run="run-2", round_=1, governing=BudgetAccountant.PLD, **record)
    spender.spend(run="run-2", round_=1, relation=Neighbouring.SILO, sigma=3.0, governing=BudgetAccountant.RDP)


def _history_b(spender: Spender) -> None:
    """Silo b: record-level only, whose run label needs escaping in HTML."""
    spender.spend(run='run <b>&"x"', round_=0, relation=Neighbouring.RECORD, sigma=0.9, q=0.05,
                  steps=30)
    spender.spend(run='run <b>&"x"', round_=1, relation=Neighbouring.RECORD, sigma=0.9, q=0.05,
                  steps=30)


def _budget(party: Party, epsilon: float) -> Any:
    return sign_budget(silo=party.name, epsilon=epsilon, delta=DELTA,
                       certificate_pem=party.cert, private_key_pem=party.key)


def _agent_dir(root: Path, fed: Fed, *, budget: float | None = 40.0) -> Path:
    state = root / "agent"
    state.mkdir(parents=True)
    (state / CA_FILE).write_bytes(fed.ca)
    with _open(state / LEDGER_FILE, fed.a) as book:
        _history_a(Spender(book))
    if budget is not None:
        save_budget(_budget(fed.a, budget), state / BUDGET_FILE)
    return state


def _coordinator_dir(root: Path, fed: Fed) -> Path:
    state = root / "coordinator"
    (state / BUDGETS_DIR).mkdir(parents=True)
    (state / CA_FILE).write_bytes(fed.ca)
    with _open(root / "a.sqlite", fed.a) as a_book, _open(root / "b.sqlite", fed.b) as b_book:
        _history_a(Spender(a_book))
        _history_b(Spender(b_book))
        with LedgerMirror.open(state / MIRROR_FILE) as mirror:
            for entry in a_book.entries() + b_book.entries():
                mirror.accept(entry.to_json(), ca_pem=fed.ca, expected_silo=entry.silo)
    save_budget(_budget(fed.a, 40.0), state / BUDGETS_DIR / f"{SILO_A}.json")
    save_budget(_budget(fed.b, 0.5), state / BUDGETS_DIR / f"{SILO_B}.json")
    return state


@pytest.fixture(scope="module")
def agent_state(fed: Fed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _agent_dir(tmp_path_factory.mktemp("agent-state"), fed)


@pytest.fixture(scope="module")
def coordinator_state(fed: Fed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _coordinator_dir(tmp_path_factory.mktemp("coordinator-state"), fed)


@pytest.fixture(scope="module")
def coordinator_report(
    coordinator_state: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    return write_report(build_report(coordinator_state), tmp_path_factory.mktemp("report"))


def _ca_sha256(ca_pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(ca_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _dump(report: Any) -> str:
    return json.dumps(report, sort_keys=True, indent=1, ensure_ascii=True) + "\n"


def _entry_spans(text: str) -> list[tuple[str, int, int, int]]:
    """(silo, seq, start, end) of each ledger entry's JSON text inside a report."""
    spans = []
    for section in json.loads(text)["silos"]:
        for entry in section["entries"]:
            body = json.dumps(entry, sort_keys=True, indent=1, ensure_ascii=True)
            body = body.replace("\n", "\n    ")
            start = text.index(body)
            assert text.count(body) == 1
            spans.append((section["silo"], entry["seq"], start, start + len(body)))
    return spans


# --- building and verifying -------------------------------------------------------------


def test_agent_report_builds_writes_and_verifies(
    fed: Fed, agent_state: Path, tmp_path: Path
) -> None:
    report = build_report(agent_state)
    assert report["format"] == REPORT_FORMAT and report["source"] == "silo"
    assert report["ca_certificate"] == fed.ca.decode("ascii")
    assert report["ca_sha256"] == _ca_sha256(fed.ca)
    assert report["accounting"]["orders"] == list(LEDGER_RDP_ORDERS)
    assert report["accounting"]["method"] == "rdp"
    assert report["accounting"]["verifier"] == "dp_accounting"
    assert report["threat_model"] == THREAT_MODEL
    [section] = report["silos"]
    assert section["silo"] == SILO_A
    assert float(section["budget"]["epsilon"]) == 40.0
    entries = [LedgerEntry.from_json(e) for e in section["entries"]]
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert [r["seq"] for r in section["releases"]] == [1, 2, 3, 4, 5, 6]
    last_record, last_silo = entries[4], entries[5]
    silo_upload = last_silo.guarantee(GuaranteeScope.SINGLE_UPLOAD)
    assert section["cumulative"] == {
        "record": {
            "aggregate": last_record.cumulative_epsilon,
            "single_upload": last_record.cumulative_epsilon,
            "aggregate_pld": last_record.cumulative_epsilon_pld,
            "single_upload_pld": last_record.cumulative_epsilon_pld,
            "accountant": "pld",
            "spent": last_record.cumulative_epsilon_pld,
        },
        "silo": {
            "aggregate": last_silo.cumulative_epsilon,
            "single_upload": silo_upload.cumulative_epsilon,
            "aggregate_pld": last_silo.cumulative_epsilon_pld,
            "single_upload_pld": silo_upload.cumulative_epsilon_pld,
            "accountant": "rdp",
            "spent": silo_upload.cumulative_epsilon,
        },
    }
    # Both accountants compose the whole history, the version-1 entries included; PLD is tighter.
    record_history = [e for e in entries if e.neighbouring is Neighbouring.RECORD]
    releases = [Release(mechanism=accounting.Mechanism(e.mechanism.value),
                        neighbouring=accounting.Neighbouring.RECORD, noise_multiplier=e.noise_multiplier,
                        sample_rate=e.sample_rate, steps=e.steps) for e in record_history]
    assert last_record.cumulative_epsilon_pld == PLD.epsilon(releases, delta=DELTA).epsilon
    assert last_record.cumulative_epsilon_pld < last_record.cumulative_epsilon
    assert [r["accountant"] for r in section["releases"]] == ["rdp", "rdp", "rdp", "rdp", "pld", "rdp"]
    assert [r["epsilon_pld"] is None for r in section["releases"]] == [True] * 4 + [False] * 2
    # distributed noise: the single-upload figure is the larger, and the one the budget uses
    silo_spend = section["cumulative"]["silo"]
    assert silo_spend["single_upload"] > silo_spend["aggregate"]
    assert section["budget_left"] == {
        relation: 40.0 - spent["spent"]
        for relation, spent in section["cumulative"].items()
    }
    assert section["within_budget"] == {"record": True, "silo": True}
    distributed = section["releases"][1]
    assert distributed["guarantee_scope"] == "aggregate"
    assert distributed["noise_multiplier"] == 2.0
    assert distributed["single_upload_noise_multiplier"] == 1.0

    json_path, html_path = write_report(report, tmp_path / "out" / "nested")
    assert (json_path.name, html_path.name) == ("report.json", "report.html")
    text = json_path.read_text("ascii")
    assert text == _dump(report) and json.loads(text) == report
    result = verify_report(json_path, ca_pem=fed.ca)
    assert result == VerifyResult(
        source="silo",
        silos=(SILO_A,),
        entries=6,
        max_epsilon_difference=result.max_epsilon_difference,
        ca_sha256=_ca_sha256(fed.ca),
        ca_from_report=False,
        max_pld_difference=0.0,  # the same code at the same grid: exact
        pld_figures=6,  # entries 5 and 6; entry 6 in both scopes; release and cumulative each
        prv_cross_check=result.prv_cross_check,
    )
    assert result.max_epsilon_difference < 1e-6
    # torch is installed here: each final PLD figure (record; silo, two scopes) against Opacus' PRV
    assert result.prv_cross_check is not None
    compared, largest = result.prv_cross_check
    assert compared == 3 and largest < 0.05
    anchored_in_report = verify_report(json_path)
    assert anchored_in_report.ca_from_report and anchored_in_report.ca_sha256 == result.ca_sha256


def test_coordinator_report_covers_every_silo(
    fed: Fed, coordinator_report: tuple[Path, Path]
) -> None:
    json_path, _ = coordinator_report
    report = json.loads(json_path.read_text("ascii"))
    assert report["source"] == "coordinator"
    assert [s["silo"] for s in report["silos"]] == [SILO_A, SILO_B]
    a, b = report["silos"]
    assert len(a["entries"]) == 6 and len(b["entries"]) == 2
    assert list(b["cumulative"]) == ["record"]
    assert b["within_budget"] == {"record": False}  # budget 0.5 is exceeded
    assert b["budget_left"]["record"] < 0
    assert a["within_budget"] == {"record": True, "silo": True}
    result = verify_report(json_path, ca_pem=fed.ca)
    assert (result.silos, result.entries, result.source) == ((SILO_A, SILO_B), 8, "coordinator")


def test_silos_without_budget_or_entries(fed: Fed, tmp_path: Path) -> None:
    state = _agent_dir(tmp_path, fed, budget=None)
    report = build_report(state)
    [section] = report["silos"]
    assert section["budget"] is None
    assert section["budget_left"] is None and section["within_budget"] is None
    json_path, html_path = write_report(report, tmp_path / "out")
    verify_report(json_path, ca_pem=fed.ca)
    assert "No signed budget statement" in html_path.read_text("utf-8")

    coordinator = tmp_path / "coord"
    (coordinator / BUDGETS_DIR).mkdir(parents=True)
    (coordinator / CA_FILE).write_bytes(fed.ca)
    LedgerMirror.open(coordinator / MIRROR_FILE).close()
    save_budget(_budget(fed.b, 2.0), coordinator / BUDGETS_DIR / f"{SILO_B}.json")
    [only] = build_report(coordinator)["silos"]
    assert (only["silo"], only["entries"], only["cumulative"]) == (SILO_B, [], {})


def test_html_is_self_contained_and_escaped(coordinator_report: tuple[Path, Path]) -> None:
    json_path, html_path = coordinator_report
    page = html_path.read_text("utf-8")
    report = json.loads(json_path.read_text("ascii"))
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 2  # one plot per silo
    assert SILO_A in page and SILO_B in page
    assert report["ca_sha256"] in page
    assert "fedsilo audit verify report.json" in page
    assert "stroke-dasharray=\"8 5\"" in page  # the budget line
    assert "<script" not in page and "src=" not in page and "href=" not in page
    assert "<b>" not in page and "run &lt;b&gt;&amp;&quot;x&quot;" in page
    assert "Against whom." in page  # the threat model


# --- tampering ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_text(coordinator_report: tuple[Path, Path]) -> str:
    return coordinator_report[0].read_text("ascii")


class Tampering:
    """A report's text, its entries' spans and the CA, with a short repr for Hypothesis."""

    def __init__(self, text: str, ca: bytes) -> None:
        self.raw = text.encode("ascii")
        self.spans = _entry_spans(text)
        self.ca = ca

    def __repr__(self) -> str:
        return f"Tampering(<{len(self.raw)}-byte report, {len(self.spans)} entries>)"


@pytest.fixture(scope="module")
def tampering(fed: Fed, report_text: str) -> Tampering:
    return Tampering(report_text, fed.ca)


@TAMPER_SETTINGS
@given(data=st.data())
def test_any_changed_byte_in_an_entry_names_that_entry(
    tampering: Tampering, data: st.DataObject
) -> None:
    silo, seq, start, end = data.draw(st.sampled_from(tampering.spans), label="entry")
    position = data.draw(st.integers(start, end - 1), label="position")
    raw = bytearray(tampering.raw)
    raw[position] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[position]))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "report.json"
        path.write_bytes(bytes(raw))
        with pytest.raises(AuditError) as info:
            verify_report(path, ca_pem=tampering.ca)
    message = str(info.value)
    assert re.search(rf"seq {seq}\b", message), message
    assert silo in message, message
    assert (info.value.silo, info.value.seq) == (silo, seq)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r["silos"][0]["budget_left"].update(record=1.0), "silos[0].budget_left.record"),
        (lambda r: r["silos"][1]["within_budget"].update(record=True),
         "silos[1].within_budget.record"),
        (lambda r: r["silos"][0]["cumulative"]["silo"].update(single_upload=0.1),
         "silos[0].cumulative.silo.single_upload"),
        (lambda r: r["silos"][0]["releases"][2].update(epsilon_rdp=0.01),
         "silos[0].releases[2].epsilon_rdp"),
        (lambda r: r["silos"][1]["releases"].pop(), "silos[1].releases (length)"),
        (lambda r: r.update(ca_sha256="0" * 64), "ca_sha256"),
        (lambda r: r.update(threat_model="DP protects everything."), "threat_model"),
        (lambda r: r["accounting"].update(orders=[2.0]), "accounting"),
        (lambda r: r.update(format="fedsilo-audit-report-v0"), "format"),
        (lambda r: r.update(format="fedsilo-audit-report-v1"), "format"),
        (lambda r: r["silos"][0]["cumulative"]["record"].update(single_upload_pld=0.1),
         "silos[0].cumulative.record.single_upload_pld"),
        (lambda r: r["silos"][0]["cumulative"]["record"].update(accountant="rdp"),
         "silos[0].cumulative.record.accountant"),
        (lambda r: r["silos"][0]["releases"][4].update(accountant="rdp"), "silos[0].releases[4].accountant"),
        (lambda r: r.update(extra=1), "extra"),
        (lambda r: r["silos"].reverse(), "silos"),
        (lambda r: r["silos"][0]["budget"].update(epsilon="400.0"), "silos[0].budget"),
    ],
)
def test_changed_report_fields_are_named(
    fed: Fed, report_text: str, tmp_path: Path, change: Any, field: str
) -> None:
    report = json.loads(report_text)
    change(report)
    path = tmp_path / "report.json"
    path.write_text(_dump(report), "ascii")
    with pytest.raises(AuditError, match=re.escape(field)) as info:
        verify_report(path, ca_pem=fed.ca)
    assert info.value.field == field


def test_a_report_from_before_pld_is_refused_saying_how_to_rebuild_it(report_text: str, tmp_path: Path) -> None:
    report = json.loads(report_text)
    report["format"] = "fedsilo-audit-report-v1"
    path = tmp_path / "report.json"
    path.write_text(_dump(report), "ascii")
    with pytest.raises(AuditError, match=r"made before PLD: rebuild it with `fedsilo audit report"):
        verify_report(path)


def test_reformatted_report_is_refused(fed: Fed, report_text: str, tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    for other in (
        report_text.rstrip("\n"),
        report_text + "\n",
        json.dumps(json.loads(report_text), sort_keys=True, indent=2) + "\n",
        report_text.replace('"generated_at": "', '"generated_at":  "'),
    ):
        path.write_text(other, "ascii")
        with pytest.raises(AuditError, match="exact form|not valid JSON"):
            verify_report(path, ca_pem=fed.ca)
    path.write_text("[]\n", "ascii")
    with pytest.raises(AuditError, match="not an audit report"):
        verify_report(path)
    with pytest.raises(AuditError, match="cannot read"):
        verify_report(tmp_path / "missing.json")


def test_wrong_ca_is_refused(
    fed: Fed, coordinator_report: tuple[Path, Path], tmp_path: Path
) -> None:
    json_path, _ = coordinator_report
    with pytest.raises(AuditError, match="not the CA you gave") as info:
        verify_report(json_path, ca_pem=fed.foreign_ca)
    assert info.value.field == "ca_certificate"
    with pytest.raises(AuditError, match="not a readable PEM certificate"):
        verify_report(json_path, ca_pem=b"not a certificate")
    # A report whose CA was swapped for another: the entries' certificates do not chain to it.
    report = json.loads(json_path.read_text("ascii"))
    report["ca_certificate"] = fed.foreign_ca.decode("ascii")
    report["ca_sha256"] = _ca_sha256(fed.foreign_ca)
    path = tmp_path / "report.json"
    path.write_text(_dump(report), "ascii")
    with pytest.raises(AuditError, match=rf"silo '{SILO_A}'.*seq 1\b.*not issued by"):
        verify_report(path)


def test_signed_but_wrong_epsilons_fail_verification(fed: Fed, tmp_path: Path) -> None:
    pld = {"governing": BudgetAccountant.PLD}
    cases = {
        "cumulative": ({"cumulative_error": 0.05}, "cumulative ε"),
        "release": ({"epsilon_error": 0.05}, "ε of this release"),
        "prv": ({"prv": 1.2}, "PRV ε"),
        "pld": ({**pld, "pld_error": 0.05}, "cumulative PLD ε"),
        "pld-missing": ({**pld, "omit_pld": True}, "no PLD ε of this release stated"),
    }
    for name, (error, label) in cases.items():
        state = tmp_path / name
        state.mkdir()
        (state / CA_FILE).write_bytes(fed.ca)
        with _open(state / LEDGER_FILE, fed.a) as book:
            spender = Spender(book)
            record = {"relation": Neighbouring.RECORD, "sigma": 1.1, "q": 0.02, "steps": 40}
            spender.spend(run="run-1", round_=1, **record)
            spender.spend(run="run-1", round_=2, **record, **error)  # seq 2: signed, wrong
            spender.spend(run="run-1", round_=3, cumulative_error=0.1, **record)
        json_path, _ = write_report(build_report(state), tmp_path / f"{name}-out")
        with pytest.raises(AuditError, match=rf"seq 2\b.*{label}") as info:
            verify_report(json_path, ca_pem=fed.ca)
        assert (info.value.silo, info.value.seq) == (SILO_A, 2)
        # a looser tolerance accepts the small errors, never a PRV ε above the RDP one
        if name in ("cumulative", "release"):
            assert verify_report(json_path, tolerance=0.2).max_epsilon_difference > 0.04
        if name == "pld":
            assert verify_report(json_path, tolerance=0.2).max_pld_difference > 0.04


def test_pld_far_below_prv_fails_the_cross_check(fed: Fed, tmp_path: Path) -> None:
    """A signed PLD figure consistent with nothing but itself: recomputation catches it first; with
    a tolerance loose enough to let it through, Opacus' PRV bound still does."""
    state = tmp_path / "agent"
    state.mkdir()
    (state / CA_FILE).write_bytes(fed.ca)
    with _open(state / LEDGER_FILE, fed.a) as book:
        Spender(book).spend(run="run-1", round_=1, relation=Neighbouring.RECORD, sigma=1.1, q=0.02, steps=400,
                            governing=BudgetAccountant.PLD, pld_error=-0.5)
    json_path, _ = write_report(build_report(state), tmp_path / "out")
    with pytest.raises(AuditError, match=r"seq 1\b.*cumulative PLD ε"):
        verify_report(json_path)
    with pytest.raises(AuditError, match=r"seq 1\b.*below Opacus' PRV upper bound"):
        verify_report(json_path, tolerance=1.0)


def test_tampered_sqlite_ledger_is_refused(fed: Fed, agent_state: Path, tmp_path: Path) -> None:
    state = tmp_path / "agent"
    shutil.copytree(agent_state, state)
    raw = sqlite3.connect(state / LEDGER_FILE)
    try:
        text = raw.execute("SELECT entry_json FROM entries WHERE seq = 3").fetchone()[0]
        raw.execute("DROP TRIGGER entries_append_only_update")
        raw.execute(
            "UPDATE entries SET entry_json = ? WHERE seq = 3",
            (text.replace('"round":2', '"round":7'),),
        )
        raw.commit()
    finally:
        raw.close()
    with pytest.raises(AuditError, match=rf"silo '{SILO_A}'.*seq 3\b.*signature") as info:
        build_report(state)
    assert (info.value.silo, info.value.seq) == (SILO_A, 3)


def test_tampered_or_foreign_budgets_are_refused(
    fed: Fed, agent_state: Path, coordinator_state: Path, tmp_path: Path
) -> None:
    state = tmp_path / "agent"
    shutil.copytree(agent_state, state)
    text = (state / BUDGET_FILE).read_text("ascii")
    (state / BUDGET_FILE).write_text(text.replace('"40.0"', '"400.0"'), "ascii")
    with pytest.raises(AuditError, match="budget statement.*signature") as info:
        build_report(state)
    assert info.value.silo == SILO_A
    save_budget(_budget(fed.b, 40.0), state / BUDGET_FILE)
    with pytest.raises(AuditError, match=f"belongs to silo '{SILO_B}', not to silo '{SILO_A}'"):
        build_report(state)

    coordinator = tmp_path / "coordinator"
    shutil.copytree(coordinator_state, coordinator)
    shutil.copy(coordinator / BUDGETS_DIR / f"{SILO_A}.json",
                coordinator / BUDGETS_DIR / f"{SILO_B}.json")
    with pytest.raises(AuditError, match=f"belongs to silo '{SILO_A}', not to silo '{SILO_B}'"):
        build_report(coordinator)


def test_state_dirs_without_privacy_records_or_ca_are_refused(
    fed: Fed, agent_state: Path, tmp_path: Path
) -> None:
    with pytest.raises(AuditError, match="does not exist"):
        build_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AuditError, match=f"neither.*{LEDGER_FILE}.*{MIRROR_FILE}"):
        build_report(tmp_path / "empty")
    state = tmp_path / "agent"
    shutil.copytree(agent_state, state)
    (state / CA_FILE).unlink()
    with pytest.raises(AuditError, match=CA_FILE):
        build_report(state)
    (state / CA_FILE).write_bytes(fed.foreign_ca)
    with pytest.raises(AuditError, match=rf"seq 1\b.*not issued by"):
        build_report(state)
    (state / CA_FILE).write_bytes(fed.ca)
    LedgerMirror.open(state / MIRROR_FILE).close()
    with pytest.raises(AuditError, match="both"):
        build_report(state)


def test_disclosures_are_carried_rendered_and_checked(fed: Fed, tmp_path: Path) -> None:
    """What the ledger does not account (ResFIM masks protected by encryption only, style banks) is
    stated in every report built from the state dir, in the HTML, and checked for shape by verify."""
    state = _agent_dir(tmp_path, fed)
    assert build_report(state)["disclosures"] == []
    items = resfim_disclosures(rho=0.1, recompute_every=5, beta=0.05, clusters=4)
    write_disclosures(state, items)
    report = build_report(state)
    assert report["disclosures"] == items
    assert any("protected by encryption only" in d["topic"] for d in items)
    assert any("top 0.1" in d["statement"] and "every 5 round" in d["statement"] for d in items)
    json_path, html_path = write_report(report, tmp_path / "out")
    verify_report(json_path, ca_pem=fed.ca)
    page = html_path.read_text("utf-8")
    assert "Disclosures not covered by the ledger" in page and "style banks" in page
    assert any(line.startswith("not in the ledger: ResFIM masks") for line in report_summary(report))
    for bad, field in (([{"topic": "x"}], "disclosures[0]"), ("text", "disclosures")):
        broken = json.loads(json_path.read_text("ascii"))
        broken["disclosures"] = bad
        path = tmp_path / "broken.json"
        path.write_text(_dump(broken), "ascii")
        with pytest.raises(AuditError, match=re.escape(field)):
            verify_report(path, ca_pem=fed.ca)
    with pytest.raises(AuditError, match="non-empty text"):
        write_disclosures(state, [{"topic": "", "statement": "s"}])
