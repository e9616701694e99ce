"""Tests of fedsilo.models.rdn: FedRDN's channel statistics and its random / fixed normalisation datasets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.models import Normalized, RandomNormalized, SegmentationDataset, channel_stats
from fedsilo.models.rdn import STD_FLOOR


def _pair(image: list) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(image, dtype=torch.float32)
    return x, torch.zeros(1, *x.shape[1:], dtype=torch.int64)


def _random_dataset(n: int, c: int, size: int, seed: int) -> SegmentationDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, c, size, size, generator=g) * (1 + torch.arange(c).view(1, c, 1, 1)) + 3.0
    masks = (torch.rand(n, 1, size, size, generator=g) > 0.5).to(torch.int64)
    return SegmentationDataset(images.to(torch.float32), masks)


# -- channel_stats ----------------------------------------------------------------------
def test_channel_stats_known_answer_over_images_of_different_sizes() -> None:
    # channel 0 holds 1, 3 (image 0) and 8 (image 1): mean 4, population variance (9 + 1 + 16) / 3;
    # channel 1 is constant 2: its std is the floor
    dataset = [_pair([[[1.0, 3.0]], [[2.0, 2.0]]]), _pair([[[8.0]], [[2.0]]])]
    mean, std = channel_stats(dataset)
    assert mean.dtype == std.dtype == torch.float64
    assert mean.tolist() == pytest.approx([4.0, 2.0], abs=1e-12)
    assert std.tolist() == pytest.approx([math.sqrt(26 / 3), STD_FLOOR], rel=1e-12)
    assert STD_FLOOR == 1e-6


def test_channel_stats_of_a_segmentation_dataset_match_the_stacked_images() -> None:
    train = _random_dataset(6, 3, 8, seed=4)
    mean, std = channel_stats(train)
    stacked = train.images.to(torch.float64)
    assert torch.allclose(mean, stacked.mean(dim=(0, 2, 3)), rtol=0, atol=1e-12)
    assert torch.allclose(std, stacked.std(dim=(0, 2, 3), unbiased=False), rtol=0, atol=1e-12)


def test_channel_stats_accumulate_in_float64() -> None:
    # values far from zero with a small spread: a float32 E[x²] − E[x]² would lose the spread entirely
    g = torch.Generator().manual_seed(0)
    images = (1000.0 + torch.randn(50, 1, 8, 8, generator=g, dtype=torch.float64) * 1e-2).to(torch.float32)
    _, std = channel_stats([(im, torch.zeros(1, 8, 8, dtype=torch.int64)) for im in images])
    assert std.item() == pytest.approx(images.to(torch.float64).std(unbiased=False).item(), rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=5),
       c=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_channel_stats_equal_the_statistics_of_all_pixels_pooled(sizes: list, c: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(c, h, w, generator=g) * 3 + 1 for h, w in sizes]
    mean, std = channel_stats([(im, torch.zeros(1, *im.shape[1:], dtype=torch.int64)) for im in images])
    pooled = torch.cat([im.reshape(c, -1) for im in images], dim=1).to(torch.float64)
    assert torch.allclose(mean, pooled.mean(dim=1), atol=1e-10)
    assert torch.allclose(std, pooled.std(dim=1, unbiased=False).clamp_min(STD_FLOOR), atol=1e-10)


def test_channel_stats_refuse_bad_datasets() -> None:
    with pytest.raises(ValueError, match="0 items"):
        channel_stats([])
    with pytest.raises(ValueError, match="image 1 has 1 channel"):
        channel_stats([_pair([[[1.0]], [[2.0]]]), _pair([[[1.0]]])])
    with pytest.raises(ValueError, match=r"not finite .*nan"):
        channel_stats([_pair([[[1.0, float("nan")]]])])
    with pytest.raises(ValueError, match=r"\[C, H, W\], got shape \(2, 2\)"):
        channel_stats([(torch.zeros(2, 2), torch.zeros(1, 2, 2))])


# -- RandomNormalized --------------------------------------------------------------------
MEANS = torch.tensor([[0.0, 1.0], [2.0, -1.0], [-3.0, 0.5]], dtype=torch.float64)
STDS = torch.tensor([[1.0, 2.0], [0.5, 1.0], [4.0, 0.25]], dtype=torch.float64)


def test_random_normalized_is_deterministic_and_order_independent() -> None:
    data = _random_dataset(40, 2, 4, seed=1)
    a = RandomNormalized(data, MEANS, STDS, seed=7, rnd=3)
    b = RandomNormalized(data, MEANS, STDS, seed=7, rnd=3)
    forward = [a[i][0] for i in range(len(a))]
    backward = {i: b[i][0] for i in reversed(range(len(b)))}
    assert all(torch.equal(forward[i], backward[i]) for i in range(len(a)))
    assert all(torch.equal(a[i][0], forward[i]) for i in range(len(a)))  # loaded again: the same silo
    assert torch.equal(a[-1][0], forward[-1])
    other_round = RandomNormalized(data, MEANS, STDS, seed=7, rnd=4)
    other_seed = RandomNormalized(data, MEANS, STDS, seed=8, rnd=3)
    assert [a.silo_of(i) for i in range(40)] != [other_round.silo_of(i) for i in range(40)]
    assert [a.silo_of(i) for i in range(40)] != [other_seed.silo_of(i) for i in range(40)]


def test_random_normalized_pins_its_draws() -> None:
    # the draw of (seed, round, item) is part of a run's reproducibility: a change here changes every run
    r = RandomNormalized(_random_dataset(8, 2, 2, seed=0), MEANS, STDS, seed=0, rnd=1)
    assert [r.silo_of(i) for i in range(8)] == [
        int(np.random.default_rng([0, 1, i]).integers(3)) for i in range(8)]


def test_each_item_is_normalised_with_exactly_one_row_of_the_table() -> None:
    data = _random_dataset(30, 2, 3, seed=2)
    r = RandomNormalized(data, MEANS, STDS, seed=11, rnd=1)
    for i in range(len(r)):
        out, mask = r[i]
        x, m = data[i]
        assert out.dtype == torch.float32 and out.shape == x.shape
        rows = [j for j in range(3) if torch.allclose(
            out.double(), (x.double() - MEANS[j][:, None, None]) / STDS[j][:, None, None], atol=1e-5)]
        assert rows == [r.silo_of(i)]
        assert mask.dtype == m.dtype and torch.equal(mask, m)  # masks are passed through untouched


def test_the_draw_is_roughly_uniform() -> None:
    r = RandomNormalized(_random_dataset(300, 2, 1, seed=3), MEANS, STDS, seed=5, rnd=2)
    counts = np.bincount([r.silo_of(i) for i in range(300)], minlength=3)
    assert counts.sum() == 300 and (counts >= 70).all(), counts  # expected 100 each


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), rnd=st.integers(0, 10_000))
def test_every_silo_is_drawn_in_300_items(seed: int, rnd: int) -> None:
    # each of 3 silos is missed by 300 uniform draws with probability (2/3)^300 ≈ 1e-53
    r = RandomNormalized(_random_dataset(300, 2, 1, seed=0), MEANS, STDS, seed=seed, rnd=rnd)
    assert {r.silo_of(i) for i in range(300)} == {0, 1, 2}


def test_random_normalized_refuses_bad_tables_and_arguments() -> None:
    data = _random_dataset(2, 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"means must be \[S, C\].*\(2,\)"):
        RandomNormalized(data, MEANS[0], STDS[0], seed=0, rnd=0)
    with pytest.raises(ValueError, match=r"stds shape \(2, 2\) differs from means shape \(3, 2\)"):
        RandomNormalized(data, MEANS, STDS[:2], seed=0, rnd=0)
    with pytest.raises(ValueError, match="statistics have 1 channel.*images have 2"):
        RandomNormalized(data, MEANS[:, :1], STDS[:, :1], seed=0, rnd=0)
    zero = STDS.clone()
    zero[1, 1] = 0.0
    with pytest.raises(ValueError, match=r"stds must be finite and > 0.*0\.0"):
        RandomNormalized(data, MEANS, zero, seed=0, rnd=0)
    with pytest.raises(ValueError, match=r"stds must be finite and > 0.*-0\.5"):
        RandomNormalized(data, MEANS, -STDS, seed=0, rnd=0)
    nan = MEANS.clone()
    nan[0, 0] = float("inf")
    with pytest.raises(ValueError, match="means must be finite.*inf"):
        RandomNormalized(data, nan, STDS, seed=0, rnd=0)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        RandomNormalized(data, MEANS, STDS, seed=-1, rnd=0)
    with pytest.raises(ValueError, match="rnd must be an int, got True"):
        RandomNormalized(data, MEANS, STDS, seed=0, rnd=True)  # type: ignore[arg-type]
    with pytest.raises(IndexError, match="index 2 out of range"):
        RandomNormalized(data, MEANS, STDS, seed=0, rnd=0)[2]


# -- Normalized --------------------------------------------------------------------------
def test_normalized_known_answer_and_masks_untouched() -> None:
    x, m = _pair([[[1.0, 3.0]], [[2.0, 6.0]]])
    out, mask = Normalized([(x, m)], torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]))[0]
    assert out.tolist() == [[[0.0, 1.0]], [[0.0, 1.0]]]
    assert mask is m


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_normalising_with_own_statistics_gives_zero_mean_unit_std(n: int, c: int, seed: int) -> None:
    data = _random_dataset(n, c, 4, seed)
    norm = Normalized(data, *channel_stats(data))
    pooled = torch.stack([norm[i][0] for i in range(n)]).to(torch.float64)
    assert torch.allclose(pooled.mean(dim=(0, 2, 3)), torch.zeros(c, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(pooled.std(dim=(0, 2, 3), unbiased=False), torch.ones(c, dtype=torch.float64), atol=1e-5)


def test_normalized_refuses_bad_statistics() -> None:
    data = _random_dataset(2, 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"must be \[C\], got shapes \(1, 2\)"):
        Normalized(data, torch.zeros(1, 2), torch.ones(2))
    with pytest.raises(ValueError, match="statistics have 3 channel.*images have 2"):
        Normalized(data, torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"stds must be finite and > 0.*nan"):
        Normalized(data, torch.zeros(2), torch.tensor([1.0, float("nan")]))
