"""2-D image classification data: the built-in lesion generator with per-silo scanner styles and label skew, and batching (folders: classify_folder)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedsilo.core.validators import MappingConfig, check_float, check_int, check_seed
from fedsilo.models.data import SiloSplits

__all__ = [
    "BUILTIN_CLASSES", "IMAGE_CHANNELS", "IMAGE_SUFFIXES", "ClassifyDataset", "DomainStyle",
    "SyntheticClassifyConfig", "class_prior", "classify_silo_splits", "classify_unseen", "collate_classify",
    "as_dataset", "check_class_names", "domain_style", "gaussian_blur", "unseen_style",
]

#: The classes of the built-in generator, in label order (label ``i`` is ``BUILTIN_CLASSES[i]``).
BUILTIN_CLASSES = ("normal tissue", "benign cyst", "inflammatory lesion", "malignant tumour", "calcification")
#: Channels of every image (RGB), built-in or read from a folder.
IMAGE_CHANNELS = 3
#: File name endings the folder loader reads (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")

_TAG_STYLE, _TAG_UNSEEN, _TAG_PRIOR, _TAG_SPLIT = 0x57E1, 0x0A5E, 0xD1C1, 0x5917
_TISSUE = np.array([0.92, 0.72, 0.82])  # the RGB tint of tissue (an H&E-like pink)


def check_class_names(owner: str, names: object, *, minimum: int) -> tuple[str, ...]:
    """``names`` as a tuple of distinct non-empty strings, at least ``minimum`` of them, else ValueError."""
    if not isinstance(names, (tuple, list)) or len(names) < minimum \
            or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"{owner}: class names must be a list of at least {minimum} non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{owner}: class names must be distinct, got {list(names)}")
    return tuple(names)


class ClassifyDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Labelled images held in memory; items are ``(image float32 [C, H, W], label int64 scalar)``.

    Attributes:
        images: float32 tensor ``[N, C, H, W]`` (values in [0, 1]).
        labels: int64 tensor ``[N]``, each an index into ``class_names``.
        class_names: The classes, in label order.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> None:
        """Wraps stacked tensors.

        Raises:
            ValueError: On wrong ranks or dtypes, mismatched lengths, bad class names or a label
                outside ``[0, len(class_names))``.
        """
        if images.dim() != 4 or images.dtype != torch.float32:
            raise ValueError(f"images must be float32 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.dtype != torch.int64 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be int64 [N] with N = {images.shape[0]}, got {labels.dtype} {tuple(labels.shape)}")
        self.class_names = check_class_names("ClassifyDataset", tuple(class_names), minimum=1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.class_names)):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)}), got {int(labels.min())}..{int(labels.max())}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return f"ClassifyDataset(n={len(self)}, image_shape={tuple(self.images.shape[1:])}, classes={len(self.class_names)})"


def collate_classify(dataset: Dataset[Any], indices: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks examples ``indices`` into ``(x float32 [N, C, H, W], y int64 [N])`` on ``device``.

    Works on any map-style dataset of ``(image, label)`` items (a ``Subset`` or ``ConcatDataset``
    too). No indices give an empty batch shaped like the dataset's first image.
    """
    xs = [torch.as_tensor(dataset[i][0], dtype=torch.float32) for i in indices]
    ys = [torch.as_tensor(dataset[i][1], dtype=torch.int64).reshape(()) for i in indices]
    if xs:
        return torch.stack(xs).to(device), torch.stack(ys).to(device)
    shape = tuple(torch.as_tensor(dataset[0][0]).shape) if len(dataset) else (IMAGE_CHANNELS, 1, 1)  # type: ignore[arg-type]
    return torch.zeros((0, *shape), dtype=torch.float32, device=device), torch.zeros(0, dtype=torch.int64, device=device)


# -- the built-in generator ------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SyntheticClassifyConfig(MappingConfig):
    """The built-in generator of lesion images (the data options of a built-in silo).

    Every image is tissue texture (low-frequency waves, grain and a few dark vessels) with, by
    class, nothing (normal tissue), a dark smooth round blob (benign cyst), a diffuse reddish
    bright patch (inflammatory lesion), an irregular spiculated bright mass (malignant tumour) or
    a cluster of small bright dots (calcification), at a random position, size and rotation.
    Each domain (silo, scanner) renders it with its own style (:func:`domain_style`) and draws
    its own class prior (:func:`class_prior`).

    Attributes:
        seed: Seed of the styles, priors, images and splits.
        image_size: Side of the square images (H = W).
        n_train: Training images per silo (>= 2: every silo trains on at least two classes).
        n_val: Validation images per silo (the silo's prior, like training).
        n_test: Test images per silo, class-balanced.
        n_unseen: Images of the unseen scanner style per silo, class-balanced.
        label_skew: The concentration α of each silo's Dirichlet class prior: smaller is more
            skewed (0.1: a silo sees one or two classes; 100: nearly balanced); 0 means no skew
            (a uniform prior for every silo).
    """

    seed: int = 0
    image_size: int = 32
    n_train: int = 160
    n_val: int = 40
    n_test: int = 100
    n_unseen: int = 100
    label_skew: float = 0.5

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_seed(owner, "seed", self.seed)
        check_int(owner, "image_size", self.image_size, minimum=16)
        check_int(owner, "n_train", self.n_train, minimum=2)
        for name in ("n_val", "n_test", "n_unseen"):
            check_int(owner, name, getattr(self, name), minimum=0)
        check_float(owner, "label_skew", self.label_skew, low=0.0, high=1e6)


@dataclass(frozen=True)
class DomainStyle:
    """How a scanner renders an image: ``clip(gain * clip((blur(x) - 0.5) * contrast + 0.5) ** gamma + offset + noise)``.

    Attributes:
        gain: Per-channel (RGB) gain.
        offset: Per-channel offset.
        gamma: Gamma of the intensities.
        contrast: Contrast around mid-grey.
        blur: Standard deviation of the Gaussian blur, in pixels (0: none).
        noise: Standard deviation of the additive Gaussian noise.
    """

    gain: tuple[float, float, float]
    offset: tuple[float, float, float]
    gamma: float
    contrast: float
    blur: float
    noise: float


def _triple(values: np.ndarray) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])


def domain_style(seed: int, domain: int) -> DomainStyle:
    """The style of built-in domain ``domain``, a function of (``seed``, ``domain``) alone.

    Gains lie in [0.8, 1.2], offsets in [-0.05, 0.05], gamma in [0.75, 1.33], contrast in
    [0.75, 1.25], blur in [0, 0.8] px and noise in [0.01, 0.05]: :func:`unseen_style` lies outside.
    """
    check_seed("domain_style", "seed", seed)
    check_int("domain_style", "domain", domain, minimum=0)
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_STYLE, seed, domain]))
    return DomainStyle(gain=_triple(rng.uniform(0.8, 1.2, size=3)), offset=_triple(rng.uniform(-0.05, 0.05, size=3)),
                       gamma=float(np.exp(rng.uniform(np.log(0.75), np.log(1.33)))),
                       contrast=float(rng.uniform(0.75, 1.25)), blur=float(rng.uniform(0.0, 0.8)),
                       noise=float(rng.uniform(0.01, 0.05)))


def unseen_style(seed: int) -> DomainStyle:
    """The unseen scanner of ``seed`` (the same for every silo): each parameter outside every silo's range.

    A colour cast (one channel's gain in [0.7, 0.78], another's in [1.22, 1.3]), gamma in
    [0.65, 0.72] or [1.38, 1.48], contrast in [0.65, 0.72] or [1.28, 1.36], blur in [0.9, 1.1] px
    and noise in [0.055, 0.07].
    """
    check_seed("unseen_style", "seed", seed)
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_UNSEEN, seed]))
    low, high = rng.permutation(3)[:2]
    gain = rng.uniform(0.9, 1.1, size=3)
    gain[low], gain[high] = rng.uniform(0.7, 0.78), rng.uniform(1.22, 1.3)
    side = rng.integers(0, 2, size=2)
    return DomainStyle(gain=_triple(gain), offset=_triple(rng.uniform(-0.05, 0.05, size=3)),
                       gamma=float(rng.uniform(0.65, 0.72) if side[0] else rng.uniform(1.38, 1.48)),
                       contrast=float(rng.uniform(0.65, 0.72) if side[1] else rng.uniform(1.28, 1.36)),
                       blur=float(rng.uniform(0.9, 1.1)), noise=float(rng.uniform(0.055, 0.07)))


def class_prior(cfg: SyntheticClassifyConfig, domain: int) -> np.ndarray:
    """Domain ``domain``'s class prior ``[K]``: Dirichlet(``cfg.label_skew``) seeded by (``cfg.seed``, ``domain``); uniform for 0."""
    check_int("class_prior", "domain", domain, minimum=0)
    k = len(BUILTIN_CLASSES)
    if cfg.label_skew == 0:
        return np.full(k, 1.0 / k)
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_PRIOR, cfg.seed, domain]))
    prior = rng.dirichlet(np.full(k, float(cfg.label_skew)))
    if not np.all(np.isfinite(prior)) or prior.sum() <= 0:  # a vanishing α can underflow: all mass on one class
        prior = np.eye(k)[int(rng.integers(k))]
    return prior / prior.sum()


def _skewed_labels(rng: np.random.Generator, prior: np.ndarray, n: int, *, min_classes: int) -> np.ndarray:
    """``n`` labels drawn from ``prior``; if fewer than ``min_classes`` classes came up, the first draws are
    replaced by the most probable missing classes (so a training set never holds a single class)."""
    labels = rng.choice(len(prior), size=n, p=prior)
    missing = [int(c) for c in np.argsort(-prior, kind="stable") if c not in set(labels.tolist())]
    need = min(min_classes, n) - len(np.unique(labels))
    if need > 0:
        labels[:need] = missing[:need]
    return rng.permutation(labels).astype(np.int64)


def _balanced_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % len(BUILTIN_CLASSES)).astype(np.int64)


def _vessels(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, px: float) -> np.ndarray:
    """Zero to two thin dark wavy lines (every class has them)."""
    out = np.zeros_like(yy)
    for _ in range(int(rng.integers(0, 3))):
        t = rng.uniform(0, np.pi)
        u = np.cos(t) * xx + np.sin(t) * yy
        v = -np.sin(t) * xx + np.cos(t) * yy
        d = v - (rng.uniform(-0.3, 0.3) + 0.06 * np.sin(2 * np.pi * rng.uniform(1, 2.5) * u + rng.uniform(0, 2 * np.pi)))
        out -= 0.12 * np.exp(-(d / (rng.uniform(0.6, 1.0) * px)) ** 2)
    return out


def _lesion(rng: np.random.Generator, label: int, yy: np.ndarray, xx: np.ndarray, px: float) -> tuple[np.ndarray, np.ndarray]:
    """The class pattern: an intensity change ``[S, S]`` and an extra red weight ``[S, S]``."""
    zero = np.zeros_like(yy)
    cy, cx = rng.uniform(-0.25, 0.25, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    dy, dx = yy - cy, xx - cx
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    name = BUILTIN_CLASSES[label]
    if name == "benign cyst":
        r, ecc = rng.uniform(0.1, 0.2), rng.uniform(0.0, 0.3)
        rho = np.sqrt((u / (r * (1 + ecc))) ** 2 + (v / (r * (1 - ecc))) ** 2)
        return -rng.uniform(0.4, 0.5) / (1 + np.exp((rho - 1) / 0.08)), zero
    if name == "inflammatory lesion":
        s, ecc = rng.uniform(0.13, 0.25), rng.uniform(0.0, 0.4)
        patch = np.exp(-0.5 * ((u / (s * (1 + ecc))) ** 2 + (v / (s * (1 - ecc))) ** 2))
        return rng.uniform(0.2, 0.28) * patch, rng.uniform(0.12, 0.18) * patch
    if name == "malignant tumour":
        r0 = rng.uniform(0.1, 0.16)
        phi = np.arctan2(v, u)
        radius = np.ones_like(phi)
        for k in range(2, 6):
            radius += rng.uniform(0.0, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        for a in rng.uniform(0, 2 * np.pi, size=int(rng.integers(5, 9))):
            gap = np.angle(np.exp(1j * (phi - a)))
            radius += rng.uniform(0.5, 1.1) * np.exp(-(gap / 0.1) ** 2)
        mass = 1 / (1 + np.exp((np.hypot(u, v) - r0 * radius) / (0.6 * px)))
        return rng.uniform(0.4, 0.5) * mass * (1 + 0.15 * rng.normal(size=mass.shape)), zero
    if name == "calcification":
        dots = zero.copy()
        for _ in range(int(rng.integers(3, 9))):
            oy, ox = rng.uniform(-0.12, 0.12, size=2)
            sigma = rng.uniform(0.5, 0.9) * px
            dots += rng.uniform(0.45, 0.6) * np.exp(-0.5 * (((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) / sigma ** 2))
        return np.minimum(dots, 0.7), zero
    return zero, zero  # normal tissue


def _render(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Style-free images ``[N, 3, S, S]`` in about [0, 1] for ``labels``."""
    coords = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    px = 1.0 / size
    out = np.empty((len(labels), IMAGE_CHANNELS, size, size))
    for i, label in enumerate(labels):
        grey = 0.5 + rng.normal(scale=0.03, size=(size, size))
        for _ in range(4):  # low-frequency tissue texture
            f = rng.uniform(1.0, 4.0, size=2) * rng.choice([-1, 1], size=2)
            grey += rng.uniform(0.02, 0.05) * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + rng.uniform(0, 2 * np.pi))
        grey += _vessels(rng, yy, xx, px)
        change, red = _lesion(rng, int(label), yy, xx, px)
        grey += change
        out[i] = _TISSUE[:, None, None] * grey[None]
        out[i, 0] += red
    return out


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes (reflect padding)."""
    if sigma < 0.05:
        return x
    radius = max(1, math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    pad = [(0, 0)] * (x.ndim - 2)
    h = np.pad(x, [*pad, (radius, radius), (0, 0)], mode="reflect")
    x = sum(k[j] * h[..., j:j + x.shape[-2], :] for j in range(len(k)))
    w = np.pad(x, [*pad, (0, 0), (radius, radius)], mode="reflect")
    return sum(k[j] * w[..., j:j + x.shape[-1]] for j in range(len(k)))


def _styled(rng: np.random.Generator, x: np.ndarray, style: DomainStyle) -> np.ndarray:
    x = gaussian_blur(x, style.blur)
    x = np.clip((x - 0.5) * style.contrast + 0.5, 0.0, 1.0) ** style.gamma
    x = x * np.array(style.gain)[None, :, None, None] + np.array(style.offset)[None, :, None, None]
    x = x + rng.normal(scale=style.noise, size=x.shape)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def as_dataset(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str] = BUILTIN_CLASSES) -> ClassifyDataset:
    """A :class:`ClassifyDataset` of float images ``[N, C, H, W]`` and integer labels ``[N]`` (copied into tensors)."""
    return ClassifyDataset(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
                           torch.from_numpy(np.asarray(labels, dtype=np.int64)), class_names)


def classify_silo_splits(cfg: SyntheticClassifyConfig, domain: int) -> SiloSplits:
    """The train/val/test images of built-in domain ``domain`` in its style (:func:`domain_style`).

    Deterministic in (``cfg``, ``domain``). Training and validation labels follow the domain's
    skewed prior (:func:`class_prior`; a class may be missing, but training holds at least two);
    the test set is class-balanced (the federation wants a model good at every class).
    """
    check_int("classify_silo_splits", "domain", domain, minimum=0)
    style = domain_style(cfg.seed, domain)
    prior = class_prior(cfg, domain)
    out = {}
    for i, (split, n) in enumerate((("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test))):
        rng = np.random.default_rng(np.random.SeedSequence([_TAG_SPLIT, cfg.seed, domain, i]))
        labels = _balanced_labels(rng, n) if split == "test" else \
            _skewed_labels(rng, prior, n, min_classes=2 if split == "train" else 0)
        out[split] = as_dataset(_styled(rng, _render(rng, labels, cfg.image_size), style), labels)
    return SiloSplits(**out)


def classify_unseen(cfg: SyntheticClassifyConfig, domain: int) -> ClassifyDataset:
    """``cfg.n_unseen`` class-balanced images in the unseen scanner's style (:func:`unseen_style`).

    The style is the same for every silo of a seed; the images are drawn per (seed, ``domain``).
    """
    check_int("classify_unseen", "domain", domain, minimum=0)
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_UNSEEN, cfg.seed, domain]))
    labels = _balanced_labels(rng, cfg.n_unseen)
    return as_dataset(_styled(rng, _render(rng, labels, cfg.image_size), unseen_style(cfg.seed)), labels)


# -- the folder loader ------------------------------------------------------------------------------------
