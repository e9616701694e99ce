"""An in-process transport: an agent's client calls the coordinator's servicers directly, as the caller its certificate names."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from fedsilo.coordinator.run import Coordinator
from fedsilo.coordinator.servicer import INSECURE_IDENTITY_KEY, AdminServicer, FederationServicer
from fedsilo.silo_agent.client import CoordinatorClient, Credentials


class InProcessRpcError(grpc.RpcError):
    """What a servicer's ``context.abort`` raises here: the status a gRPC client would have received."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        """The status code."""
        return self._code

    def details(self) -> str:
        """The status message."""
        return self._details


class _Context:
    """The part of ``grpc.ServicerContext`` the servicers use: the caller's identity and abort."""

    def __init__(self, *, pem: bytes | None, metadata: tuple[tuple[str, str], ...]) -> None:
        self._auth = {"x509_pem_cert": [pem]} if pem is not None else {}
        self._metadata = metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def is_active(self) -> bool:
        """An in-process call is never cancelled by its peer."""
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise InProcessRpcError(code, details)


def _copy(message: Message) -> Message:
    """The message as the other side would parse it off the wire."""
    return type(message).FromString(message.SerializeToString())


def _copies(messages: Iterable[Message]) -> Iterator[Message]:
    for m in messages:
        yield _copy(m)


class _Stub:
    """Calls a servicer's methods like a gRPC stub: every message serialised and parsed again,
    request streams and response streams passed through, errors raised as ``grpc.RpcError``."""

    def __init__(self, servicer: Any, context: _Context) -> None:
        self._servicer = servicer
        self._context = context

    def __getattr__(self, method: str) -> Any:
        handler = getattr(self._servicer, method)

        def call(request: Any, metadata: Any = None, timeout: float | None = None) -> Any:
            req = _copy(request) if isinstance(request, Message) else _copies(request)
            resp = handler(req, self._context)
            return _copy(resp) if isinstance(resp, Message) else _copies(resp)

        return call


class InProcessCoordinator:
    """A coordinator served in this process: hands out clients that call its servicers directly.

    Identity works as over gRPC: a client presents its certificate (the same mTLS files an agent
    is configured with) and the coordinator reads role and name from it; with an insecure run,
    the identity claim travels in metadata as over plaintext gRPC. Nothing else differs from a
    deployed run: the same servicers, the same message conversions, the same ``Coordinator``.

    Args:
        coordinator: the run's coordinator.
        max_concurrent_transfers: as ``FederationServicer``'s.
    """

    def __init__(self, coordinator: Coordinator, *, max_concurrent_transfers: int = 4) -> None:
        self.coordinator = coordinator
        self._federation = FederationServicer(coordinator, max_concurrent_transfers=max_concurrent_transfers)
        self._admin = AdminServicer(coordinator)

    def client(self, creds: Credentials, stop: Any = None, *, address: str = "in-process") -> CoordinatorClient:
        """A client acting as the holder of ``creds`` (certificate files, or an insecure claim)."""
        if creds.insecure_identity is not None:
            ctx = _Context(pem=None, metadata=((INSECURE_IDENTITY_KEY, creds.insecure_identity),))
        else:
            assert creds.cert is not None
            ctx = _Context(pem=Path(creds.cert).read_bytes(), metadata=())
        return CoordinatorClient(address, creds, stop=stop, max_backoff_s=0.5,
                                 stubs=(_Stub(self._federation, ctx), _Stub(self._admin, ctx)))

    def connect(self, address: str, creds: Credentials, stop: Any) -> CoordinatorClient:
        """``Agent(connect=...)``'s signature: ignores the configured address."""
        return self.client(creds, stop, address=address)


__all__ = ["InProcessCoordinator", "InProcessRpcError"]
