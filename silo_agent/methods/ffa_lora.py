"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at its shared initialisation; only B trained and shared."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsilo.core.methods import register_method
from fedsilo.core.phases import SharePhase
from fedsilo.silo_agent.methods.fedavg_lora import LoraMethod, is_lora_b

if TYPE_CHECKING:
    import torch


@register_method
class FfaLora(LoraMethod):
    """FFA-LoRA: A stays frozen at its shared initialisation; only B is trained and shared, so the
    aggregate is exact and the noise is not amplified by a trained A."""

    name = "ffa-lora"
    summary = "LoRA adapters; A frozen at its shared initialisation, only B trained and shared (Sun et al. 2024)"
    order = 110

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return is_lora_b(name)

    def trains(self, name: str, phase: SharePhase) -> bool:
        return is_lora_b(name)
