"""The agent's one conversion module between ``fedsilo.v1`` messages and plain objects."""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsilo.coordinator.config import AggregationMode
from fedsilo.core.methods import Method, UnknownMethod, get_method
from fedsilo.core.errors import InvalidArgument
from fedsilo.core.phases import SharePhase
from fedsilo.core.tensors import PayloadEncoding
from fedsilo.core.tensors import DType, Manifest, TensorSpec, arrays_from_payload, payload_chunks
from fedsilo.v1 import admin_pb2, federation_pb2, tensor_pb2

_PHASE = {federation_pb2.SHARE_PHASE_ALL: SharePhase.ALL, federation_pb2.SHARE_PHASE_LORA_B: SharePhase.LORA_B,
          federation_pb2.SHARE_PHASE_LORA_A: SharePhase.LORA_A}
_AGGREGATION = {federation_pb2.AGGREGATION_PLAIN: AggregationMode.PLAIN, federation_pb2.AGGREGATION_HE: AggregationMode.HE}


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
    strategy: str
    task: str = "segmentation-2d"
    aggregation: AggregationMode
    model_config: dict[str, Any]
    training_config: dict[str, Any]
    max_chunk_bytes: int
    key_holder: str
    he_parameters: bytes
    privacy: Any = None  # fedsilo.privacy.plan.PrivacyPlan, or None for a run without DP
    #: The method's own tables by name, parsed by the method's declared parsers.
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def method(self) -> type[Method]:
        """The run's registered method (``strategy`` names it)."""
        return get_method(self.strategy)


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
    weight_normalizer: float
    phase: SharePhase = SharePhase.ALL


@dataclass(frozen=True, kw_only=True)
class Aggregate:
    """A fetched aggregate: the weighted mean of the updates (plain) or their encrypted sum (HE)."""

    round: int
    num_contributors: int
    total_weight: float
    manifest: Manifest
    encoding: PayloadEncoding
    weight_normalizer: float
    arrays: dict[str, np.ndarray] | None  # plain
    ciphertexts: list[bytes] | None  # HE
    wire_bytes: int
    #: Why the round failed ("" if it did not): then there is no payload and nobody applies it.
    failed: str = ""


def run_info_from_proto(msg: federation_pb2.GetRunResponse) -> RunInfo:
    """Converts GetRun's answer.

    Raises:
        InvalidArgument: a strategy or aggregation this agent does not implement.
    """
    try:
        method = get_method(msg.method)
    except UnknownMethod as exc:
        raise InvalidArgument(f"the coordinator asks for a method this agent does not implement: {exc}") from None
    if msg.aggregation not in _AGGREGATION:
        raise InvalidArgument(f"the coordinator asks for aggregation {msg.aggregation}, which this agent does not know")
    return RunInfo(run_id=msg.run_id, total_rounds=msg.total_rounds, strategy=msg.method, task=msg.task or "segmentation-2d",
                   aggregation=_AGGREGATION[msg.aggregation], model_config=json.loads(msg.model_config_json or "{}"),
                   training_config=json.loads(msg.training_config_json or "{}"), max_chunk_bytes=msg.max_chunk_bytes,
                   key_holder=msg.key_holder, he_parameters=bytes(msg.he_parameters),
                   privacy=privacy_plan_from_proto(msg.privacy), tables=_method_tables(method, msg.method_tables_json))


def _method_tables(method: type[Method], text: str) -> dict[str, dict[str, Any]]:
    """The run's method tables: a JSON object of objects, each a table ``method`` reads, parsed by its parser.

    Raises:
        InvalidArgument: malformed JSON, a table the method does not read, or one its parser refuses.
    """
    raw = _json_object(text or "{}", "method_tables_json")
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(raw) | set(method.default_tables)):
        if name not in method.tables:
            raise InvalidArgument(f"method_tables_json: method {method.name!r} reads no table {name!r}")
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise InvalidArgument(f"method_tables_json: table {name!r} must be a JSON object")
        parser = method.tables[name]
        try:
            out[name] = dict(parser(table)) if parser is not None else dict(table)
        except ValueError as exc:
            raise InvalidArgument(f"the coordinator's [{name}] settings are invalid: {exc}") from None
    return out


def privacy_plan_from_proto(msg: federation_pb2.PrivacyPlan) -> Any:
    """The run's DP plan, or None when both levels are off.

    Raises:
        InvalidArgument: a plan that fails validation (the message names the field).
    """
    from fedsilo.privacy.plan import PrivacyPlan

    if not (msg.record_level or msg.silo_level):
        return None
    try:
        return PrivacyPlan(record_level=msg.record_level, sample_rate=msg.sample_rate,
                           steps_per_round=msg.steps_per_round, max_grad_norm=msg.max_grad_norm,
                           noise_multiplier=msg.noise_multiplier, silo_level=msg.silo_level,
                           update_clip_norm=msg.update_clip_norm, update_noise_multiplier=msg.update_noise_multiplier,
                           noise_shares=msg.noise_shares, delta=msg.delta, resfim_every=msg.resfim_every,
                           fisher_noise_multiplier=msg.fisher_noise_multiplier, fisher_clip_norm=msg.fisher_clip_norm,
                           style_noise_multiplier=msg.style_noise_multiplier, style_clip_norm=msg.style_clip_norm)
    except ValueError as exc:
        raise InvalidArgument(f"the coordinator's privacy plan is invalid: {exc}") from None


def ledger_request(entries_json: Sequence[str]) -> federation_pb2.SubmitLedgerEntriesRequest:
    """Builds a SubmitLedgerEntriesRequest."""
    return federation_pb2.SubmitLedgerEntriesRequest(entries_json=list(entries_json))


def publish_sealed_request(purpose: str, blob: bytes) -> federation_pb2.PublishSealedRequest:
    """Builds a PublishSealedRequest: this silo's sealed ``blob`` under ``purpose``."""
    return federation_pb2.PublishSealedRequest(purpose=purpose, blob=blob)


def get_sealed_request(purpose: str, after_silo: str = "") -> federation_pb2.GetSealedRequest:
    """Builds a GetSealedRequest for the page of ``purpose`` after ``after_silo``."""
    return federation_pb2.GetSealedRequest(purpose=purpose, after_silo=after_silo)


def sealed_from_proto(msg: federation_pb2.GetSealedResponse) -> tuple[dict[str, bytes], int, bool]:
    """(silo -> sealed blob, silos joined, more pages follow)."""
    return {e.silo: bytes(e.blob) for e in msg.entries}, int(msg.silos_joined), bool(msg.more)


def decline_request(rnd: int, reason: str, final: bool) -> federation_pb2.DeclineRoundRequest:
    """Builds a DeclineRoundRequest."""
    return federation_pb2.DeclineRoundRequest(round=rnd, reason=reason[:1024], final=final)


def specs_to_proto(manifest: Manifest) -> list[tensor_pb2.TensorSpec]:
    """Tensor specs as messages."""
    return [tensor_pb2.TensorSpec(name=t.name, dtype=t.dtype.value, shape=list(t.shape)) for t in manifest.tensors]


def join_request(*, fingerprint: str, num_train_examples: int, manifest: Manifest, agent_version: str,
                 kem_announcement: bytes = b"", budget_statement: bytes = b"") -> federation_pb2.JoinRequest:
    """Builds a JoinRequest."""
    return federation_pb2.JoinRequest(model_fingerprint=fingerprint, num_train_examples=num_train_examples,
                                      shared_tensors=specs_to_proto(manifest), agent_version=agent_version,
                                      kem_announcement=kem_announcement, budget_statement=budget_statement)


def task_from_proto(msg: federation_pb2.GetTaskResponse) -> Task:
    """Converts a task poll answer."""
    kind = {federation_pb2.TASK_KIND_WAIT: "wait", federation_pb2.TASK_KIND_TRAIN: "train",
            federation_pb2.TASK_KIND_STOP: "stop"}.get(msg.kind, "wait")
    return Task(kind=kind, round=msg.round, base_round=msg.base_round, deadline_ms=msg.deadline_unix_ms,
                last_closed_round=msg.last_closed_round, failed=msg.state == federation_pb2.RUN_STATE_FAILED,
                message=msg.message, weight_normalizer=msg.weight_normalizer,
                phase=_PHASE.get(msg.phase, SharePhase.ALL))


#: Signs an upload: (round, payload SHA-256 hex, payload bytes) -> the signed statement's JSON
#: (``fedsilo.privacy.upload_statement.statement_signer``).
UploadSigner = Callable[[int, str, int], str]


def upload_requests(rnd: int, weight: float, arrays: Mapping[str, np.ndarray], chunk_bytes: int,
                    sign: UploadSigner | None = None) -> Iterator[federation_pb2.SubmitUpdateRequest]:
    """The upload stream of a plaintext update: header, raw tensor chunks, trailer (with the signed statement)."""
    manifest = Manifest.of_arrays(arrays)
    return _upload_stream(rnd, weight, manifest, PayloadEncoding.RAW_TENSORS, manifest.total_bytes,
                          payload_chunks(arrays, chunk_bytes), sign)


def upload_he_requests(rnd: int, weight: float, manifest: Manifest, blobs: Sequence[bytes], chunk_bytes: int,
                       sign: UploadSigner | None = None) -> Iterator[federation_pb2.SubmitUpdateRequest]:
    """The upload stream of an encrypted update: header, length-prefixed ciphertexts in chunks, trailer."""
    size = sum(4 + len(b) for b in blobs)
    return _upload_stream(rnd, weight, manifest, PayloadEncoding.HE_CIPHERTEXTS, size,
                          rechunk(frame_blobs(blobs), chunk_bytes), sign)


def frame_blobs(blobs: Iterable[bytes]) -> Iterator[bytes]:
    """Each blob preceded by its length as a little-endian uint32."""
    for b in blobs:
        yield struct.pack("<I", len(b))
        yield b


def unframe_blobs(payload: bytes) -> list[bytes]:
    """Inverse of :func:`frame_blobs`.

    Raises:
        InvalidArgument: a truncated or inconsistent payload.
    """
    out, pos = [], 0
    while pos < len(payload):
        if pos + 4 > len(payload):
            raise InvalidArgument("ciphertext payload truncated inside a length prefix")
        (n,) = struct.unpack_from("<I", payload, pos)
        pos += 4
        if n == 0 or pos + n > len(payload):
            raise InvalidArgument("ciphertext payload truncated or corrupted")
        out.append(bytes(payload[pos : pos + n]))
        pos += n
    return out


def rechunk(parts: Iterable[bytes], chunk_bytes: int) -> Iterator[bytes]:
    """Re-slices a byte stream into chunks of exactly ``chunk_bytes`` (the last may be shorter)."""
    buf = bytearray()
    for p in parts:
        buf += p
        while len(buf) >= chunk_bytes:
            yield bytes(buf[:chunk_bytes])
            del buf[:chunk_bytes]
    if buf:
        yield bytes(buf)


def _upload_stream(rnd: int, weight: float, manifest: Manifest, encoding: PayloadEncoding, size: int,
                   chunks: Iterable[bytes], sign: UploadSigner | None) -> Iterator[federation_pb2.SubmitUpdateRequest]:
    yield federation_pb2.SubmitUpdateRequest(header=federation_pb2.UpdateHeader(
        round=rnd, weight=weight, manifest=tensor_pb2.PayloadManifest(tensors=specs_to_proto(manifest),
                                                                      total_bytes=manifest.total_bytes),
        encoding=encoding.value, payload_bytes=size))
    sha = hashlib.sha256()
    n = 0
    for chunk in chunks:
        sha.update(chunk)
        n += 1
        yield federation_pb2.SubmitUpdateRequest(chunk=chunk)
    statement = sign(rnd, sha.hexdigest(), size) if sign is not None else ""
    yield federation_pb2.SubmitUpdateRequest(trailer=tensor_pb2.PayloadTrailer(num_chunks=n, sha256=sha.digest(),
                                                                               upload_statement=statement))


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
    try:
        encoding = PayloadEncoding(header.encoding)
    except ValueError:
        raise InvalidArgument(f"unknown aggregate encoding {header.encoding}") from None
    if header.failed:  # the round failed: no payload, nobody applies it
        return Aggregate(round=header.round, num_contributors=header.num_contributors, total_weight=header.total_weight,
                         manifest=manifest, encoding=encoding, weight_normalizer=header.weight_normalizer, arrays=None,
                         ciphertexts=None, wire_bytes=wire, failed=header.failed)
    payload = bytes(buf)
    he = encoding is PayloadEncoding.HE_CIPHERTEXTS
    return Aggregate(round=header.round, num_contributors=header.num_contributors, total_weight=header.total_weight,
                     manifest=manifest, encoding=encoding, weight_normalizer=header.weight_normalizer,
                     arrays=None if he else arrays_from_payload(manifest, payload),
                     ciphertexts=unframe_blobs(payload) if he else None, wire_bytes=wire)


def failure_report_request(rnd: int, reason: str) -> federation_pb2.ReportAggregateFailureRequest:
    """A report that round ``rnd``'s aggregate is unusable (the reason cut to 1024 characters)."""
    return federation_pb2.ReportAggregateFailureRequest(round=rnd, reason=reason[:1024] or "unusable")


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
                   "rounds_contributed": s.rounds_contributed, "num_train_examples": s.num_train_examples,
                   "retired_from_round": s.retired_from_round, "retired_reason": s.retired_reason}
                  for s in msg.silos],
    }


def rounds_from_proto(msg: Any) -> list[dict[str, Any]]:
    """The admin round history as plain data."""
    return [{
        "round": r.round, "closed": r.closed, "contributors": list(r.contributors), "params_shared": r.params_shared,
        "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "seconds": r.seconds,
        "total_weight": r.total_weight, "failure": r.failure,
        "metrics": {sm.silo: {m.name: {"value": m.value, "num_examples": m.num_examples} for m in sm.metrics}
                    for sm in r.metrics},
        "opened_at_unix_ms": r.opened_at_unix_ms, "deadline_unix_ms": r.deadline_unix_ms,
        "closed_at_unix_ms": r.closed_at_unix_ms, "quorum": r.quorum, "quorum_reached": r.quorum_reached,
        "uploads": [{"silo": u.silo, "accepted_at_unix_ms": u.accepted_at_unix_ms, "payload_bytes": u.payload_bytes}
                    for u in r.uploads],
    } for r in msg.rounds]


_RELATION_NAMES = {admin_pb2.NEIGHBOURING_RECORD: "record", admin_pb2.NEIGHBOURING_SILO: "silo"}
_ACCOUNTANT_NAMES = {admin_pb2.ACCOUNTANT_RDP: "rdp", admin_pb2.ACCOUNTANT_PLD: "pld"}


def privacy_from_proto(msg: Any) -> dict[str, Any]:
    """The admin privacy view as plain data: per silo its budget (None without one) and, per relation
    ("record", "silo"), the mirror's cumulative single-upload ε (by the governing ``accountant``, and by RDP
    and PLD: ``epsilon_rdp``, ``epsilon_pld``), δ, entries of this run and last round."""
    return {
        "enabled": msg.enabled, "plan_delta": msg.plan_delta,
        "silos": [{
            "silo": s.silo, "last_seq": s.last_seq, "budget_error": s.budget_error,
            "budget": {"epsilon": s.budget_epsilon, "delta": s.budget_delta} if s.has_budget else None,
            "relations": {_RELATION_NAMES.get(r.relation, "unknown"): {
                "epsilon": r.epsilon, "epsilon_rdp": r.epsilon_rdp,
                "epsilon_pld": r.epsilon_pld if r.HasField("epsilon_pld") else None,
                "accountant": _ACCOUNTANT_NAMES.get(r.accountant, "unknown"),
                "delta": r.delta, "entries": r.entries, "last_round": r.last_round}
                for r in s.relations},
        } for s in msg.silos],
    }


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


def privacy_request() -> admin_pb2.GetPrivacyRequest:
    """Builds an admin privacy request."""
    return admin_pb2.GetPrivacyRequest()


def list_key_recipients_request() -> federation_pb2.ListKeyRecipientsRequest:
    """Builds a ListKeyRecipientsRequest."""
    return federation_pb2.ListKeyRecipientsRequest()


def key_recipients_from_proto(msg: Any) -> list[tuple[str, bytes]]:
    """(silo name, signed X25519 announcement) pairs."""
    return [(r.name, bytes(r.kem_announcement)) for r in msg.recipients]


def publish_request(entries: Sequence[tuple[str, bytes]]) -> federation_pb2.PublishWrappedKeysRequest:
    """Builds a PublishWrappedKeysRequest."""
    return federation_pb2.PublishWrappedKeysRequest(
        keys=[federation_pb2.WrappedKeyEntry(recipient=r, wrapped=w) for r, w in entries])


def get_wrapped_key_request() -> federation_pb2.GetWrappedKeyRequest:
    """Builds a GetWrappedKeyRequest."""
    return federation_pb2.GetWrappedKeyRequest()


def wrapped_key_from_proto(msg: Any) -> bytes | None:
    """The wrapped key, or None while it is not published."""
    return bytes(msg.wrapped) if msg.ready else None


def _json_object(text: str, field: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"the coordinator sent {field} that is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"the coordinator sent {field} that is not a JSON object")
    return value
