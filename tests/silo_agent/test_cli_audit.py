"""``fedsilo audit report`` and ``fedsilo audit verify``: exit codes and what they print."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.privacy import accounting, pki
from fedsilo.privacy.accounting import LEDGER_RDP_ORDERS, DpAccountingVerifier, Release
from fedsilo.privacy.budget import BUDGET_FILE, CA_FILE, LEDGER_FILE, save_budget, sign_budget
from fedsilo.privacy.ledger import Ledger, Mechanism, Neighbouring
from fedsilo.privacy.pki import Role
from fedsilo.cli.main import main

SILO = "hospital-a"
DELTA = 1e-5


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An agent state directory: CA, a two-entry record-level ledger, a signed budget."""
    root = tmp_path_factory.mktemp("cli-audit")
    ca = pki.init_ca(root / "ca")
    pki.init_ca(root / "foreign")
    issued = pki.issue_certificate(root / "ca", root / "certs", role=Role.SILO, name=SILO)
    cert, key = issued.cert.read_bytes(), issued.key.read_bytes()
    state = root / "agent"
    state.mkdir()
    (state / CA_FILE).write_bytes(ca.cert.read_bytes())
    accountant = DpAccountingVerifier(orders=LEDGER_RDP_ORDERS)
    release = Release(
        mechanism=accounting.Mechanism.SUBSAMPLED_GAUSSIAN,
        neighbouring=accounting.Neighbouring.RECORD,
        noise_multiplier=1.0,
        sample_rate=0.05,
        steps=20,
    )
    alone = accountant.epsilon([release], delta=DELTA)
    with Ledger.open(state / LEDGER_FILE, silo=SILO, certificate_pem=cert,
                     private_key_pem=key) as book:
        for round_ in (1, 2):
            book.append(
                run_id="run-1", round=round_, upload_index=0,
                mechanism=Mechanism.SUBSAMPLED_GAUSSIAN, neighbouring=Neighbouring.RECORD,
                noise_multiplier=1.0, sample_rate=0.05, steps=20, clip_norm=1.0, delta=DELTA,
                epsilon_rdp=alone.epsilon, rdp_order=alone.order,
                cumulative_epsilon=accountant.epsilon([release] * round_, delta=DELTA).epsilon,
            )
    budget = sign_budget(silo=SILO, epsilon=10.0, delta=DELTA, certificate_pem=cert,
                         private_key_pem=key)
    save_budget(budget, state / BUDGET_FILE)
    return state


@pytest.fixture(scope="module")
def report(state: Path) -> Path:
    result = CliRunner().invoke(main, ["audit", "report", "--state", str(state), "--out",
                                       str(state.parent / "out")])
    assert result.exit_code == 0, result.output
    return state.parent / "out" / "report.json"


def test_report_prints_paths_and_a_summary(state: Path, report: Path) -> None:
    out = state.parent / "again"
    result = CliRunner().invoke(main, ["audit", "report", "--state", str(state), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out / "report.json") in result.output
    assert str(out / "report.html") in result.output
    cumulative = json.loads(report.read_text())["silos"][0]["cumulative"]["record"]
    left = 10.0 - cumulative["single_upload"]
    assert f"{SILO}: record-level ε {cumulative['single_upload']:.4g}" in result.output
    assert f"budget left {left:.4g}" in result.output


def test_verify_prints_counts_and_the_ca_fingerprint(state: Path, report: Path) -> None:
    sha = json.loads(report.read_text())["ca_sha256"]
    result = CliRunner().invoke(main, ["audit", "verify", str(report)])
    assert result.exit_code == 0, result.output
    assert "verified: 1 silos, 2 entries; every ε recomputed with dp_accounting: RDP largest difference" in result.output
    assert sha in result.output and "taken from the report itself" in result.output
    result = CliRunner().invoke(main, ["audit", "verify", str(report), "--ca",
                                       str(state / CA_FILE)])
    assert result.exit_code == 0, result.output
    assert f"CA SHA-256: {sha} (the CA given with --ca)" in result.output


def test_tampered_report_exits_1_naming_the_entry(report: Path, tmp_path: Path) -> None:
    text = report.read_text()
    second = text.index('"seq": 2')
    start = text.rindex('"round": 2', 0, second)
    tampered = tmp_path / "report.json"
    tampered.write_text(text[:start] + '"round": 3' + text[start + len('"round": 2'):])
    result = CliRunner().invoke(main, ["audit", "verify", str(tampered)])
    assert result.exit_code == 1
    assert "seq 2" in result.stderr and SILO in result.stderr
    assert "verified" not in result.output


def test_wrong_ca_exits_1(report: Path, state: Path) -> None:
    foreign = state.parent / "foreign" / "ca.pem"
    result = CliRunner().invoke(main, ["audit", "verify", str(report), "--ca", str(foreign)])
    assert result.exit_code == 1
    assert "not the CA you gave" in result.stderr


def test_missing_or_unsuitable_state_dir_fails_with_a_message(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["audit", "report", "--state", str(tmp_path / "nope"),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    result = CliRunner().invoke(main, ["audit", "report", "--state", str(tmp_path),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert LEDGER_FILE in result.stderr and "neither" in result.stderr
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["audit", "verify", str(tmp_path / "missing.json")])
    assert result.exit_code == 2


def test_audit_needs_no_torch() -> None:
    code = (
        "import sys; import fedsilo.cli.main, fedsilo.privacy.audit; "
        "assert 'torch' not in sys.modules and 'opacus' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
