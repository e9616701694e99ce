"""Federated LoRA under silo-level DP: DEeR vs FedAvg-LoRA vs FFA-LoRA on the built-in data (issue 5).

A thin wrapper over :func:`fedsilo.silo_agent.simulation.simulate`: every federated cell is the
deployed coordinator and agents in one process, through the real servicers, with mTLS identities
from a fresh federation CA (``make_certs``), BFV aggregation and the agents' own silo-level DP. The
configs are written as ``fedsilo demo`` / ``fedsilo bench`` write them (``write_configs``):

* 3 silos = built-in domains 0, 1, 2 (``hospital-a`` … ``-c``), the demo UNet (``DEMO_MODEL``) and
  training (``DEMO_TRAINING``: one local epoch per round) with the seed, ``min_silos`` = 3;
* base: ``make_base`` (the demo's UNet pretrained on a domain no silo holds), once per seed;
* LoRA cells: ``deer``, ``fedavg-lora``, ``ffa-lora`` with ``[lora]`` = ``DEMO_LORA`` (rank 4, α 8) on
  that base, HE bound ``DEMO_LORA_HE_BOUND``; each with ``[privacy] silo_level = true,
  update_clip_norm = C, update_target_epsilon = ε, delta = 1e-5`` for every ε, plus one run without
  DP. The agents calibrate σ so that the whole run costs ε against one silo's upload and, under HE,
  each silo adds its share σ·C/√K of the aggregate's noise (K = 3); DEeR clips and noises in the
  product space (its noise regulator), the baselines clip the factor update jointly in parameter space;
* references: "frozen base" = the pretrained base scored by the Task (``task.evaluate_split``) on
  each silo's test split and on the unseen domain, no federation; "full-model FedAvg (no DP)" =
  FedAvg of every parameter starting from the same base (as the old in-process study did). The
  registered ``fedavg`` starts from a freshly initialised network, so this file registers
  ``fedavg-base``, a plugin subclass of ``FedAvg`` whose only change is ``wrap_model`` loading the
  silo's ``model.base_checkpoint`` (the README's plugin path; no aggregation code of its own).

Clip norms are FIXED per method (``CLIP``): the deployed agents do not expose their upload norms, so
the medians of each method's non-private upload norms measured by the old in-process study of this
file (seeds 0-2, 10 rounds) are used as constants. Uploads clipped are counted from the agents' own
log lines ("silo-level DP: ... clipped").

Metrics after the last round, from ``SimulationResult``: each silo's reported test Dice (mean of the
silos, worst silo), unseen-domain Dice (mean of the silos' reports), ε per silo from the
coordinator's ledger mirror (against one upload); mean ± sample std over seeds. Table 2: values
shared per round (``params_shared``) and bytes received per silo per round (``bytes_up`` / contributors)
from the coordinator's round records of each method's non-private run of the first seed. The
aggregation deviation of the old study is not measured here (the defining rule is tested in
``tests/silo_agent/test_lora_deviation.py``).

Usage::

    .venv/bin/python benchmarks/lora_dp.py [--seeds 0 1 2] [--rounds 10] [--eps 1 3 8] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread, as the demo's agents (threads = 1)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import round_overhead as ro  # noqa: E402  (open_report, machine_line)

from fedsilo.core.methods import register_method  # noqa: E402
from fedsilo.silo_agent.methods.fedavg import FedAvg  # noqa: E402

if TYPE_CHECKING:
    import torch

DELTA = 1e-5
NUM_SILOS = 3
QUICK_EPS = 8.0
LORA_METHODS = ("deer", "fedavg-lora", "ffa-lora")
FULL = "fedavg-base"
#: Fixed clip norms: the medians of each method's non-private upload norms measured by the old
#: in-process version of this study (seeds 0-2, 10 rounds): DEeR in the product space
#: ‖s·ΔB·A‖ / ‖s·B·ΔA‖, the baselines in parameter space ‖Δ‖ of the shared factors.
CLIP = {"deer": 0.1016, "fedavg-lora": 0.2678, "ffa-lora": 0.1235}
SPACE = {"deer": "product", "fedavg-lora": "param", "ffa-lora": "param"}
LABELS = {"deer": "DEeR", "fedavg-lora": "FedAvg-LoRA", "ffa-lora": "FFA-LoRA", FULL: "full-model FedAvg",
          "base": "frozen base (no fine-tuning)"}
SHARED = {"deer": "B (odd rounds) / A (even rounds)", "fedavg-lora": "A and B", "ffa-lora": "B",
          FULL: "every parameter"}
#: Student t 97.5% quantiles, index = degrees of freedom (paired per-seed differences).
T975 = (float("nan"), 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


@register_method
class FedAvgFromBase(FedAvg):
    """FedAvg of every parameter, starting from the silo's pretrained base checkpoint."""

    name = FULL
    summary = "full-model FedAvg fine-tuning the pretrained base (benchmarks/lora_dp.py reference; McMahan et al. 2017)"
    order = 10_000
    bench = None

    def wrap_model(self, model: torch.nn.Module, *, model_cfg: Any, base_checkpoint: Path | None) -> torch.nn.Module:
        from fedsilo.models.pretrain import load_base_checkpoint

        if base_checkpoint is not None:
            model.load_state_dict(load_base_checkpoint(base_checkpoint, model_cfg))
        return model


class _ClipCounter(logging.Handler):
    """Counts the agents' "silo-level DP: ... clipped" log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("silo-level DP:") and "clipped" in msg:
            self.count += 1


@contextmanager
def _counting_clips(log_file: Path) -> Iterator[_ClipCounter]:
    """While running, fedsilo's log lines go to ``log_file`` (not the console) and clips are counted."""
    root = logging.getLogger("fedsilo")
    saved = (root.level, root.propagate, list(root.handlers))
    counter, to_file = _ClipCounter(), logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
    root.setLevel(logging.INFO)
    root.propagate = False
    root.handlers[:] = [counter, to_file]
    try:
        yield counter
    finally:
        to_file.close()
        root.setLevel(saved[0])
        root.propagate = saved[1]
        root.handlers[:] = saved[2]


def run_cell(work: Path, *, method: str, seed: int, eps: float | None, rounds: int, base: Path) -> dict[str, Any]:
    """One federated run through ``simulate()``; returns its final metrics and wire records."""
    from fedsilo.coordinator.loading import load_federation_config
    from fedsilo.silo_agent.config import load_agent_config
    from fedsilo.silo_agent.demo import DEMO_BUDGET, DEMO_LORA, make_certs, silo_names, write_configs
    from fedsilo.silo_agent.simulation import simulate

    names = silo_names(NUM_SILOS)
    cell = work / f"{method}-seed{seed}-eps{'inf' if eps is None else f'{eps:g}'}"
    shutil.rmtree(cell, ignore_errors=True)
    cell.mkdir(parents=True)
    make_certs(cell / "certs", names)
    privacy = None if eps is None else {"silo_level": True, "update_clip_norm": CLIP[method],
                                        "update_target_epsilon": eps, "delta": DELTA}
    fed_path, agent_paths = write_configs(
        cell, names=names, rounds=rounds, strategy=method, seed=seed, port=1, insecure=False, aggregation="he",
        privacy=privacy, budgets={n: DEMO_BUDGET for n in names} if privacy else None, min_silos=NUM_SILOS,
        lora=dict(DEMO_LORA) if method in LORA_METHODS else None, base_checkpoint=base)
    fed = load_federation_config(fed_path)
    with _counting_clips(work / "fedsilo.log") as clips:
        result = simulate(fed, [load_agent_config(p) for p in agent_paths])
    last = {silo: {k: v for k, v, _ in values} for silo, values in result.rounds[-1].metrics.items()}
    plan = fed.privacy
    shutil.rmtree(cell, ignore_errors=True)
    return {
        "method": method, "seed": seed, "eps": eps, "clip": None if eps is None else CLIP[method],
        "sigma_upload": None if plan is None else plan.update_noise_multiplier / math.sqrt(plan.noise_shares or 1),
        "sigma_aggregate": None if plan is None else plan.update_noise_multiplier,
        "noise_shares": None if plan is None else plan.noise_shares,
        "silo_dice": {s: m["dice"] for s, m in sorted(last.items())},
        "unseen_dice": statistics.fmean(m["unseen_dice"] for m in last.values()),
        "epsilon": dict(result.epsilon), "clipped": clips.count if eps is not None else 0,
        "uploads": sum(len(r.contributors) for r in result.rounds),
        "rounds": [{"round": r.round, "params_shared": r.params_shared, "contributors": len(r.contributors),
                    "bytes_up_per_silo": r.bytes_up / max(1, len(r.contributors))} for r in result.rounds],
        "seconds": result.seconds,
    }


def frozen_base(work: Path, *, seed: int, base: Path) -> dict[str, Any]:
    """The pretrained base scored by the Task on each silo's test split and the unseen domain (no federation)."""
    from fedsilo.coordinator.config import DEFAULT_TASK
    from fedsilo.models.pretrain import load_base_checkpoint
    from fedsilo.models.tasks import get_task
    from fedsilo.silo_agent.bench.reference import load_silos
    from fedsilo.silo_agent.config import load_agent_config
    from fedsilo.silo_agent.demo import DEMO_MODEL, silo_names, write_configs

    t0 = time.monotonic()
    names = silo_names(NUM_SILOS)
    cell = work / f"base-seed{seed}"
    cell.mkdir(parents=True, exist_ok=True)
    _, agent_paths = write_configs(cell, names=names, rounds=1, strategy="fedavg", seed=seed, port=1, insecure=True,
                                   aggregation="plain")
    task = get_task(DEFAULT_TASK)
    silos = load_silos([load_agent_config(p) for p in agent_paths], names, task)
    model_cfg = task.model_config({**DEMO_MODEL, "seed": seed})
    model = task.build_model(model_cfg)
    model.load_state_dict(load_base_checkpoint(base, model_cfg))
    dice = {s.name: task.evaluate_split(model, s.data.splits.test, "test")["dice"][0] for s in silos}
    unseen = task.evaluate_split(model, silos[0].data.unseen, "unseen")["unseen_dice"][0]
    shutil.rmtree(cell, ignore_errors=True)
    return {"method": "base", "seed": seed, "eps": None, "silo_dice": dice, "unseen_dice": unseen, "epsilon": {},
            "clipped": 0, "uploads": 0, "rounds": [], "seconds": time.monotonic() - t0}


# -- report -----------------------------------------------------------------------------------------
def _mean(c: dict[str, Any]) -> float:  # mean of the silos' test Dice
    return statistics.fmean(c["silo_dice"].values())


def _worst(c: dict[str, Any]) -> float:  # the worst silo's test Dice
    return min(c["silo_dice"].values())


def _eps_spent(c: dict[str, Any]) -> float | None:  # the largest ε any silo's ledger mirror shows
    return max(c["epsilon"].values()) if c["epsilon"] else None


def mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs) if xs else float("nan"),
            "std": statistics.stdev(xs) if len(xs) > 1 else float("nan"), "n": len(xs)}


def ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{xs[0]:.3f}" if len(xs) == 1 else f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def render(cells: list[dict[str, Any]], *, eps_list: list[float], seeds: list[int], rounds: int,
           console: Any) -> dict[str, Any]:
    from rich.table import Table

    def group(method: str, eps: float | None) -> list[dict[str, Any]]:
        return sorted((c for c in cells if c["method"] == method and c["eps"] == eps), key=lambda c: c["seed"])

    t = Table(title=f"Table 1: test Dice after {rounds} rounds, {NUM_SILOS} silos (built-in domains 0-2), silo-level "
                    f"(ε, δ={DELTA:g}) for the whole run, BFV aggregation, noise in {NUM_SILOS} shares; "
                    f"mean ± std over seeds {seeds} (simulate(): deployed coordinator and agents)")
    for c, j in [("ε", "right"), ("method", "left"), ("σ/upload\n(aggregate)", "right"), ("C (space)", "right"),
                 ("uploads\nclipped", "right"), ("mean-of-silos\nDice", "right"), ("worst-silo\nDice", "right"),
                 ("unseen-domain\nDice", "right"), ("ε spent\n(max silo)", "right"), ("mean Dice per seed", "left"),
                 ("s/run", "right")]:
        t.add_column(c, justify=j)
    summary: dict[str, Any] = {}
    rows = [(None, m) for m in ("base", FULL, *LORA_METHODS)] + [(e, m) for e in eps_list for m in LORA_METHODS]
    last: object = "start"
    for eps, method in rows:
        g = group(method, eps)
        if not g:
            continue
        if eps != last and last != "start":
            t.add_section()
        last = eps
        spent = [e for e in map(_eps_spent, g) if e is not None]
        clipped, uploads = sum(c["clipped"] for c in g), sum(c["uploads"] for c in g)
        label = LABELS[method] + ("" if eps is not None or method == "base" else " (no DP)")
        t.add_row("–" if method == "base" else "∞" if eps is None else f"{eps:g}", label,
                  "-" if eps is None else f"{g[0]['sigma_upload']:.4g} ({g[0]['sigma_aggregate']:.4g})",
                  "-" if eps is None else f"{CLIP[method]:g} ({SPACE[method]})",
                  "-" if eps is None else f"{clipped}/{uploads} ({clipped / uploads:.0%})",
                  ms([_mean(c) for c in g]), ms([_worst(c) for c in g]), ms([c["unseen_dice"] for c in g]),
                  ms(spent), " ".join(f"{_mean(c):.3f}" for c in g), f"{statistics.fmean(c['seconds'] for c in g):.0f}")
        summary[f"{method}@{'inf' if eps is None else f'{eps:g}'}"] = {
            "method": method, "eps": eps, "clip": None if eps is None else CLIP[method],
            "sigma_upload": None if eps is None else g[0]["sigma_upload"],
            "mean_dice": mean_std([_mean(c) for c in g]), "worst_dice": mean_std([_worst(c) for c in g]),
            "unseen_dice": mean_std([c["unseen_dice"] for c in g]), "epsilon_spent": mean_std(spent),
            "clipped": clipped, "uploads": uploads}
    console.print(t)

    t2 = Table(title="Table 2: upload per round per silo (coordinator's round records, BFV, non-private run of seed "
                     f"{seeds[0]})")
    for c, j in [("method", "left"), ("shared per round", "left"), ("values/round", "right"),
                 ("bytes/round/silo", "right"), ("vs full model", "right")]:
        t2.add_column(c, justify=j)
    full = group(FULL, None)
    full_bytes = statistics.fmean(r["bytes_up_per_silo"] for r in full[0]["rounds"]) if full else None
    wire: dict[str, Any] = {}
    for method in (*LORA_METHODS, FULL):
        g = group(method, None)
        if not g:
            continue
        rs = g[0]["rounds"]
        parts = [rs[0::2], rs[1::2]] if method == "deer" and len(rs) > 1 else [rs]  # DEeR: B rounds, A rounds
        values = [statistics.fmean(r["params_shared"] for r in p) for p in parts]
        nbytes = [statistics.fmean(r["bytes_up_per_silo"] for r in p) for p in parts]
        ratio = statistics.fmean(r["bytes_up_per_silo"] for r in rs) / full_bytes if full_bytes else None
        t2.add_row(LABELS[method], SHARED[method], " / ".join(f"{v:,.0f}" for v in values),
                   " / ".join(f"{b:,.0f}" for b in nbytes), "-" if ratio is None else f"{ratio:.3f}×")
        wire[method] = {"values": values, "bytes_per_silo": nbytes, "vs_full_model": ratio}
    console.print(t2)
    summary["wire"] = wire
    return summary


def verdicts(cells: list[dict[str, Any]], eps_list: list[float]) -> list[dict[str, Any]]:
    """Per ε: DEeR's mean Dice against each baseline's, with paired per-seed differences and a 95% t interval."""
    out = []
    for eps in eps_list:
        by = {m: {c["seed"]: _mean(c) for c in cells if c["method"] == m and c["eps"] == eps} for m in LORA_METHODS}
        if not all(by.values()):
            continue
        means = {m: statistics.fmean(v.values()) for m, v in by.items()}
        diffs = {}
        for b in ("fedavg-lora", "ffa-lora"):
            d = [by["deer"][s] - by[b][s] for s in sorted(set(by["deer"]) & set(by[b]))]
            mean, std = statistics.fmean(d), statistics.stdev(d) if len(d) > 1 else float("nan")
            half = T975[min(len(d) - 1, 10)] * std / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            diffs[b] = {"mean": mean, "std": std, "wins": sum(x >= 0 for x in d), "n": len(d),
                        "ci95": [mean - half, mean + half]}
        out.append({"eps": eps, "means": means, "paired_diff": diffs,
                    "deer_ge_both": means["deer"] >= max(means["fedavg-lora"], means["ffa-lora"])})
    return out


def _pm(x: dict[str, Any]) -> str:
    if x["n"] < 2:
        return f"{x['mean']:+.3f}"
    lo, hi = x["ci95"]
    return f"{x['mean']:+.3f} (95% CI [{lo:+.3f}, {hi:+.3f}]{'' if lo > 0 or hi < 0 else ', not resolved'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds for every method (default 10)")
    parser.add_argument("--eps", type=float, nargs="+", default=None, help="silo-level ε per run (default 1 3 8)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: 1 seed, 2 rounds, ε = {QUICK_EPS:g}")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 10)
    eps_list = args.eps if args.eps is not None else ([QUICK_EPS] if args.quick else [1.0, 3.0, 8.0])
    if rounds < 1 or not seeds or any(e <= 0 for e in eps_list) or len(set(seeds)) != len(seeds):
        parser.error("--rounds must be >= 1, --eps > 0, --seeds distinct and not empty")

    import tenseal
    import torch

    torch.set_num_threads(1)

    from fedsilo.silo_agent.demo import make_base

    report = ro.open_report(width=200)
    console, log = report.console, report.log
    software = (f"Python {platform.python_version()}, torch {torch.__version__}, TenSEAL {tenseal.__version__}; "
                f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    log(f"software: {software}")
    log(f"setup: {NUM_SILOS} silos (built-in domains 0-2), {rounds} rounds, seeds {seeds}, ε {eps_list} "
        f"(δ = {DELTA:g}, whole run, silo-level, against one upload), fixed clip norms {CLIP}; every federated cell "
        "through simulate() (deployed coordinator + agents, mTLS identities, BFV, noise split into shares)")
    work = Path(tempfile.mkdtemp(prefix="fedsilo-lora-dp-"))
    cells: list[dict[str, Any]] = []
    t_start = time.monotonic()
    try:
        for seed in seeds:
            t0 = time.monotonic()
            base = make_base(work / f"base-seed{seed}.pt", seed)
            cells.append(c := frozen_base(work, seed=seed, base=base))
            log(f"seed {seed}: base pretrained in {time.monotonic() - t0:.0f} s; frozen base mean Dice "
                f"{_mean(c):.3f}, unseen {c['unseen_dice']:.3f}")
            for method, eps in [(FULL, None), *((m, None) for m in LORA_METHODS),
                                *((m, e) for e in eps_list for m in LORA_METHODS)]:
                cells.append(c := run_cell(work, method=method, seed=seed, eps=eps, rounds=rounds, base=base))
                spent = _eps_spent(c)
                log(f"  seed {seed} ε {'∞' if eps is None else f'{eps:g}'} {LABELS[method]:<18} mean Dice "
                    f"{_mean(c):.3f} (silos {', '.join(f'{d:.3f}' for d in c['silo_dice'].values())}, unseen "
                    f"{c['unseen_dice']:.3f})" + ("" if spent is None else f"; ε spent {spent:.3f}, clipped "
                                                  f"{c['clipped']}/{c['uploads']}") + f"; {c['seconds']:.0f} s")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    console.print()
    summary = render(cells, eps_list=eps_list, seeds=seeds, rounds=rounds, console=console)
    verdict = verdicts(cells, eps_list)
    for v in verdict:
        d = v["paired_diff"]
        log(f"ε = {v['eps']:g}: DEeR ≥ both baselines on mean Dice: {'YES' if v['deer_ge_both'] else 'NO'} (DEeR "
            f"{v['means']['deer']:.3f}, FedAvg-LoRA {v['means']['fedavg-lora']:.3f}, FFA-LoRA "
            f"{v['means']['ffa-lora']:.3f}); paired per seed DEeR − FedAvg-LoRA {_pm(d['fedavg-lora'])}, "
            f"DEeR − FFA-LoRA {_pm(d['ffa-lora'])}")
    bases = [_mean(c) for c in cells if c["method"] == "base"]
    if bases and verdict:
        b = statistics.fmean(bases)
        below = sum(v["means"][m] < b for v in verdict for m in LORA_METHODS)
        log(f"frozen base mean Dice {b:.3f}: private (method, ε) cells below it: {below}/{len(verdict) * 3}")
    wall = time.monotonic() - t_start
    log(f"total wall time {wall:.0f} s; load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json is not None:
        doc = {"command": report.cmd, "machine": ro.machine_line(), "software": software,
               "simulation": "simulate(): deployed coordinator and agents in one process, BFV, mTLS identities",
               "seeds": seeds, "rounds": rounds, "eps": eps_list, "delta": DELTA, "silos": NUM_SILOS, "clips": CLIP,
               "summary": summary, "verdicts": verdict, "cells": cells, "wall_s": wall}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
