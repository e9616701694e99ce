"""Measures the BFV codec of privacy/he.py against the FLARE-default CKKS baseline.

Run on one core for the throughput figures:

    taskset -c 0 .venv/bin/python benchmarks/he_codec_probe.py [--n 1000000] [--silos 3 10 50]

Prints the parameters, bytes per parameter up (seeded) and down (aggregate), encrypt and
serialize throughput, the coordinator's add time, decrypt time, the error against the
float64 weighted mean, the noise budget left, and the same row for FLARE's CKKS default.
No torch; the "coordinator" is a PublicContext in the same process.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import tenseal.sealapi as seal

from fedsilo.privacy import he


def _updates(rng: np.random.Generator, k: int, n: int, correlated: bool) -> list[np.ndarray]:
    """N(0, 0.01) per value (std 0.01); correlated: a shared N(0, 0.01) part plus that."""
    common = rng.normal(0.0, 0.01, n) if correlated else 0.0
    return [common + rng.normal(0.0, 0.01, n) for _ in range(k)]


def bfv_round(params: he.HeParams, k: int, n: int, seed: int, correlated: bool) -> dict:
    rng = np.random.default_rng(seed)
    secret = he.SecretContext.generate(params)
    public = he.PublicContext(params)
    q = he.FixedPoint(params=params)
    updates = _updates(rng, k, n, correlated)
    weights = rng.random(k) + 0.1
    weights /= weights.sum()

    quant_s = enc_s = add_s = 0.0
    acc: list = [None] * params.n_chunks(n)
    up_bytes = 0
    for w, u in zip(weights, updates, strict=True):
        t0 = time.perf_counter()
        ints, _ = q.encode(w * u, rng)
        t1 = time.perf_counter()
        blobs = secret.encrypt(ints)
        t2 = time.perf_counter()
        quant_s += t1 - t0
        enc_s += t2 - t1
        up_bytes = sum(map(len, blobs))
        t0 = time.perf_counter()
        for i, blob in enumerate(blobs):  # the coordinator: load + add as chunks arrive
            acc[i] = public.add(acc[i], public.load(blob))
        add_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    aggregate = [public.dump(c) for c in acc]
    dump_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean = he.decrypt_mean(secret, q, aggregate, n, float(weights.sum()))
    dec_s = time.perf_counter() - t0
    exact = sum(w * u for w, u in zip(weights, updates, strict=True)) / weights.sum()
    err = float(np.max(np.abs(mean - exact)))
    budget = min(secret.noise_budget(b) for b in aggregate)
    return {
        "up": up_bytes / n,
        "down": sum(map(len, aggregate)) / n,
        "quant_mps": n / (quant_s / k) / 1e6,
        "enc_mps": n / (enc_s / k) / 1e6,
        "both_mps": n / ((quant_s + enc_s) / k) / 1e6,
        "add_s": add_s,
        "dump_s": dump_s,
        "dec_s": dec_s,
        "abs_err": err,
        "rel_err": err / float(np.max(np.abs(exact))),
        "max_mean": float(np.max(np.abs(exact))),
        "budget": budget,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--silos", type=int, nargs="+", default=[3, 10, 50])
    ap.add_argument("--no-ckks", action="store_true")
    ap.add_argument("--correlated", action="store_true", help="shared update component")
    args = ap.parse_args()

    p = he.HeParams()
    q = he.FixedPoint(params=p)
    maxbits = seal.CoeffModulus.MaxBitCount(p.poly_modulus_degree, seal.SEC_LEVEL_TYPE.TC128)
    print(
        f"BFV defaults: N={p.poly_modulus_degree} coeff_bits={p.coeff_modulus_bits} "
        f"(TC128 max {maxbits}) t={p.plain_modulus} ({p.plain_modulus.bit_length()} bits) "
        f"bound={p.bound} max_silos={p.max_silos} scale=2^{math.log2(q.scale):.2f} "
        f"cap={q.cap}"
    )
    print(f"n={args.n} updates ~ N(0, 0.01^2){' + shared part' if args.correlated else ''}")
    hdr = (
        f"{'scheme':6} {'K':>3} {'up B/p':>7} {'down B/p':>8} {'quant M/s':>9} {'enc M/s':>8} "
        f"{'q+e M/s':>8} {'add s':>7} {'dump s':>6} {'dec s':>6} {'max|err|':>9} "
        f"{'rel err':>9} {'budget':>6}"
    )
    print(hdr)
    for k in args.silos:
        r = bfv_round(p, k, args.n, seed=k, correlated=args.correlated)
        print(
            f"{'BFV':6} {k:>3} {r['up']:>7.3f} {r['down']:>8.3f} {r['quant_mps']:>9.1f} "
            f"{r['enc_mps']:>8.2f} {r['both_mps']:>8.2f} {r['add_s']:>7.3f} {r['dump_s']:>6.3f} "
            f"{r['dec_s']:>6.3f} {r['abs_err']:>9.2e} {r['rel_err']:>9.2e} {r['budget']:>6}"
        )
    if args.no_ckks:
        return
    for k in args.silos:
        rng = np.random.default_rng(k)
        updates = _updates(rng, k, args.n, args.correlated)
        weights = rng.random(k) + 0.1
        weights /= weights.sum()
        r = he.ckks_flare_roundtrip(updates, list(weights))
        print(
            f"{'CKKS':6} {k:>3} {r.upload_bytes_per_value:>7.3f} "
            f"{r.download_bytes_per_value:>8.3f} {'-':>9} "
            f"{args.n / r.encrypt_s / 1e6:>8.2f} {'-':>8} {r.aggregate_s:>7.3f} {'-':>6} "
            f"{r.decrypt_s:>6.3f} {r.max_abs_error:>9.2e} {r.max_rel_error:>9.2e} {'-':>6}"
        )


if __name__ == "__main__":
    main()
