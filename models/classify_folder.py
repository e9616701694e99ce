"""User folders of labelled 2-D images for the classification Task: class sub-folders or a labels.csv, split by a seed."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsilo.core.validators import MappingConfig, check_int, check_seed, check_split_fractions, coerce_folder_path
from fedsilo.models.classify_data import IMAGE_CHANNELS, IMAGE_SUFFIXES, as_dataset, check_class_names
from fedsilo.models.data import SiloSplits

__all__ = ["ClassifyFolderConfig", "load_classify_folder"]

_TAG_FOLDER = 0xF01C


@dataclass(frozen=True, kw_only=True)
class ClassifyFolderConfig(MappingConfig):
    """A silo's folder of labelled images (the data options of a folder silo; layouts in :func:`load_classify_folder`).

    Attributes:
        path: The folder.
        classes: The class names in label order; empty: the sorted class sub-folder names, or the
            sorted labels of ``labels.csv``. Give the same list to every silo (and the model's
            ``class_names``), so that label ``i`` means one class everywhere, including classes
            a silo lacks.
        image_size: Side of the square images fed to the network (bilinear resize).
        seed: Seed of the train/val/test split.
        val_fraction: Share of the images held out for validation.
        test_fraction: Share held out for testing.
    """

    path: Path
    classes: tuple[str, ...] = ()
    image_size: int = 32
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "path", coerce_folder_path(owner, self.path))
        if isinstance(self.classes, list):
            object.__setattr__(self, "classes", tuple(self.classes))
        if self.classes != ():
            check_class_names(f"{owner}.classes", self.classes, minimum=2)
        check_int(owner, "image_size", self.image_size, minimum=8)
        check_seed(owner, "seed", self.seed)
        check_split_fractions(owner, self.val_fraction, self.test_fraction)


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_SUFFIXES)


def _read_image(path: Path, size: int) -> np.ndarray:
    """One image file as float32 RGB ``[3, size, size]`` in [0, 1]."""
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        if path.name.lower().endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                img.load()
                arr = np.asarray(img) if img.mode.startswith("I;16") else np.asarray(img.convert("RGB"))
    except Exception as exc:  # PIL and numpy raise their own kinds for a broken file
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., :3] if arr.shape[-1] != 1 else arr[..., 0]
    if arr.ndim not in (2, 3) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{path}: expected a grey [H, W] or colour [H, W, C] image, got {arr.dtype} {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        x = arr.astype(np.float64) / np.iinfo(arr.dtype).max
    else:
        x = arr.astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{path}: contains NaN or infinite values")
    x = np.clip(x, 0.0, 1.0)
    channels = [x] * IMAGE_CHANNELS if x.ndim == 2 else [x[..., c] for c in range(IMAGE_CHANNELS)]
    out = [c if c.shape == (size, size) else
           np.asarray(Image.fromarray(c.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
           for c in channels]
    return np.clip(np.stack(out), 0.0, 1.0).astype(np.float32)


def _class_index(classes: tuple[str, ...], name: str, where: str) -> int:
    if name not in classes:
        raise ValueError(f"{where}: class {name!r} is not one of the classes {list(classes)}")
    return classes.index(name)


def _from_subfolders(root: Path, classes: tuple[str, ...]) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no labels.csv and no class sub-folders (<class>/*.png|*.jpg|*.npy)")
    classes = classes or tuple(p.name for p in folders)
    items = [(f, _class_index(classes, folder.name, str(folder)))
             for folder in folders for f in sorted(folder.iterdir()) if _is_image(f)]
    return items, classes


def _from_csv(root: Path, classes: tuple[str, ...]) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    table = root / "labels.csv"
    try:
        with table.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"cannot read {table}: {exc}") from exc
    if not rows or [h.strip() for h in rows[0]] != ["path", "label"]:
        raise ValueError(f"{table}: the first row must be the header 'path,label'")
    entries = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"{table}: row {line} must be 'path,label' with both filled, got {row!r}")
        entries.append((line, root / row[0].strip(), row[1].strip()))
    classes = classes or tuple(sorted({label for _, _, label in entries}))
    items = []
    for line, path, label in entries:
        index = _class_index(classes, label, f"{table} row {line}")
        if not path.name.lower().endswith(IMAGE_SUFFIXES):
            raise ValueError(f"{table} row {line}: unsupported file type {path} (supported: {', '.join(IMAGE_SUFFIXES)})")
        if not path.is_file():
            raise FileNotFoundError(f"{table} row {line}: image file not found: {path}")
        items.append((path, index))
    return items, classes


def load_classify_folder(cfg: ClassifyFolderConfig) -> SiloSplits:
    """Reads a folder of labelled images and splits it (train, val, test).

    Two layouts are accepted (``labels.csv`` wins if present):

    * one sub-folder per class: ``<path>/<class name>/<image>`` (the sub-folder's name is the label;
      files of other types and hidden entries are skipped);
    * a table ``<path>/labels.csv`` with the header ``path,label`` and one row per image: its
      path relative to the folder and its class name.

    Images are PNG or JPEG (8-bit or 16-bit; converted to RGB) or NPY arrays (grey ``[H, W]`` or
    ``[H, W, C]`` with 1, 3 or 4 channels, alpha dropped; integers divided by their type's
    maximum, floats taken as [0, 1]); every image is resized to ``image_size`` squared
    (bilinear) and clipped to [0, 1]. The split is a permutation seeded by ``cfg.seed``:
    ``round(N * test_fraction)`` images for testing, ``round(N * val_fraction)`` for
    validation, the rest (at least one) for training. Everything is read eagerly, so a bad file
    fails here, not mid-training.

    Raises:
        FileNotFoundError: If the folder, or an image ``labels.csv`` names, does not exist.
        ValueError: On no images, fewer than two classes, a class (sub-folder or label) not in
            ``classes``, a malformed ``labels.csv`` or an unreadable image; the message names the file.
    """
    if not isinstance(cfg, ClassifyFolderConfig):
        raise ValueError(f"cfg must be a ClassifyFolderConfig, got {type(cfg).__name__}")
    root = cfg.path.expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image classification folder {root} does not exist")
    items, classes = (_from_csv if (root / "labels.csv").is_file() else _from_subfolders)(root, cfg.classes)
    if not items:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)} files)")
    if len(classes) < 2:
        raise ValueError(f"{root}: found only the class {list(classes)}; classification needs at least two "
                         "(list them all with the option classes)")
    n = len(items)
    n_test = math.floor(n * cfg.test_fraction + 0.5)
    n_val = math.floor(n * cfg.val_fraction + 0.5)
    if n - n_test - n_val < 1:
        raise ValueError(f"{root}: only {n} image(s), too few for val_fraction={cfg.val_fraction} "
                         f"and test_fraction={cfg.test_fraction}")
    images = np.stack([_read_image(path, cfg.image_size) for path, _ in items])
    labels = np.array([label for _, label in items], dtype=np.int64)
    order = np.random.default_rng(np.random.SeedSequence([_TAG_FOLDER, cfg.seed])).permutation(n)
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return SiloSplits(**{k: as_dataset(images[np.sort(v)], labels[np.sort(v)], classes) for k, v in parts.items()})
