"""Malformed config files: the CLI names the bad field and exits non-zero, before doing anything."""

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.coordinator.config import ConfigError
from fedsilo.cli.main import main
from fedsilo.silo_agent.config import load_agent_config

FED_OK = """
[run]
id = "study-1"
rounds = 3
min_silos = 1
aggregation = "plain"
[silos]
enrolled = ["hospital-a"]
[server]
listen = "127.0.0.1:0"
insecure = true
"""


@pytest.mark.parametrize(("text", "field"), [
    (FED_OK.replace("rounds = 3", "rounds = 0"), "run.rounds"),
    (FED_OK.replace("min_silos = 1", "min_silos = 5"), "run.min_silos"),
    (FED_OK.replace('id = "study-1"', 'id = "bad id!"'), "run.id"),
    (FED_OK.replace("[silos]", "[silos]\nextra = 1"), "silos.extra"),
    (FED_OK + "\n[bogus]\n", "bogus"),
    (FED_OK.replace('listen = "127.0.0.1:0"', 'listen = "nowhere"'), "server.listen"),
    (FED_OK.replace("insecure = true", "insecure = false"), "server.ca"),
    (FED_OK.replace("[run]", "[run]\nstrategy = \"fedsgd\""), "run.strategy"),
    (FED_OK.replace('aggregation = "plain"', 'aggregation = "he"'), "run.aggregation"),
    (FED_OK.replace('enrolled = ["hospital-a"]', 'enrolled = ["Hospital A"]'), "silos.enrolled"),
    (FED_OK.replace("rounds = 3", "rounds = "), "not valid TOML"),
    (FED_OK + "\n[privacy]\nsilo_level = true\nupdate_clip_norm = 1.0\nupdate_noise_multiplier = 1.0\n",
     "privacy: differential privacy needs TLS"),
    (FED_OK + "\n[privacy]\nrecord_level = true\nsample_rate = 0.1\nsteps_per_round = 2\nmax_grad_norm = 1\n"
     "target_epsilon = 0.0\n", "privacy.target_epsilon"),
])
def test_coordinator_rejects_bad_config(tmp_path: Path, text: str, field: str) -> None:
    cfg = tmp_path / "federation.toml"
    cfg.write_text(text)
    result = CliRunner().invoke(main, ["coordinator", "--config", str(cfg)])
    assert result.exit_code == 2, result.output
    assert field in result.output
    assert not (tmp_path / "coordinator-state").exists(), "a bad config must not create state"


AGENT_OK = """
[agent]
coordinator = "localhost:50051"
state_dir = "state"
insecure = true
name = "hospital-a"
[data]
source = "builtin"
domain = 0
"""


@pytest.mark.parametrize(("text", "field"), [
    (AGENT_OK.replace('coordinator = "localhost:50051"', 'coordinator = "localhost"'), "agent.coordinator"),
    (AGENT_OK.replace("insecure = true", "insecure = false"), "tls.ca"),
    (AGENT_OK.replace('source = "builtin"', 'source = "cloud"'), "data.source"),
    (AGENT_OK.replace("domain = 0", "domain = -1"), "data.domain"),
    (AGENT_OK.replace('name = "hospital-a"', 'name = "A B"'), "agent.name"),
    (AGENT_OK + "\n[tls]\nca = \"missing.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n", "tls.ca"),
    (AGENT_OK.replace("[data]", "[agent2]"), "agent2"),
    (AGENT_OK + "\n[privacy]\nepsilon = 0.0\n", "privacy.epsilon"),
    (AGENT_OK + "\n[privacy]\nepsilon = -2.0\n", "privacy.epsilon"),
    (AGENT_OK + "\n[privacy]\nepsilon = inf\n", "privacy.epsilon"),
    (AGENT_OK + "\n[privacy]\nepsilon = 3.0\ndelta = 1.0\n", "privacy.delta"),
    (AGENT_OK + "\n[privacy]\nepsilon = 3.0\ndelta = 0\n", "privacy.delta"),
    (AGENT_OK + "\n[privacy]\ndelta = 1e-5\n", "privacy.epsilon"),
    (AGENT_OK + "\n[privacy]\nepsilon = 3.0\nsigma = 1\n", "privacy.sigma"),
])
def test_agent_rejects_bad_config(tmp_path: Path, text: str, field: str) -> None:
    cfg = tmp_path / "silo.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_agent_config(cfg)
    result = CliRunner().invoke(main, ["agent", "--config", str(cfg), "--insecure"])
    assert result.exit_code == 2, result.output
    assert field in result.output
    assert not (tmp_path / "state").exists()


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedsilo", "coordinator", "--config",
                           str(tmp_path / "nope.toml")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no such config file" in proc.stderr


def test_certs_issue_needs_exactly_one_role(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["certs", "init", "--dir", str(tmp_path)]).exit_code == 0
    result = runner.invoke(main, ["certs", "issue", "--dir", str(tmp_path), "--silo", "a", "--admin", "b"])
    assert result.exit_code == 2 and "exactly one" in result.output
    result = runner.invoke(main, ["certs", "issue", "--dir", str(tmp_path), "--silo", "Bad Name"])
    assert result.exit_code == 2 and "Bad Name" in result.output
    ok = runner.invoke(main, ["certs", "issue", "--dir", str(tmp_path), "--coordinator", "localhost"])
    assert ok.exit_code == 0 and (tmp_path / "coordinator.pem").is_file()
    again = runner.invoke(main, ["certs", "init", "--dir", str(tmp_path)])
    assert again.exit_code == 2, "re-initialising the CA must be refused without --overwrite"


def test_insecure_needs_the_flag_and_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "federation.toml"
    cfg.write_text(FED_OK)
    result = CliRunner().invoke(main, ["coordinator", "--config", str(cfg)])
    assert result.exit_code == 2 and "--insecure" in result.output
    agent_cfg = tmp_path / "silo.toml"
    agent_cfg.write_text(AGENT_OK)
    result = CliRunner().invoke(main, ["agent", "--config", str(agent_cfg)])
    assert result.exit_code == 2 and "--insecure" in result.output
    assert not (tmp_path / "coordinator-state").exists() and not (tmp_path / "state").exists()
