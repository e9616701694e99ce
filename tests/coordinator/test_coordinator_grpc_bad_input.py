"""Bad input over REAL gRPC with mutual TLS on loopback: exact status codes, and nothing changes.

Every refusal test (1) sends the bad input through raw ``fedsilo.v1`` stubs, (2) checks the gRPC
status code and a meaningful fragment of the details, (3) checks through the Admin RPCs that
the run status and the round history are identical before and after, and, where an upload was
refused, (4) finishes the round with valid uploads from every silo and checks that the fetched
aggregate is the weighted mean of exactly the valid uploads, computed here with numpy.

The coordinator never needs torch: the shared "model" is two float32 tensors.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedsilo.coordinator.config import AggregationMode, FederationConfig, TlsFiles
from fedsilo.coordinator.server import CoordinatorServer
from fedsilo.privacy import pki
from fedsilo.privacy.pki import Role
from fedsilo.privacy.upload_statement import sign_upload_statement
from fedsilo.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    federation_pb2,
    federation_pb2_grpc,
    tensor_pb2,
)
from upload_signing import signed

RUN_ID = "grpc-bad-input"
SILOS = ("hospital-a", "hospital-b")
EXAMPLES = {"hospital-a": 120, "hospital-b": 380}
#: The weight each silo's uploads must carry: the size it declared at Join. Refused uploads below
#: carry it too, so each is wrong in exactly the way its test is about.
WEIGHT = {silo: float(n) for silo, n in EXAMPLES.items()}
SHAPES = {"layer.weight": (3, 4), "layer.bias": (5,)}
PAYLOAD_BYTES = 4 * (12 + 5)  # 68
FINGERPRINT = "5e" * 32
MAX_UPLOAD_BYTES = 4096
MAX_CHUNK_BYTES = 1024
CHUNK = 16  # 68 bytes -> 5 chunks: 16, 16, 16, 16, 4
RPC_TIMEOUT_S = 10
# Fresh subchannels per channel, so one test's connection state never leaks into another's.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
_WIRE_DTYPE = {
    np.dtype(np.float32): tensor_pb2.DTYPE_FLOAT32,
    np.dtype(np.float64): tensor_pb2.DTYPE_FLOAT64,
    np.dtype(np.int64): tensor_pb2.DTYPE_INT64,
}

Arrays = dict[str, np.ndarray]
Update = tuple[float, Arrays]
Snapshot = tuple[admin_pb2.GetStatusResponse, admin_pb2.ListRoundsResponse]


# -- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Certs:
    ca: Path
    coordinator: pki.IssuedPaths
    silo: dict[str, pki.IssuedPaths]  # enrolled hospital-a, hospital-b; CA-valid but not enrolled hospital-x
    admin: pki.IssuedPaths
    foreign_silo: pki.IssuedPaths  # "hospital-a", issued by another CA
    expired_silo: pki.IssuedPaths  # "hospital-a", issued by our CA, expired 9 days ago


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    root = tmp_path_factory.mktemp("pki")
    ca = pki.init_ca(root / "ca")
    foreign = root / "foreign-ca"
    pki.init_ca(foreign, common_name="another federation CA")
    out = root / "certs"
    now = dt.datetime.now(dt.timezone.utc)
    return Certs(
        ca=ca.cert,
        coordinator=pki.issue_certificate(root / "ca", out, role=Role.COORDINATOR, name="coordinator",
                                          hosts=["localhost", "127.0.0.1"]),
        silo={name: pki.issue_certificate(root / "ca", out, role=Role.SILO, name=name)
              for name in ("hospital-a", "hospital-b", "hospital-x")},
        admin=pki.issue_certificate(root / "ca", out, role=Role.ADMIN, name="study-lead"),
        foreign_silo=pki.issue_certificate(foreign, root / "foreign-certs", role=Role.SILO, name="hospital-a"),
        expired_silo=pki.issue_certificate(root / "ca", root / "expired-certs", role=Role.SILO, name="hospital-a",
                                           not_before=now - dt.timedelta(days=10), valid_days=1),
    )


# -- payloads, built here independently of the coordinator's and agent's helpers ------------------


def make_update(seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES, dtype: type = np.float32) -> Arrays:
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(-5, 5, size=s).astype(dtype) for k, s in shapes.items()}


def raw(arrays: Arrays) -> bytes:
    return b"".join(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes() for a in arrays.values())


def manifest_msg(arrays: Arrays) -> tensor_pb2.PayloadManifest:
    return tensor_pb2.PayloadManifest(
        tensors=[tensor_pb2.TensorSpec(name=k, dtype=_WIRE_DTYPE[a.dtype], shape=list(a.shape))
                 for k, a in arrays.items()],
        total_bytes=sum(a.nbytes for a in arrays.values()))


def header(rnd: int, weight: float, arrays: Arrays) -> federation_pb2.SubmitUpdateRequest:
    return federation_pb2.SubmitUpdateRequest(
        header=federation_pb2.UpdateHeader(round=rnd, weight=weight, manifest=manifest_msg(arrays),
                                           encoding=federation_pb2.PAYLOAD_ENCODING_RAW_TENSORS,
                                           payload_bytes=sum(a.nbytes for a in arrays.values())))


def chunk(data: bytes) -> federation_pb2.SubmitUpdateRequest:
    return federation_pb2.SubmitUpdateRequest(chunk=data)


def trailer(num_chunks: int, digest: bytes) -> federation_pb2.SubmitUpdateRequest:
    return federation_pb2.SubmitUpdateRequest(trailer=tensor_pb2.PayloadTrailer(num_chunks=num_chunks, sha256=digest))


def upload_msgs(rnd: int, weight: float, arrays: Arrays,
                chunk_bytes: int = CHUNK) -> list[federation_pb2.SubmitUpdateRequest]:
    """A well-formed upload stream: header, chunks of ``chunk_bytes``, trailer."""
    payload = raw(arrays)
    chunks = [payload[i:i + chunk_bytes] for i in range(0, len(payload), chunk_bytes)]
    return [header(rnd, weight, arrays), *map(chunk, chunks), trailer(len(chunks), hashlib.sha256(payload).digest())]


def weighted_mean(updates: Iterable[Update]) -> Arrays:
    updates = list(updates)
    total = sum(w for w, _ in updates)
    return {k: sum(w * u[k].astype(np.float64) for w, u in updates) / total for k in SHAPES}


# -- a running coordinator ------------------------------------------------------------------------


def expect(code: grpc.StatusCode, fragment: str, call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() is code, (err.code(), err.details())
    assert fragment in (err.details() or ""), err.details()
    return err


@dataclass(frozen=True, kw_only=True)
class Fetched:
    header: federation_pb2.AggregateHeader
    arrays: Arrays
    sha256: bytes
    wire_bytes: int


class Fed:
    """A ``CoordinatorServer`` on 127.0.0.1 and mTLS channels to it."""

    def __init__(self, server: CoordinatorServer, certs: Certs) -> None:
        self.server = server
        self.certs = certs
        self.address = f"127.0.0.1:{server.port}"
        self._channels: list[grpc.Channel] = []
        self._cached: dict[Path | None, grpc.Channel] = {}

    def cached_channel(self, client: pki.IssuedPaths) -> grpc.Channel:
        """One channel per certificate, reused by every call made with it."""
        if client.cert not in self._cached:
            self._cached[client.cert] = self.channel(client)
        return self._cached[client.cert]

    def channel(self, client: pki.IssuedPaths | None, options: list | None = None) -> grpc.Channel:
        """A new channel (and so a new TLS handshake)."""
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.certs.ca.read_bytes(),
            private_key=client.key.read_bytes() if client else None,
            certificate_chain=client.cert.read_bytes() if client else None)
        ch = grpc.secure_channel(self.address, creds, options=CHANNEL_OPTIONS if options is None else options)
        self._channels.append(ch)
        return ch

    def stub(self, silo: str) -> federation_pb2_grpc.FederationStub:
        client = self.certs.admin if silo == "admin" else self.certs.silo[silo]
        return federation_pb2_grpc.FederationStub(self.cached_channel(client))

    def admin_stub(self, client: pki.IssuedPaths | None = None) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.cached_channel(client or self.certs.admin))

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    # -- calls ----------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        admin = self.admin_stub()
        return (admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_S),
                admin.ListRounds(admin_pb2.ListRoundsRequest(), timeout=RPC_TIMEOUT_S))

    def join(self, silo: str, *, fingerprint: str = FINGERPRINT, arrays: Arrays | None = None,
             stub: federation_pb2_grpc.FederationStub | None = None) -> federation_pb2.JoinResponse:
        specs = manifest_msg(arrays if arrays is not None else make_update(0)).tensors
        req = federation_pb2.JoinRequest(model_fingerprint=fingerprint, num_train_examples=EXAMPLES.get(silo, 1),
                                         shared_tensors=specs, agent_version="test/1")
        return (stub or self.stub(silo)).Join(req, timeout=RPC_TIMEOUT_S)

    def task(self, silo: str, after_round: int) -> federation_pb2.GetTaskResponse:
        return self.stub(silo).GetTask(federation_pb2.GetTaskRequest(after_round=after_round, wait_seconds=0),
                                       timeout=RPC_TIMEOUT_S)

    def submit(self, silo: str, msgs: Iterable[federation_pb2.SubmitUpdateRequest],
               sign: bool = True) -> federation_pb2.SubmitUpdateResponse:
        """Streams ``msgs``, the trailer signed as the silo's agent signs it (unless ``sign`` is False)."""
        msgs = signed(msgs, self.certs.silo[silo], run_id=RUN_ID, silo=silo) if sign else list(msgs)
        return self.stub(silo).SubmitUpdate(iter(msgs), timeout=RPC_TIMEOUT_S)

    def fetch(self, silo: str, rnd: int) -> Fetched:
        head = None
        buf = bytearray()
        n = wire = 0
        tail = None
        for resp in self.stub(silo).FetchAggregate(federation_pb2.FetchAggregateRequest(round=rnd),
                                                   timeout=RPC_TIMEOUT_S):
            wire += resp.ByteSize()
            kind = resp.WhichOneof("part")
            if kind == "header":
                assert head is None
                head = resp.header
            elif kind == "chunk":
                assert head is not None and tail is None
                buf += resp.chunk
                n += 1
            else:
                assert kind == "trailer" and tail is None
                tail = resp.trailer
        assert head is not None and tail is not None
        assert tail.num_chunks == n and tail.sha256 == hashlib.sha256(buf).digest()
        assert [(t.name, t.dtype, tuple(t.shape)) for t in head.manifest.tensors] == [
            (k, tensor_pb2.DTYPE_FLOAT32, s) for k, s in SHAPES.items()]
        assert head.manifest.total_bytes == len(buf) == PAYLOAD_BYTES
        arrays, pos = {}, 0
        for k, s in SHAPES.items():
            size = int(np.prod(s))
            arrays[k] = np.frombuffer(bytes(buf), dtype="<f4", count=size, offset=pos).reshape(s)
            pos += 4 * size
        return Fetched(header=head, arrays=arrays, sha256=tail.sha256, wire_bytes=wire)

    # -- composite steps ------------------------------------------------------------------
    def finish_round(self, rnd: int, updates: dict[str, Update], already: Iterable[Update] = ()) -> Fetched:
        """Uploads valid updates from the silos in ``updates`` (the round then has every enrolled
        silo's upload) and checks the aggregate against numpy; ``already`` are uploads accepted before."""
        already = list(already)
        for i, (silo, (w, arrays)) in enumerate(updates.items(), start=len(already) + 1):
            resp = self.submit(silo, upload_msgs(rnd, w, arrays))
            assert (resp.round, resp.bytes_received, resp.uploads_in_round) == (rnd, PAYLOAD_BYTES, i)
        counted = already + list(updates.values())
        got = self.fetch(SILOS[0], rnd)
        assert got.header.round == rnd
        assert got.header.num_contributors == len(counted)
        assert got.header.total_weight == pytest.approx(sum(w for w, _ in counted), rel=1e-12)
        want = weighted_mean(counted)
        for k in SHAPES:
            np.testing.assert_allclose(got.arrays[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
        return got


def make_config(certs: Certs, state_dir: Path, **overrides: object) -> FederationConfig:
    kwargs: dict[str, object] = dict(
        run_id=RUN_ID, silos=SILOS, rounds=2, min_silos=2, aggregation=AggregationMode.PLAIN,
        # Short deadline; quorum is every silo, so a round only closes when both uploaded.
        round_deadline_s=20.0, quorum_timeout_s=600.0, start_grace_s=0.0,
        listen="127.0.0.1:0", state_dir=state_dir,
        tls=TlsFiles(ca=certs.ca, cert=certs.coordinator.cert, key=certs.coordinator.key),
        max_upload_bytes=MAX_UPLOAD_BYTES, max_chunk_bytes=MAX_CHUNK_BYTES,
        model={"name": "tiny"}, training={"epochs": 1},
    )
    kwargs.update(overrides)
    return FederationConfig(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
def start_fed(certs: Certs, tmp_path: Path) -> Iterator[Callable[..., Fed]]:
    started: list[Fed] = []

    def start(**overrides: object) -> Fed:
        server = CoordinatorServer(make_config(certs, tmp_path / f"state{len(started)}", **overrides), max_workers=8)
        server.start()
        fed = Fed(server, certs)
        started.append(fed)
        return fed

    yield start
    for fed in started:
        fed.close()
        fed.server.stop(grace=1.0)


@pytest.fixture
def fed(start_fed: Callable[..., Fed]) -> Fed:
    """A coordinator nobody has joined yet."""
    return start_fed()


@pytest.fixture
def running(fed: Fed) -> Fed:
    """Both silos joined, round 1 open, both hold their TRAIN task for round 1."""
    for silo in SILOS:
        fed.join(silo)
    for silo in SILOS:
        task = fed.task(silo, 0)
        assert (task.kind, task.round, task.base_round) == (federation_pb2.TASK_KIND_TRAIN, 1, 0)
    return fed


GOOD = {"hospital-a": (120.0, make_update(1)), "hospital-b": (380.0, make_update(2))}


# -- happy path -----------------------------------------------------------------------------------


def test_happy_path_two_silos_one_round_over_several_chunks(fed: Fed) -> None:
    run = fed.stub("hospital-a").GetRun(federation_pb2.GetRunRequest(), timeout=RPC_TIMEOUT_S)
    assert (run.run_id, run.total_rounds, run.max_chunk_bytes) == ("grpc-bad-input", 2, MAX_CHUNK_BYTES)
    assert run.method == "fedavg" and run.aggregation == federation_pb2.AGGREGATION_PLAIN

    first = fed.join("hospital-a")
    assert (first.silo_name, first.state) == ("hospital-a", federation_pb2.RUN_STATE_WAITING_FOR_SILOS)
    second = fed.join("hospital-b")
    assert (second.silo_name, second.state) == ("hospital-b", federation_pb2.RUN_STATE_RUNNING)

    down = up = 0
    for silo in SILOS:
        task = fed.task(silo, 0)
        assert (task.kind, task.round, task.base_round, task.last_closed_round) == (
            federation_pb2.TASK_KIND_TRAIN, 1, 0, 0)
        assert task.deadline_unix_ms > 0
        down += task.ByteSize()
    for i, silo in enumerate(SILOS, start=1):
        msgs = signed(upload_msgs(1, *GOOD[silo]), fed.certs.silo[silo], run_id=RUN_ID, silo=silo)
        assert sum(1 for m in msgs if m.WhichOneof("part") == "chunk") == 5
        assert msgs[-1].trailer.upload_statement, "an agent signs what it uploads"
        up += sum(m.ByteSize() for m in msgs)
        resp = fed.submit(silo, msgs)
        assert (resp.round, resp.bytes_received, resp.uploads_in_round) == (1, PAYLOAD_BYTES, i)

    nxt = fed.task("hospital-a", 1)
    assert (nxt.kind, nxt.round, nxt.base_round, nxt.last_closed_round) == (federation_pb2.TASK_KIND_TRAIN, 2, 1, 1)
    got = fed.fetch("hospital-b", 1)
    down += got.wire_bytes
    assert got.header.num_contributors == 2 and got.header.total_weight == 500.0
    want = weighted_mean(GOOD.values())
    for k in SHAPES:
        np.testing.assert_allclose(got.arrays[k], want[k], rtol=1e-6, atol=1e-7)

    metrics = federation_pb2.ReportMetricsRequest(round=1, metrics=[
        federation_pb2.Metric(name="dice", value=0.75, num_examples=40)])
    assert fed.stub("hospital-a").ReportMetrics(metrics, timeout=RPC_TIMEOUT_S).stored == 1
    up += metrics.ByteSize()

    status, rounds = fed.snapshot()
    assert (status.state, status.open_round, status.last_closed_round, status.total_rounds) == (
        federation_pb2.RUN_STATE_RUNNING, 2, 1, 2)
    assert [(s.name, s.joined, s.rounds_contributed, s.num_train_examples) for s in status.silos] == [
        ("hospital-a", True, 1, 120), ("hospital-b", True, 1, 380)]
    r1 = rounds.rounds[0]
    assert (r1.round, r1.closed, sorted(r1.contributors), r1.params_shared) == (1, True, list(SILOS), 17)
    assert r1.bytes_up > 2 * PAYLOAD_BYTES and r1.bytes_down > PAYLOAD_BYTES
    # Exactly the serialized sizes of the messages that went each way for round 1.
    assert (r1.bytes_up, r1.bytes_down) == (up, down)
    assert r1.seconds >= 0 and r1.total_weight == 500.0
    assert [(m.silo, [(x.name, x.value, x.num_examples) for x in m.metrics]) for m in r1.metrics] == [
        ("hospital-a", [("dice", 0.75, 40)])]
    assert (rounds.rounds[1].round, rounds.rounds[1].closed) == (2, False)


# -- refused before the handler: TLS ----------------------------------------------------------


@pytest.mark.parametrize("client", [None, "foreign_silo", "expired_silo"],
                         ids=["no-client-cert", "foreign-ca", "expired"])
def test_bad_client_certificate_is_refused_at_the_handshake(running: Fed, client: str | None) -> None:
    before = running.snapshot()
    paths = getattr(running.certs, client) if client else None
    stub = federation_pb2_grpc.FederationStub(running.channel(paths))
    # Each of these certificates names "hospital-a" (or nobody): had a handler been reached, the
    # poisoned upload would count as hospital-a's and its real upload below would be refused.
    poisoned = make_update(66)
    for call in (lambda: stub.SubmitUpdate(iter(upload_msgs(1, WEIGHT["hospital-a"], poisoned)),
                                           timeout=RPC_TIMEOUT_S),
                 lambda: stub.GetRun(federation_pb2.GetRunRequest(), timeout=RPC_TIMEOUT_S),
                 lambda: admin_pb2_grpc.AdminStub(running.channel(paths)).GetStatus(
                     admin_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_S)):
        err = expect(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", call)
        # The server drops the connection without a TLS alert (see tests/privacy/test_pki.py).
        assert "Socket closed" in err.details() or "Connection reset" in err.details(), err.details()
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


# -- refused by role or enrolment ---------------------------------------------------------------


def test_silo_that_is_not_enrolled_is_permission_denied(running: Fed) -> None:
    before = running.snapshot()
    stub = running.stub("hospital-x")
    denied = "silo 'hospital-x' is not enrolled in run 'grpc-bad-input'"
    expect(grpc.StatusCode.PERMISSION_DENIED, denied,
           lambda: stub.GetRun(federation_pb2.GetRunRequest(), timeout=RPC_TIMEOUT_S))
    expect(grpc.StatusCode.PERMISSION_DENIED, denied, lambda: running.join("hospital-x", stub=stub))
    # Refused before its request is looked at: a malformed join is still PERMISSION_DENIED.
    expect(grpc.StatusCode.PERMISSION_DENIED, denied,
           lambda: stub.Join(federation_pb2.JoinRequest(), timeout=RPC_TIMEOUT_S))
    expect(grpc.StatusCode.PERMISSION_DENIED, denied,
           lambda: stub.SubmitUpdate(iter(upload_msgs(1, 1e9, make_update(66))), timeout=RPC_TIMEOUT_S))
    expect(grpc.StatusCode.PERMISSION_DENIED, denied,
           lambda: stub.GetTask(federation_pb2.GetTaskRequest(), timeout=RPC_TIMEOUT_S))
    expect(grpc.StatusCode.PERMISSION_DENIED, denied,
           lambda: stub.Heartbeat(federation_pb2.HeartbeatRequest(), timeout=RPC_TIMEOUT_S))
    after = running.snapshot()
    assert after == before
    assert [s.name for s in after[0].silos] == list(SILOS)
    running.finish_round(1, GOOD)


def test_admin_certificate_cannot_act_as_a_silo(running: Fed) -> None:
    before = running.snapshot()
    stub = running.stub("admin")
    denied = "a admin certificate cannot act as a silo"
    expect(grpc.StatusCode.PERMISSION_DENIED, denied,
           lambda: stub.GetRun(federation_pb2.GetRunRequest(), timeout=RPC_TIMEOUT_S))
    expect(grpc.StatusCode.PERMISSION_DENIED, denied, lambda: running.join("admin", stub=stub))
    expect(grpc.StatusCode.PERMISSION_DENIED, denied,
           lambda: stub.Join(federation_pb2.JoinRequest(), timeout=RPC_TIMEOUT_S))
    expect(grpc.StatusCode.PERMISSION_DENIED, denied,
           lambda: stub.SubmitUpdate(iter(upload_msgs(1, 1e9, make_update(66))), timeout=RPC_TIMEOUT_S))
    expect(grpc.StatusCode.PERMISSION_DENIED, denied,
           lambda: next(stub.FetchAggregate(federation_pb2.FetchAggregateRequest(round=1), timeout=RPC_TIMEOUT_S)))
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


@pytest.mark.parametrize("who", ["hospital-a", "hospital-x"])
def test_silo_certificate_cannot_call_admin_rpcs(running: Fed, who: str) -> None:
    before = running.snapshot()
    admin = running.admin_stub(running.certs.silo[who])
    denied = "admin RPCs need an admin certificate, not a silo one"
    expect(grpc.StatusCode.PERMISSION_DENIED, denied,
           lambda: admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_S))
    expect(grpc.StatusCode.PERMISSION_DENIED, denied,
           lambda: admin.ListRounds(admin_pb2.ListRoundsRequest(), timeout=RPC_TIMEOUT_S))
    assert running.snapshot() == before


# -- uploads at the wrong time ------------------------------------------------------------------


def test_update_for_a_closed_round_is_failed_precondition(running: Fed) -> None:
    round1 = running.finish_round(1, GOOD)
    for silo in SILOS:
        assert running.task(silo, 1).round == 2
    before = running.snapshot()
    expect(grpc.StatusCode.FAILED_PRECONDITION, "round 1 is closed; the open round is 2",
           lambda: running.submit("hospital-a", upload_msgs(1, WEIGHT["hospital-a"], make_update(66))))
    assert running.snapshot() == before
    round2 = {"hospital-a": (WEIGHT["hospital-a"], make_update(21)), "hospital-b": (WEIGHT["hospital-b"], make_update(22))}
    running.finish_round(2, round2)
    assert running.fetch("hospital-b", 1).sha256 == round1.sha256, "the closed round's aggregate changed"


def test_update_for_a_future_round_is_failed_precondition(running: Fed) -> None:
    before = running.snapshot()
    expect(grpc.StatusCode.FAILED_PRECONDITION, "round 2 is not open yet; the open round is 1",
           lambda: running.submit("hospital-a", upload_msgs(2, WEIGHT["hospital-a"], make_update(66))))
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


def test_second_upload_for_the_same_round_is_already_exists(running: Fed) -> None:
    first = GOOD["hospital-a"]
    assert running.submit("hospital-a", upload_msgs(1, *first)).uploads_in_round == 1
    before = running.snapshot()
    expect(grpc.StatusCode.ALREADY_EXISTS, "silo 'hospital-a' already uploaded its update for round 1",
           lambda: running.submit("hospital-a", upload_msgs(1, WEIGHT["hospital-a"], make_update(66))))
    assert running.snapshot() == before
    running.finish_round(1, {"hospital-b": GOOD["hospital-b"]}, already=[first])


# -- uploads that do not match the run's tensors, or carry non-finite values ------------------------


def _wrong_shape() -> Arrays:
    return make_update(66, {"layer.weight": (4, 3), "layer.bias": (5,)})


def _wrong_dtype() -> Arrays:
    return make_update(66, dtype=np.float64)


def _missing() -> Arrays:
    return make_update(66, {"layer.weight": (3, 4)})


def _extra() -> Arrays:
    return make_update(66, {**SHAPES, "layer.extra": (2,)})


def _int_instead_of_float() -> Arrays:
    return {"layer.weight": np.ones((3, 4), np.int64), "layer.bias": np.ones(5, np.float32)}


@pytest.mark.parametrize("arrays, fragment", [
    (_wrong_shape, "tensor 'layer.weight' has shape [4, 3], expected [3, 4]"),
    (_wrong_dtype, "tensor 'layer.weight' has dtype FLOAT64, expected FLOAT32"),
    (_int_instead_of_float, "tensor 'layer.weight' has dtype INT64, expected FLOAT32"),
    (_missing, "tensor 'layer.bias' is missing"),
    (_extra, "tensor 'layer.extra' is not part of the run's shared tensors"),
], ids=["shape", "dtype", "int-dtype", "missing", "extra"])
def test_update_not_matching_the_manifest_is_invalid_argument(running: Fed, arrays: Callable[[], Arrays],
                                                              fragment: str) -> None:
    before = running.snapshot()
    expect(grpc.StatusCode.INVALID_ARGUMENT, "update does not match the run's shared tensors: " + fragment,
           lambda: running.submit("hospital-a", upload_msgs(1, WEIGHT["hospital-a"], arrays())))
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


@pytest.mark.parametrize("bad, word, where", [
    (np.nan, "NaN", ("layer.bias", (4,))),
    (np.inf, "Inf", ("layer.weight", (0, 0))),
    (-np.inf, "Inf", ("layer.weight", (2, 3))),
], ids=["nan", "inf", "-inf"])
def test_non_finite_values_are_invalid_argument(running: Fed, bad: float, word: str,
                                                where: tuple[str, tuple[int, ...]]) -> None:
    poisoned = make_update(66)
    poisoned[where[0]][where[1]] = bad
    before = running.snapshot()
    expect(grpc.StatusCode.INVALID_ARGUMENT, f"tensor '{where[0]}' contains {word}",
           lambda: running.submit("hospital-a", upload_msgs(1, WEIGHT["hospital-a"], poisoned)))
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


def test_an_upload_that_would_overflow_the_running_sum_is_invalid_argument(start_fed: Callable[..., Fed]) -> None:
    """float64 tensors: every value finite, but a's and b's weighted values together exceed float64.
    b's upload is refused whole (layer.weight, read first, fits: it is not added either)."""
    fed = start_fed(rounds=1)
    a_up = {"layer.weight": np.full((3, 4), 1.0), "layer.bias": np.full(5, 1e306)}  # 120 * 1e306 fits
    for silo in SILOS:
        fed.join(silo, arrays=a_up)
    assert fed.submit("hospital-a", upload_msgs(1, 120.0, a_up)).uploads_in_round == 1
    before = fed.snapshot()
    b_bad = {"layer.weight": np.full((3, 4), 2.0), "layer.bias": np.full(5, 4e305)}  # 1.2e308 + 1.52e308
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           "tensor 'layer.bias': adding this upload with weight 380 would overflow the running sum",
           lambda: fed.submit("hospital-b", upload_msgs(1, 380.0, b_bad)))
    assert fed.snapshot() == before
    b_good = {"layer.weight": np.full((3, 4), 2.0), "layer.bias": np.full(5, -4e305)}
    assert fed.submit("hospital-b", upload_msgs(1, 380.0, b_good)).uploads_in_round == 2
    rounds = fed.snapshot()[1].rounds
    assert [(r.round, r.closed, sorted(r.contributors)) for r in rounds] == [(1, True, list(SILOS))]
    buf = b"".join(resp.chunk for resp in fed.stub("hospital-a").FetchAggregate(
        federation_pb2.FetchAggregateRequest(round=1), timeout=RPC_TIMEOUT_S) if resp.WhichOneof("part") == "chunk")
    got = np.frombuffer(buf, "<f8")
    np.testing.assert_allclose(got[:12], np.full(12, (120 * 1.0 + 380 * 2.0) / 500), rtol=1e-15)
    np.testing.assert_allclose(got[12:], np.full(5, (120 * 1e306 - 380 * 4e305) / 500), rtol=1e-15)


# -- broken streams ----------------------------------------------------------------------------------


def _no_trailer(m: list) -> list:
    return m[:-1]


def _short(m: list) -> list:
    sent = b"".join(x.chunk for x in m[1:-2])  # the last chunk (4 bytes) never comes
    return [*m[:-2], trailer(len(m) - 3, hashlib.sha256(sent).digest())]


def _count(m: list) -> list:
    return [*m[:-1], trailer(m[-1].trailer.num_chunks + 1, m[-1].trailer.sha256)]


def _sha(m: list) -> list:
    return [*m[:-1], trailer(m[-1].trailer.num_chunks, bytes(32))]


def _sha_length(m: list) -> list:
    return [*m[:-1], trailer(m[-1].trailer.num_chunks, m[-1].trailer.sha256[:16])]


def _corrupted_chunk(m: list) -> list:
    data = bytearray(m[2].chunk)
    data[0] ^= 0x01  # still finite; the trailer's SHA-256 no longer matches
    return [m[0], m[1], chunk(bytes(data)), *m[3:]]


def _too_many_bytes(m: list) -> list:
    return [*m[:-1], chunk(b"\0" * 4), m[-1]]


def _empty_chunk(m: list) -> list:
    return [m[0], chunk(b""), *m[1:]]


def _after_trailer(m: list) -> list:
    return [*m, chunk(b"\0" * 4)]


@pytest.mark.parametrize("tamper, fragment", [
    (_no_trailer, "upload truncated: stream ended after 68 of 68 bytes without a trailer"),
    (_short, "upload truncated: 64 of 68 payload bytes received"),
    (_count, "trailer announces 6 chunks, 5 were received"),
    (_sha, "payload SHA-256 does not match the trailer"),
    (_corrupted_chunk, "payload SHA-256 does not match the trailer"),
    (_sha_length, "trailer sha256 must be exactly 32 bytes"),
    (_too_many_bytes, "more payload bytes than the 68 announced"),
    (_empty_chunk, "empty chunk"),
    (_after_trailer, "message after the trailer"),
], ids=["no-trailer", "fewer-bytes", "chunk-count", "sha256", "corrupted-chunk", "sha256-length",
        "more-bytes", "empty-chunk", "after-trailer"])
def test_truncated_or_corrupted_stream_is_invalid_argument(running: Fed, tamper: Callable[[list], list],
                                                           fragment: str) -> None:
    msgs = tamper(upload_msgs(1, WEIGHT["hospital-a"], make_update(66)))
    before = running.snapshot()
    expect(grpc.StatusCode.INVALID_ARGUMENT, fragment, lambda: running.submit("hospital-a", msgs))
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


def test_upload_cancelled_mid_stream_changes_nothing(running: Fed) -> None:
    msgs = upload_msgs(1, WEIGHT["hospital-a"], make_update(66))
    sent, release = threading.Event(), threading.Event()

    def requests() -> Iterator[federation_pb2.SubmitUpdateRequest]:
        yield from msgs[:3]  # header and two chunks, then the client goes away
        sent.set()
        release.wait(RPC_TIMEOUT_S)
        yield from msgs[3:]

    before = running.snapshot()
    future = running.stub("hospital-a").SubmitUpdate.future(requests(), timeout=RPC_TIMEOUT_S)
    assert sent.wait(RPC_TIMEOUT_S)
    time.sleep(0.2)  # let the coordinator start receiving; the outcome must not depend on it
    assert future.cancel()
    release.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


def test_payload_beyond_max_upload_bytes_is_resource_exhausted(running: Fed) -> None:
    big = make_update(66, {"layer.weight": (3, 4), "layer.bias": (MAX_UPLOAD_BYTES // 4,)})
    msgs = upload_msgs(1, WEIGHT["hospital-a"], big, chunk_bytes=MAX_CHUNK_BYTES)
    before = running.snapshot()
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED,
           f"upload of {12 * 4 + MAX_UPLOAD_BYTES} bytes exceeds server.max_upload_bytes ({MAX_UPLOAD_BYTES})",
           lambda: running.submit("hospital-a", msgs))
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


def test_chunk_above_max_chunk_bytes_is_resource_exhausted(running: Fed) -> None:
    # A run whose update is larger than one chunk; the client sends it in one oversized chunk.
    msgs = upload_msgs(1, WEIGHT["hospital-a"], make_update(66), chunk_bytes=CHUNK)
    oversized = [msgs[0], chunk(b"\0" * (MAX_CHUNK_BYTES + 1)), *msgs[1:]]
    before = running.snapshot()
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, f"chunk of {MAX_CHUNK_BYTES + 1} bytes exceeds the limit of "
           f"{MAX_CHUNK_BYTES} bytes", lambda: running.submit("hospital-a", oversized))
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


# -- malformed messages ---------------------------------------------------------------------------


def _chunk_first(m: list) -> list:
    return m[1:]


def _two_headers(m: list) -> list:
    return [m[0], m[1], m[0], *m[2:]]


def _unspecified_dtype(m: list) -> list:
    h = federation_pb2.SubmitUpdateRequest()
    h.CopyFrom(m[0])
    h.header.manifest.tensors[1].dtype = tensor_pb2.DTYPE_UNSPECIFIED
    return [h, *m[1:]]


def _unknown_dtype(m: list) -> list:
    h = federation_pb2.SubmitUpdateRequest()
    h.CopyFrom(m[0])
    h.header.manifest.tensors[0].dtype = 42
    return [h, *m[1:]]


def _wrong_total(m: list) -> list:
    h = federation_pb2.SubmitUpdateRequest()
    h.CopyFrom(m[0])
    h.header.manifest.total_bytes = PAYLOAD_BYTES + 4
    return [h, *m[1:]]


def _empty_message(m: list) -> list:
    return [federation_pb2.SubmitUpdateRequest(), *m]


def _empty_stream(m: list) -> list:
    return []


def _bad_weight(m: list) -> list:
    h = federation_pb2.SubmitUpdateRequest()
    h.CopyFrom(m[0])
    h.header.weight = float("nan")
    return [h, *m[1:]]


@pytest.mark.parametrize("tamper, fragment", [
    (_chunk_first, "an upload stream must start with a header"),
    (_two_headers, "a second header in one upload stream"),
    (_unspecified_dtype, "tensor 'layer.bias' has unknown dtype 0"),
    (_unknown_dtype, "tensor 'layer.weight' has unknown dtype 42"),
    (_wrong_total, f"manifest total_bytes {PAYLOAD_BYTES + 4} != sum of tensor sizes {PAYLOAD_BYTES}"),
    (_empty_message, "an upload message carries none of header, chunk or trailer"),
    (_empty_stream, "empty upload stream: expected a header"),
    (_bad_weight, "weight nan is not a finite number"),
], ids=["chunk-first", "second-header", "unspecified-dtype", "unknown-dtype", "total-bytes", "empty-message",
        "empty-stream", "nan-weight"])
def test_malformed_upload_message_is_invalid_argument(running: Fed, tamper: Callable[[list], list],
                                                      fragment: str) -> None:
    msgs = tamper(upload_msgs(1, WEIGHT["hospital-a"], make_update(66)))
    before = running.snapshot()
    expect(grpc.StatusCode.INVALID_ARGUMENT, fragment, lambda: running.submit("hospital-a", msgs))
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


# -- joins ----------------------------------------------------------------------------------------


def test_join_with_a_different_model_or_manifest_is_failed_precondition(fed: Fed) -> None:
    assert fed.join("hospital-a").state == federation_pb2.RUN_STATE_WAITING_FOR_SILOS
    before = fed.snapshot()
    assert [s.joined for s in before[0].silos] == [True, False]
    expect(grpc.StatusCode.FAILED_PRECONDITION, f"model fingerprint {'ab' * 6}… differs from the run's "
           f"{FINGERPRINT[:12]}…", lambda: fed.join("hospital-b", fingerprint="ab" * 32))
    expect(grpc.StatusCode.FAILED_PRECONDITION,
           "shared tensors differ from the run's: tensor 'layer.bias' has shape [6], expected [5]",
           lambda: fed.join("hospital-b", arrays=make_update(0, {"layer.weight": (3, 4), "layer.bias": (6,)})))
    expect(grpc.StatusCode.FAILED_PRECONDITION, "shared tensors differ from the run's: tensor 'layer.bias' is missing",
           lambda: fed.join("hospital-b", arrays=make_update(0, {"layer.weight": (3, 4)})))
    # Malformed rather than different: INVALID_ARGUMENT.
    expect(grpc.StatusCode.INVALID_ARGUMENT, "model_fingerprint must be 64 lowercase hex characters",
           lambda: fed.join("hospital-b", fingerprint="XYZ"))
    assert fed.snapshot() == before
    # The silo joins once it presents the run's model; the run starts and the round works.
    assert fed.join("hospital-b").state == federation_pb2.RUN_STATE_RUNNING
    fed.finish_round(1, GOOD)


def test_calls_before_join_are_failed_precondition(fed: Fed) -> None:
    fed.join("hospital-a")
    before = fed.snapshot()
    stub = fed.stub("hospital-b")
    not_joined = "silo 'hospital-b' has not joined run 'grpc-bad-input'; call Join first"
    expect(grpc.StatusCode.FAILED_PRECONDITION, not_joined,
           lambda: stub.GetTask(federation_pb2.GetTaskRequest(), timeout=RPC_TIMEOUT_S))
    expect(grpc.StatusCode.FAILED_PRECONDITION, not_joined,
           lambda: stub.SubmitUpdate(iter(upload_msgs(1, WEIGHT["hospital-b"], make_update(66))),
                                     timeout=RPC_TIMEOUT_S))
    expect(grpc.StatusCode.FAILED_PRECONDITION, not_joined,
           lambda: stub.Heartbeat(federation_pb2.HeartbeatRequest(), timeout=RPC_TIMEOUT_S))
    # A joined silo cannot upload before the run starts either.
    expect(grpc.StatusCode.FAILED_PRECONDITION, "run 'grpc-bad-input' is waiting; no round is open",
           lambda: fed.submit("hospital-a", upload_msgs(1, WEIGHT["hospital-a"], make_update(66))))
    assert fed.snapshot() == before


@pytest.mark.parametrize("rnd, code, fragment", [
    (0, grpc.StatusCode.INVALID_ARGUMENT, "round 0 is not in [1, 2]"),
    (3, grpc.StatusCode.INVALID_ARGUMENT, "round 3 is not in [1, 2]"),
    (1, grpc.StatusCode.FAILED_PRECONDITION, "round 1 is not closed yet; its aggregate does not exist"),
], ids=["zero", "beyond-run", "open"])
def test_fetch_of_a_round_without_aggregate_is_refused(running: Fed, rnd: int, code: grpc.StatusCode,
                                                       fragment: str) -> None:
    before = running.snapshot()
    expect(code, fragment, lambda: list(running.stub("hospital-a").FetchAggregate(
        federation_pb2.FetchAggregateRequest(round=rnd), timeout=RPC_TIMEOUT_S)))
    assert running.snapshot() == before  # no bytes_down counted for a refused fetch
    running.finish_round(1, GOOD)


# -- metrics and long polls -------------------------------------------------------------------------


def _metrics(rnd: int, *items: tuple[str, float]) -> federation_pb2.ReportMetricsRequest:
    return federation_pb2.ReportMetricsRequest(
        round=rnd, metrics=[federation_pb2.Metric(name=n, value=v, num_examples=10) for n, v in items])


@pytest.mark.parametrize("request_, code, fragment", [
    (_metrics(1, ("dice", float("nan"))), grpc.StatusCode.INVALID_ARGUMENT, "metric 'dice' is not finite (nan)"),
    (_metrics(1, ("dice", float("inf"))), grpc.StatusCode.INVALID_ARGUMENT, "metric 'dice' is not finite (inf)"),
    (_metrics(1, ("Dice", 0.5)), grpc.StatusCode.INVALID_ARGUMENT,
     "metric name 'Dice' is not 1..64 chars of [a-z0-9_]"),
    (_metrics(1, ("dice score", 0.5)), grpc.StatusCode.INVALID_ARGUMENT, "metric name 'dice score'"),
    (_metrics(1, ("dice", 0.5), ("dice", 0.6)), grpc.StatusCode.INVALID_ARGUMENT, "metric 'dice' appears twice"),
    (_metrics(1), grpc.StatusCode.INVALID_ARGUMENT, "expected 1..64 metrics, got 0"),
    (_metrics(2, ("dice", 0.5)), grpc.StatusCode.FAILED_PRECONDITION, "round 2 is not closed"),
    (_metrics(7, ("dice", 0.5)), grpc.StatusCode.FAILED_PRECONDITION, "round 7 is not closed"),
], ids=["nan", "inf", "uppercase-name", "space-in-name", "duplicate", "none", "open-round", "beyond-run"])
def test_bad_metrics_are_refused(running: Fed, request_: federation_pb2.ReportMetricsRequest,
                                 code: grpc.StatusCode, fragment: str) -> None:
    running.finish_round(1, GOOD)  # round 1 closed, round 2 open
    stub = running.stub("hospital-a")
    before = running.snapshot()
    expect(code, fragment, lambda: stub.ReportMetrics(request_, timeout=RPC_TIMEOUT_S))
    after = running.snapshot()
    assert after == before
    assert all(not r.metrics for r in after[1].rounds)
    # A well-formed report for the closed round is stored.
    assert stub.ReportMetrics(_metrics(1, ("dice", 0.5)), timeout=RPC_TIMEOUT_S).stored == 1
    assert [m.silo for m in running.snapshot()[1].rounds[0].metrics] == ["hospital-a"]


def test_a_long_metric_name_is_refused_first_quoting_only_an_excerpt(running: Fed) -> None:
    """A 1 MiB name (a 7 MiB one once wrote 110 MB of logs) is refused before any other check of
    the report (here a NaN value before it), and the refusal quotes its first 80 characters."""
    running.finish_round(1, GOOD)
    stub = running.stub("hospital-a")
    before = running.snapshot()
    long = "a" * 2**20 + "X"
    request_ = _metrics(1, ("dice", float("nan")), (long, 0.5))
    err = expect(grpc.StatusCode.INVALID_ARGUMENT, "metric name '" + "a" * 80,
                 lambda: stub.ReportMetrics(request_, timeout=RPC_TIMEOUT_S))
    details = err.details() or ""
    assert details.endswith(f" ({2**20 + 1 - 80} more characters)' is not 1..64 chars of [a-z0-9_]"), details
    assert len(details) < 200
    assert running.snapshot() == before
    assert stub.ReportMetrics(_metrics(1, ("dice", 0.5)), timeout=RPC_TIMEOUT_S).stored == 1


@pytest.mark.parametrize("request_, fragment", [
    (federation_pb2.GetTaskRequest(after_round=0, wait_seconds=61), "wait_seconds 61 is not in [0, 60]"),
    (federation_pb2.GetTaskRequest(after_round=0, wait_seconds=2**32 - 1), "wait_seconds 4294967295 is not in [0, 60]"),
    (federation_pb2.GetTaskRequest(after_round=3, wait_seconds=0), "after_round 3 is not in [0, 2]"),
], ids=["61s", "uint32-max", "after-round"])
def test_get_task_out_of_range_is_invalid_argument(running: Fed, request_: federation_pb2.GetTaskRequest,
                                                   fragment: str) -> None:
    before = running.snapshot()
    expect(grpc.StatusCode.INVALID_ARGUMENT, fragment,
           lambda: running.stub("hospital-a").GetTask(request_, timeout=RPC_TIMEOUT_S))
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


# -- a large update streams through the normal message limit ----------------------------------------

BIG_ELEMS = 16 * 2**20  # 16M float32 = 64 MiB
BIG_CHUNK = 2**20


def _big_chunks() -> Iterator[bytes]:
    """The 64 MiB payload, generated 1 MiB at a time (never whole in memory on the client)."""
    per = BIG_CHUNK // 4
    for k in range(BIG_ELEMS // per):
        block = (np.arange(k * per, (k + 1) * per, dtype=np.int64) % 4093 - 2046).astype("<f4") * np.float32(0.25)
        yield block.tobytes()


def test_64_mib_update_streams_in_1_mib_chunks_under_the_default_message_limit(start_fed: Callable[..., Fed]) -> None:
    fed = start_fed(silos=("hospital-a",), min_silos=1, rounds=1, max_upload_bytes=2**30,
                    max_chunk_bytes=BIG_CHUNK, round_deadline_s=120.0)
    # Default channel options: the client keeps gRPC's 4 MB receive limit and sends 1 MiB messages.
    stub = federation_pb2_grpc.FederationStub(fed.channel(fed.certs.silo["hospital-a"], options=[]))
    specs = [tensor_pb2.TensorSpec(name="big.weight", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4096, 4096])]
    stub.Join(federation_pb2.JoinRequest(model_fingerprint=FINGERPRINT, num_train_examples=3,  # the weight below
                                         shared_tensors=specs), timeout=RPC_TIMEOUT_S)
    sha = hashlib.sha256()
    counter = {"chunks": 0}

    def requests() -> Iterator[federation_pb2.SubmitUpdateRequest]:
        yield federation_pb2.SubmitUpdateRequest(header=federation_pb2.UpdateHeader(
            round=1, weight=3.0, manifest=tensor_pb2.PayloadManifest(tensors=specs, total_bytes=4 * BIG_ELEMS),
            encoding=federation_pb2.PAYLOAD_ENCODING_RAW_TENSORS, payload_bytes=4 * BIG_ELEMS))
        for data in _big_chunks():
            sha.update(data)
            counter["chunks"] += 1
            yield chunk(data)
        paths = fed.certs.silo["hospital-a"]
        statement = sign_upload_statement(run_id=RUN_ID, round=1, silo="hospital-a", sha256=sha.hexdigest(),
                                          payload_bytes=4 * BIG_ELEMS, certificate_pem=paths.cert.read_bytes(),
                                          private_key_pem=paths.key.read_bytes()).to_json()
        yield federation_pb2.SubmitUpdateRequest(trailer=tensor_pb2.PayloadTrailer(
            num_chunks=counter["chunks"], sha256=sha.digest(), upload_statement=statement))

    resp = stub.SubmitUpdate(requests(), timeout=60)
    assert (resp.round, resp.bytes_received, resp.uploads_in_round) == (1, 4 * BIG_ELEMS, 1)
    assert counter["chunks"] == 64

    # The only silo uploaded: the round closed and the run finished. With one contributor the
    # weighted mean is the upload itself, bit for bit: stream it back and compare digests.
    status, rounds = fed.snapshot()
    assert (status.state, status.last_closed_round) == (federation_pb2.RUN_STATE_FINISHED, 1)
    assert rounds.rounds[0].bytes_up > 4 * BIG_ELEMS
    back = hashlib.sha256()
    n = 0
    tail = None
    for part in stub.FetchAggregate(federation_pb2.FetchAggregateRequest(round=1), timeout=60):
        kind = part.WhichOneof("part")
        if kind == "header":
            assert part.header.num_contributors == 1 and part.header.total_weight == 3.0
        elif kind == "chunk":
            assert len(part.chunk) <= BIG_CHUNK
            back.update(part.chunk)
            n += 1
        else:
            tail = part.trailer
    assert tail is not None and tail.num_chunks == n == 64
    assert back.digest() == tail.sha256 == sha.digest()
