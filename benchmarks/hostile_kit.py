"""A real ``fedsilo coordinator`` process with scripted silos over mTLS, one of them hostile: the kit of
``benchmarks/hostile_load.py`` and ``tests/e2e/test_hostile_silo.py``.

The honest silos run the agent's own client, key ceremony (``HeSession``: real BFV), privacy ledger
and upload signing, without training: each round they upload a known update, so the decrypted
aggregate can be checked against the weighted mean. The hostile silo holds a valid certificate of an
enrolled hospital and talks raw gRPC, so it can send whatever it likes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedsilo.coordinator.config import TlsFiles
from fedsilo.core.tensors import Manifest
from fedsilo.privacy.accounting import LEDGER_RDP_ORDERS, RdpAccountant
from fedsilo.privacy.budget import sign_budget
from fedsilo.privacy.he import HeParams
from fedsilo.privacy.ledger import Ledger
from fedsilo.privacy.plan import PrivacyPlan, ledger_fields
from fedsilo.privacy.upload_statement import statement_signer
from fedsilo.silo_agent.client import CoordinatorClient, Credentials, channel_options
from fedsilo.silo_agent.demo import ADMIN_NAME, make_certs
from fedsilo.silo_agent.secure import HeSession
from fedsilo.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc

RUN_ID = "hostile-run"
SILOS = ("hospital-a", "hospital-b", "hospital-c")
HOSTILE = "hospital-c"
HONEST = ("hospital-a", "hospital-b")  # hospital-a, the first enrolled, is the key holder
EXAMPLES = {"hospital-a": 120, "hospital-b": 360, "hospital-c": 48}
SHAPES = {"w": (48, 16), "b": (16,)}
MANIFEST = Manifest.of_arrays({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
FINGERPRINT = "5e" * 32
PLAN = dict(record_level=True, sample_rate=0.05, steps_per_round=4, max_grad_norm=1.0, noise_multiplier=1.1,
            delta=1e-5)
#: The decrypted HE mean is within this of the true weighted mean (fixed-point rounding; bound 1).
HE_TOLERANCE = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def update_of(name: str, rnd: int) -> np.ndarray:
    """The known flat update silo ``name`` uploads in round ``rnd`` (values well inside the bound 1)."""
    rng = np.random.default_rng([SILOS.index(name), rnd])
    return rng.uniform(-0.5, 0.5, size=MANIFEST.numel)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class Honest:
    """An honest silo played by the script: the agent's client, key ceremony, ledger and signer."""

    name: str
    client: CoordinatorClient
    he: HeSession | None
    ledger: Ledger | None
    sign: Callable[[int, str, int], str]
    cert: bytes
    key: bytes
    stop: threading.Event = field(default_factory=threading.Event)


class HostileFederation:
    """The coordinator process, honest scripted silos, and the hostile silo's raw channel.

    Args:
        work: a fresh folder.
        aggregation: "he" (real BFV) or "plain".
        dp: a record-level DP plan (silos account every round in their ledgers first).
        round_deadline_s: a round closes at its deadline with min_silos uploads.
        start_grace_s: seconds the run waits for the third silo once two joined.
        server: extra ``[server]`` settings (limits).
        dtype: "float32" (default) or "float64" shared tensors.
    """

    def __init__(self, work: Path, *, aggregation: str = "he", dp: bool = True, round_deadline_s: float = 4.0,
                 start_grace_s: float = 600.0, rounds: int = 60, server: dict[str, Any] | None = None,
                 dtype: str = "float32", port: int | None = None) -> None:
        self.work = work
        self.certs = work / "certs"
        if port is None:  # a new federation; with a port: another process's handle on a running one
            make_certs(self.certs, list(SILOS))
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.aggregation, self.dp = aggregation, dp
        self.manifest = MANIFEST if dtype == "float32" else Manifest.of_arrays(
            {k: np.zeros(s, np.float64) for k, s in SHAPES.items()})
        run: dict[str, Any] = dict(id=RUN_ID, rounds=rounds, min_silos=2, round_deadline_s=round_deadline_s,
                                   quorum_timeout_s=600.0, start_grace_s=start_grace_s, aggregation=aggregation,
                                   model_fingerprint=FINGERPRINT, shared_tensors_sha256=self.manifest.digest())
        sections: dict[str, dict[str, Any]] = {
            "run": run,
            "silos": {"enrolled": list(SILOS), "max_train_examples": 10_000},
            "server": {"listen": self.address, "state_dir": str(work / "state"), "ca": str(self.certs / "ca.pem"),
                       "cert": str(self.certs / "coordinator.pem"), "key": str(self.certs / "coordinator.key"),
                       "stall_timeout_s": 2.0, **(server or {})},
            "model": {"name": "scripted"},
        }
        if dp:
            sections["privacy"] = dict(PLAN)
        self.config = work / "federation.toml"
        if port is None:
            write_toml(self.config, sections)
        self.plan = PrivacyPlan(**PLAN) if dp else None
        self.rdp = RdpAccountant(orders=LEDGER_RDP_ORDERS)
        self.proc: subprocess.Popen | None = None
        self._channels: list[grpc.Channel] = []
        self.honest: dict[str, Honest] = {}
        self.normalizer = 0.0
        self.log_path = work / "coordinator.out"
        self.kwargs = dict(aggregation=aggregation, dp=dp, dtype=dtype, port=self.port)

    @classmethod
    def attach(cls, work: Path, **kwargs: Any) -> HostileFederation:
        """A handle on the federation another process started in ``work`` (``kwargs``: its ``kwargs``);
        its honest-silo state (keys, ledgers) lives in a separate folder so the two never share files."""
        return cls(work, **kwargs)

    # -- processes and channels ---------------------------------------------------------------
    def start(self) -> None:
        """Starts ``fedsilo coordinator`` and waits until its health check answers SERVING."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "fedsilo", "coordinator", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=dict(os.environ, OMP_NUM_THREADS="1"))
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.health(timeout=1.0) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
        raise RuntimeError(f"coordinator did not become healthy:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-n:])

    def close(self) -> None:
        for h in self.honest.values():
            h.stop.set()
            h.client.close()
            if h.ledger is not None:
                h.ledger.close()
        for ch in self._channels:
            ch.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.certs / f"{name}.pem", self.certs / f"{name}.key"

    def channel(self, name: str, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        """A new mTLS channel with ``name``'s certificate (a silo, or ADMIN_NAME)."""
        cert, key = self.paths(name)
        creds = grpc.ssl_channel_credentials(root_certificates=(self.certs / "ca.pem").read_bytes(),
                                             private_key=key.read_bytes(), certificate_chain=cert.read_bytes())
        ch = grpc.secure_channel(f"localhost:{self.port}", creds,
                                 options=channel_options() if options is None else options)
        self._channels.append(ch)
        return ch

    def stub(self, name: str = HOSTILE) -> federation_pb2_grpc.FederationStub:
        return federation_pb2_grpc.FederationStub(self.channel(name))

    def rss_mb(self) -> float:
        """The coordinator's resident memory, MB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    # -- liveness -------------------------------------------------------------------------------
    def health(self, timeout: float = 1.0) -> int:
        if not hasattr(self, "_health"):
            self._health = health_pb2_grpc.HealthStub(self.channel(ADMIN_NAME))
        return self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status

    def snapshot(self) -> tuple[admin_pb2.GetStatusResponse, admin_pb2.ListRoundsResponse]:
        admin = self._admin()
        return (admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5),
                admin.ListRounds(admin_pb2.ListRoundsRequest(), timeout=5))

    def _admin(self) -> admin_pb2_grpc.AdminStub:
        if not hasattr(self, "_admin_stub"):
            self._admin_stub = admin_pb2_grpc.AdminStub(self.channel(ADMIN_NAME))
        return self._admin_stub

    def liveness(self) -> dict[str, float]:
        """Seconds each of Heartbeat (an honest silo), admin GetStatus and the health check took to answer;
        each call has a 1 s deadline (DEADLINE_EXCEEDED, UNAVAILABLE or RESOURCE_EXHAUSTED propagate)."""
        if not hasattr(self, "_beat_stub"):
            self._beat_stub = federation_pb2_grpc.FederationStub(self.channel(HONEST[1]))
        out = {}
        answered = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
        for what, call in (
                ("heartbeat", lambda: self._beat_stub.Heartbeat(federation_pb2.HeartbeatRequest(), timeout=1.0)),
                ("status", lambda: self._admin().GetStatus(admin_pb2.GetStatusRequest(), timeout=1.0)),
                ("health", lambda: self.health(timeout=1.0))):
            t = time.monotonic()
            try:
                call()
            except grpc.RpcError as err:  # an answer (e.g. "call Join first") is an answer; not these
                if err.code() in answered:
                    raise
            out[what] = time.monotonic() - t
        return out

    # -- the honest silos -------------------------------------------------------------------------
    def _honest(self, name: str) -> Honest:
        if name not in self.honest:
            cert, key = self.paths(name)
            client = CoordinatorClient(f"localhost:{self.port}", Credentials(ca=self.certs / "ca.pem", cert=cert,
                                                                              key=key), max_backoff_s=0.5, quiet=True)
            he = None
            if self.aggregation == "he":
                params = HeParams.from_bytes(client.get_run().he_parameters)
                he = HeSession(run_id=RUN_ID, me=name, params=params, key_holder=SILOS[0],
                               state_dir=self.work / "silos" / name,
                               tls=TlsFiles(ca=self.certs / "ca.pem", cert=cert, key=key))
            ledger = None
            if self.dp:
                ledger = Ledger.open(self.work / "silos" / f"{name}-ledger.sqlite", silo=name,
                                     certificate_pem=cert.read_bytes(), private_key_pem=key.read_bytes())
            sign = statement_signer(run_id=RUN_ID, silo=name, certificate_pem=cert.read_bytes(),
                                    private_key_pem=key.read_bytes())
            self.honest[name] = Honest(name=name, client=client, he=he, ledger=ledger, sign=sign,
                                       cert=cert.read_bytes(), key=key.read_bytes())
        return self.honest[name]

    def join(self, name: str, examples: int | None = None) -> None:
        """``name`` joins as an agent would (announcement, budget statement)."""
        h = self._honest(name)
        budget = b""
        if self.dp:
            budget = sign_budget(silo=name, epsilon=1e6, delta=PLAN["delta"], certificate_pem=h.cert,
                                 private_key_pem=h.key).to_json().encode()
        h.client.join(fingerprint=FINGERPRINT, num_train_examples=examples or EXAMPLES[name],
                      manifest=self.manifest, agent_version="scripted/1",
                      kem_announcement=h.he.announcement if h.he else b"", budget_statement=budget)

    def ceremony(self, names: tuple[str, ...] = SILOS) -> None:
        """Every silo in ``names`` joins; the key holder wraps the run's key for the others, who take it."""
        for name in names:
            self.join(name)
        if self.aggregation != "he":
            return
        holder = self._honest(SILOS[0])
        assert holder.he is not None
        holder.he.ensure_key(holder.client, holder.stop)
        holder.he.serve_recipients(holder.client)
        for name in names[1:]:
            h = self._honest(name)
            assert h.he is not None
            h.he.ensure_key(h.client, h.stop)

    def account(self, name: str, rnd: int) -> None:
        """The silo's ledger entries of round ``rnd``'s releases, mirrored before it uploads (DP runs)."""
        h = self._honest(name)
        if h.ledger is None or self.plan is None:
            return
        if any(e.run_id == RUN_ID and e.round == rnd for e in h.ledger.entries()):
            return
        for planned in self.plan.round_releases():
            h.ledger.append(**ledger_fields(h.ledger.entries(), planned, delta=self.plan.delta, run_id=RUN_ID,
                                            round=rnd, accountant=self.rdp))
        mirrored = h.client.submit_ledger_entries([])
        pending = [e.to_json() for e in h.ledger.entries() if e.seq > mirrored]
        for i in range(0, len(pending), 64):
            h.client.submit_ledger_entries(pending[i:i + 64])

    def upload(self, name: str, rnd: int, values: np.ndarray | None = None, normalizer: float | None = None) -> int:
        """Uploads ``values`` (default: the silo's known update) for round ``rnd`` as an agent does."""
        h = self._honest(name)
        self.account(name, rnd)
        values = update_of(name, rnd) if values is None else values
        weight = float(EXAMPLES[name])
        if h.he is not None:
            scaled = values * (weight / (normalizer or self.normalizer))
            blobs = h.he.encrypt(scaled)
            return _while_slot_busy(lambda: h.client.submit_he(rnd, weight, self.manifest, blobs, h.sign))
        arrays, offset = {}, 0
        for t in self.manifest.tensors:
            arrays[t.name] = values[offset:offset + t.numel].reshape(t.shape).astype(t.dtype.numpy)
            offset += t.numel
        return _while_slot_busy(lambda: h.client.submit(rnd, weight, arrays, h.sign))

    def task(self, name: str, after: int, wait_s: int = 10):  # -> silo_agent.wire.Task
        return self._honest(name).client.get_task(after, wait_s=wait_s)

    def wait_closed(self, rnd: int, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status, _ = self.snapshot()
            if status.last_closed_round >= rnd or status.state not in (federation_pb2.RUN_STATE_RUNNING,):
                return
            time.sleep(0.05)
        raise TimeoutError(f"round {rnd} did not close:\n{self.log_tail()}")

    def mean(self, name: str, rnd: int) -> tuple[np.ndarray | None, Any]:
        """Round ``rnd``'s aggregate as silo ``name`` decrypts it: (the weighted mean or None if the round
        failed, the fetched aggregate)."""
        h = self._honest(name)
        agg = h.client.fetch(rnd)
        if agg.failed:
            return None, agg
        if h.he is None:
            return np.concatenate([agg.arrays[t.name].astype(np.float64).ravel() for t in agg.manifest.tensors]), agg
        total = h.he.decrypt_sum(agg.ciphertexts, agg.manifest.numel, contributors=agg.num_contributors)
        return total * (agg.weight_normalizer / agg.total_weight), agg

    def honest_round(self, *, with_hostile: bool = False, hostile_values: np.ndarray | None = None,
                     timeout: float = 60.0, between: Callable[[], None] | None = None) -> dict[str, Any]:
        """One round of the honest silos (and the hostile one uploading ``hostile_values`` or its known
        update if ``with_hostile``, after ``between()`` ran): task, upload, close, fetch, decrypt, check
        against numpy.

        Returns:
            {"round", "seconds", "honest_upload_s" (tasks and the honest uploads), "error" (max |mean -
            expected|), "contributors", "failed"}.
        """
        t0 = time.monotonic()
        status, _ = self.snapshot()
        after = status.last_closed_round
        tasks = {n: self.task(n, after) for n in HONEST}
        rounds = {t.round for t in tasks.values() if t.kind == "train"}
        if len(rounds) != 1:
            raise RuntimeError(f"honest silos got tasks {tasks}:\n{self.log_tail()}")
        (rnd,) = rounds
        self.normalizer = tasks[HONEST[0]].weight_normalizer
        uploaders = list(HONEST)
        for n in HONEST:
            self.upload(n, rnd)
        honest_upload_s = time.monotonic() - t0
        if between is not None:
            between()
        if with_hostile or hostile_values is not None:
            self.upload(HOSTILE, rnd, hostile_values)
            uploaders.append(HOSTILE)
        self.wait_closed(rnd, timeout)
        mean, agg = self.mean(HONEST[1], rnd)
        seconds = time.monotonic() - t0
        out: dict[str, Any] = {"round": rnd, "seconds": seconds, "contributors": agg.num_contributors,
                               "failed": agg.failed, "honest_upload_s": honest_upload_s}
        if mean is not None:
            contributed = uploaders[:agg.num_contributors]
            w = np.array([EXAMPLES[n] for n in contributed], dtype=np.float64)
            vals = [update_of(n, rnd) if not (n == HOSTILE and hostile_values is not None) else hostile_values
                    for n in contributed]
            want = sum(wi * v for wi, v in zip(w, vals)) / w.sum()
            out["error"] = float(np.max(np.abs(mean - want)))
        return out

    # -- the hostile silo's raw calls ---------------------------------------------------------------
    def stalled_upload(self, channel: grpc.Channel, rnd: int, *, header: bool = True) -> tuple[Any, threading.Event]:
        """Opens a SubmitUpdate stream that sends (a header and then) nothing; returns (future, release)."""
        release = threading.Event()

        def requests() -> Iterator[federation_pb2.SubmitUpdateRequest]:
            if header:
                yield federation_pb2.SubmitUpdateRequest(header=federation_pb2.UpdateHeader(
                    round=rnd, weight=float(EXAMPLES[HOSTILE]), manifest=_manifest_msg(self.manifest),
                    encoding=2 if self.aggregation == "he" else 1, payload_bytes=1024))
            release.wait(120)

        stub = federation_pb2_grpc.FederationStub(channel)
        return stub.SubmitUpdate.future(requests(), timeout=120), release


def _while_slot_busy(call: Callable[[], Any], timeout: float = 30.0) -> Any:
    """``call()``, again while the silo's own upload slot is still held (a stream of its that was just
    cut or cancelled: the coordinator frees the slot as soon as it notices, which on a loaded machine
    can take a moment)."""
    end = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            busy = err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "already holds" in (err.details() or "")
            if not busy or time.monotonic() > end:
                raise
            time.sleep(0.2)


def _manifest_msg(manifest: Manifest):  # -> tensor_pb2.PayloadManifest
    from fedsilo.v1 import tensor_pb2

    return tensor_pb2.PayloadManifest(
        tensors=[tensor_pb2.TensorSpec(name=t.name, dtype=t.dtype.value, shape=list(t.shape))
                 for t in manifest.tensors], total_bytes=manifest.total_bytes)


def manifest_msg(manifest: Manifest = MANIFEST):  # -> tensor_pb2.PayloadManifest
    """The shared tensors as the wire's PayloadManifest."""
    return _manifest_msg(manifest)
