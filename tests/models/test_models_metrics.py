"""Tests of fedsilo.models.metrics: Dice and HD95 with defined values for empty masks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsilo.models import dice_and_hd95, hd95_pixels, to_labels


def _labels(a: np.ndarray) -> torch.Tensor:
    """[H, W] or [N, H, W] 0/1 array -> int64 [N, 1, H, W]."""
    t = torch.as_tensor(np.asarray(a), dtype=torch.int64)
    return t.reshape(-1, 1, *t.shape[-2:])


def test_perfect_prediction() -> None:
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.int64)
    mask[0, 0, 2:9, 3:7] = 1
    mask[1, 0, 10:14, 1:15] = 1
    scores = dice_and_hd95(mask.clone(), mask)
    assert scores.dice.tolist() == [1.0, 1.0]
    assert scores.hd95.tolist() == [0.0, 0.0]


def test_known_overlap_gives_exact_dice() -> None:
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.int64)
    mask[0, 0, 0:4, 0:4] = 1  # 16 pixels
    pred = torch.zeros_like(mask)
    pred[0, 0, 0:4, 0:2] = 1  # 8 pixels, all inside
    pred[0, 0, 6, 6] = 1  # 1 pixel outside
    scores = dice_and_hd95(pred, mask)
    assert scores.dice.item() == pytest.approx(2 * 8 / (9 + 16), abs=1e-7)


def test_known_hausdorff_distances() -> None:
    a = torch.zeros(12, 12, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[0, 0] = True
    b[3, 4] = True
    assert hd95_pixels(a, b) == pytest.approx(5.0)
    # b has two edge points at distances 0 and 10 from a; 95th percentile by linear
    # interpolation is 9.5, the other direction is 0.
    b = torch.zeros_like(a)
    b[0, 0] = b[0, 10] = True
    assert hd95_pixels(a, b) == pytest.approx(9.5)
    assert hd95_pixels(b, a) == pytest.approx(9.5)
    assert hd95_pixels(a, b, percentile=100.0) == pytest.approx(10.0)


def test_shifted_square_hd95() -> None:
    mask = torch.zeros(1, 1, 20, 20, dtype=torch.int64)
    mask[0, 0, 5:10, 5:10] = 1
    pred = torch.zeros_like(mask)
    pred[0, 0, 5:10, 8:13] = 1  # shifted 3 to the right
    scores = dice_and_hd95(pred, mask)
    assert scores.dice.item() == pytest.approx(2 * 10 / 50)
    assert scores.hd95.item() == pytest.approx(3.0)


def test_empty_cases_are_defined() -> None:
    empty = torch.zeros(1, 1, 6, 8, dtype=torch.int64)
    full = empty.clone()
    full[0, 0, 1:3, 1:3] = 1
    both = dice_and_hd95(empty, empty.clone())
    assert (both.dice.item(), both.hd95.item()) == (1.0, 0.0)
    for pred, mask in ((full, empty), (empty, full)):
        one = dice_and_hd95(pred, mask)
        assert one.dice.item() == 0.0
        assert one.hd95.item() == pytest.approx(10.0)  # diagonal of 6 x 8
        assert math.isfinite(one.hd95.item())


def test_logits_are_argmaxed() -> None:
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.int64)
    mask[0, 0, 2:6, 2:6] = 1
    logits = torch.stack([-mask[:, 0].float(), mask[:, 0].float()], dim=1) * 3.0
    scores = dice_and_hd95(logits, mask)
    assert (scores.dice.item(), scores.hd95.item()) == (1.0, 0.0)
    assert torch.equal(to_labels(logits), mask)


def test_multiclass_averages_foreground_classes() -> None:
    mask = torch.zeros(1, 1, 10, 10, dtype=torch.int64)
    mask[0, 0, 0:2, 0:2] = 1
    mask[0, 0, 6:8, 6:8] = 2
    pred = mask.clone()
    pred[0, 0, 6:8, 6:8] = 0  # class 2 missed entirely
    scores = dice_and_hd95(pred, mask, num_classes=3)
    assert scores.dice.item() == pytest.approx(0.5)
    assert scores.hd95.item() == pytest.approx(math.hypot(10, 10) / 2)
    # label maps infer num_classes from the largest label
    assert dice_and_hd95(pred, mask).dice.item() == pytest.approx(0.5)


def test_empty_batch() -> None:
    scores = dice_and_hd95(torch.zeros(0, 1, 4, 4, dtype=torch.int64), torch.zeros(0, 1, 4, 4, dtype=torch.int64))
    assert scores.dice.shape == (0,) and scores.hd95.shape == (0,)


@pytest.mark.parametrize(
    ("pred", "mask", "match"),
    [
        (torch.zeros(4, 4), torch.zeros(1, 1, 4, 4), r"\[N, C, H, W\]"),
        (torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4), r"\[N, 1, H, W\]"),
        (torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), "do not match"),
        (torch.full((1, 1, 4, 4), 0.5), torch.zeros(1, 1, 4, 4), "whole numbers"),
        (torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.5), "whole-number"),
        (torch.full((1, 1, 4, 4), -1), torch.zeros(1, 1, 4, 4), "pred labels"),
        (torch.zeros(1, 2, 4, 4), torch.full((1, 1, 4, 4), 2), "mask labels"),
    ],
)
def test_bad_inputs_raise(pred: torch.Tensor, mask: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dice_and_hd95(pred, mask)


def test_hd95_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="equal"):
        hd95_pixels(torch.zeros(3, 3, dtype=torch.bool), torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="percentile"):
        hd95_pixels(torch.zeros(3, 3, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.bool), percentile=101)


def test_hd95_matches_monai_when_scipy_is_available() -> None:
    pytest.importorskip("scipy")
    from monai.metrics import HausdorffDistanceMetric

    from fedsilo.models import SyntheticConfig, silo_splits

    cfg = SyntheticConfig(n_train=12, n_val=0, n_test=0)
    a, b = silo_splits(cfg, 0).train.masks, silo_splits(cfg, 1).train.masks
    ours = dice_and_hd95(a, b).hd95
    metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = metric(
            F.one_hot(a[:, 0], 2).permute(0, 3, 1, 2).float(), F.one_hot(b[:, 0], 2).permute(0, 3, 1, 2).float()
        )
    assert torch.allclose(ours, theirs.flatten().double(), atol=1e-4)


masks = arrays(np.int8, st.tuples(st.integers(1, 10), st.integers(1, 10)), elements=st.integers(0, 1))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_dice_and_hd95_invariants(data: st.DataObject) -> None:
    a = data.draw(masks)
    b = data.draw(arrays(np.int8, a.shape, elements=st.integers(0, 1)))
    ab = dice_and_hd95(_labels(a), _labels(b))
    ba = dice_and_hd95(_labels(b), _labels(a))
    dice, hd = ab.dice.item(), ab.hd95.item()
    assert 0.0 <= dice <= 1.0
    assert 0.0 <= hd <= math.hypot(*a.shape) + 1e-9
    assert dice == pytest.approx(ba.dice.item(), abs=1e-7)
    assert hd == pytest.approx(ba.hd95.item(), abs=1e-9)
    inter, total = int((a & b).sum()), int(a.sum() + b.sum())
    assert dice == pytest.approx(1.0 if total == 0 else 2 * inter / total, abs=1e-6)
    assert (dice == 1.0) == bool(np.array_equal(a, b))
    if np.array_equal(a, b):
        assert hd == 0.0
