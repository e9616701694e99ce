"""``fedsilo audit empirical``: exit codes, the recorded result, and its section in ``audit report``/``verify``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.cli.main import main
from fedsilo.privacy import pki
from fedsilo.privacy.audit import AuditError, build_report, verify_report, write_report
from fedsilo.privacy.audit.empirical import EMPIRICAL_FILE, EMPIRICAL_KEY
from fedsilo.privacy.budget import CA_FILE, LEDGER_FILE
from fedsilo.privacy.ledger import Ledger
from fedsilo.privacy.pki import Role
from fedsilo.silo_agent.empirical import FAULT_ENV

pytestmark = pytest.mark.filterwarnings("ignore:TESTING FAULT ON:RuntimeWarning")

FAST = ["--steps", "10", "--sample-rate", "1", "--records", "300", "--canaries", "400", "--seed", "5"]


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An agent state directory with the CA and an empty ledger, plus one honest and one faulty audit."""
    root = tmp_path_factory.mktemp("empirical")
    ca = pki.init_ca(root / "ca")
    issued = pki.issue_certificate(root / "ca", root / "certs", role=Role.SILO, name="hospital-a")
    state = root / "agent"
    state.mkdir()
    (state / CA_FILE).write_bytes(ca.cert.read_bytes())
    with Ledger.open(state / LEDGER_FILE, silo="hospital-a", certificate_pem=issued.cert.read_bytes(),
                     private_key_pem=issued.key.read_bytes()):
        pass
    runner = CliRunner()
    honest = runner.invoke(main, ["audit", "empirical", "--noise-multiplier", "3", *FAST, "--out", str(state)])
    assert honest.exit_code == 0, honest.output
    faulty = runner.invoke(main, ["audit", "empirical", "--noise-multiplier", "8", *FAST, "--out", str(state)],
                           env={FAULT_ENV: "break-dp:0.01"})
    assert faulty.exit_code == 1, faulty.output
    return state


def _audits(state: Path) -> list[dict]:
    return json.loads((state / EMPIRICAL_FILE).read_text())["audits"]


def test_honest_run_passes_and_prints_the_table(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["audit", "empirical", "--noise-multiplier", "3", *FAST])
    assert result.exit_code == 0, result.output
    assert "ε̂ (lower)" in result.output and "ledger ε" in result.output
    assert "consistent with the claim" in result.output
    assert "membership inference, audited-silo: AUROC" in result.output


def test_faulty_run_fails_naming_the_excess(state: Path) -> None:
    result = CliRunner().invoke(main, ["audit", "empirical", "--noise-multiplier", "8", *FAST],
                                env={FAULT_ENV: "break-dp:0"})
    assert result.exit_code == 1
    assert "TESTING FAULT" in result.output
    assert "exceeds the ledger's ε" in result.output
    honest, faulty = _audits(state)
    assert not honest["exceeds_ledger"] and honest["noise_scale_actual"] == 1.0
    assert faulty["exceeds_ledger"] and faulty["noise_scale_actual"] == 0.01
    assert faulty["epsilon_lower"] > faulty["ledger_epsilon"]


def test_silo_level_from_the_command_line() -> None:
    result = CliRunner().invoke(main, ["audit", "empirical", "--level", "silo", "--noise-multiplier", "4",
                                       "--steps", "5", "--records", "100", "--canaries", "200", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "silo-level" in result.output and "membership inference, silo-3" in result.output


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--noise-multiplier", "-1"], {}, "invalid noise_multiplier -1.0"),
        (["--noise-multiplier", "1", "--level", "silo", "--mode", "black-box"], {}, "invalid mode 'black_box'"),
        (["--noise-multiplier", "1", "--level", "silo", "--sample-rate", "0.5"], {}, "at silo level"),
        (["--noise-multiplier", "1", "--canaries", "2"], {}, "invalid canaries 2"),
        (["--noise-multiplier", "1", "--delta", "0"], {}, "invalid delta 0.0"),
        (["--noise-multiplier", "1", *FAST], {FAULT_ENV: "0.5"}, FAULT_ENV),
    ],
)
def test_bad_input_exits_2_with_a_message(args: list[str], env: dict, message: str) -> None:
    result = CliRunner().invoke(main, ["audit", "empirical", *args], env=env)
    assert result.exit_code == 2
    assert message in result.output


def test_report_carries_renders_and_verifies_the_section(state: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["audit", "report", "--state", str(state), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report[EMPIRICAL_KEY] == _audits(state)
    html = (tmp_path / "report.html").read_text()
    assert "Empirical privacy audits" in html and "TESTING FAULT: noise x0.01" in html and "EXCEEDS" in html
    verified = CliRunner().invoke(main, ["audit", "verify", str(tmp_path / "report.json")])
    assert verified.exit_code == 0, verified.output


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("correct", 0, "epsilon_lower"),
        ("epsilon_lower", 0.5, "epsilon_lower is 0.5"),
        ("exceeds_ledger", False, "exceeds_ledger"),
        ("ledger_epsilon", 0.1, "dp_accounting"),
        ("ledger_epsilon_pld", 0.1, "dp_accounting's PLD"),
        ("mode", "grey_box", "mode is 'grey_box'"),
        ("guesses", 10**6, "counts do not add up"),
    ],
)
def test_verify_recomputes_the_section(state: Path, tmp_path: Path, field: str, value: object,
                                       message: str) -> None:
    report = build_report(state)
    report[EMPIRICAL_KEY][1][field] = value
    if field in ("ledger_epsilon", "ledger_epsilon_pld"):  # keep exceeds_ledger consistent so the ε
        report[EMPIRICAL_KEY][1]["exceeds_ledger"] = report[EMPIRICAL_KEY][1]["epsilon_lower"] > value  # recomputation fails
    json_path, _ = write_report(report, tmp_path)
    with pytest.raises(AuditError, match=message):
        verify_report(json_path)


def test_reports_without_audits_have_no_section(state: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(state, bare)
    (bare / EMPIRICAL_FILE).unlink()
    assert EMPIRICAL_KEY not in build_report(bare)


def test_damaged_audit_file_is_refused(state: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(state, broken)
    (broken / EMPIRICAL_FILE).write_text('{"format": "something-else", "audits": []}')
    with pytest.raises(AuditError, match="fedsilo-empirical-audit-v1"):
        build_report(broken)
