"""FedPer (Arivazhagan et al., 2019): the base layers are shared, the output head stays local."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsilo.core.methods import BenchDefaults, register_method
from fedsilo.silo_agent.presets import DEMO_PRIVACY
from fedsilo.silo_agent.strategy import Strategy

if TYPE_CHECKING:
    import torch


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


@register_method
class FedPer(Strategy):
    """Shares everything except the parameters and buffers of the output head (:func:`head_prefix`),
    which each silo personalises."""

    name = "fedper"
    summary = "output head local, the rest averaged (Arivazhagan et al. 2019)"
    order = 40
    bench = BenchDefaults(note="output head local, the rest averaged (Arivazhagan et al. 2019)", privacy=DEMO_PRIVACY)

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        head = head_prefix(model)
        return not (name == head or name.startswith(head + "."))
