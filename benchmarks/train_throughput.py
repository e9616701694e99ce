"""Local-training throughput per federated round, plain and under DP-SGD, for the segmentation Tasks (issue 15).

For each registered Task ``segmentation-2d`` and ``segmentation-3d`` this times one silo's local
training as a silo agent runs it in a round (``fedsilo.silo_agent.daemon``'s ``_train``):

* plain: :func:`fedsilo.models.train_local` with ``TrainConfig(batch_size=B)`` (Adam, one local
  epoch, the Task's collation and loss);
* bf16 (only with ``--modes``): plain under ``torch.autocast`` to bfloat16 (``[agent] precision =
  "bf16"``); meant for GPUs with bf16 units (on most CPUs it is slower than float32);
* DP-SGD: :func:`fedsilo.models.dp_training.train_local_dp` on the model passed through
  :func:`fedsilo.privacy.dpsgd.make_private_compatible`, with ``DpSgdConfig(noise_multiplier=1.0,
  max_grad_norm=1.0, sample_rate=B / n, steps=n / B)``: one epoch's worth of examples in expectation,
  at the plain batch size, so the two rows do the same work per round (Opacus per-sample gradients,
  per-example clipping and Gaussian noise are the difference). The noise is seeded (``noise_seed``)
  so the Poisson batch sizes are the same from run to run; production seeds from the OS, same cost.

Data and models (small built-in sizes, so the default run stays well under two minutes on one CPU
thread):

* ``segmentation-2d``: built-in domain 0, ``image_size`` 64, ``n_train`` 48 (64 x 64 images, one
  channel), the Task's default model config (MONAI 2-D UNet); batch 8 (6 steps per round);
* ``segmentation-3d``: built-in domain 0, ``size`` 32, ``n_train`` 8 (32^3 volumes, taken whole as
  patches), the Task's default ``UNet3DConfig`` (3-D UNet, channels 8/16/32, InstanceNorm); batch 2
  (4 steps per round).

Each configuration runs one warm-up round (not counted), then ``--rounds`` timed rounds, each from a
fresh copy of the same initial weights (copying is outside the timer). "items" are images for 2-D and
voxels (examples x patch voxels) for 3-D; items per round for DP-SGD are the examples actually
Poisson-sampled (``TrainResult.examples``), so items/s is comparable between the rows. The
"DP-SGD/plain" column is DP-SGD's seconds per item over plain's (how many times slower). With
``--device cuda`` every configuration also runs on the CPU in the same process and the last column is
the GPU's items/s over the CPU's. A configuration that raises (e.g. an Opacus layer without a grad
sampler) is reported as ``not supported: <reason>`` instead of stopping the run.

Usage::

    .venv/bin/python benchmarks/train_throughput.py [--device cpu|cuda|auto] [--rounds 5] [--threads 1]
                                                     [--tasks segmentation-2d,segmentation-3d] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

DP_NOISE_MULTIPLIER = 1.0
DP_MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class TaskSetup:
    name: str
    options: dict[str, Any]
    batch_size: int
    unit: str  # "images" or "voxels"
    describe: str


SETUPS = {
    "segmentation-2d": TaskSetup("segmentation-2d", {"image_size": 64, "n_train": 48, "n_val": 2, "n_test": 2},
                                 8, "images", "48 train images of 64x64, batch 8"),
    "segmentation-3d": TaskSetup("segmentation-3d", {"size": 32, "n_train": 8, "n_val": 1, "n_test": 1},
                                 2, "voxels", "8 train volumes of 32^3, batch 2"),
}


@dataclass
class Result:
    task: str
    mode: str  # "plain", "bf16" or "DP-SGD"
    device: str
    unit: str
    seconds: list[float] = field(default_factory=list)
    items: list[float] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def sec_per_round(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan

    @property
    def items_per_round(self) -> float:
        return statistics.median(self.items) if self.items else math.nan

    @property
    def items_per_s(self) -> float:
        # total items over total time of the timed rounds (DP-SGD's Poisson batches vary per round)
        return sum(self.items) / sum(self.seconds) if self.seconds and sum(self.seconds) > 0 else math.nan


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:160]}"


def run_task(setup: TaskSetup, device: Any, rounds: int, modes: list[str]) -> list[Result]:
    import torch

    from fedsilo.models import Precision, train_local
    from fedsilo.models.dp_training import train_local_dp
    from fedsilo.models.tasks import DataSpec, get_task
    from fedsilo.models.training import TrainConfig
    from fedsilo.privacy.dpsgd import DpSgdConfig, make_private_compatible

    task = get_task(setup.name)
    data = task.load_data(DataSpec(source="builtin", domain=0, seed=0, options=setup.options))
    train = data.splits.train
    n = len(train)
    first, _ = task.collate(train, [0], torch.device("cpu"))
    per_example = 1 if setup.unit == "images" else math.prod(first.shape[2:])  # voxels of one patch
    cfg = task.model_config(task.default_model_config(0))
    base = task.build_model(cfg)
    train_cfg = TrainConfig(batch_size=setup.batch_size, seed=0)
    steps = max(1, n // setup.batch_size)
    dp_cfg = DpSgdConfig(noise_multiplier=DP_NOISE_MULTIPLIER, max_grad_norm=DP_MAX_GRAD_NORM,
                         sample_rate=min(1.0, setup.batch_size / n), steps=steps)
    dev_name = str(device)
    results = []
    for mode in modes:
        res = Result(setup.name, mode, dev_name, setup.unit)
        results.append(res)
        try:
            start = make_private_compatible(copy.deepcopy(base)) if mode == "DP-SGD" else base
            for r in range(rounds + 1):  # round 0: warm-up, not counted
                model = copy.deepcopy(start)
                _sync(device)
                t0 = time.perf_counter()
                if mode == "DP-SGD":
                    out = train_local_dp(model, train, train_cfg, dp_cfg, round_index=r, noise_seed=1000 + r,
                                         task=task, device=device)
                else:
                    precision = Precision.BF16 if mode == "bf16" else Precision.FP32
                    out = train_local(model, train, train_cfg, round_index=r, task=task, device=device,
                                      precision=precision)
                _sync(device)
                dt = time.perf_counter() - t0
                if r > 0:
                    res.seconds.append(dt)
                    res.items.append(float(out.examples * per_example))
                    res.examples.append(out.examples)
        except Exception as err:  # reported in the table, the run goes on
            res.error = _reason(err)
            res.seconds.clear()
            res.items.clear()
            res.examples.clear()
    return results


def _fmt_items(x: float) -> str:
    if math.isnan(x):
        return "—"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e4:
        return f"{x / 1e3:.1f} k"
    return f"{x:g}" if x == int(x) else (f"{x:.1f}" if x < 100 else f"{x:.0f}")


def table(results: list[Result], gpu: bool) -> str:
    head = ["task", "mode", "device", "items / round", "s / round (median)", "items / s", "DP-SGD / plain"]
    if gpu:
        head.append("GPU / CPU")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    by_key = {(r.task, r.mode, r.device): r for r in results}
    for r in results:
        unit = r.unit
        if r.error is not None:
            cells = [r.task, r.mode, r.device, f"not supported: {r.error}", "—", "—", "—"]
        else:
            plain = by_key.get((r.task, "plain", r.device))
            ratio = "—"
            if r.mode == "DP-SGD" and plain is not None and plain.error is None:
                ratio = f"{plain.items_per_s / r.items_per_s:.2f}x"
            per_round = f"{_fmt_items(r.items_per_round)} {unit}"
            if unit != "images":
                per_round += f" ({statistics.median(r.examples):g} volumes)"
            cells = [r.task, r.mode, r.device, per_round, f"{r.sec_per_round:.3f}",
                     f"{_fmt_items(r.items_per_s)} {unit}/s", ratio]
        if gpu:
            speed = "—"
            if r.device != "cpu" and r.error is None:
                cpu = by_key.get((r.task, r.mode, "cpu"))
                if cpu is not None and cpu.error is None:
                    speed = f"{r.items_per_s / cpu.items_per_s:.1f}x"
            cells.append(speed)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto; a GPU also runs the CPU")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per configuration, after one warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the demo's agents)")
    ap.add_argument("--tasks", default=",".join(SETUPS), help="comma-separated Task names")
    ap.add_argument("--modes", default="plain,DP-SGD", help="comma-separated: plain, DP-SGD, bf16 (plain under bfloat16 autocast, [agent] precision)")
    ap.add_argument("--json", default=None, help="also write the raw timings here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be >= 1")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import warnings

    import torch

    from fedsilo.models.training import resolve_device

    warnings.filterwarnings("ignore")  # Opacus' secure_mode / full_backward_hook chatter
    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        ap.error(str(err))
    devices = [device] if device.type == "cpu" else [device, torch.device("cpu")]
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for name in names:
        if name not in SETUPS:
            ap.error(f"unknown task {name!r}; one of {', '.join(SETUPS)}")
    for m in modes:
        if m not in ("plain", "DP-SGD", "bf16"):
            ap.error(f"unknown mode {m!r}")
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"# local-training throughput: {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} CPU thread(s)"
          + (f", GPU {gpu_name}" if gpu_name else "") + f"; {args.rounds} timed round(s) after 1 warm-up")
    for name in names:
        print(f"#   {name}: {SETUPS[name].describe}")
    results: list[Result] = []
    t0 = time.perf_counter()
    for name in names:
        for dev in devices:
            results.extend(run_task(SETUPS[name], dev, args.rounds, modes))
    print()
    print(table(results, gpu=device.type != "cpu"))
    print()
    print("items: images (2-D) or voxels (3-D, volumes x patch voxels); DP-SGD/plain: seconds per item,"
          " DP-SGD over plain" + ("; GPU/CPU: items/s on the GPU over the CPU" if device.type != "cpu" else ""))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "results": [asdict(r) | {"items_per_s": r.items_per_s} for r in results]},
                      fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
