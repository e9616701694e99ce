"""Tests of FedBM's CGDE generator: shapes, determinism, what it reads, and that it learns the global model's classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.models.cgde import CgdeSettings, ConditionalGenerator, mode_seeking, pseudo_batch, train_generator
from fedsilo.models.lkcc import ConceptGaussians


def _gaussians(k: int = 3, d: int = 8, seed: int = 0) -> ConceptGaussians:
    """K class means on the unit sphere, 4 "templates" each scattered around them (as text embeddings are)."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(k, 1, d)) + 0.05 * rng.normal(size=(k, 4, d))
    emb /= np.linalg.norm(emb, axis=2, keepdims=True)
    return ConceptGaussians.from_embeddings(emb)


def _teacher() -> nn.Module:
    """A global model that calls an image class c when its channel c is the brightest (with BatchNorm statistics)."""
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(0.05)
    head = nn.Linear(3, 3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3) * 4 - 2)
        head.bias.zero_()
    return nn.Sequential(bn, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 30, 22), (3, 8, 8)])
def test_generator_makes_images_of_the_asked_shape_in_0_1(shape: tuple[int, int, int]) -> None:
    g = ConditionalGenerator(noise_dim=5, cond_dim=8, image_shape=shape, width=8)
    x = g(torch.randn(4, 5), torch.randn(4, 8))
    assert x.shape == (4, *shape)
    assert float(x.detach().min()) >= 0.0 and float(x.detach().max()) <= 1.0


def test_settings_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="steps"):
        CgdeSettings(steps=0)
    with pytest.raises(ValueError, match="batch"):
        CgdeSettings(batch=1)
    with pytest.raises(ValueError, match="lr"):
        CgdeSettings(lr=float("nan"))
    with pytest.raises(ValueError, match="div_weight"):
        CgdeSettings(div_weight=-1)


def test_training_is_deterministic_leaves_the_model_alone_and_depends_on_the_seed() -> None:
    teacher, gauss = _teacher(), _gaussians()
    before = _state(teacher)
    settings = CgdeSettings(steps=5, batch=8, width=8, noise_dim=4)
    a = train_generator(teacher, gauss, image_shape=(3, 8, 8), settings=settings, seed=7)
    b = train_generator(teacher, gauss, image_shape=(3, 8, 8), settings=settings, seed=7)
    c = train_generator(teacher, gauss, image_shape=(3, 8, 8), settings=settings, seed=8)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items() if v.is_floating_point())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's model keeps its settings


def test_the_generator_learns_inputs_the_global_model_gives_each_class() -> None:
    teacher, gauss = _teacher(), _gaussians()
    gen = torch.Generator().manual_seed(0)
    untrained = ConditionalGenerator(noise_dim=16, cond_dim=gauss.dim, image_shape=(3, 8, 8), width=16)
    x0, y0 = pseudo_batch(untrained, gauss, 60, gen)
    acc0 = float((teacher(x0).argmax(1) == y0).float().mean())
    g = train_generator(teacher, gauss, image_shape=(3, 8, 8),
                        settings=CgdeSettings(steps=100, batch=30, width=16, noise_dim=16), seed=3)
    x, y = pseudo_batch(g, gauss, 60, torch.Generator().manual_seed(1))
    acc = float((teacher(x).argmax(1) == y).float().mean())
    assert torch.bincount(y, minlength=3).tolist() == [20, 20, 20]  # class-balanced
    assert acc >= 0.9 and acc > acc0 + 0.4, (acc0, acc)


def test_pseudo_batches_are_seeded_and_balanced() -> None:
    g = ConditionalGenerator(noise_dim=4, cond_dim=8, image_shape=(3, 8, 8), width=8)
    gauss = _gaussians()
    x1, y1 = pseudo_batch(g, gauss, 7, torch.Generator().manual_seed(5))
    x2, y2 = pseudo_batch(g, gauss, 7, torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert sorted(torch.bincount(y1, minlength=3).tolist()) == [2, 2, 3]
    assert not x1.requires_grad and g.training  # no graph; the generator's mode is restored


def test_mode_seeking_known_answer() -> None:
    inputs = torch.tensor([[0.0, 0.0], [1.0, 3.0]])  # pair (0, 1): |Δin| mean = 2
    images = torch.tensor([[0.0, 0.0, 0.0, 0.0], [4.0, 4.0, 4.0, 4.0]])  # |Δx| mean = 4
    assert float(mode_seeking(inputs, images, eps=0.0)) == pytest.approx(0.5)
