"""FedBN (Li et al., ICLR 2021): normalisation layers stay local, everything else is shared."""

from __future__ import annotations

import torch

from fedsilo.models import local_parameter_names
from fedsilo.silo_agent.strategies.base import Strategy


class FedBN(Strategy):
    """Keeps every normalisation-layer parameter and buffer local."""

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return name not in local_parameter_names(model)
