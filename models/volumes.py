"""3-D volumes in memory (with their voxel spacings), patch collation, and spacing-aware Dice and HD95 in millimetres."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from fedsilo.core.validators import check_int

__all__ = [
    "VolumeDataset",
    "collate_patches",
    "dice_and_hd95_mm",
    "spacing_of",
]


class VolumeDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Image/label volumes held in memory, each with its voxel spacing in millimetres.

    Items are ``(image, label)``: ``image`` float32 ``[C, D, H, W]`` and ``label`` int64
    ``[1, D, H, W]``. Volumes may differ in size; :func:`collate_patches` cuts them to the
    dataset's ``patch_size``.

    Attributes:
        patch_size: Side of the cubic patches the network trains on (voxels).
        random_crops: Training sets: batches take random foreground/background-balanced crops
            (MONAI ``RandCropByPosNegLabeld``) of volumes larger than the patch; otherwise the
            centre crop.
    """

    def __init__(self, images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                 spacings: Sequence[Sequence[float]], *, patch_size: int, random_crops: bool = False) -> None:
        """Wraps the volumes.

        Args:
            images: float32 tensors ``[C, D, H, W]``.
            labels: int64 tensors ``[1, D, H, W]`` of the images' sizes.
            spacings: Voxel spacing in mm of each volume along its three array axes, all > 0.
            patch_size: Patch side in voxels (>= 8).
            random_crops: Whether batches take random balanced crops (training sets).

        Raises:
            ValueError: On mismatched lengths, ranks, dtypes, sizes or bad spacings.
        """
        check_int("VolumeDataset", "patch_size", patch_size, minimum=8)
        if not len(images) == len(labels) == len(spacings):
            raise ValueError(f"VolumeDataset: {len(images)} images, {len(labels)} labels and "
                             f"{len(spacings)} spacings must be as many")
        for i, (im, lab, sp) in enumerate(zip(images, labels, spacings, strict=True)):
            if im.dim() != 4 or im.dtype != torch.float32:
                raise ValueError(f"VolumeDataset: image {i} must be float32 [C, D, H, W], got {im.dtype} {tuple(im.shape)}")
            if lab.dim() != 4 or lab.shape[0] != 1 or lab.dtype != torch.int64 or lab.shape[1:] != im.shape[1:]:
                raise ValueError(f"VolumeDataset: label {i} must be int64 [1, D, H, W] like its image "
                                 f"{tuple(im.shape)}, got {lab.dtype} {tuple(lab.shape)}")
            if len(sp) != 3 or not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in sp):
                raise ValueError(f"VolumeDataset: spacing {i} must be three positive mm values, got {sp!r}")
        self.images = list(images)
        self.labels = list(labels)
        self.spacings = [tuple(float(s) for s in sp) for sp in spacings]
        self.patch_size = patch_size
        self.random_crops = random_crops

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def spacing(self, index: int) -> tuple[float, float, float]:
        """The voxel spacing in mm of volume ``index``, one value per array axis."""
        return self.spacings[index]  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"VolumeDataset(n={len(self)}, patch_size={self.patch_size}, random_crops={self.random_crops})"


def _locate(dataset: Dataset, index: int) -> tuple[VolumeDataset | None, int]:
    """The :class:`VolumeDataset` behind item ``index`` of ``dataset`` (through Concat/Subset), and its index there."""
    while True:
        if isinstance(dataset, VolumeDataset):
            return dataset, index
        if isinstance(dataset, Subset):
            dataset, index = dataset.dataset, int(dataset.indices[index])
        elif isinstance(dataset, ConcatDataset):
            import bisect

            k = bisect.bisect_right(dataset.cumulative_sizes, index)
            index -= dataset.cumulative_sizes[k - 1] if k else 0
            dataset = dataset.datasets[k]
        else:
            return None, index


def spacing_of(dataset: Dataset, index: int) -> tuple[float, float, float]:
    """The voxel spacing in mm of item ``index`` (1 mm isotropic for datasets that carry none)."""
    base, i = _locate(dataset, index)
    return base.spacing(i) if base is not None else (1.0, 1.0, 1.0)


def _crop_one(image: torch.Tensor, label: torch.Tensor, patch: int, random: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``patch``-sided crop of a volume (padded first where smaller): random and balanced, or central."""
    if tuple(image.shape[1:]) == (patch,) * 3:
        return image, label
    from monai.transforms import CenterSpatialCropd, RandCropByPosNegLabeld, SpatialPadd

    item = SpatialPadd(keys=("image", "label"), spatial_size=(patch,) * 3)({"image": image, "label": label})
    if random:
        crop = RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=(patch,) * 3,
                                      pos=1.0, neg=1.0, num_samples=1, allow_smaller=True)
        crop.set_random_state(seed=int(torch.randint(0, 2**31 - 1, ()).item()))  # the caller's (seeded) torch RNG
        item = crop(item)[0]
    else:
        item = CenterSpatialCropd(keys=("image", "label"), roi_size=(patch,) * 3)(item)
    return torch.as_tensor(item["image"]), torch.as_tensor(item["label"])


def collate_patches(dataset: Dataset, indices: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks patches of the volumes ``indices`` into ``([B, C, P, P, P] float32, [B, 1, P, P, P] int64)``.

    Volumes of the patch size are taken whole. Larger ones give one crop each: random and
    foreground/background balanced (MONAI ``RandCropByPosNegLabeld``, pos = neg = 1) for a
    dataset with ``random_crops``, its seed drawn from torch's global RNG (which
    :func:`~fedsilo.models.training.train_local` seeds per round, so training stays
    reproducible); the centre crop otherwise.
    """
    items = []
    for i in indices:
        base, j = _locate(dataset, i)
        image, label = dataset[i]
        image, label = torch.as_tensor(image), torch.as_tensor(label)
        patch = base.patch_size if base is not None else int(image.shape[-1])
        items.append(_crop_one(image, label, patch, bool(base is not None and base.random_crops)))
    if not items:
        raise ValueError("collate_patches needs at least one index")
    images = torch.stack([im.as_subclass(torch.Tensor) for im, _ in items])
    labels = torch.stack([lab.as_subclass(torch.Tensor) for _, lab in items])
    return images.to(device=device, dtype=torch.float32), labels.to(device=device, dtype=torch.int64)


def dice_and_hd95_mm(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     spacing: Sequence[float]) -> tuple[float, float]:
    """Dice and HD95 (mm) of one volume, each averaged over the foreground classes ``1..K-1``.

    * Dice: ``2|P ∩ G| / (|P| + |G|)`` (Dice 1945), 1 when both are empty.
    * HD95: MONAI's ``compute_hausdorff_distance(percentile=95, spacing=spacing)``, the symmetric
      95th-percentile distance between the two surfaces (Huttenlocher et al. 1993; as in the
      Medical Segmentation Decathlon, Antonelli et al. 2022) measured in mm on the voxel grid of
      ``spacing``. Both empty gives 0; exactly one empty gives the volume's diagonal in mm
      (an upper bound of any real value), so no NaN or infinity reaches a report.

    Args:
        pred: Predicted labels ``[D, H, W]`` (integer).
        label: Reference labels ``[D, H, W]`` (integer).
        num_classes: ``K`` classes including background (>= 2).
        spacing: Voxel spacing ``(sd, sh, sw)`` in mm.

    Returns:
        ``(dice, hd95_mm)``.

    Raises:
        ValueError: On shapes that differ or are not 3-D.
    """
    from monai.metrics import compute_hausdorff_distance

    if pred.dim() != 3 or pred.shape != label.shape:
        raise ValueError(f"pred and label must be equal [D, H, W], got {tuple(pred.shape)} and {tuple(label.shape)}")
    check_int("dice_and_hd95_mm", "num_classes", num_classes, minimum=2)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing, strict=True)))
    dices, hds = [], []
    for k in range(1, num_classes):
        p, g = pred == k, label == k
        n_p, n_g = int(p.sum()), int(g.sum())
        dices.append(1.0 if n_p + n_g == 0 else 2.0 * int((p & g).sum()) / (n_p + n_g))
        if n_p == 0 and n_g == 0:
            hds.append(0.0)
        elif n_p == 0 or n_g == 0:
            hds.append(diagonal)
        else:
            hd = compute_hausdorff_distance(p[None, None].float(), g[None, None].float(), include_background=True,
                                            percentile=95.0, spacing=[float(s) for s in spacing])
            hds.append(float(hd.reshape(-1)[0]))
    return float(np.mean(dices)), float(np.mean(hds))
