"""User folders of paired fundus photographs, OCT B-scans, disc/cup masks and glaucoma grades: a datalist.csv, split by a seed."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedsilo.core.validators import MappingConfig, check_int, check_seed, check_split_fractions, coerce_folder_path
from fedsilo.models.data import SiloSplits
from fedsilo.models.glaucoma_data import GRADES, GlaucomaDataset

__all__ = ["DATALIST", "MASK_ENCODINGS", "GlaucomaFolderConfig", "load_glaucoma_folder"]

#: The table every glaucoma folder holds.
DATALIST = "datalist.csv"
#: How mask PNGs encode the labels (see :class:`GlaucomaFolderConfig`).
MASK_ENCODINGS = ("auto", "labels", "grey", "refuge")
_COLUMNS = ["fundus", "oct", "mask", "grade"]
_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
_TAG_FOLDER = 0x6F01


@dataclass(frozen=True, kw_only=True)
class GlaucomaFolderConfig(MappingConfig):
    """A silo's folder of glaucoma examples (the data options of a folder silo; layout in :func:`load_glaucoma_folder`).

    Attributes:
        path: The folder holding ``datalist.csv``.
        image_size: Side of the square fundus photographs and masks fed to the network (fundus
            bilinear, masks nearest-neighbour).
        oct_size: ``(height, width)`` of the OCT B-scans fed to the network (bilinear).
        seed: Seed of the train/val/test split.
        val_fraction: Share of the examples held out for validation.
        test_fraction: Share held out for testing.
        mask_encoding: ``"labels"``: pixel values 0 (background), 1 (rim), 2 (cup);
            ``"grey"``: 0 background, 128 rim, 255 cup; ``"refuge"``: the REFUGE challenge's
            inverted grey, 255 background, 128 rim, 0 cup; ``"auto"`` (default): ``"labels"`` when
            every value is in {0, 1, 2}, else ``"grey"`` (so REFUGE masks need ``"refuge"``).
    """

    path: Path
    image_size: int = 64
    oct_size: tuple[int, ...] = (32, 64)
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    mask_encoding: str = "auto"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "path", coerce_folder_path(owner, self.path))
        check_int(owner, "image_size", self.image_size, minimum=8)
        if isinstance(self.oct_size, list):
            object.__setattr__(self, "oct_size", tuple(self.oct_size))
        if not isinstance(self.oct_size, tuple) or len(self.oct_size) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 8 for v in self.oct_size):
            raise ValueError(f"{owner}.oct_size must be (height, width), two ints >= 8, got {self.oct_size!r}")
        check_seed(owner, "seed", self.seed)
        check_split_fractions(owner, self.val_fraction, self.test_fraction)
        if self.mask_encoding not in MASK_ENCODINGS:
            raise ValueError(f"{owner}.mask_encoding must be one of {list(MASK_ENCODINGS)}, got {self.mask_encoding!r}")


def _read_array(path: Path, *, colour: bool, labels: bool = False) -> np.ndarray:
    """An image file as an array: ``[H, W, 3]`` (colour) or ``[H, W]`` (grey; a colour file whose channels
    differ is refused), in its own dtype; ``labels``: a palette PNG gives its indices."""
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    if not path.name.lower().endswith(_SUFFIXES):
        raise ValueError(f"{path}: unsupported file type (supported: {', '.join(_SUFFIXES)})")
    try:
        if path.name.lower().endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                img.load()
                if img.mode.startswith("I;16") or img.mode in ("I", "F", "L") or (labels and img.mode == "P"):
                    arr = np.asarray(img)
                else:
                    arr = np.asarray(img.convert("RGB"))
    except Exception as exc:  # PIL and numpy raise their own kinds for a broken file
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., :3] if arr.shape[-1] != 1 else arr[..., 0]
    if arr.ndim not in (2, 3) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{path}: expected a grey [H, W] or colour [H, W, C] image, got {arr.dtype} {arr.shape}")
    if arr.ndim == 3 and not colour:
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[-1])):
            raise ValueError(f"{path}: expected a grey image, got colour {arr.shape}")
        arr = arr[..., 0]
    if arr.ndim == 2 and colour:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr


def _unit(arr: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float64) / np.iinfo(arr.dtype).max
    x = arr.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{path}: contains NaN or infinite values")
    return np.clip(x, 0.0, 1.0)


def _resized(x: np.ndarray, size: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """A 2-D array resized to ``size`` = (height, width)."""
    from PIL import Image

    if x.shape == size:
        return x
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(x.astype(np.float32)).resize((size[1], size[0]), mode))


def _read_fundus(path: Path, size: int) -> np.ndarray:
    x = _unit(_read_array(path, colour=True), path)
    return np.clip(np.stack([_resized(x[..., c], (size, size)) for c in range(3)]), 0, 1).astype(np.float32)


def _read_oct(path: Path, size: tuple[int, int]) -> np.ndarray:
    return np.clip(_resized(_unit(_read_array(path, colour=False), path), size), 0, 1)[None].astype(np.float32)


def _read_mask(path: Path, size: int, encoding: str) -> np.ndarray:
    arr = _read_array(path, colour=False, labels=True)
    if not np.issubdtype(arr.dtype, np.integer) and not np.array_equal(arr, np.round(arr)):
        raise ValueError(f"{path}: a mask must hold whole-number labels")
    values = set(np.unique(arr).astype(np.int64).tolist())
    if encoding == "auto":
        encoding = "labels" if values <= {0, 1, 2} else "grey"
    table = {"labels": {0: 0, 1: 1, 2: 2}, "grey": {0: 0, 128: 1, 255: 2}, "refuge": {255: 0, 128: 1, 0: 2}}[encoding]
    if not values <= set(table):
        raise ValueError(f"{path}: mask values {sorted(values)} are not all in {sorted(table)} "
                         f"(mask_encoding {encoding!r}: {table})")
    labels = np.zeros(arr.shape, dtype=np.int64)
    for value, label in table.items():
        labels[arr == value] = label
    return _resized(labels, (size, size), nearest=True).astype(np.int64)


def _grade(text: str, where: str) -> int:
    if text in GRADES:
        return GRADES.index(text)
    if text.isdigit() and int(text) < len(GRADES):
        return int(text)
    raise ValueError(f"{where}: grade {text!r} is neither one of {list(GRADES)} nor an index 0..{len(GRADES) - 1}")


def _rows(root: Path) -> list[tuple[int, list[str]]]:
    table = root / DATALIST
    if not table.is_file():
        raise FileNotFoundError(f"{root}: no {DATALIST} (columns {','.join(_COLUMNS)})")
    try:
        with table.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"cannot read {table}: {exc}") from exc
    if not rows or [h.strip() for h in rows[0]] != _COLUMNS:
        raise ValueError(f"{table}: the first row must be the header '{','.join(_COLUMNS)}'")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        cells = [c.strip() for c in row]
        if len(cells) != len(_COLUMNS) or not (cells[0] and cells[2] and cells[3]):
            raise ValueError(f"{table} row {line} must be '{','.join(_COLUMNS)}' with fundus, mask and grade "
                             f"filled (oct may be empty), got {row!r}")
        out.append((line, cells))
    if not out:
        raise ValueError(f"{table}: no examples")
    return out


def load_glaucoma_folder(cfg: GlaucomaFolderConfig) -> SiloSplits:
    """Reads a folder of glaucoma examples and splits it (train, val, test).

    The folder holds ``datalist.csv`` with the header ``fundus,oct,mask,grade`` and one row per
    eye: the fundus photograph, the OCT B-scan (empty for an example without OCT: its OCT is zeros
    and ``has_oct`` false), the disc/cup mask of the fundus photograph (values per
    ``cfg.mask_encoding``), all paths relative to the folder; and the grade, a name of
    :data:`~fedsilo.models.glaucoma_data.GRADES` or its index. Images are PNG, JPEG or NPY (8- or
    16-bit integers divided by their maximum, floats taken as [0, 1]); fundus photographs are
    converted to RGB, OCT scans to grey. The split is a permutation seeded by ``cfg.seed``:
    ``round(N * test_fraction)`` for testing, ``round(N * val_fraction)`` for validation, the rest
    (at least one) for training. Everything is read eagerly, so a bad file fails here.

    Raises:
        FileNotFoundError: If the folder, its ``datalist.csv`` or a file it names does not exist.
        ValueError: On a malformed ``datalist.csv``, a bad grade, an unreadable image or a mask with
            values outside its encoding; the message names the file (and the row).
    """
    if not isinstance(cfg, GlaucomaFolderConfig):
        raise ValueError(f"cfg must be a GlaucomaFolderConfig, got {type(cfg).__name__}")
    root = cfg.path.expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"glaucoma data folder {root} does not exist")
    rows = _rows(root)
    n = len(rows)
    n_test = math.floor(n * cfg.test_fraction + 0.5)
    n_val = math.floor(n * cfg.val_fraction + 0.5)
    if n - n_test - n_val < 1:
        raise ValueError(f"{root}: only {n} example(s), too few for val_fraction={cfg.val_fraction} "
                         f"and test_fraction={cfg.test_fraction}")
    size, (h, w) = cfg.image_size, cfg.oct_size
    fundus = np.zeros((n, 3, size, size), np.float32)
    octs = np.zeros((n, 1, h, w), np.float32)
    has = np.zeros(n, bool)
    masks = np.zeros((n, size, size), np.int64)
    grades = np.zeros(n, np.int64)
    for i, (line, (f, o, m, g)) in enumerate(rows):
        where = f"{root / DATALIST} row {line}"
        grades[i] = _grade(g, where)
        try:
            fundus[i] = _read_fundus(root / f, size)
            masks[i] = _read_mask(root / m, size, cfg.mask_encoding)
            if o:
                octs[i], has[i] = _read_oct(root / o, (h, w)), True
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{where}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    order = np.random.default_rng(np.random.SeedSequence([_TAG_FOLDER, cfg.seed])).permutation(n)
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}

    def subset(idx: np.ndarray) -> GlaucomaDataset:
        idx = np.sort(idx)
        return GlaucomaDataset(*(torch.from_numpy(np.ascontiguousarray(a[idx])) for a in (fundus, octs, has, masks, grades)),
                               has_oct_modality=bool(has.any()))

    return SiloSplits(**{k: subset(v) for k, v in parts.items()})
