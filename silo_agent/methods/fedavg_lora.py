"""FedAvg-LoRA: LoRA adapters on a frozen base, both factors trained and averaged every round (the biased baseline)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsilo.core.methods import register_method
from fedsilo.core.phases import LORA_A_MARK, LORA_B_MARK
from fedsilo.silo_agent.presets import DEMO_LORA_HE_BOUND
from fedsilo.silo_agent.strategy import Strategy, StrategyError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedsilo.agent")

def is_lora_a(name: str) -> bool:
    """Whether state_dict entry ``name`` is a LoRA A factor."""
    return LORA_A_MARK in name


def is_lora_b(name: str) -> bool:
    """Whether state_dict entry ``name`` is a LoRA B factor."""
    return LORA_B_MARK in name


class LoraMethod(Strategy):
    """What the LoRA methods share alike: a frozen base (the silo's base checkpoint) with the run's
    ``[lora]`` adapters (``fedsilo.models.lora.LoraSettings``, validated by the agents)."""

    uses_lora = True
    needs_2d = "LoRA adapts nn.Conv2d and nn.Linear layers only"
    tables = {"lora": None}
    he_bound = DEMO_LORA_HE_BOUND

    def __init__(self, *, lora: Mapping[str, Any] | None = None) -> None:
        self.lora = dict(lora or {})

    @classmethod
    def for_run(cls, tables: Mapping[str, Mapping[str, Any]]) -> LoraMethod:
        return cls(lora=tables.get("lora", {}))

    def wrap_model(self, model: torch.nn.Module, *, model_cfg: Any, base_checkpoint: Path | None) -> torch.nn.Module:
        """The frozen base (this silo's base checkpoint, if configured) with the run's LoRA adapters."""
        from fedsilo.models.lora import LoraSettings, add_lora
        from fedsilo.models.pretrain import load_base_checkpoint

        if base_checkpoint is not None:
            try:
                model.load_state_dict(load_base_checkpoint(base_checkpoint, model_cfg))
            except (ValueError, OSError, RuntimeError) as exc:
                raise StrategyError(f"model.base_checkpoint {base_checkpoint}: {exc}") from None
            log.info("base model loaded from %s", base_checkpoint)
        else:
            log.warning("no model.base_checkpoint: the LoRA adapters sit on a freshly initialised base")
        try:
            settings = LoraSettings.from_mapping(self.lora)
        except ValueError as exc:
            raise StrategyError(f"the run's LoRA settings are invalid for this agent: {exc}") from None
        return add_lora(model, settings, architecture=model_cfg.architecture)


@register_method
class FedAvgLora(LoraMethod):
    """FedAvg-LoRA: both factors trained and averaged every round (biased: the mean of B·A is
    not mean(B)·mean(A); with DP, noise on one factor is amplified by the other)."""

    name = "fedavg-lora"
    summary = "LoRA adapters; A and B trained and averaged together every round (the FedAvg-LoRA baseline)"
    order = 100

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return is_lora_a(name) or is_lora_b(name)
