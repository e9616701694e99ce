"""Tests of fedsilo.models.synthetic: the built-in multi-domain segmentation data."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.models import (
    UNSEEN_DOMAIN,
    DomainStyle,
    SegmentationDataset,
    SyntheticConfig,
    domain_style,
    silo_splits,
    unseen_domain,
)
from fedsilo.models.synthetic import _RANGES

SMALL = SyntheticConfig(n_train=6, n_val=2, n_test=3)
FLOAT_PARAMS = ("background", "texture", "gamma", "bias_strength", "blur_sigma", "resolution", "contrast", "offset")


def _same(a: SegmentationDataset, b: SegmentationDataset) -> bool:
    return torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)


def test_defaults() -> None:
    cfg = SyntheticConfig()
    assert (cfg.seed, cfg.image_size, cfg.n_train, cfg.n_val, cfg.n_test) == (0, 64, 48, 16, 24)


def test_items_have_the_documented_format() -> None:
    splits = silo_splits(SMALL, 0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 3)
    image, mask = splits.train[0]
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert mask.shape == (1, 64, 64) and mask.dtype == torch.int64
    for ds in (splits.train, splits.val, splits.test):
        assert isinstance(ds, SegmentationDataset)
        assert set(torch.unique(ds.masks).tolist()) == {0, 1}
        assert torch.isfinite(ds.images).all()
        assert -1.5 < float(ds.images.mean()) < 1.5
        assert 0.3 < float(ds.images.std()) < 2.0


def test_objects_are_brighter_than_background() -> None:
    train = silo_splits(SMALL, 1).train
    fg = train.images[train.masks == 1].mean()
    bg = train.images[train.masks == 0].mean()
    assert fg > bg + 0.5


def test_generation_is_deterministic() -> None:
    a, b = silo_splits(SMALL, 3), silo_splits(SMALL, 3)
    for name in ("train", "val", "test"):
        assert _same(getattr(a, name), getattr(b, name))
    assert _same(unseen_domain(SMALL, n=4), unseen_domain(SMALL, n=4))


def test_image_i_depends_only_on_seed_domain_split_and_index() -> None:
    big = silo_splits(SyntheticConfig(n_train=8, n_val=3, n_test=4), 0)
    small = silo_splits(SyntheticConfig(n_train=5, n_val=1, n_test=2), 0)
    assert torch.equal(big.train.images[:5], small.train.images)
    assert torch.equal(big.val.masks[:1], small.val.masks)
    assert torch.equal(big.test.images[:2], small.test.images)


def test_splits_seeds_and_domains_give_different_images() -> None:
    s0 = silo_splits(SMALL, 0)
    assert not torch.equal(s0.train.masks[:2], s0.val.masks[:2])
    assert not torch.equal(s0.train.masks[:3], s0.test.masks[:3])
    assert not torch.equal(s0.train.masks, silo_splits(dataclasses.replace(SMALL, seed=1), 0).train.masks)
    assert not torch.equal(s0.train.images, silo_splits(SMALL, 1).train.images)


def test_generation_is_fast() -> None:
    torch.set_num_threads(1)
    cfg = SyntheticConfig()
    silo_splits(cfg, 0)  # warm-up: imports
    best = float("inf")
    for _ in range(3):  # CPU time of this process, so a busy machine does not fail the test
        start = time.process_time()
        splits = silo_splits(cfg, 1)
        best = min(best, time.process_time() - start)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 88
    assert best < 0.5


def test_style_is_deterministic_and_printable() -> None:
    style = domain_style(SyntheticConfig(), 2)
    assert isinstance(style, DomainStyle)
    assert style == domain_style(SyntheticConfig(), 2)
    assert style != domain_style(SyntheticConfig(seed=5), 2)
    text = repr(style)
    assert text.startswith("DomainStyle(domain=2,") and "gamma=" in text and "noise_std=" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        style.gamma = 1.0  # type: ignore[misc]


def _position(style: DomainStyle, name: str) -> float:
    lo, hi = _RANGES[name]
    value = getattr(style, name)
    if name == "gamma":
        return float(np.log(value / lo) / np.log(hi / lo))
    return (value - lo) / (hi - lo)


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_training_styles_stay_in_range_and_differ_clearly(seed: int) -> None:
    cfg = SyntheticConfig(seed=seed)
    styles = [domain_style(cfg, d) for d in range(8)]
    for s in styles:
        for name in FLOAT_PARAMS:
            assert -1e-6 <= _position(s, name) <= 1 + 1e-6, (s, name)
        assert 2 <= s.rad_min < s.rad_max < cfg.image_size // 2
        assert s.noise_std > 0
    for i in range(len(styles)):
        for j in range(i + 1, len(styles)):
            # clearly different: several parameters apart by at least 10 % of their range
            far = [n for n in FLOAT_PARAMS if abs(_position(styles[i], n) - _position(styles[j], n)) >= 0.1]
            assert len(far) >= 4, (i, j, far)


def test_unseen_style_lies_outside_the_training_ranges() -> None:
    style = domain_style(SyntheticConfig(seed=3), UNSEEN_DOMAIN)
    assert style.domain == UNSEEN_DOMAIN
    outside = [n for n in FLOAT_PARAMS if not 0 <= _position(style, n) <= 1]
    assert set(outside) >= {"background", "gamma", "bias_strength", "blur_sigma", "resolution", "contrast", "offset"}
    assert style == domain_style(SyntheticConfig(seed=4), UNSEEN_DOMAIN)


def test_domains_look_different() -> None:
    cfg = SyntheticConfig(n_train=8, n_val=0, n_test=0)
    stats = []
    for d in range(4):
        train = silo_splits(cfg, d).train
        stats.append((float(train.images[train.masks == 0].mean()), float(train.masks.float().mean())))
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(stats[i][0] - stats[j][0]) > 0.05 or abs(stats[i][1] - stats[j][1]) > 0.05


def test_unseen_domain_defaults_and_size() -> None:
    assert len(unseen_domain(SMALL)) == SMALL.n_test
    data = unseen_domain(SMALL, n=5)
    assert len(data) == 5 and data.images.shape == (5, 1, 64, 64)
    assert len(unseen_domain(SMALL, n=0)) == 0
    assert not torch.equal(data.images[:3], silo_splits(SMALL, 0).test.images)


def test_other_image_sizes_scale_the_objects() -> None:
    cfg = SyntheticConfig(image_size=32, n_train=3, n_val=0, n_test=0)
    style = domain_style(cfg, 1)
    assert style.rad_max < 16
    assert silo_splits(cfg, 1).train.images.shape == (3, 1, 32, 32)


@pytest.mark.parametrize("domain", [-2, UNSEEN_DOMAIN, 1.0, True, "0"])
def test_silo_splits_rejects_bad_domains(domain: object) -> None:
    with pytest.raises(ValueError, match="domain"):
        silo_splits(SMALL, domain)  # type: ignore[arg-type]


def test_domain_style_rejects_bad_domains() -> None:
    with pytest.raises(ValueError, match="domain"):
        domain_style(SMALL, -2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"seed": -1}, "seed"),
        ({"image_size": 31}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"n_train": 0}, "n_train"),
        ({"n_val": -1}, "n_val"),
        ({"n_test": -1}, "n_test"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"SyntheticConfig.{field}"):
        SyntheticConfig(**kwargs)  # type: ignore[arg-type]


def test_config_from_mapping() -> None:
    assert SyntheticConfig.from_mapping({"seed": 3, "n_train": 10}) == SyntheticConfig(seed=3, n_train=10)
    assert SyntheticConfig.from_mapping(SyntheticConfig(seed=9).to_mapping()) == SyntheticConfig(seed=9)
    with pytest.raises(ValueError, match="n_trian"):
        SyntheticConfig.from_mapping({"n_trian": 3})


def test_unseen_domain_rejects_bad_n() -> None:
    with pytest.raises(ValueError, match="n"):
        unseen_domain(SMALL, n=-1)


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**63 - 1),
    domain=st.integers(0, 1000),
    size=st.sampled_from([32, 40, 64]),
)
def test_any_seed_and_domain_gives_valid_items(seed: int, domain: int, size: int) -> None:
    cfg = SyntheticConfig(seed=seed, image_size=size, n_train=2, n_val=0, n_test=1)
    splits = silo_splits(cfg, domain)
    for ds in (splits.train, splits.test):
        assert ds.images.shape[1:] == (1, size, size)
        assert torch.isfinite(ds.images).all()
        assert ds.masks.min() >= 0 and ds.masks.max() == 1
