"""A silo's own 3-D NIfTI volumes (images/ + labels/ or masks/, or an MSD-style datalist) read with MONAI dictionary transforms."""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsilo.core.validators import MappingConfig, check_enum, check_int, check_seed, check_split_fractions
from fedsilo.models.data import SiloSplits, standardize
from fedsilo.models.volumes import VolumeDataset

__all__ = ["Folder3DConfig", "Modality", "load_folder3d"]

_SUFFIXES = (".nii.gz", ".nii")
_TAG_SPLIT = 0xF01D3D


class Modality(enum.Enum):
    """How intensities are mapped to [0, 1] before the network's standardisation."""

    CT = "ct"  # a fixed Hounsfield window (ScaleIntensityRanged, clipped)
    MR = "mr"  # per-volume percentiles (ScaleIntensityRangePercentilesd, clipped)


@dataclass(frozen=True, kw_only=True)
class Folder3DConfig(MappingConfig):
    """Where a silo's NIfTI volumes live and how they are prepared.

    Attributes:
        path: A folder with ``images/`` and ``labels/`` (or ``masks/``) of ``.nii``/``.nii.gz``
            files paired by name, or an MSD-style datalist ``.json`` whose ``"training"`` list
            holds ``{"image", "label"}`` paths relative to the file.
        patch_size: Side of the cubic training patches and sliding-window ROI (voxels, multiple of 8).
        spacing: Target voxel spacing ``(sd, sh, sw)`` in mm after RAS orientation (``Spacingd``);
            empty keeps each volume's own spacing.
        modality: ``"ct"`` (window ``ct_window`` in HU) or ``"mr"`` (percentiles ``mr_percentiles``).
        ct_window: ``(low, high)`` HU mapped to [0, 1], e.g. the abdominal soft-tissue window
            ``(-175, 250)``.
        mr_percentiles: ``(low, high)`` percentiles of each volume mapped to [0, 1].
        resize: Resize whole volumes to the patch (trilinear images, nearest labels; the spacing
            scales accordingly) instead of cropping patches and scoring by sliding window.
        val_fraction: Share of the cases held out for validation.
        test_fraction: Share held out for testing.
        seed: Seed of the split.
    """

    path: Path
    patch_size: int = 32
    spacing: tuple[float, ...] = ()
    modality: Modality = Modality.CT
    ct_window: tuple[float, ...] = (-175.0, 250.0)
    mr_percentiles: tuple[float, ...] = (1.0, 99.0)
    resize: bool = False
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if isinstance(self.path, (str, os.PathLike)) and not isinstance(self.path, Path) and str(self.path).strip():
            object.__setattr__(self, "path", Path(self.path))
        if not isinstance(self.path, Path):
            raise ValueError(f"{owner}.path must be a path, got {self.path!r}")
        check_int(owner, "patch_size", self.patch_size, minimum=8)
        if self.patch_size % 8:
            raise ValueError(f"{owner}.patch_size must be a multiple of 8, got {self.patch_size}")
        if isinstance(self.modality, str):
            object.__setattr__(self, "modality", Modality(self.modality) if self.modality in ("ct", "mr")
                               else self.modality)
        check_enum(owner, "modality", self.modality, Modality)
        for name, n in (("spacing", (0, 3)), ("ct_window", (2,)), ("mr_percentiles", (2,))):
            value = getattr(self, name)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, tuple) or len(value) not in n or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                raise ValueError(f"{owner}.{name} must be {' or '.join(map(str, n))} finite numbers, got {value!r}")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"{owner}.spacing must be positive mm values, got {self.spacing!r}")
        if not self.ct_window[0] < self.ct_window[1]:
            raise ValueError(f"{owner}.ct_window must be (low, high) with low < high, got {self.ct_window!r}")
        lo, hi = self.mr_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"{owner}.mr_percentiles must satisfy 0 <= low < high <= 100, got {self.mr_percentiles!r}")
        if not isinstance(self.resize, bool):
            raise ValueError(f"{owner}.resize must be a bool, got {self.resize!r}")
        check_split_fractions(owner, self.val_fraction, self.test_fraction)
        check_seed(owner, "seed", self.seed)


def _stem(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _index(folder: Path) -> dict[str, Path]:
    return {s: p for p in sorted(folder.iterdir()) if p.is_file() and (s := _stem(p)) is not None}


def _pairs(root: Path) -> list[tuple[Path, Path]]:
    """The (image, label) files of a folder or datalist, sorted by image path."""
    if not root.exists():
        raise FileNotFoundError(f"no such folder or datalist: {root}")
    if root.is_file():
        try:
            doc = json.loads(root.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read datalist {root}: {exc}") from exc
        entries = doc.get("training") if isinstance(doc, Mapping) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"datalist {root} must be a JSON object with a non-empty 'training' list")
        for i, e in enumerate(entries):
            if not isinstance(e, Mapping) or not isinstance(e.get("image"), str) or not isinstance(e.get("label"), str):
                raise ValueError(f"{root}: training[{i}] must have 'image' and 'label' paths, got {e!r}")
        return sorted((root.parent / e["image"], root.parent / e["label"]) for e in entries)
    label_dirs = [root / n for n in ("labels", "masks") if (root / n).is_dir()]
    if not (root / "images").is_dir() or len(label_dirs) != 1:
        raise ValueError(f"{root} must contain images/ and exactly one of labels/ or masks/")
    images, labels = _index(root / "images"), _index(label_dirs[0])
    if not images or set(images) != set(labels):
        raise ValueError(f"{root}: images {sorted(images)} and labels {sorted(labels)} must pair up by name "
                         f"(and be {' or '.join(_SUFFIXES)} files)")
    return [(images[s], labels[s]) for s in sorted(images)]


def _transform(cfg: Folder3DConfig) -> Any:
    """The MONAI dictionary pipeline: load, channel first, RAS, spacing, intensity, pad (or resize) to the patch."""
    from monai import transforms as T

    keys = ("image", "label")
    steps: list[Any] = [T.LoadImaged(keys=keys, image_only=True), T.EnsureChannelFirstd(keys=keys),
                        T.Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    if cfg.spacing:
        steps.append(T.Spacingd(keys=keys, pixdim=cfg.spacing, mode=("bilinear", "nearest")))
    if cfg.modality is Modality.CT:
        steps.append(T.ScaleIntensityRanged(keys="image", a_min=cfg.ct_window[0], a_max=cfg.ct_window[1],
                                            b_min=0.0, b_max=1.0, clip=True))
    else:
        steps.append(T.ScaleIntensityRangePercentilesd(keys="image", lower=cfg.mr_percentiles[0],
                                                       upper=cfg.mr_percentiles[1], b_min=0.0, b_max=1.0, clip=True))
    if cfg.resize:
        steps.append(T.Resized(keys=keys, spatial_size=(cfg.patch_size,) * 3, mode=("trilinear", "nearest")))
    else:
        steps.append(T.SpatialPadd(keys=keys, spatial_size=(cfg.patch_size,) * 3))
    return T.Compose(steps)


def _load(pairs: Sequence[tuple[Path, Path]], cfg: Folder3DConfig, *, train: bool) -> VolumeDataset:
    transform = _transform(cfg)
    images, labels, spacings = [], [], []
    for image_path, label_path in pairs:
        for p in (image_path, label_path):
            if not p.is_file():
                raise FileNotFoundError(f"no such file: {p}")
        item = transform({"image": str(image_path), "label": str(label_path)})
        image, label = item["image"], item["label"]
        spacing = tuple(float(s) for s in np.asarray(image.pixdim)[:3])  # MetaTensor: after Spacingd/Resized
        x = standardize(np.asarray(image.as_subclass(torch.Tensor), dtype=np.float64))
        images.append(torch.from_numpy(x[:1].copy()))
        labels.append(torch.from_numpy(np.rint(np.asarray(label.as_subclass(torch.Tensor))[:1]).astype(np.int64)))
        spacings.append(spacing)
    return VolumeDataset(images, labels, spacings, patch_size=cfg.patch_size, random_crops=train and not cfg.resize)


def load_folder3d(cfg: Folder3DConfig) -> SiloSplits:
    """Loads and splits a silo's volumes (see :class:`Folder3DConfig`); the split is seeded by ``cfg.seed``.

    Raises:
        FileNotFoundError: If the folder, datalist or a listed file does not exist.
        ValueError: On a folder without pairs, a bad datalist, or too few cases for the fractions.
    """
    pairs = _pairs(cfg.path)
    n = len(pairs)
    n_val, n_test = (math.floor(n * f + 0.5) for f in (cfg.val_fraction, cfg.test_fraction))
    if n - n_val - n_test < 1:
        raise ValueError(f"only {n} case(s): too few for val_fraction={cfg.val_fraction} and "
                         f"test_fraction={cfg.test_fraction}")
    order = np.random.default_rng(np.random.SeedSequence([_TAG_SPLIT, cfg.seed])).permutation(n)
    picked = [pairs[i] for i in order]
    return SiloSplits(train=_load(sorted(picked[n_test + n_val:]), cfg, train=True),
                      val=_load(sorted(picked[n_test: n_test + n_val]), cfg, train=False),
                      test=_load(sorted(picked[:n_test]), cfg, train=False))
