"""SiloBN (Andreux et al., 2020): normalisation layers' affine parameters shared, their running statistics local."""

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
class SioBN(Strategy):
    """Shares every parameter, normalisation layers' affine weight and bias included, and keeps the
    normalisation layers' running statistics (running mean, variance and batch count) local: each
    silo normalises with its own scanner's statistics but learns one shared scale and shift.
    (Networks whose norms keep no running statistics, e.g. fedsilo's InstanceNorm/GroupNorm UNet,
    have nothing local under SioBN: it is FedAvg there.)"""

    name = "siobn"
    summary = "norm affine parameters shared, running statistics local (Andreux et al. 2020)"
    order = 30
    bench = BenchDefaults(privacy=DEMO_PRIVACY, note="norm affine parameters shared, running statistics local "
                          "(Andreux et al. 2020; fedsilo's InstanceNorm UNet has no running statistics: equals FedAvg)")

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        buffers = {n for n, _ in model.named_buffers()}
        return not (name in buffers and name in models.local_parameter_names(model))
