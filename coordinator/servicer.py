"""Thin gRPC servicers: unpack, call the plain ``Coordinator``, map exceptions to status codes."""

from __future__ import annotations

import functools
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from fedsilo.coordinator import wire
from fedsilo.core.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    FedsiloError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from fedsilo.coordinator.limits import RateLimitedLog
from fedsilo.coordinator.records import TaskKind
from fedsilo.coordinator.run import Coordinator
from fedsilo.core.validators import excerpt
from fedsilo.privacy.pki import CertificateError, Identity, Role, identity_from_pem
from fedsilo.v1 import admin_pb2_grpc, federation_pb2_grpc

log = logging.getLogger("fedsilo.coordinator")

#: The one table from our exceptions to gRPC status codes.
STATUS_CODES: dict[type[FedsiloError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Cancelled: grpc.StatusCode.CANCELLED,
}

#: Longest status message, and longest quoted exception text in a log line (callers choose much of it).
MAX_DETAIL_CHARS = 512

#: Metadata key carrying "role:name" in --insecure mode only (there is no certificate then).
INSECURE_IDENTITY_KEY = "x-fedsilo-insecure-identity"


def caller_identity(context: grpc.ServicerContext, *, insecure: bool) -> Identity:
    """The caller's identity: its client certificate; a metadata claim only in insecure mode.

    Raises:
        Unauthenticated: no client certificate (or, insecure, no identity claim).
        PermissionDenied: a certificate that names no fedsilo role.
    """
    if insecure:
        claim = dict(context.invocation_metadata()).get(INSECURE_IDENTITY_KEY, "")
        role, _, name = claim.partition(":")
        try:
            return Identity(role=Role(role), name=name)
        except ValueError:
            raise Unauthenticated(f"insecure mode: metadata {INSECURE_IDENTITY_KEY} must be role:name") from None
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        raise Unauthenticated("no client certificate was presented")
    try:
        return identity_from_pem(pems[0])
    except CertificateError as exc:
        raise PermissionDenied(f"client certificate not usable: {exc}") from None


def caller_label(context: grpc.ServicerContext, *, insecure: bool) -> str:
    """The caller as "role:name" for limits and log lines; "unidentified" when it has no identity."""
    try:
        who = caller_identity(context, insecure=insecure)
    except FedsiloError:
        return "unidentified"
    return f"{who.role.value}:{excerpt(who.name, 64)}"


def bounded(text: object, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text`` cut to about ``limit`` characters: its head and its tail, where a refusal says what is
    wrong with the caller's value it quotes in between."""
    s = str(text)
    if len(s) <= limit:
        return s
    tail = limit // 4
    return f"{s[:limit - tail]}… ({len(s) - limit} more characters) …{s[-tail:]}"


#: How long a refusal waits before it is sent, once its caller was refused more often than its log lines allow.
REFUSAL_DELAY_S = 1.0


def abort_refused(context: grpc.ServicerContext, exc: FedsiloError, *, what: str, caller: str,
                  refusals: RateLimitedLog, holds_slot: bool = True) -> NoReturn:
    """Logs a refusal (rate-limited per caller) and aborts the call with its exception's status code;
    the message is cut to about :data:`MAX_DETAIL_CHARS` in both (:func:`bounded`). Past its caller's
    log-line limit a refusal is held back :data:`REFUSAL_DELAY_S` first, if the call holds one of its
    caller's slots (``holds_slot``): a call refused a slot is answered at once, so a caller's delayed
    refusals never take more workers than its share."""
    code = STATUS_CODES[type(exc)]
    details = bounded(exc)
    logged = refusals.log(logging.INFO, caller, "%s of %s refused: %s: %s", what, caller, code.name, details)
    if not logged and holds_slot and not isinstance(exc, Cancelled):  # (a cancelled caller has gone)
        # A caller refused more often than its log lines allow is hammering the coordinator: answer it
        # late. It holds only its own call slots meanwhile (``limits``), and its loop slows to a few
        # refusals a second, so decoding what it sends cannot crowd out the other silos.
        time.sleep(REFUSAL_DELAY_S)
    context.abort(code, details)
    raise AssertionError("context.abort returned")  # pragma: no cover - it always raises


def _failure_text(exc: BaseException) -> str:
    """A traceback whose exception messages are cut to :data:`MAX_DETAIL_CHARS` (they may quote input)."""
    text = "Traceback (most recent call last):\n" + "".join(traceback.format_tb(exc.__traceback__))
    text += f"{type(exc).__name__}: {bounded(exc)}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        text += f"\n(while handling {type(cause).__name__}: {bounded(cause)})"
    return text


#: Refusal log lines of servicers built without their own limiter.
_REFUSALS = RateLimitedLog(log)


def _rpc(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Maps our exceptions to status codes; anything else is INTERNAL and logged. Log lines and
    status messages are cut short and rate-limited per caller (:func:`abort_refused`)."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:
            caller = caller_label(context, insecure=self._c.cfg.insecure)
            refusals = getattr(self, "_refusals", _REFUSALS)
            if isinstance(exc, FedsiloError):
                abort_refused(context, exc, what=fn.__name__, caller=caller, refusals=refusals)
            refusals.log(logging.ERROR, caller, "%s of %s failed:\n%s", fn.__name__, caller, _failure_text(exc))
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the coordinator log")

    return wrapper


class FederationServicer(federation_pb2_grpc.FederationServicer):
    """The agents' service."""

    def __init__(self, coordinator: Coordinator, *, max_concurrent_transfers: int = 2,
                 refusals: RateLimitedLog | None = None) -> None:
        self._c = coordinator
        self._insecure = coordinator.cfg.insecure
        self._refusals = refusals or RateLimitedLog(log)
        # Payload streams in flight at once, each way. gRPC buffers a stream's outgoing messages
        # in memory regardless of the peer's pace, so without this bound the coordinator's memory
        # would grow with the number of silos fetching (or uploading) at the same moment.
        self._uploads = threading.BoundedSemaphore(max_concurrent_transfers)
        self._downloads = threading.BoundedSemaphore(max_concurrent_transfers)

    def _who(self, context: grpc.ServicerContext) -> Identity:
        return caller_identity(context, insecure=self._insecure)

    @_rpc
    def GetRun(self, request, context):  # noqa: N802 - gRPC naming
        return wire.run_info_to_proto(self._c.run_config(self._who(context)))

    @_rpc
    def Join(self, request, context):  # noqa: N802
        caller = self._who(context)
        self._c.run_config(caller)  # PERMISSION_DENIED for a non-silo caller before its request is parsed
        name, state, last_closed = self._c.join(
            caller, model_fingerprint=request.model_fingerprint,
            num_train_examples=request.num_train_examples,
            manifest=wire.tensor_specs_from_proto(request.shared_tensors), agent_version=request.agent_version,
            kem_announcement=request.kem_announcement, budget_statement=request.budget_statement)
        return wire.join_response(name, state, last_closed)

    @_rpc
    def GetTask(self, request, context):  # noqa: N802
        task = self._c.get_task(self._who(context), after_round=request.after_round, wait_s=request.wait_seconds,
                                alive=context.is_active)
        resp = wire.task_to_proto(task)
        if task.kind is TaskKind.TRAIN:
            self._c.count_bytes(task.round, down=resp.ByteSize())
        return resp

    @_rpc
    def SubmitUpdate(self, request_iterator, context):  # noqa: N802
        caller = self._who(context)
        with self._uploads:
            result = self._c.submit(caller, wire.upload_parts(request_iterator))
        return wire.submit_response(result)

    @_rpc
    def FetchAggregate(self, request, context):  # noqa: N802
        info = self._c.aggregate(self._who(context), request.round)
        return self._counted(info.round, wire.aggregate_stream(info, self._c.cfg.max_chunk_bytes))

    def _counted(self, rnd, responses):
        """Streams ``responses``, counting what was sent even if the client stops early."""
        total = 0
        self._downloads.acquire()
        try:
            for resp in responses:
                total += resp.ByteSize()
                yield resp
        except Exception:
            log.exception("FetchAggregate of round %d failed mid-stream", rnd)
            raise
        finally:
            self._downloads.release()
            self._c.count_bytes(rnd, down=total)

    @_rpc
    def Heartbeat(self, request, context):  # noqa: N802
        state, open_round = self._c.heartbeat(self._who(context))
        return wire.heartbeat_response(state, open_round)

    @_rpc
    def ReportMetrics(self, request, context):  # noqa: N802
        stored = self._c.report_metrics(self._who(context), request.round, wire.metrics_from_proto(request),
                                        wire_bytes=request.ByteSize())
        return wire.metrics_response(stored)

    @_rpc
    def ListKeyRecipients(self, request, context):  # noqa: N802
        return wire.key_recipients_response(self._c.key_recipients(self._who(context)))

    @_rpc
    def PublishWrappedKeys(self, request, context):  # noqa: N802
        caller = self._who(context)
        self._c.run_config(caller)  # identity before input
        return wire.publish_response(self._c.publish_wrapped_keys(caller, wire.wrapped_keys_from_proto(request)))

    @_rpc
    def GetWrappedKey(self, request, context):  # noqa: N802
        return wire.wrapped_key_response(self._c.wrapped_key(self._who(context)))

    @_rpc
    def SubmitLedgerEntries(self, request, context):  # noqa: N802
        caller = self._who(context)
        self._c.run_config(caller)  # identity before input
        return wire.ledger_response(self._c.submit_ledger_entries(caller, list(request.entries_json)))

    @_rpc
    def DeclineRound(self, request, context):  # noqa: N802
        state, training = self._c.decline(self._who(context), rnd=request.round, reason=request.reason,
                                          final=request.final)
        return wire.decline_response(state, training)

    @_rpc
    def PublishSealed(self, request, context):  # noqa: N802
        caller = self._who(context)
        self._c.run_config(caller)  # identity before input
        return wire.sealed_published_response(self._c.publish_sealed(caller, request.purpose, request.blob))

    @_rpc
    def GetSealed(self, request, context):  # noqa: N802
        page = self._c.sealed(self._who(context), request.purpose, after_silo=request.after_silo)
        return wire.sealed_page_response(page)

    @_rpc
    def ReportAggregateFailure(self, request, context):  # noqa: N802
        report = self._c.report_aggregate_failure(self._who(context), request.round, request.reason)
        return wire.failure_report_response(report)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """The study lead's service."""

    def __init__(self, coordinator: Coordinator, *, refusals: RateLimitedLog | None = None) -> None:
        self._c = coordinator
        self._refusals = refusals or RateLimitedLog(log)

    def _admin(self, context: grpc.ServicerContext) -> None:
        self._c.require_admin(caller_identity(context, insecure=self._c.cfg.insecure))

    @_rpc
    def GetStatus(self, request, context):  # noqa: N802
        self._admin(context)
        return wire.status_to_proto(self._c.status())

    @_rpc
    def ListRounds(self, request, context):  # noqa: N802
        self._admin(context)
        return wire.rounds_to_proto(self._c.round_summaries())

    @_rpc
    def GetPrivacy(self, request, context):  # noqa: N802
        self._admin(context)
        return wire.privacy_to_proto(self._c.privacy())


__all__ = ["AdminServicer", "FederationServicer", "STATUS_CODES", "abort_refused", "caller_identity", "caller_label"]
