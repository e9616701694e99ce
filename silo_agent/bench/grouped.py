"""One-for-one training (a bench reference): one model per silo group, on the pooled training data of that group's silos."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedsilo.silo_agent.bench.reference import Silo, run_pools

if TYPE_CHECKING:
    from fedsilo.models import TrainConfig
    from fedsilo.models.tasks import Task


def silo_groups(silos: Sequence[Silo], task: Task) -> dict[str, str]:
    """Each silo's group (:meth:`~fedsilo.models.tasks.Task.group_of` of its data), by silo name.

    Raises:
        ValueError: a silo has no group (the Task has none, or not for that silo's data).
    """
    groups: dict[str, str] = {}
    for silo in silos:
        group = task.group_of(silo.data)
        if not group:
            raise ValueError(f"silo {silo.name!r} has no group: task {task.name!r} gives none for its data "
                             "(one-for-one needs a Task whose group_of names each silo's group)")
        groups[silo.name] = group
    return groups


def run_grouped(silos: Sequence[Silo], *, task: Task, model_cfg: Mapping[str, Any] | Any, train_cfg: TrainConfig,
                rounds: int, on_round: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Trains one model per silo group on the concatenated training sets of that group's silos,
    ``train_cfg.local_epochs`` epochs per "round", and scores each silo with its group's model every round.

    This is CKSP's one-for-one reference (Mao et al. 2025): each species learns alone, from all of its
    own data pooled. Every group's model starts from the same initialisation as a federated run
    (``task.build_model(model_cfg)``) and trains with the agents' ``train_local`` (the Task's batches
    and loss) and the same (seed, round) shuffling. No model travels (bytes 0); the data would, and
    that is not counted.

    Args:
        silos: The silos and their data (see :func:`~fedsilo.silo_agent.bench.reference.load_silos`).
        task: The study's Task: model, loss, metrics and the silos' groups.
        model_cfg: The run's model table (or the Task's parsed config).
        train_cfg: The run's training settings.
        rounds: How many "rounds" to train and evaluate.
        on_round: Called with each round number when it is done.

    Returns:
        The cell's ``rounds_log``.

    Raises:
        ValueError: a silo has no group (see :func:`silo_groups`).
    """
    groups = silo_groups(silos, task)
    return run_pools(silos, [groups[s.name] for s in silos], task=task, model_cfg=model_cfg, train_cfg=train_cfg,
                     rounds=rounds, on_round=on_round)


__all__ = ["run_grouped", "silo_groups"]
