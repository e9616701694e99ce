"""The agent's gRPC client: mTLS channel, stubs, and retries with backoff when the coordinator is away."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from fedsilo.coordinator.servicer import INSECURE_IDENTITY_KEY
from fedsilo.core.tensors import Manifest
from fedsilo.silo_agent import wire
from fedsilo.v1 import admin_pb2_grpc, federation_pb2_grpc

log = logging.getLogger("fedsilo.agent")
T = TypeVar("T")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
#: Client-side TLS failures: the coordinator's certificate or protocol is not what we trust.
_OUR_TLS_REFUSAL = ("tls handshake failed", "certificate_verify_failed", "hostname verification", "wrong_version_number")
#: The server closes the socket without an alert when it refuses our certificate; a coordinator that
#: restarts mid-connection looks the same once, so only several in a row count as a refusal.
_SOCKET_CLOSED = "socket closed"
SOCKET_CLOSED_LIMIT = 5


class Stopped(Exception):
    """The agent was asked to stop while waiting to retry."""


class TlsRefused(Exception):
    """The TLS handshake failed: wrong CA, expired certificate, or wrong coordinator host."""


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """How to reach the coordinator: mTLS files, or an insecure identity claim."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure_identity: str | None = None  # "role:name", only with --insecure


def channel_options(max_chunk_bytes: int = 2**20) -> list[tuple[str, int]]:
    """Channel options: a message limit just above one chunk, keepalive pings."""
    limit = max(8 * 2**20, max_chunk_bytes + 2**20)
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]


def open_channel(address: str, creds: Credentials) -> grpc.Channel:
    """A channel to ``address`` with mutual TLS (or plaintext when ``creds`` is insecure)."""
    if creds.insecure_identity is not None:
        return grpc.insecure_channel(address, options=channel_options())
    assert creds.ca and creds.cert and creds.key
    ssl = grpc.ssl_channel_credentials(root_certificates=Path(creds.ca).read_bytes(),
                                       private_key=Path(creds.key).read_bytes(),
                                       certificate_chain=Path(creds.cert).read_bytes())
    return grpc.secure_channel(address, ssl, options=channel_options())


def tls_failure(err: grpc.RpcError) -> str | None:
    """Classifies an UNAVAILABLE error: "ours" (we refuse the coordinator), "theirs" (possibly the
    coordinator refusing our certificate), or None (down / unreachable: retry)."""
    if err.code() is not grpc.StatusCode.UNAVAILABLE:
        return None
    details = (err.details() or "").lower()
    if any(h in details for h in _OUR_TLS_REFUSAL):
        return "ours"
    if details.rstrip().endswith(_SOCKET_CLOSED):
        return "theirs"
    return None


class CoordinatorClient:
    """Calls the coordinator; retries UNAVAILABLE with exponential backoff until ``stop`` is set.

    Args:
        address: host:port of the coordinator.
        creds: how to authenticate.
        stop: set to abandon retries (raises ``Stopped``).
        max_backoff_s: longest pause between attempts.
        retry: False for one-shot commands: errors are raised at once.
        quiet: log retries at DEBUG instead of WARNING (for monitoring clients).
        stubs: (federation, admin) stubs to call instead of dialling ``address`` over gRPC.
    """

    def __init__(self, address: str, creds: Credentials, *, stop: threading.Event | None = None,
                 max_backoff_s: float = 10.0, retry: bool = True, quiet: bool = False,
                 stubs: tuple[Any, Any] | None = None) -> None:
        self.address = address
        if stubs is None:
            self._channel: grpc.Channel | None = open_channel(address, creds)
            self._stub = federation_pb2_grpc.FederationStub(self._channel)
            self._admin = admin_pb2_grpc.AdminStub(self._channel)
        else:  # fedsilo bench's in-process transport (fedsilo.silo_agent.inprocess): same calls, no socket
            self._channel = None
            self._stub, self._admin = stubs
        self._md = ((INSECURE_IDENTITY_KEY, creds.insecure_identity),) if creds.insecure_identity else None
        self.stop = stop or threading.Event()
        self._max_backoff = max_backoff_s
        self._retry_enabled = retry
        self._retry_log_level = logging.DEBUG if quiet else logging.WARNING
        self.chunk_bytes = 2**20

    def close(self) -> None:
        """Closes the channel."""
        if self._channel is not None:
            self._channel.close()

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        delay = 0.25
        closed = 0
        while True:
            if self.stop.is_set():
                raise Stopped(what)
            try:
                return fn()
            except grpc.RpcError as err:
                kind = tls_failure(err)
                if kind == "ours":
                    raise TlsRefused(
                        f"refusing the coordinator at {self.address}: {err.details()}. Check that tls.ca is the "
                        "federation CA and that the coordinator's certificate names the host you dial."
                    ) from None
                closed = closed + 1 if kind == "theirs" else 0
                if closed >= SOCKET_CLOSED_LIMIT:
                    raise TlsRefused(
                        f"the coordinator at {self.address} closed the connection during the TLS handshake "
                        f"{closed} times in a row: it refuses this silo's certificate (not issued by the "
                        "federation CA, expired, or revoked). Ask the federation operator; the coordinator's "
                        "log names the reason."
                    ) from None
                if err.code() not in _RETRYABLE or not self._retry_enabled:
                    raise
                log.log(self._retry_log_level, "%s: coordinator unavailable (%s); retrying in %.1f s", what,
                        err.details(), delay)
            if self.stop.wait(delay * random.uniform(0.8, 1.2)):
                raise Stopped(what)
            delay = min(delay * 2, self._max_backoff)

    def get_run(self) -> wire.RunInfo:
        """The run's parameters."""
        info = wire.run_info_from_proto(self._retry("GetRun", lambda: self._stub.GetRun(
            wire.get_run_request(), metadata=self._md, timeout=30)))
        self.chunk_bytes = info.max_chunk_bytes or self.chunk_bytes
        return info

    def join(self, *, fingerprint: str, num_train_examples: int, manifest: Manifest, agent_version: str,
             kem_announcement: bytes = b"", budget_statement: bytes = b"") -> str:
        """Joins the run; returns the silo name the coordinator read from the certificate."""
        req = wire.join_request(fingerprint=fingerprint, num_train_examples=num_train_examples,
                                manifest=manifest, agent_version=agent_version, kem_announcement=kem_announcement,
                                budget_statement=budget_statement)
        return self._retry("Join", lambda: self._stub.Join(req, metadata=self._md, timeout=30)).silo_name

    def get_task(self, after_round: int, wait_s: int = 10) -> wire.Task:
        """Long-polls for the next task."""
        req = wire.get_task_request(after_round, wait_s)
        return wire.task_from_proto(self._retry("GetTask", lambda: self._stub.GetTask(
            req, metadata=self._md, timeout=wait_s + 30)))

    def submit(self, rnd: int, weight: float, arrays: Mapping[str, np.ndarray],
               sign: wire.UploadSigner | None = None) -> int:
        """Streams one update (a retry after a lost connection resends the whole stream), its trailer
        carrying the statement ``sign`` makes of it (required with mTLS).

        Returns:
            The number of uploads the round has so far, this one included.
        """
        return self._retry("SubmitUpdate", lambda: self._stub.SubmitUpdate(
            wire.upload_requests(rnd, weight, arrays, self.chunk_bytes, sign), metadata=self._md,
            timeout=3600)).uploads_in_round

    def submit_he(self, rnd: int, weight: float, manifest: Manifest, blobs: Sequence[bytes],
                  sign: wire.UploadSigner | None = None) -> int:
        """Streams one encrypted update (signed as :meth:`submit`); returns the number of uploads the round has so far."""
        return self._retry("SubmitUpdate", lambda: self._stub.SubmitUpdate(
            wire.upload_he_requests(rnd, weight, manifest, blobs, self.chunk_bytes, sign), metadata=self._md,
            timeout=3600)).uploads_in_round

    def report_aggregate_failure(self, rnd: int, reason: str) -> bool:
        """Reports round ``rnd``'s aggregate unusable; returns whether the round is now marked failed."""
        req = wire.failure_report_request(rnd, reason)
        return bool(self._retry("ReportAggregateFailure", lambda: self._stub.ReportAggregateFailure(
            req, metadata=self._md, timeout=30)).round_failed)

    def submit_ledger_entries(self, entries_json: Sequence[str]) -> int:
        """Sends ledger entries to the coordinator's mirror; returns the highest mirrored seq."""
        req = wire.ledger_request(entries_json)
        return int(self._retry("SubmitLedgerEntries", lambda: self._stub.SubmitLedgerEntries(
            req, metadata=self._md, timeout=60)).mirrored_through_seq)

    def decline(self, rnd: int, reason: str, *, final: bool) -> int:
        """Declines a round; returns how many silos are still training."""
        req = wire.decline_request(rnd, reason, final)
        return int(self._retry("DeclineRound", lambda: self._stub.DeclineRound(
            req, metadata=self._md, timeout=30)).silos_training)

    def publish_sealed(self, purpose: str, blob: bytes) -> int:
        """Publishes this silo's sealed ``blob`` under ``purpose`` of the coordinator's sealed relay;
        returns how many silos have published under it."""
        req = wire.publish_sealed_request(purpose, blob)
        return int(self._retry("PublishSealed", lambda: self._stub.PublishSealed(
            req, metadata=self._md, timeout=60)).published)

    def sealed(self, purpose: str) -> tuple[dict[str, bytes], int]:
        """The other silos' sealed blobs under ``purpose`` so far (every page), and how many silos have joined."""
        blobs: dict[str, bytes] = {}
        after = ""
        while True:
            req = wire.get_sealed_request(purpose, after)
            page, joined, more = wire.sealed_from_proto(self._retry("GetSealed", lambda: self._stub.GetSealed(
                req, metadata=self._md, timeout=60)))
            blobs.update(page)
            if not more or not page:
                return blobs, joined
            after = max(page)

    def key_recipients(self) -> list[tuple[str, bytes]]:
        """Key holder: silos waiting for the wrapped key, with their signed X25519 announcements."""
        return wire.key_recipients_from_proto(self._retry("ListKeyRecipients", lambda: self._stub.ListKeyRecipients(
            wire.list_key_recipients_request(), metadata=self._md, timeout=30)))

    def publish_wrapped_keys(self, entries: Sequence[tuple[str, bytes]]) -> None:
        """Key holder: hands wrapped keys to the coordinator for relaying."""
        req = wire.publish_request(entries)
        self._retry("PublishWrappedKeys", lambda: self._stub.PublishWrappedKeys(req, metadata=self._md, timeout=60))

    def wrapped_key(self) -> bytes | None:
        """The run's key wrapped for this silo, or None while the key holder has not published it."""
        return wire.wrapped_key_from_proto(self._retry("GetWrappedKey", lambda: self._stub.GetWrappedKey(
            wire.get_wrapped_key_request(), metadata=self._md, timeout=30)))

    def fetch(self, rnd: int) -> wire.Aggregate:
        """Fetches a closed round's aggregate."""
        return self._retry("FetchAggregate", lambda: wire.aggregate_from_stream(self._stub.FetchAggregate(
            wire.fetch_request(rnd), metadata=self._md, timeout=3600)))

    def heartbeat(self, rnd: int, activity: wire.Activity) -> None:
        """One heartbeat, no retry (the next one comes soon)."""
        self._stub.Heartbeat(wire.heartbeat_request(rnd, activity), metadata=self._md,
                             timeout=10)

    def report_metrics(self, rnd: int, metrics: Mapping[str, tuple[float, int]]) -> None:
        """Reports evaluation numbers for a closed round."""
        req = wire.metrics_request(rnd, metrics)
        self._retry("ReportMetrics", lambda: self._stub.ReportMetrics(req, metadata=self._md, timeout=30))

    # -- admin --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Admin: the run's status (needs an admin certificate)."""
        return wire.status_from_proto(self._retry("GetStatus", lambda: self._admin.GetStatus(
            wire.status_request(), metadata=self._md, timeout=30)))

    def rounds(self) -> list[dict[str, Any]]:
        """Admin: the round history (needs an admin certificate)."""
        return wire.rounds_from_proto(self._retry("ListRounds", lambda: self._admin.ListRounds(
            wire.rounds_request(), metadata=self._md, timeout=30)))

    def privacy(self) -> dict[str, Any]:
        """Admin: each silo's budget and cumulative ε from the ledger mirror (needs an admin certificate)."""
        return wire.privacy_from_proto(self._retry("GetPrivacy", lambda: self._admin.GetPrivacy(
            wire.privacy_request(), metadata=self._md, timeout=30)))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Polls ``predicate`` until true or ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
