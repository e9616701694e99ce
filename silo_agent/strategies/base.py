"""The sharing ``Strategy`` seam."""

from __future__ import annotations

import abc

import torch

from fedsilo.coordinator.phases import SharePhase


class Strategy(abc.ABC):
    """Decides which of a model's state_dict entries are shared with the federation.

    Shared entries are averaged across silos each round; the rest stay local (personalised).
    Only floating-point entries can be shared. The contract test in
    tests/silo_agent/test_strategy_contract.py runs on every implementation.
    """

    @abc.abstractmethod
    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        """Whether state_dict entry ``name`` of ``model`` is shared."""

    def shared_names(self, model: torch.nn.Module) -> list[str]:
        """Shared state_dict entries in state_dict order (floating-point only)."""
        return [k for k, v in model.state_dict().items() if v.is_floating_point() and self.is_shared(k, model)]

    def trains(self, name: str, phase: SharePhase) -> bool:
        """Whether trainable parameter ``name`` is trained in a round of ``phase``.

        By default every parameter the model leaves trainable is; LoRA strategies train only
        the factor(s) they share that round.
        """
        return True

    def set_trainable(self, model: torch.nn.Module, phase: SharePhase, trainable: frozenset[str]) -> None:
        """Sets ``requires_grad`` for a round: among ``trainable`` (the parameters the model
        may train at all, e.g. only LoRA factors over a frozen base), those `trains` selects."""
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable and self.trains(name, phase))
