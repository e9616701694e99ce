"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at its shared initialisation; only B trained and shared."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsilo.core.methods import register_method
from fedsilo.core.phases import SharePhase
from fedsilo.silo_agent.presets import DEMO_LORA_HE_BOUND
from fedsilo.silo_agent.methods.fedavg_lora import is_lora_b
from fedsilo.silo_agent.strategy import Strategy

if TYPE_CHECKING:
    import torch


@register_method
class FfaLora(Strategy):
    """FFA-LoRA: A stays frozen at its shared initialisation; only B is trained and shared, so the
    aggregate is exact and the noise is not amplified by a trained A."""

    name = "ffa-lora"
    summary = "LoRA adapters; A frozen at its shared initialisation, only B trained and shared (Sun et al. 2024)"
    order = 110
    uses_lora = True
    he_bound = DEMO_LORA_HE_BOUND

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return is_lora_b(name)

    def trains(self, name: str, phase: SharePhase) -> bool:
        return is_lora_b(name)
