"""A gRPC server interceptor that times every call by RPC and status code and counts refusals by reason.

The ``method`` label is ``Service/Method`` of an RPC in the service definitions (the federation,
admin and health services): a call of any other path is answered UNIMPLEMENTED by gRPC and only
counted, its path never becomes a label value. A refusal is a call ended with a status code of the
servicers' one exception table (``servicer.STATUS_CODES``); its ``reason`` is the name of our
exception class that maps to that code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from fedsilo.coordinator.servicer import STATUS_CODES
from fedsilo.core.metricspec import MetricKind, MetricSpec, instrument
from fedsilo.v1 import admin_pb2, federation_pb2

__all__ = ["REFUSAL_REASONS", "RPC_BUCKETS", "RPC_METHODS", "RPC_METRICS", "RpcMetrics"]

#: Bounds of the RPC latency histogram, in seconds: from quick calls to long polls and hour-long uploads.
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

RPC_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(name="fedsilo_coordinator_rpc_duration_seconds", kind=MetricKind.HISTOGRAM, buckets=RPC_BUCKETS,
               labels=("method", "code"),
               help="Time from a call's arrival to its status (a streamed response's last message included), by RPC "
                    "and status code; GetTask long-polls.",
               panel="histogram_quantile(0.99, sum by (le, method) "
                     "(rate(fedsilo_coordinator_rpc_duration_seconds_bucket{code=\"OK\"}[5m])))"),
    MetricSpec(name="fedsilo_coordinator_refusals_total", kind=MetricKind.COUNTER, labels=("method", "code", "reason"),
               help="Calls refused with a status of the servicers' exception table, by RPC, code and the exception "
                    "class behind it (the call limits' refusals, and calls cancelled or cut as stalled, included).",
               panel="sum by (reason, method) (rate(fedsilo_coordinator_refusals_total[5m]))"),
    MetricSpec(name="fedsilo_coordinator_unknown_method_calls_total", kind=MetricKind.COUNTER,
               help="Calls of a path the coordinator does not serve (answered UNIMPLEMENTED; the path is not recorded).",
               panel="increase(fedsilo_coordinator_unknown_method_calls_total[1h])"),
)


def _rpc_methods() -> dict[str, str]:
    """Path of every RPC the coordinator serves (``/fedsilo.v1.Federation/Join``) -> its label (``Federation/Join``)."""
    out = {}
    for file in (federation_pb2.DESCRIPTOR, admin_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for method in service.methods:
                out[f"/{service.full_name}/{method.name}"] = f"{service.name}/{method.name}"
    return out


#: Every method label value: the RPCs of the service definitions.
RPC_METHODS: dict[str, str] = _rpc_methods()

#: Status code -> the name of our exception that maps to it (the servicers' table, inverted: one each).
REFUSAL_REASONS: dict[grpc.StatusCode, str] = {code: exc.__name__ for exc, code in STATUS_CODES.items()}
assert len(REFUSAL_REASONS) == len(STATUS_CODES), "servicer.STATUS_CODES must map each exception to its own code"

_BUILDERS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


class RpcMetrics(grpc.ServerInterceptor):
    """Times each call and counts refusals into ``registry``; put it first in the server's interceptors, so
    that it sees the calls the call guard refuses too.

    Args:
        registry: the coordinator's own registry.
    """

    def __init__(self, registry: Any) -> None:
        specs = {s.name: s for s in RPC_METRICS}
        self._latency = instrument(specs["fedsilo_coordinator_rpc_duration_seconds"], registry)
        self._refusals = instrument(specs["fedsilo_coordinator_refusals_total"], registry)
        self._unknown = instrument(specs["fedsilo_coordinator_unknown_method_calls_total"], registry)

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method = RPC_METHODS.get(handler_call_details.method)
        if handler is None:
            self._unknown.inc()
            return None
        if method is None:
            return handler  # served, but not in our service definitions: not timed (no label for it)
        return self._timed(handler, method)

    def _timed(self, handler: Any, method: str) -> Any:
        kind = (bool(handler.request_streaming), bool(handler.response_streaming))
        inner = {(False, False): handler.unary_unary, (False, True): handler.unary_stream,
                 (True, False): handler.stream_unary, (True, True): handler.stream_stream}[kind]
        if getattr(inner, "experimental_non_blocking", False):
            return handler  # a callback-style handler ends elsewhere; ours are all blocking

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                result = inner(request, context)
            except BaseException as exc:
                self._ended(method, context, start, exc)
                raise
            if kind[1]:
                return self._streamed(result, method, context, start)
            self._ended(method, context, start, None)
            return result

        return _BUILDERS[kind](behavior, request_deserializer=handler.request_deserializer,
                               response_serializer=handler.response_serializer)

    def _streamed(self, responses: Iterator[Any], method: str, context: grpc.ServicerContext,
                  start: float) -> Iterator[Any]:
        failure: BaseException | None = None
        try:
            yield from responses
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._ended(method, context, start, failure)

    def _ended(self, method: str, context: grpc.ServicerContext, start: float, failure: BaseException | None) -> None:
        """Records a call's latency under its status code, and a refusal under its reason."""
        code = getattr(context, "code", lambda: None)()
        if not isinstance(code, grpc.StatusCode):
            if failure is None:
                code = grpc.StatusCode.OK
            elif isinstance(failure, GeneratorExit):  # the client stopped taking the stream
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN  # what gRPC answers for an exception without a status
        self._latency.labels(method, code.name).observe(time.perf_counter() - start)
        reason = REFUSAL_REASONS.get(code)
        if reason is not None:
            self._refusals.labels(method, code.name, reason).inc()

