"""What the reference runs share: each silo's data as its agent loads it, and per-round evaluation as the agents report it."""

from __future__ import annotations

from collections.abc import Sequence
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


def round_record(rnd: int, models: Sequence[torch.nn.Module], silos: Sequence[Silo]) -> dict[str, Any]:
    """One round's entry of a bench cell: silo i's model ``models[i]`` on its test and validation
    data, and every model on the unseen domain (their mean), with no bytes on the wire."""
    rec: dict[str, Any] = {"round": rnd, "bytes_up": 0, "bytes_down": 0, "dice": {}, "hd95": {}, "val_dice": {},
                           "unseen_dice": None}
    unseen = []
    for model, silo in zip(models, silos, strict=True):
        if len(silo.data.splits.test):  # type: ignore[arg-type]
            res = evaluate(model, silo.data.splits.test)
            rec["dice"][silo.name], rec["hd95"][silo.name] = res.dice, res.hd95
        if len(silo.data.splits.val):  # type: ignore[arg-type]
            rec["val_dice"][silo.name] = evaluate(model, silo.data.splits.val).dice
        if silo.data.unseen is not None:
            unseen.append(evaluate(model, silo.data.unseen).dice)
    if unseen:
        rec["unseen_dice"] = sum(unseen) / len(unseen)
    return rec


__all__ = ["Silo", "load_silos", "round_record"]
