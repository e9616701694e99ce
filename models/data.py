"""In-memory segmentation datasets and the train/val/test split container shared by all loaders."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["INTENSITY_CENTER", "INTENSITY_SCALE", "SegmentationDataset", "SiloSplits", "standardize"]

#: Images are delivered as ``(x - INTENSITY_CENTER) / INTENSITY_SCALE`` where ``x`` is an
#: intensity on a nominal [0, 1] scale, so that values lie roughly in [-2, 2].
INTENSITY_CENTER = 0.5
INTENSITY_SCALE = 0.3


def standardize(x01: np.ndarray) -> np.ndarray:
    """Maps intensities on a nominal [0, 1] scale to the float32 network input scale."""
    return ((x01 - INTENSITY_CENTER) / INTENSITY_SCALE).astype(np.float32)


class SegmentationDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A fixed set of (image, mask) pairs held in memory.

    Items are ``(image, mask)`` with ``image`` a float32 tensor ``[C, H, W]`` and ``mask`` an
    int64 tensor ``[1, H, W]`` of class labels (``{0, 1}`` for the built-in data).

    Attributes:
        images: float32 tensor ``[N, C, H, W]``.
        masks: int64 tensor ``[N, 1, H, W]``.
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        """Wraps stacked tensors.

        Args:
            images: float32 tensor ``[N, C, H, W]``.
            masks: int64 tensor ``[N, 1, H, W]``.

        Raises:
            ValueError: On wrong ranks, dtypes or mismatched shapes.
        """
        if images.dim() != 4 or images.dtype != torch.float32:
            raise ValueError(f"images must be float32 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if masks.dim() != 4 or masks.shape[1] != 1 or masks.dtype != torch.int64:
            raise ValueError(f"masks must be int64 [N, 1, H, W], got {masks.dtype} {tuple(masks.shape)}")
        if images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[2:]:
            raise ValueError(
                f"images {tuple(images.shape)} and masks {tuple(masks.shape)} disagree in N, H or W"
            )
        self.images = images
        self.masks = masks

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.masks[index]

    def __repr__(self) -> str:
        return f"SegmentationDataset(n={len(self)}, image_shape={tuple(self.images.shape[1:])})"


@dataclass(frozen=True, kw_only=True)
class SiloSplits:
    """One silo's data, split into train, validation and test sets.

    Attributes:
        train: Training set.
        val: Validation set (may be empty).
        test: Test set (may be empty).
    """

    train: Dataset[tuple[torch.Tensor, torch.Tensor]]
    val: Dataset[tuple[torch.Tensor, torch.Tensor]]
    test: Dataset[tuple[torch.Tensor, torch.Tensor]]
