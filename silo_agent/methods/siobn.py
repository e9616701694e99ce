"""SiloBN (Andreux et al., 2020): normalisation layers' affine parameters shared, their running statistics local."""

from __future__ import annotations

import torch

from fedsilo.models import local_parameter_names
from fedsilo.silo_agent.strategies.base import Strategy


class SioBN(Strategy):
    """Shares every parameter, normalisation layers' affine weight and bias included, and keeps the
    normalisation layers' running statistics (running mean, variance and batch count) local: each
    silo normalises with its own scanner's statistics but learns one shared scale and shift.
    (Networks whose norms keep no running statistics, e.g. fedsilo's InstanceNorm/GroupNorm UNet,
    have nothing local under SioBN: it is FedAvg there.)"""

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        buffers = {n for n, _ in model.named_buffers()}
        return not (name in buffers and name in local_parameter_names(model))
