"""FedBN (Li et al., ICLR 2021): normalisation layers stay local, everything else is shared."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, register_method
from fedsilo.silo_agent.presets import DEMO_PRIVACY
from fedsilo.silo_agent.strategy import Strategy

models = lazy_module("fedsilo.models")

if TYPE_CHECKING:
    import torch


@register_method
class FedBN(Strategy):
    """Keeps every normalisation-layer parameter and buffer local."""

    name = "fedbn"
    summary = "normalisation layers local, the rest averaged (Li et al. 2021)"
    order = 20
    bench = BenchDefaults(note="normalisation layers local, the rest averaged (Li et al. 2021)", privacy=DEMO_PRIVACY)

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return name not in models.local_parameter_names(model)
