"""FedAvg-LoRA: LoRA adapters on a frozen base, both factors trained and averaged every round (the biased baseline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsilo.core.methods import register_method
from fedsilo.core.phases import LORA_A_MARK, LORA_B_MARK
from fedsilo.silo_agent.presets import DEMO_LORA_HE_BOUND
from fedsilo.silo_agent.strategy import Strategy

if TYPE_CHECKING:
    import torch

def is_lora_a(name: str) -> bool:
    """Whether state_dict entry ``name`` is a LoRA A factor."""
    return LORA_A_MARK in name


def is_lora_b(name: str) -> bool:
    """Whether state_dict entry ``name`` is a LoRA B factor."""
    return LORA_B_MARK in name


@register_method
class FedAvgLora(Strategy):
    """FedAvg-LoRA: both factors trained and averaged every round (biased: the mean of B·A is
    not mean(B)·mean(A); with DP, noise on one factor is amplified by the other)."""

    name = "fedavg-lora"
    summary = "LoRA adapters; A and B trained and averaged together every round (the FedAvg-LoRA baseline)"
    order = 100
    uses_lora = True
    he_bound = DEMO_LORA_HE_BOUND

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return is_lora_a(name) or is_lora_b(name)
