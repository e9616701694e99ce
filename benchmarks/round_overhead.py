"""Round overhead of the coordinator: transport + aggregation, without local training.

For each number of silos K (default 3 and 10) this script:

1. makes a fresh temp dir with a fresh federation CA, a coordinator certificate for loopback,
   one silo certificate per silo and an admin certificate (``fedsilo.privacy.pki``);
2. writes a ``federation.toml`` (plain aggregation, FedAvg, K enrolled silos, quorum K) and
   starts the coordinator as its own OS process with the real CLI:
   ``python -m fedsilo coordinator --config federation.toml``;
3. runs K silos (processes by default, or threads) that use the real ``CoordinatorClient``:
   each joins with a manifest of a few float32 tensors adding up to ``--params`` values; per
   round each long-polls GetTask until the round is open, all wait on a barrier, then all
   upload a random numpy update at the same moment (no torch, nothing is trained), wait for
   the round to close (GetTask long-poll, as the agent does) and fetch the aggregate;
4. reads the coordinator's own round history (admin ``ListRounds``) and its peak RSS
   (``VmHWM`` in ``/proc/<pid>/status``), then stops everything and deletes the temp dir.

Round overhead = from the first silo starting its upload until the last silo has the aggregate
(upload + validation + aggregation + close + download). Warm-up rounds (``--warmup``, default
1) are run but not counted; the table shows the median of ``--rounds`` measured rounds.

Bytes per parameter come from the coordinator's own counters (serialized protobuf message
sizes, ``bytes_up``/``bytes_down`` of ListRounds) divided by (params x silos); the TCP column is
what the kernel counted on the coordinator's sockets (``ss -ti``: TLS records, HTTP/2 frames,
GetTask polls included).

With ``--aggregation he`` the run uses homomorphic aggregation instead (``aggregation = "he"``,
the default ``[he]`` parameters, mTLS required): the silos do the real key ceremony (the first
enrolled silo generates the key and wraps it for the others through the coordinator, before round
1, not timed) and each measured round is the end-to-end encrypted round: quantize + encrypt the
weighted update, upload, the coordinator adds ciphertexts and closes the round, download, decrypt
and divide. Its round overhead is from the first silo starting to encrypt until the last silo holds
the decrypted weighted mean; the aggregate check compares that mean with the float64 weighted mean
(max |error| <= 1e-4 * max |mean|).

Usage::

    python benchmarks/round_overhead.py [--params 1000000] [--silos 3 10] [--rounds 3]
                                        [--warmup 1] [--clients processes|threads] [--insecure]
                                        [--aggregation plain|he]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.silo_agent.demo import ADMIN_NAME, free_port, make_certs

TARGET_OVERHEAD_S = 0.5  # per round, at 3 silos
TARGET_HE_ROUND_S = 2.0  # the whole encrypted round, at 3 silos (issue 3)
HE_ERROR_BOUND = 1e-4  # max |decrypted mean - float64 mean| <= HE_ERROR_BOUND * max |float64 mean|
TARGET_RSS_RATIO = 1.10  # peak RSS at the largest K / at the smallest K: "flat"
FINGERPRINT = hashlib.sha256(b"fedsilo round-overhead benchmark").hexdigest()
BARRIER_TIMEOUT_S = 300.0


# -- setup --------------------------------------------------------------------------------------
def silo_names(k: int) -> list[str]:
    return [f"silo-{i:02d}" for i in range(k)]


def tensor_layout(params: int) -> list[tuple[str, tuple[int, ...]]]:
    """A few float32 tensors whose sizes add up to ``params`` (1M: 500k + 250k + 249k + 1k)."""
    if params < 4:
        return [("w", (params,))]
    bias = min(1000, params // 4)
    a, b = params // 2, params // 4
    c = params - a - b - bias
    return [("layer1.weight", (a,)), ("layer2.weight", (b,)), ("layer3.weight", (c,)), ("layer3.bias", (bias,))]


def make_update(layout: list[tuple[str, tuple[int, ...]]], seed: int, idx: int, rnd: int) -> dict[str, np.ndarray]:
    """Silo ``idx``'s random update for round ``rnd`` (deterministic, so the aggregate can be checked)."""
    rng = np.random.default_rng([seed, idx, rnd])
    return {name: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01) for name, shape in layout}


def weight_of(idx: int) -> float:
    return float(100 + 10 * idx)


def write_federation_toml(work: Path, *, names: list[str], rounds: int, port: int, insecure: bool,
                          aggregation: str = "plain") -> Path:
    lines = [
        "[run]",
        'id = "round-overhead"',
        f"rounds = {rounds}",
        f"min_silos = {len(names)}",
        "round_deadline_s = 600",
        "start_grace_s = 0",
        'strategy = "fedavg"',
        f"aggregation = {json.dumps(aggregation)}",
        "",
        "[silos]",
        f"enrolled = {json.dumps(names)}",
        "",
        "[server]",
        f'listen = "127.0.0.1:{port}"',
        f"state_dir = {json.dumps(str(work / 'coordinator'))}",
    ]
    if insecure:
        lines.append("insecure = true")
    else:
        c = work / "certs"
        lines += [f"ca = {json.dumps(str(c / 'ca.pem'))}", f"cert = {json.dumps(str(c / 'coordinator.pem'))}",
                  f"key = {json.dumps(str(c / 'coordinator.key'))}"]
    lines += ["", "[model]", "", "[training]", ""]
    path = work / "federation.toml"
    path.write_text("\n".join(lines))
    return path


def credentials(work: Path, role: str, name: str, insecure: bool) -> Any:
    from fedsilo.silo_agent.client import Credentials

    if insecure:
        return Credentials(insecure_identity=f"{role}:{name}")
    c = work / "certs"
    return Credentials(ca=c / "ca.pem", cert=c / f"{name}.pem", key=c / f"{name}.key")


# -- /proc readings of the coordinator --------------------------------------------------------
def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields_ = f.read().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


_SS_BYTES = re.compile(r"\bbytes_(sent|received):(\d+)")


def tcp_bytes(port: int) -> tuple[int, int] | None:
    """(received, sent) by the coordinator's established sockets on ``port``; None without ``ss``."""
    try:
        out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    got = {"sent": 0, "received": 0}
    found = False
    for kind, n in _SS_BYTES.findall(out):
        got[kind] += int(n)
        found = True
    return (got["received"], got["sent"]) if found else None


# -- the silos ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiloJob:
    idx: int
    name: str
    address: str
    work: Path
    insecure: bool
    layout: list[tuple[str, tuple[int, ...]]]
    total_rounds: int
    seed: int
    return_last_aggregate: bool
    aggregation: str = "plain"


class _HeSilo:
    """A silo's HE side, as the agent does it (``fedsilo.silo_agent.secure.HeSession``): key ceremony,
    encrypt ``w_i * u_i`` (w_i = examples / the round's weight normalizer), decrypt and divide."""

    def __init__(self, job: SiloJob, client: Any, info: Any) -> None:
        from fedsilo.coordinator.config import TlsFiles
        from fedsilo.privacy.he import HeParams
        from fedsilo.silo_agent.secure import HeSession

        c = job.work / "certs"
        self.session = HeSession(run_id=info.run_id, me=job.name, params=HeParams.from_bytes(info.he_parameters),
                                 key_holder=info.key_holder, state_dir=job.work / "silo-state" / job.name,
                                 tls=TlsFiles(ca=c / "ca.pem", cert=c / f"{job.name}.pem", key=c / f"{job.name}.key"))
        self.client = client

    def ceremony(self, stop: threading.Event) -> None:
        """Key holder: generate, then wrap for every other silo until round 1 opens; others: fetch + verify."""
        self.session.ensure_key(self.client, stop)
        if self.session.is_key_holder:
            while True:
                self.session.serve_recipients(self.client)
                task = self.client.get_task(0, wait_s=1)
                if task.kind != "wait":
                    break

    def encrypt(self, layout: list[tuple[str, tuple[int, ...]]], update: dict[str, np.ndarray], weight: float,
                normalizer: float) -> list[bytes]:
        flat = np.concatenate([update[name].astype(np.float64).ravel() for name, _ in layout])
        return self.session.encrypt(flat * (weight / normalizer))

    def decrypt(self, agg: Any) -> dict[str, np.ndarray]:
        weighted_sum = self.session.decrypt_sum(agg.ciphertexts, agg.manifest.numel)
        mean = weighted_sum * (agg.weight_normalizer / agg.total_weight)
        out, pos = {}, 0
        for spec in agg.manifest.tensors:
            out[spec.name] = mean[pos: pos + spec.numel].astype(spec.dtype.numpy).reshape(spec.shape)
            pos += spec.numel
        return out


def silo_main(job: SiloJob, barrier: Any, results: Any, stop: Any = None) -> None:
    """One silo: join, then per round: poll, barrier, upload, wait for close, fetch.

    Puts ("joined", idx), ("round", idx, rnd, t0, t1, t2, t3, digest, contributors, agg, encrypt_s,
    decrypt_s) per round, ("done", idx) or ("error", idx, traceback) on ``results``; times are
    ``time.monotonic()`` (system-wide on Linux, so comparable across processes). With HE, t0 is
    before encryption and t3 after decryption (encrypt_s and decrypt_s are inside); plain: both 0.
    """
    from fedsilo.core.tensors import Manifest
    from fedsilo.silo_agent.client import CoordinatorClient

    client = None
    try:
        client = CoordinatorClient(job.address, credentials(job.work, "silo", job.name, job.insecure),
                                   stop=stop, max_backoff_s=0.5)
        info = client.get_run()
        if info.aggregation.value != job.aggregation:
            raise RuntimeError(f"the coordinator runs {info.aggregation.value} aggregation, expected {job.aggregation}")
        he_silo = _HeSilo(job, client, info) if job.aggregation == "he" else None
        update = make_update(job.layout, job.seed, job.idx, 0)
        client.join(fingerprint=FINGERPRINT, num_train_examples=int(weight_of(job.idx)),
                    manifest=Manifest.of_arrays(update), agent_version="round-overhead-bench",
                    kem_announcement=he_silo.session.announcement if he_silo else b"")
        if he_silo is not None:
            he_silo.ceremony(stop or threading.Event())
        results.put(("joined", job.idx))
        for rnd in range(1, job.total_rounds + 1):
            update = make_update(job.layout, job.seed, job.idx, rnd)  # prepared outside the timed part
            while True:
                task = client.get_task(rnd - 1, wait_s=10)
                if task.kind == "train" and task.round == rnd:
                    break
                if task.kind == "stop" or (task.kind == "train" and task.round > rnd):
                    raise RuntimeError(f"expected round {rnd}, got {task}")
            barrier.wait(BARRIER_TIMEOUT_S)
            t0 = time.monotonic()
            enc_s = dec_s = 0.0
            if he_silo is not None:
                blobs = he_silo.encrypt(job.layout, update, weight_of(job.idx), task.weight_normalizer)
                enc_s = time.monotonic() - t0
                client.submit_he(rnd, weight_of(job.idx), Manifest.of_arrays(update), blobs)
            else:
                client.submit(rnd, weight_of(job.idx), update)
            t1 = time.monotonic()
            while True:  # the round closes when the last upload is accepted; the agent long-polls too
                task = client.get_task(rnd, wait_s=10)
                if task.kind != "wait" or task.last_closed_round >= rnd:
                    break
            t2 = time.monotonic()
            agg = client.fetch(rnd)
            arrays = agg.arrays
            if he_silo is not None:
                t_fetched = time.monotonic()
                arrays = he_silo.decrypt(agg)
                dec_s = time.monotonic() - t_fetched
            t3 = time.monotonic()
            flat = np.concatenate([arrays[name].reshape(-1) for name, _ in job.layout])
            digest = hashlib.sha256(flat.tobytes()).hexdigest()
            keep = flat if (job.return_last_aggregate and rnd == job.total_rounds) else None
            results.put(("round", job.idx, rnd, t0, t1, t2, t3, digest, agg.num_contributors, keep, enc_s, dec_s))
        results.put(("done", job.idx))
    except BaseException:  # noqa: BLE001 - reported to the main process
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
        results.put(("error", job.idx, traceback.format_exc()))
    finally:
        if client is not None:
            client.close()


def _silo_process_entry(job: SiloJob, barrier: Any, results: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process cleans up
    silo_main(job, barrier, results)


# -- one configuration --------------------------------------------------------------------------
@dataclass
class RoundResult:
    rnd: int
    overhead_s: float
    upload_s: float  # first upload start -> last upload accepted (round closed)
    download_s: float  # round closed -> last silo has the aggregate
    coord_cpu_s: float
    tcp_up: int | None
    tcp_down: int | None
    encrypt_s: float = 0.0  # HE: the slowest silo's quantize + encrypt (inside upload_s)
    decrypt_s: float = 0.0  # HE: the slowest silo's decrypt + divide (inside download_s)


@dataclass
class ConfigResult:
    silos: int
    clients: str
    rounds: list[RoundResult] = field(default_factory=list)
    admin_rounds: list[dict[str, Any]] = field(default_factory=list)
    idle_rss_kib: int = 0
    peak_rss_kib: int = 0
    aggregate_check: str = ""
    wall_s: float = 0.0
    aggregation: str = "plain"
    max_rel_error: float | None = None  # HE: max |decrypted mean - float64 mean| / max |float64 mean|


class BenchError(Exception):
    pass


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run_config(*, k: int, params: int, rounds: int, warmup: int, insecure: bool, clients: str, seed: int,
               timeout_s: float, keep: bool, log: Any, aggregation: str = "plain") -> ConfigResult:
    from fedsilo.silo_agent.client import CoordinatorClient

    started = time.monotonic()
    layout = tensor_layout(params)
    total_rounds = warmup + rounds
    names = silo_names(k)
    work = Path(tempfile.mkdtemp(prefix=f"fedsilo-bench-k{k}-"))
    coord: subprocess.Popen | None = None
    procs: list[Any] = []
    threads: list[threading.Thread] = []
    stop = threading.Event()
    barrier: Any = None
    if aggregation == "he" and insecure:
        raise BenchError("HE aggregation needs mTLS (the key ceremony signs with the certificates); drop --insecure")
    result = ConfigResult(silos=k, clients=clients, aggregation=aggregation)
    try:
        if not insecure:
            make_certs(work / "certs", names)
        port = free_port()
        fed = write_federation_toml(work, names=names, rounds=total_rounds, port=port, insecure=insecure,
                                    aggregation=aggregation)
        coord_log = work / "coordinator.out"
        with open(coord_log, "wb") as f:
            coord = subprocess.Popen(
                [sys.executable, "-m", "fedsilo", "coordinator", "--config", str(fed),
                 *(["--insecure"] if insecure else [])],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
            )
        address = f"127.0.0.1:{port}"
        # the coordinator is up once its port accepts connections
        deadline = time.monotonic() + 60
        while True:
            if coord.poll() is not None:
                raise BenchError(f"the coordinator exited ({coord.returncode}):\n{_tail(coord_log)}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise BenchError("the coordinator did not start listening within 60 s")
            time.sleep(0.05)
        time.sleep(0.3)
        result.idle_rss_kib = proc_status_kib(coord.pid, "VmRSS")

        jobs = [SiloJob(idx=i, name=n, address=address, work=work, insecure=insecure, layout=layout,
                        total_rounds=total_rounds, seed=seed, return_last_aggregate=(i == 0),
                        aggregation=aggregation)
                for i, n in enumerate(names)]
        if clients == "processes":
            ctx = mp.get_context("spawn")  # never fork a process that has gRPC threads
            barrier = ctx.Barrier(k + 1)
            results: Any = ctx.Queue()
            for job in jobs:
                p = ctx.Process(target=_silo_process_entry, args=(job, barrier, results), name=job.name, daemon=True)
                p.start()
                procs.append(p)
        else:
            barrier = threading.Barrier(k + 1)
            results = queue.Queue()
            for job in jobs:
                t = threading.Thread(target=silo_main, args=(job, barrier, results, stop), name=job.name, daemon=True)
                t.start()
                threads.append(t)

        end_by = time.monotonic() + timeout_s

        def next_message() -> tuple:
            while True:
                if coord.poll() is not None:
                    raise BenchError(f"the coordinator exited ({coord.returncode}):\n{_tail(coord_log)}")
                if time.monotonic() > end_by:
                    raise BenchError(f"{k} silos: no result within {timeout_s:.0f} s; coordinator log:\n"
                                     f"{_tail(coord_log)}")
                try:
                    msg = results.get(timeout=0.5)
                except queue.Empty:
                    dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise BenchError(f"silo process(es) {dead} died") from None
                    continue
                if msg[0] == "error":
                    raise BenchError(f"silo {names[msg[1]]} failed:\n{msg[2]}")
                return msg

        joined = 0
        while joined < k:
            if next_message()[0] == "joined":
                joined += 1
        log(f"  {k} silos joined ({clients}); running {warmup} warm-up + {rounds} measured rounds")
        last_aggregate = None
        digests: dict[int, set[str]] = {}
        for rnd in range(1, total_rounds + 1):
            cpu0 = proc_cpu_s(coord.pid)
            tcp0 = tcp_bytes(port)
            barrier.wait(BARRIER_TIMEOUT_S)  # all silos hold their task: go
            got: list[tuple] = []
            while len(got) < k:
                msg = next_message()
                if msg[0] == "round":
                    if msg[2] != rnd:
                        raise BenchError(f"silo {names[msg[1]]} reported round {msg[2]} during round {rnd}")
                    got.append(msg)
            cpu1 = proc_cpu_s(coord.pid)
            tcp1 = tcp_bytes(port)
            t0 = min(m[3] for m in got)
            t_closed = max(m[4] for m in got)
            t_end = max(m[6] for m in got)
            digests[rnd] = {m[7] for m in got}
            contributors = {m[8] for m in got}
            if contributors != {k}:
                raise BenchError(f"round {rnd}: aggregates report {contributors} contributors, expected {k}")
            for m in got:
                if m[9] is not None:
                    last_aggregate = m[9]
            rr = RoundResult(rnd=rnd, overhead_s=t_end - t0, upload_s=t_closed - t0, download_s=t_end - t_closed,
                             coord_cpu_s=cpu1 - cpu0,
                             tcp_up=(tcp1[0] - tcp0[0]) if tcp0 and tcp1 else None,
                             tcp_down=(tcp1[1] - tcp0[1]) if tcp0 and tcp1 else None,
                             encrypt_s=max(m[10] for m in got), decrypt_s=max(m[11] for m in got))
            result.rounds.append(rr)
            if aggregation == "he":
                log(f"  round {rnd}{' (warm-up)' if rnd <= warmup else ''}: encrypted round {rr.overhead_s:.3f} s "
                    f"(encrypt+upload+add+close {rr.upload_s:.3f} s, of which slowest encrypt {rr.encrypt_s:.3f} s; "
                    f"download+decrypt {rr.download_s:.3f} s, of which slowest decrypt {rr.decrypt_s:.3f} s), "
                    f"coordinator CPU {rr.coord_cpu_s:.3f} s")
            else:
                log(f"  round {rnd}{' (warm-up)' if rnd <= warmup else ''}: overhead {rr.overhead_s:.3f} s "
                    f"(upload+aggregate {rr.upload_s:.3f} s, download {rr.download_s:.3f} s), "
                    f"coordinator CPU {rr.coord_cpu_s:.3f} s")
        while sum(1 for p in procs if p.is_alive()) or any(t.is_alive() for t in threads):
            try:
                msg = results.get(timeout=0.2)
                if msg[0] == "error":
                    raise BenchError(f"silo {names[msg[1]]} failed:\n{msg[2]}")
            except queue.Empty:
                pass
            if time.monotonic() > end_by:
                break
        # FetchAggregate counts its bytes once its stream is drained: let the last ones land
        time.sleep(0.5)
        bad = [r for r, d in digests.items() if len(d) != 1]
        if bad:
            raise BenchError(f"silos received different aggregates in round(s) {bad}")
        if aggregation == "he":
            result.aggregate_check, result.max_rel_error = check_he_aggregate(last_aggregate, layout, k, seed,
                                                                              total_rounds)
        else:
            result.aggregate_check = check_aggregate(last_aggregate, layout, k, seed, total_rounds)
        admin = CoordinatorClient(address, credentials(work, "admin", ADMIN_NAME, insecure), max_backoff_s=0.5)
        try:
            result.admin_rounds = admin.rounds()
            status = admin.status()
        finally:
            admin.close()
        if status["state"] != "finished":
            raise BenchError(f"run ended as {status['state']}: {status['message']}")
        result.peak_rss_kib = proc_status_kib(coord.pid, "VmHWM")
        result.wall_s = time.monotonic() - started
        return result
    finally:
        stop.set()
        if barrier is not None:
            try:
                barrier.abort()
            except Exception:  # noqa: BLE001
                pass
        # silos first (they hold no state worth a graceful exit), then the coordinator
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for t in threads:
            t.join(timeout=5)
        if coord is not None and coord.poll() is None:
            coord.send_signal(signal.SIGTERM)
        if coord is not None:
            try:
                coord.wait(timeout=15)
            except subprocess.TimeoutExpired:
                coord.kill()
                coord.wait()
        if keep:
            log(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def expected_mean(layout: list[tuple[str, tuple[int, ...]]], k: int, seed: int, rnd: int) -> np.ndarray:
    """The float64 weighted mean of the silos' round-``rnd`` updates."""
    total = sum(weight_of(i) for i in range(k))
    expected = np.zeros(sum(int(np.prod(shape)) for _, shape in layout), dtype=np.float64)
    for i in range(k):
        u = make_update(layout, seed, i, rnd)
        expected += weight_of(i) * np.concatenate([u[name].reshape(-1) for name, _ in layout]).astype(np.float64)
    expected /= total
    return expected


def check_he_aggregate(agg: np.ndarray | None, layout: list[tuple[str, tuple[int, ...]]], k: int, seed: int,
                       rnd: int) -> tuple[str, float | None]:
    """HE: compares the last round's decrypted mean with the float64 weighted mean (relative bound)."""
    if agg is None:
        return "not checked", None
    expected = expected_mean(layout, k, seed, rnd)
    err = float(np.max(np.abs(agg.astype(np.float64) - expected)))
    scale = float(np.max(np.abs(expected)))
    rel = err / scale if scale > 0 else err
    if rel > HE_ERROR_BOUND:
        raise BenchError(f"the decrypted aggregate is off: max abs error {err:.3g} > {HE_ERROR_BOUND:g} x max |mean| "
                         f"({scale:.3g})")
    return f"OK (max abs error {err:.1e}, {rel:.1e} x max |mean|; bound {HE_ERROR_BOUND:g})", rel


def check_aggregate(agg: np.ndarray | None, layout: list[tuple[str, tuple[int, ...]]], k: int, seed: int,
                    rnd: int) -> str:
    """Compares the last round's aggregate with the weighted mean computed here."""
    if agg is None:
        return "not checked"
    expected = expected_mean(layout, k, seed, rnd)
    err = float(np.max(np.abs(agg.astype(np.float64) - expected)))
    ok = err <= 1e-6 * max(1.0, float(np.max(np.abs(expected))))
    if not ok:
        raise BenchError(f"the aggregate is not the weighted mean of the uploads (max abs error {err:.3g})")
    return f"OK (max abs error {err:.1e})"


# -- report -------------------------------------------------------------------------------------
def machine_line() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.node()}: {usable} usable cores ({os.cpu_count()} online), {cpu}, {mem}; "
            f"{platform.system()} {platform.release()}; load average at start {load}")


@dataclass
class Report:
    """A benchmark's console, the command line that ran it, and a plain-text logger."""

    console: Any
    cmd: str
    soft_wrap: bool = True

    def log(self, msg: str) -> None:
        """Prints one line as-is (no syntax highlighting)."""
        self.console.print(msg, highlight=False, soft_wrap=self.soft_wrap)


def open_report(*, width: int, soft_wrap: bool = True) -> Report:
    """Starts a benchmark's printed report: a console at least ``width`` wide, SIGTERM turned
    into KeyboardInterrupt (so clean-up code runs), then the command line and the machine."""
    from rich.console import Console

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    report = Report(console=Console(width=max(width, shutil.get_terminal_size().columns)),
                    cmd=shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])), soft_wrap=soft_wrap)
    report.log(f"command: {report.cmd}  (cwd {os.getcwd()})")
    report.log(f"machine: {machine_line()}")
    return report


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def render(results: list[ConfigResult], *, params: int, warmup: int, insecure: bool, console: Any) -> list[str]:
    """Prints the table; returns verdict lines."""
    from rich.table import Table

    transport = "INSECURE plaintext" if insecure else "mTLS"
    he = bool(results) and results[0].aggregation == "he"
    what = "Encrypted (HE) round, end to end" if he else "Coordinator round overhead"
    table = Table(title=f"{what}: {params:,} float32 parameters, {transport} on loopback, "
                        f"median of measured rounds (min-max)")
    for col, just in [("silos", "right"), ("silo clients", "left"), ("overhead/round s\nmedian (min-max)", "right"),
                      ("upload+agg s", "right"), ("download s", "right"), ("coord\n'seconds'", "right"),
                      ("coord CPU\ns/round", "right"), ("B/param up/down\n(ListRounds)", "right"),
                      ("B/param up/down\n(TCP, ss)", "right"), ("coord RSS MiB\nidle / peak", "right"),
                      ("target", "left")]:
        table.add_column(col, justify=just)
    for i, r in enumerate(results):
        measured = r.rounds[warmup:]
        adm = {a["round"]: a for a in r.admin_rounds}
        adm_measured = [adm[m.rnd] for m in measured if m.rnd in adm]
        ov = [m.overhead_s for m in measured]
        per = params * r.silos
        up = med([a["bytes_up"] / per for a in adm_measured])
        down = med([a["bytes_down"] / per for a in adm_measured])
        tcp = [m for m in measured if m.tcp_up is not None]
        tcp_s = (f"{med([m.tcp_up / per for m in tcp]):.3f} / {med([m.tcp_down / per for m in tcp]):.3f}"
                 if tcp else "n/a")
        target = []
        if i == 0:
            if he:
                target.append(f"round <= {TARGET_HE_ROUND_S} s: {'MET' if med(ov) <= TARGET_HE_ROUND_S else 'MISSED'}")
            else:
                target.append(f"overhead < {TARGET_OVERHEAD_S} s: "
                              f"{'MET' if med(ov) < TARGET_OVERHEAD_S else 'MISSED'}")
        if i > 0:
            ratio = r.peak_rss_kib / results[0].peak_rss_kib
            target.append(f"peak RSS x{ratio:.2f} vs {results[0].silos} silos (flat: <= {TARGET_RSS_RATIO}): "
                          f"{'MET' if ratio <= TARGET_RSS_RATIO else 'MISSED'}")
        table.add_row(
            str(r.silos), r.clients,
            f"{med(ov):.3f} ({min(ov):.3f}-{max(ov):.3f})",
            f"{med([m.upload_s for m in measured]):.3f}", f"{med([m.download_s for m in measured]):.3f}",
            f"{med([a['seconds'] for a in adm_measured]):.3f}",
            f"{med([m.coord_cpu_s for m in measured]):.3f}",
            f"{up:.4f} / {down:.4f}", tcp_s,
            f"{r.idle_rss_kib / 1024:.1f} / {r.peak_rss_kib / 1024:.1f}", "\n".join(target),
        )
    console.print(table)

    verdicts = []
    first = results[0]
    ov0 = med([m.overhead_s for m in first.rounds[warmup:]])
    if he:
        ok = ov0 <= TARGET_HE_ROUND_S
        enc = med([m.encrypt_s for m in first.rounds[warmup:]])
        dec = med([m.decrypt_s for m in first.rounds[warmup:]])
        verdicts.append(f"whole encrypted round at {first.silos} silos: {ov0:.3f} s (target <= {TARGET_HE_ROUND_S} s): "
                        f"{'MET' if ok else 'MISSED'}; slowest silo's encrypt {enc:.3f} s, decrypt {dec:.3f} s "
                        f"(medians)")
    else:
        ok = ov0 < TARGET_OVERHEAD_S
        verdicts.append(f"overhead at {first.silos} silos: {ov0:.3f} s per round (target < {TARGET_OVERHEAD_S} s): "
                        f"{'MET' if ok else 'MISSED'}")
    if len(results) > 1:
        last = results[-1]
        ratio = last.peak_rss_kib / first.peak_rss_kib
        work_ratio = ((last.peak_rss_kib - last.idle_rss_kib) / max(1, first.peak_rss_kib - first.idle_rss_kib))
        ok = ratio <= TARGET_RSS_RATIO
        slope = (last.peak_rss_kib - first.peak_rss_kib) / max(1, last.silos - first.silos)
        update_bytes = 4 * params
        verdicts.append(
            f"coordinator peak RSS {first.silos} -> {last.silos} silos: {first.peak_rss_kib / 1024:.1f} -> "
            f"{last.peak_rss_kib / 1024:.1f} MiB, ratio {ratio:.2f} (target <= {TARGET_RSS_RATIO}): "
            f"{'MET' if ok else 'MISSED'}; above idle: {(first.peak_rss_kib - first.idle_rss_kib) / 1024:.1f} -> "
            f"{(last.peak_rss_kib - last.idle_rss_kib) / 1024:.1f} MiB (x{work_ratio:.2f}); "
            f"{slope / 1024:.1f} MiB per extra silo = {slope * 1024 / update_bytes:.2f} x the update size "
            f"({update_bytes / 2**20:.2f} MiB)")
        ovl = med([m.overhead_s for m in last.rounds[warmup:]])
        verdicts.append(f"overhead {first.silos} -> {last.silos} silos: {ov0:.3f} -> {ovl:.3f} s "
                        f"(x{ovl / ov0:.2f} for x{last.silos / first.silos:.2f} silos)")
    for r in results:
        verdicts.append(f"aggregate check at {r.silos} silos: {r.aggregate_check}; "
                        f"per-round overhead (s): {', '.join(f'{m.overhead_s:.3f}' for m in r.rounds)} "
                        f"(first {warmup} = warm-up); configuration wall time {r.wall_s:.1f} s")
    for v in verdicts:
        console.print(v)
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=1_000_000, help="float32 values per update (default 1000000)")
    parser.add_argument("--silos", type=int, nargs="+", default=[3, 10], help="silo counts to run (default 3 10)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per configuration (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds, run but not counted (default 1)")
    parser.add_argument("--clients", choices=["processes", "threads"], default="processes",
                        help="run each silo as its own OS process (default) or as a thread of this process")
    parser.add_argument("--insecure", action="store_true", help="plaintext gRPC instead of mTLS (for comparison)")
    parser.add_argument("--aggregation", choices=["plain", "he"], default="plain",
                        help="plain (default) or he: the end-to-end encrypted round, key ceremony before round 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per configuration")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (certificates, state, logs)")
    args = parser.parse_args(argv)
    if args.params < 1 or args.rounds < 1 or args.warmup < 0 or any(k < 1 for k in args.silos):
        parser.error("--params, --rounds and --silos must be >= 1, --warmup >= 0")
    if args.aggregation == "he" and args.insecure:
        parser.error("--aggregation he needs mTLS (the key ceremony signs with the certificates); drop --insecure")

    from rich.console import Console

    console = Console(width=max(180, shutil.get_terminal_size().columns))

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    import grpc

    cmd = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    console.print(f"command: {cmd}")
    console.print(f"machine: {machine_line()}")
    console.print(f"software: Python {platform.python_version()}, grpcio {grpc.__version__}, numpy {np.__version__}")
    console.print(
        f"setup: coordinator = its own OS process (python -m fedsilo coordinator --config federation.toml; "
        f"{'HE (BFV, default [he] parameters)' if args.aggregation == 'he' else 'plain'} FedAvg, "
        f"{len(tensor_layout(args.params))} float32 tensors = {args.params:,} values); silos = "
        f"{'one OS process each' if args.clients == 'processes' else 'threads of this benchmark process'} with the "
        f"real CoordinatorClient and {'no TLS (--insecure)' if args.insecure else 'their own mTLS certificate'}; "
        f"random numpy updates, nothing trained; {args.warmup} warm-up + {args.rounds} measured rounds; "
        f"every process shares this machine's cores")
    t_start = time.monotonic()
    results = []
    try:
        for k in args.silos:
            console.print(f"[bold]{k} silos[/]")
            results.append(run_config(k=k, params=args.params, rounds=args.rounds, warmup=args.warmup,
                                      insecure=args.insecure, clients=args.clients, seed=args.seed,
                                      timeout_s=args.timeout, keep=args.keep, log=console.print,
                                      aggregation=args.aggregation))
    except KeyboardInterrupt:
        console.print("interrupted; processes stopped and temp dirs removed")
        return 130
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/] {exc}")
        return 1
    console.print()
    render(results, params=args.params, warmup=args.warmup, insecure=args.insecure, console=console)
    console.print(
        "overhead = first upload starts -> last silo holds the aggregate; upload+agg = first upload starts -> last "
        "upload accepted (the round closes inside it); coord 'seconds' = the coordinator's own round time (open -> "
        "close, so it also includes the previous download and the silos' preparation); coord CPU = user+sys seconds "
        "of the coordinator process per round; B/param = ListRounds bytes_up/bytes_down (serialized messages) / "
        "(params x silos); TCP = bytes on the coordinator's sockets (ss), TLS and HTTP/2 framing included; RSS from "
        "/proc/<pid>/status (idle = VmRSS after start, peak = VmHWM after the run)")
    if args.aggregation == "he":
        console.print(
            "HE: the round starts when the first silo starts quantizing + encrypting its weighted update and ends when "
            "the last silo holds the decrypted weighted mean, so 'upload+agg' includes the silos' encryption and "
            "'download' their decryption; the key ceremony happens once before round 1 and is not timed")
    console.print(f"total wall time {time.monotonic() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
