"""Personalisation: local, FedAvg, FedBN, Ditto and pFL-ResFIM (its ρ sweep included), without and with DP.

A thin wrapper over ``fedsilo bench``: two studies of the same methods, one without DP and one with
each method's record-level plan (ε ≤ 8 per run at δ = 1e-5), each cell a whole federation run by
the deployed coordinator and agents in one process (``simulate()``: the real servicers, BFV
aggregation, DP-SGD, ledgers; only the transport is in-process). There is no federation loop here:
the methods, their settings and the measures are the bench's (``fedsilo.silo_agent.bench``), and the
ResFIM ρ sweep is a list of bench method variants (``resfim@resfim.rho=0.2``). Ditto cannot run
under the record-level plan (its personal pass is an unaccounted second release): in the DP study
it runs without DP and the summary says so; ``local`` is a reference run without DP in both.

The studies resume: cells already in ``--out`` are kept, so a run that was stopped continues.
Outputs per study: ``summary.md`` (the tables the README shows), ``results.csv`` and the plots.

Usage::

    .venv/bin/python benchmarks/personalization.py [--seeds 3] [--rounds 10] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedsilo.silo_agent.bench.runner import BenchConfig, BenchError, parse_seeds, run_study

#: The study's methods, in table order: the ResFIM ρ sweep around the bench's ρ = 0.1.
METHODS = ("local", "fedavg", "fedbn", "ditto", "resfim@resfim.rho=0.05", "resfim", "resfim@resfim.rho=0.2",
           "resfim@resfim.rho=0.4")


def main(argv: list[str] | None = None) -> int:
    """Runs (or resumes) both studies and prints their summaries; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="3", help="a count (3 = seeds 0, 1, 2) or a comma-separated list")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of one local epoch each (default 10)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/personalization"),
                        help="folder of the two studies (no-dp/ and dp/)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 rounds, FedAvg and ResFIM only")
    args = parser.parse_args(argv)
    methods = ("fedavg", "resfim") if args.quick else METHODS
    seeds, rounds = ((0,), 2) if args.quick else (parse_seeds(args.seeds), args.rounds)
    started = time.monotonic()
    try:
        for dp in (False, True):
            out = args.out / ("dp" if dp else "no-dp")
            cfg = BenchConfig(methods=methods, seeds=seeds, rounds=rounds, sweep=(), aggregation="he", dp=dp,
                              out=out)
            run_study(cfg)
            print(f"\n## {'With DP (each method its record-level plan, ε ≤ 8)' if dp else 'Without DP'}: {out}\n")
            print((out.resolve() / "summary.md").read_text())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"total wall time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
