"""One hostile silo cannot exhaust what the others need: per-identity call limits, stall timeouts,
clean cancellation and bounded refusal logs, over REAL gRPC with mutual TLS on loopback.

A ``CoordinatorServer`` (plain aggregation, three enrolled hospitals, its worker pool sized by
the server itself) runs in this process. ``hospital-a`` plays the compromised silo: it holds a
valid certificate and opens stalled streams, unary calls whose request never comes, and floods
of long-polls. The others, the study lead and the health check must still be answered at once.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedsilo.coordinator.config import AggregationMode, FederationConfig, TlsFiles
from fedsilo.coordinator.limits import RateLimitedLog
from fedsilo.coordinator.server import CoordinatorServer, server_options
from fedsilo.coordinator.servicer import MAX_DETAIL_CHARS, REFUSAL_DELAY_S, bounded
from fedsilo.privacy.upload_statement import sign_upload_statement
from fedsilo.silo_agent.client import channel_options
from fedsilo.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc, tensor_pb2

if TYPE_CHECKING:
    from conftest import Certs

RUN_ID = "grpc-limits"
SILOS = ("hospital-a", "hospital-b", "hospital-c")  # conftest.HOSPITALS
EXAMPLES = {"hospital-a": 100, "hospital-b": 200, "hospital-c": 300}
#: 4 MiB of float32: an aggregate well beyond the flow-control windows, so a client that stops
#: reading makes the coordinator's send block.
SHAPE = (1024, 1024)
PAYLOAD_BYTES = 4 * SHAPE[0] * SHAPE[1]
CHUNK_BYTES = 2**20
FINGERPRINT = "3c" * 32
RPC_TIMEOUT_S = 10
#: How fast a call that must not be blocked has to be answered.
PROMPT_S = 1.0
#: Fresh subchannels (connections) per channel.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
HEARTBEAT = "/fedsilo.v1.Federation/Heartbeat"


def manifest_msg() -> tensor_pb2.PayloadManifest:
    return tensor_pb2.PayloadManifest(
        tensors=[tensor_pb2.TensorSpec(name="layer.weight", dtype=tensor_pb2.DTYPE_FLOAT32, shape=list(SHAPE))],
        total_bytes=PAYLOAD_BYTES)


def header_msg(silo: str, rnd: int = 1) -> federation_pb2.SubmitUpdateRequest:
    return federation_pb2.SubmitUpdateRequest(header=federation_pb2.UpdateHeader(
        round=rnd, weight=float(EXAMPLES[silo]), manifest=manifest_msg(),
        encoding=federation_pb2.PAYLOAD_ENCODING_RAW_TENSORS, payload_bytes=PAYLOAD_BYTES))


class Fed:
    """A running coordinator, mTLS channels to it, and the requests the tests send."""

    def __init__(self, server: CoordinatorServer, certs: Certs) -> None:
        self.server = server
        self.certs = certs
        self.address = f"127.0.0.1:{server.port}"
        self._channels: list[grpc.Channel] = []
        self._cached: dict[str, grpc.Channel] = {}
        #: Set at teardown: every request stream the tests hold open ends.
        self.release = threading.Event()

    def channel(self, who: str, *, fresh: bool = False, options: list | None = None) -> grpc.Channel:
        """A channel as ``who`` (a silo name or "admin"); ``fresh``: a new connection."""
        if not fresh and who in self._cached:
            return self._cached[who]
        paths = self.certs.admin if who == "admin" else self.certs.silo[who]
        creds = grpc.ssl_channel_credentials(root_certificates=self.certs.ca.read_bytes(),
                                             private_key=paths.key.read_bytes(),
                                             certificate_chain=paths.cert.read_bytes())
        ch = grpc.secure_channel(self.address, creds, options=CHANNEL_OPTIONS + (options or []))
        self._channels.append(ch)
        if not fresh:
            self._cached[who] = ch
        return ch

    def stub(self, who: str, **kwargs: object) -> federation_pb2_grpc.FederationStub:
        return federation_pb2_grpc.FederationStub(self.channel(who, **kwargs))  # type: ignore[arg-type]

    def close(self) -> None:
        self.release.set()
        for ch in self._channels:
            ch.close()

    # -- the calls the others make, which must stay prompt ------------------------------------
    def snapshot(self) -> tuple[admin_pb2.GetStatusResponse, admin_pb2.ListRoundsResponse]:
        admin = admin_pb2_grpc.AdminStub(self.channel("admin"))
        return (admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_S),
                admin.ListRounds(admin_pb2.ListRoundsRequest(), timeout=RPC_TIMEOUT_S))

    def assert_others_prompt(self, silo: str = "hospital-b") -> None:
        """A Heartbeat of ``silo``, the admin's GetStatus and the health check each answer within PROMPT_S."""
        calls: dict[str, Callable[[], object]] = {
            "Heartbeat": lambda: self.stub(silo).Heartbeat(federation_pb2.HeartbeatRequest(), timeout=PROMPT_S),
            "GetStatus": lambda: admin_pb2_grpc.AdminStub(self.channel("admin")).GetStatus(
                admin_pb2.GetStatusRequest(), timeout=PROMPT_S),
            "health": lambda: health_pb2_grpc.HealthStub(self.channel("admin")).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=PROMPT_S),
        }
        for what, call in calls.items():
            start = time.monotonic()
            call()  # DEADLINE_EXCEEDED after PROMPT_S if it is blocked
            assert time.monotonic() - start < PROMPT_S, what

    # -- a round --------------------------------------------------------------------------
    def join_all(self) -> None:
        for silo in SILOS:
            self.stub(silo).Join(federation_pb2.JoinRequest(
                model_fingerprint=FINGERPRINT, num_train_examples=EXAMPLES[silo],
                shared_tensors=manifest_msg().tensors, agent_version="test/1"), timeout=RPC_TIMEOUT_S)
        for silo in SILOS:
            task = self.stub(silo).GetTask(federation_pb2.GetTaskRequest(after_round=0), timeout=RPC_TIMEOUT_S)
            assert (task.kind, task.round) == (federation_pb2.TASK_KIND_TRAIN, 1)

    def upload_msgs(self, silo: str, rnd: int = 1, seed: int = 0) -> list[federation_pb2.SubmitUpdateRequest]:
        """A valid upload: header, 1 MiB chunks, trailer with the silo's signed statement."""
        payload = np.random.default_rng(seed).uniform(-1, 1, SHAPE).astype("<f4").tobytes()
        digest = hashlib.sha256(payload)
        paths = self.certs.silo[silo]
        statement = sign_upload_statement(run_id=RUN_ID, round=rnd, silo=silo, sha256=digest.hexdigest(),
                                          payload_bytes=len(payload), certificate_pem=paths.cert.read_bytes(),
                                          private_key_pem=paths.key.read_bytes()).to_json()
        chunks = [payload[i:i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)]
        return [header_msg(silo, rnd), *(federation_pb2.SubmitUpdateRequest(chunk=c) for c in chunks),
                federation_pb2.SubmitUpdateRequest(trailer=tensor_pb2.PayloadTrailer(
                    num_chunks=len(chunks), sha256=digest.digest(), upload_statement=statement))]

    def submit(self, silo: str, msgs: list, timeout: float = RPC_TIMEOUT_S) -> federation_pb2.SubmitUpdateResponse:
        return self.stub(silo).SubmitUpdate(iter(msgs), timeout=timeout)

    def close_round(self, rnd: int = 1) -> None:
        for i, silo in enumerate(SILOS, start=1):
            assert self.submit(silo, self.upload_msgs(silo, rnd, seed=i)).uploads_in_round == i

    # -- what the hostile silo holds open ---------------------------------------------------
    def held(self, first: list) -> Iterator:
        """Sends ``first``, then nothing until teardown, without ending the stream."""
        yield from first
        self.release.wait()

    def stalled_upload(self, silo: str, *, with_header: bool, **channel: object) -> grpc.Future:
        msgs = [header_msg(silo)] if with_header else []
        return self.stub(silo, **channel).SubmitUpdate.future(self.held(msgs), timeout=60)

    def unary_without_request(self, silo: str, **channel: object) -> grpc.Future:
        """A Heartbeat whose request message never comes (a raw stream on a unary method)."""
        call = self.channel(silo, **channel).stream_unary(
            HEARTBEAT, request_serializer=federation_pb2.HeartbeatRequest.SerializeToString,
            response_deserializer=federation_pb2.HeartbeatResponse.FromString)
        return call.future(self.held([]), timeout=60)


def make_config(certs: Certs, state_dir: Path, **overrides: object) -> FederationConfig:
    kwargs: dict[str, object] = dict(
        run_id=RUN_ID, silos=SILOS, rounds=3, min_silos=3, aggregation=AggregationMode.PLAIN,
        round_deadline_s=600.0, quorum_timeout_s=600.0, start_grace_s=0.0, listen="127.0.0.1:0",
        state_dir=state_dir, tls=TlsFiles(ca=certs.ca, cert=certs.coordinator.cert, key=certs.coordinator.key),
        max_chunk_bytes=CHUNK_BYTES, model={"name": "tiny"}, training={"epochs": 1},
    )
    kwargs.update(overrides)
    return FederationConfig(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
def start_fed(certs: Certs, tmp_path: Path) -> Iterator[Callable[..., Fed]]:
    started: list[Fed] = []

    def start(**overrides: object) -> Fed:
        server = CoordinatorServer(make_config(certs, tmp_path / f"state{len(started)}", **overrides))
        server.start()
        fed = Fed(server, certs)
        started.append(fed)
        return fed

    yield start
    for fed in started:
        fed.close()
        fed.server.stop(grace=1.0)


def expect(code: grpc.StatusCode, fragment: str, call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() is code, (err.code(), err.details())
    assert fragment in (err.details() or ""), err.details()
    return err


def wait_for(predicate: Callable[[], bool], timeout: float = RPC_TIMEOUT_S) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def log_lines(caplog: pytest.LogCaptureFixture, fragment: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if fragment in r.getMessage()]


# -- per-identity limits ----------------------------------------------------------------------------


def test_a_second_upload_of_one_silo_is_resource_exhausted_and_the_others_upload(start_fed: Callable[..., Fed]) -> None:
    fed = start_fed(stall_timeout_s=60.0)  # the limit, not the timeout, protects the others here
    fed.join_all()
    stalled = fed.stalled_upload("hospital-a", with_header=True)
    time.sleep(0.3)  # it reaches the coordinator
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "upload limit 1",
           lambda: fed.submit("hospital-a", fed.upload_msgs("hospital-a"), timeout=PROMPT_S))
    # Both global upload slots would be held by hospital-a without the per-identity limit.
    start = time.monotonic()
    assert fed.submit("hospital-b", fed.upload_msgs("hospital-b"), timeout=5).uploads_in_round == 1
    assert fed.submit("hospital-c", fed.upload_msgs("hospital-c"), timeout=5).uploads_in_round == 2
    assert time.monotonic() - start < 5
    assert not stalled.done()


def test_long_polls_and_calls_in_all_are_limited_per_identity(start_fed: Callable[..., Fed]) -> None:
    fed = start_fed(stall_timeout_s=60.0)
    fed.join_all()
    wait = federation_pb2.GetTaskRequest(after_round=1, wait_seconds=6)  # round 1 stays open: they wait
    polls = [fed.stub("hospital-a").GetTask.future(wait, timeout=RPC_TIMEOUT_S) for _ in range(2)]
    time.sleep(0.3)  # they reach the coordinator
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "long-poll limit 2",
           lambda: fed.stub("hospital-a").GetTask(wait, timeout=PROMPT_S))
    # hospital-b's own long-poll is admitted: it waits (and times out on the client), it is not refused.
    short = federation_pb2.GetTaskRequest(after_round=1, wait_seconds=1)
    expect(grpc.StatusCode.DEADLINE_EXCEEDED, "", lambda: fed.stub("hospital-b").GetTask(short, timeout=0.5))
    # Up to max_calls_per_identity (8) in all: 2 long-polls and 6 unary calls whose request never comes.
    held = [fed.unary_without_request("hospital-a") for _ in range(6)]
    time.sleep(0.3)
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "max_calls_per_identity = 8",
           lambda: fed.stub("hospital-a").Heartbeat(federation_pb2.HeartbeatRequest(), timeout=PROMPT_S))
    fed.assert_others_prompt()
    assert not any(f.done() for f in polls + held)
    for f in polls:  # they end by themselves, none is left waiting when the coordinator stops
        assert f.result(timeout=RPC_TIMEOUT_S).kind == federation_pb2.TASK_KIND_WAIT


# -- a hostile silo holding everything it can -----------------------------------------------------


def test_64_stalled_streams_and_200_long_polls_of_one_silo_leave_the_others_prompt(
        start_fed: Callable[..., Fed]) -> None:
    fed = start_fed(stall_timeout_s=60.0)
    fed.join_all()

    def refused(futures: list[grpc.Future]) -> int:
        return sum(f.done() and f.exception() is not None
                   and f.exception().code() is grpc.StatusCode.RESOURCE_EXHAUSTED for f in futures)

    held = [fed.stalled_upload("hospital-a", with_header=i % 2 == 0) for i in range(32)]
    held += [fed.unary_without_request("hospital-a") for _ in range(32)]  # 64 on one connection
    # All but hospital-a's share (8 calls in all) are refused at once; the 8 stay held.
    assert wait_for(lambda: refused(held) == 64 - 8)
    fed.assert_others_prompt()
    wait = federation_pb2.GetTaskRequest(after_round=1, wait_seconds=60)
    polls = [fed.stub("hospital-a", fresh=True).GetTask.future(wait, timeout=60) for _ in range(200)]
    assert wait_for(lambda: refused(polls) == 200, timeout=60)  # 200 connections: no room left for a long-poll
    assert sum(not f.done() for f in held) == 8
    for _ in range(3):
        fed.assert_others_prompt()
        fed.assert_others_prompt("hospital-c")


# -- stall timeouts ---------------------------------------------------------------------------


STALLS: dict[str, Callable[[Fed], grpc.Future]] = {
    "upload-before-header": lambda fed: fed.stalled_upload("hospital-a", with_header=False),
    "upload-after-header": lambda fed: fed.stalled_upload("hospital-a", with_header=True),
    "unary-without-request": lambda fed: fed.unary_without_request("hospital-a"),
}


@pytest.mark.parametrize("stall", list(STALLS.values()), ids=list(STALLS))
def test_a_stalled_call_is_cut_after_stall_timeout_and_its_slot_freed(start_fed: Callable[..., Fed],
                                                                      stall: Callable[[Fed], grpc.Future]) -> None:
    fed = start_fed(stall_timeout_s=1.0)
    fed.join_all()
    before = fed.snapshot()
    start = time.monotonic()
    stalled = stall(fed)
    with pytest.raises(grpc.RpcError) as info:
        stalled.result(timeout=RPC_TIMEOUT_S)
    took = time.monotonic() - start
    # gRPC's public API can only cancel a call: the client sees CANCELLED; the log says why.
    assert info.value.code() is grpc.StatusCode.CANCELLED
    assert 1.0 <= took < 3.0, took
    assert fed.snapshot() == before
    # The slot is free again: hospital-a's real upload is accepted.
    assert fed.submit("hospital-a", fed.upload_msgs("hospital-a")).uploads_in_round == 1


def test_a_trickling_upload_is_cut_below_the_minimum_rate(start_fed: Callable[..., Fed]) -> None:
    fed = start_fed(stall_timeout_s=1.0, min_transfer_bytes_per_s=64 * 1024)
    fed.join_all()

    def trickle() -> Iterator[federation_pb2.SubmitUpdateRequest]:
        yield header_msg("hospital-a")
        while not fed.release.is_set():  # one byte every 0.2 s: never 1 s without a message
            yield federation_pb2.SubmitUpdateRequest(chunk=b"\0")
            time.sleep(0.2)

    start = time.monotonic()
    future = fed.stub("hospital-a").SubmitUpdate.future(trickle(), timeout=RPC_TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as info:
        future.result(timeout=RPC_TIMEOUT_S)
    assert info.value.code() is grpc.StatusCode.CANCELLED
    assert time.monotonic() - start < 4.0
    assert fed.submit("hospital-a", fed.upload_msgs("hospital-a")).uploads_in_round == 1


def test_a_fetch_whose_client_stops_reading_is_cut_and_its_slot_freed(start_fed: Callable[..., Fed]) -> None:
    fed = start_fed(stall_timeout_s=1.0)
    fed.join_all()
    fed.close_round()
    request = federation_pb2.FetchAggregateRequest(round=1)
    slow = [("grpc.http2.bdp_probe", 0)]  # the client's receive window stays small
    for _ in range(3):  # more cuts than the 2 downloads one identity may hold: each one freed its slot
        stream = fed.stub("hospital-a", fresh=True, options=slow).FetchAggregate(request, timeout=RPC_TIMEOUT_S)
        assert next(stream).WhichOneof("part") == "header"
        time.sleep(2.5)  # stops reading; the coordinator's send blocks
        with pytest.raises(grpc.RpcError) as info:
            for _ in stream:
                pass
        assert info.value.code() is grpc.StatusCode.CANCELLED
    got = b"".join(r.chunk for r in fed.stub("hospital-a").FetchAggregate(request, timeout=RPC_TIMEOUT_S))
    assert len(got) == PAYLOAD_BYTES


def test_a_slow_but_steady_upload_is_not_cut(start_fed: Callable[..., Fed]) -> None:
    fed = start_fed(stall_timeout_s=1.0)
    fed.join_all()

    def paced() -> Iterator[federation_pb2.SubmitUpdateRequest]:
        header, *rest = fed.upload_msgs("hospital-a")
        yield header
        for msg in rest:
            time.sleep(0.6)  # a 1 MiB chunk every 0.6 s (1.7 MB/s), 3 s in all: longer than stall_timeout_s
            yield msg

    assert fed.stub("hospital-a").SubmitUpdate(paced(), timeout=RPC_TIMEOUT_S).uploads_in_round == 1


def test_the_agents_keepalive_pings_keep_to_the_coordinators_ping_policy() -> None:
    server, agent = dict(server_options(CHUNK_BYTES)), dict(channel_options())
    # The coordinator pings idle connections and drops a peer that does not answer: a vanished
    # silo's calls end and free their slots.
    assert 0 < server["grpc.keepalive_timeout_ms"] < server["grpc.keepalive_time_ms"]
    # Pings closer together than the minimum are strikes (GOAWAY "too_many_pings" after a few);
    # the agent's are not.
    assert server["grpc.http2.max_ping_strikes"] >= 1
    assert agent["grpc.keepalive_time_ms"] >= server["grpc.http2.min_recv_ping_interval_without_data_ms"]


# -- cancellation -----------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [0, 2], ids=["before-header", "mid-stream"])
def test_a_cancelled_upload_ends_cleanly_without_a_traceback(start_fed: Callable[..., Fed],
                                                             caplog: pytest.LogCaptureFixture, sent: int) -> None:
    fed = start_fed()
    fed.join_all()
    msgs = fed.upload_msgs("hospital-a")
    before = fed.snapshot()
    with caplog.at_level(logging.DEBUG):
        future = fed.stub("hospital-a").SubmitUpdate.future(fed.held(msgs[:sent]), timeout=RPC_TIMEOUT_S)
        time.sleep(0.3)
        assert future.cancel()
        # gRPC hands the handler either the cancellation or, when the stream reset arrives first, a
        # plain end of stream (then the refusal names the truncated stream): an INFO line either way.
        assert wait_for(lambda: log_lines(caplog, "SubmitUpdate of silo:hospital-a refused: "))
        time.sleep(0.2)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    ended = log_lines(caplog, "SubmitUpdate of silo:hospital-a refused: ")
    assert len(ended) == 1 and ended[0].levelno == logging.INFO
    assert any(w in ended[0].getMessage() for w in ("CANCELLED: the client cancelled the call",
                                                    "INVALID_ARGUMENT: empty upload stream",
                                                    "INVALID_ARGUMENT: upload truncated")), ended[0].getMessage()
    assert fed.snapshot() == before
    assert fed.submit("hospital-a", msgs).uploads_in_round == 1  # the slot was freed


# -- bounded logs -----------------------------------------------------------------------------


def test_an_oversized_refusal_is_cut_short_in_the_status_and_the_log_rate_limited_and_delayed(
        start_fed: Callable[..., Fed], caplog: pytest.LogCaptureFixture) -> None:
    fed = start_fed()
    fed.join_all()
    name = "X" * (2 * 2**20)
    request = federation_pb2.ReportMetricsRequest(round=1, metrics=[federation_pb2.Metric(name=name, value=1.0)])
    with caplog.at_level(logging.INFO, logger="fedsilo"):
        err = expect(grpc.StatusCode.INVALID_ARGUMENT, "is not 1..64 chars",
                     lambda: fed.stub("hospital-a").ReportMetrics(request, timeout=RPC_TIMEOUT_S))
        assert err.details().startswith("metric name 'XXX") and len(err.details()) < 600
        took = []
        for _ in range(30):
            t = time.monotonic()
            expect(grpc.StatusCode.INVALID_ARGUMENT, "is not 1..64 chars",
                   lambda: fed.stub("hospital-a").ReportMetrics(request, timeout=RPC_TIMEOUT_S))
            took.append(time.monotonic() - t)
        fed.assert_others_prompt()
    # past its 20 logged refusals a hammering caller is answered late (REFUSAL_DELAY_S): its loop slows
    assert max(took[:19]) < REFUSAL_DELAY_S and min(took[19:]) >= REFUSAL_DELAY_S, took
    refusals = log_lines(caplog, "ReportMetrics of silo:hospital-a refused")
    assert len(refusals) == 20  # 31 refusals: the first 20 logged
    assert all(len(r.getMessage()) < 1000 for r in caplog.records)
    assert len(log_lines(caplog, "silo:hospital-a: more than 20 log lines in 60 s")) == 1


def test_bounded_keeps_the_head_and_the_tail_of_a_long_message() -> None:
    text = "metric name '" + "X" * 10_000 + "' is not 1..64 chars of [a-z0-9_]"
    cut = bounded(text)
    assert cut.startswith("metric name 'XXX") and cut.endswith("' is not 1..64 chars of [a-z0-9_]")
    assert f"… ({len(text) - MAX_DETAIL_CHARS} more characters) …" in cut
    assert len(cut) < MAX_DETAIL_CHARS + 40
    assert bounded("σ ≤ 1: short messages are kept as they are") == "σ ≤ 1: short messages are kept as they are"


def test_rate_limited_log_counts_what_it_left_out_once_the_window_ends(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("fedsilo.test"), per_window=3, window_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="fedsilo.test"):
        logged = [limited.log(logging.INFO, "silo:a", "line %d", i) for i in range(10)]
        assert limited.log(logging.INFO, "silo:b", "another caller")
        now[0] = 61.0
        assert limited.log(logging.INFO, "silo:a", "a new window")
    assert logged == [True] * 3 + [False] * 7
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["line 0", "line 1", "line 2",
                        "silo:a: more than 3 log lines in 60 s; leaving the rest out until the window ends",
                        "another caller",
                        "silo:a: 7 more log lines were left out in 60 s (at most 3 a caller)",
                        "a new window"]
