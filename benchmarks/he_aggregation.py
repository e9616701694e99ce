"""Homomorphic aggregation benchmark (issue 3, item 6): wire cost, speed, error, memory, round overhead.

For ``--params`` values (default 1,000,000) and each silo count of ``--silos`` (default 3 10 50):

Codec level, one core per role (fedsilo's BFV defaults, ``privacy/he.py``):
  A child process pinned to one core plays every silo in turn: it quantizes the weighted update
  ``w_i * u_i`` (``FixedPoint.encode``, stochastic rounding) and encrypts + serializes it
  (``SecretContext.encrypt``: seeded symmetric BFV). Each upload is piped to a second child pinned
  to the other core that plays the coordinator with only a ``PublicContext`` (no key of any kind):
  it loads and adds each upload as it arrives and serializes the sum; its peak RSS (``VmHWM``) is
  the "codec coordinator" RSS. The first child then decrypts the sum and divides
  (``decrypt_mean``). Bytes per parameter are the serialized ciphertext sizes; the error is
  against the float64 weighted mean of the same float32 updates (bound: max |error| <= 1e-4 * max
  |mean|). The FLARE-default CKKS baseline (N=8192, [60, 40, 40], scale 2^40, public-key
  encryption, TenSEAL's ckks_vector; ``ckks_flare_roundtrip``) runs in the first child too, for
  ``--ckks-silos`` (default 3), codec level only.

Real rounds (``--round-silos``, default 3 10), through ``benchmarks/round_overhead.py``:
  the coordinator is its own OS process started by the CLI (``python -m fedsilo
  coordinator --config federation.toml``), each silo is its own OS process with the real
  ``CoordinatorClient`` and its own mTLS certificate, all on this machine's loopback. For each K
  the same updates go through a plain run (``aggregation = "plain"``) and an HE run
  (``aggregation = "he"``, default ``[he]``; the silos do the real key ceremony before round 1,
  untimed, with ``fedsilo.silo_agent.secure.HeSession``):

  * plain round = first silo starts uploading -> last silo holds the aggregate
    (upload + validate + aggregate + close + download);
  * encrypted round = first silo starts quantizing + encrypting -> last silo holds the decrypted
    weighted mean (encrypt + upload + coordinator load/add + close + download + decrypt + divide).

  The table shows the medians of ``--rounds`` measured rounds (after ``--warmup``) and their ratio.
  50 real silo processes with 1 M parameters each are too heavy for a 2-core machine within a few
  minutes (every silo's encryption and decryption shares the same two cores: one 50-silo HE round
  took 40 s there, the plain one 7.8 s), so by default the 50-silo row is codec level only; pass
  ``--round-silos 3 10 50`` to run it anyway.

Usage::

    .venv/bin/python benchmarks/he_aggregation.py [--params 1000000] [--silos 3 10 50]
        [--round-silos 3 10] [--ckks-silos 3] [--rounds 3] [--warmup 1] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import round_overhead as ro  # noqa: E402  (the real-process round machinery)

TARGET_UP_BYTES = 8.0  # bytes per parameter on the wire (issue 3, item 4)
TARGET_ROUND_S = 2.0  # whole encrypted round, 1 M parameters, 3 silos (item 6)
TARGET_ENC_MPS = 2.0  # encrypt + serialise, M parameters/s on one core (item 5)
ERROR_BOUND = 1e-4  # max |decrypted mean - float64 mean| <= ERROR_BOUND * max |float64 mean|
CODEC_TIMEOUT_S = 600.0


# -- helpers ------------------------------------------------------------------------------------
def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _rss_kib(key: str) -> int:
    return ro.proc_status_kib(os.getpid(), key)


def flat_update(layout: list[tuple[str, tuple[int, ...]]], seed: int, idx: int, rnd: int) -> np.ndarray:
    """Silo ``idx``'s update as round_overhead.py makes it (float32, std 0.01), flattened to float64."""
    u = ro.make_update(layout, seed, idx, rnd)
    return np.concatenate([u[name].reshape(-1) for name, _ in layout]).astype(np.float64)


# -- codec level: the coordinator child ---------------------------------------------------------
def coordinator_worker(conn: Any, params_bytes: bytes, core: int) -> None:
    """Plays the coordinator with a PublicContext: load + add each upload as it arrives, then dump."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _pin(core)
        from fedsilo.privacy.he import HeParams, PublicContext

        ctx = PublicContext(HeParams.from_bytes(params_bytes))
        assert not ctx.has_secret_key
        idle = _rss_kib("VmRSS")
        conn.send({"ready": True})  # the silos start timing only once this process is set up
        acc: list[Any] | None = None
        add_s = 0.0
        uploads = 0
        while True:
            blobs = conn.recv()
            if blobs is None:
                break
            t0 = time.perf_counter()
            if acc is None:
                acc = [ctx.load(b) for b in blobs]
            else:
                for i, b in enumerate(blobs):
                    acc[i] = ctx.add(acc[i], ctx.load(b))
            add_s += time.perf_counter() - t0
            uploads += 1
            del blobs
        assert acc is not None
        t0 = time.perf_counter()
        aggregate = [ctx.dump(c) for c in acc]
        dump_s = time.perf_counter() - t0
        conn.send({"aggregate": aggregate, "add_s": add_s, "dump_s": dump_s, "uploads": uploads,
                   "idle_kib": idle, "peak_kib": _rss_kib("VmHWM")})
    except BaseException:  # noqa: BLE001 - reported to the codec worker
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


# -- codec level: the silos' child --------------------------------------------------------------
def bfv_codec(k: int, n: int, seed: int, silo_core: int, coord_core: int, log: Any) -> dict[str, Any]:
    from fedsilo.privacy import he

    params = he.HeParams()
    q = he.FixedPoint(params=params)
    secret = he.SecretContext.generate(params)
    layout = ro.tensor_layout(n)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    coord = ctx.Process(target=coordinator_worker, args=(child, params.to_bytes(), coord_core),
                        name=f"codec-coordinator-k{k}", daemon=True)
    coord.start()
    child.close()
    try:
        if not parent.poll(120):
            raise RuntimeError("the codec coordinator did not start within 120 s")
        ready = parent.recv()
        if "error" in ready:
            raise RuntimeError(f"codec coordinator failed:\n{ready['error']}")
        # untimed warm-up: the first encryption of a process pays one-off costs (allocations, the memfd)
        secret.encrypt(q.encode(flat_update(layout, seed, 0, 0)[: 4 * params.slots] * 1e-3,
                                np.random.default_rng(0))[0])
        rng = np.random.default_rng([seed, k, 1])
        names = ro.silo_names(k)
        weights = np.array([ro.weight_of(i) for i in range(k)], dtype=np.float64)
        normalizer = float(weights.sum())  # the coordinator's weight_normalizer: all silos' examples
        exact = np.zeros(n, dtype=np.float64)
        encode_s, encrypt_s = [], []
        up_bytes = 0
        clipped = 0
        for i in range(k):
            u = flat_update(layout, seed, i, 1)  # not timed: the silo's training result
            exact += weights[i] * u
            t0 = time.perf_counter()
            ints, c = q.encode(u * (weights[i] / normalizer), rng)
            t1 = time.perf_counter()
            blobs = secret.encrypt(ints)
            t2 = time.perf_counter()
            encode_s.append(t1 - t0)
            encrypt_s.append(t2 - t1)
            clipped += c
            up_bytes = sum(map(len, blobs))
            parent.send(blobs)  # the pipe is pipelined: the coordinator adds while the next silo encrypts
            del blobs, ints
        parent.send(None)
        if not parent.poll(CODEC_TIMEOUT_S):
            raise RuntimeError(f"the codec coordinator did not answer within {CODEC_TIMEOUT_S:.0f} s")
        res = parent.recv()
        if "error" in res:
            raise RuntimeError(f"codec coordinator failed:\n{res['error']}")
        aggregate = res.pop("aggregate")
        exact /= weights.sum()
        t0 = time.perf_counter()
        mean = he.decrypt_mean(secret, q, aggregate, n, float((weights / normalizer).sum()))
        decrypt_s = time.perf_counter() - t0
        budget = min(secret.noise_budget(b) for b in aggregate)
        err = float(np.max(np.abs(mean - exact)))
        scale = float(np.max(np.abs(exact)))
        out = {
            "scheme": "BFV", "silos": k, "up": up_bytes / n, "down": sum(map(len, aggregate)) / n,
            "encode_s": statistics.mean(encode_s), "encrypt_s": statistics.mean(encrypt_s),
            "aggregate_s": res["add_s"] + res["dump_s"], "add_s": res["add_s"], "dump_s": res["dump_s"],
            "decrypt_s": decrypt_s, "abs_err": err, "rel_err": err / scale if scale > 0 else err,
            "max_mean": scale, "budget": budget, "clipped": clipped,
            "coord_idle_kib": res["idle_kib"], "coord_peak_kib": res["peak_kib"], "n": n,
            "silo_names": f"{names[0]}..{names[-1]}",
        }
        log(f"  codec BFV K={k}: up {out['up']:.3f} B/p, encode+encrypt {out['encode_s'] + out['encrypt_s']:.3f} "
            f"s/silo, coordinator {out['aggregate_s']:.3f} s, decrypt {decrypt_s:.3f} s, "
            f"rel err {out['rel_err']:.1e}")
        return out
    finally:
        coord.join(timeout=10)
        if coord.is_alive():
            coord.terminate()
            coord.join(timeout=5)
        parent.close()


def ckks_codec(k: int, n: int, seed: int, log: Any) -> dict[str, Any]:
    from fedsilo.privacy import he

    layout = ro.tensor_layout(n)
    weights = np.array([ro.weight_of(i) for i in range(k)], dtype=np.float64)
    updates = [flat_update(layout, seed, i, 1) for i in range(k)]
    r = he.ckks_flare_roundtrip(updates, list(weights / weights.sum()), n_threads=1)
    exact_scale = float(np.max(np.abs(sum(w * u for w, u in zip(weights, updates, strict=True)) / weights.sum())))
    out = {"scheme": "CKKS", "silos": k, "up": r.upload_bytes_per_value, "down": r.download_bytes_per_value,
           "encode_s": 0.0, "encrypt_s": r.encrypt_s, "aggregate_s": r.aggregate_s, "decrypt_s": r.decrypt_s,
           "abs_err": r.max_abs_error, "rel_err": r.max_rel_error, "max_mean": exact_scale, "n": n}
    log(f"  codec CKKS (FLARE default) K={k}: up {r.upload_bytes_per_value:.3f} B/p, encrypt {r.encrypt_s:.3f} "
        f"s/silo, coordinator {r.aggregate_s:.3f} s, decrypt {r.decrypt_s:.3f} s, rel err {r.max_rel_error:.1e}")
    return out


def codec_worker(conn: Any, silos: list[int], ckks_silos: list[int], n: int, seed: int, silo_core: int,
                 coord_core: int) -> None:
    """Pinned to one core: every silo's encode/encrypt/decrypt, one K after the other; then the CKKS rows."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _pin(silo_core)

        def log(msg: str) -> None:
            conn.send(("log", msg))

        for k in silos:
            conn.send(("row", bfv_codec(k, n, seed, silo_core, coord_core, log)))
        for k in ckks_silos:
            conn.send(("row", ckks_codec(k, n, seed, log)))
        conn.send(("done",))
    except BaseException:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_codec(silos: list[int], ckks_silos: list[int], n: int, seed: int, log: Any) -> list[dict[str, Any]]:
    cores = _cores()
    silo_core, coord_core = cores[0], cores[1 % len(cores)]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=codec_worker, args=(child, silos, ckks_silos, n, seed, silo_core, coord_core),
                    name="codec-silos")  # not a daemon: it starts the codec coordinator; joined/killed below
    p.start()
    child.close()
    rows: list[dict[str, Any]] = []
    end_by = time.monotonic() + CODEC_TIMEOUT_S
    try:
        while True:
            if not parent.poll(1.0):
                if not p.is_alive():
                    raise ro.BenchError(f"the codec worker died (exit code {p.exitcode})")
                if time.monotonic() > end_by:
                    raise ro.BenchError(f"the codec stage took longer than {CODEC_TIMEOUT_S:.0f} s")
                continue
            msg = parent.recv()
            if msg[0] == "log":
                log(msg[1])
            elif msg[0] == "row":
                rows.append(msg[1])
            elif msg[0] == "error":
                raise ro.BenchError(f"codec stage failed:\n{msg[1]}")
            else:
                return rows
    finally:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        parent.close()


# -- real rounds ---------------------------------------------------------------------------------
@dataclass
class RoundPair:
    silos: int
    plain: ro.ConfigResult
    he: ro.ConfigResult


def _measured(r: ro.ConfigResult, warmup: int) -> list[ro.RoundResult]:
    return r.rounds[warmup:]


def _med(r: ro.ConfigResult, warmup: int, attr: str) -> float:
    return ro.med([getattr(m, attr) for m in _measured(r, warmup)])


def _admin_bytes(r: ro.ConfigResult, warmup: int, params: int) -> tuple[float, float]:
    adm = {a["round"]: a for a in r.admin_rounds}
    rows = [adm[m.rnd] for m in _measured(r, warmup) if m.rnd in adm]
    per = params * r.silos
    return ro.med([a["bytes_up"] / per for a in rows]), ro.med([a["bytes_down"] / per for a in rows])


# -- report ---------------------------------------------------------------------------------------
def render(codec: list[dict[str, Any]], pairs: list[RoundPair], *, params: int, warmup: int, console: Any,
           round_silos: list[int]) -> None:
    from rich.table import Table

    by_k = {p.silos: p for p in pairs}
    t = Table(title=f"HE aggregation, {params:,} parameters: fedsilo BFV (defaults) vs the FLARE-default CKKS "
                    f"baseline; codec columns on one core per role, round columns through the real coordinator "
                    f"over mTLS loopback (medians)")
    cols = [("scheme", "left"), ("silos", "right"), ("B/param\nup / down", "right"),
            ("encrypt s/silo\n(M param/s)", "right"), ("aggregate s\n(coordinator)", "right"),
            ("decrypt s\n/silo", "right"), ("max rel err\n(max|err|/max|mean|)", "right"),
            (f"<= {ERROR_BOUND:g}\nx max|mean|", "center"), ("coord peak RSS MiB\nreal / codec", "right"),
            ("plain round s", "right"), ("HE round s", "right"), ("HE / plain", "right")]
    for c, j in cols:
        t.add_column(c, justify=j)
    for r in codec:
        enc = r["encode_s"] + r["encrypt_s"]
        pair = by_k.get(r["silos"]) if r["scheme"] == "BFV" else None
        if pair is not None:
            plain_s, he_s = _med(pair.plain, warmup, "overhead_s"), _med(pair.he, warmup, "overhead_s")
            rounds = (f"{plain_s:.3f}", f"{he_s:.3f}", f"x{he_s / plain_s:.1f}")
            rss_real = f"{pair.he.peak_rss_kib / 1024:.0f}"
        elif r["scheme"] == "BFV":
            rounds = ("codec only", "codec only", "-")
            rss_real = "-"
        else:
            rounds = ("-", "-", "-")
            rss_real = "-"
        rss_codec = f"{r['coord_peak_kib'] / 1024:.0f}" if "coord_peak_kib" in r else "-"
        ok = r["rel_err"] <= ERROR_BOUND
        scheme = ("BFV N=4096 q=56b\nt=43b seeded sym." if r["scheme"] == "BFV"
                  else "CKKS FLARE default\nN=8192 [60,40,40] pk")
        t.add_row(scheme, str(r["silos"]), f"{r['up']:.2f} / {r['down']:.2f}",
                  f"{enc:.3f} ({r['n'] / enc / 1e6:.2f})", f"{r['aggregate_s']:.3f}", f"{r['decrypt_s']:.3f}",
                  f"{r['rel_err']:.1e}", "yes" if ok else "NO", f"{rss_real} / {rss_codec}", *rounds)
    console.print(t)

    if pairs:
        t2 = Table(title="Real rounds (coordinator process + one process per silo, mTLS loopback; every process "
                         "shares this machine's cores): median (min-max) of measured rounds")
        for c, j in [("silos", "right"), ("mode", "left"), ("round s\nmedian (min-max)", "right"),
                     ("slowest silo\nencrypt s", "right"), ("first start -> round\nclosed s", "right"),
                     ("closed -> last silo\nhas mean s", "right"), ("slowest silo\ndecrypt s", "right"),
                     ("coord CPU\ns/round", "right"), ("B/param up/down\n(ListRounds)", "right"),
                     ("coord RSS MiB\nidle / peak", "right"), ("aggregate check", "left")]:
            t2.add_column(c, justify=j)
        for p in pairs:
            for mode, r in (("plain", p.plain), ("HE", p.he)):
                ov = [m.overhead_s for m in _measured(r, warmup)]
                up, down = _admin_bytes(r, warmup, params)
                he_mode = mode == "HE"
                t2.add_row(str(p.silos), mode, f"{ro.med(ov):.3f} ({min(ov):.3f}-{max(ov):.3f})",
                           f"{_med(r, warmup, 'encrypt_s'):.3f}" if he_mode else "-",
                           f"{_med(r, warmup, 'upload_s'):.3f}", f"{_med(r, warmup, 'download_s'):.3f}",
                           f"{_med(r, warmup, 'decrypt_s'):.3f}" if he_mode else "-",
                           f"{_med(r, warmup, 'coord_cpu_s'):.3f}", f"{up:.3f} / {down:.3f}",
                           f"{r.idle_rss_kib / 1024:.0f} / {r.peak_rss_kib / 1024:.0f}", r.aggregate_check)
        console.print(t2)

    # -- targets
    lines = []
    bfv = [r for r in codec if r["scheme"] == "BFV"]
    ckks = [r for r in codec if r["scheme"] == "CKKS"]
    if bfv:
        worst_up = max(r["up"] for r in bfv)
        worst_down = max(r["down"] for r in bfv)
        lines.append(f"upload <= {TARGET_UP_BYTES:g} B/param (silo -> coordinator, serialized ciphertexts): "
                     f"{worst_up:.3f} B/param: {'MET' if worst_up <= TARGET_UP_BYTES else 'MISSED'}"
                     + (f" (FLARE-default CKKS: {ckks[0]['up']:.2f}, x{ckks[0]['up'] / worst_up:.1f} more)"
                        if ckks else ""))
        lines.append(f"download <= {TARGET_UP_BYTES:g} B/param (the aggregate, coordinator -> silo): "
                     f"{worst_down:.3f} B/param: {'MET' if worst_down <= TARGET_UP_BYTES else 'MISSED'} (a sum of "
                     "seeded ciphertexts is a full, unseeded ciphertext: its second polynomial is no longer a PRNG "
                     "expansion, so it cannot be sent as a seed)")
        worst_rel = max(r["rel_err"] for r in bfv)
        lines.append(f"error: max |decrypted mean - float64 mean| <= {ERROR_BOUND:g} x max |mean| for "
                     f"{', '.join(str(r['silos']) for r in bfv)} silos: worst {worst_rel:.1e}: "
                     f"{'MET' if worst_rel <= ERROR_BOUND else 'MISSED'}; smallest noise budget left "
                     f"{min(r['budget'] for r in bfv)} bits; values clipped to the bound: "
                     f"{sum(r['clipped'] for r in bfv)}")
        enc = [r["n"] / (r["encode_s"] + r["encrypt_s"]) / 1e6 for r in bfv]
        enc_only = [r["n"] / r["encrypt_s"] / 1e6 for r in bfv]
        lines.append(f"encrypt + serialise >= {TARGET_ENC_MPS:g} M param/s on one core: {min(enc):.2f} M/s "
                     f"(slowest K; quantize + encrypt + serialize), {min(enc_only):.2f} M/s encrypt + serialize "
                     f"only: {'MET' if min(enc) >= TARGET_ENC_MPS else 'MISSED'}")
    if 3 in by_k:
        he3 = _med(by_k[3].he, warmup, "overhead_s")
        lines.append(f"whole encrypted round, {params:,} parameters, 3 silos, loopback, no training <= "
                     f"{TARGET_ROUND_S:g} s: {he3:.3f} s (median; "
                     f"{', '.join(f'{m.overhead_s:.3f}' for m in _measured(by_k[3].he, warmup))}): "
                     f"{'MET' if he3 <= TARGET_ROUND_S else 'MISSED'}")
    else:
        lines.append(f"whole encrypted round at 3 silos <= {TARGET_ROUND_S:g} s: not measured (3 not in --round-silos)")
    if bfv and pairs:
        p0 = pairs[0]
        r0 = next((r for r in bfv if r["silos"] == p0.silos), None)
        if r0 is not None:
            ingest = p0.silos * r0["up"] * params / r0["add_s"] / 1e6
            delivered = p0.silos * 4 * params / _med(p0.plain, warmup, "upload_s") / 1e6
            lines.append(f"(item 5, informational) coordinator ciphertext load+add at {p0.silos} silos: {ingest:.0f} "
                         f"MB/s of uploads on one core (codec level) vs what loopback mTLS delivered in the plain round, "
                         f"{delivered:.0f} MB/s ({p0.silos} x {4 * params / 1e6:g} MB / (first upload -> round closed)): "
                         f"{'MET' if ingest >= delivered else 'MISSED'} (both share this machine's cores with the "
                         f"silos; the real coordinator's CPU per round is in the real-rounds table)")
    if pairs:
        lines.append("HE / plain round ratio: " + "; ".join(
            f"{p.silos} silos {_med(p.he, warmup, 'overhead_s'):.3f} / {_med(p.plain, warmup, 'overhead_s'):.3f} s "
            f"= x{_med(p.he, warmup, 'overhead_s') / _med(p.plain, warmup, 'overhead_s'):.1f}" for p in pairs))
    not_real = [r["silos"] for r in bfv if r["silos"] not in by_k]
    if not_real:
        lines.append(f"{', '.join(map(str, not_real))} silos: codec level only, no real-process round (not in "
                     f"--round-silos; by default 50 is left out because 50 silo processes x 1 M parameters, all "
                     f"encrypting and decrypting on this machine's {len(_cores())} cores, are slow: on the 2-core "
                     f"machine this was written on, one plain + one HE round of 50 silos took 7.8 s + 40 s, about "
                     f"2 minutes with process start-up, so 1 warm-up + 3 rounds would add about 5 minutes); "
                     f"rerun with --round-silos {' '.join(map(str, sorted({*round_silos, *not_real})))} to include it")
    for line in lines:
        console.print(line)
    console.print(
        "definitions: encrypt s/silo = quantize (FixedPoint, stochastic rounding) + encrypt + serialize one silo's "
        "update, mean over silos (CKKS: ckks_vector + serialize); aggregate s = the coordinator's load + add of all "
        "uploads + serializing the sum (PublicContext, no key); decrypt s = deserialize + decrypt (+ noise check) + "
        "divide; rel err vs the float64 weighted mean of the same float32 updates (std 0.01, weights 100 + 10 i); "
        "coord peak RSS: real = VmHWM of the coordinator process of the HE run, codec = VmHWM of the codec-level "
        "coordinator process (PublicContext, uploads piped in); plain round = first upload starts -> last silo holds "
        "the aggregate; HE round = first silo starts quantizing/encrypting -> last silo holds the decrypted mean "
        "(encrypt + upload + coordinator load/add + close + download + decrypt + divide); key ceremony before round 1, "
        "not timed")


def software_line() -> str:
    import grpc
    import tenseal

    return (f"software: Python {platform.python_version()}, TenSEAL {tenseal.__version__} (SEAL 4.1), grpcio "
            f"{grpc.__version__}, numpy {np.__version__}")


def params_lines() -> list[str]:
    import tenseal.sealapi as seal

    from fedsilo.privacy import he

    p = he.HeParams()
    q = he.FixedPoint(params=p)
    f = he.HeParams.flare_default()
    tc128 = seal.CoeffModulus.MaxBitCount(p.poly_modulus_degree, seal.SEC_LEVEL_TYPE.TC128)
    tc128_f = seal.CoeffModulus.MaxBitCount(f.poly_modulus_degree, seal.SEC_LEVEL_TYPE.TC128)
    return [
        f"fedsilo HE: BFV, N={p.poly_modulus_degree} ({p.slots} slots, one value per slot), coefficient modulus "
        f"{list(p.coeff_modulus_bits)} bits (128-bit security allows <= {tc128} at this N), t={p.plain_modulus} "
        f"({p.plain_modulus.bit_length()} bits), seeded symmetric encryption; fixed point: bound {p.bound:g}, "
        f"max_silos {p.max_silos}, scale 2^{math.log2(q.scale):.1f}",
        f"baseline: CKKS (NVIDIA FLARE default), N={f.poly_modulus_degree} ({f.slots} slots), coefficient modulus "
        f"{list(f.coeff_modulus_bits)} bits (<= {tc128_f} allowed), scale 2^{f.scale_bits}, public-key encryption",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=1_000_000, help="parameters per update (default 1000000)")
    parser.add_argument("--silos", type=int, nargs="+", default=[3, 10, 50], help="codec-level silo counts")
    parser.add_argument("--round-silos", type=int, nargs="*", default=[3, 10],
                        help="silo counts for the real-process plain and HE rounds (default 3 10; none: skip)")
    parser.add_argument("--ckks-silos", type=int, nargs="*", default=[3],
                        help="silo counts for the FLARE-default CKKS baseline (default 3; none: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per real configuration (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds, not counted (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per real configuration")
    args = parser.parse_args(argv)
    if (args.params < 1 or args.rounds < 1 or args.warmup < 0
            or any(k < 1 for k in [*args.silos, *args.round_silos, *args.ckks_silos])):
        parser.error("--params, --rounds and silo counts must be >= 1, --warmup >= 0")
    from fedsilo.privacy.he import HeParams

    too_many = [k for k in [*args.silos, *args.round_silos] if k > HeParams().max_silos]
    if too_many:
        parser.error(f"silo counts {too_many} exceed the default max_silos {HeParams().max_silos}")

    report = ro.open_report(width=200, soft_wrap=False)
    console, log, cmd = report.console, report.log, report.cmd
    log(software_line())
    for line in params_lines():
        log(line)
    t_start = time.monotonic()
    codec: list[dict[str, Any]] = []
    pairs: list[RoundPair] = []
    try:
        cores = _cores()
        log(f"[bold]codec level[/] (silos pinned to core {cores[0]}, codec coordinator pinned to core "
            f"{cores[1 % len(cores)]}): BFV {args.silos} silos, CKKS {args.ckks_silos or 'skipped'}")
        codec = run_codec(args.silos, args.ckks_silos, args.params, args.seed, log)
        for k in args.round_silos:
            results = {}
            for agg in ("plain", "he"):
                log(f"[bold]real round, {k} silos, {agg}[/]")
                results[agg] = ro.run_config(k=k, params=args.params, rounds=args.rounds, warmup=args.warmup,
                                             insecure=False, clients="processes", seed=args.seed,
                                             timeout_s=args.timeout, keep=False, log=log, aggregation=agg)
            pairs.append(RoundPair(silos=k, plain=results["plain"], he=results["he"]))
    except KeyboardInterrupt:
        log("interrupted; processes stopped and temp dirs removed")
        return 130
    except ro.BenchError as exc:
        log(f"[red]benchmark failed:[/] {exc}")
        return 1
    console.print()
    render(codec, pairs, params=args.params, warmup=args.warmup, console=console, round_silos=args.round_silos)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    log(f"total wall time {time.monotonic() - t_start:.1f} s; load average at the end {load} (this benchmark's "
        f"own processes included; other work on the machine inflates every timing above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
