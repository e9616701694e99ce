"""FedPer (Arivazhagan et al., 2019): the base layers are shared, the output head stays local."""

from __future__ import annotations

import torch

from fedsilo.silo_agent.strategies.base import Strategy


def head_prefix(model: torch.nn.Module) -> str:
    """The head: the last module (in ``named_modules`` order, i.e. the order of definition) that owns
    parameters itself; for a segmentation UNet, the convolution that produces the class logits.

    Raises:
        ValueError: The model has no parameters.
    """
    last = None
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = name
    if last is None:
        raise ValueError("the model has no parameters, hence no head")
    return last


class FedPer(Strategy):
    """Shares everything except the parameters and buffers of the output head (:func:`head_prefix`),
    which each silo personalises."""

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        head = head_prefix(model)
        return not (name == head or name.startswith(head + "."))
