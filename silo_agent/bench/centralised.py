"""Centralised training (a bench reference): one model on the pooled training data of every silo."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch.utils.data import ConcatDataset

from fedsilo.models import TrainConfig, train_local
from fedsilo.silo_agent.bench.reference import Silo, round_record

if TYPE_CHECKING:
    from fedsilo.models.tasks import Task


def run_centralised(silos: Sequence[Silo], *, task: Task, model_cfg: Mapping[str, Any] | Any,
                    train_cfg: TrainConfig, rounds: int,
                    on_round: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Trains one model on the concatenation of all silos' training sets, ``train_cfg.local_epochs``
    epochs per "round", and evaluates it on every silo's validation and test data each round.

    This is the pooled-data reference: what training would reach if the data could be moved to
    one place, which is exactly what a federation avoids. No model travels (bytes 0); the data
    would, and that is not counted.

    Args:
        silos: The silos and their data (see :func:`~fedsilo.silo_agent.bench.reference.load_silos`).
        task: The study's Task: model, loss and metrics.
        model_cfg: The run's model table (or the Task's parsed config).
        train_cfg: The run's training settings.
        rounds: How many "rounds" to train and evaluate.
        on_round: Called with each round number when it is done.

    Returns:
        The cell's ``rounds_log``.
    """
    model = task.build_model(model_cfg)
    pooled = ConcatDataset([s.data.splits.train for s in silos])
    log = []
    for rnd in range(1, rounds + 1):
        train_local(model, pooled, train_cfg, round_index=rnd, task=task)
        log.append(round_record(rnd, [model] * len(silos), silos, task))
        if on_round is not None:
            on_round(rnd)
    return log


__all__ = ["run_centralised"]
