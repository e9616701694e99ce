"""The study pins the model (``[run] model_fingerprint``, ``shared_tensors_sha256``), not the first silo to join.

Config tests load ``federation.toml`` files; the join tests run a ``CoordinatorServer`` over REAL gRPC with
mutual TLS on loopback (plaintext aggregation: the pin does not depend on it) and call ``Join`` with raw
``fedsilo.v1`` stubs, as a hostile enrolled silo would. The pinned manifest digest is computed here from the
documented rule (SHA-256 of the canonical JSON of the manifest), independently of ``Manifest.digest``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from fedsilo.coordinator.config import AggregationMode, ConfigError, FederationConfig, TlsFiles
from fedsilo.coordinator.loading import load_federation_config
from fedsilo.coordinator.server import UNPINNED_MODEL_WARNING, CoordinatorServer
from fedsilo.core.tensors import Manifest
from fedsilo.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc, tensor_pb2

if TYPE_CHECKING:
    from conftest import Certs  # tests/coordinator/conftest.py: the module-scoped `certs` fixture

SILOS = ("hospital-a", "hospital-b", "hospital-c")  # conftest.HOSPITALS: the `certs` fixture has these
SHAPES = {"enc.weight": (8, 4), "enc.bias": (8,), "head.weight": (2, 8)}
FINGERPRINT = "3e" * 32  # the study's model
MADE_UP = "0d" * 32  # a hostile silo's
RPC_TIMEOUT_S = 10
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


def manifest_digest(shapes: dict[str, tuple[int, ...]]) -> str:
    """The documented rule: SHA-256 of the manifest as canonical JSON (sorted keys, no spaces), float32 here."""
    entries = [{"name": k, "dtype": "FLOAT32", "shape": list(s)} for k, s in shapes.items()]
    return hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


PINNED_MANIFEST = manifest_digest(SHAPES)


def specs(shapes: dict[str, tuple[int, ...]]) -> list[tensor_pb2.TensorSpec]:
    return [tensor_pb2.TensorSpec(name=k, dtype=tensor_pb2.DTYPE_FLOAT32, shape=list(s)) for k, s in shapes.items()]


# -- config ---------------------------------------------------------------------------------------

FED = """
[run]
id = "pinned"
rounds = 2
min_silos = 1
aggregation = "plain"
{run}
[silos]
enrolled = ["hospital-a"]
[server]
listen = "127.0.0.1:0"
insecure = true
"""


def load(tmp_path: Path, run_lines: str = "") -> FederationConfig:
    path = tmp_path / "federation.toml"
    path.write_text(FED.format(run=run_lines))
    return load_federation_config(path)


def test_the_manifest_digest_is_the_documented_rule() -> None:
    manifest = Manifest.from_json([{"name": k, "dtype": "FLOAT32", "shape": list(s)} for k, s in SHAPES.items()])
    assert manifest.digest() == PINNED_MANIFEST
    reordered = Manifest.from_json(list(reversed(manifest.to_json())))
    assert reordered.digest() != PINNED_MANIFEST  # the order of the shared tensors is part of the pin


def test_a_pinned_config_loads_and_an_unpinned_one_keeps_its_run_fingerprint(tmp_path: Path) -> None:
    pinned = load(tmp_path, f'model_fingerprint = "{FINGERPRINT}"\nshared_tensors_sha256 = "{PINNED_MANIFEST}"')
    assert (pinned.model_fingerprint, pinned.shared_tensors_sha256) == (FINGERPRINT, PINNED_MANIFEST)
    unpinned = load(tmp_path)
    assert unpinned.model_fingerprint is None and unpinned.shared_tensors_sha256 is None
    # the run fingerprint of this very config before model pins existed (fedsilo 92bc3ac): restarts of
    # existing runs are not refused
    assert unpinned.run_fingerprint() == "ebf1e11c8ae4a4666780ef27526494041197b962fe7ac5fb737dfee7870f773c"
    assert pinned.run_fingerprint() != unpinned.run_fingerprint()  # a restart may not change the pin
    other = load(tmp_path, f'model_fingerprint = "{MADE_UP}"\nshared_tensors_sha256 = "{PINNED_MANIFEST}"')
    assert other.run_fingerprint() != pinned.run_fingerprint()


@pytest.mark.parametrize(("lines", "field", "value"), [
    (f'model_fingerprint = "{FINGERPRINT[:-1]}"\nshared_tensors_sha256 = "{PINNED_MANIFEST}"',
     "run.model_fingerprint", FINGERPRINT[:-1]),
    (f'model_fingerprint = "{FINGERPRINT.upper()}"\nshared_tensors_sha256 = "{PINNED_MANIFEST}"',
     "run.model_fingerprint", FINGERPRINT.upper()),
    (f'model_fingerprint = "{FINGERPRINT}"\nshared_tensors_sha256 = "{"g" * 64}"',
     "run.shared_tensors_sha256", "g" * 64),
    (f'model_fingerprint = 12\nshared_tensors_sha256 = "{PINNED_MANIFEST}"', "run.model_fingerprint", "12"),
    (f'model_fingerprint = "{FINGERPRINT}"', "run.shared_tensors_sha256: missing", ""),
    (f'shared_tensors_sha256 = "{PINNED_MANIFEST}"', "run.model_fingerprint: missing", ""),
])
def test_a_bad_pin_is_a_config_error_naming_it(tmp_path: Path, lines: str, field: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, lines)
    assert field in str(info.value) and value in str(info.value)


# -- joins over gRPC ---------------------------------------------------------------------------------


class Fed:
    """A ``CoordinatorServer`` on 127.0.0.1 and mTLS channels to it."""

    def __init__(self, server: CoordinatorServer, certs: Certs) -> None:
        self.server, self.certs = server, certs
        self.address = f"127.0.0.1:{server.port}"
        self._channels: list[grpc.Channel] = []

    def _channel(self, cert: Path, key: Path) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=self.certs.ca.read_bytes(),
                                             private_key=key.read_bytes(), certificate_chain=cert.read_bytes())
        channel = grpc.secure_channel(self.address, creds, options=CHANNEL_OPTIONS)
        self._channels.append(channel)
        return channel

    def join(self, silo: str, *, fingerprint: str = FINGERPRINT,
             shapes: dict[str, tuple[int, ...]] = SHAPES) -> federation_pb2.JoinResponse:
        paths = self.certs.silo[silo]
        stub = federation_pb2_grpc.FederationStub(self._channel(paths.cert, paths.key))
        return stub.Join(federation_pb2.JoinRequest(model_fingerprint=fingerprint, num_train_examples=100,
                                                    shared_tensors=specs(shapes), agent_version="test/1"),
                         timeout=RPC_TIMEOUT_S)

    def status(self) -> admin_pb2.GetStatusResponse:
        stub = admin_pb2_grpc.AdminStub(self._channel(self.certs.admin.cert, self.certs.admin.key))
        return stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_S)

    def stored_model(self) -> tuple[str | None, str | None]:
        """The model fingerprint and manifest the coordinator's database holds (None: none)."""
        with sqlite3.connect(Path(self.server.config.state_dir) / "coordinator.sqlite") as db:
            rows = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('model_fingerprint', 'manifest')"))
        return rows.get("model_fingerprint"), rows.get("manifest")

    def stop(self) -> None:
        for channel in self._channels:
            channel.close()
        self.server.stop(grace=0)


@pytest.fixture
def start_fed(certs: Certs, tmp_path: Path) -> Iterator[Callable[..., Fed]]:
    running: list[Fed] = []

    def start(state: str = "state", **overrides: object) -> Fed:
        kwargs: dict[str, object] = dict(
            run_id="grpc-pin", silos=SILOS, rounds=2, min_silos=2, aggregation=AggregationMode.PLAIN,
            round_deadline_s=60.0, quorum_timeout_s=600.0, start_grace_s=600.0, listen="127.0.0.1:0",
            state_dir=tmp_path / state, tls=TlsFiles(ca=certs.ca, cert=certs.coordinator.cert,
                                                     key=certs.coordinator.key),
            model={"name": "tiny"}, training={"epochs": 1})
        kwargs.update(overrides)
        server = CoordinatorServer(FederationConfig(**kwargs))  # type: ignore[arg-type]
        server.start()
        fed = Fed(server, certs)
        running.append(fed)
        return fed

    yield start
    for fed in running:
        fed.stop()


PIN = {"model_fingerprint": FINGERPRINT, "shared_tensors_sha256": PINNED_MANIFEST}


def expect_refused(call: Callable[[], object], *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION, (err.code(), err.details())
    for fragment in fragments:
        assert fragment in (err.details() or ""), err.details()


@pytest.mark.parametrize("hostile", [
    {"fingerprint": MADE_UP},
    {"shapes": {**SHAPES, "head.weight": (3, 8)}},  # the right model, another manifest
    {"shapes": {"enc.weight": (8, 4)}},
])
def test_with_a_pin_a_hostile_first_joiner_is_refused_and_decides_nothing(
        start_fed: Callable[..., Fed], hostile: dict) -> None:
    fed = start_fed(**PIN)
    before = fed.status()
    if "fingerprint" in hostile:
        key, pinned, sent = "run.model_fingerprint", FINGERPRINT, hostile["fingerprint"]
    else:
        key, pinned, sent = "run.shared_tensors_sha256", PINNED_MANIFEST, manifest_digest(hostile["shapes"])
    expect_refused(lambda: fed.join("hospital-c", **hostile), key, pinned[:12], sent[:12])
    assert fed.status() == before  # nobody joined, the run waits as before
    assert not any(s.joined for s in fed.status().silos)
    assert fed.stored_model() == (None, None)  # nothing stored for later joiners (or restarts) to be held to
    # the same silo, and the honest ones, join with the study's model; the run starts
    for silo in SILOS:
        assert fed.join(silo).silo_name == silo
    status = fed.status()
    assert status.state == federation_pb2.RUN_STATE_RUNNING and status.open_round == 1
    assert all(s.joined for s in status.silos)
    assert fed.stored_model()[0] == FINGERPRINT
    # and the hostile model stays refused later on
    expect_refused(lambda: fed.join("hospital-c", **hostile), key, pinned[:12])


def test_with_a_pin_the_first_joiner_cannot_lock_out_across_a_restart(start_fed: Callable[..., Fed]) -> None:
    fed = start_fed(**PIN)
    expect_refused(lambda: fed.join("hospital-a", fingerprint=MADE_UP), "run.model_fingerprint")
    fed.stop()
    again = start_fed(state="state", **PIN)  # the same state directory
    for silo in SILOS:
        again.join(silo)
    assert again.status().state == federation_pb2.RUN_STATE_RUNNING


def test_without_a_pin_the_first_joiner_decides_and_the_coordinator_warns(
        start_fed: Callable[..., Fed], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedsilo.coordinator"):
        fed = start_fed()
    assert UNPINNED_MODEL_WARNING in [r.getMessage() for r in caplog.records]
    assert "pin-model" in UNPINNED_MODEL_WARNING
    fed.join("hospital-c", fingerprint=MADE_UP)  # today's behaviour, loudly warned: the first joiner decides
    expect_refused(lambda: fed.join("hospital-a"), MADE_UP[:12], FINGERPRINT[:12])


def test_with_a_pin_the_coordinator_does_not_warn(start_fed: Callable[..., Fed],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedsilo.coordinator"):
        start_fed(**PIN)
    assert UNPINNED_MODEL_WARNING not in [r.getMessage() for r in caplog.records]
