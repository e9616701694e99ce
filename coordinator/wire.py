"""The coordinator's one conversion module between ``fedsilo.v1`` messages and plain objects."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from fedsilo.core.errors import Cancelled, FedsiloError, InvalidArgument
from fedsilo.coordinator.records import (
    MAX_UPLOAD_STATEMENT_CHARS,
    AggregateInfo,
    FailureReport,
    PrivacyView,
    RoundSummary,
    PayloadEncoding,
    RunState,
    SealedPage,
    Status,
    SubmitResult,
    Task,
    TaskKind,
    UploadChunk,
    UploadHeader,
    UploadPart,
    UploadTrailer,
)
from fedsilo.coordinator.config import AggregationMode, FederationConfig
from fedsilo.core.phases import SharePhase
from fedsilo.core.tensors import DType, Manifest, TensorSpec
from fedsilo.privacy.accounting import BudgetAccountant, Neighbouring
from fedsilo.v1 import admin_pb2, federation_pb2, tensor_pb2

_RUN_STATE = {
    RunState.WAITING: federation_pb2.RUN_STATE_WAITING_FOR_SILOS,
    RunState.RUNNING: federation_pb2.RUN_STATE_RUNNING,
    RunState.FINISHED: federation_pb2.RUN_STATE_FINISHED,
    RunState.FAILED: federation_pb2.RUN_STATE_FAILED,
}
_TASK_KIND = {
    TaskKind.WAIT: federation_pb2.TASK_KIND_WAIT,
    TaskKind.TRAIN: federation_pb2.TASK_KIND_TRAIN,
    TaskKind.STOP: federation_pb2.TASK_KIND_STOP,
}
#: Each share phase as its wire value, by name (``SharePhase.X`` is ``SHARE_PHASE_X``).
_PHASE = {phase: federation_pb2.SharePhase.Value(f"SHARE_PHASE_{phase.name}") for phase in SharePhase}
_NEIGHBOURING = {relation: admin_pb2.Neighbouring.Value(f"NEIGHBOURING_{relation.name}") for relation in Neighbouring}
_ACCOUNTANT = {a: admin_pb2.Accountant.Value(f"ACCOUNTANT_{a.name}") for a in BudgetAccountant}
_AGGREGATION = {AggregationMode.PLAIN: federation_pb2.AGGREGATION_PLAIN, AggregationMode.HE: federation_pb2.AGGREGATION_HE}


def tensor_specs_from_proto(specs: Iterable[tensor_pb2.TensorSpec]) -> Manifest:
    """Validates and converts a list of tensor specs (as in JoinRequest).

    Raises:
        InvalidArgument: unknown dtype, bad name or shape, duplicate names.
    """
    out = []
    for t in specs:
        try:
            dtype = DType(t.dtype)
        except ValueError:
            raise InvalidArgument(f"tensor {t.name!r} has unknown dtype {t.dtype}") from None
        out.append(TensorSpec(name=t.name, dtype=dtype, shape=tuple(int(d) for d in t.shape)))
    return Manifest(tensors=tuple(out))


def manifest_from_proto(msg: tensor_pb2.PayloadManifest) -> Manifest:
    """Validates and converts a payload manifest, including its total size.

    Raises:
        InvalidArgument: as :func:`tensor_specs_from_proto`, or a total_bytes mismatch.
    """
    manifest = tensor_specs_from_proto(msg.tensors)
    if msg.total_bytes != manifest.total_bytes:
        raise InvalidArgument(f"manifest total_bytes {msg.total_bytes} != sum of tensor sizes {manifest.total_bytes}")
    return manifest


def manifest_to_proto(manifest: Manifest) -> tensor_pb2.PayloadManifest:
    """Converts a manifest to its message."""
    return tensor_pb2.PayloadManifest(
        tensors=[tensor_pb2.TensorSpec(name=t.name, dtype=t.dtype.value, shape=list(t.shape)) for t in manifest.tensors],
        total_bytes=manifest.total_bytes,
    )


def _received(requests: Iterable[federation_pb2.SubmitUpdateRequest]) -> Iterator[federation_pb2.SubmitUpdateRequest]:
    """The messages of a request stream; a stream the transport breaks off raises ``Cancelled``."""
    it = iter(requests)
    while True:
        try:
            req = next(it)
        except StopIteration:
            return
        except FedsiloError:
            raise
        except Exception as exc:  # gRPC raises a bare RpcError when the client cancels or the connection drops
            raise Cancelled(f"the upload stream broke off ({type(exc).__name__}): the client cancelled "
                            "or the connection dropped") from None
        yield req


def upload_parts(requests: Iterable[federation_pb2.SubmitUpdateRequest]) -> Iterator[UploadPart]:
    """Converts an upload stream lazily, part by part, with each message's wire size.

    Raises:
        InvalidArgument: a malformed message.
        Cancelled: the stream broke off (client cancelled, connection dropped, cut as stalled).
    """
    for req in _received(requests):
        kind = req.WhichOneof("part")
        size = req.ByteSize()
        if kind == "header":
            h = req.header
            try:
                encoding = PayloadEncoding(h.encoding)
            except ValueError:
                raise InvalidArgument(f"unknown payload encoding {h.encoding}") from None
            yield UploadHeader(round=h.round, weight=h.weight, manifest=manifest_from_proto(h.manifest),
                               encoding=encoding, payload_bytes=h.payload_bytes, wire_bytes=size)
        elif kind == "chunk":
            yield UploadChunk(data=req.chunk, wire_bytes=size)
        elif kind == "trailer":
            if len(req.trailer.sha256) != 32:
                raise InvalidArgument("trailer sha256 must be exactly 32 bytes")
            if len(req.trailer.upload_statement) > MAX_UPLOAD_STATEMENT_CHARS:
                raise InvalidArgument(f"upload_statement is longer than {MAX_UPLOAD_STATEMENT_CHARS} characters")
            yield UploadTrailer(num_chunks=req.trailer.num_chunks, sha256=req.trailer.sha256, wire_bytes=size,
                                statement=req.trailer.upload_statement)
        else:
            raise InvalidArgument("an upload message carries none of header, chunk or trailer")


def run_info_to_proto(cfg: FederationConfig) -> federation_pb2.GetRunResponse:
    """The run parameters agents need."""
    return federation_pb2.GetRunResponse(
        run_id=cfg.run_id, total_rounds=cfg.rounds, method=cfg.strategy, task=cfg.task,
        aggregation=_AGGREGATION[cfg.aggregation], model_config_json=json.dumps(dict(cfg.model)),
        training_config_json=json.dumps(dict(cfg.training)), max_chunk_bytes=cfg.max_chunk_bytes,
        key_holder=cfg.key_holder if cfg.aggregation is AggregationMode.HE else "",
        he_parameters=cfg.he_params().to_bytes() if cfg.aggregation is AggregationMode.HE else b"",
        privacy=privacy_plan_to_proto(cfg.privacy),
        method_tables_json=json.dumps({name: dict(table) for name, table in cfg.tables.items()}, sort_keys=True),
    )


def privacy_plan_to_proto(plan) -> federation_pb2.PrivacyPlan:  # plan: PrivacyPlan | None
    """The run's DP plan, field by field (the message's fields are the plan's); an all-default
    message when the run has none."""
    if plan is None:
        return federation_pb2.PrivacyPlan()
    return federation_pb2.PrivacyPlan(**{f.name: getattr(plan, f.name)
                                         for f in federation_pb2.PrivacyPlan.DESCRIPTOR.fields})


def ledger_response(mirrored_through: int) -> federation_pb2.SubmitLedgerEntriesResponse:
    """Converts the mirrored seq."""
    return federation_pb2.SubmitLedgerEntriesResponse(mirrored_through_seq=mirrored_through)


def decline_response(state: RunState, training: int) -> federation_pb2.DeclineRoundResponse:
    """Converts the outcome of a decline."""
    return federation_pb2.DeclineRoundResponse(state=_RUN_STATE[state], silos_training=training)


def failure_report_response(report: FailureReport) -> federation_pb2.ReportAggregateFailureResponse:
    """Converts the state of a round's failure reports."""
    return federation_pb2.ReportAggregateFailureResponse(round_failed=report.round_failed, reports=report.reports,
                                                          needed=report.needed)


def task_to_proto(task: Task) -> federation_pb2.GetTaskResponse:
    """Converts a task."""
    return federation_pb2.GetTaskResponse(
        kind=_TASK_KIND[task.kind], round=task.round, base_round=task.base_round,
        deadline_unix_ms=task.deadline_ms, last_closed_round=task.last_closed_round,
        state=_RUN_STATE[task.state], message=task.message[:1024], weight_normalizer=task.weight_normalizer,
        phase=_PHASE[task.phase] if task.kind is TaskKind.TRAIN else federation_pb2.SHARE_PHASE_UNSPECIFIED,
    )


def aggregate_stream(info: AggregateInfo, chunk_bytes: int) -> Iterator[federation_pb2.FetchAggregateResponse]:
    """Header, chunks of the aggregate file, trailer; for a failed round, a header saying why and an empty trailer."""
    size = 0 if info.failed else Path(info.path).stat().st_size
    yield federation_pb2.FetchAggregateResponse(header=federation_pb2.AggregateHeader(
        round=info.round, num_contributors=info.num_contributors, total_weight=info.total_weight,
        manifest=manifest_to_proto(info.manifest), encoding=info.encoding.value,
        payload_bytes=size, weight_normalizer=info.weight_normalizer, failed=info.failed[:1024]))
    sha = hashlib.sha256()
    n = 0
    if info.failed:
        yield federation_pb2.FetchAggregateResponse(trailer=tensor_pb2.PayloadTrailer(num_chunks=0,
                                                                                      sha256=sha.digest()))
        return
    with open(Path(info.path), "rb") as f:
        while block := f.read(chunk_bytes):
            sha.update(block)
            n += 1
            yield federation_pb2.FetchAggregateResponse(chunk=block)
    yield federation_pb2.FetchAggregateResponse(trailer=tensor_pb2.PayloadTrailer(num_chunks=n, sha256=sha.digest()))


def metrics_from_proto(req: federation_pb2.ReportMetricsRequest) -> list[tuple[str, float, int]]:
    """Plain (name, value, num_examples) triples."""
    return [(m.name, m.value, m.num_examples) for m in req.metrics]


def status_to_proto(status: Status) -> admin_pb2.GetStatusResponse:
    """Converts the run status."""
    return admin_pb2.GetStatusResponse(
        run_id=status.run_id, state=_RUN_STATE[status.state], open_round=status.open_round,
        last_closed_round=status.last_closed_round, total_rounds=status.total_rounds,
        silos=[admin_pb2.SiloStatus(name=s.name, joined=s.joined, last_seen_unix_ms=s.last_seen_ms,
                                    rounds_contributed=s.rounds_contributed,
                                    num_train_examples=s.num_train_examples,
                                    retired_from_round=s.retired_from_round,
                                    retired_reason=s.retired_reason[:1024]) for s in status.silos],
        message=status.message[:1024],
    )


def rounds_to_proto(rounds: list[RoundSummary]) -> admin_pb2.ListRoundsResponse:
    """Converts the round history."""
    return admin_pb2.ListRoundsResponse(rounds=[
        admin_pb2.RoundSummary(
            round=r.round, closed=r.closed, contributors=list(r.contributors), params_shared=r.params_shared,
            bytes_up=r.bytes_up, bytes_down=r.bytes_down, seconds=r.seconds,
            total_weight=r.total_weight, failure=r.failure[:1024], metrics=[admin_pb2.SiloMetrics(silo=silo, metrics=[
                federation_pb2.Metric(name=n, value=v, num_examples=k) for n, v, k in ms])
                for silo, ms in sorted(r.metrics.items())],
            opened_at_unix_ms=r.opened_at_ms, deadline_unix_ms=r.deadline_ms, closed_at_unix_ms=r.closed_at_ms,
            quorum=r.quorum, quorum_reached=r.quorum_reached,
            uploads=[admin_pb2.RoundUpload(silo=u.silo, accepted_at_unix_ms=u.accepted_at_ms,
                                           payload_bytes=u.payload_bytes) for u in r.uploads],
        ) for r in rounds
    ])


def privacy_to_proto(view: PrivacyView) -> admin_pb2.GetPrivacyResponse:
    """Converts the run's privacy spend (ε as the ledger mirror gives it)."""
    return admin_pb2.GetPrivacyResponse(enabled=view.enabled, plan_delta=view.plan_delta, silos=[
        admin_pb2.SiloPrivacy(
            silo=s.silo, has_budget=s.budget is not None, budget_epsilon=s.budget[0] if s.budget else 0.0,
            budget_delta=s.budget[1] if s.budget else 0.0, budget_error=s.budget_error[:1024], last_seq=s.last_seq,
            relations=[admin_pb2.RelationSpend(relation=_NEIGHBOURING[r.relation], epsilon=r.epsilon, delta=r.delta,
                                               epsilon_rdp=r.epsilon_rdp, epsilon_pld=r.epsilon_pld,
                                               accountant=_ACCOUNTANT[r.accountant], entries=r.entries,
                                               last_round=r.last_round) for r in s.relations])
        for s in view.silos
    ])


def join_response(name: str, state: RunState, last_closed_round: int) -> federation_pb2.JoinResponse:
    """Answer to Join."""
    return federation_pb2.JoinResponse(silo_name=name, state=_RUN_STATE[state], last_closed_round=last_closed_round)


def submit_response(result: SubmitResult) -> federation_pb2.SubmitUpdateResponse:
    """Answer to an accepted upload."""
    return federation_pb2.SubmitUpdateResponse(round=result.round, bytes_received=result.bytes_received,
                                               uploads_in_round=result.uploads_in_round)


def heartbeat_response(state: RunState, open_round: int) -> federation_pb2.HeartbeatResponse:
    """Answer to a heartbeat."""
    return federation_pb2.HeartbeatResponse(state=_RUN_STATE[state], open_round=open_round)


def metrics_response(stored: int) -> federation_pb2.ReportMetricsResponse:
    """Answer to ReportMetrics."""
    return federation_pb2.ReportMetricsResponse(stored=stored)


def key_recipients_response(recipients: list[tuple[str, bytes]]) -> federation_pb2.ListKeyRecipientsResponse:
    """Answer to ListKeyRecipients."""
    return federation_pb2.ListKeyRecipientsResponse(
        recipients=[federation_pb2.KeyRecipient(name=n, kem_announcement=k) for n, k in recipients])


def wrapped_keys_from_proto(req: federation_pb2.PublishWrappedKeysRequest) -> list[tuple[str, bytes]]:
    """(recipient, wrapped bytes) pairs."""
    return [(e.recipient, bytes(e.wrapped)) for e in req.keys]


def publish_response(stored: int) -> federation_pb2.PublishWrappedKeysResponse:
    """Answer to PublishWrappedKeys."""
    return federation_pb2.PublishWrappedKeysResponse(stored=stored)


def wrapped_key_response(wrapped: bytes | None) -> federation_pb2.GetWrappedKeyResponse:
    """Answer to GetWrappedKey."""
    return federation_pb2.GetWrappedKeyResponse(ready=wrapped is not None, wrapped=wrapped or b"")


def sealed_published_response(count: int) -> federation_pb2.PublishSealedResponse:
    """Reply to PublishSealed."""
    return federation_pb2.PublishSealedResponse(published=count)


def sealed_page_response(page: SealedPage) -> federation_pb2.GetSealedResponse:
    """Reply to GetSealed (one page)."""
    return federation_pb2.GetSealedResponse(
        entries=[federation_pb2.SealedEntry(silo=s, blob=b) for s, b in page.entries],
        silos_joined=page.silos_joined, more=page.more)
