"""Animal-activity sensor windows: the built-in multi-species generator, the NPY/CSV folder loader and batching."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedsilo.core.validators import MappingConfig, check_float, check_int, check_seed, check_split_fractions
from fedsilo.models.data import SiloSplits

__all__ = [
    "BEHAVIOURS",
    "BUILTIN_SPECIES",
    "SENSOR_CHANNELS",
    "SensorDataset",
    "SensorFolderConfig",
    "SensorInputs",
    "SyntheticSensorConfig",
    "check_species_name",
    "collate_sensor",
    "domain_species",
    "load_sensor_folder",
    "sensor_silo_splits",
    "sensor_unseen",
]

#: The behaviour classes, in label order (label ``i`` is ``BEHAVIOURS[i]``).
BEHAVIOURS = ("standing", "walking", "running", "grazing", "lying")
#: The species of the built-in generator; built-in domain ``i`` holds ``BUILTIN_SPECIES[(i // 2) % 4]``.
BUILTIN_SPECIES = ("horse", "sheep", "cattle", "goat")
#: Channels of a built-in window: accelerometer x, y, z, then gyroscope x, y, z.
SENSOR_CHANNELS = 6

_SPECIES_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_TAG_SPECIES, _TAG_DOMAIN, _TAG_DEVICE, _TAG_SPLIT = 0x5E45, 0xD0A1, 0xDE71, 0x5711


def check_species_name(owner: str, name: object) -> str:
    """Returns ``name`` if it is a species name (lower-case letters, digits, ``_``; a letter first; <= 32).

    Species names key ``nn.ModuleDict`` entries and appear in ``state_dict`` names, so they may
    not contain dots.

    Raises:
        ValueError: Naming ``owner`` and the bad value.
    """
    if not isinstance(name, str) or not _SPECIES_NAME.match(name):
        raise ValueError(f"{owner}: species {name!r} must be lower-case letters, digits or '_', "
                         "starting with a letter, at most 32 characters")
    return name


def domain_species(domain: int) -> str:
    """The species of built-in domain ``domain``: ``BUILTIN_SPECIES[(domain // 2) % 4]``.

    Domains 0 and 1 are horse farms, 2 and 3 sheep, 4 and 5 cattle, 6 and 7 goat, then it
    repeats; two domains of one species differ in their label imbalance and windows.
    """
    check_int("domain_species", "domain", domain, minimum=0)
    return BUILTIN_SPECIES[(domain // 2) % len(BUILTIN_SPECIES)]


class SensorDataset(Dataset[tuple[tuple[torch.Tensor, str], torch.Tensor]]):
    """Sensor windows of one species held in memory.

    Items are ``((window float32 [C, T], species name), label int64 scalar)``.

    Attributes:
        windows: float32 tensor ``[N, C, T]``.
        labels: int64 tensor ``[N]``.
        species: The species every window comes from.
    """

    def __init__(self, windows: torch.Tensor, labels: torch.Tensor, species: str) -> None:
        """Wraps stacked tensors.

        Raises:
            ValueError: On wrong ranks, dtypes, mismatched lengths, negative labels or a bad species name.
        """
        if windows.dim() != 3 or windows.dtype != torch.float32:
            raise ValueError(f"windows must be float32 [N, C, T], got {windows.dtype} {tuple(windows.shape)}")
        if labels.dim() != 1 or labels.dtype != torch.int64 or labels.shape[0] != windows.shape[0]:
            raise ValueError(f"labels must be int64 [N] with N = {windows.shape[0]}, "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError("labels must be >= 0")
        self.windows = windows
        self.labels = labels
        self.species = check_species_name("SensorDataset", species)

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, str], torch.Tensor]:
        return (self.windows[index], self.species), self.labels[index]

    def __repr__(self) -> str:
        return f"SensorDataset(n={len(self)}, species={self.species!r}, window={tuple(self.windows.shape[1:])})"


class SensorInputs(tuple):  # type: ignore[type-arg]
    """A batch's network inputs: the pair ``(x float32 [N, C, T], species_idx int64 [N])``.

    ``species_idx[i]`` indexes ``names``, the species of the batch; the network maps those names
    onto its own species list (so the data need not know the run's list). It unpacks as a pair
    (``x, species_idx = inputs``) and, like a tensor batch, has ``shape`` (that of ``x``), slices
    along the batch (``inputs[:0]`` is an empty batch) and moves with ``to``, which DP-SGD's loop uses.
    """

    names: tuple[str, ...]

    def __new__(cls, x: torch.Tensor, species_idx: torch.Tensor, names: Sequence[str]) -> SensorInputs:
        """Builds the pair; ``names`` are the species ``species_idx`` indexes."""
        self = super().__new__(cls, (x, species_idx))
        self.names = tuple(names)
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:
        return (self[0], self[1], self.names)

    @property
    def x(self) -> torch.Tensor:
        """The windows ``[N, C, T]``."""
        return tuple.__getitem__(self, 0)

    @property
    def species_idx(self) -> torch.Tensor:
        """Each window's species, an index into :attr:`names`."""
        return tuple.__getitem__(self, 1)

    @property
    def shape(self) -> torch.Size:
        """The shape of :attr:`x` (the batch size first)."""
        return self.x.shape

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):  # a slice of the batch, not of the pair
            return SensorInputs(self.x[key], self.species_idx[key], self.names)
        return tuple.__getitem__(self, key)

    def to(self, *args: Any, **kwargs: Any) -> SensorInputs:
        """Both tensors moved (``x`` also cast) as ``Tensor.to``; the index stays int64."""
        x = self.x.to(*args, **kwargs)
        return SensorInputs(x, self.species_idx.to(x.device), self.names)


def collate_sensor(dataset: Dataset[Any], indices: Sequence[int], device: torch.device) -> tuple[SensorInputs, torch.Tensor]:
    """Stacks examples ``indices`` of a sensor dataset into ``(SensorInputs(x, species_idx, names), labels [N])``.

    ``names`` lists the batch's species in order of first appearance. Works on any map-style
    dataset of :class:`SensorDataset` items (a ``Subset`` or ``ConcatDataset`` of them too).
    """
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    names: list[str] = []
    idx: list[int] = []
    for i in indices:
        (x, species), y = dataset[i]
        if species not in names:
            names.append(species)
        idx.append(names.index(species))
        xs.append(torch.as_tensor(x, dtype=torch.float32))
        ys.append(torch.as_tensor(y, dtype=torch.int64))
    if xs:
        x_batch = torch.stack(xs)
        y_batch = torch.stack(ys).reshape(-1)
    else:
        x_batch = torch.zeros((0, SENSOR_CHANNELS, 1), dtype=torch.float32)
        y_batch = torch.zeros((0,), dtype=torch.int64)
    inputs = SensorInputs(x_batch.to(device), torch.tensor(idx, dtype=torch.int64, device=device), names)
    return inputs, y_batch.to(device)


# -- the built-in generator ------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SyntheticSensorConfig(MappingConfig):
    """The built-in generator of collar/leg-sensor windows (the data options of a built-in silo).

    Every behaviour has a generic motion shared by all species (gravity direction, gait frequency,
    amplitude, gyroscope coupling); each species rescales it (its gait frequency and amplitude),
    adds its own harmonic, sees it through its own sensor placement (a rotation of the
    accelerometer and gyroscope axes) and has its own noise level. Each domain (silo) draws its own
    label imbalance.

    Attributes:
        seed: Seed of the species' traits, the windows and the splits.
        window: Samples per window (T).
        n_train: Training windows per silo.
        n_val: Validation windows per silo.
        n_test: Test windows per silo.
        n_unseen: Windows of the unseen device per silo.
        imbalance: Strength of the per-silo label imbalance (0: uniform labels; 1: a class may be
            several times as frequent as another).
    """

    seed: int = 0
    window: int = 64
    n_train: int = 240
    n_val: int = 60
    n_test: int = 120
    n_unseen: int = 120
    imbalance: float = 1.0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_seed(owner, "seed", self.seed)
        check_int(owner, "window", self.window, minimum=8)
        check_int(owner, "n_train", self.n_train, minimum=1)
        for name in ("n_val", "n_test", "n_unseen"):
            check_int(owner, name, getattr(self, name), minimum=0)
        check_float(owner, "imbalance", self.imbalance, low=0.0, high=5.0)


# generic per behaviour: gait cycles per second-ish window unit, accel amplitude, gravity direction
_FREQ = np.array([0.3, 3.0, 6.5, 1.2, 0.15])
_AMP = np.array([0.05, 0.35, 0.9, 0.2, 0.03])
_GRAVITY = np.array([[0.0, 0.0, 1.0], [0.0, 0.1, 0.99], [0.0, 0.2, 0.98], [0.7, 0.0, 0.71], [0.0, 0.95, 0.3]])
_MOTION_AXIS = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.4], [1.0, 0.0, 0.8], [0.3, 1.0, 0.5], [0.0, 0.0, 1.0]])


def _rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """A rotation by at most ``max_angle`` radians about a random axis (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


@dataclass(frozen=True)
class _Traits:
    freq: float
    amp: float
    rotation: np.ndarray
    harmonic: np.ndarray  # [n_behaviours] weight of the species' second harmonic
    noise: float


def _species_traits(seed: int, species: int) -> _Traits:
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_SPECIES, seed, species]))
    return _Traits(freq=float(rng.uniform(0.7, 1.4)), amp=float(rng.uniform(0.7, 1.4)),
                   rotation=_rotation(rng, math.pi / 3), harmonic=rng.uniform(-0.6, 0.6, size=len(BEHAVIOURS)),
                   noise=float(rng.uniform(0.1, 0.2)))


def _windows(rng: np.random.Generator, traits: _Traits, labels: np.ndarray, window: int, *,
             device_rotation: np.ndarray | None = None, device_noise: float = 1.0,
             device_bias: np.ndarray | None = None) -> np.ndarray:
    """float32 windows ``[N, 6, window]`` of behaviours ``labels`` for one species (and device)."""
    n = len(labels)
    t = np.arange(window) / window
    freq = _FREQ[labels] * traits.freq * rng.uniform(0.9, 1.1, size=n)
    amp = _AMP[labels] * traits.amp * rng.uniform(0.8, 1.2, size=n)
    phase = rng.uniform(0, 2 * np.pi, size=n)
    arg = 2 * np.pi * freq[:, None] * t[None, :] + phase[:, None]  # [N, T]
    wave = np.sin(arg) + traits.harmonic[labels][:, None] * np.sin(2 * arg + 0.5)
    grazing = labels == BEHAVIOURS.index("grazing")  # head bobs: bursts of a fast nibble
    wave[grazing] += 0.6 * np.sin(5 * arg[grazing]) * (np.sin(0.5 * arg[grazing]) > 0)
    axis = _MOTION_AXIS[labels] / np.linalg.norm(_MOTION_AXIS[labels], axis=1, keepdims=True)
    accel = _GRAVITY[labels][:, :, None] + amp[:, None, None] * axis[:, :, None] * wave[:, None, :]
    gyro = 0.5 * amp[:, None, None] * np.roll(axis, 1, axis=1)[:, :, None] * np.cos(arg)[:, None, :]
    rot = traits.rotation if device_rotation is None else device_rotation @ traits.rotation
    accel = np.einsum("ij,njt->nit", rot, accel)
    gyro = np.einsum("ij,njt->nit", rot, gyro)
    x = np.concatenate([accel, gyro], axis=1)
    x += rng.normal(scale=traits.noise * device_noise, size=x.shape)
    if device_bias is not None:
        x += device_bias[None, :, None]
    return x.astype(np.float32)


def _label_prior(seed: int, domain: int, imbalance: float) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_DOMAIN, seed, domain]))
    logits = imbalance * rng.normal(size=len(BEHAVIOURS))
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _labels(rng: np.random.Generator, prior: np.ndarray, n: int) -> np.ndarray:
    """``n`` labels drawn from ``prior``, every class at least once when ``n`` allows (so each split sees all)."""
    k = len(prior)
    fixed = np.arange(k) if n >= 2 * k else np.zeros(0, dtype=np.int64)
    drawn = rng.choice(k, size=n - len(fixed), p=prior)
    return rng.permutation(np.concatenate([fixed, drawn])).astype(np.int64)


def _dataset(windows: np.ndarray, labels: np.ndarray, species: str) -> SensorDataset:
    return SensorDataset(torch.from_numpy(np.ascontiguousarray(windows)), torch.from_numpy(labels), species)


def sensor_silo_splits(cfg: SyntheticSensorConfig, domain: int) -> SiloSplits:
    """The train/val/test windows of built-in domain ``domain`` (species :func:`domain_species`).

    Deterministic in (``cfg``, ``domain``); the labels of all three splits follow the domain's
    own label prior (its imbalance).
    """
    check_int("sensor_silo_splits", "domain", domain, minimum=0)
    species = domain_species(domain)
    traits = _species_traits(cfg.seed, BUILTIN_SPECIES.index(species))
    prior = _label_prior(cfg.seed, domain, cfg.imbalance)
    out = {}
    for i, (split, n) in enumerate((("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test))):
        rng = np.random.default_rng(np.random.SeedSequence([_TAG_SPLIT, cfg.seed, domain, i]))
        labels = _labels(rng, prior, n)
        out[split] = _dataset(_windows(rng, traits, labels, cfg.window), labels, species)
    return SiloSplits(**out)


def sensor_unseen(cfg: SyntheticSensorConfig, domain: int) -> SensorDataset:
    """The unseen domain of built-in domain ``domain``: its species worn with a device no silo has.

    The device (the same for every silo of a seed) is mounted at another angle (a rotation of
    up to 60 degrees on top of the species' placement), is twice as noisy and has a
    constant offset per axis; labels are balanced. The windows keep their species, so the
    network routes them through the species' branch.
    """
    check_int("sensor_unseen", "domain", domain, minimum=0)
    species = domain_species(domain)
    traits = _species_traits(cfg.seed, BUILTIN_SPECIES.index(species))
    dev = np.random.default_rng(np.random.SeedSequence([_TAG_DEVICE, cfg.seed]))
    rotation = _rotation(dev, math.pi / 3)
    bias = dev.uniform(-0.1, 0.1, size=SENSOR_CHANNELS)
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_DEVICE, cfg.seed, domain]))
    labels = _labels(rng, np.full(len(BEHAVIOURS), 1 / len(BEHAVIOURS)), cfg.n_unseen)
    windows = _windows(rng, traits, labels, cfg.window, device_rotation=rotation, device_noise=2.0,
                       device_bias=bias)
    return _dataset(windows, labels, species)


# -- the folder loader ------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SensorFolderConfig(MappingConfig):
    """A silo's folder of sensor windows (the data options of a folder silo).

    The folder holds either NPY files, ``windows.npy`` (float ``[N, C, T]``) and ``labels.npy``
    (integer ``[N]``), or one CSV file ``windows.csv`` with a header row ``label,c0_t0,c0_t1,...``
    (column ``label`` first, then the ``C * T`` values of a window channel by channel, each
    value column named ``c<channel>_t<sample>``) and one row per window. NPY wins if both exist.

    Attributes:
        path: The folder.
        species: The species every window of the folder comes from (``[data] species``); it must
            be one of the run's model ``species``.
        seed: Seed of the train/val/test split.
        val_fraction: Share of the windows held out for validation.
        test_fraction: Share held out for testing.
        n_classes: Labels must lie in ``[0, n_classes)``.
    """

    path: Path
    species: str
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    n_classes: int = len(BEHAVIOURS)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_species_name(owner, self.species)
        check_seed(owner, "seed", self.seed)
        check_split_fractions(owner, self.val_fraction, self.test_fraction)
        check_int(owner, "n_classes", self.n_classes, minimum=2)


def _read_npy(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        windows = np.load(folder / "windows.npy", allow_pickle=False)
        labels = np.load(folder / "labels.npy", allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{folder}: windows.npy / labels.npy are not plain numeric arrays ({exc})") from None
    return windows, labels


_CSV_COLUMN = re.compile(r"^c(\d+)_t(\d+)$")


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0].strip() != "label":
        raise ValueError(f"{path}: the first row must be a header starting with 'label', then c<channel>_t<sample> columns")
    header = [h.strip() for h in rows[0][1:]]
    cells = [_CSV_COLUMN.match(h) for h in header]
    if not header or not all(cells):
        bad = next((h for h, m in zip(header, cells) if not m), "(none)")
        raise ValueError(f"{path}: header column {bad!r} is not of the form c<channel>_t<sample>")
    pairs = [(int(m.group(1)), int(m.group(2))) for m in cells if m]
    n_ch = max(c for c, _ in pairs) + 1
    n_t = max(t for _, t in pairs) + 1
    if pairs != [(c, t) for c in range(n_ch) for t in range(n_t)]:
        raise ValueError(f"{path}: value columns must be c0_t0 .. c0_t{n_t - 1}, c1_t0, ... in order "
                         f"(channel by channel), for {n_ch} channel(s) x {n_t} sample(s)")
    labels, values = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header) + 1:
            raise ValueError(f"{path}: row {line} has {len(row)} fields, the header {len(header) + 1}")
        try:
            labels.append(int(row[0]))
            values.append([float(v) for v in row[1:]])
        except ValueError:
            raise ValueError(f"{path}: row {line} has a label that is not an integer or a value that is not a number") from None
    windows = np.asarray(values, dtype=np.float64).reshape(len(values), n_ch, n_t)
    return windows, np.asarray(labels, dtype=np.int64)


def _checked(windows: np.ndarray, labels: np.ndarray, cfg: SensorFolderConfig, source: str) -> tuple[np.ndarray, np.ndarray]:
    if windows.ndim != 3 or not np.issubdtype(windows.dtype, np.number):
        raise ValueError(f"{source}: windows must be a numeric array [N, C, T], got {windows.dtype} {windows.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: labels must be an integer array [N], got {labels.dtype} {labels.shape}")
    if len(labels) != len(windows):
        raise ValueError(f"{source}: {len(windows)} windows but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"{source}: no windows")
    if not np.all(np.isfinite(windows)):
        raise ValueError(f"{source}: windows contain NaN or infinite values")
    if labels.min() < 0 or labels.max() >= cfg.n_classes:
        raise ValueError(f"{source}: labels must lie in [0, {cfg.n_classes}), got {int(labels.min())}..{int(labels.max())}")
    return windows.astype(np.float32), labels.astype(np.int64)


def load_sensor_folder(cfg: SensorFolderConfig) -> SiloSplits:
    """Reads a folder of windows (NPY or CSV, see :class:`SensorFolderConfig`) and splits it.

    The split is a permutation seeded by ``cfg.seed``: ``round(N * test_fraction)`` windows
    for testing, ``round(N * val_fraction)`` for validation, the rest (at least one) for training.

    Raises:
        FileNotFoundError: If the folder, or both its NPY pair and its CSV, are missing.
        ValueError: On a malformed file (the message names the file and the problem).
    """
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise FileNotFoundError(f"sensor data folder {folder} does not exist")
    if (folder / "windows.npy").is_file() or (folder / "labels.npy").is_file():
        for name in ("windows.npy", "labels.npy"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: {name} is missing (NPY data needs windows.npy and labels.npy)")
        windows, labels = _checked(*_read_npy(folder), cfg, f"{folder} (NPY)")
    elif (folder / "windows.csv").is_file():
        windows, labels = _checked(*_read_csv(folder / "windows.csv"), cfg, str(folder / "windows.csv"))
    else:
        raise FileNotFoundError(f"{folder}: no windows.npy + labels.npy and no windows.csv")
    n = len(labels)
    n_test = math.floor(n * cfg.test_fraction + 0.5)
    n_val = math.floor(n * cfg.val_fraction + 0.5)
    if n - n_test - n_val < 1:
        raise ValueError(f"{folder}: only {n} window(s), too few for val_fraction={cfg.val_fraction} "
                         f"and test_fraction={cfg.test_fraction}")
    order = np.random.default_rng(np.random.SeedSequence([_TAG_SPLIT, cfg.seed])).permutation(n)
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return SiloSplits(**{k: _dataset(windows[np.sort(v)], labels[np.sort(v)], cfg.species) for k, v in parts.items()})
