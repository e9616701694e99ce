"""What the reference runs share: each silo's data as its agent loads it, and per-round evaluation as the agents report it."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsilo.silo_agent.config import AgentConfig
from fedsilo.silo_agent.daemon import SiloData, load_data

if TYPE_CHECKING:
    import torch

    from fedsilo.models.tasks import Task


@dataclass(frozen=True, kw_only=True)
class Silo:
    """One silo of a reference run: its name and its data, loaded exactly as its agent would."""

    name: str
    data: SiloData


def load_silos(agents: Sequence[AgentConfig], names: Sequence[str], task: Task) -> list[Silo]:
    """Each silo's data from its agent config, read by ``task`` (the same loader, seed and split as a federated run)."""
    return [Silo(name=n, data=load_data(cfg.data, task)) for n, cfg in zip(names, agents, strict=True)]


def round_entry(rnd: int, metrics: Mapping[str, Mapping[str, tuple[float, int]]], *, task: Task,
                bytes_up: int = 0, bytes_down: int = 0) -> dict[str, Any]:
    """One round's entry of a bench cell from each silo's metrics as an agent reports them.

    Args:
        rnd: The round (1-based).
        metrics: Per silo, report name -> (value, examples), as
            :meth:`~fedsilo.models.tasks.Task.evaluate_split` names them (``dice``, ``val_dice``,
            ``unseen_dice``, ...); other names (``train_loss``, ...) are ignored.
        task: The run's Task.
        bytes_up: Bytes the silos sent in the round.
        bytes_down: Bytes the silos received in the round.

    Returns:
        ``{"round", "bytes_up", "bytes_down", "metrics": {name: {silo: value}}, "unseen":
        {metric: value}, "details": {name: {silo: value}}}``: ``metrics`` holds every test metric
        and ``val_<headline>`` (empty where no silo reported it); ``unseen`` each unseen metric's
        mean over the silos that report it; ``details`` every test detail metric
        (:meth:`~fedsilo.models.tasks.Task.is_detail`, e.g. ``f1_class_3``) under the silos that
        report it (see :mod:`fedsilo.silo_agent.bench.cells`).
    """
    names = (*task.metric_names, f"val_{task.headline_metric}")
    rec: dict[str, Any] = {"round": rnd, "bytes_up": bytes_up, "bytes_down": bytes_down,
                           "metrics": {name: {} for name in names}, "unseen": {}, "details": {}}
    unseen: dict[str, list[float]] = {}
    for silo, m in metrics.items():
        for name in names:
            if name in m:
                rec["metrics"][name][silo] = m[name][0]
        for name, (value, _) in m.items():
            if not name.startswith("unseen_") and task.is_detail(name):
                rec["details"].setdefault(name, {})[silo] = value
        for name in task.metric_names:
            if f"unseen_{name}" in m:
                unseen.setdefault(name, []).append(m[f"unseen_{name}"][0])
    rec["unseen"] = {name: sum(values) / len(values) for name, values in unseen.items()}
    return rec


def round_record(rnd: int, models: Sequence[torch.nn.Module], silos: Sequence[Silo], task: Task) -> dict[str, Any]:
    """One round's entry of a bench cell: silo i's model ``models[i]`` scored by ``task`` on its test
    and validation data, and every model on the unseen domain, reported as an agent would, with no
    bytes on the wire."""
    metrics: dict[str, dict[str, tuple[float, int]]] = {}
    for model, silo in zip(models, silos, strict=True):
        m = metrics[silo.name] = {}
        m.update(task.evaluate_split(model, silo.data.splits.test, "test"))
        m.update(task.evaluate_split(model, silo.data.splits.val, "val"))
        m.update(task.evaluate_split(model, silo.data.unseen, "unseen"))
    return round_entry(rnd, metrics, task=task)


def run_pools(silos: Sequence[Silo], pools: Sequence[Hashable], *, task: Task, model_cfg: Mapping[str, Any] | Any,
              train_cfg: Any, rounds: int, on_round: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """The reference runs' one loop: one model per pool of silos, trained on the pool's training data.

    Silo i belongs to pool ``pools[i]``; each pool's model starts from the federated runs'
    initialisation (``task.build_model(model_cfg)``), trains ``train_cfg.local_epochs`` epochs per
    "round" with the agents' ``train_local`` on its one silo's training set or on the concatenation
    of its silos' (same (seed, round) shuffling), and every silo is scored with its pool's model each
    round, as an agent would report (bytes 0). Local training is one pool per silo, centralised
    training one pool of all, one-for-one a pool per group.

    Returns:
        The cell's ``rounds_log``.
    """
    from torch.utils.data import ConcatDataset

    from fedsilo.models import train_local

    if len(pools) != len(silos):
        raise ValueError(f"pools names {len(pools)} pools for {len(silos)} silos")
    members: dict[Hashable, list[Silo]] = {}
    for silo, pool in zip(silos, pools, strict=True):
        members.setdefault(pool, []).append(silo)
    models = {pool: task.build_model(model_cfg) for pool in members}
    data = {pool: ss[0].data.splits.train if len(ss) == 1 else ConcatDataset([s.data.splits.train for s in ss])
            for pool, ss in members.items()}
    log = []
    for rnd in range(1, rounds + 1):
        for pool, model in models.items():
            train_local(model, data[pool], train_cfg, round_index=rnd, task=task)
        log.append(round_record(rnd, [models[p] for p in pools], silos, task))
        if on_round is not None:
            on_round(rnd)
    return log


__all__ = ["Silo", "load_silos", "round_entry", "round_record", "run_pools"]
