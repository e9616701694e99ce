"""The training cases the data-parallel equality tests run both in one process and under ``torchrun`` (ddp_worker.py)."""

from __future__ import annotations

import math
from typing import Any

import torch

from fedsilo.models import ModelConfig, Optimizer, SyntheticConfig, TrainConfig, build_model, silo_splits, train_local
from fedsilo.models.dp_training import train_local_dp
from fedsilo.privacy.dpsgd import DpSgdConfig

DATA = SyntheticConfig(image_size=32, n_train=11, n_val=0, n_test=0)
NET = ModelConfig(channels=(4, 8, 16), strides=(2, 2))
# batch 5 of 11 examples: shares of 3 and 2, and a last batch of 1 leaves rank 1 nothing. SGD:
# its step is linear in the gradient, so sums in another order move weights by rounding only.
# Adam divides by the gradient's running RMS, so a parameter whose gradient is zero up to
# rounding (a conv bias ahead of InstanceNorm, which removes it) steps ±lr either way in each
# run; the ``adam`` case is compared by the network's outputs, which such a bias cannot change.
TRAIN = TrainConfig(batch_size=5, local_epochs=2, lr=5e-2, seed=3, optimizer=Optimizer.SGD)
TRAIN_ADAM = TrainConfig(batch_size=5, local_epochs=2, lr=1e-2, seed=3)
TRAIN_PROX = TrainConfig(batch_size=4, local_epochs=1, lr=5e-2, seed=4, proximal_mu=0.5, optimizer=Optimizer.SGD)
DP_EXACT = DpSgdConfig(noise_multiplier=0.0, max_grad_norm=math.inf, sample_rate=0.5, steps=4)
DP_NOISY = DpSgdConfig(noise_multiplier=1.1, max_grad_norm=0.5, sample_rate=0.4, steps=4)

MODES = ("plain", "adam", "prox", "dp-exact", "dp-noisy")


def run_case(mode: str, *, parallel: Any = None) -> tuple[dict[str, torch.Tensor], Any]:
    """Trains a fresh model for case ``mode`` (one of :data:`MODES`); returns its state_dict and the TrainResult."""
    train = silo_splits(DATA, 0).train
    model = build_model(NET)
    if mode == "plain":
        result = train_local(model, train, TRAIN, round_index=2, parallel=parallel)
    elif mode == "adam":
        result = train_local(model, train, TRAIN_ADAM, round_index=2, parallel=parallel)
    elif mode == "prox":
        result = train_local(model, train, TRAIN_PROX, round_index=1, parallel=parallel)
    elif mode in ("dp-exact", "dp-noisy"):
        dp = DP_EXACT if mode == "dp-exact" else DP_NOISY
        result = train_local_dp(model, train, TRAIN, dp, round_index=2, noise_seed=11, parallel=parallel)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, result


def outputs(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of the cases' network with weights ``state`` on a fixed batch of built-in images."""
    model = build_model(NET)
    model.load_state_dict(state)
    model.eval()
    images = silo_splits(SyntheticConfig(image_size=32, n_train=4, n_val=0, n_test=0), 1).train.images
    with torch.no_grad():
        return model(images)
