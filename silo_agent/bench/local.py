"""Local-only training (a bench reference): each silo trains its own model on its own data and shares nothing."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedsilo.silo_agent.bench.reference import Silo, run_pools

if TYPE_CHECKING:
    from fedsilo.models import TrainConfig
    from fedsilo.models.tasks import Task


def run_local(silos: Sequence[Silo], *, task: Task, model_cfg: Mapping[str, Any] | Any, train_cfg: TrainConfig,
              rounds: int, on_round: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Trains one model per silo, ``train_cfg.local_epochs`` epochs per "round", and evaluates
    every round as an agent would; nothing leaves a silo, so every round's bytes are 0.

    Each silo starts from the same initialisation as a federated run (``task.build_model(model_cfg)``)
    and trains with the agents' ``train_local`` (the Task's batches and loss) and the same
    (seed, round) shuffling.

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
    return run_pools(silos, range(len(silos)), task=task, model_cfg=model_cfg, train_cfg=train_cfg, rounds=rounds,
                     on_round=on_round)


__all__ = ["run_local"]
