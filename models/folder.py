"""Real-data loader: a folder of image/mask pairs (PNG or NIfTI) or a MONAI datalist JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsilo.core.validators import MappingConfig, check_int, check_seed, check_split_fractions, coerce_folder_path
from fedsilo.models.data import SegmentationDataset, SiloSplits, standardize

__all__ = ["SUPPORTED_SUFFIXES", "FolderConfig", "load_folder"]

#: File name endings the loader reads (case-insensitive).
SUPPORTED_SUFFIXES = (".png", ".nii", ".nii.gz")
_TAG_SPLIT = 0xF01D
_LOW_PERCENTILE = 0.5
_HIGH_PERCENTILE = 99.5


@dataclass(frozen=True, kw_only=True)
class FolderConfig(MappingConfig):
    """Where a silo's real data lives and how to split it.

    Attributes:
        path: A folder holding ``images/`` and ``masks/`` (or ``labels/``), or a MONAI
            datalist ``.json`` file. A string is converted to a Path.
        image_size: Side of the square images fed to the network (bilinear for images,
            nearest for masks).
        val_fraction: Share of the pairs held out for validation (unless a datalist gives a
            ``validation`` list).
        test_fraction: Share held out for testing (unless a datalist gives a ``test`` list).
        seed: Seed of the split.
    """

    path: Path
    image_size: int = 64
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "path", coerce_folder_path(owner, self.path))
        check_int(owner, "image_size", self.image_size, minimum=8)
        check_split_fractions(owner, self.val_fraction, self.test_fraction)
        check_seed(owner, "seed", self.seed)



def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in (".nii.gz", ".nii", ".png"):
        if name.endswith(suffix):
            return suffix
    return None


def _stem(path: Path) -> str:
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def _read_array(path: Path, *, is_mask: bool) -> np.ndarray:
    """Reads one PNG or NIfTI file as a 2-D float64 array."""
    from PIL import Image

    suffix = _suffix(path)
    if suffix is None:
        raise ValueError(f"unsupported file type {path} (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        if suffix == ".png":
            with Image.open(path) as img:
                img.load()
                if img.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV"):
                    img = img.convert("L")
                elif img.mode == "P" and not is_mask:
                    img = img.convert("L")
                arr = np.asarray(img, dtype=np.float64)
        else:
            import nibabel as nib

            arr = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float64))
    except Exception as exc:  # PIL, nibabel, gzip and zlib each raise their own kinds
        raise ValueError(f"cannot read {path}: {exc}") from exc
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D image (or 3-D with one singleton axis), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{path}: contains NaN or infinite values")
    return arr


def _resize(arr: np.ndarray, size: int, *, nearest: bool) -> np.ndarray:
    from PIL import Image

    if arr.shape == (size, size):
        return arr
    img = Image.fromarray(arr.astype(np.float32))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(img.resize((size, size), resample=resample), dtype=np.float64)


def _normalise_image(arr: np.ndarray) -> np.ndarray:
    """Robust per-image scaling to [0, 1] (0.5th-99.5th percentile, clipped), then standardised."""
    lo, hi = np.percentile(arr, [_LOW_PERCENTILE, _HIGH_PERCENTILE])
    x01 = np.clip((arr - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(arr)
    return standardize(x01)


def _load_pairs(pairs: Sequence[tuple[Path, Path]], size: int) -> SegmentationDataset:
    images = np.empty((len(pairs), 1, size, size), dtype=np.float32)
    masks = np.empty((len(pairs), 1, size, size), dtype=np.int64)
    for i, (image_path, mask_path) in enumerate(pairs):
        image = _read_array(image_path, is_mask=False)
        mask = _read_array(mask_path, is_mask=True)
        if image.shape != mask.shape:
            raise ValueError(f"image {image_path} has shape {image.shape} but mask {mask_path} has {mask.shape}")
        images[i, 0] = _normalise_image(_resize(image, size, nearest=False))
        masks[i, 0] = _resize((mask > 0).astype(np.float64), size, nearest=True) > 0.5
    return SegmentationDataset(torch.from_numpy(images), torch.from_numpy(masks))


def _index_folder(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file() or _suffix(entry) is None:
            continue
        stem = _stem(entry)
        if stem in out:
            raise ValueError(f"two files share the stem {stem!r} in {folder}: {out[stem].name} and {entry.name}")
        out[stem] = entry
    return out


def _folder_pairs(root: Path) -> list[tuple[Path, Path]]:
    image_dir = root / "images"
    candidates = [root / name for name in ("masks", "labels") if (root / name).is_dir()]
    if not image_dir.is_dir() or not candidates:
        raise ValueError(f"{root} must contain an images/ folder and a masks/ (or labels/) folder")
    if len(candidates) > 1:
        raise ValueError(f"{root} has both masks/ and labels/; keep only one")
    mask_dir = candidates[0]
    images = _index_folder(image_dir)
    masks = _index_folder(mask_dir)
    if not images:
        raise ValueError(
            f"no image/mask pairs in {root}: {image_dir} has no {', '.join(SUPPORTED_SUFFIXES)} files"
        )
    for stem, image_path in images.items():
        if stem not in masks:
            raise ValueError(f"image {image_path} has no mask in {mask_dir} (expected a file with stem {stem!r})")
    for stem, mask_path in masks.items():
        if stem not in images:
            raise ValueError(f"mask {mask_path} has no image in {image_dir} (expected a file with stem {stem!r})")
    return [(images[s], masks[s]) for s in sorted(images)]


def _datalist_entries(doc: Mapping[str, Any], key: str, base: Path, source: Path) -> list[tuple[Path, Path]]:
    entries = doc[key]
    if not isinstance(entries, list):
        raise ValueError(f"{source}: {key!r} must be a list, got {type(entries).__name__}")
    pairs: list[tuple[Path, Path]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("image"), str):
            raise ValueError(f"{source}: {key}[{i}] must be an object with an 'image' path, got {entry!r}")
        if not isinstance(entry.get("label"), str):
            raise ValueError(f"{source}: {key}[{i}] ({entry['image']}) has no 'label' path; every entry needs a mask")
        pairs.append((base / entry["image"], base / entry["label"]))
    return pairs


def _split(
    pairs: list[tuple[Path, Path]], cfg: FolderConfig, *, want_val: bool, want_test: bool
) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    n = len(pairs)
    n_val = math.floor(n * cfg.val_fraction + 0.5) if want_val else 0  # round half up
    n_test = math.floor(n * cfg.test_fraction + 0.5) if want_test else 0
    if n - n_val - n_test < 1:
        raise ValueError(
            f"only {n} pair(s): too few for val_fraction={cfg.val_fraction} and test_fraction={cfg.test_fraction}"
        )
    order = np.random.default_rng(np.random.SeedSequence([_TAG_SPLIT, cfg.seed])).permutation(n)
    picked = [pairs[i] for i in order]
    test = sorted(picked[:n_test])
    val = sorted(picked[n_test : n_test + n_val])
    train = sorted(picked[n_test + n_val :])
    return train, val, test


def _load_datalist(path: Path, cfg: FolderConfig) -> SiloSplits:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read datalist {path}: {exc}") from exc
    if not isinstance(doc, Mapping) or "training" not in doc:
        raise ValueError(f"datalist {path} must be a JSON object with a 'training' list")
    base = path.parent
    training = _datalist_entries(doc, "training", base, path)
    if not training:
        raise ValueError(f"no image/mask pairs: the 'training' list of {path} is empty")
    test_keys = [k for k in ("test", "testing") if k in doc]
    if len(test_keys) > 1:
        raise ValueError(f"datalist {path} has both 'test' and 'testing'; keep only one")
    val = _datalist_entries(doc, "validation", base, path) if "validation" in doc else None
    test = _datalist_entries(doc, test_keys[0], base, path) if test_keys else None
    train, split_val, split_test = _split(training, cfg, want_val=val is None, want_test=test is None)
    return SiloSplits(
        train=_load_pairs(train, cfg.image_size),
        val=_load_pairs(val if val is not None else split_val, cfg.image_size),
        test=_load_pairs(test if test is not None else split_test, cfg.image_size),
    )


def load_folder(cfg: FolderConfig) -> SiloSplits:
    """Loads a silo's real data and splits it deterministically.

    Two layouts are accepted:

    * A folder with ``images/`` and ``masks/`` (or ``labels/``): files are paired by stem
      (``case1.png`` with ``case1.png``, ``case1.nii.gz`` with ``case1.nii.gz`` or
      ``case1.png``); every image needs a mask and every mask an image.
    * A MONAI datalist JSON: ``{"training": [{"image": ..., "label": ...}, ...]}`` with paths
      relative to the JSON's folder (absolute paths also work). Optional ``validation`` and
      ``test`` (or ``testing``) lists are used as given; missing ones are split from
      ``training`` by the configured fractions. Every entry needs a ``label``.

    Files are PNG (colour converted to grey; palette masks keep their indices) or NIfTI
    (2-D, or 3-D/4-D with singleton axes). Images are resized to ``image_size`` squared
    (bilinear), scaled per image to [0, 1] between their 0.5th and 99.5th percentiles, then
    put on the same input scale as the built-in data; masks are resized by nearest neighbour
    and binarised (label > 0 is foreground). Image and mask must have equal shapes.
    Everything is read eagerly, so a bad file fails here, not mid-training.

    Args:
        cfg: The folder config.

    Returns:
        The train/val/test splits; the split depends only on ``cfg.seed`` and the file list.

    Raises:
        FileNotFoundError: If the path, or a file the datalist names, does not exist.
        ValueError: If there are no pairs, an image lacks its mask (named in the message),
            a file cannot be read or is not 2-D, or the layout is not recognised.
    """
    if not isinstance(cfg, FolderConfig):
        raise ValueError(f"cfg must be a FolderConfig, got {type(cfg).__name__}")
    path = cfg.path.expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset path does not exist: {path}")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ValueError(f"{path} is a file but not a .json datalist; point at a folder or a datalist")
        return _load_datalist(path, cfg)
    pairs = _folder_pairs(path)
    train, val, test = _split(pairs, cfg, want_val=True, want_test=True)
    return SiloSplits(
        train=_load_pairs(train, cfg.image_size),
        val=_load_pairs(val, cfg.image_size),
        test=_load_pairs(test, cfg.image_size),
    )
