"""The ``[metrics]`` table of silo.toml: off when absent, every bad value named with a non-zero exit and no state,
and a metrics address that cannot be bound stops ``fedsilo agent`` before it dials the coordinator."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.cli.main import main
from fedsilo.core.configfile import ConfigError
from fedsilo.core.metrics_endpoint import MetricsConfig
from fedsilo.silo_agent.config import AgentConfig, load_agent_config

AGENT = """
[agent]
coordinator = "localhost:1"
state_dir = "state"
insecure = true
name = "hospital-a"
"""


def test_the_agent_endpoint_is_off_unless_configured(tmp_path: Path) -> None:
    path = tmp_path / "silo.toml"
    path.write_text(AGENT)
    assert load_agent_config(path).metrics is None
    path.write_text(AGENT + '[metrics]\nlisten = "[::1]:9465"\n')
    cfg = load_agent_config(path).metrics
    assert cfg == MetricsConfig(listen="[::1]:9465") and cfg.loopback and cfg.port == 9465


@pytest.mark.parametrize(("table", "message"), [
    ('[metrics]\nlisten = "127.0.0.1:65536"\n', "metrics.listen: port 65536 of '127.0.0.1:65536' is out of range"),
    ('[metrics]\nlisten = "localhost"\n', "metrics.listen: 'localhost' must be host:port"),
    ("[metrics]\nlisten = true\n", "metrics.listen: True must be host:port"),
    ("[metrics]\n", "metrics.listen: missing"),
    ('[metrics]\nlisten = "127.0.0.1:9465"\nhost = "x"\n', "metrics.host: unknown key"),
    ('metrics = "127.0.0.1:9465"\n', "[metrics] must be a table"),
])
def test_bad_agent_metrics_exit_nonzero_and_create_no_state(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "silo.toml"
    path.write_text(table + AGENT if not table.startswith("[") else AGENT + table)
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert message in str(err.value), err.value
    result = CliRunner().invoke(main, ["agent", "--config", str(path), "--insecure"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "state").exists()


def test_metrics_must_be_a_metrics_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="metrics: 9465 is not a MetricsConfig"):
        AgentConfig(coordinator="localhost:1", state_dir=tmp_path, insecure=True, name="hospital-a", metrics=9465)


def test_a_taken_metrics_port_stops_the_agent_before_it_dials(tmp_path: Path, fedsilo_logger: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "silo.toml"
        path.write_text(AGENT + f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        result = CliRunner().invoke(main, ["agent", "--config", str(path), "--insecure"])
    assert result.exit_code == 1, result.output
    assert f"cannot start the agent: metrics.listen = '127.0.0.1:{port}': cannot serve metrics there" in result.output
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["agent.log"]  # no agent state, no ledger
