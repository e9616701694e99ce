"""The in-process transport: a real ``Coordinator`` behind the deployed servicers, called as the
holder of a certificate, with every message serialised and parsed again and every refusal raised
as a ``grpc.RpcError`` carrying the status a gRPC client would have received."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedsilo.coordinator.loading import load_federation_config
from fedsilo.coordinator.run import Coordinator
from fedsilo.core.tensors import Manifest
from fedsilo.privacy.pki import Role, issue_certificate
from fedsilo.silo_agent.client import CoordinatorClient, Credentials
from fedsilo.privacy.upload_statement import statement_signer
from fedsilo.silo_agent.demo import ADMIN_NAME, make_certs, write_configs
from fedsilo.silo_agent.inprocess import InProcessCoordinator, InProcessRpcError

SILOS = ["hospital-a", "hospital-b", "hospital-c"]
FINGERPRINT = "5e" * 32
#: A two-tensor "model": the coordinator never looks inside, it only checks the manifest.
ARRAYS = {"layer.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "layer.bias": np.ones(5, np.float32)}


@dataclass(frozen=True, kw_only=True)
class Federation:
    certs: Path
    coordinator: Coordinator
    served: InProcessCoordinator

    def creds(self, name: str) -> Credentials:
        return Credentials(ca=self.certs / "ca.pem", cert=self.certs / f"{name}.pem", key=self.certs / f"{name}.key")

    def client(self, name: str) -> CoordinatorClient:
        return self.served.client(self.creds(name))


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Federation]:
    certs = tmp_path / "certs"
    make_certs(certs, SILOS)
    fed_path, _agents = write_configs(tmp_path, names=SILOS, rounds=1, strategy="fedavg", seed=0, port=1,
                                      insecure=False, aggregation="plain",
                                      pin_model=False)  # these silos join with a made-up model (FINGERPRINT)
    coordinator = Coordinator(load_federation_config(fed_path))
    try:
        yield Federation(certs=certs, coordinator=coordinator, served=InProcessCoordinator(coordinator))
    finally:
        coordinator.close()


def _join(client: CoordinatorClient) -> str:
    return client.join(fingerprint=FINGERPRINT, num_train_examples=10, manifest=Manifest.of_arrays(ARRAYS),
                       agent_version="test")


def _refused(err: pytest.ExceptionInfo[grpc.RpcError], code: grpc.StatusCode, *fragments: str) -> None:
    assert err.value.code() is code, err.value
    details = err.value.details()
    assert isinstance(details, str) and details.strip()
    for f in fragments:
        assert f in details, details


# -- identity ---------------------------------------------------------------------------------------
def test_silo_certificate_gets_the_run(fed: Federation) -> None:
    info = fed.client("hospital-b").get_run()
    assert info.run_id == "demo-0"
    assert info.strategy == "fedavg"
    assert info.total_rounds == 1
    assert info.aggregation.value == "plain"


def test_join_returns_the_name_in_the_certificate(fed: Federation) -> None:
    assert _join(fed.client("hospital-c")) == "hospital-c"
    joined = {s["name"]: s["joined"] for s in fed.client(ADMIN_NAME).status()["silos"]}
    assert joined == {"hospital-a": False, "hospital-b": False, "hospital-c": True}


def test_admin_certificate_may_call_status(fed: Federation) -> None:
    status = fed.client(ADMIN_NAME).status()
    assert status["run_id"] == "demo-0"
    assert status["total_rounds"] == 1
    assert sorted(s["name"] for s in status["silos"]) == SILOS


def test_silo_certificate_calling_status_is_permission_denied(fed: Federation) -> None:
    with pytest.raises(grpc.RpcError) as err:
        fed.client("hospital-a").status()
    _refused(err, grpc.StatusCode.PERMISSION_DENIED, "admin")


def test_admin_certificate_is_not_a_silo(fed: Federation) -> None:
    with pytest.raises(grpc.RpcError) as err:
        fed.client(ADMIN_NAME).get_run()
    _refused(err, grpc.StatusCode.PERMISSION_DENIED)


def test_silo_not_enrolled_is_refused(fed: Federation) -> None:
    # The in-process transport reads the caller's identity from the certificate but does not verify
    # its chain: that is TLS's job in a deployment (a certificate from another CA never gets past
    # the handshake there). So only what the coordinator itself decides is tested here: a
    # CA-valid silo certificate whose name is not enrolled in the run.
    issue_certificate(fed.certs, fed.certs, role=Role.SILO, name="hospital-x")
    client = fed.client("hospital-x")
    with pytest.raises(grpc.RpcError) as err:
        client.get_run()
    _refused(err, grpc.StatusCode.PERMISSION_DENIED, "hospital-x")
    with pytest.raises(grpc.RpcError) as err:
        _join(client)
    _refused(err, grpc.StatusCode.PERMISSION_DENIED, "hospital-x")
    status = fed.client(ADMIN_NAME).status()
    assert "hospital-x" not in {s["name"] for s in status["silos"]}
    assert not any(s["joined"] for s in status["silos"])


# -- messages through serialisation ----------------------------------------------------------------
def _close_round_one(fed: Federation) -> None:
    """Every silo joins and uploads: the plain FedAvg round 1 closes."""
    clients = {n: fed.client(n) for n in SILOS}
    for c in clients.values():
        _join(c)
    for i, (name, c) in enumerate(clients.items(), start=1):
        sign = statement_signer(run_id="demo-0", silo=name, certificate_pem=(fed.certs / f"{name}.pem").read_bytes(),
                                private_key_pem=(fed.certs / f"{name}.key").read_bytes())
        assert c.submit(1, 10.0, ARRAYS, sign) == i
    [summary] = fed.coordinator.round_summaries()
    assert summary.closed and sorted(summary.contributors) == SILOS
    assert summary.metrics == {}


def test_nan_metric_is_invalid_argument_and_stores_nothing(fed: Federation) -> None:
    _close_round_one(fed)
    client = fed.client("hospital-a")
    with pytest.raises(grpc.RpcError) as err:
        client.report_metrics(1, {"dice": (0.75, 4), "hd95": (math.nan, 4)})
    _refused(err, grpc.StatusCode.INVALID_ARGUMENT, "hd95", "finite")
    [summary] = fed.coordinator.round_summaries()
    assert summary.metrics == {}, "a refused report must store none of its metrics"

    client.report_metrics(1, {"dice": (0.75, 4), "hd95": (3.5, 4)})
    [summary] = fed.coordinator.round_summaries()
    assert summary.metrics == {"hospital-a": [("dice", 0.75, 4), ("hd95", 3.5, 4)]}
    # the admin view, through the same transport, agrees
    [record] = fed.client(ADMIN_NAME).rounds()
    assert record["metrics"] == {"hospital-a": {"dice": {"value": 0.75, "num_examples": 4},
                                                "hd95": {"value": 3.5, "num_examples": 4}}}


def test_metrics_before_the_round_closes_are_refused(fed: Federation) -> None:
    client = fed.client("hospital-a")
    _join(client)
    with pytest.raises(grpc.RpcError) as err:
        client.report_metrics(1, {"dice": (0.5, 4)})
    _refused(err, grpc.StatusCode.FAILED_PRECONDITION, "round 1")
    assert all(s.metrics == {} for s in fed.coordinator.round_summaries())


# -- the error type --------------------------------------------------------------------------------
def test_inprocess_rpc_error_is_a_grpc_rpc_error() -> None:
    err = InProcessRpcError(grpc.StatusCode.NOT_FOUND, "no such round")
    assert isinstance(err, grpc.RpcError)
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert err.details() == "no such round"
    assert "NOT_FOUND" in str(err) and "no such round" in str(err)
    with pytest.raises(grpc.RpcError):
        raise err
