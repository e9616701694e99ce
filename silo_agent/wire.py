"""The agent's one conversion module between ``fedsilo.v1`` messages and plain objects."""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsilo.coordinator.config import AggregationMode, Strategy
from fedsilo.coordinator.errors import InvalidArgument
from fedsilo.coordinator.tensors import DType, Manifest, TensorSpec, arrays_from_payload, payload_chunks
from fedsilo.v1 import admin_pb2, federation_pb2, tensor_pb2

_STRATEGY = {federation_pb2.STRATEGY_FEDAVG: Strategy.FEDAVG, federation_pb2.STRATEGY_FEDBN: Strategy.FEDBN}
_AGGREGATION = {federation_pb2.AGGREGATION_PLAIN: AggregationMode.PLAIN}


class Activity(enum.Enum):
    """What an agent reports it is doing in its heartbeats."""

    IDLE = federation_pb2.AGENT_ACTIVITY_IDLE
    TRAINING = federation_pb2.AGENT_ACTIVITY_TRAINING
    UPLOADING = federation_pb2.AGENT_ACTIVITY_UPLOADING
    EVALUATING = federation_pb2.AGENT_ACTIVITY_EVALUATING


@dataclass(frozen=True, kw_only=True)
class RunInfo:
    """What the coordinator says about the run."""

    run_id: str
    total_rounds: int
    strategy: Strategy
    aggregation: AggregationMode
    model_config: dict[str, Any]
    training_config: dict[str, Any]
    max_chunk_bytes: int


@dataclass(frozen=True, kw_only=True)
class Task:
    """A task poll answer."""

    kind: str  # "wait", "train" or "stop"
    round: int
    base_round: int
    deadline_ms: int
    last_closed_round: int
    failed: bool
    message: str


@dataclass(frozen=True, kw_only=True)
class Aggregate:
    """A fetched aggregate: the weighted mean of the contributors' updates."""

    round: int
    num_contributors: int
    total_weight: float
    arrays: dict[str, np.ndarray]
    wire_bytes: int


def run_info_from_proto(msg: federation_pb2.GetRunResponse) -> RunInfo:
    """Converts GetRun's answer.

    Raises:
        InvalidArgument: a strategy or aggregation this agent does not implement.
    """
    if msg.strategy not in _STRATEGY:
        raise InvalidArgument(f"the coordinator asks for strategy {msg.strategy}, which this agent does not know")
    if msg.aggregation not in _AGGREGATION:
        raise InvalidArgument(f"the coordinator asks for aggregation {msg.aggregation}, which this agent does not know")
    return RunInfo(run_id=msg.run_id, total_rounds=msg.total_rounds, strategy=_STRATEGY[msg.strategy],
                   aggregation=_AGGREGATION[msg.aggregation], model_config=json.loads(msg.model_config_json or "{}"),
                   training_config=json.loads(msg.training_config_json or "{}"), max_chunk_bytes=msg.max_chunk_bytes)


def specs_to_proto(manifest: Manifest) -> list[tensor_pb2.TensorSpec]:
    """Tensor specs as messages."""
    return [tensor_pb2.TensorSpec(name=t.name, dtype=t.dtype.value, shape=list(t.shape)) for t in manifest.tensors]


def join_request(*, fingerprint: str, num_train_examples: int, manifest: Manifest,
                 agent_version: str) -> federation_pb2.JoinRequest:
    """Builds a JoinRequest."""
    return federation_pb2.JoinRequest(model_fingerprint=fingerprint, num_train_examples=num_train_examples,
                                      shared_tensors=specs_to_proto(manifest), agent_version=agent_version)


def task_from_proto(msg: federation_pb2.GetTaskResponse) -> Task:
    """Converts a task poll answer."""
    kind = {federation_pb2.TASK_KIND_WAIT: "wait", federation_pb2.TASK_KIND_TRAIN: "train",
            federation_pb2.TASK_KIND_STOP: "stop"}.get(msg.kind, "wait")
    return Task(kind=kind, round=msg.round, base_round=msg.base_round, deadline_ms=msg.deadline_unix_ms,
                last_closed_round=msg.last_closed_round, failed=msg.state == federation_pb2.RUN_STATE_FAILED,
                message=msg.message)


def upload_requests(rnd: int, weight: float, arrays: Mapping[str, np.ndarray],
                    chunk_bytes: int) -> Iterator[federation_pb2.SubmitUpdateRequest]:
    """The upload stream for one update: header, chunks (never above ``chunk_bytes``), trailer."""
    manifest = Manifest.of_arrays(arrays)
    yield federation_pb2.SubmitUpdateRequest(header=federation_pb2.UpdateHeader(
        round=rnd, weight=weight, manifest=tensor_pb2.PayloadManifest(tensors=specs_to_proto(manifest),
                                                                      total_bytes=manifest.total_bytes)))
    sha = hashlib.sha256()
    n = 0
    for chunk in payload_chunks(arrays, chunk_bytes):
        sha.update(chunk)
        n += 1
        yield federation_pb2.SubmitUpdateRequest(chunk=chunk)
    yield federation_pb2.SubmitUpdateRequest(trailer=tensor_pb2.PayloadTrailer(num_chunks=n, sha256=sha.digest()))


def aggregate_from_stream(responses: Iterable[federation_pb2.FetchAggregateResponse]) -> Aggregate:
    """Reassembles an aggregate stream, checking its size, chunk count and SHA-256.

    Raises:
        InvalidArgument: a malformed, truncated or corrupted stream.
    """
    header = None
    buf = bytearray()
    chunks = wire = 0
    trailer = None
    for resp in responses:
        wire += resp.ByteSize()
        kind = resp.WhichOneof("part")
        if kind == "header" and header is None:
            header = resp.header
        elif kind == "chunk" and header is not None and trailer is None:
            buf += resp.chunk
            chunks += 1
        elif kind == "trailer" and header is not None and trailer is None:
            trailer = resp.trailer
        else:
            raise InvalidArgument(f"unexpected {kind!r} message in the aggregate stream")
    if header is None or trailer is None:
        raise InvalidArgument("aggregate stream truncated")
    specs = []
    for t in header.manifest.tensors:
        specs.append(TensorSpec(name=t.name, dtype=DType(t.dtype), shape=tuple(int(d) for d in t.shape)))
    manifest = Manifest(tensors=tuple(specs))
    if trailer.num_chunks != chunks or hashlib.sha256(buf).digest() != trailer.sha256:
        raise InvalidArgument("aggregate stream corrupted: chunk count or SHA-256 mismatch")
    return Aggregate(round=header.round, num_contributors=header.num_contributors, total_weight=header.total_weight,
                     arrays=arrays_from_payload(manifest, bytes(buf)), wire_bytes=wire)


def metrics_request(rnd: int, metrics: Mapping[str, tuple[float, int]]) -> federation_pb2.ReportMetricsRequest:
    """Builds a ReportMetricsRequest from name -> (value, num_examples)."""
    return federation_pb2.ReportMetricsRequest(
        round=rnd, metrics=[federation_pb2.Metric(name=k, value=float(v), num_examples=int(n))
                            for k, (v, n) in metrics.items()])


_RUN_STATE_NAMES = {
    federation_pb2.RUN_STATE_WAITING_FOR_SILOS: "waiting",
    federation_pb2.RUN_STATE_RUNNING: "running",
    federation_pb2.RUN_STATE_FINISHED: "finished",
    federation_pb2.RUN_STATE_FAILED: "failed",
}


def status_from_proto(msg: Any) -> dict[str, Any]:
    """The admin status as plain data."""
    return {
        "run_id": msg.run_id, "state": _RUN_STATE_NAMES.get(msg.state, "unknown"), "open_round": msg.open_round,
        "last_closed_round": msg.last_closed_round, "total_rounds": msg.total_rounds, "message": msg.message,
        "silos": [{"name": s.name, "joined": s.joined, "last_seen_unix_ms": s.last_seen_unix_ms,
                   "rounds_contributed": s.rounds_contributed, "num_train_examples": s.num_train_examples}
                  for s in msg.silos],
    }


def rounds_from_proto(msg: Any) -> list[dict[str, Any]]:
    """The admin round history as plain data."""
    return [{
        "round": r.round, "closed": r.closed, "contributors": list(r.contributors), "params_shared": r.params_shared,
        "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "seconds": r.seconds,
        "total_weight": r.total_weight,
        "metrics": {sm.silo: {m.name: {"value": m.value, "num_examples": m.num_examples} for m in sm.metrics}
                    for sm in r.metrics},
    } for r in msg.rounds]


def get_run_request() -> federation_pb2.GetRunRequest:
    """Builds a GetRunRequest."""
    return federation_pb2.GetRunRequest()


def get_task_request(after_round: int, wait_s: int) -> federation_pb2.GetTaskRequest:
    """Builds a long-poll request."""
    return federation_pb2.GetTaskRequest(after_round=after_round, wait_seconds=wait_s)


def fetch_request(rnd: int) -> federation_pb2.FetchAggregateRequest:
    """Builds a FetchAggregateRequest."""
    return federation_pb2.FetchAggregateRequest(round=rnd)


def heartbeat_request(rnd: int, activity: Activity) -> federation_pb2.HeartbeatRequest:
    """Builds a heartbeat."""
    return federation_pb2.HeartbeatRequest(round=rnd, activity=activity.value)


def status_request() -> admin_pb2.GetStatusRequest:
    """Builds an admin status request."""
    return admin_pb2.GetStatusRequest()


def rounds_request() -> admin_pb2.ListRoundsRequest:
    """Builds an admin round-history request."""
    return admin_pb2.ListRoundsRequest()
