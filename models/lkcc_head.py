"""The head FedBM puts in place of a classifier's linear head: a trained projection into the concept space, then LKCC's frozen classifier."""

from __future__ import annotations

import torch
from torch import nn

from fedsilo.core.rng import seeded_global_rng
from fedsilo.models.lkcc import ConceptGaussians, DEFAULT_SCALE, FrozenConceptClassifier

__all__ = ["LkccHead", "seeded_init"]


def seeded_init(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialises every Linear and Conv layer of ``module`` from ``generator`` with PyTorch's default
    distribution (weights and biases U(−1/√fan_in, 1/√fan_in), the result of ``kaiming_uniform_(a=√5)``),
    in ``named_modules`` order; other layers keep their (deterministic) defaults. Returns ``module``."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                bound = 1.0 / max(1, m.weight[0].numel()) ** 0.5
                m.weight.uniform_(-bound, bound, generator=generator)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=generator)
    return module


class LkccHead(nn.Module):
    """``classifier(proj(features))``: a Linear from the network's features to the text-embedding
    width D (trained and shared like the rest of the network), then the frozen concept classifier.

    The projection is ours: FedBM's feature extractor outputs features in the language model's
    embedding space; a Task's network has its own feature width, so one Linear maps it there.
    Its initial weights come from ``seed`` (:func:`seeded_init`: PyTorch's default Linear
    distribution drawn from a generator of its own, never the global RNG, which other threads may
    be reseeding), so every silo builds the same head.

    Args:
        in_features: the width of the network's features (the replaced head's input).
        gaussians: the class concept Gaussians (LKCC).
        scale: the classifier's logit scale.
        seed: the projection's initialisation seed.
    """

    def __init__(self, *, in_features: int, gaussians: ConceptGaussians, scale: float = DEFAULT_SCALE,
                 seed: int = 0) -> None:
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"LkccHead.in_features must be a positive integer, got {in_features!r}")
        with seeded_global_rng(None):  # the default init draws from the global RNG: leave it as it was
            self.proj = nn.Linear(in_features, gaussians.dim)
        seeded_init(self.proj, torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF))
        self.classifier = FrozenConceptClassifier(gaussians, scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` of features ``[N, in_features]``."""
        return self.classifier(self.proj(features))
