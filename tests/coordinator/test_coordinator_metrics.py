"""The coordinator's metrics endpoint over real gRPC with mutual TLS: refusals counted by RPC, code and reason,
and no caller-chosen name (an unserved method path, a silo the run does not enrol) ever becomes a label value."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedsilo.coordinator.config import AggregationMode, FederationConfig, TlsFiles
from fedsilo.coordinator.records import RunState
from fedsilo.coordinator.rpc_metrics import REFUSAL_REASONS, RPC_METHODS
from fedsilo.coordinator.server import CoordinatorServer
from fedsilo.core.metrics_endpoint import MetricsConfig
from fedsilo.privacy.ledger import Neighbouring
from fedsilo.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc

#: The run's enrolled silos (the ``certs`` fixture also issues hospital-x, valid but enrolled nowhere).
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
HOSTILE = 'evil"} 1\nfedsilo_coordinator_rounds_closed_total 999'


def _config(certs: Any, state: Path, *, metrics: str = "127.0.0.1:0") -> FederationConfig:
    return FederationConfig(
        run_id="metrics", silos=HOSPITALS, rounds=2, min_silos=2, listen="127.0.0.1:0",
        aggregation=AggregationMode.PLAIN, state_dir=state, metrics=MetricsConfig(listen=metrics),
        tls=TlsFiles(ca=certs.ca, cert=certs.coordinator.cert, key=certs.coordinator.key))


@pytest.fixture
def server(certs: Any, tmp_path: Path) -> Iterator[CoordinatorServer]:
    s = CoordinatorServer(_config(certs, tmp_path / "state"))
    s.start()
    try:
        yield s
    finally:
        s.stop(0)


def _channel(certs: Any, server: CoordinatorServer, who: str) -> grpc.Channel:
    issued = certs.admin if who == "admin" else certs.silo[who]
    creds = grpc.ssl_channel_credentials(certs.ca.read_bytes(), issued.key.read_bytes(), issued.cert.read_bytes())
    return grpc.secure_channel(f"localhost:{server.port}", creds, options=[("grpc.use_local_subchannel_pool", 1)])


def _refused(call, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() is code, err.value


def test_refused_calls_are_counted_with_their_code_and_reason(certs: Any, server: CoordinatorServer,
                                                               scrape) -> None:
    before = scrape(server.metrics.port)
    assert not before.series("fedsilo_coordinator_refusals_total")
    with _channel(certs, server, "hospital-a") as ch:
        # a silo calling an admin RPC
        _refused(lambda: admin_pb2_grpc.AdminStub(ch).GetStatus(admin_pb2.GetStatusRequest(), timeout=10),
                 grpc.StatusCode.PERMISSION_DENIED)
        # an enrolled silo that has not joined: a heartbeat (and an upload for a round) is out of turn
        stub = federation_pb2_grpc.FederationStub(ch)
        _refused(lambda: stub.Heartbeat(federation_pb2.HeartbeatRequest(round=7), timeout=10),
                 grpc.StatusCode.FAILED_PRECONDITION)
        _refused(lambda: stub.Heartbeat(federation_pb2.HeartbeatRequest(round=7), timeout=10),
                 grpc.StatusCode.FAILED_PRECONDITION)
        assert stub.GetRun(federation_pb2.GetRunRequest(), timeout=10).run_id == "metrics"
    after = scrape(server.metrics.port)
    assert after.series("fedsilo_coordinator_refusals_total") == {
        (("code", "PERMISSION_DENIED"), ("method", "Admin/GetStatus"), ("reason", "PermissionDenied")): 1.0,
        (("code", "FAILED_PRECONDITION"), ("method", "Federation/Heartbeat"), ("reason", "FailedPrecondition")): 2.0,
    }
    count = "fedsilo_coordinator_rpc_duration_seconds_count"
    assert after.value(count, method="Admin/GetStatus", code="PERMISSION_DENIED") == 1
    assert after.value(count, method="Federation/Heartbeat", code="FAILED_PRECONDITION") == 2
    assert after.value(count, method="Federation/GetRun", code="OK") == 1
    assert after.value("fedsilo_coordinator_rpc_duration_seconds_bucket", method="Federation/Heartbeat",
                       code="FAILED_PRECONDITION", le="+Inf") == 2
    assert after.value("fedsilo_coordinator_joined_silos") == 0  # refusals changed nothing
    assert after.value("fedsilo_coordinator_rounds_opened_total") == 0


def test_caller_chosen_names_never_become_label_values(certs: Any, server: CoordinatorServer, scrape) -> None:
    with _channel(certs, server, "hospital-x") as ch:  # CA-valid, but not enrolled
        unserved = ch.unary_unary(f"/fedsilo.v1.Federation/{HOSTILE}", request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
        _refused(lambda: unserved(b"\x00", timeout=10), grpc.StatusCode.UNIMPLEMENTED)
        _refused(lambda: federation_pb2_grpc.FederationStub(ch).GetRun(federation_pb2.GetRunRequest(), timeout=10),
                 grpc.StatusCode.PERMISSION_DENIED)
    with _channel(certs, server, "admin") as ch:
        assert admin_pb2_grpc.AdminStub(ch).GetStatus(admin_pb2.GetStatusRequest(), timeout=10).run_id == "metrics"
    got = scrape(server.metrics.port)
    assert got.value("fedsilo_coordinator_unknown_method_calls_total") == 1
    assert got.value("fedsilo_coordinator_refusals_total", method="Federation/GetRun", code="PERMISSION_DENIED",
                     reason="PermissionDenied") == 1
    assert "evil" not in got.text and "hospital-x" not in got.text
    assert got.value("fedsilo_coordinator_rounds_closed_total") == 0
    allowed = {
        "silo": set(HOSPITALS),
        "relation": {r.value for r in Neighbouring},
        "method": set(RPC_METHODS.values()),
        "code": {c.name for c in grpc.StatusCode},
        "reason": set(REFUSAL_REASONS.values()),
        "state": {s.value for s in RunState},
    }
    values = got.label_values()
    assert values.keys() - {"le"} <= allowed.keys()
    for label, seen in values.items():
        if label != "le":
            assert seen <= allowed[label], (label, seen - allowed[label])
    assert values["silo"] == set(HOSPITALS)  # every enrolled silo, no other name


def test_stop_frees_the_metrics_port(certs: Any, tmp_path: Path, scrape) -> None:
    server = CoordinatorServer(_config(certs, tmp_path / "state"))
    server.start()
    port = server.metrics.port
    try:
        assert scrape(port).value("fedsilo_coordinator_enrolled_silos") == len(HOSPITALS)
    finally:
        server.stop(0)
    with pytest.raises(OSError):
        scrape(port)


def test_a_metrics_endpoint_off_loopback_is_warned(certs: Any, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    server = CoordinatorServer(_config(certs, tmp_path / "state", metrics="0.0.0.0:0"))
    with caplog.at_level(logging.WARNING, logger="fedsilo.coordinator"):
        server.start()
    server.stop(0)
    warned = [r.getMessage() for r in caplog.records if "metrics.listen" in r.getMessage()]
    assert warned and "'0.0.0.0:0' is not a loopback address" in warned[0], caplog.text
    assert "ε" in warned[0]
