"""The audit's small model and data: a logistic model with a canary head, and a Gaussian-mixture generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["CANARY_INPUT", "AuditData", "build_network", "canary_loss", "per_example_loss", "mixture"]

#: Size of a white-box canary's input on its own coordinate: its gradient on the canary head is
#: CANARY_INPUT · e_i, far above any clip norm used, so DP-SGD clips it to exactly C · e_i.
CANARY_INPUT = 1e4


@dataclass(frozen=True, kw_only=True)
class AuditData:
    """Records of one silo: ``x`` is [n, features + canaries] (canary columns 0), ``y`` labels."""

    x: np.ndarray
    y: np.ndarray


def mixture(rng: np.random.Generator, means: np.ndarray, n: int, canaries: int) -> AuditData:
    """``n`` records of a Gaussian mixture (one unit-variance component per class, equal weights).

    Args:
        rng: The draw's source.
        means: [classes, features] component means.
        n: Records.
        canaries: Width of the (zero) canary columns appended.
    """
    classes, features = means.shape
    y = rng.integers(0, classes, size=n)
    x = np.zeros((n, features + canaries), dtype=np.float32)
    x[:, :features] = means[y] + rng.standard_normal((n, features))
    return AuditData(x=x, y=y.astype(np.int64))


def build_network(features: int, classes: int, canaries: int) -> torch.nn.Module:
    """A logistic model on the features plus a canary head on the canary columns, all weights 0.

    The output is [B, classes + 1]: the class logits, then the canary head's value. Neither
    layer has a bias, so a record with zero features has no gradient on the logistic part and a
    record with zero canary columns none on the canary head: a white-box canary i (input
    CANARY_INPUT · e_i on the canary columns) touches only canary-head weight i, a Dirac canary
    (Steinke, Nasr & Jagielski 2023, Section 6, white-box auditing with gradient canaries).
    """
    import torch
    from torch import nn

    class _AuditNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.logistic = nn.Linear(features, classes, bias=False)
            self.canary = nn.Linear(canaries, 1, bias=False)
            nn.init.zeros_(self.logistic.weight)
            nn.init.zeros_(self.canary.weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.logistic(x[:, :features]), self.canary(x[:, features:])], dim=1)

    return _AuditNet()


def per_example_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the class logits plus the canary head's value (linear), per example."""
    import torch.nn.functional as F

    return F.cross_entropy(output[:, :-1], targets, reduction="none") + output[:, -1]


def canary_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The batch mean of `per_example_loss` (the DP-SGD loss: a mean of per-example losses)."""
    return per_example_loss(output, targets).mean()
