"""Federated LoRA under silo-level DP: DEeR vs FedAvg-LoRA vs FFA-LoRA on the built-in data (issue 5).

An IN-PROCESS SIMULATION of the federation: no coordinator process, no gRPC, no TLS, no HE in the
loop (the encrypted upload sizes are measured separately, below). What it does use is fedsilo's real
building blocks, the same calls a silo agent makes (``silo_agent/daemon.py`` ``_train_round`` /
``_catch_up``):

* data: 3 silos = built-in domains 0, 1, 2 (``silo_splits(SyntheticConfig(seed=seed), i)``: 48 train,
  24 test images of 64 x 64 each); unseen-domain Dice on ``unseen_domain(SyntheticConfig(seed=seed))``;
* base: the demo's UNet (``DEMO_MODEL`` with ``seed``) pretrained on source domain 16 (``pretrain``,
  ``DEMO_PRETRAIN_EPOCHS`` epochs, as ``fedsilo.silo_agent.demo.make_base``), one per seed, kept in memory;
* LoRA: ``build_lora_model`` with ``DEMO_LORA`` (rank 4, alpha 8: s = 2, every Conv2d adapted, A drawn
  from ``init_seed`` 0, B = 0), identical on every silo;
* strategies: ``Deer``, ``FedAvgLora``, ``FfaLora`` on the LoRA model and ``FedAvg`` (every parameter
  shared) on the plain pretrained network; ``phase_for`` / ``phase_manifest`` pick each round's shared
  subset (DEeR: B in odd rounds, A in even rounds: R rounds = R/2 B/A pairs);
* a round: each silo loads the global shared values, ``strategy.set_trainable`` for the phase,
  ``train_local`` (``DEMO_TRAINING``: Adam, lr 1e-3, batch 8, one epoch, ``round_index`` = the round),
  update = trained - global over the round's shared tensors, privatized, and the global update is the
  plain mean of the silos' releases (weight 1 each, as the agent weighs silo-level DP uploads; without
  DP every silo has 48 training images, so the example weights are equal too);
* silo-level DP, (ε, δ = 1e-5) for the whole run of R uploads per silo: σ = ``calibrate_noise(ε, δ,
  sample_rate=1, steps=R)`` on ``DpAccountingVerifier(LEDGER_RDP_ORDERS)`` (as ``parse_privacy`` does
  for ``update_target_epsilon``: the target holds against one silo's upload). Every method makes R
  uploads of one Gaussian release each, so every method pays the same ε. DEeR: ``regulate_lora_update``
  (clip in the product space ‖s·ΔB·A‖ / ‖s·B·ΔA‖, Gaussian noise there, ridge map back to the trained
  factor, the frozen factor read from the global values); FedAvg-LoRA, FFA-LoRA: ``privatize_update``
  (joint L2 clip of the raw factor update + Gaussian noise: the published baselines' noise on the
  factors). Each silo adds noise of std σC on its own upload: no HE share splitting (K = 1). In the real
  HE runs each of K silos adds σ_agg·C/√K with σ_agg = √K·σ, which is the same per-silo noise, so the
  aggregate is distributed the same way;
* clip norms, one per method, chosen fairly: C = the median of the method's unclipped upload norms in
  its non-private runs (all seeds pooled; DEeR: product-space norm, both phases; baselines: parameter-space
  norm of the factor update), so that each method clips about half of its uploads. This tuning uses the
  silos' data and is not itself accounted (usual for benchmarks; a deployment would fix C in advance);
* noise: a numpy ``Generator`` seeded by (seed, method, ε) instead of the OS CSPRNG that production uses
  (same distribution; reproducible runs). For DEeR the generator is handed to ``regulate`` for the
  duration of the call only.

Metrics after the last round: each silo's test Dice with the global model (mean of the silos and worst
silo), unseen-domain Dice; mean ± sample std over the seeds. Aggregation deviation per round:
``aggregation_deviation`` of the silos' released factors (global + release for the round's shared
factor, global for the frozen one): ‖mean_i(s·B_i·A_i) − s·mean_i(B_i)·mean_i(A_i)‖_F over all
layers; reported as the max over rounds, and relative to the round's aggregate ΔW change
‖mean_i(s·B_i·A_i) − s·B·A‖_F (B, A: the global factors before the round). Upload size per round per
silo: values shared that round, and the serialized BFV ciphertexts of a real upload (silo 0, first
round of each phase, non-private run of the first seed, weighted 1/K as the agent does) encrypted with
``HeParams()`` defaults (N = 4096 values per ciphertext: small LoRA uploads round up to whole
ciphertexts), via ``FixedPoint.encode`` + ``SecretContext.encrypt``.

After the tables, one line per ε says whether DEeR's mean Dice (over seeds) is >= both baselines', with
the paired per-seed differences (same seed = same base, data and training order), their sample std and a
95% Student-t interval ("not resolved" when it contains 0); a last line compares the private runs with
the frozen base (the pretrained network without any fine-tuning, which releases nothing).

Usage::

    .venv/bin/python benchmarks/lora_dp.py [--seeds 0 1 2] [--rounds 10] [--eps 1 3 8] [--quick]
                                            [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# One torch thread, as the demo's agents (`threads = 1`, OMP_NUM_THREADS=1). Measured on the 2-core
# machine this was written on: a LoRA round of local training took 0.21 s on 1 thread and 0.27-4.2 s on
# 2 (the second core is shared with other work); pretraining 10 s vs 311 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import round_overhead as ro  # noqa: E402  (machine_line)

DELTA = 1e-5
NUM_SILOS = 3  # built-in domains 0, 1, 2 (as `fedsilo demo`)
QUICK_EPS = 8.0
PRIVATE_METHODS = ("deer", "fedavg-lora", "ffa-lora")
LABELS = {
    "deer": "DEeR",
    "fedavg-lora": "FedAvg-LoRA",
    "ffa-lora": "FFA-LoRA",
    "fedavg": "full-model FedAvg",
    "base": "frozen base (no fine-tuning)",
}
NONPRIVATE_LABELS = {
    "deer": "DEeR (no DP, reference)",
    "fedavg-lora": "non-private LoRA (FedAvg-LoRA, no DP)",
    "ffa-lora": "FFA-LoRA (no DP, reference)",
    "fedavg": "full-model FedAvg (no DP)",
    "base": "frozen base (no fine-tuning)",
}
#: Student t 97.5% quantiles for 1..10 degrees of freedom (index = df; 0 unused): 95% intervals of
#: the paired per-seed differences.
T975 = (float("nan"), 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
HUGE_CLIP = 1e300  # "no clipping": only to read regulate_lora_update's product-space norm


# -- the task of one seed ----------------------------------------------------------------------------
@dataclass
class Task:
    """One seed's data, configs and pretrained base."""

    seed: int
    model_cfg: Any
    train_cfg: Any
    lora: Any
    base_state: dict[str, Any]
    base_dice_source: float
    splits: list[Any]
    unseen: Any


def make_task(seed: int) -> Task:
    from fedsilo.models import ModelConfig, TrainConfig
    from fedsilo.models.lora import LoraSettings
    from fedsilo.models.pretrain import PretrainConfig, pretrain
    from fedsilo.models.synthetic import SyntheticConfig, silo_splits, unseen_domain
    from fedsilo.silo_agent.demo import DEMO_LORA, DEMO_MODEL, DEMO_PRETRAIN_EPOCHS, DEMO_TRAINING

    model_cfg = ModelConfig.from_mapping({**DEMO_MODEL, "seed": seed})
    train_cfg = TrainConfig.from_mapping({**DEMO_TRAINING, "seed": seed})
    # as make_base, without writing the checkpoint to disk
    ckpt = pretrain(PretrainConfig(model=model_cfg, training=train_cfg, epochs=DEMO_PRETRAIN_EPOCHS, seed=seed))
    data = SyntheticConfig(seed=seed)
    return Task(seed=seed, model_cfg=model_cfg, train_cfg=train_cfg, lora=LoraSettings.from_mapping(DEMO_LORA),
                base_state=ckpt["state_dict"], base_dice_source=float(ckpt["pretrain"]["dice"]),
                splits=[silo_splits(data, i) for i in range(NUM_SILOS)], unseen=unseen_domain(data))


def build(task: Task, method: str) -> Any:
    from fedsilo.models.lora import build_lora_model
    from fedsilo.models.registry import build_model

    if method in PRIVATE_METHODS:
        return build_lora_model(task.model_cfg, task.lora, base_state_dict=task.base_state)
    model = build_model(task.model_cfg)
    model.load_state_dict(task.base_state, strict=True)
    return model


def strategy_of(method: str) -> tuple[Any, Any]:
    """(coordinator Strategy name, silo_agent strategy object)."""
    from fedsilo.silo_agent.methods import strategy_for

    name = Strategy(method)
    return name, strategy_for(name)


# -- one simulated run ---------------------------------------------------------------------------------
@dataclass
class RunResult:
    method: str
    seed: int
    eps: float | None  # None: non-private
    sigma: float
    clip: float | None
    silo_dice: list[float]
    unseen_dice: float
    norms: list[float]  # unclipped upload norms (DEeR: product space), every silo and round
    norm_phases: list[str]  # the round's SharePhase value of each entry of norms
    clipped: int
    uploads: int
    deviation: list[float]  # per round (LoRA only)
    deviation_rel: list[float]
    values_per_round: list[int]
    wall_s: float
    train_loss_last: float

    @property
    def mean_dice(self) -> float:
        return statistics.fmean(self.silo_dice)

    @property
    def worst_dice(self) -> float:
        return min(self.silo_dice)


@contextmanager
def seeded_regulator(rng: np.random.Generator) -> Iterator[None]:
    """For the duration of the block, `regulate_lora_update` draws its noise from ``rng``."""
    import fedsilo.silo_agent.lora_privacy as lp

    original = lp.regulate
    lp.regulate = functools.partial(original, rng=rng)
    try:
        yield
    finally:
        lp.regulate = original


def _joint_norm(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(math.fsum(float(np.dot(a.astype(np.float64).ravel(), a.astype(np.float64).ravel()))
                               for a in arrays.values()))


def _deviation(layers: list[Any], silo_values: list[dict[str, Any]], prev: dict[str, Any]) -> tuple[float, float]:
    """Aggregation deviation of the silos' released factors, and its ratio to the round's ΔW change."""
    from fedsilo.models.lora import to_matrix
    from fedsilo.privacy.lora_noise import aggregation_deviation

    def mat(v: Any) -> np.ndarray:
        return to_matrix(v.detach().numpy() if hasattr(v, "detach") else np.asarray(v)).astype(np.float64)

    bs = [{ly.module: mat(vals[ly.b_name]) for ly in layers} for vals in silo_values]
    as_ = [{ly.module: mat(vals[ly.a_name]) for ly in layers} for vals in silo_values]
    scaling = {ly.module: ly.scaling for ly in layers}
    dev = aggregation_deviation(bs, as_, [1.0] * len(silo_values), scaling=scaling)
    change = {}
    for ly in layers:
        mean_prod = sum(b[ly.module] @ a[ly.module] for b, a in zip(bs, as_, strict=True)) / len(bs)
        change[ly.module] = ly.scaling * (mean_prod - mat(prev[ly.b_name]) @ mat(prev[ly.a_name]))
    ch = _joint_norm(change)
    return dev, (dev / ch if ch > 0 else float("nan"))


def simulate(task: Task, method: str, *, rounds: int, eps: float | None, sigma: float, clip: float | None,
             rng: np.random.Generator | None, capture: dict[str, np.ndarray] | None = None) -> RunResult:
    """R rounds of the federation for one method; private when ``eps`` is given."""
    import torch

    from fedsilo.core.phases import SharePhase, phase_manifest

    from fedsilo.coordinator.phases import phase_for
    from fedsilo.core.tensors import Manifest
    from fedsilo.models.lora import lora_layers
    from fedsilo.models.training import evaluate, train_local
    from fedsilo.privacy.update_noise import privatize_update
    from fedsilo.silo_agent.lora_privacy import regulate_lora_update

    t0 = time.monotonic()
    private = eps is not None
    name, strategy = strategy_of(method)
    models = [build(task, method) for _ in range(NUM_SILOS)]
    trainable = frozenset(n for n, p in models[0].named_parameters() if p.requires_grad)
    shared = strategy.shared_names(models[0])
    sd0 = models[0].state_dict()
    global_shared = {k: sd0[k].detach().clone() for k in shared}
    manifest = Manifest.of_arrays({k: v.numpy() for k, v in global_shared.items()})
    layers = lora_layers(models[0]) if name.uses_lora else []
    frozen_factors = {k: sd0[k].detach().clone() for ly in layers for k in (ly.a_name, ly.b_name)}
    norms: list[float] = []
    norm_phases: list[str] = []
    deviation: list[float] = []
    deviation_rel: list[float] = []
    values_per_round: list[int] = []
    clipped = 0
    loss = float("nan")
    for rnd in range(1, rounds + 1):
        phase = phase_for(name, rnd)
        round_manifest = phase_manifest(manifest, phase)
        names = [t.name for t in round_manifest.tensors]
        values_per_round.append(round_manifest.numel)
        releases: list[dict[str, np.ndarray]] = []
        for i, model in enumerate(models):
            model.load_state_dict(global_shared, strict=False)  # the agent's _load_global
            strategy.set_trainable(model, phase, trainable)
            res = train_local(model, task.splits[i].train, task.train_cfg, round_index=rnd)
            if i == 0:
                loss = res.loss
            sd = model.state_dict()
            update = {k: (sd[k].detach() - global_shared[k]).numpy() for k in names}
            deer_phase = name.value == "deer" and phase is not SharePhase.ALL
            if deer_phase:
                if private:
                    assert clip is not None and rng is not None
                    with seeded_regulator(rng):
                        released, norm, was_clipped = regulate_lora_update(
                            model, update, global_shared, phase=phase, clip_norm=clip, noise_multiplier=sigma)
                else:  # the product-space norm only; the raw update is released
                    _, norm, was_clipped = regulate_lora_update(
                        model, update, global_shared, phase=phase, clip_norm=HUGE_CLIP, noise_multiplier=0.0)
                    released = update
            elif private:
                assert clip is not None and rng is not None
                out = privatize_update(update, clip_norm=clip, noise_multiplier=sigma, rng=rng)
                released, norm, was_clipped = dict(out.arrays), out.original_norm, out.clipped
            else:
                released, norm, was_clipped = update, _joint_norm(update), False
            norms.append(float(norm))
            norm_phases.append(phase.value)
            clipped += int(was_clipped)
            releases.append(released)
            if capture is not None and i == 0 and phase.value not in capture:
                capture[phase.value] = np.concatenate(
                    [np.asarray(released[t.name], dtype=np.float64).ravel() for t in round_manifest.tensors])
        if layers:
            # factors nobody shares (FFA-LoRA's A) are the frozen initial ones, identical on every silo
            current = {**frozen_factors, **global_shared}
            silo_values = [{**current, **{k: torch.from_numpy(np.asarray(r[k])) + global_shared[k] for k in names}}
                           for r in releases]
            dev, rel = _deviation(layers, silo_values, current)
            deviation.append(dev)
            deviation_rel.append(rel)
        for k in names:  # the coordinator's mean (weight 1 each), applied as in _catch_up
            mean = np.mean(np.stack([np.asarray(r[k], dtype=np.float64) for r in releases]), axis=0)
            global_shared[k] = global_shared[k] + torch.from_numpy(mean).to(global_shared[k].dtype)
    final = models[0]
    final.load_state_dict(global_shared, strict=False)
    silo_dice = [evaluate(final, task.splits[i].test).dice for i in range(NUM_SILOS)]
    unseen = evaluate(final, task.unseen).dice
    return RunResult(method=method, seed=task.seed, eps=eps, sigma=sigma if private else 0.0, clip=clip,
                     silo_dice=silo_dice, unseen_dice=unseen, norms=norms, norm_phases=norm_phases, clipped=clipped,
                     uploads=rounds * NUM_SILOS, deviation=deviation, deviation_rel=deviation_rel,
                     values_per_round=values_per_round, wall_s=time.monotonic() - t0, train_loss_last=loss)


def base_result(task: Task) -> RunResult:
    from fedsilo.models.training import evaluate

    t0 = time.monotonic()
    model = build(task, "fedavg")
    silo_dice = [evaluate(model, task.splits[i].test).dice for i in range(NUM_SILOS)]
    return RunResult(method="base", seed=task.seed, eps=None, sigma=0.0, clip=None, silo_dice=silo_dice,
                     unseen_dice=evaluate(model, task.unseen).dice, norms=[], norm_phases=[], clipped=0, uploads=0,
                     deviation=[], deviation_rel=[], values_per_round=[], wall_s=time.monotonic() - t0,
                     train_loss_last=float("nan"))


def noise_rng(seed: int, method: str, eps: float) -> np.random.Generator:
    return np.random.default_rng([0x10DA, seed, PRIVATE_METHODS.index(method), int(round(eps * 1000))])


# -- encrypted upload sizes -----------------------------------------------------------------------------
def he_sizes(captured: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Serialized BFV ciphertext bytes of real uploads (HeParams defaults), weighted 1/K as the agent does."""
    from fedsilo.privacy import he

    params = he.HeParams()
    codec = he.FixedPoint(params=params)
    secret = he.SecretContext.generate(params)
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, Any]] = {}
    for method, phases in captured.items():
        for phase, flat in phases.items():
            ints, n_clipped = codec.encode(flat * (1.0 / NUM_SILOS), rng)
            blobs = secret.encrypt(ints)
            out[f"{method}/{phase}"] = {
                "values": int(flat.size), "ciphertexts": len(blobs), "bytes": int(sum(map(len, blobs))),
                "bytes_per_ciphertext": [len(b) for b in blobs], "float32_bytes": int(flat.size) * 4,
                "clipped_to_bound": int(n_clipped), "slots": params.slots,
                "bytes_per_value": sum(map(len, blobs)) / flat.size,
            }
    return out


# -- statistics and report --------------------------------------------------------------------------------
def ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs) if xs else float("nan"),
            "std": statistics.stdev(xs) if len(xs) > 1 else float("nan"), "n": len(xs)}


def eps_key(eps: float | None) -> str:
    return "inf" if eps is None else f"{eps:g}"


def render(results: list[RunResult], *, eps_list: list[float], sigmas: dict[float, float],
           clips: dict[str, float], seeds: list[int], rounds: int, he: dict[str, dict[str, Any]],
           console: Any) -> dict[str, Any]:
    from rich.table import Table

    def group(method: str, eps: float | None) -> list[RunResult]:
        return sorted((r for r in results if r.method == method and r.eps == eps), key=lambda r: r.seed)

    t = Table(title=f"Table 1: test Dice after {rounds} rounds, 3 silos (built-in domains 0-2), silo-level "
                    f"(ε, δ={DELTA:g}) for the whole run; mean ± std over seeds {seeds} (in-process simulation)")
    for c, j in [("ε", "right"), ("method", "left"), ("σ", "right"), ("C (space)", "right"),
                 ("uploads clipped", "right"), ("mean-of-silos Dice", "right"), ("worst-silo Dice", "right"),
                 ("unseen-domain Dice", "right"), ("mean Dice per seed", "left")]:
        t.add_column(c, justify=j)
    summary: dict[str, Any] = {}
    rows: list[tuple[float | None, str]] = [(None, m) for m in ("base", "fedavg", "fedavg-lora", "deer", "ffa-lora")]
    rows += [(e, m) for e in eps_list for m in PRIVATE_METHODS]
    last_eps: object = "start"
    for eps, method in rows:
        g = group(method, eps)
        if not g:
            continue
        if eps != last_eps and last_eps != "start":
            t.add_section()
        last_eps = eps
        up = sum(r.uploads for r in g)
        space = "" if eps is None else (" (product)" if method == "deer" else " (param)")
        label = NONPRIVATE_LABELS[method] if eps is None else LABELS[method]
        t.add_row("∞ (no DP)" if eps is None else f"{eps:g}", label,
                  "-" if eps is None else f"{sigmas[eps]:.3f}",
                  "-" if eps is None else f"{clips[method]:.4g}{space}",
                  "-" if eps is None else f"{sum(r.clipped for r in g)}/{up} ({sum(r.clipped for r in g) / up:.0%})",
                  ms([r.mean_dice for r in g]), ms([r.worst_dice for r in g]), ms([r.unseen_dice for r in g]),
                  " ".join(f"{r.mean_dice:.3f}" for r in g))
        summary[f"{method}@{eps_key(eps)}"] = {
            "method": method, "eps": eps, "sigma": None if eps is None else sigmas[eps],
            "clip": None if eps is None else clips[method], "mean_dice": mean_std([r.mean_dice for r in g]),
            "worst_dice": mean_std([r.worst_dice for r in g]), "unseen_dice": mean_std([r.unseen_dice for r in g]),
            "clipped": sum(r.clipped for r in g), "uploads": up,
        }
    console.print(t)

    # -- table 2: what goes over the wire, and the aggregation deviation
    t2 = Table(title="Table 2: upload per round per silo (BFV, HeParams defaults: 4096 values per ciphertext, "
                     "seeded) and measured aggregation deviation ‖mean_i(s·B_i·A_i) − s·mean(B)·mean(A)‖_F "
                     "(max over rounds)")
    for c, j in [("method", "left"), ("shared that round", "left"), ("values/round", "right"),
                 ("float32 B", "right"), ("cipher-\ntexts", "right"), ("encrypted B\n/round/silo", "right"),
                 ("B/value", "right"), ("vs full\nmodel", "right"), ("max deviation no DP\n(rel. to ΔW change)", "right"),
                 ("max deviation with\nDP (all ε, seeds)", "right")]:
        t2.add_column(c, justify=j)
    full = he.get("fedavg/all")
    wire: dict[str, Any] = {}
    for method, phases in (("deer", ("lora_b", "lora_a")), ("fedavg-lora", ("all",)), ("ffa-lora", ("all",)),
                           ("fedavg", ("all",))):
        np_runs = group(method, None)
        dp_runs = [r for r in results if r.method == method and r.eps is not None]
        dev_np = max((max(r.deviation) for r in np_runs if r.deviation), default=None)
        rel_np = max((max(r.deviation_rel) for r in np_runs if r.deviation_rel), default=None)
        dev_dp = max((max(r.deviation) for r in dp_runs if r.deviation), default=None)
        for j, phase in enumerate(phases):
            h = he.get(f"{method}/{phase}")
            if h is None:
                continue
            what = {"lora_b": "B (A frozen), odd rounds", "lora_a": "A (B frozen), even rounds",
                    "all": "A and B" if method == "fedavg-lora" else ("B (A frozen all run)"
                                                                      if method == "ffa-lora" else
                                                                      "every parameter")}[phase]
            ratio = f"{h['bytes'] / full['bytes']:.3f}×" if full else "-"
            dev_cell = "-" if dev_np is None else f"{dev_np:.3g} ({rel_np:.2g})"
            dev_dp_cell = "-" if dev_dp is None else f"{dev_dp:.3g}"
            t2.add_row(LABELS[method] if j == 0 else "", what, f"{h['values']:,}", f"{h['float32_bytes']:,}",
                       str(h["ciphertexts"]), f"{h['bytes']:,}", f"{h['bytes_per_value']:.2f}", ratio,
                       dev_cell if j == 0 else "", dev_dp_cell if j == 0 else "")
            wire[f"{method}/{phase}"] = h
        if method in ("deer",) and all(f"deer/{p}" in he for p in phases):
            avg = statistics.fmean(he[f"deer/{p}"]["bytes"] for p in phases)
            avg_v = statistics.fmean(he[f"deer/{p}"]["values"] for p in phases)
            t2.add_row("", "mean per round (B/A)", f"{avg_v:,.0f}", f"{avg_v * 4:,.0f}", "-",
                       f"{avg:,.0f}", f"{avg / avg_v:.2f}", f"{avg / full['bytes']:.3f}×" if full else "-", "", "")
        summary[f"deviation/{method}"] = {"max_nonprivate": dev_np, "max_rel_nonprivate": rel_np,
                                          "max_private": dev_dp}
    console.print(t2)
    summary["wire"] = wire
    return summary


def verdicts(results: list[RunResult], eps_list: list[float]) -> list[dict[str, Any]]:
    out = []
    for eps in eps_list:
        by = {m: {r.seed: r.mean_dice for r in results if r.method == m and r.eps == eps} for m in PRIVATE_METHODS}
        if not all(by.values()):
            continue
        means = {m: statistics.fmean(v.values()) for m, v in by.items()}
        diffs = {}
        for b in ("fedavg-lora", "ffa-lora"):
            common = sorted(set(by["deer"]) & set(by[b]))
            d = [by["deer"][s] - by[b][s] for s in common]
            mean, std = statistics.fmean(d), (statistics.stdev(d) if len(d) > 1 else float("nan"))
            half = T975[len(d) - 1] * std / math.sqrt(len(d)) if 1 < len(d) <= len(T975) else (
                1.96 * std / math.sqrt(len(d)) if len(d) > len(T975) else float("nan"))
            diffs[b] = {"mean": mean, "std": std, "wins": sum(x >= 0 for x in d), "n": len(d),
                        "ci95": [mean - half, mean + half]}
        out.append({"eps": eps, "means": means, "paired_diff": diffs,
                    "deer_ge_both": means["deer"] >= means["fedavg-lora"] and means["deer"] >= means["ffa-lora"]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="coordinator rounds R, the same for every method (default 10: DEeR = 5 B/A pairs)")
    parser.add_argument("--eps", type=float, nargs="+", default=None,
                        help="silo-level ε for the whole run, δ = 1e-5 (default 1 3 8)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: 1 seed, 2 rounds, ε = {QUICK_EPS:g} (unless given explicitly)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 10)
    eps_list = args.eps if args.eps is not None else ([QUICK_EPS] if args.quick else [1.0, 3.0, 8.0])
    if rounds < 1 or not seeds or any(e <= 0 for e in eps_list) or len(set(seeds)) != len(seeds):
        parser.error("--rounds must be >= 1, --eps > 0, --seeds distinct and not empty")

    import torch

    torch.set_num_threads(1)
    import monai
    import peft
    import tenseal

    from fedsilo.privacy.accounting import (
        LEDGER_RDP_ORDERS,
        DpAccountingVerifier,
        Mechanism,
        Neighbouring,
        Release,
        calibrate_noise,
    )

    report = ro.open_report(width=200)
    console, log, cmd = report.console, report.log, report.cmd
    software = (f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} intra-op "
                f"thread), peft {peft.__version__}, monai {monai.__version__}, TenSEAL {tenseal.__version__}, numpy "
                f"{np.__version__}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    log(f"software: {software}")
    log("[bold]in-process simulation[/] of the federation with fedsilo's building blocks (train_local, strategies, "
        "phase_for/phase_manifest, regulate_lora_update, privatize_update, aggregation_deviation): no coordinator, "
        "no gRPC/TLS, no HE in the loop (ciphertext sizes measured separately), each silo adds its whole noise "
        "σ·C (no HE share splitting: K = 1, which gives the same per-silo noise as the calibrated HE runs)")
    log(f"setup: {NUM_SILOS} silos (built-in domains 0, 1, 2), {rounds} rounds for every method"
        f"{' (DEeR: ' + str(rounds // 2) + ' B/A pairs)' if rounds % 2 == 0 else ' (odd: DEeR ends on a B round)'}, "
        f"seeds {seeds}, ε {eps_list} (δ = {DELTA:g}, whole run, silo-level)")

    accountant = DpAccountingVerifier(orders=LEDGER_RDP_ORDERS)
    sigmas: dict[float, float] = {}
    for eps in eps_list:
        sigmas[eps] = calibrate_noise(target_epsilon=eps, delta=DELTA, sample_rate=1.0, steps=rounds,
                                      accountant=accountant)
        got = accountant.epsilon([Release(mechanism=Mechanism.GAUSSIAN, neighbouring=Neighbouring.SILO,
                                          noise_multiplier=sigmas[eps], sample_rate=1.0, steps=rounds)],
                                 delta=DELTA).epsilon
        log(f"ε = {eps:g}: σ = {sigmas[eps]:.4f} per upload ({rounds} GAUSSIAN releases, q = 1; dp_accounting RDP "
            f"on the ledger's integer orders gives ε = {got:.4f} for the run)")

    t_start = time.monotonic()
    results: list[RunResult] = []
    captured: dict[str, dict[str, np.ndarray]] = {}
    tasks: dict[int, Task] = {}
    try:
        # 1. bases and the non-private runs (they also fix each method's clip norm)
        for seed in seeds:
            t0 = time.monotonic()
            tasks[seed] = task = make_task(seed)
            base = base_result(task)
            results.append(base)
            log(f"seed {seed}: base pretrained on domain 16 in {time.monotonic() - t0:.1f} s (source-domain test "
                f"Dice {task.base_dice_source:.3f}); frozen base on silos "
                f"{', '.join(f'{d:.3f}' for d in base.silo_dice)}")
            for method in ("fedavg", "fedavg-lora", "deer", "ffa-lora"):
                cap: dict[str, np.ndarray] | None = None
                if seed == seeds[0]:
                    cap = captured.setdefault(method, {})
                r = simulate(task, method, rounds=rounds, eps=None, sigma=0.0, clip=None, rng=None, capture=cap)
                results.append(r)
                norm_info = (f"; upload norms median {statistics.median(r.norms):.4g} "
                             f"({'product space' if method == 'deer' else 'parameter space'})")
                dev = f"; max deviation {max(r.deviation):.3g}" if r.deviation else ""
                log(f"  no DP  {LABELS[method]:<18} mean Dice {r.mean_dice:.3f} (silos "
                    f"{', '.join(f'{d:.3f}' for d in r.silo_dice)}){norm_info}{dev}; {r.wall_s:.1f} s")
        clips: dict[str, float] = {}
        for method in PRIVATE_METHODS:
            norms = [n for r in results if r.method == method and r.eps is None for n in r.norms]
            clips[method] = statistics.median(norms)
            q = np.quantile(norms, [0.1, 0.25, 0.5, 0.75, 0.9])
            by_phase = ""
            if method == "deer":
                ph = [(p, n) for r in results if r.method == method and r.eps is None
                      for p, n in zip(r.norm_phases, r.norms, strict=True)]
                by_phase = "; median per phase: " + ", ".join(
                    f"{p.removeprefix('lora_').upper()} {statistics.median([n for pp, n in ph if pp == p]):.3g}"
                    for p in ("lora_b", "lora_a") if any(pp == p for pp, _ in ph))
            log(f"clip norm {LABELS[method]}: C = {clips[method]:.4g} = median of {len(norms)} unclipped "
                f"{'product-space ‖s·ΔB·A‖ / ‖s·B·ΔA‖' if method == 'deer' else 'parameter-space ‖Δ‖'} upload norms "
                f"of its non-private runs (10/25/50/75/90%: {', '.join(f'{x:.3g}' for x in q)}{by_phase})")
        # 2. the private runs
        for seed in seeds:
            for eps in eps_list:
                for method in PRIVATE_METHODS:
                    r = simulate(tasks[seed], method, rounds=rounds, eps=eps, sigma=sigmas[eps], clip=clips[method],
                                 rng=noise_rng(seed, method, eps))
                    results.append(r)
                    log(f"  seed {seed} ε {eps:g} {LABELS[method]:<12} mean Dice {r.mean_dice:.3f} (silos "
                        f"{', '.join(f'{d:.3f}' for d in r.silo_dice)}, unseen {r.unseen_dice:.3f}); clipped "
                        f"{r.clipped}/{r.uploads}; max deviation {max(r.deviation):.3g}; {r.wall_s:.1f} s")
        he = he_sizes(captured)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    console.print()
    summary = render(results, eps_list=eps_list, sigmas=sigmas, clips=clips, seeds=seeds, rounds=rounds, he=he,
                     console=console)
    verdict = verdicts(results, eps_list)
    def pm(x: dict[str, Any]) -> str:
        if x["n"] < 2:
            return f"{x['mean']:+.3f}"
        lo, hi = x["ci95"]
        return (f"{x['mean']:+.3f} ± {x['std']:.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]"
                f"{'' if lo > 0 or hi < 0 else ': not resolved'}")

    for v in verdict:
        d = v["paired_diff"]
        log(f"ε = {v['eps']:g}: DEeR ≥ both baselines on mean Dice (measured): "
            f"{'YES' if v['deer_ge_both'] else 'NO'}: DEeR {v['means']['deer']:.3f}, FedAvg-LoRA "
            f"{v['means']['fedavg-lora']:.3f}, FFA-LoRA {v['means']['ffa-lora']:.3f}; paired per seed, DEeR − "
            f"FedAvg-LoRA {pm(d['fedavg-lora'])} (DEeR ≥ in {d['fedavg-lora']['wins']}/{d['fedavg-lora']['n']} "
            f"seeds), DEeR − FFA-LoRA {pm(d['ffa-lora'])} ({d['ffa-lora']['wins']}/{d['ffa-lora']['n']} seeds)")
    base_runs = [r.mean_dice for r in results if r.method == "base"]
    if base_runs and verdict:
        base_mean = statistics.fmean(base_runs)
        best = max(((m, v["eps"], v["means"][m]) for v in verdict for m in PRIVATE_METHODS), key=lambda x: x[2])
        log(f"against the frozen base (mean Dice {base_mean:.3f}, no fine-tuning, no release): the best private "
            f"mean Dice is {LABELS[best[0]]} at ε = {best[1]:g}, {best[2]:.3f} "
            f"({'above' if best[2] > base_mean else 'below'} the base); private runs below the base: "
            f"{sum(v['means'][m] < base_mean for v in verdict for m in PRIVATE_METHODS)}/"
            f"{len(verdict) * len(PRIVATE_METHODS)} (method, ε) cells")
    log("definitions: Dice = mean per-image Dice of the argmax prediction on each silo's 24 test images with the "
        "final global model; mean-of-silos = unweighted mean over the 3 silos (equal test sets), worst = the lowest "
        "silo; ± = sample std over seeds (n - 1); unseen = the built-in unseen scanner; C (product) clips "
        "‖(s·ΔB·A)_ℓ‖_F or ‖(s·B·ΔA)_ℓ‖_F jointly over layers (DEeR's regulator), C (param) clips ‖Δ‖ of the shared "
        "factors jointly; the noise std per element is σ·C in that space; deviation = aggregation_deviation of "
        "the silos' released factors (relative: over ‖mean_i(s·B_i·A_i) − s·B·A‖_F of the round); encrypted bytes = "
        "serialized seeded BFV ciphertexts of silo 0's real upload (values weighted 1/K)")
    wall = time.monotonic() - t_start
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    log(f"total wall time {wall:.1f} s (after imports and σ calibration); load average at the end {load}")
    if args.json is not None:
        doc = {
            "command": cmd, "machine": ro.machine_line(), "software": software, "simulation": "in-process, no gRPC",
            "seeds": seeds, "rounds": rounds, "eps": eps_list, "delta": DELTA, "silos": NUM_SILOS,
            "sigmas": {f"{k:g}": v for k, v in sigmas.items()}, "clips": clips,
            "train_config": tasks[seeds[0]].train_cfg.to_mapping(), "lora": tasks[seeds[0]].lora.to_mapping(),
            "model_config": tasks[seeds[0]].model_cfg.to_mapping(),
            "summary": summary, "verdicts": verdict, "runs": [asdict(r) for r in results], "wall_s": wall,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
