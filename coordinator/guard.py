"""The gRPC side of the call limits: a server interceptor that admits, watches and cuts every call.

See ``fedsilo.coordinator.limits`` for the rules. The guard serves each method as a
request-streaming one, so that it runs as soon as a worker takes the call, before the request
message is read: a unary call whose message never comes is refused or cut like any other.
gRPC's public API can end a call from another thread only by cancelling it, so a cut call's
client sees ``CANCELLED``; the coordinator's log says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from fedsilo.coordinator.limits import (
    METHOD_KINDS,
    CallGate,
    CallKind,
    CallLimits,
    RateLimitedLog,
    StallWatchdog,
    Watch,
    bucket_of,
)
from fedsilo.core.errors import Cancelled, FedsiloError, InvalidArgument, ResourceExhausted


class _Requests:
    """A request stream whose waits the watchdog measures; a cut or cancelled stream raises ``Cancelled``."""

    def __init__(self, requests: Iterator[Any], watch: Watch) -> None:
        self._requests, self._watch = requests, watch

    def __iter__(self) -> _Requests:
        return self

    def __next__(self) -> Any:
        self._watch.waiting("the client's next message")
        try:
            msg = next(self._requests)
        except StopIteration:
            self._watch.moved()
            if self._watch.cut is not None:  # a call cancelled by the server ends its request stream
                raise Cancelled(f"cut by the coordinator: {self._watch.cut}") from None
            raise
        except grpc.RpcError:
            self._watch.moved()
            why = self._watch.cut
            raise Cancelled(f"cut by the coordinator: {why}" if why else "the client cancelled the call") from None
        self._watch.moved(msg.ByteSize())
        return msg


class CallGuard(grpc.ServerInterceptor):
    """Admits every call under its caller's identity and watches it for stalls (module docstring).

    Each method's handler is served as a request-streaming one, so that the guard runs as soon as a
    worker takes the call, before its request message is read: a unary call whose message never
    comes is refused or cut like any other.

    Args:
        limits: the limits and stall rules.
        enrolled: the run's enrolled silo names.
        identify: the caller of a call, as "role:name" ("unidentified" if it has none).
        refuse: logs a refusal and aborts the call with the status of its exception (never returns).
        log: where cuts are logged, rate-limited per caller.
    """

    def __init__(self, limits: CallLimits, *, enrolled: tuple[str, ...] | frozenset[str],
                 identify: Callable[[grpc.ServicerContext], str],
                 refuse: Callable[..., NoReturn], log: RateLimitedLog) -> None:
        self.gate = CallGate(limits)
        self.watchdog = StallWatchdog(limits, on_cut=self._cut)
        self._enrolled = frozenset(enrolled)
        self._identify, self._refuse, self._log = identify, refuse, log

    def _cut(self, watch: Watch, why: str) -> None:
        self._log.log(logging.WARNING, watch.caller, "cut %s: %s", watch.what, why)

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        return None if handler is None else self._guarded(handler, handler_call_details.method)

    def _guarded(self, handler: Any, method: str) -> Any:
        kind = METHOD_KINDS.get(method, CallKind.OTHER)
        name = method.rsplit("/", 1)[-1]
        stream_in, stream_out = handler.request_streaming, handler.response_streaming
        inner = {(False, False): handler.unary_unary, (False, True): handler.unary_stream,
                 (True, False): handler.stream_unary, (True, True): handler.stream_stream}[(stream_in, stream_out)]
        non_blocking = bool(getattr(inner, "experimental_non_blocking", False))

        def behavior(request_iterator: Iterator[Any], context: grpc.ServicerContext, *callback: Any) -> Any:
            caller = self._identify(context)
            try:
                release = self.gate.admit(bucket_of(caller, self._enrolled), kind)
            except ResourceExhausted as exc:  # refused a slot: answered at once (never delayed)
                self._refuse(context, exc, what=name, caller=caller, holds_slot=False)
            watch = self.watchdog.watch(f"{name} of {caller}", caller, context.cancel)
            handed_on = False
            try:
                requests = _Requests(request_iterator, watch)
                if stream_in:
                    argument = requests
                else:
                    try:
                        argument = next(requests)
                    except StopIteration:
                        self._refuse(context, InvalidArgument(f"{name} takes exactly one request message"),
                                     what=name, caller=caller)
                    except FedsiloError as exc:
                        self._refuse(context, exc, what=name, caller=caller)
                result = inner(argument, context, *callback)
                if stream_out and not non_blocking:
                    handed_on = True
                    return self._sent(result, watch, release)
                return result
            finally:
                if not handed_on:
                    watch.close()
                    release()

        if non_blocking:
            behavior.experimental_non_blocking = True  # type: ignore[attr-defined]
        build = grpc.stream_stream_rpc_method_handler if stream_out else grpc.stream_unary_rpc_method_handler
        return build(behavior, request_deserializer=handler.request_deserializer,
                     response_serializer=handler.response_serializer)

    @staticmethod
    def _sent(responses: Iterator[Any], watch: Watch, release: Callable[[], None]) -> Iterator[Any]:
        """Passes ``responses`` on, measuring how long each takes to leave; frees the call's slots at the end."""
        try:
            for resp in responses:
                watch.waiting("the client to take a response message")  # gRPC sends it, then asks for the next
                yield resp
                watch.moved(resp.ByteSize())
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()  # the handler's own clean-up first (a generator's finally), then the slots
            watch.close()
            release()

    def start(self) -> None:
        """Starts the watchdog."""
        self.watchdog.start()

    def stop(self) -> None:
        """Stops the watchdog."""
        self.watchdog.stop()


__all__ = ["CallGuard"]
