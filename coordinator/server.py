"""The coordinator daemon: gRPC server with mTLS, health checking, deadline ticker, clean shutdown."""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedsilo.coordinator.config import AggregationMode, FederationConfig
from fedsilo.coordinator.run import Coordinator
from fedsilo.coordinator.servicer import AdminServicer, FederationServicer
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
INSECURE_WARNING = (
    "INSECURE: the coordinator is serving plaintext gRPC without TLS. Silo identities are unverified "
    "and everything on the wire is readable. Use this only on a development machine."
)


#: Fixed HTTP/2 flow-control window per stream. gRPC's default probing grows windows to several
#: MB per stream on fast links, so memory would grow with the number of silos uploading at once;
#: a fixed 256 KiB window bounds it (about 2.5 MB/s per stream at 100 ms round-trip time, 25 MB/s at 10 ms).
STREAM_WINDOW_BYTES = 2**18


def server_options(max_chunk_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel options: message limit just above one chunk, bounded windows, keepalive."""
    return [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
        ("grpc.max_receive_message_length", max(_MAX_MESSAGE, max_chunk_bytes + 2**20)),
        ("grpc.max_send_message_length", max(_MAX_MESSAGE, max_chunk_bytes + 2**20)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class CoordinatorServer:
    """A running coordinator: the ``Coordinator`` state machine behind a gRPC server.

    Args:
        config: validated run config.
        max_workers: gRPC worker threads (long polls hold one each).
    """

    def __init__(self, config: FederationConfig, *, max_workers: int = 64) -> None:
        self.config = config
        self.coordinator = Coordinator(config)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
                                   options=server_options(config.max_chunk_bytes))
        federation_pb2_grpc.add_FederationServicer_to_server(FederationServicer(self.coordinator), self._server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.coordinator), self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        if config.aggregation is AggregationMode.PLAIN:
            log.warning(PLAINTEXT_AGGREGATION_WARNING)
        if config.privacy is None:
            log.warning(NO_DP_WARNING)
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
        """Starts serving."""
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
        if self._ticker.is_alive():
            self._ticker.join()
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
