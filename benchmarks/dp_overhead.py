"""Cost of record-level DP-SGD relative to ordinary local training, per training example (issue 4).

Everything runs in this process on one torch thread (``torch.set_num_threads(1)``) with
``OMP_NUM_THREADS=1`` (unless already set), as the demo's silo agents do (``threads = 1``; ``fedsilo
demo`` starts them with ``OMP_NUM_THREADS=1``), on the demo's network and data:

* model: ``build_model(ModelConfig.from_mapping(DEMO_MODEL))`` passed through
  ``make_private_compatible`` (the default UNet passes unchanged), so both kinds of training run the
  very same network; every call starts from a fresh copy of the same initial weights;
* data: silo 0's training split of the built-in data, ``silo_splits(SyntheticConfig(seed=0), 0)``
  (48 images of 64 x 64 by default).

Configurations, each timed per call (one call = one federated round of local training):

* ``ordinary``: ``train_local`` with the demo's ``TrainConfig`` (``DEMO_TRAINING``: Adam, batch 8,
  one epoch: 6 steps, 48 examples);
* ``DP-SGD, demo``: ``train_local_dp`` with ``DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0,
  sample_rate=0.25, steps=12)``, the demo's privacy plan (q = 0.25: about 12 of 48 examples per
  Poisson batch); Opacus per-sample gradients (``GradSampleModule`` hooks), per-example clipping,
  Gaussian noise in Opacus' ``secure_mode``, then the same Adam step;
* ``DP-SGD, batch 8``: the same at the ordinary batch size, q = 8 / n, with as many steps as make
  the same expected number of examples as the demo row (per-step costs, e.g. the noise, are spread
  over fewer examples: this row shows the batch-size effect);
* ``silo-level update noise``: ``privatize_update`` (joint L2 clip + Gaussian noise from the OS
  CSPRNG, numpy) on the shared update of the model (every parameter, float32: the weight delta of
  an ordinary round), timed per call and compared with one round of ordinary training.

Per-example time = CPU seconds of the call (``time.process_time``; the wall clock is shown next to
it) / ``TrainResult.examples`` (for DP-SGD: the examples actually sampled, summed over steps). One
``--warmup`` repeat (default 1) runs first and is not counted; then each of ``--repeats`` repeats
(default 5) runs ordinary, DP-SGD demo, ordinary, DP-SGD batch 8, ordinary and the update-noise
calls, interleaved so that drifting machine load hits all of them alike, every DP-SGD call between
two ordinary ones. The table shows medians and their ratios, all from this one run; the line below
it adds the best-of ratio and the per-repeat ratios (each DP-SGD call over the two ordinary calls
around it), which show how much the machine's load moved the numbers. DP-SGD runs are seeded
(``noise_seed`` = the repeat), so the Poisson batch sizes are the same from run to run; production
draws the seed from the OS instead, which costs the same (the same torch generator and
``secure_mode`` either way).

After the table, a per-phase profile (CPU time) of one DP-SGD step at the demo's expected batch
size (forward, backward with Opacus' per-sample gradients split by layer type, clipping, noise,
optimiser step), next to an ordinary step of the same batch, shows where the overhead goes; it times
Opacus' per-layer grad samplers by wrapping them for the duration of the profile only
(``--no-breakdown`` skips it).

Usage::

    .venv/bin/python benchmarks/dp_overhead.py [--repeats 5] [--warmup 1] [--quick] [--no-breakdown]
                                                [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# As the demo's agents: `fedsilo demo` starts them with OMP_NUM_THREADS=1 (read at import by numpy's OpenBLAS,
# which privatize_update's norm uses, and by torch) and `threads = 1` (torch.set_num_threads in main).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import round_overhead as ro  # noqa: E402  (machine_line)

TARGET_RATIO = 2.0  # DP-SGD seconds per example / ordinary seconds per example (issue 4)
DEMO_NOISE_MULTIPLIER = 1.0
DEMO_MAX_GRAD_NORM = 1.0
DEMO_SAMPLE_RATE = 0.25  # DEMO_PRIVACY["sample_rate"]
DEMO_STEPS = 12  # DEMO_PRIVACY["steps_per_round"]
UPDATE_NOISE_CALLS = 5  # privatize_update calls per repeat (each is timed on its own)
ORDINARY_CALLS = 3  # train_local calls per repeat: before, between and after the two DP-SGD calls


@dataclass
class Row:
    key: str
    label: str
    kind: str  # "train" (per example) or "update" (per call)
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def add(self, clock: Clock, examples: int = 0, steps: int = 0) -> None:
        self.wall_s.append(clock.wall)
        self.cpu_s.append(clock.cpu)
        self.examples.append(examples)
        self.steps.append(steps)

    def per_example(self, cpu: bool) -> list[float]:
        return [s / e for s, e in zip(self.cpu_s if cpu else self.wall_s, self.examples, strict=True) if e > 0]

    def examples_per_step(self) -> float:
        return sum(self.examples) / sum(self.steps) if sum(self.steps) else float("nan")


class Clock:
    """Wall-clock and CPU time (``time.process_time``: this process, all threads) of a ``with`` block.

    With one torch thread, CPU time is what the work itself costs: it leaves out time the process waited
    for a core. It does not leave out slowdowns while it ran (shared caches, a VM's stolen vCPU time), so
    on a busy virtual machine it can move about as much as the wall clock.
    """

    wall: float = 0.0
    cpu: float = 0.0

    def __enter__(self) -> Clock:
        self._w0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w0
        self.cpu = time.process_time() - self._c0


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- the workload -----------------------------------------------------------------------------------
class Workload:
    """The demo's model (fresh copy per call), silo 0's training data and the configurations."""

    def __init__(self) -> None:
        from fedsilo.models.registry import ModelConfig, build_model, parameter_count
        from fedsilo.models.synthetic import SyntheticConfig, silo_splits
        from fedsilo.models.training import TrainConfig
        from fedsilo.privacy.dpsgd import DpSgdConfig, make_private_compatible
        from fedsilo.silo_agent.demo import DEMO_MODEL, DEMO_TRAINING

        built = build_model(ModelConfig.from_mapping(DEMO_MODEL))
        self.base = make_private_compatible(built)
        self.fixed_by_opacus = self.base is not built
        self.params = parameter_count(self.base)
        self.tensors = sum(1 for p in self.base.parameters() if p.requires_grad)
        self.module_types = collections.Counter(type(m).__name__ for m in self.base.modules()
                                                if any(True for _ in m.parameters(recurse=False)))
        self.data_cfg = SyntheticConfig(seed=0)
        self.train = silo_splits(self.data_cfg, 0).train
        self.n = len(self.train)
        self.train_cfg = TrainConfig.from_mapping(DEMO_TRAINING)
        self.dp_demo = DpSgdConfig(noise_multiplier=DEMO_NOISE_MULTIPLIER, max_grad_norm=DEMO_MAX_GRAD_NORM,
                                   sample_rate=DEMO_SAMPLE_RATE, steps=DEMO_STEPS)
        # The ordinary batch size as the expected Poisson batch, with as many steps as give the same
        # expected number of examples per call as the demo row.
        q_b = min(1.0, self.train_cfg.batch_size / self.n)
        steps_b = max(1, round(DEMO_SAMPLE_RATE * DEMO_STEPS / q_b))
        self.dp_batch = DpSgdConfig(noise_multiplier=DEMO_NOISE_MULTIPLIER, max_grad_norm=DEMO_MAX_GRAD_NORM,
                                    sample_rate=q_b, steps=steps_b)
        self.update: dict[str, np.ndarray] | None = None
        self.update_norm = float("nan")
        self.update_clipped = False

    def fresh_model(self) -> Any:
        return copy.deepcopy(self.base)

    def ordinary(self, rnd: int) -> tuple[Clock, int, int]:
        from fedsilo.models.training import train_local

        model = self.fresh_model()
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        with Clock() as clock:
            res = train_local(model, self.train, self.train_cfg, round_index=rnd)
        # The shared update of this round (all parameters, float32), for the update-noise row.
        self.update = {k: (v.detach() - before[k]).numpy().astype(np.float32) for k, v in model.named_parameters()}
        return clock, res.examples, res.steps

    def dp(self, cfg: Any, rnd: int) -> tuple[Clock, int, int]:
        from fedsilo.models.dp_training import train_local_dp

        model = self.fresh_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. Opacus' secure_mode notice
            with Clock() as clock:
                res = train_local_dp(model, self.train, self.train_cfg, cfg, round_index=rnd, noise_seed=rnd)
        return clock, res.examples, res.steps

    def update_noise(self) -> Clock:
        from fedsilo.privacy.update_noise import privatize_update

        assert self.update is not None
        with Clock() as clock:
            out = privatize_update(self.update, clip_norm=DEMO_MAX_GRAD_NORM, noise_multiplier=DEMO_NOISE_MULTIPLIER)
        self.update_clipped = out.clipped
        self.update_norm = out.original_norm
        return clock


def run(w: Workload, *, repeats: int, warmup: int, log: Callable[[str], None]) -> list[Row]:
    """Per repeat: ordinary, DP-SGD demo, ordinary, DP-SGD batch b, ordinary, then the update noise calls."""
    b = w.train_cfg.batch_size
    rows = [
        Row("ordinary", f"ordinary (train_local, Adam, batch {b})", "train"),
        Row("dp_demo", f"DP-SGD demo (q={w.dp_demo.sample_rate:g}, {w.dp_demo.steps} steps)", "train"),
        Row("dp_batch", f"DP-SGD batch {b} (q={b}/{w.n}, {w.dp_batch.steps} steps)", "train"),
        Row("update_noise", "silo-level update noise (privatize_update)", "update"),
    ]
    by = {r.key: r for r in rows}

    def once(rnd: int, record: bool) -> None:
        # Each DP-SGD call sits between two ordinary calls (the short ones, so they get more samples).
        calls = (("ordinary", lambda: w.ordinary(rnd)), ("dp_demo", lambda: w.dp(w.dp_demo, rnd)),
                 ("ordinary", lambda: w.ordinary(rnd)), ("dp_batch", lambda: w.dp(w.dp_batch, rnd)),
                 ("ordinary", lambda: w.ordinary(rnd)))
        for key, fn in calls:
            clock, ex, st = fn()
            if record:
                by[key].add(clock, ex, st)
        for _ in range(UPDATE_NOISE_CALLS):
            clock = w.update_noise()
            if record:
                by["update_noise"].add(clock)

    for i in range(warmup):
        t0 = time.monotonic()
        once(10_000 + i, record=False)
        log(f"warm-up {i + 1}/{warmup}: {time.monotonic() - t0:.1f} s")
    for r in range(repeats):
        t0 = time.monotonic()
        once(r, record=True)
        o, d, p = by["ordinary"], by["dp_demo"], by["dp_batch"]
        ords = ", ".join(f"{x:.3f} / {y:.3f}" for x, y in zip(o.wall_s[-ORDINARY_CALLS:], o.cpu_s[-ORDINARY_CALLS:],
                                                                strict=True))
        log(f"repeat {r + 1}/{repeats} (wall / CPU s, examples): ordinary {ords} ({o.examples[-1]} each); DP demo "
            f"{d.wall_s[-1]:.3f} / {d.cpu_s[-1]:.3f} ({d.examples[-1]}); DP batch {b} {p.wall_s[-1]:.3f} / "
            f"{p.cpu_s[-1]:.3f} ({p.examples[-1]}); {time.monotonic() - t0:.1f} s")
    return rows


# -- where the time of one step goes ----------------------------------------------------
@contextmanager
def _timed_grad_samplers(totals: dict[str, float]) -> Iterator[None]:
    """Temporarily wraps Opacus' per-layer grad samplers (and its functorch fallback) with timers."""
    import opacus.grad_sample.grad_sample_module as gsm_mod
    from opacus.grad_sample import GradSampleModule

    saved = dict(GradSampleModule.GRAD_SAMPLERS)
    saved_ft = gsm_mod.ft_compute_per_sample_gradient

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.process_time() - t0
        return timed

    for cls, fn in saved.items():
        origin = "fedsilo rule" if getattr(fn, "__module__", "").startswith("fedsilo.") else "Opacus rule"
        GradSampleModule.GRAD_SAMPLERS[cls] = wrap(f"per-sample grads {cls.__name__} ({origin})", fn)

    def ft(module: Any, *args: Any) -> Any:
        name = f"per-sample grads {type(module).__name__} (functorch fallback)"
        t0 = time.process_time()
        try:
            return saved_ft(module, *args)
        finally:
            totals[name] += time.process_time() - t0

    gsm_mod.ft_compute_per_sample_gradient = ft
    try:
        yield
    finally:
        GradSampleModule.GRAD_SAMPLERS.clear()
        GradSampleModule.GRAD_SAMPLERS.update(saved)
        gsm_mod.ft_compute_per_sample_gradient = saved_ft


def breakdown(w: Workload, *, steps: int) -> dict[str, Any]:
    """Per-phase times (ms, mean over ``steps``) of one ordinary and one DP-SGD step at batch E = q n."""
    import torch
    from monai.losses import DiceCELoss

    from fedsilo.models.training import stack_batch
    from fedsilo.privacy.dpsgd import DpSgdStep

    b = max(1, round(w.dp_demo.sample_rate * w.n))
    images, masks = stack_batch(w.train, list(range(b)), torch.device("cpu"))
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)

    plain: dict[str, float] = collections.defaultdict(float)
    model = w.fresh_model()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=w.train_cfg.lr)

    def plain_step(acc: dict[str, float]) -> None:
        opt.zero_grad(set_to_none=True)
        t0 = time.process_time()
        loss = loss_fn(model(images), masks)
        t1 = time.process_time()
        loss.backward()
        t2 = time.process_time()
        opt.step()
        t3 = time.process_time()
        acc["forward + loss"] += t1 - t0
        acc["backward"] += t2 - t1
        acc["optimiser step (Adam)"] += t3 - t2

    for _ in range(2):
        plain_step(collections.defaultdict(float))
    for _ in range(steps):
        plain_step(plain)

    dp: dict[str, float] = collections.defaultdict(float)
    samplers: dict[str, float] = collections.defaultdict(float)
    model = w.fresh_model()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=w.train_cfg.lr)

    def attach() -> Any:
        return DpSgdStep(model, opt, max_grad_norm=w.dp_demo.max_grad_norm,
                         noise_multiplier=w.dp_demo.noise_multiplier, expected_batch_size=b)

    attach_s = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):  # per call of train_local_dp: validate the model, attach hooks, wrap Adam; detach
            t0 = time.process_time()
            attach().close()
            attach_s.append(time.process_time() - t0)
    with warnings.catch_warnings(), attach() as stepper:
        warnings.simplefilter("ignore")
        gsm, dpo = stepper._gsm, stepper._dp_optimizer  # Opacus internals, for the split only

        def dp_step(acc: dict[str, float]) -> None:
            dpo.zero_grad(set_to_none=True)
            t0 = time.process_time()
            loss = loss_fn(gsm(images), masks)
            t1 = time.process_time()
            loss.backward()
            t2 = time.process_time()
            dpo.clip_and_accumulate()
            t3 = time.process_time()
            dpo.add_noise()
            t4 = time.process_time()
            dpo.scale_grad()
            dpo.original_optimizer.step()
            t5 = time.process_time()
            acc["forward + loss (activation hooks)"] += t1 - t0
            acc["backward (incl. per-sample grads)"] += t2 - t1
            acc["per-example clip + sum"] += t3 - t2
            acc["noise (secure_mode: 4 normals per value)"] += t4 - t3
            acc["scale + optimiser step (Adam)"] += t5 - t4

        for _ in range(2):
            dp_step(collections.defaultdict(float))
        with _timed_grad_samplers(samplers):
            for _ in range(steps):
                dp_step(dp)
    ms = {k: v / steps * 1e3 for k, v in plain.items()}
    dms = {k: v / steps * 1e3 for k, v in dp.items()}
    sms = {k: v / steps * 1e3 for k, v in sorted(samplers.items(), key=lambda kv: -kv[1])}
    return {"batch": b, "steps": steps, "ordinary_ms": ms, "dp_ms": dms, "per_sample_grads_ms": sms,
            "attach_detach_ms": med(attach_s) * 1e3,
            "backward_hook_overhead_ms": dms["backward (incl. per-sample grads)"] - ms["backward"] - sum(sms.values())}


# -- report ---------------------------------------------------------------------------------------
def _paired(r: Row, ordinary: Row, cpu: bool, offset: int) -> list[float]:
    """Per repeat: this row's s/example over the mean s/example of the two ordinary calls around it."""
    o = ordinary.per_example(cpu)
    n = ORDINARY_CALLS
    return [x / ((o[n * i + offset] + o[n * i + offset + 1]) / 2) for i, x in enumerate(r.per_example(cpu))]


def render(rows: list[Row], w: Workload, console: Any) -> dict[str, Any]:
    """Prints the table; returns the numbers (CPU time unless named wall)."""
    from rich.table import Table

    by = {r.key: r for r in rows}
    o = by["ordinary"]
    base_cpu, base_wall = med(o.per_example(True)), med(o.per_example(False))
    round_cpu, round_wall = med(o.cpu_s), med(o.wall_s)
    t = Table(title=f"DP-SGD cost per example: demo UNet ({w.params:,} params), n_train = {w.n}, 1 torch thread; "
                    f"medians of {len(by['dp_demo'].cpu_s)} repeats, CPU time")
    for c, j in [("configuration", "left"), ("examples/step", "right"), ("s per example", "right"),
                 ("ratio vs ordinary", "right"), ("wall s per example\n(ratio)", "right"),
                 ("s per call\nmedian (min-max)", "right")]:
        t.add_column(c, justify=j)
    out: dict[str, Any] = {}
    for r in rows:
        calls = f"{med(r.cpu_s):.3f} ({min(r.cpu_s):.3f}-{max(r.cpu_s):.3f})"
        if r.kind == "train":
            pe, pe_wall = med(r.per_example(True)), med(r.per_example(False))
            ratio, ratio_wall = pe / base_cpu, pe_wall / base_wall
            eps = r.examples_per_step()
            t.add_row(r.label, f"{eps:.1f}", f"{pe:.5f}", f"{ratio:.2f}×", f"{pe_wall:.5f} ({ratio_wall:.2f}×)",
                      calls)
            out[r.key] = {"label": r.label, "examples_per_step": eps, "s_per_example": pe, "ratio": ratio,
                          "wall_s_per_example": pe_wall, "wall_ratio": ratio_wall, "cpu_s": r.cpu_s,
                          "wall_s": r.wall_s, "examples": r.examples, "steps": r.steps}
            if r.key != "ordinary":
                out[r.key]["best_of_ratio"] = min(r.per_example(True)) / min(o.per_example(True))
                offset = 0 if r.key == "dp_demo" else 1
                out[r.key]["paired_ratios"] = _paired(r, o, True, offset)
                out[r.key]["paired_wall_ratios"] = _paired(r, o, False, offset)
        else:
            call, call_wall = med(r.cpu_s), med(r.wall_s)
            ratio, ratio_wall = call / round_cpu, call_wall / round_wall
            t.add_row(r.label, "-", f"{call * 1e3:.2f} ms per call", f"{ratio:.3f}× of an ordinary round",
                      f"{call_wall * 1e3:.2f} ms ({ratio_wall:.3f}×)",
                      f"{call:.4f} ({min(r.cpu_s):.4f}-{max(r.cpu_s):.4f})")
            out[r.key] = {"label": r.label, "s_per_call": call, "ratio_vs_ordinary_round": ratio,
                          "wall_s_per_call": call_wall, "wall_ratio_vs_ordinary_round": ratio_wall,
                          "cpu_s": r.cpu_s, "wall_s": r.wall_s, "update_norm": w.update_norm,
                          "clipped": w.update_clipped, "ordinary_round_s": round_cpu}
    console.print(t)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=None,
                        help="measured repeats (default 5); each: 3 ordinary calls, one of each DP-SGD row, 5 "
                             "update-noise calls")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up repeats, not counted (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats (unless --repeats is given)")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                        help="skip the per-phase profile of one DP-SGD step (forward, backward with per-layer-type "
                             "per-sample gradient times, clipping, noise, optimiser) printed after the table")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1, --warmup >= 0")

    import torch

    torch.set_num_threads(1)  # as the demo's agents (threads = 1)
    import monai
    import opacus
    report = ro.open_report(width=160)
    console, log, cmd = report.console, report.log, report.cmd
    software = (f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} intra-op "
                f"thread), opacus {opacus.__version__}, monai {monai.__version__}, numpy {np.__version__}; "
                f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    log(f"software: {software}")
    t_start = time.monotonic()
    w = Workload()
    layers = ", ".join(f"{n} {k}" for k, n in sorted(w.module_types.items()))
    log(f"model: demo UNet {w.params:,} trainable parameters in {w.tensors} tensors ({layers}); "
        f"make_private_compatible: {'fixed copy' if w.fixed_by_opacus else 'unchanged'}")
    log(f"data: silo_splits(SyntheticConfig(seed=0), 0).train: n_train = {w.n} images of {w.data_cfg.image_size}x"
        f"{w.data_cfg.image_size}; ordinary: {w.train_cfg}; DP-SGD demo: {w.dp_demo}; DP-SGD batch "
        f"{w.train_cfg.batch_size}: {w.dp_batch}")
    log(f"{args.warmup} warm-up + {repeats} measured repeats; each runs ordinary, DP-SGD demo, ordinary, DP-SGD "
        f"batch {w.train_cfg.batch_size}, ordinary (each DP-SGD call between two ordinary ones), then "
        f"{UPDATE_NOISE_CALLS} update-noise calls")
    try:
        rows = run(w, repeats=repeats, warmup=args.warmup, log=log)
        prof = breakdown(w, steps=5 if args.quick else 15) if args.breakdown else None
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    console.print()
    results = render(rows, w, console)
    dp, un = results["dp_demo"], results["update_noise"]
    ratio = dp["ratio"]
    verdict = "met" if ratio <= TARGET_RATIO else "missed"
    log(f"DP-SGD overhead per example: {ratio:.2f}× (target ≤ {TARGET_RATIO:g}×: {verdict})")
    log(f"(ratio of CPU-time medians; wall clock {dp['wall_ratio']:.2f}×; best of the repeats over best "
        f"{dp['best_of_ratio']:.2f}×; per repeat, DP-SGD demo over the mean of the two ordinary calls around it: CPU "
        f"{', '.join(f'{x:.2f}' for x in dp['paired_ratios'])}; wall "
        f"{', '.join(f'{x:.2f}' for x in dp['paired_wall_ratios'])})")
    log(f"at the ordinary batch size ({w.train_cfg.batch_size}): {results['dp_batch']['ratio']:.2f}×; silo-level "
        f"update noise: {un['s_per_call'] * 1e3:.2f} ms per call = {un['ratio_vs_ordinary_round']:.3f}× of one "
        f"ordinary round ({un['ordinary_round_s']:.3f} s CPU; update norm {w.update_norm:.3g}, "
        f"{'clipped' if w.update_clipped else 'not clipped'} at C = {DEMO_MAX_GRAD_NORM:g}; {UPDATE_NOISE_CALLS} calls "
        f"per repeat)")
    if prof is not None:
        log(f"breakdown of one step at batch {prof['batch']} (E = q n), CPU ms, mean of {prof['steps']} steps:")
        log("  ordinary: " + ", ".join(f"{k} {v:.1f}" for k, v in prof["ordinary_ms"].items())
            + f"; total {sum(prof['ordinary_ms'].values()):.1f}")
        log("  DP-SGD:   " + ", ".join(f"{k} {v:.1f}" for k, v in prof["dp_ms"].items())
            + f"; total {sum(prof['dp_ms'].values()):.1f}")
        log("  per-sample gradients inside the backward: " + ", ".join(
            f"{k} {v:.1f}" for k, v in prof["per_sample_grads_ms"].items())
            + f"; rest of the backward beyond the ordinary one (hooks, bookkeeping) "
              f"{prof['backward_hook_overhead_ms']:.1f}")
        log(f"  once per call of train_local_dp: attach + detach Opacus (DpSgdStep: validate, hooks, DPOptimizer) "
            f"{prof['attach_detach_ms']:.1f}")
    log("definitions: s per example = CPU seconds of the call (time.process_time; wall clock in its own column) / "
        "TrainResult.examples (DP-SGD: the Poisson-sampled examples, "
        "summed over steps; fixed per-call costs such as attaching Opacus are included); examples/step = examples / "
        "steps over all repeats; update noise = privatize_update(shared update, C=1, σ=1, OS CSPRNG) per call, "
        "compared with one ordinary round (median train_local call); ratios = ratio of the medians")
    wall = time.monotonic() - t_start
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    log(f"total wall time {wall:.1f} s (after imports); load average at the end {load} (other work on this machine "
        f"inflates the timings; the ratios come from interleaved calls of this one run)")
    if args.json is not None:
        doc = {
            "command": cmd, "machine": ro.machine_line(), "software": software, "torch": torch.__version__,
            "opacus": opacus.__version__, "threads": torch.get_num_threads(), "params": w.params, "n_train": w.n,
            "repeats": repeats, "warmup": args.warmup, "time": "cpu (process_time)",
            "train_config": w.train_cfg.to_mapping(),
            "dp_demo": asdict(w.dp_demo), "dp_batch": asdict(w.dp_batch), "results": results,
            "dp_overhead_per_example": ratio, "target": TARGET_RATIO, "target_met": ratio <= TARGET_RATIO,
            "breakdown": prof, "wall_s": wall,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
