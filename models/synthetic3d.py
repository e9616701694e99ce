"""Built-in multi-domain 3-D segmentation data: an organ-like blob seen through per-silo scanners with their own voxel spacing."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedsilo.core.validators import MappingConfig, check_int, check_seed
from fedsilo.models.data import SiloSplits, standardize
from fedsilo.models.volumes import VolumeDataset

__all__ = [
    "UNSEEN_DOMAIN",
    "Synthetic3DConfig",
    "VolumeStyle",
    "silo_volumes",
    "unseen_volumes",
    "volume_style",
]

#: Domain index of the held-out scanner (no silo trains on it).
UNSEEN_DOMAIN = -1

# Ranges of the training domains' parameters. Domain k takes, for parameter j, the position
# frac(u_j + (k + 1) * alpha_j) in its range, u_j from the seed and alpha_j the fractional part
# of sqrt(p) for distinct primes p (a Kronecker sequence, as models/synthetic.py does in 2-D),
# so neighbouring domains sit far apart in every parameter.
_RANGES: dict[str, tuple[float, float]] = {
    "slice_mm": (1.5, 3.0),      # spacing along D (slice thickness)
    "inplane_mm": (0.6, 1.0),    # spacing along H and W
    "background": (0.05, 0.30),
    "gamma": (0.6, 1.8),
    "contrast": (0.7, 1.3),
    "offset": (-0.15, 0.15),
    "bias_strength": (0.0, 0.35),
    "noise_std": (0.02, 0.12),
}
_STEPS: dict[str, float] = {
    "slice_mm": 0.41421356,
    "inplane_mm": 0.73205081,
    "background": 0.64575131,
    "gamma": 0.31662479,
    "contrast": 0.60555128,
    "offset": 0.35889894,
    "bias_strength": 0.79583152,
    "noise_std": 0.38516481,
}
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "unseen": 3}
_TAG_STYLE = 0x3D5717E
_TAG_VOLUME = 0x3D1A6E


@dataclass(frozen=True, kw_only=True)
class Synthetic3DConfig(MappingConfig):
    """Size and seed of the built-in 3-D data.

    Attributes:
        seed: Seed of styles and volumes; the same config gives the same data in any process.
        size: Side of the cubic volumes in voxels (>= 16, a multiple of 8); also the patch size.
        n_train: Training volumes per silo (>= 1).
        n_val: Validation volumes per silo (>= 0).
        n_test: Test volumes per silo (>= 0).
    """

    seed: int = 0
    size: int = 32
    n_train: int = 8
    n_val: int = 2
    n_test: int = 4

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_seed(owner, "seed", self.seed)
        check_int(owner, "size", self.size, minimum=16)
        if self.size % 8:
            raise ValueError(f"{owner}.size must be a multiple of 8, got {self.size}")
        check_int(owner, "n_train", self.n_train, minimum=1)
        check_int(owner, "n_val", self.n_val, minimum=0)
        check_int(owner, "n_test", self.n_test, minimum=0)


@dataclass(frozen=True, kw_only=True)
class VolumeStyle:
    """How one simulated scanner acquires the volumes, in the order applied.

    Attributes:
        domain: Domain index (``UNSEEN_DOMAIN`` for the held-out one).
        spacing: Voxel spacing ``(sd, sh, sw)`` in mm: the same anatomy (sized in mm) covers
            other voxel counts per axis on each scanner.
        background: Tissue intensity outside the organ on a [0, 1] scale.
        gamma: Exponent applied to the [0, 1] signal.
        bias_strength: Amplitude ``s`` of the multiplicative bias field ``1 + s * f``, ``|f| <= 1``
            a random second-order polynomial of position per volume.
        contrast: Gain of the scanner's intensity mapping.
        offset: Offset of the scanner's intensity mapping.
        noise_std: Standard deviation of additive Gaussian noise.
    """

    domain: int
    spacing: tuple[float, float, float]
    background: float
    gamma: float
    bias_strength: float
    contrast: float
    offset: float
    noise_std: float


def _check_domain(domain: object, *, allow_unseen: bool) -> int:
    if isinstance(domain, bool) or not isinstance(domain, int):
        raise ValueError(f"domain must be an int, got {domain!r}")
    if domain >= 0 or (allow_unseen and domain == UNSEEN_DOMAIN):
        return domain
    raise ValueError(f"domain must be >= 0{' or -1 (unseen)' if allow_unseen else ''}, got {domain!r}")


def volume_style(cfg: Synthetic3DConfig, domain: int) -> VolumeStyle:
    """The scanner style of ``domain``: a seeded Kronecker point for ``domain >= 0``; a fixed style
    outside the training ranges (isotropic 1.25 mm, strong gamma, bias and offset) for ``UNSEEN_DOMAIN``.

    Raises:
        ValueError: On a bad config or domain.
    """
    if not isinstance(cfg, Synthetic3DConfig):
        raise ValueError(f"cfg must be a Synthetic3DConfig, got {type(cfg).__name__}")
    domain = _check_domain(domain, allow_unseen=True)
    if domain == UNSEEN_DOMAIN:
        return VolumeStyle(domain=domain, spacing=(1.25, 1.25, 1.25), background=0.38, gamma=2.4,
                           bias_strength=0.45, contrast=0.6, offset=0.22, noise_std=0.05)
    phases = np.random.default_rng(np.random.SeedSequence([_TAG_STYLE, cfg.seed])).random(len(_RANGES))
    v: dict[str, float] = {}
    for (name, (lo, hi)), u in zip(_RANGES.items(), phases, strict=True):
        pos = math.fmod(float(u) + (domain + 1) * _STEPS[name], 1.0)
        v[name] = round(lo * (hi / lo) ** pos, 4) if name == "gamma" else round(lo + pos * (hi - lo), 4)
    return VolumeStyle(domain=domain, spacing=(v["slice_mm"], v["inplane_mm"], v["inplane_mm"]),
                       background=v["background"], gamma=v["gamma"], bias_strength=v["bias_strength"],
                       contrast=v["contrast"], offset=v["offset"], noise_std=v["noise_std"])


def _blob(coords: tuple[np.ndarray, ...], rng: np.random.Generator, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """An ellipsoid (mm) whose radius varies smoothly with direction: ``|q| < 1 + 0.2 f(q/|q|)``, ``q`` the scaled offset."""
    q = [(c - m) / r for c, m, r in zip(coords, centre, radii, strict=True)]
    norm = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    u = [qi / np.maximum(norm, 1e-9) for qi in q]
    basis = np.stack([u[0], u[1], u[2], u[0] * u[1], u[1] * u[2], u[0] * u[2], u[0] ** 2 - u[1] ** 2])
    f = np.tensordot(rng.uniform(-1.0, 1.0, size=7) / 3.5, basis, axes=1)
    return norm < 1.0 + 0.2 * f


def _render(cfg: Synthetic3DConfig, style: VolumeStyle, split: str, n: int) -> VolumeDataset:
    """Renders ``n`` volumes; volume ``i`` depends only on (seed, domain, split, i)."""
    size = cfg.size
    scale = size / 32.0  # anatomy grows with the volume so it keeps its share of the field of view
    coords = np.meshgrid(*[(np.arange(size) - (size - 1) / 2.0) * s for s in style.spacing], indexing="ij")
    unit = np.meshgrid(*[np.linspace(-1.0, 1.0, size)] * 3, indexing="ij")
    bias_basis = np.stack([unit[0], unit[1], unit[2], unit[0] * unit[1], unit[1] * unit[2], unit[0] * unit[2],
                           2 * unit[0] ** 2 - 1, 2 * unit[1] ** 2 - 1, 2 * unit[2] ** 2 - 1])
    fov = np.array([size * s for s in style.spacing])
    images, labels = [], []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([_TAG_VOLUME, cfg.seed, style.domain + 1,
                                                            _SPLIT_CODES[split], i]))
        radii = rng.uniform([6.0, 4.0, 4.0], [12.0, 7.0, 7.0]) * scale
        radii = np.minimum(radii, 0.4 * fov)
        centre = rng.uniform(-1.0, 1.0, size=3) * np.maximum(0.45 * fov - radii, 0.0)
        organ = _blob(coords, rng, centre, radii)
        other = _blob(coords, rng, rng.uniform(-0.3, 0.3, size=3) * fov, np.full(3, 3.0 * scale)) & ~organ
        texture = rng.standard_normal((size, size, size))
        texture = (texture + np.roll(texture, 1, 0) + np.roll(texture, 1, 1) + np.roll(texture, 1, 2)) / 4.0
        signal = style.background + (1.0 - style.background) * (0.8 * organ + 0.45 * other) + 0.05 * texture
        x = np.power(np.clip(signal, 0.0, 1.0), style.gamma)
        field = np.tensordot(rng.standard_normal(9), bias_basis, axes=1)
        field /= max(float(np.abs(field).max()), 1e-12)
        x = x * (1.0 + style.bias_strength * field)
        x = style.offset + style.contrast * x + style.noise_std * rng.standard_normal((size, size, size))
        images.append(torch.from_numpy(standardize(x))[None])
        labels.append(torch.from_numpy(organ.astype(np.int64))[None])
    return VolumeDataset(images, labels, [style.spacing] * n, patch_size=size)


def silo_volumes(cfg: Synthetic3DConfig, domain: int) -> SiloSplits:
    """The train/val/test volumes of silo ``domain`` (one simulated scanner per silo).

    Raises:
        ValueError: On a bad config or domain (the unseen one is :func:`unseen_volumes`).
    """
    style = volume_style(cfg, _check_domain(domain, allow_unseen=False))
    return SiloSplits(train=_render(cfg, style, "train", cfg.n_train), val=_render(cfg, style, "val", cfg.n_val),
                      test=_render(cfg, style, "test", cfg.n_test))


def unseen_volumes(cfg: Synthetic3DConfig, n: int | None = None) -> VolumeDataset:
    """``n`` volumes (default ``cfg.n_test``) of the held-out scanner; the same for every silo.

    Raises:
        ValueError: On a bad config or ``n``.
    """
    if n is None:
        n = cfg.n_test if isinstance(cfg, Synthetic3DConfig) else 0
    check_int("unseen_volumes", "n", n, minimum=0)
    return _render(cfg, volume_style(cfg, UNSEEN_DOMAIN), "unseen", n)
