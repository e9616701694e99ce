"""LKCC's torch modules: the frozen concept classifier and the head FedBM puts in place of a classifier's linear head."""

from __future__ import annotations

import torch
from torch import nn

from fedsilo.core.rng import seeded_global_rng
import math

import torch.nn.functional as F

from fedsilo.models.lkcc import DEFAULT_SCALE, NORM_EPS, ConceptGaussians, check_labels, gaussians_fingerprint

__all__ = ["FrozenConceptClassifier", "LkccHead", "seeded_init"]


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


class FrozenConceptClassifier(nn.Module):
    """FedBM's pre-built, frozen classifier: logits ``s · f̂ · μ_cᵀ`` with ``f̂ = f/‖f‖`` (LKCC).

    ``mean`` (μ, ``[K, D]``) and ``var`` (σ², ``[K, D]``) are float32 **buffers**; the module has
    no parameters at all, so optimisers and Opacus never touch it and it never changes in training.
    The buffers are persistent (they are in ``state_dict``). Computation runs in the features' dtype
    (the buffers are cast to it). Every output row reads only its own example's features, so
    per-example gradients (DP-SGD) are those of each example's own loss.

    Args:
        gaussians: The class Gaussians (:class:`ConceptGaussians`); rounded to float32.
        scale: The logit scale ``s`` > 0 (default :data:`DEFAULT_SCALE`, our choice).
    """

    mean: torch.Tensor
    var: torch.Tensor

    def __init__(self, gaussians: ConceptGaussians, scale: float = DEFAULT_SCALE) -> None:
        super().__init__()
        if not isinstance(gaussians, ConceptGaussians):
            raise ValueError(f"gaussians must be a ConceptGaussians, got {gaussians!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)
        self.register_buffer("mean", torch.tensor(gaussians.mean, dtype=torch.float32))
        self.register_buffer("var", torch.tensor(gaussians.var, dtype=torch.float32))

    @property
    def n_classes(self) -> int:
        """K."""
        return int(self.mean.shape[0])

    @property
    def dim(self) -> int:
        """D, the feature width the classifier expects."""
        return int(self.mean.shape[1])

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, dim={self.dim}, scale={self.scale}"

    def _unit(self, features: torch.Tensor) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or not features.is_floating_point() or features.ndim != 2 \
                or features.shape[1] != self.dim:
            what = (f"{features.dtype} of shape {tuple(features.shape)}" if isinstance(features, torch.Tensor)
                    else repr(features))
            raise ValueError(f"features must be a floating [N, {self.dim}] tensor, got {what}")
        return F.normalize(features, dim=1, eps=NORM_EPS)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K] = s · normalize(features) @ meanᵀ``; the prediction is their argmax."""
        unit = self._unit(features)
        return self.scale * unit @ self.mean.to(unit.dtype).T

    def loss(self, features: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The upper bound of the expected cross-entropy over classifiers drawn from the class Gaussians.

        FedBM (Zhu et al., "FedBM: Stealing Knowledge from Pre-trained Language Models for
        Heterogeneous Federated Learning", MedIA 2025, arXiv:2502.16832) trains the feature extractor
        against classifiers sampled from the concept Gaussians through a loss obtained by a
        theoretical derivation. Our reading: the ISDA bound (Wang et al., "Implicit Semantic Data
        Augmentation for Deep Networks", NeurIPS 2019) with the randomness on the classifier,
        ``W_c ~ N(μ_c, diag σ_c²)`` independent, on the unit feature ``f̂``. By Jensen,

            E_W[CE] = E_W[log Σ_j exp(s (W_j − W_y)·f̂)] <= log Σ_j E_W[exp(s (W_j − W_y)·f̂)]
                    = log Σ_j exp(z_j),
            z_j = s (μ_j − μ_y)·f̂ + ½ s² Σ_d f̂_d² (σ²_{j,d} + σ²_{y,d})   for j ≠ y,   z_y = 0

        (``W_j − W_y`` is Gaussian, so each term is its moment-generating function; for j = y the
        difference is exactly 0). With σ² = 0 this is the plain cross-entropy of :meth:`forward`'s
        logits; with σ² > 0 it is larger, and it is never below ``E_W[CE]``.

        Args:
            features: ``[N, D]`` features (unnormalised; may require grad).
            labels: ``[N]`` int64 class indices in ``[0, K)``.
            reduction: "mean" (0 for an empty batch), "sum", or "none" (the ``[N]`` per-example bounds).

        Returns:
            The reduced loss, or the per-example vector for ``reduction="none"``.
        """
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        unit = self._unit(features)
        check_labels(labels, unit.shape[0], self.n_classes)
        labels = labels.to(unit.device)
        mean = self.mean.to(unit.dtype)
        var = self.var.to(unit.dtype)
        logits = self.scale * unit @ mean.T  # [N, K]
        spread = (unit * unit) @ var.T  # [N, K]: Σ_d f̂_d² σ²_{j,d}
        idx = labels.unsqueeze(1)
        z = logits - logits.gather(1, idx) + 0.5 * self.scale ** 2 * (spread + spread.gather(1, idx))
        z = z.masked_fill(F.one_hot(labels, self.n_classes).bool(), 0.0)
        per_example = torch.logsumexp(z, dim=1)
        if reduction == "none":
            return per_example
        if reduction == "sum":
            return per_example.sum()
        return per_example.mean() if per_example.numel() else per_example.sum()

    def gaussians(self) -> ConceptGaussians:
        """The buffers as :class:`ConceptGaussians` (float64 holding the float32 values)."""
        return ConceptGaussians(mean=self.mean.detach().cpu().double().numpy(),
                                var=self.var.detach().cpu().double().numpy())

    def fingerprint(self) -> str:
        """:func:`gaussians_fingerprint` of the buffers (their float32 values, exactly, in float64).

        Equals ``gaussians.rounded_to_float32().fingerprint()`` of the Gaussians it was built from
        (and ``gaussians.fingerprint()`` itself when those values are float32-representable). The
        scale is not part of it.
        """
        return gaussians_fingerprint(self.mean.detach().cpu().double().numpy(),
                                     self.var.detach().cpu().double().numpy())


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
