"""Multimodal glaucoma data (fundus photograph + OCT B-scan): the built-in generator with per-silo device styles, and batching."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from fedsilo.core.validators import MappingConfig, check_int, check_seed
from fedsilo.models.classify_data import gaussian_blur
from fedsilo.models.data import SiloSplits

__all__ = [
    "FUNDUS", "GRADES", "MODALITIES", "OCT_GROUP", "FundusStyle", "GlaucomaDataset", "GlaucomaExample",
    "GlaucomaInputs", "GlaucomaTargets", "OctStyle", "SyntheticGlaucomaConfig", "clinic_modalities",
    "collate_glaucoma", "domain_styles", "glaucoma_silo_splits", "glaucoma_unseen", "grade_prior", "unseen_styles",
]

#: The glaucoma grades, in label order (grade ``i`` is ``GRADES[i]``).
GRADES = ("normal", "early", "advanced")
#: The values of :attr:`SyntheticGlaucomaConfig.modalities`: by domain (every third clinic has a fundus camera
#: only), a clinic with both devices, or a fundus camera only.
MODALITIES = ("auto", "both", "fundus")
#: The modality group of the OCT tensors: the network keeps them under a ``modality_oct`` path segment
#: (:func:`fedsilo.core.phases.modality_of`), and a dataset's :attr:`GlaucomaDataset.modalities` names it.
OCT_GROUP = "oct"
#: The modality every example has.
FUNDUS = "fundus"
#: Segmentation labels of the fundus mask: 0 background, 1 optic disc outside the cup (the rim), 2 optic cup.
SEG_CLASSES = 3

_TAG_STYLE, _TAG_UNSEEN, _TAG_PRIOR, _TAG_SPLIT = 0x6F5D, 0x6A11, 0x6B0A, 0x6C5B
#: Vertical cup-to-disc ratio range per grade (before a small Gaussian jitter).
_VCDR = ((0.30, 0.45), (0.50, 0.65), (0.70, 0.85))
#: RNFL thickness range per grade, as a fraction of the B-scan height.
_RNFL = ((0.14, 0.19), (0.09, 0.13), (0.04, 0.08))
_RETINA = np.array([0.78, 0.34, 0.16])  # orange-red fundus background
_DISC = np.array([0.97, 0.78, 0.48])
_CUP = np.array([1.0, 0.93, 0.80])
_VESSEL = np.array([0.45, 0.08, 0.05])


class GlaucomaExample(NamedTuple):
    """One example: ``fundus`` float32 ``[3, H, W]`` in [0, 1], ``oct`` float32 ``[1, h, w]`` (zeros when absent),
    ``has_oct`` bool scalar, ``mask`` int64 ``[H, W]`` (0 background, 1 rim, 2 cup), ``grade`` int64 scalar."""

    fundus: torch.Tensor
    oct: torch.Tensor
    has_oct: torch.Tensor
    mask: torch.Tensor
    grade: torch.Tensor


class GlaucomaDataset(Dataset[GlaucomaExample]):
    """Paired fundus photographs and OCT B-scans of one silo, held in memory; items are :class:`GlaucomaExample`.

    Attributes:
        fundus: float32 ``[N, 3, H, W]`` in [0, 1].
        oct: float32 ``[N, 1, h, w]`` in [0, 1]; zeros for an example without OCT.
        has_oct: bool ``[N]``: whether the example's OCT is real.
        masks: int64 ``[N, H, W]`` of labels 0 (background), 1 (rim), 2 (cup).
        grades: int64 ``[N]``, each an index into :data:`GRADES`.
        has_oct_modality: Whether this silo has OCT at all (false for a fundus-only clinic), even where
            this split holds no OCT.
    """

    @property
    def modalities(self) -> frozenset[str]:
        """The modality groups this silo's data holds (``{"fundus", "oct"}``, or ``{"fundus"}`` for a
        fundus-only clinic): a silo agent trains, and uploads, only the network tensors of these groups
        (:meth:`fedsilo.silo_agent.strategy.Strategy.hold_modalities`)."""
        return frozenset({FUNDUS, OCT_GROUP} if self.has_oct_modality else {FUNDUS})

    def __init__(self, fundus: torch.Tensor, oct: torch.Tensor, has_oct: torch.Tensor, masks: torch.Tensor,
                 grades: torch.Tensor, *, has_oct_modality: bool | None = None) -> None:
        """Wraps stacked tensors; ``has_oct_modality`` defaults to whether any example has OCT.

        Raises:
            ValueError: On wrong ranks, dtypes or lengths, a mask label outside 0..2 or a grade outside 0..2.
        """
        n = int(fundus.shape[0]) if fundus.dim() == 4 else -1
        if fundus.dim() != 4 or fundus.shape[1] != 3 or fundus.dtype != torch.float32:
            raise ValueError(f"fundus must be float32 [N, 3, H, W], got {fundus.dtype} {tuple(fundus.shape)}")
        if oct.dim() != 4 or oct.shape[:2] != (n, 1) or oct.dtype != torch.float32:
            raise ValueError(f"oct must be float32 [N, 1, h, w] with N = {n}, got {oct.dtype} {tuple(oct.shape)}")
        if has_oct.shape != (n,) or has_oct.dtype != torch.bool:
            raise ValueError(f"has_oct must be bool [N] with N = {n}, got {has_oct.dtype} {tuple(has_oct.shape)}")
        if masks.shape != (n, *fundus.shape[2:]) or masks.dtype != torch.int64:
            raise ValueError(f"masks must be int64 [N, H, W] = {[n, *fundus.shape[2:]]}, "
                             f"got {masks.dtype} {tuple(masks.shape)}")
        if grades.shape != (n,) or grades.dtype != torch.int64:
            raise ValueError(f"grades must be int64 [N] with N = {n}, got {grades.dtype} {tuple(grades.shape)}")
        if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) >= SEG_CLASSES):
            raise ValueError(f"mask labels must lie in 0..2, got {int(masks.min())}..{int(masks.max())}")
        if grades.numel() and (int(grades.min()) < 0 or int(grades.max()) >= len(GRADES)):
            raise ValueError(f"grades must lie in 0..{len(GRADES) - 1}, got {int(grades.min())}..{int(grades.max())}")
        self.fundus, self.oct, self.has_oct, self.masks, self.grades = fundus, oct, has_oct, masks, grades
        self.has_oct_modality = bool(has_oct.any()) if has_oct_modality is None else bool(has_oct_modality)

    def __len__(self) -> int:
        return int(self.fundus.shape[0])

    def __getitem__(self, index: int) -> GlaucomaExample:
        return GlaucomaExample(self.fundus[index], self.oct[index], self.has_oct[index], self.masks[index],
                               self.grades[index])

    def __repr__(self) -> str:
        return (f"GlaucomaDataset(n={len(self)}, fundus={tuple(self.fundus.shape[1:])}, "
                f"oct={tuple(self.oct.shape[1:])}, has_oct_modality={self.has_oct_modality})")


class _Batch(tuple):  # type: ignore[type-arg]
    """A tuple of tensors sharing the batch dimension: slices along the batch, ``shape`` of the first, ``to``."""

    def __new__(cls, *tensors: torch.Tensor) -> Any:
        return super().__new__(cls, tensors)

    def __getnewargs__(self) -> tuple[Any, ...]:
        return tuple(self)

    @property
    def shape(self) -> torch.Size:
        """The shape of the first tensor (the batch size first)."""
        return tuple.__getitem__(self, 0).shape

    @property
    def batch_size(self) -> int:
        """The number of examples."""
        return int(self.shape[0])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):  # a slice of the batch, not of the tuple
            return type(self)(*(t[key] for t in tuple.__iter__(self)))
        return tuple.__getitem__(self, key)

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Every tensor moved to the device of ``Tensor.to(*args, **kwargs)``; floating tensors also cast, others keep their dtype."""
        first = tuple.__getitem__(self, 0).to(*args, **kwargs)
        return type(self)(*(first if i == 0 else t.to(first.dtype if t.is_floating_point() else t.dtype).to(first.device)
                            for i, t in enumerate(tuple.__iter__(self))))


class GlaucomaInputs(_Batch):
    """A batch's network inputs ``(fundus float32 [N, 3, H, W], oct float32 [N, 1, h, w], has_oct bool [N])``.

    It unpacks as a triple and, like a tensor batch, has ``shape`` (that of ``fundus``), slices along
    the batch (``inputs[:0]`` is an empty batch, which DP-SGD's loop uses) and moves with ``to``.
    ``len()`` is that of the triple (3); use :attr:`batch_size` or ``shape[0]`` for the examples.
    """

    def __new__(cls, fundus: torch.Tensor, oct: torch.Tensor, has_oct: torch.Tensor) -> GlaucomaInputs:
        """Builds the triple."""
        return super().__new__(cls, fundus, oct, has_oct)  # type: ignore[no-any-return]

    @property
    def fundus(self) -> torch.Tensor:
        """Fundus photographs ``[N, 3, H, W]``."""
        return tuple.__getitem__(self, 0)

    @property
    def oct(self) -> torch.Tensor:
        """OCT B-scans ``[N, 1, h, w]`` (zeros where :attr:`has_oct` is false)."""
        return tuple.__getitem__(self, 1)

    @property
    def has_oct(self) -> torch.Tensor:
        """Whether each example's OCT is real, bool ``[N]``."""
        return tuple.__getitem__(self, 2)


class GlaucomaTargets(_Batch):
    """A batch's targets ``(mask int64 [N, H, W], grade int64 [N])``; slices, ``shape`` (the mask's) and ``to`` as :class:`GlaucomaInputs`."""

    def __new__(cls, mask: torch.Tensor, grade: torch.Tensor) -> GlaucomaTargets:
        """Builds the pair."""
        return super().__new__(cls, mask, grade)  # type: ignore[no-any-return]

    @property
    def mask(self) -> torch.Tensor:
        """Segmentation labels ``[N, H, W]``."""
        return tuple.__getitem__(self, 0)

    @property
    def grade(self) -> torch.Tensor:
        """Grades ``[N]``."""
        return tuple.__getitem__(self, 1)


def collate_glaucoma(dataset: Dataset[Any], indices: Sequence[int], device: torch.device | str
                     ) -> tuple[GlaucomaInputs, GlaucomaTargets]:
    """Stacks examples ``indices`` into ``(GlaucomaInputs, GlaucomaTargets)`` on ``device``.

    Works on any map-style dataset of :class:`GlaucomaExample` items (a ``Subset`` or ``ConcatDataset``
    too). No indices give an empty batch shaped like the dataset's first example.
    """
    items = [dataset[i] for i in indices]
    if not items:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("cannot collate an empty batch of an empty dataset (no shapes to copy)")
        first = dataset[0]
        items, keep = [first], 0
    else:
        keep = len(items)
    fundus = torch.stack([torch.as_tensor(e[0], dtype=torch.float32) for e in items])[:keep]
    oct_ = torch.stack([torch.as_tensor(e[1], dtype=torch.float32) for e in items])[:keep]
    has = torch.stack([torch.as_tensor(e[2], dtype=torch.bool).reshape(()) for e in items])[:keep]
    mask = torch.stack([torch.as_tensor(e[3], dtype=torch.int64) for e in items])[:keep]
    grade = torch.stack([torch.as_tensor(e[4], dtype=torch.int64).reshape(()) for e in items])[:keep]
    return (GlaucomaInputs(fundus.to(device), oct_.to(device), has.to(device)),
            GlaucomaTargets(mask.to(device), grade.to(device)))


# -- the built-in generator ------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SyntheticGlaucomaConfig(MappingConfig):
    """The built-in generator of paired fundus photographs and OCT B-scans (the data options of a built-in silo).

    Every example draws a grade (normal, early, advanced). Its fundus photograph is an orange-red
    retina with vessels leaving the disc, a bright elliptical optic disc near the centre and a paler
    cup inside it whose vertical cup-to-disc ratio (vCDR) follows the grade (normal 0.30-0.45,
    early 0.50-0.65, advanced 0.70-0.85, plus a jitter of sd 0.02); the mask comes from the same
    ellipses. Its OCT B-scan cuts horizontally through the disc: seven retinal layers whose top one,
    the retinal nerve fibre layer (RNFL), is thinner with a higher grade (normal 14-19 %, early 9-13 %,
    advanced 4-8 % of the scan height), the cup's depression in the middle, and speckle. Each domain
    (silo) renders both with its own device styles (:func:`domain_styles`).

    Attributes:
        seed: Seed of the styles, grade priors, examples and splits.
        image_size: Side of the square RGB fundus photographs (H = W).
        oct_size: ``(height, width)`` of the OCT B-scans.
        n_train: Training examples per silo (>= 1).
        n_val: Validation examples per silo.
        n_test: Test examples per silo (grade-balanced).
        n_unseen: Examples of the unseen devices per silo (grade-balanced).
        modalities: ``"both"`` (fundus and OCT), ``"fundus"`` (a fundus-only clinic: every OCT is
            zeros and ``has_oct`` false, in every split and the unseen set), or ``"auto"`` (the
            default): domain ``i`` is fundus-only when ``i % 3 == 2`` (the third clinic of three), see
            :func:`clinic_modalities`.
    """

    seed: int = 0
    image_size: int = 64
    oct_size: tuple[int, ...] = (32, 64)
    n_train: int = 96
    n_val: int = 24
    n_test: int = 48
    n_unseen: int = 48
    modalities: str = "auto"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_seed(owner, "seed", self.seed)
        check_int(owner, "image_size", self.image_size, minimum=32)
        if isinstance(self.oct_size, list):
            object.__setattr__(self, "oct_size", tuple(self.oct_size))
        if not isinstance(self.oct_size, tuple) or len(self.oct_size) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in self.oct_size):
            raise ValueError(f"{owner}.oct_size must be (height, width), two ints >= 16, got {self.oct_size!r}")
        check_int(owner, "n_train", self.n_train, minimum=1)
        for name in ("n_val", "n_test", "n_unseen"):
            check_int(owner, name, getattr(self, name), minimum=0)
        if self.modalities not in MODALITIES:
            raise ValueError(f"{owner}.modalities must be one of {list(MODALITIES)}, got {self.modalities!r}")


@dataclass(frozen=True)
class FundusStyle:
    """How a fundus camera renders: ``clip(gain * (illumination * blur(x)) ** gamma + noise)``.

    Attributes:
        gain: Per-channel (RGB) colour gain.
        gamma: Gamma of the intensities.
        blur: Standard deviation of the Gaussian blur, in pixels.
        illumination: Strength of a linear illumination gradient across the image (0: even).
        angle: Direction of that gradient, in radians.
        noise: Standard deviation of the additive Gaussian noise.
    """

    gain: tuple[float, float, float]
    gamma: float
    blur: float
    illumination: float
    angle: float
    noise: float


@dataclass(frozen=True)
class OctStyle:
    """How an OCT device renders: ``clip(contrast * (x * speckle - 0.1) + 0.1 + noise)``, speckle a unit-mean
    log-normal field of log-sd ``speckle``.

    Attributes:
        contrast: Contrast around a dark level of 0.1.
        speckle: Log-standard deviation of the multiplicative speckle.
        noise: Standard deviation of the additive Gaussian noise.
    """

    contrast: float
    speckle: float
    noise: float


def domain_styles(seed: int, domain: int) -> tuple[FundusStyle, OctStyle]:
    """The fundus and OCT styles of built-in domain ``domain``, a function of (``seed``, ``domain``) alone.

    Fundus: gains in [0.85, 1.15], gamma in [0.8, 1.25], blur in [0, 0.8] px, illumination in
    [0, 0.25], noise in [0.01, 0.03]. OCT: contrast in [0.8, 1.2], speckle in [0.15, 0.3], noise in
    [0.01, 0.03]. :func:`unseen_styles` lies outside these ranges.
    """
    check_seed("domain_styles", "seed", seed)
    check_int("domain_styles", "domain", domain, minimum=0)
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_STYLE, seed, domain]))
    gain = rng.uniform(0.85, 1.15, size=3)
    fundus = FundusStyle(gain=(float(gain[0]), float(gain[1]), float(gain[2])),
                         gamma=float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))), blur=float(rng.uniform(0, 0.8)),
                         illumination=float(rng.uniform(0, 0.25)), angle=float(rng.uniform(0, 2 * np.pi)),
                         noise=float(rng.uniform(0.01, 0.03)))
    return fundus, OctStyle(contrast=float(rng.uniform(0.8, 1.2)), speckle=float(rng.uniform(0.15, 0.3)),
                            noise=float(rng.uniform(0.01, 0.03)))


def unseen_styles(seed: int) -> tuple[FundusStyle, OctStyle]:
    """The unseen devices of ``seed`` (the same for every silo): each parameter outside every silo's range.

    Fundus: a colour cast (one gain in [0.7, 0.78], another in [1.22, 1.3]), gamma in [0.65, 0.72] or
    [1.4, 1.5], blur in [1.0, 1.3] px, illumination in [0.3, 0.4], noise in [0.035, 0.05]. OCT:
    contrast in [0.6, 0.7] or [1.3, 1.4], speckle in [0.35, 0.45], noise in [0.035, 0.05].
    """
    check_seed("unseen_styles", "seed", seed)
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_UNSEEN, seed]))
    low, high = rng.permutation(3)[:2]
    gain = rng.uniform(0.9, 1.1, size=3)
    gain[low], gain[high] = rng.uniform(0.7, 0.78), rng.uniform(1.22, 1.3)
    side = rng.integers(0, 2, size=2)
    fundus = FundusStyle(gain=(float(gain[0]), float(gain[1]), float(gain[2])),
                         gamma=float(rng.uniform(0.65, 0.72) if side[0] else rng.uniform(1.4, 1.5)),
                         blur=float(rng.uniform(1.0, 1.3)), illumination=float(rng.uniform(0.3, 0.4)),
                         angle=float(rng.uniform(0, 2 * np.pi)), noise=float(rng.uniform(0.035, 0.05)))
    return fundus, OctStyle(contrast=float(rng.uniform(0.6, 0.7) if side[1] else rng.uniform(1.3, 1.4)),
                            speckle=float(rng.uniform(0.35, 0.45)), noise=float(rng.uniform(0.035, 0.05)))


def grade_prior(seed: int, domain: int) -> np.ndarray:
    """Domain ``domain``'s mildly skewed grade prior ``[3]``: ``softmax(0.5 * z)``, ``z`` standard normal from (seed, domain)."""
    check_int("grade_prior", "domain", domain, minimum=0)
    z = np.random.default_rng(np.random.SeedSequence([_TAG_PRIOR, seed, domain])).normal(size=len(GRADES))
    p = np.exp(0.5 * (z - z.max()))
    return p / p.sum()


def _grades(rng: np.random.Generator, prior: np.ndarray | None, n: int) -> np.ndarray:
    """``n`` grades: balanced for no prior; else drawn from ``prior``, each grade at least once when ``n >= 6``."""
    k = len(GRADES)
    if prior is None:
        return rng.permutation(np.arange(n) % k).astype(np.int64)
    fixed = np.arange(k) if n >= 2 * k else np.zeros(0, dtype=np.int64)
    return rng.permutation(np.concatenate([fixed, rng.choice(k, size=n - len(fixed), p=prior)])).astype(np.int64)


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def _vessels(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, px: float) -> np.ndarray:
    """Vessel darkness ``[S, S]`` in [0, 1]: four to six curved, tapering branches leaving the disc."""
    out = np.zeros_like(yy)
    r = np.linspace(0.0, 0.6, 40)
    for k in range(int(rng.integers(4, 7))):
        a = (k + rng.uniform(-0.3, 0.3)) * 2 * np.pi / 5 + rng.uniform(0, 0.5)
        bend = rng.uniform(-2.0, 2.0)
        py, px_ = cy + r * np.sin(a + bend * r), cx + r * np.cos(a + bend * r)
        d = np.min((yy[..., None] - py) ** 2 + (xx[..., None] - px_) ** 2, axis=-1)
        width = rng.uniform(0.9, 1.5) * px
        out = np.maximum(out, np.exp(-d / width ** 2) * rng.uniform(0.5, 0.8))
    return out


def _example(rng: np.random.Generator, grade: int, size: int, oct_size: tuple[int, int]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A style-free fundus ``[3, S, S]``, mask ``[S, S]`` and OCT ``[h, w]`` of one example of ``grade``."""
    coords = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    px = 1.0 / size
    cy, cx = rng.uniform(-0.1, 0.1, size=2)
    d_ry = rng.uniform(0.13, 0.17)
    d_rx = d_ry * rng.uniform(0.82, 0.95)
    vcdr = float(np.clip(rng.uniform(*_VCDR[grade]) + rng.normal(scale=0.02), 0.2, 0.9))
    c_ry = vcdr * d_ry
    c_rx = min(c_ry * rng.uniform(0.9, 1.1), 0.88 * d_rx)
    ccy, ccx = cy + rng.uniform(-0.3, 0.3) * (d_ry - c_ry), cx + rng.uniform(-0.3, 0.3) * (d_rx - c_rx)
    disc_e, cup_e = _ellipse(yy, xx, cy, cx, d_ry, d_rx), _ellipse(yy, xx, ccy, ccx, c_ry, c_rx)
    mask = np.where(cup_e <= 1, 2, np.where(disc_e <= 1, 1, 0)).astype(np.int64)
    disc_w = 1 / (1 + np.exp((np.sqrt(disc_e) - 1) / (1.2 * px / d_ry)))
    cup_w = 1 / (1 + np.exp((np.sqrt(cup_e) - 1) / (1.5 * px / c_ry)))
    texture = 1 + rng.normal(scale=0.03, size=yy.shape)
    for _ in range(3):
        f = rng.uniform(1, 3, size=2) * rng.choice([-1, 1], size=2)
        texture += rng.uniform(0.02, 0.05) * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + rng.uniform(0, 2 * np.pi))
    field = 1 / (1 + np.exp((np.hypot(yy, xx) - 0.47) / (1.5 * px)))  # the circular field of view
    rgb = _RETINA[:, None, None] * texture * (1 - 0.35 * np.hypot(yy - cy, xx - cx))
    vessel = _vessels(rng, yy, xx, cy, cx, px) * (1 - 0.6 * cup_w)
    rgb = rgb * (1 - vessel) + _VESSEL[:, None, None] * vessel
    rgb = rgb * (1 - disc_w) + _DISC[:, None, None] * disc_w * (1 - 0.25 * vessel)
    rgb = rgb * (1 - cup_w) + _CUP[:, None, None] * cup_w
    fundus = rgb * field
    return fundus, mask, _oct(rng, grade, oct_size, cx, d_rx, ccx, c_rx, vcdr)


def _oct(rng: np.random.Generator, grade: int, size: tuple[int, int], cx: float, d_rx: float, ccx: float,
         c_rx: float, vcdr: float) -> np.ndarray:
    """A style-free B-scan ``[h, w]`` through the disc centre (columns span the fundus width)."""
    h, w = size
    x = (np.arange(w) + 0.5) / w - 0.5
    z = np.arange(h)[:, None] + 0.5
    surface = h * (0.18 + 0.03 * rng.uniform(-1, 1) * (2 * x) ** 2 + rng.uniform(-0.02, 0.02))
    in_cup = np.clip(1 - ((x - ccx) / c_rx) ** 2, 0, None)
    surface = surface + h * (0.08 + 0.25 * vcdr) * np.sqrt(in_cup)  # the cup's depression
    rnfl = h * rng.uniform(*_RNFL[grade]) * (1 + 0.05 * np.sin(2 * np.pi * x * rng.uniform(1, 2)))
    rnfl = rnfl * np.clip((np.abs(x - cx) / d_rx - 0.6) / 0.4, 0, 1) ** 0.5  # the fibres dive into the disc
    thick = [rnfl] + [np.full(w, h * f) for f in (0.12, 0.06, 0.045, 0.12, 0.045)]
    levels = [0.85, 0.55, 0.28, 0.5, 0.22, 0.9, 0.35]  # RNFL, GCL+IPL, INL, OPL, ONL, RPE, choroid
    depth = z - surface[None, :]
    img = np.full((h, w), 0.05)
    bound, prev = np.zeros(w), 0.05
    for t, level in zip([np.zeros(w), *thick], levels):
        bound = bound + t
        img += (level - prev) * 1 / (1 + np.exp(-(depth - bound[None, :]) / 0.5))
        prev = level
    img += (0.05 - prev) * 1 / (1 + np.exp(-(depth - bound[None, :] - 0.15 * h) / 1.5))  # choroid fades out
    nerve = np.abs(x - cx) < 0.8 * d_rx  # the nerve head: no deep layers, mid-grey tissue below the surface
    tissue = 0.4 / (1 + np.exp(-depth / 0.5))
    return np.where(nerve[None, :], np.maximum(tissue, img * (depth < rnfl[None, :] + 1)), img)


def _style_fundus(rng: np.random.Generator, x: np.ndarray, style: FundusStyle) -> np.ndarray:
    size = x.shape[-1]
    coords = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    light = 1 + style.illumination * 2 * (np.cos(style.angle) * xx + np.sin(style.angle) * yy)
    x = np.clip(gaussian_blur(x, style.blur) * light, 0, 1) ** style.gamma * np.array(style.gain)[:, None, None]
    return np.clip(x + rng.normal(scale=style.noise, size=x.shape), 0, 1).astype(np.float32)


def _style_oct(rng: np.random.Generator, x: np.ndarray, style: OctStyle) -> np.ndarray:
    speckle = np.exp(rng.normal(scale=style.speckle, size=x.shape) - style.speckle ** 2 / 2)
    x = style.contrast * (x * speckle - 0.1) + 0.1 + rng.normal(scale=style.noise, size=x.shape)
    return np.clip(x, 0, 1).astype(np.float32)


def clinic_modalities(cfg: SyntheticGlaucomaConfig, domain: int) -> str:
    """What built-in clinic ``domain`` holds: ``"both"`` or ``"fundus"`` (``cfg.modalities``, with ``"auto"``
    resolved: every third clinic, ``domain % 3 == 2``, has a fundus camera only)."""
    check_int("clinic_modalities", "domain", domain, minimum=0)
    if cfg.modalities != "auto":
        return cfg.modalities
    return "fundus" if domain % 3 == 2 else "both"


def _dataset(rng: np.random.Generator, grades: np.ndarray, cfg: SyntheticGlaucomaConfig,
             styles: tuple[FundusStyle, OctStyle], modalities: str) -> GlaucomaDataset:
    n, s = len(grades), cfg.image_size
    h, w = cfg.oct_size
    fundus, octs = np.zeros((n, 3, s, s), np.float32), np.zeros((n, 1, h, w), np.float32)
    masks = np.zeros((n, s, s), np.int64)
    for i, g in enumerate(grades):
        f, masks[i], o = _example(rng, int(g), s, (h, w))
        fundus[i] = _style_fundus(rng, f, styles[0])
        o = _style_oct(rng, o, styles[1])  # drawn either way: a fundus-only silo holds the same eyes
        if modalities == "both":
            octs[i, 0] = o
    has = torch.full((n,), modalities == "both", dtype=torch.bool)
    return GlaucomaDataset(torch.from_numpy(fundus), torch.from_numpy(octs), has, torch.from_numpy(masks),
                           torch.from_numpy(grades.astype(np.int64)), has_oct_modality=modalities == "both")


def glaucoma_silo_splits(cfg: SyntheticGlaucomaConfig, domain: int) -> SiloSplits:
    """The train/val/test examples of built-in domain ``domain`` in its device styles (:func:`domain_styles`).

    Deterministic in (``cfg``, ``domain``). Training and validation grades follow the domain's
    mildly skewed prior (:func:`grade_prior`; every grade at least once in a split of six or more);
    the test set is grade-balanced.
    """
    check_int("glaucoma_silo_splits", "domain", domain, minimum=0)
    styles = domain_styles(cfg.seed, domain)
    prior = grade_prior(cfg.seed, domain)
    out = {}
    for i, (split, n) in enumerate((("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test))):
        rng = np.random.default_rng(np.random.SeedSequence([_TAG_SPLIT, cfg.seed, domain, i]))
        out[split] = _dataset(rng, _grades(rng, None if split == "test" else prior, n), cfg, styles,
                              clinic_modalities(cfg, domain))
    return SiloSplits(**out)


def glaucoma_unseen(cfg: SyntheticGlaucomaConfig, domain: int) -> GlaucomaDataset:
    """``cfg.n_unseen`` grade-balanced examples from the unseen devices (:func:`unseen_styles`).

    The devices are the same for every silo of a seed; the examples are drawn per (seed, ``domain``),
    with the silo's ``modalities`` (a fundus-only silo is scored on fundus photographs only).
    """
    check_int("glaucoma_unseen", "domain", domain, minimum=0)
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_UNSEEN, cfg.seed, domain]))
    return _dataset(rng, _grades(rng, None, cfg.n_unseen), cfg, unseen_styles(cfg.seed), clinic_modalities(cfg, domain))
