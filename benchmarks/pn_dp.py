"""Population Normalization vs InstanceNorm and GroupNorm, with and without DP-SGD, on one silo (issue 16).

PN (Wang et al., CVPR 2025; ``fedsilo.models.pn``) normalises with trained statistics instead of
batch or instance statistics. This script trains the same small 2-D UNet with ``norm = instance``,
``group`` and ``pn`` on one silo of the built-in data, ordinarily (``train_local``) and with
record-level DP-SGD (``train_local_dp``), and scores each model on that silo's validation split
with ``fedsilo.models.evaluate`` (mean per-image Dice, HD95 in pixels).

Equal training: for each norm, the ordinary run takes ``--epochs`` epochs of ``--batch`` images;
the DP-SGD run takes steps of Poisson batches with expected size ``--batch`` (q = batch / n) and as
many steps as the ordinary run (so the same expected number of examples), noise multiplier
``--sigma``, clip norm ``--clip``. Both use the same ``TrainConfig`` (Adam, ``--lr``), the same
initial weights per norm (``build_model(seed=0)``), and seeded randomness (``noise_seed``), so a
rerun gives the same Dice. The ε of the DP-SGD run (record level, δ = 1e-5, RDP) is printed too.

Everything runs in this process on one torch thread (``OMP_NUM_THREADS=1``). Seconds are CPU
seconds of each training call (``time.process_time``: with one thread, what the work costs, less
the time spent waiting for a core on a shared machine), after one untimed warm-up call of each
kind; compare them within one run only.

Usage::

    .venv/bin/python benchmarks/pn_dp.py [--image-size 64] [--n-train 48] [--n-val 16] [--epochs 15]
                                         [--batch 8] [--lr 3e-3] [--sigma 1.0] [--clip 1.0] [--seeds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=2, help="data seeds (silo data, shuffling, noise) to average")
    parser.add_argument("--silo", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from fedsilo.models import (
        ModelConfig,
        Norm,
        SyntheticConfig,
        TrainConfig,
        build_model,
        evaluate,
        parameter_count,
        silo_splits,
        train_local,
    )
    from fedsilo.models.dp_training import train_local_dp
    from fedsilo.privacy.accounting import Mechanism, Neighbouring, RdpAccountant, Release
    from fedsilo.privacy.dpsgd import DpSgdConfig, make_private_compatible

    norms = (Norm.INSTANCE, Norm.GROUP, Norm.PN)
    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    q = min(1.0, args.batch / args.n_train)
    steps = args.epochs * -(-args.n_train // args.batch)
    dp_cfg = DpSgdConfig(noise_multiplier=args.sigma, max_grad_norm=args.clip, sample_rate=q, steps=steps)
    eps = RdpAccountant().epsilon(
        [Release(mechanism=Mechanism.SUBSAMPLED_GAUSSIAN, neighbouring=Neighbouring.RECORD,
                 noise_multiplier=args.sigma, sample_rate=q, steps=steps)], delta=1e-5).epsilon
    params: dict[str, int] = {}
    # Warm-up (not timed): the first training call of a process pays one-off costs (allocator, Opacus imports).
    warm = silo_splits(SyntheticConfig(seed=0, image_size=args.image_size, n_train=args.batch, n_val=0, n_test=0), 0)
    for norm in norms:
        model = build_model(ModelConfig(channels=(8, 16, 32), strides=(2, 2), norm=norm))
        train_local(model, warm.train, TrainConfig(batch_size=args.batch), round_index=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_local_dp(make_private_compatible(model), warm.train, TrainConfig(), DpSgdConfig(
                noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, steps=1), round_index=0, noise_seed=0)
    total0 = time.perf_counter()
    for seed in range(args.seeds):
        splits = silo_splits(SyntheticConfig(seed=seed, image_size=args.image_size, n_train=args.n_train,
                                             n_val=args.n_val, n_test=0), args.silo)
        train_cfg = TrainConfig(local_epochs=args.epochs, batch_size=args.batch, lr=args.lr, seed=seed)
        for norm in norms:
            cfg = ModelConfig(channels=(8, 16, 32), strides=(2, 2), norm=norm, seed=0)
            base = build_model(cfg)
            params[norm.value] = parameter_count(base)
            untrained = evaluate(base, splits.val).dice
            rows.setdefault((norm.value, "untrained"), []).append((untrained, float("nan"), 0.0))
            for mode in ("ordinary", "DP-SGD"):
                model = build_model(cfg)
                t0 = time.process_time()
                if mode == "ordinary":
                    train_local(model, splits.train, train_cfg, round_index=0)
                else:
                    model = make_private_compatible(model)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # Opacus' secure-mode notices
                        train_local_dp(model, splits.train, train_cfg, dp_cfg, round_index=0, noise_seed=seed)
                seconds = time.process_time() - t0
                scores = evaluate(model, splits.val)
                rows.setdefault((norm.value, mode), []).append((scores.dice, scores.hd95, seconds))
    total = time.perf_counter() - total0

    def mean(xs: list[float]) -> float:
        return statistics.fmean(xs)

    print(f"One silo ({args.silo}) of the built-in 2-D data, {args.image_size}x{args.image_size}, "
          f"{args.n_train} train / {args.n_val} val images, data seeds 0..{args.seeds - 1}; "
          f"UNet channels (8, 16, 32), Adam lr {args.lr}, one torch thread.")
    print(f"Ordinary: {args.epochs} epochs of batch {args.batch} ({steps} steps). DP-SGD: {steps} steps, "
          f"Poisson q = {q:.3f} (expected batch {args.batch}), σ = {args.sigma}, C = {args.clip}: "
          f"record-level ε = {eps:.2f} at δ = 1e-5 (RDP).")
    print()
    print("| norm | params | untrained Dice | ordinary Dice | ordinary HD95 | ordinary CPU s "
          "| DP-SGD Dice | DP-SGD HD95 | DP-SGD CPU s | DP/ordinary |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for norm in norms:
        u = rows[(norm.value, "untrained")]
        o = rows[(norm.value, "ordinary")]
        d = rows[(norm.value, "DP-SGD")]
        o_s, d_s = mean([r[2] for r in o]), mean([r[2] for r in d])
        print(f"| {norm.value} | {params[norm.value]} | {mean([r[0] for r in u]):.3f} "
              f"| {mean([r[0] for r in o]):.3f} | {mean([r[1] for r in o]):.1f} | {o_s:.1f} "
              f"| {mean([r[0] for r in d]):.3f} | {mean([r[1] for r in d]):.1f} | {d_s:.1f} | {d_s / o_s:.1f} |")
    print()
    print(f"Total {total:.0f} s wall clock. Dice and HD95 (pixels): means over the seeds of the mean per "
          "validation image.")


if __name__ == "__main__":
    main()
