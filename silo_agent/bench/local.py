"""Local-only training (a bench reference): each silo trains its own model on its own data and shares nothing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fedsilo.models import ModelConfig, TrainConfig, build_model, train_local
from fedsilo.silo_agent.bench.reference import Silo, round_record


def run_local(silos: Sequence[Silo], *, model_cfg: ModelConfig, train_cfg: TrainConfig, rounds: int,
              on_round: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Trains one model per silo, ``train_cfg.local_epochs`` epochs per "round", and evaluates
    every round as an agent would; nothing leaves a silo, so every round's bytes are 0.

    Each silo starts from the same initialisation as a federated run (``build_model(model_cfg)``)
    and trains with the agents' ``train_local`` and the same (seed, round) shuffling.

    Returns:
        The cell's ``rounds_log``.
    """
    models = [build_model(model_cfg) for _ in silos]
    log = []
    for rnd in range(1, rounds + 1):
        for model, silo in zip(models, silos, strict=True):
            train_local(model, silo.data.splits.train, train_cfg, round_index=rnd)
        log.append(round_record(rnd, models, silos))
        if on_round is not None:
            on_round(rnd)
    return log


__all__ = ["run_local"]
