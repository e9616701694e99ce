"""The coordinator daemon: gRPC server with mTLS, health checking, deadline ticker, clean shutdown."""

from __future__ import annotations

import ctypes
import functools
import logging
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedsilo.coordinator.config import AggregationMode, FederationConfig
from fedsilo.coordinator.guard import CallGuard
from fedsilo.coordinator.limits import CallLimits, RateLimitedLog, worker_threads
from fedsilo.coordinator.metrics import CoordinatorMetrics
from fedsilo.coordinator.run import Coordinator
from fedsilo.coordinator.servicer import AdminServicer, FederationServicer, abort_refused, caller_label
from fedsilo.v1 import admin_pb2_grpc, federation_pb2_grpc

log = logging.getLogger("fedsilo.coordinator")

TICK_S = 0.2
_MAX_MESSAGE = 8 * 2**20
PLAINTEXT_AGGREGATION_WARNING = (
    "aggregation = plain: the coordinator sees every silo's update in the clear. Encrypted aggregation "
    "is the way to keep updates from the coordinator; use plain aggregation only where the coordinator is trusted."
)
NO_DP_WARNING = (
    "no [privacy] section: this run has no differential privacy. Encryption hides updates from the "
    "coordinator, but the shared model itself can leak training images to whoever receives it."
)
UNPINNED_MODEL_WARNING = (
    "no run.model_fingerprint: the first silo to join decides the run's model and shared tensors, so an enrolled "
    "silo that joins first with a made-up model locks every other silo out. Pin the model: run `fedsilo pin-model "
    "--config federation.toml` where torch is installed and paste its two lines under [run]."
)
INSECURE_WARNING = (
    "INSECURE: the coordinator is serving plaintext gRPC without TLS. Silo identities are unverified "
    "and everything on the wire is readable. Use this only on a development machine."
)


#: Fixed HTTP/2 flow-control window per stream. gRPC's default probing grows windows to several
#: MB per stream on fast links, so memory would grow with the number of silos uploading at once;
#: a fixed 256 KiB window bounds it (about 2.5 MB/s per stream at 100 ms round-trip time, 25 MB/s at 10 ms).
STREAM_WINDOW_BYTES = 2**18


#: The coordinator pings each connection after this long without traffic, and drops it when the ping
#: is not answered within KEEPALIVE_TIMEOUT_MS: the calls of a peer that vanished end, freeing their slots.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
#: A client's pings closer together than this count as strikes; after MAX_PING_STRIKES the
#: connection is closed (GOAWAY "too_many_pings"). The agent pings every 30 s (silo_agent.client).
MIN_CLIENT_PING_INTERVAL_MS = 10_000
MAX_PING_STRIKES = 2


def server_options(max_chunk_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel options: message limit just above one chunk, bounded windows, keepalive and
    the ping policy clients must keep to."""
    return [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
        ("grpc.max_receive_message_length", max(_MAX_MESSAGE, max_chunk_bytes + 2**20)),
        ("grpc.max_send_message_length", max(_MAX_MESSAGE, max_chunk_bytes + 2**20)),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class CoordinatorServer:
    """A running coordinator: the ``Coordinator`` state machine behind a gRPC server.

    Every call passes a ``CallGuard`` first (``fedsilo.coordinator.limits``): per-identity limits and
    stall timeouts from the config's ``[server]`` settings.

    Args:
        config: validated run config.
        max_workers: gRPC worker threads; None (the default) sizes the pool so that every enrolled
            silo, an admin and all other callers can hold all the calls they may hold, plus a
            reserve (``limits.worker_threads``). A smaller pool lets one identity exhaust it.
    """

    def __init__(self, config: FederationConfig, *, max_workers: int | None = None) -> None:
        self.config = config
        self.coordinator = Coordinator(config)
        limits = CallLimits.from_config(config)
        needed = worker_threads(limits, len(config.silos))
        if max_workers is not None and max_workers < needed:
            log.warning("%d gRPC workers: fewer than the %d every identity's share needs; one caller may "
                        "exhaust them", max_workers, needed)
        refusals = RateLimitedLog(log)
        self._guard = CallGuard(limits, enrolled=config.silos,
                                identify=functools.partial(caller_label, insecure=config.insecure),
                                refuse=functools.partial(abort_refused, refusals=refusals), log=refusals)
        #: The Prometheus endpoint's registry and RPC interceptor (``[metrics]``); None when the config has none.
        self.metrics = CoordinatorMetrics(self.coordinator, config.metrics) if config.metrics is not None else None
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers or needed, thread_name_prefix="rpc"),
            interceptors=[self._guard] if self.metrics is None else [self.metrics.interceptor, self._guard],
            options=server_options(config.max_chunk_bytes))
        federation_pb2_grpc.add_FederationServicer_to_server(
            FederationServicer(self.coordinator, refusals=refusals), self._server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.coordinator, refusals=refusals), self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        if config.aggregation is AggregationMode.PLAIN:
            log.warning(PLAINTEXT_AGGREGATION_WARNING)
        if config.privacy is None:
            log.warning(NO_DP_WARNING)
        if config.model_fingerprint is None:
            log.warning(UNPINNED_MODEL_WARNING)
        if config.insecure:
            log.warning(INSECURE_WARNING)
            self.port = self._server.add_insecure_port(config.listen)
        else:
            assert config.tls is not None
            creds = grpc.ssl_server_credentials(
                [(Path(config.tls.key).read_bytes(), Path(config.tls.cert).read_bytes())],
                root_certificates=Path(config.tls.ca).read_bytes(),
                require_client_auth=True,
            )
            self.port = self._server.add_secure_port(config.listen, creds)
        if self.port == 0:
            raise OSError(f"could not bind {config.listen}")
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="deadlines", daemon=True)

    def _tick_loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.coordinator.tick()
            except Exception:
                log.exception("deadline check failed")

    def start(self) -> None:
        """Starts serving (the metrics endpoint first: an address it cannot bind raises OSError before any call)."""
        if self.metrics is not None:
            self.metrics.start()
        self._guard.start()
        self._server.start()
        for name in ("", "fedsilo.v1.Federation", "fedsilo.v1.Admin"):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._ticker.start()
        log.info("coordinator for run %s listening on port %d (%s)", self.config.run_id, self.port,
                 "INSECURE" if self.config.insecure else "mTLS")

    def stop(self, grace: float = 5.0) -> None:
        """Stops accepting calls, lets running ones finish for ``grace`` seconds, closes state."""
        self._health.enter_graceful_shutdown()
        self._stop.set()
        self._server.stop(grace).wait()
        self._guard.stop()
        if self._ticker.is_alive():
            self._ticker.join()
        if self.metrics is not None:
            self.metrics.stop()
        self.coordinator.close()
        log.info("coordinator stopped")

    def wait(self) -> None:
        """Blocks until the server stops."""
        self._server.wait_for_termination()


def setup_logging(state_dir: Path, filename: str, level: int = logging.INFO) -> None:
    """Logs to stderr and to ``state_dir/filename``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger("fedsilo")
    root.setLevel(level)
    root.propagate = False  # a library's logging.basicConfig (Opacus calls one on import) must not echo ours
    root.handlers.clear()
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(state_dir / filename)):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Caps glibc's per-thread malloc arenas (M_ARENA_MAX) so freed chunk buffers are reused.

    Without it every gRPC worker thread keeps its own arena of freed 1 MiB chunk buffers, and
    resident memory grows with the number of concurrent uploads although live memory does not.
    A no-op where glibc is not the allocator.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8 = M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def serve(config: FederationConfig) -> int:
    """Runs the coordinator until SIGTERM or SIGINT; returns the exit status."""
    limit_malloc_arenas()
    setup_logging(Path(config.state_dir), "coordinator.log")
    server = CoordinatorServer(config)
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    while not done.wait(1.0):
        pass
    server.stop()
    return 0
