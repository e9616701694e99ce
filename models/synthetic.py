"""Built-in multi-domain 2-D segmentation data: MONAI's synthetic shapes seen through per-silo "scanners"."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedsilo.core.validators import MappingConfig, check_int, check_seed
from fedsilo.models.data import SegmentationDataset, SiloSplits, standardize

__all__ = [
    "UNSEEN_DOMAIN",
    "DomainStyle",
    "SyntheticConfig",
    "domain_style",
    "silo_splits",
    "unseen_domain",
]

#: Domain index of the held-out "unseen scanner" used to measure generalisation. Its style is
#: fixed (independent of the seed) and lies outside the training ranges in most respects.
UNSEEN_DOMAIN = -1

# Style ranges of training domains, for a 64-pixel image (radii scale with image_size).
# Each entry: (low, high). Domain k takes, for parameter j, the position
# frac(u_j + (k + 1) * alpha_j) inside its range: u_j comes from the seed, alpha_j is an
# irrational step, so consecutive domains sit far apart in every parameter (a Kronecker
# sequence) instead of possibly landing on top of each other as independent draws could.
_RANGES: dict[str, tuple[float, float]] = {
    "background": (0.05, 0.30),
    "gamma": (0.5, 2.0),
    "contrast": (0.7, 1.3),
    "offset": (-0.15, 0.15),
    "bias_strength": (0.0, 0.35),
    "noise_std": (0.02, 0.12),
    "blur_sigma": (0.0, 1.2),
    "resolution": (0.5, 1.0),
    "rad_min": (3, 7),
    "rad_span": (3, 9),
    "num_objs": (3, 8),
    "texture": (0.05, 0.3),
    "texture_sigma": (1.5, 4.0),
}
_STEPS: dict[str, float] = {  # fractional parts of sqrt(p) for distinct primes p
    "background": 0.41421356,
    "gamma": 0.73205081,
    "contrast": 0.64575131,
    "offset": 0.31662479,
    "bias_strength": 0.60555128,
    "noise_std": 0.35889894,
    "blur_sigma": 0.79583152,
    "resolution": 0.38516481,
    "rad_min": 0.56776436,
    "rad_span": 0.23606798,
    "num_objs": 0.40312424,
    "texture": 0.69041576,
    "texture_sigma": 0.12310563 + 0.5,
}
_INT_PARAMS = frozenset({"rad_min", "rad_span", "num_objs"})
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "unseen": 3}
_TAG_STYLE = 0x5717E
_TAG_IMAGE = 0x1A6E


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig(MappingConfig):
    """Size and seed of the built-in data.

    Attributes:
        seed: Seed of styles and images; the same config gives the same data in any process.
        image_size: Height and width in pixels (>= 32; use a multiple of 8 for the default UNet).
        n_train: Training images per silo (>= 1).
        n_val: Validation images per silo (>= 0).
        n_test: Test images per silo (>= 0).
    """

    seed: int = 0
    image_size: int = 64
    n_train: int = 48
    n_val: int = 16
    n_test: int = 24

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_seed(owner, "seed", self.seed)
        check_int(owner, "image_size", self.image_size, minimum=32)
        check_int(owner, "n_train", self.n_train, minimum=1)
        check_int(owner, "n_val", self.n_val, minimum=0)
        check_int(owner, "n_test", self.n_test, minimum=0)



@dataclass(frozen=True, kw_only=True)
class DomainStyle:
    """How one simulated scanner renders the shapes. Applied in the order listed.

    Attributes:
        domain: Domain index (``UNSEEN_DOMAIN`` for the held-out one).
        rad_min: Smallest circle radius in pixels (inclusive).
        rad_max: Largest circle radius in pixels (exclusive, as in MONAI).
        num_objs: Circles drawn per image.
        background: Tissue intensity outside the objects, on a [0, 1] scale (objects 0.5-1 of
            the remaining range above it).
        texture: Amplitude of smooth random tissue texture added to the whole signal (clutter
            that can look like faint objects).
        texture_sigma: Correlation length of that texture in pixels.
        gamma: Exponent applied to the [0, 1] signal.
        bias_strength: Amplitude of a smooth multiplicative bias field, ``1 + s * f`` with
            ``|f| <= 1`` a random low-order polynomial per image.
        blur_sigma: Gaussian point-spread sigma in pixels (0 for none).
        resolution: Acquisition grid relative to the image grid; images are area-downsampled
            to ``round(resolution * image_size)`` pixels and bilinearly upsampled back.
        contrast: Gain of the scanner's intensity mapping.
        offset: Offset of the scanner's intensity mapping.
        noise_std: Standard deviation of additive Gaussian noise.
    """

    domain: int
    rad_min: int
    rad_max: int
    num_objs: int
    background: float
    texture: float
    texture_sigma: float
    gamma: float
    bias_strength: float
    blur_sigma: float
    resolution: float
    contrast: float
    offset: float
    noise_std: float


def _check_domain(domain: object, *, allow_unseen: bool) -> int:
    if isinstance(domain, bool) or not isinstance(domain, int):
        raise ValueError(f"domain must be an int, got {domain!r}")
    if domain >= 0 or (allow_unseen and domain == UNSEEN_DOMAIN):
        return domain
    allowed = f">= 0 or UNSEEN_DOMAIN ({UNSEEN_DOMAIN})" if allow_unseen else ">= 0"
    raise ValueError(f"domain must be {allowed}, got {domain!r}")


def _radius_scale(image_size: int) -> float:
    return image_size / 64.0


def domain_style(cfg: SyntheticConfig, domain: int) -> DomainStyle:
    """Returns the scanner style of ``domain`` for this config.

    Training domains (``domain >= 0``) are spread over fixed ranges by a seeded Kronecker
    sequence, so any two nearby domain indices differ clearly in every parameter.
    ``UNSEEN_DOMAIN`` returns a fixed style outside the training ranges in background,
    gamma, contrast, offset, bias, blur and resolution (scaled only by image size).

    Args:
        cfg: The data config (its seed and image size matter).
        domain: A non-negative silo index, or ``UNSEEN_DOMAIN``.

    Returns:
        The style.

    Raises:
        ValueError: On a bad config or domain.
    """
    if not isinstance(cfg, SyntheticConfig):
        raise ValueError(f"cfg must be a SyntheticConfig, got {type(cfg).__name__}")
    domain = _check_domain(domain, allow_unseen=True)
    scale = _radius_scale(cfg.image_size)
    if domain == UNSEEN_DOMAIN:
        rad_min = max(1, round(3 * scale))
        rad_max = max(rad_min + 1, round(13 * scale))
        return DomainStyle(
            domain=domain,
            rad_min=rad_min,
            rad_max=rad_max,
            num_objs=6,
            background=0.38,
            texture=0.2,
            texture_sigma=round(5.0 * scale, 4),
            gamma=2.4,
            bias_strength=0.45,
            blur_sigma=1.4,
            resolution=0.45,
            contrast=0.6,
            offset=0.22,
            noise_std=0.05,
        )
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_STYLE, cfg.seed]))
    phases = rng.random(len(_RANGES))
    values: dict[str, float] = {}
    for (name, (lo, hi)), u in zip(_RANGES.items(), phases, strict=True):
        pos = math.fmod(float(u) + (domain + 1) * _STEPS[name], 1.0)
        if name in _INT_PARAMS:
            values[name] = int(lo + min(int(pos * (hi - lo + 1)), int(hi - lo)))
        elif name == "gamma":
            values[name] = round(lo * (hi / lo) ** pos, 4)
        else:
            values[name] = round(lo + pos * (hi - lo), 4)
    rad_min = max(1, round(values["rad_min"] * scale))
    rad_max = max(rad_min + 1, round((values["rad_min"] + values["rad_span"]) * scale))
    return DomainStyle(
        domain=domain,
        rad_min=rad_min,
        rad_max=rad_max,
        num_objs=int(values["num_objs"]),
        background=values["background"],
        texture=values["texture"],
        texture_sigma=round(values["texture_sigma"] * scale, 4),
        gamma=values["gamma"],
        bias_strength=values["bias_strength"],
        blur_sigma=values["blur_sigma"],
        resolution=values["resolution"],
        contrast=values["contrast"],
        offset=values["offset"],
        noise_std=values["noise_std"],
    )


def _gaussian_blur(batch: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of square images ``[N, S, S]`` with reflected borders."""
    if sigma <= 0:
        return batch
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    n = batch.shape[1]  # square images: the same length along both axes
    rows = np.pad(batch, [(0, 0), (radius, radius), (0, 0)], mode="reflect")
    out = sum(w * rows[:, k : k + n, :] for k, w in enumerate(taps))
    cols = np.pad(out, [(0, 0), (0, 0), (radius, radius)], mode="reflect")
    return sum(w * cols[:, :, k : k + n] for k, w in enumerate(taps))


def _area_matrix(src: int, dst: int) -> np.ndarray:
    """``[dst, src]`` matrix averaging source pixels over each destination pixel's footprint."""
    edges = np.linspace(0.0, src, dst + 1)
    m = np.zeros((dst, src))
    for i in range(dst):
        a, b = edges[i], edges[i + 1]
        for j in range(int(math.floor(a)), min(src, int(math.ceil(b)))):
            m[i, j] = min(b, j + 1) - max(a, j)
        m[i] /= m[i].sum()
    return m


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """``[dst, src]`` linear-interpolation matrix with half-pixel centres (align_corners=False)."""
    x = (np.arange(dst) + 0.5) * src / dst - 0.5
    x = np.clip(x, 0, src - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = x - lo
    m = np.zeros((dst, src))
    m[np.arange(dst), lo] += 1 - frac
    m[np.arange(dst), hi] += frac
    return m


def _resample(batch: np.ndarray, resolution: float) -> np.ndarray:
    """Simulates a coarser acquisition grid: area-downsample then bilinear-upsample ``[N, S, S]``."""
    size = batch.shape[-1]
    low = max(8, round(resolution * size))
    if low >= size:
        return batch
    r = _bilinear_matrix(low, size) @ _area_matrix(size, low)  # [S, S]
    return r @ batch @ r.T


def _bias_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random field in [-1, 1]: a second-order polynomial with random coefficients."""
    t = np.linspace(-1.0, 1.0, size)
    y, x = np.meshgrid(t, t, indexing="ij")
    basis = np.stack([x, y, x * y, 2 * x * x - 1, 2 * y * y - 1])
    f = np.tensordot(rng.standard_normal(5), basis, axes=1)
    peak = np.abs(f).max()
    return f / peak if peak > 0 else f


def _render(cfg: SyntheticConfig, style: DomainStyle, split: str, n: int) -> SegmentationDataset:
    """Renders ``n`` images of one domain and split; image ``i`` depends only on (seed, domain, split, i)."""
    from monai.data.synthetic import create_test_image_2d

    size = cfg.image_size
    signals = np.empty((n, size, size))
    masks = np.empty((n, size, size), dtype=np.int64)
    fields = np.empty((n, size, size))
    noise = np.empty((n, size, size))
    texture = np.empty((n, size, size))
    for i in range(n):
        ss = np.random.SeedSequence([_TAG_IMAGE, cfg.seed, style.domain + 1, _SPLIT_CODES[split], i])
        shape_ss, style_ss = ss.spawn(2)
        shapes_rs = np.random.RandomState(np.random.MT19937(shape_ss))
        img, lab = create_test_image_2d(
            size,
            size,
            num_objs=style.num_objs,
            rad_max=style.rad_max,
            rad_min=style.rad_min,
            noise_max=0.0,
            num_seg_classes=1,
            random_state=shapes_rs,
        )
        signals[i] = style.background + (1.0 - style.background) * img
        masks[i] = (lab > 0).astype(np.int64)
        rng = np.random.default_rng(style_ss)
        fields[i] = _bias_field(rng, size)
        noise[i] = rng.standard_normal((size, size))
        texture[i] = rng.standard_normal((size, size))
    texture = _gaussian_blur(texture, style.texture_sigma)
    texture /= np.maximum(texture.std(axis=(1, 2), keepdims=True), 1e-12)
    x = np.power(np.clip(signals + style.texture * texture, 0.0, 1.0), style.gamma)
    x = x * (1.0 + style.bias_strength * fields)
    x = _gaussian_blur(x, style.blur_sigma)
    x = _resample(x, style.resolution)
    x = style.offset + style.contrast * x + style.noise_std * noise
    images = torch.from_numpy(standardize(x)).unsqueeze(1)
    return SegmentationDataset(images, torch.from_numpy(masks).unsqueeze(1))


def silo_splits(cfg: SyntheticConfig, domain: int) -> SiloSplits:
    """Returns the train/val/test data of silo ``domain`` (one simulated scanner per silo).

    Args:
        cfg: The data config.
        domain: Silo index, >= 0 (the unseen domain is only served by :func:`unseen_domain`).

    Returns:
        The splits, with ``cfg.n_train``, ``cfg.n_val`` and ``cfg.n_test`` images.

    Raises:
        ValueError: On a bad config or domain.
    """
    style = domain_style(cfg, _check_domain(domain, allow_unseen=False))
    return SiloSplits(
        train=_render(cfg, style, "train", cfg.n_train),
        val=_render(cfg, style, "val", cfg.n_val),
        test=_render(cfg, style, "test", cfg.n_test),
    )


def unseen_domain(cfg: SyntheticConfig, n: int | None = None) -> SegmentationDataset:
    """Returns ``n`` images of the held-out scanner ``UNSEEN_DOMAIN`` for generalisation tests.

    No silo trains on this domain; every silo gets the same images for the same config.

    Args:
        cfg: The data config.
        n: Number of images; defaults to ``cfg.n_test``.

    Returns:
        The dataset.

    Raises:
        ValueError: On a bad config or ``n``.
    """
    if n is None:
        n = cfg.n_test if isinstance(cfg, SyntheticConfig) else 0
    check_int("unseen_domain", "n", n, minimum=0)
    return _render(cfg, domain_style(cfg, UNSEEN_DOMAIN), "unseen", n)
