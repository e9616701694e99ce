"""A method's change of the local training loss (the ``LocalObjective`` seam of ``train_local`` and ``train_local_dp``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["LocalObjective", "attached", "check_objective", "public_loss_of"]


@runtime_checkable
class LocalObjective(Protocol):
    """One round's change of a silo's local training loss (MOON's contrastive term, FedRoD's two heads).

    A strategy returns one from ``Strategy.local_objective``; the agent hands it to
    :func:`train_local` or :func:`fedsilo.models.dp_training.train_local_dp`, which call
    :meth:`attach` once around the whole call and :meth:`loss` for every batch in place of the
    Task's loss. Without an objective both loops are exactly as before (bit for bit).

    It is a protocol, not a base class, so that a method module defines its objective without
    importing torch at import time (the coordinator imports every method module). Rules:

    * Picklable: it travels inside ``TrainJob`` to the other ranks of a training group. Hold
      numbers, tensors and frozen modules; register hooks only inside :meth:`attach` and remove
      them when it exits.
    * :meth:`loss` is a batch mean of per-example losses, like ``Task.loss``: data-parallel ranks
      weight their shares by size, and DP-SGD's per-sample gradients (Opacus' ``loss_reduction =
      "mean"``) are those of each example's own loss only then.
    * Models other than the trained one (a global or previous model) are frozen
      (``requires_grad`` off), are no part of the trained module, and run under ``torch.no_grad``:
      under DP-SGD Opacus computes per-sample gradients with hooks on the trained model only, and
      a term that reads a fixed model on example i alone is still example i's loss.
    * Optionally, a loss on *no record* of the silo: ``public_loss(model, *, step) -> Tensor | None``
      (FedBM's pseudo-samples from a generator trained on the aggregate). Its gradient is added to
      each step's gradient after the batch's: in :func:`train_local` after the batch's backward
      (and, in a data-parallel group, after the ranks' gradients are summed: every rank computes the
      same public loss), under DP-SGD after the clipped, noised gradient (with Opacus' hooks off), as
      FedProx's term is. It must depend only on the model and on what no record of this silo shaped
      (the aggregate, public knowledge, seeded randomness): then, under DP-SGD, it is
      post-processing and costs no privacy. Use ``step`` (0, 1, ... within the call) to seed it.
    """

    def attach(self, model: nn.Module, *, device: torch.device,
               forward: Callable[[nn.Module, Any], Any]) -> AbstractContextManager[Any]:
        """Prepares a training call: moves reference models to ``device``, registers forward hooks
        on ``model`` (the trained network, already on ``device``) to capture what :meth:`loss`
        reads; everything is undone when the returned context exits.

        Args:
            model: The network being trained.
            device: Where the call trains.
            forward: The Task's ``forward(model, inputs)`` (for reference models).
        """
        ...

    def loss(self, *, model: nn.Module, inputs: Any, targets: Any, output: Any,
             task_loss: Callable[[Any, Any], torch.Tensor]) -> torch.Tensor:
        """The batch's training loss (a scalar; a batch mean of per-example losses).

        Args:
            model: The network being trained (its hooks from :meth:`attach` have fired for this batch).
            inputs: The batch's inputs (the Task's ``collate``).
            targets: The batch's targets.
            output: ``model``'s output on ``inputs`` (the Task's ``forward``).
            task_loss: The Task's loss ``(output, targets) -> scalar``; most objectives add terms to it.
        """
        ...


def check_objective(owner: str, objective: object) -> None:
    """Raises ValueError naming ``owner`` unless ``objective`` is None or a :class:`LocalObjective`."""
    if objective is not None and not isinstance(objective, LocalObjective):
        raise ValueError(f"{owner}.objective must be None or a LocalObjective (with attach and loss), "
                         f"got {type(objective).__name__}")


def public_loss_of(objective: LocalObjective | None, model: nn.Module, *, step: int) -> torch.Tensor | None:
    """The objective's loss on no record for this step (``objective.public_loss``), or None when it has
    none (no objective, no ``public_loss``, or it returns None)."""
    fn = getattr(objective, "public_loss", None) if objective is not None else None
    return None if fn is None else fn(model, step=step)


def attached(objective: LocalObjective | None, model: nn.Module, device: torch.device,
              forward: Callable[[nn.Module, Any], Any]) -> AbstractContextManager[Any]:
    """``objective.attach(...)``, or a no-op context without an objective."""
    if objective is None:
        return contextlib.nullcontext()
    return objective.attach(model, device=device, forward=forward)
