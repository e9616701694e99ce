"""FedRDN's random dynamic normalisation: dataset channel statistics and the datasets that normalise with them.

Yan et al., "FedRDN: A Random Dynamic Normalization Approach for Federated Learning on Medical
Imaging", MICCAI 2023. Each silo summarises its training images by their channel-wise mean
``μ`` and standard deviation ``σ`` (dataset level: over every pixel of every training
image). During training an image is normalised with the statistics of a silo ``j``
drawn uniformly at random, own included, each time it is loaded,
``x' = (x − μ_j) / σ_j``; at test time a site normalises with its own statistics,
``x' = (x − μ_own) / σ_own``.

Choices that are ours: ``σ`` is the population standard deviation (divide by the pixel count),
floored at :data:`STD_FLOOR` so a constant channel does not divide by zero; the draw of item
``i`` in round ``r`` comes from a generator seeded with ``(seed, r, i)``, so it does not depend
on the order in which items are loaded; arithmetic is in float64, cast back to the image dtype.

This module is pure torch: the exchange of the statistics between silos is
``fedsilo.silo_agent.strategies.fedrdn``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedsilo.core.validators import check_int, check_seed

__all__ = ["STD_FLOOR", "Normalized", "RandomNormalized", "channel_stats"]

#: Smallest standard deviation :func:`channel_stats` returns (a constant channel's).
STD_FLOOR = 1e-6


def _image_of(item: Any, index: int) -> torch.Tensor:
    """The image ``[C, H, W]`` of a dataset item ``(image, mask)``."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"dataset item {index} must be an (image, mask) pair, got {type(item).__name__}")
    image = torch.as_tensor(item[0])
    if image.dim() != 3:
        raise ValueError(f"image {index} must be [C, H, W], got shape {tuple(image.shape)}")
    return image


def channel_stats(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel-wise mean and standard deviation of a dataset's images (FedRDN, Yan et al. 2023).

    Over all pixels of all images, per channel: ``μ_c = (1/N) Σ x_c`` and
    ``σ_c = max(sqrt((1/N) Σ (x_c − μ_c)²), STD_FLOOR)`` with ``N`` the dataset's pixel count.
    Accumulated in float64, image by image (Chan et al.'s pairwise update of the sum of squared
    deviations, so large datasets do not lose precision to ``E[x²] − E[x]²`` cancellation).

    Args:
        dataset: map-style dataset of ``(image [C, H, W], mask)`` pairs; images may differ in
            ``H`` and ``W`` but not in ``C``.

    Returns:
        ``(mean, std)``, float64 tensors of shape ``[C]``.

    Raises:
        ValueError: an empty dataset, an item that is not an ``(image [C, H, W], mask)`` pair,
            images with different channel counts, or a non-finite statistic.
    """
    n_items = len(dataset)  # type: ignore[arg-type]
    if n_items == 0:
        raise ValueError("channel_stats needs a non-empty dataset, got 0 items")
    count = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    for i in range(n_items):
        image = _image_of(dataset[i], i).to(torch.float64)
        flat = image.reshape(image.shape[0], -1)
        n_b = flat.shape[1]
        if n_b == 0:
            continue
        mean_b = flat.mean(dim=1)
        m2_b = ((flat - mean_b[:, None]) ** 2).sum(dim=1)
        if mean is None or m2 is None:
            count, mean, m2 = n_b, mean_b, m2_b
            continue
        if mean_b.shape != mean.shape:
            raise ValueError(f"image {i} has {mean_b.shape[0]} channel(s), earlier images {mean.shape[0]}")
        total = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta**2 * (count * n_b / total)
        count = total
    if mean is None or m2 is None:
        raise ValueError(f"channel_stats needs images with pixels; all {n_items} image(s) are empty")
    std = torch.sqrt(m2 / count).clamp_min(STD_FLOOR)
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise ValueError(f"channel statistics are not finite (mean {mean.tolist()}, std {std.tolist()}): "
                         "the images hold NaN or infinite values")
    return mean, std


def _stats_table(means: Any, stds: Any, *, owner: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks and converts a statistics table (``[S, C]`` means and stds) to float64."""
    m = torch.as_tensor(means, dtype=torch.float64)
    s = torch.as_tensor(stds, dtype=torch.float64)
    if m.dim() != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"{owner}: means must be [S, C] with S, C >= 1, got shape {tuple(m.shape)}")
    if s.shape != m.shape:
        raise ValueError(f"{owner}: stds shape {tuple(s.shape)} differs from means shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError(f"{owner}: means must be finite, got {m.tolist()}")
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"{owner}: stds must be finite and > 0, got {s.tolist()}")
    return m.clone(), s.clone()


def _normalize(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, owner: str, index: int) -> torch.Tensor:
    """``(image − mean) / std`` per channel, in float64, cast back to the image's dtype."""
    if image.dim() != 3 or image.shape[0] != mean.shape[0]:
        raise ValueError(f"{owner}: image {index} has shape {tuple(image.shape)}; the statistics expect "
                         f"[{mean.shape[0]}, H, W]")
    out = (image.to(torch.float64) - mean[:, None, None]) / std[:, None, None]
    return out.to(image.dtype if image.is_floating_point() else torch.float32)


def _check_channels(dataset: Dataset, channels: int, *, owner: str) -> None:
    """Raises ValueError if the dataset's first image does not have ``channels`` channels."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        return
    image = _image_of(dataset[0], 0)
    if image.shape[0] != channels:
        raise ValueError(f"{owner}: the statistics have {channels} channel(s) but the images have "
                         f"{image.shape[0]} (image 0 has shape {tuple(image.shape)})")


class RandomNormalized(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A dataset whose images are normalised with a randomly drawn silo's statistics (FedRDN's training rule).

    Item ``i`` of round ``rnd`` is ``((x − μ_j) / σ_j, mask)`` with ``j`` drawn uniformly from the
    table's ``S`` rows (Yan et al. 2023) by a numpy generator seeded with
    ``(seed, rnd, i)``: the same triple always draws the same silo, whatever order the items are
    loaded in, and another round draws afresh. Masks are returned as they are.

    Args:
        dataset: map-style dataset of ``(image [C, H, W], mask)`` pairs.
        means: ``[S, C]``, row ``j`` the mean of silo ``j``'s training images.
        stds: ``[S, C]``, finite and > 0.
        seed: int in ``[0, 2**63 − 1]``.
        rnd: the round, an int ``>= 0``.

    Raises:
        ValueError: a malformed table, ``C`` unlike the images' channel count, or a bad seed or round.
    """

    def __init__(self, dataset: Dataset, means: Any, stds: Any, *, seed: int, rnd: int) -> None:
        self.means, self.stds = _stats_table(means, stds, owner="RandomNormalized")
        check_seed("RandomNormalized", "seed", seed)
        check_int("RandomNormalized", "rnd", rnd, minimum=0)
        _check_channels(dataset, self.means.shape[1], owner="RandomNormalized")
        self.dataset = dataset
        self.seed = seed
        self.rnd = rnd

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _index(self, index: int) -> int:
        n = len(self)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not -n <= index < n:
            raise IndexError(f"index {index!r} out of range for {n} item(s)")
        return int(index) % n

    def silo_of(self, index: int) -> int:
        """The table row (silo) item ``index`` is normalised with in this round."""
        i = self._index(index)
        return int(np.random.default_rng([self.seed, self.rnd, i]).integers(self.means.shape[0]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index(index)
        j = self.silo_of(i)
        image, mask = self.dataset[i]
        image = torch.as_tensor(image)
        return _normalize(image, self.means[j], self.stds[j], owner="RandomNormalized", index=i), mask

    def __repr__(self) -> str:
        return (f"RandomNormalized(n={len(self)}, silos={self.means.shape[0]}, channels={self.means.shape[1]}, "
                f"seed={self.seed}, rnd={self.rnd})")


class Normalized(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A dataset whose images are normalised with one fixed mean and std (FedRDN's test-time rule).

    Item ``i`` is ``((x − μ) / σ, mask)`` per channel (Yan et al. 2023); masks are returned as they are.

    Args:
        dataset: map-style dataset of ``(image [C, H, W], mask)`` pairs.
        mean: ``[C]``, finite.
        std: ``[C]``, finite and > 0.

    Raises:
        ValueError: malformed statistics, or ``C`` unlike the images' channel count.
    """

    def __init__(self, dataset: Dataset, mean: Any, std: Any) -> None:
        m = torch.as_tensor(mean, dtype=torch.float64)
        s = torch.as_tensor(std, dtype=torch.float64)
        if m.dim() != 1 or s.dim() != 1:
            raise ValueError(f"Normalized: mean and std must be [C], got shapes {tuple(m.shape)} and {tuple(s.shape)}")
        means, stds = _stats_table(m[None], s[None], owner="Normalized")
        _check_channels(dataset, means.shape[1], owner="Normalized")
        self.mean, self.std = means[0], stds[0]
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.dataset[index]
        return _normalize(torch.as_tensor(image), self.mean, self.std, owner="Normalized", index=index), mask

    def __repr__(self) -> str:
        return f"Normalized(n={len(self)}, mean={self.mean.tolist()}, std={self.std.tolist()})"
