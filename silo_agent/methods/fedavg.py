"""FedAvg (McMahan et al., AISTATS 2017): every parameter is shared and averaged, weighted by examples."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsilo.core.methods import BenchDefaults, register_method
from fedsilo.silo_agent.presets import DEMO_PRIVACY
from fedsilo.silo_agent.strategy import Strategy

if TYPE_CHECKING:
    import torch


@register_method
class FedAvg(Strategy):
    """Shares everything."""

    name = "fedavg"
    summary = "every parameter averaged, weighted by training examples (McMahan et al. 2017)"
    order = 10
    bench = BenchDefaults(note="every parameter averaged (McMahan et al. 2017)", privacy=DEMO_PRIVACY)

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return True
