"""FedAvg (McMahan et al., 2017): every parameter is shared."""

from __future__ import annotations

import torch

from fedsilo.silo_agent.strategies.base import Strategy


class FedAvg(Strategy):
    """Shares everything."""

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return True
