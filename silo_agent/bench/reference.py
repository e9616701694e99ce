"""What the reference runs share: each silo's data as its agent loads it, and per-round evaluation as the agents report it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedsilo.models import evaluate
from fedsilo.silo_agent.config import AgentConfig
from fedsilo.silo_agent.daemon import SiloData, load_data


@dataclass(frozen=True, kw_only=True)
class Silo:
    """One silo of a reference run: its name and its data, loaded exactly as its agent would."""

    name: str
    data: SiloData


def load_silos(agents: Sequence[AgentConfig], names: Sequence[str]) -> list[Silo]:
    """Each silo's data from its agent config (the same loader, seed and split as a federated run)."""
    return [Silo(name=n, data=load_data(cfg.data)) for n, cfg in zip(names, agents, strict=True)]


def round_entry(rnd: int, metrics: Mapping[str, Mapping[str, tuple[float, int]]], *, bytes_up: int = 0,
                bytes_down: int = 0) -> dict[str, Any]:
    """One round's entry of a bench cell from each silo's metrics as an agent reports them
    (name -> (value, examples): ``dice``, ``hd95``, ``val_dice``, ``unseen_dice``); the unseen Dice
    is the mean over the silos that report one."""
    rec: dict[str, Any] = {"round": rnd, "bytes_up": bytes_up, "bytes_down": bytes_down, "dice": {}, "hd95": {},
                           "val_dice": {}, "unseen_dice": None}
    unseen = []
    for silo, m in metrics.items():
        if "dice" in m:
            rec["dice"][silo], rec["hd95"][silo] = m["dice"][0], m["hd95"][0]
        if "val_dice" in m:
            rec["val_dice"][silo] = m["val_dice"][0]
        if "unseen_dice" in m:
            unseen.append(m["unseen_dice"][0])
    if unseen:
        rec["unseen_dice"] = sum(unseen) / len(unseen)
    return rec


def round_record(rnd: int, models: Sequence[torch.nn.Module], silos: Sequence[Silo]) -> dict[str, Any]:
    """One round's entry of a bench cell: silo i's model ``models[i]`` on its test and validation
    data, and every model on the unseen domain, reported as an agent would, with no bytes on the wire."""
    metrics: dict[str, dict[str, tuple[float, int]]] = {}
    for model, silo in zip(models, silos, strict=True):
        m = metrics[silo.name] = {}
        if len(silo.data.splits.test):  # type: ignore[arg-type]
            res = evaluate(model, silo.data.splits.test)
            m.update(dice=(res.dice, res.n), hd95=(res.hd95, res.n))
        if len(silo.data.splits.val):  # type: ignore[arg-type]
            res = evaluate(model, silo.data.splits.val)
            m["val_dice"] = (res.dice, res.n)
        if silo.data.unseen is not None:
            res = evaluate(model, silo.data.unseen)
            m["unseen_dice"] = (res.dice, res.n)
    return round_entry(rnd, metrics)


__all__ = ["Silo", "load_silos", "round_entry", "round_record"]
