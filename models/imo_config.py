"""The IMO network's settings: :class:`ImoNetConfig` and its switches (normalisation, the modalities it sees, fusion, decoder).

The architecture they configure, and every choice behind it, is described in
:mod:`fedsilo.models.imo_net`, which builds the network from this config.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fedsilo.core.validators import MappingConfig, check_enum, check_float, check_int, check_seed

__all__ = ["ImoDecoder", "ImoFusion", "ImoInputs", "ImoNetConfig", "ImoNorm"]


class ImoNorm(enum.Enum):
    """The normalisation after each convolution of :class:`ImoNet` (both per-example)."""

    GROUP = "group"  # GroupNorm(norm_groups, C)
    LAYER = "layer"  # GroupNorm(1, C): one group over C, H, W


class ImoInputs(enum.Enum):
    """What :class:`ImoNet` sees of each example (ablation; the architecture is the same in all)."""

    BOTH = "both"  # fundus and, where has_oct, OCT
    FUNDUS = "fundus"  # OCT withheld: has_oct forced false
    OCT = "oct"  # fundus withheld: a zero fundus image


class ImoFusion(enum.Enum):
    """How :class:`ImoNet` fuses the two modalities (ablation)."""

    CMFA = "cmfa"  # cross-attention at the deepest level + alignment term
    LATE = "late"  # logit-level late fusion of two grade heads; fundus-only decoder skips


class ImoDecoder(enum.Enum):
    """The segmentation decoder of :class:`ImoNet` (ablation)."""

    DIFFUSION = "diffusion"  # DDPM-trained, DDIM-sampled
    PLAIN = "plain"  # the same UNet called once on a zero map at t = 0


@dataclass(frozen=True, kw_only=True)
class ImoNetConfig(MappingConfig):
    """The IMO network (see the module docstring for the architecture).

    Attributes:
        seed: Seed of the initial weights.
        fundus_channels: Channels of a fundus photograph.
        oct_channels: Channels of an OCT image.
        widths: Channels of each encoder/decoder level (>= 2 levels); every level after the first
            halves H and W, so the default fuses at H/4. The last is the fusion width C.
        n_seg_classes: Segmentation classes K (0 background, 1 disc rim, 2 cup).
        n_grades: Glaucoma grades.
        norm: ``"group"`` or ``"layer"`` (:class:`ImoNorm`).
        norm_groups: Groups of ``"group"``; must divide every width.
        attention_heads: Heads of the CMFA cross-attention; must divide ``widths[-1]``.
        time_dim: Width of the diffusion step embedding.
        diffusion_steps: T of the DDPM training chain.
        beta_start: β of the first step (Ho et al.: 1e-4).
        beta_end: β of the last step (Ho et al.: 0.02).
        inference_steps: Deterministic DDIM steps at evaluation (1..T).
        sample_seed: Seed of the fixed noise maps of evaluation (and of the trained start step).
        logit_scale: Segmentation logits are ``logit_scale * x̂_0`` (x̂_0 near ±1 gives softmax
            probability ≈ 0.99 for 3 and K = 3).
        align_weight: Weight of the CMFA alignment term.
        diffusion_weight: Weight of the DDPM ε-MSE term.
        grade_weight: Weight of the grading cross-entropy.
        inputs: Ablation (:class:`ImoInputs`): ``"both"`` (default); ``"fundus"``: OCT withheld,
            ``has_oct`` forced false inside the network; ``"oct"``: fundus withheld, the network
            sees a zero fundus image.
        fusion: Ablation (:class:`ImoFusion`): ``"cmfa"`` (default); ``"late"``: no CMFA and no
            alignment modules or term, fundus-only decoder skips, grade logits
            ``grade_head(pooled fundus) + has_oct * modality_oct.grade_head(pooled OCT)``.
        decoder: Ablation (:class:`ImoDecoder`): ``"diffusion"`` (default); ``"plain"``: the same
            UNet called once on a zero map at t = 0, its output the segmentation logits, trained
            with Dice + CE only.
    """

    seed: int = 0
    fundus_channels: int = 3
    oct_channels: int = 1
    widths: tuple[int, ...] = (16, 32, 64)
    n_seg_classes: int = 3
    n_grades: int = 3
    norm: ImoNorm = ImoNorm.GROUP
    norm_groups: int = 8
    attention_heads: int = 4
    time_dim: int = 64
    diffusion_steps: int = 100
    beta_start: float = 1e-4
    beta_end: float = 0.02
    inference_steps: int = 4
    sample_seed: int = 0
    logit_scale: float = 3.0
    align_weight: float = 0.1
    diffusion_weight: float = 1.0
    grade_weight: float = 1.0
    inputs: ImoInputs = ImoInputs.BOTH
    fusion: ImoFusion = ImoFusion.CMFA
    decoder: ImoDecoder = ImoDecoder.DIFFUSION

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_seed(owner, "seed", self.seed)
        check_int(owner, "fundus_channels", self.fundus_channels, minimum=1)
        check_int(owner, "oct_channels", self.oct_channels, minimum=1)
        if not isinstance(self.widths, tuple) or len(self.widths) < 2:
            raise ValueError(f"{owner}.widths must be a list of at least 2 widths, got {self.widths!r}")
        for width in self.widths:
            check_int(owner, "widths", width, minimum=1)
        check_int(owner, "n_seg_classes", self.n_seg_classes, minimum=2)
        check_int(owner, "n_grades", self.n_grades, minimum=2)
        check_enum(owner, "norm", self.norm, ImoNorm)
        check_int(owner, "norm_groups", self.norm_groups, minimum=1)
        if self.norm is ImoNorm.GROUP and any(w % self.norm_groups for w in self.widths):
            raise ValueError(f"{owner}.norm_groups={self.norm_groups} must divide every entry of widths "
                             f"{list(self.widths)}")
        check_int(owner, "attention_heads", self.attention_heads, minimum=1)
        if self.widths[-1] % self.attention_heads:
            raise ValueError(f"{owner}.attention_heads={self.attention_heads} must divide the fusion width "
                             f"widths[-1]={self.widths[-1]}")
        check_int(owner, "time_dim", self.time_dim, minimum=2)
        check_int(owner, "diffusion_steps", self.diffusion_steps, minimum=2)
        check_float(owner, "beta_start", self.beta_start, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_float(owner, "beta_end", self.beta_end, low=float(self.beta_start), high=1.0, high_inclusive=False)
        check_int(owner, "inference_steps", self.inference_steps, minimum=1)
        if self.inference_steps > self.diffusion_steps:
            raise ValueError(f"{owner}.inference_steps={self.inference_steps} must be <= diffusion_steps="
                             f"{self.diffusion_steps}")
        check_seed(owner, "sample_seed", self.sample_seed)
        check_float(owner, "logit_scale", self.logit_scale, low=0.0, high=1e3, low_inclusive=False)
        for name in ("align_weight", "diffusion_weight", "grade_weight"):
            check_float(owner, name, getattr(self, name), low=0.0, high=1e6)
        check_enum(owner, "inputs", self.inputs, ImoInputs)
        check_enum(owner, "fusion", self.fusion, ImoFusion)
        check_enum(owner, "decoder", self.decoder, ImoDecoder)
