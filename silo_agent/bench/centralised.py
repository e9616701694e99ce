"""Centralised training (a bench reference): one model on the pooled training data of every silo."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import ConcatDataset

from fedsilo.models import ModelConfig, TrainConfig, build_model, train_local
from fedsilo.silo_agent.bench.reference import Silo, round_record


def run_centralised(silos: Sequence[Silo], *, model_cfg: ModelConfig, train_cfg: TrainConfig, rounds: int,
                    on_round: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Trains one model on the concatenation of all silos' training sets, ``train_cfg.local_epochs``
    epochs per "round", and evaluates it on every silo's validation and test data each round.

    This is the pooled-data reference: what training would reach if the images could be moved to
    one place, which is exactly what a federation avoids. No model travels (bytes 0); the data
    would, and that is not counted.

    Returns:
        The cell's ``rounds_log``.
    """
    model = build_model(model_cfg)
    pooled = ConcatDataset([s.data.splits.train for s in silos])
    log = []
    for rnd in range(1, rounds + 1):
        train_local(model, pooled, train_cfg, round_index=rnd)
        log.append(round_record(rnd, [model] * len(silos), silos))
        if on_round is not None:
            on_round(rnd)
    return log


__all__ = ["run_centralised"]
