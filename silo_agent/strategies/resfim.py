"""pFL-ResFIM sharing: every tensor is in the upload, each element shared or kept local by the silo's mask."""

from __future__ import annotations

import torch

from fedsilo.models import local_parameter_names
from fedsilo.silo_agent.strategies.base import Strategy
from fedsilo.silo_agent.strategies.lora import Deer


class ResFim(Strategy):
    """Puts every floating-point tensor in the run's layout (normalisation layers only if they are
    not kept local as a whole); which *elements* a silo shares each round is its ResFIM mask's
    decision (``fedsilo.models.resfim``), applied inside the encryption (``fedsilo.silo_agent.masked``).

    Args:
        local_norm_layers: keep normalisation-layer parameters and buffers local as a whole (FedBN's
            choice; the default), instead of masking them element by element.
    """

    def __init__(self, *, local_norm_layers: bool = True) -> None:
        self.local_norm_layers = local_norm_layers

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return not (self.local_norm_layers and name in local_parameter_names(model))


class DeerResFim(Deer):
    """DEeR's alternating LoRA factors (B rounds, A rounds), each shared under the silo's ResFIM
    masks: an element of the phase's factor that the mask keeps local is personal to the silo."""
