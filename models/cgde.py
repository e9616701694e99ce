"""FedBM's CGDE: a conditional generator that learns, from the global model alone, inputs it classifies as each class.

Concept-guided Global Distribution Estimation (Zhu et al., "FedBM: Stealing Knowledge from
Pre-trained Language Models for Heterogeneous Federated Learning", Medical Image Analysis 2025,
arXiv:2502.16832): probabilistic concept embeddings e ~ N(μ_c, diag σ_c²) (LKCC's class Gaussians)
and noise z condition a generator G(z, e); G is trained so that the *global* model classifies
G(z, e) as class c; the silos then add G's pseudo-samples to their local batches to calibrate
their feature extractors towards the global input distribution.

What is ours (the paper's abstract leaves it open, or we could not check its equations):

* **The three regularisers**, in our reading: (1) utility, the cross-entropy of the global
  model's logits on G(z, e) against c; (2) fidelity, DeepInversion's feature-statistics match
  (Yin et al., CVPR 2020): for every ``BatchNorm`` layer of the global model, the L2 distances
  between the batch mean/variance of its input on the generated batch and its running
  mean/variance (a network without BatchNorm, e.g. GroupNorm under DP-SGD, has no such
  statistics: the term is 0); (3) diversity, MSGAN's mode-seeking ratio (Mao et al., CVPR 2019):
  the mean over pairs of |(z, e)_i − (z, e)_j|₁ / (|x_i − x_j|₁ + ε), small when different
  conditions give different images.
* **Where and when it is trained.** Only from the decrypted aggregate (the global model) and
  public knowledge (the concept Gaussians), on every silo, from scratch each round, with a seed
  of (run seed, round): every silo that holds the same global model gets the same generator
  (bit for bit on the same hardware and thread count), and no record of any silo reaches it.
  It is post-processing of the aggregate: no extra ε.
* **The architecture**: a small DCGAN-style decoder (Linear to a ``width × H/4 × W/4`` map, two
  ×2 nearest upsamplings with 3×3 convolutions, BatchNorm and LeakyReLU, a sigmoid output in
  [0, 1] like the Task's images).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional

from fedsilo.core.validators import check_float, check_int

if TYPE_CHECKING:
    from fedsilo.models.lkcc import ConceptGaussians

__all__ = ["CgdeSettings", "ConditionalGenerator", "pseudo_batch", "train_generator"]


@dataclass(frozen=True, kw_only=True)
class CgdeSettings:
    """How a round's generator is trained.

    Attributes:
        steps: Adam steps per round (from a fresh generator).
        batch: generated images per step (classes balanced: ``c = i mod K``, shuffled).
        lr: Adam's learning rate.
        noise_dim: the dimension of z.
        width: channels of the generator's first feature map.
        bn_weight: weight of the feature-statistics (fidelity) term.
        div_weight: weight of the mode-seeking (diversity) term.
    """

    steps: int = 100
    batch: int = 32
    lr: float = 2e-3
    noise_dim: int = 32
    width: int = 32
    bn_weight: float = 1.0
    div_weight: float = 0.1

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name, low, high in (("steps", 1, 100_000), ("batch", 2, 4096), ("noise_dim", 1, 4096), ("width", 4, 1024)):
            value = getattr(self, name)
            check_int(owner, name, value, minimum=low)
            if value > high:
                raise ValueError(f"{owner}.{name} must be at most {high}, got {value!r}")
        check_float(owner, "lr", self.lr, low=0.0, high=1e6, low_inclusive=False)
        for name in ("bn_weight", "div_weight"):
            check_float(owner, name, getattr(self, name), low=0.0, high=1e6)
        for name in ("lr", "bn_weight", "div_weight"):
            object.__setattr__(self, name, float(getattr(self, name)))


class ConditionalGenerator(nn.Module):
    """G(z, e): noise ``[N, noise_dim]`` and a concept embedding ``[N, cond_dim]`` to images ``[N, C, H, W]`` in [0, 1]."""

    def __init__(self, *, noise_dim: int, cond_dim: int, image_shape: tuple[int, int, int], width: int = 64) -> None:
        super().__init__()
        c, h, w = (int(v) for v in image_shape)
        if min(c, h, w) < 1:
            raise ValueError(f"ConditionalGenerator.image_shape must be positive (C, H, W), got {image_shape!r}")
        self.noise_dim, self.cond_dim, self.image_shape = noise_dim, cond_dim, (c, h, w)
        self.start = (max(1, math.ceil(h / 4)), max(1, math.ceil(w / 4)))
        self.width = width
        self.fc = nn.Linear(noise_dim + cond_dim, width * self.start[0] * self.start[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, c, 3, padding=1),
        )

    def forward(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` in [0, 1] for noise ``z`` and conditions ``e``."""
        x = self.fc(torch.cat([z, e], dim=1)).view(-1, self.width, *self.start)
        x = self.body(x)
        if tuple(x.shape[-2:]) != self.image_shape[1:]:
            x = functional.interpolate(x, size=self.image_shape[1:], mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def _balanced_labels(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` labels ``i mod k`` in a random order (every class equally often, up to one)."""
    return (torch.arange(n) % k)[torch.randperm(n, generator=gen)]


def pseudo_batch(generator: ConditionalGenerator, gaussians: ConceptGaussians, n: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pseudo-samples with balanced labels: ``(G(z, e) [n, C, H, W], labels [n])``, no gradient.

    ``e`` is drawn from the label's concept Gaussian, ``z`` from N(0, I), both from ``gen``; the
    generator runs in eval mode (its BatchNorm uses the statistics of its training).
    """
    labels = _balanced_labels(n, gaussians.n_classes, gen)
    e = gaussians.sample(labels, gen)
    z = torch.randn(n, generator.noise_dim, generator=gen)
    was = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            return generator(z, e), labels
    finally:
        generator.train(was)


class _BnStatistics:
    """Forward hooks on a frozen model's BatchNorm layers: DeepInversion's feature-statistics distance."""

    def __init__(self, model: nn.Module) -> None:
        self.terms: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        x = args[0]
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
        self.terms.append(torch.linalg.vector_norm(mean - module.running_mean)
                          + torch.linalg.vector_norm(var - module.running_var))

    def take(self, like: torch.Tensor) -> torch.Tensor:
        out = torch.stack(self.terms).sum() if self.terms else like.new_zeros(())
        self.terms = []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def mode_seeking(inputs: torch.Tensor, images: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MSGAN's diversity term: mean over the pairs (i, N/2 + i) of |in_i − in_j|₁ / (|x_i − x_j|₁ + eps)
    (per-element means); small when different conditions give different images."""
    half = inputs.shape[0] // 2
    d_in = (inputs[:half] - inputs[half: 2 * half]).abs().flatten(1).mean(dim=1)
    d_x = (images[:half] - images[half: 2 * half]).abs().flatten(1).mean(dim=1)
    return (d_in / (d_x + eps)).mean()


def train_generator(global_model: nn.Module, gaussians: ConceptGaussians, *, image_shape: tuple[int, int, int],
                    settings: CgdeSettings, seed: int,
                    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> ConditionalGenerator:
    """Trains a fresh generator against a frozen copy of ``global_model`` (CGDE, see the module docstring).

    Reads nothing but its arguments: the global model (its weights, copied, in eval mode), the
    concept Gaussians, the image shape, the settings and the seed. Deterministic for the same
    arguments (CPU); it never reads or reseeds the global RNG (agents of a simulation train in threads).

    Args:
        global_model: the aggregate's model (not changed).
        gaussians: the class concept Gaussians (LKCC).
        image_shape: ``(C, H, W)`` of the Task's inputs.
        settings: steps, batch, learning rate and the regularisers' weights.
        seed: the generator's seed (the run's seed and the round).
        forward: the Task's ``forward(model, inputs)`` (default: ``model(inputs)``).

    Returns:
        The generator, in eval mode, on the CPU.
    """
    forward = forward or (lambda m, x: m(x))
    teacher = copy.deepcopy(global_model).to("cpu").eval()
    teacher.requires_grad_(False)
    from fedsilo.core.rng import seeded_global_rng
    from fedsilo.models.lkcc_head import seeded_init

    gen = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    with seeded_global_rng(None):  # the default init draws from the global RNG: leave it as it was
        g = ConditionalGenerator(noise_dim=settings.noise_dim, cond_dim=gaussians.dim, image_shape=image_shape,
                                 width=settings.width)
    seeded_init(g, gen)
    optimizer = torch.optim.Adam(g.parameters(), lr=settings.lr)
    stats = _BnStatistics(teacher)
    g.train()
    try:
        for _ in range(settings.steps):
            labels = _balanced_labels(settings.batch, gaussians.n_classes, gen)
            e = gaussians.sample(labels, gen)
            z = torch.randn(settings.batch, settings.noise_dim, generator=gen)
            x = g(z, e)
            logits = forward(teacher, x)
            loss = functional.cross_entropy(logits, labels) + settings.bn_weight * stats.take(logits)
            if settings.div_weight:
                loss = loss + settings.div_weight * mode_seeking(torch.cat([z, e], dim=1), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        stats.remove()
    return g.eval()
