"""The ``[metrics]`` table of federation.toml and ``MetricsConfig``: off when absent, every bad value named, and a
metrics address that cannot be bound fails the coordinator's start, naming it."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fedsilo.cli.main import main
from fedsilo.coordinator.config import AggregationMode, ConfigError, FederationConfig, TlsFiles
from fedsilo.coordinator.loading import load_federation_config
from fedsilo.coordinator.server import CoordinatorServer
from fedsilo.core.metrics_endpoint import MetricsConfig

FED = """
[run]
id = "study-1"
rounds = 3
min_silos = 1
aggregation = "plain"
[silos]
enrolled = ["hospital-a"]
[server]
listen = "127.0.0.1:50051"
insecure = true
"""


@pytest.mark.parametrize(("listen", "host", "port", "loopback"), [
    ("127.0.0.1:9464", "127.0.0.1", 9464, True),
    ("localhost:0", "localhost", 0, True),
    ("[::1]:9464", "::1", 9464, True),
    ("0.0.0.0:9464", "0.0.0.0", 9464, False),
    ("10.1.2.3:65535", "10.1.2.3", 65535, False),
    ("metrics.hospital.example:9464", "metrics.hospital.example", 9464, False),
])
def test_metrics_addresses(listen: str, host: str, port: int, loopback: bool) -> None:
    cfg = MetricsConfig(listen=listen)
    assert (cfg.host, cfg.port, cfg.loopback) == (host, port, loopback)


@pytest.mark.parametrize(("listen", "message"), [
    ("9464", "'9464' must be host:port"),
    (":9464", "':9464' must be host:port"),
    ("::1:9464", "'::1:9464' must be host:port"),
    ("[]:9464", "'[]:9464' must be host:port"),
    ("metrics host:9464", "'metrics host:9464' must be host:port"),
    ("127.0.0.1:", "port '' of '127.0.0.1:' is not a number in 0..65535"),
    ("127.0.0.1:-1", "port '-1' of '127.0.0.1:-1' is not a number"),
    ("127.0.0.1:http", "port 'http' of '127.0.0.1:http' is not a number"),
    ("127.0.0.1:70000", "port 70000 of '127.0.0.1:70000' is out of range 0..65535"),
    ("127.0.0.1:65536", "port 65536 of '127.0.0.1:65536' is out of range 0..65535"),
    ("127.0.0.1:123456", "port '123456' of '127.0.0.1:123456' is not a number"),
    (9464, "9464 must be host:port"),
])
def test_bad_metrics_addresses_are_named(listen: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        MetricsConfig(listen=listen)
    assert str(err.value).startswith("metrics.listen: ") and message in str(err.value), err.value


def test_the_endpoint_is_off_unless_configured(tmp_path: Path) -> None:
    path = tmp_path / "federation.toml"
    path.write_text(FED)
    assert load_federation_config(path).metrics is None
    path.write_text(FED + '[metrics]\nlisten = "127.0.0.1:9464"\n')
    assert load_federation_config(path).metrics == MetricsConfig(listen="127.0.0.1:9464")


@pytest.mark.parametrize(("table", "message"), [
    ('[metrics]\nlisten = "127.0.0.1:99999"\n', "metrics.listen: port 99999 of '127.0.0.1:99999' is out of range"),
    ("[metrics]\nlisten = 9464\n", "metrics.listen: 9464 must be host:port"),
    ("[metrics]\n", "metrics.listen: missing"),
    ('[metrics]\nlisten = "127.0.0.1:9464"\nport = 9464\n', "metrics.port: unknown key"),
    ('[metrics]\nlisten = "127.0.0.1:50051"\n', "metrics.listen: '127.0.0.1:50051' takes server.listen's port"),
    ('[metrics]\nlisten = "0.0.0.0:50051"\n', "metrics.listen: '0.0.0.0:50051' takes server.listen's port"),
])
def test_bad_metrics_tables_exit_nonzero_and_create_no_state(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "federation.toml"
    path.write_text(FED + table)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_federation_config(path)
    result = CliRunner().invoke(main, ["coordinator", "--config", str(path), "--insecure"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "coordinator-state").exists(), "a bad config must not create state"


def test_metrics_must_be_a_metrics_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="metrics: '127.0.0.1:9464' is not a MetricsConfig"):
        FederationConfig(run_id="r", silos=("hospital-a",), rounds=1, min_silos=1, insecure=True,
                         aggregation=AggregationMode.PLAIN, metrics="127.0.0.1:9464")


def test_a_taken_metrics_port_fails_the_start_naming_it(certs: Any, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = FederationConfig(
            run_id="r", silos=("hospital-a",), rounds=1, min_silos=1, listen="127.0.0.1:0",
            aggregation=AggregationMode.PLAIN, state_dir=tmp_path / "state",
            metrics=MetricsConfig(listen=f"127.0.0.1:{port}"),
            tls=TlsFiles(ca=certs.ca, cert=certs.coordinator.cert, key=certs.coordinator.key))
        server = CoordinatorServer(cfg)
        try:
            with pytest.raises(OSError, match=rf"metrics\.listen = '127\.0\.0\.1:{port}': cannot serve metrics"):
                server.start()
        finally:
            server.coordinator.close()
