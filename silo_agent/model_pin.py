"""The run's model as every silo builds it, and the study's pin of it: fingerprint and shared-tensor manifest."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsilo.coordinator.config import FederationConfig, parse_tables
from fedsilo.core.rng import seeded_global_rng
from fedsilo.core.tensors import Manifest
from fedsilo.models import model_fingerprint
from fedsilo.models.tasks import Task, get_task
from fedsilo.silo_agent.methods import strategy_for
from fedsilo.silo_agent.strategy import Strategy


class ModelSettingsError(ValueError):
    """The run's Task or ``[model]`` settings are invalid for this fedsilo; the message names the bad value."""


@dataclass(frozen=True, kw_only=True)
class RunModel:
    """The network a silo trains in a run, and what identifies it to the coordinator.

    Attributes:
        model: the Task's network, wrapped by the method (e.g. LoRA over a frozen base), made
            DP-SGD compatible under a record-level plan; freshly initialised.
        task: the run's Task.
        strategy: the run's method, agent side.
        fingerprint: ``fedsilo.models.model_fingerprint`` of ``model`` (``run.model_fingerprint``).
        shared: the state_dict entries the method shares, in state_dict order.
        manifest: their layout (names, dtypes, shapes); ``manifest.digest()`` is ``run.shared_tensors_sha256``.
    """

    model: torch.nn.Module
    task: Task
    strategy: Strategy
    fingerprint: str
    shared: tuple[str, ...]
    manifest: Manifest

    def pin_lines(self) -> str:
        """The two ``[run]`` lines of ``federation.toml`` that pin this model."""
        return (f'model_fingerprint = "{self.fingerprint}"\n'
                f'shared_tensors_sha256 = "{self.manifest.digest()}"\n')


def build_run_model(*, task: str, model_config: Mapping[str, Any], strategy: str,
                    tables: Mapping[str, Mapping[str, Any]], record_level: bool,
                    base_checkpoint: Path | None) -> RunModel:
    """Builds the run's model exactly as every silo agent does, with its fingerprint and shared manifest.

    The one rule for a run's model: the Task from the registry parses ``model_config`` and builds the
    network (under the process-wide RNG lock), the method's strategy wraps it (with the base checkpoint
    for LoRA methods), a record-level DP plan makes it DP-SGD compatible, and the shared tensors are the
    strategy's ``shared_names`` of the result.

    Args:
        task: the run's Task name.
        model_config: the run's ``[model]`` table, as GetRun hands it to silos.
        strategy: the run's method name.
        tables: the method's parsed config tables.
        record_level: whether the run's privacy plan is record-level (DP-SGD).
        base_checkpoint: the frozen base of a LoRA run (the silo's ``model.base_checkpoint``), or None.

    Raises:
        ModelSettingsError: an unknown Task or ``[model]`` settings the Task refuses.
        StrategyError: the method cannot build its model (e.g. an unreadable base checkpoint).
    """
    try:
        the_task = get_task(task)
        model_cfg = the_task.model_config(model_config)
    except ValueError as exc:
        raise ModelSettingsError(str(exc)) from None
    the_strategy = strategy_for(strategy, dict(tables))
    with seeded_global_rng(None):  # one silo at a time: a Task that reseeds torch's RNG stays deterministic
        built = the_task.build_model(model_cfg)
    model = the_strategy.wrap_model(built, model_cfg=model_cfg, base_checkpoint=base_checkpoint)
    if record_level:
        from fedsilo.privacy.dpsgd import make_private_compatible

        model = make_private_compatible(model)  # deterministic, so every silo builds the same model
    shared = the_strategy.shared_names(model)
    sd = model.state_dict()
    manifest = Manifest.of_arrays({k: sd[k].detach().numpy() for k in shared})
    return RunModel(model=model, task=the_task, strategy=the_strategy, fingerprint=model_fingerprint(model),
                    shared=tuple(shared), manifest=manifest)


def run_model_of_config(cfg: FederationConfig, *, base_checkpoint: Path | None = None) -> RunModel:
    """The model silos build for the run of ``federation.toml`` ``cfg``, from what GetRun hands them:
    the ``[model]`` table and the method's tables through JSON, the tables parsed again by the method's
    parsers (as the agent's wire module does), and the privacy plan's level.

    Raises:
        ModelSettingsError, StrategyError: as :func:`build_run_model`.
    """
    tables = json.loads(json.dumps({name: dict(table) for name, table in cfg.tables.items()}))
    return build_run_model(task=cfg.task, model_config=json.loads(json.dumps(dict(cfg.model))),
                           strategy=cfg.strategy, tables=parse_tables(cfg.method, tables),
                           record_level=cfg.privacy is not None and bool(cfg.privacy.record_level),
                           base_checkpoint=base_checkpoint)
