"""IMO network for multimodal glaucoma assessment: fundus + OCT encoders, CMFA fusion, a diffusion decoder, a grade head.

IMO ("iterative multimodal optimisation"; our reading of the paper's abstract) fuses a fundus
photograph with an OCT scan for joint optic disc/cup segmentation and glaucoma grading. What the
abstract leaves open, and what we chose:

* **Encoders.** One small conv encoder per modality, ``len(widths)`` levels (3x3 conv, norm,
  SiLU, twice per level; every level after the first starts with a stride-2 conv): fundus
  ``[N, 3, H, W]`` -> maps at H, H/2, H/4 (default widths); OCT ``[N, 1, h, w]`` -> a
  ``[N, C, h/4, w/4]`` map. Any size works (stride-2 convs round up). Norm: GroupNorm
  (``norm="group"``) or GroupNorm with one group (``"layer"``); both per-example, so every
  example's output and loss read only that example (DP-SGD per-sample gradients) and train and
  evaluation mode agree. BatchNorm is deliberately not offered.
* **CMFA (cross-modal feature alignment).** Mid-level fusion at the deepest level: pre-LayerNorm
  multi-head cross-attention (Linear q/k/v/out + softmax, written out so Opacus has exact
  per-sample rules for every layer) in which each fundus token attends to the OCT tokens of its
  own example, added residually to the fundus map. No attention back from OCT to fundus and no
  positional encodings (the two grids do not correspond; the residual keeps the fundus geometry).
  Examples without OCT (``has_oct`` false): the attention's residual is multiplied by 0 and
  their OCT tensor is replaced by zeros first, so they get exactly the fundus-only path and their
  OCT content never matters. The alignment term pulls each example's two modalities together:
  ``1 - cos(P_f(mean-pool fundus map), P_o(mean-pool OCT map))`` with separate linear projections,
  computed as ``0.5 ||â - b̂||²`` of the unit vectors (the same number, exactly 0 for identical
  features), times ``has_oct``. No negatives (a contrastive form would couple the batch's
  examples, which record-level DP-SGD forbids); collapse is held off by the other terms.
* **Iterative refinement decoder (diffusion).** A small conditional UNet denoises the
  segmentation map ``x_0 = 2 onehot(mask) - 1`` ``[N, K, H, W]``; its skips are the fundus
  encoder's maps with the deepest one replaced by the CMFA-fused map; the step ``t`` enters as a
  sinusoidal embedding through an MLP, added per channel in every block. DDPM (Ho, Jain, Abbeel
  2020): linear β from ``beta_start`` to ``beta_end`` over ``diffusion_steps`` steps, ε-prediction,
  MSE. With T = 100 and Ho et al.'s β range ᾱ_T ≈ 0.36, so pure noise, where sampling starts, is
  not what training shows at t = T - 1; therefore the start step is trained too (below).
  Inference: deterministic DDIM (η = 0, x̂_0 clipped to [-1, 1] between steps) over
  ``inference_steps`` strided steps from T - 1 down to 0, starting from one noise map drawn with
  a private generator seeded ``sample_seed`` and shared by every example (so an example's
  prediction depends neither on the global RNG nor on its batch). Segmentation logits are
  ``logit_scale * x̂_0`` of the last step (unclipped).
* **Segmentation supervision.** Dice (per image, all classes, smooth 1e-5) + pixel CE on two
  x̂_0 estimates, averaged: (a) ``seg_logits`` of the forward pass (training mode: the sampler's
  first step from the fixed start noise at t = T - 1, with gradients; eval mode: the sampler's
  output) and (b) the estimate of the DDPM pass at the drawn step t.
* **Grading.** Mean- and max-pooled fused map -> Linear -> SiLU -> Linear, CE.

Ablation switches of :class:`ImoNetConfig` (a bench study; each default is the network above,
bit-identical):

* **inputs** (:class:`ImoInputs`): ``"both"``; ``"fundus"`` withholds OCT (``has_oct`` is forced
  false inside the network, so every example takes the fundus-only path and no ``modality_oct``
  tensor gets a gradient); ``"oct"`` withholds the fundus photograph (the network sees a zero
  fundus image of the same size, so segmentation and grading can only use OCT through the
  fusion). Same architecture and state in all three.
* **fusion** (:class:`ImoFusion`): ``"cmfa"``; ``"late"`` builds no CMFA and no alignment
  projections (align term 0), the decoder's skips are the fundus maps alone, and grading is
  logit-level late fusion ``grade_head(pool(fundus map)) + has_oct * modality_oct.grade_head(pool(OCT
  map))`` (pool: mean and max over H, W concatenated; the OCT head has the main head's shape).
* **decoder** (:class:`ImoDecoder`): ``"diffusion"``; ``"plain"`` calls the same conditional UNet
  once, deterministically, on a zero input map at step t = 0 and uses its output directly as the
  segmentation logits (no ``logit_scale``, no clipping); loss Dice + CE of those logits only (the
  ε-MSE term is 0), no draws from the global RNG in either mode. Same parameters as ``"diffusion"``.

Training mode draws ``t ~ U{0..T-1}`` per example and then ε from torch's global *CPU* RNG in
``forward`` (the training loop seeds it); evaluation mode uses t = T // 2 and a second fixed
noise map from the ``sample_seed`` generator for the loss's DDPM term. The targets are needed
for the DDPM pass, so :meth:`ImoOutput.loss` runs the denoiser on ``q_sample(x_0, t, ε)``: call
it once per forward pass (Opacus' hooks pair each layer call with one backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedsilo.models.imo_config import ImoDecoder, ImoFusion, ImoInputs, ImoNetConfig, ImoNorm
from fedsilo.models.imo_diffusion import (
    DdpmSchedule,
    EpsFn,
    ddim_sample,
    ddim_timesteps,
    ddpm_loss,
    ddpm_schedule,
    predict_x0,
    q_sample,
    timestep_embedding,
)

__all__ = [
    "CrossModalAttention",
    "ImoDecoder",
    "ImoFusion",
    "ImoInputs",
    "ImoNet",
    "ImoNetConfig",
    "ImoNorm",
    "ImoOutput",
    "OctBranch",
    "alignment_loss",
    "build_imo_net",
    "ddpm_loss",
    "ddpm_schedule",
    "dice_ce_per_example",
    "q_sample",
]

_DICE_SMOOTH = 1e-5


def alignment_loss(fundus_embed: torch.Tensor, oct_embed: torch.Tensor, has_oct: torch.Tensor) -> torch.Tensor:
    """CMFA's per-example alignment term ``[N]``: ``1 - cos(fundus_embed_i, oct_embed_i)`` where ``has_oct_i``, else 0.

    Computed as ``0.5 * ||â - b̂||²`` of the unit vectors (equal to ``1 - cos`` for non-zero
    vectors), so identical features give exactly 0; in [0, 2].

    Args:
        fundus_embed: ``[N, D]``.
        oct_embed: ``[N, D]``.
        has_oct: bool ``[N]``.
    """
    if fundus_embed.shape != oct_embed.shape or fundus_embed.dim() != 2 or has_oct.shape != fundus_embed.shape[:1]:
        raise ValueError(f"alignment_loss needs [N, D], [N, D] and [N], got {tuple(fundus_embed.shape)}, "
                         f"{tuple(oct_embed.shape)} and {tuple(has_oct.shape)}")
    a = F.normalize(fundus_embed, dim=1, eps=1e-8)
    b = F.normalize(oct_embed, dim=1, eps=1e-8)
    return 0.5 * (a - b).square().sum(dim=1) * has_oct.to(a.dtype)


def dice_ce_per_example(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss per image (mean over all classes, smooth 1e-5) plus pixel-mean CE, ``[N]``.

    Args:
        logits: ``[N, K, H, W]``.
        mask: int64 ``[N, H, W]`` in ``[0, K)``.
    """
    k = logits.shape[1]
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(mask, k).permute(0, 3, 1, 2).to(probs.dtype)
    inter = (probs * onehot).sum(dim=(2, 3))
    denom = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
    dice = 1.0 - ((2.0 * inter + _DICE_SMOOTH) / (denom + _DICE_SMOOTH)).mean(dim=1)
    ce = F.cross_entropy(logits, mask, reduction="none").flatten(1).mean(dim=1)
    return dice + ce


def _norm(channels: int, cfg: ImoNetConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups if cfg.norm is ImoNorm.GROUP else 1, channels)


class _ConvBlock(nn.Module):
    """3x3 conv (stride 1 or 2), norm, optional per-channel step bias, SiLU."""

    def __init__(self, c_in: int, c_out: int, cfg: ImoNetConfig, *, stride: int = 1, time_dim: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm = _norm(c_out, cfg)
        self.time = nn.Linear(time_dim, c_out) if time_dim else None
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.conv(x))
        if self.time is not None:
            h = h + self.time(temb)[:, :, None, None]
        return self.act(h)


class _Encoder(nn.Module):
    """One modality's encoder; returns the map of every level."""

    def __init__(self, in_channels: int, cfg: ImoNetConfig) -> None:
        super().__init__()
        widths = (in_channels, *cfg.widths)
        self.levels = nn.ModuleList(
            nn.Sequential(_ConvBlock(widths[i], widths[i + 1], cfg, stride=1 if i == 0 else 2),
                          _ConvBlock(widths[i + 1], widths[i + 1], cfg))
            for i in range(len(cfg.widths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for level in self.levels:
            x = level(x)
            maps.append(x)
        return maps


class CrossModalAttention(nn.Module):
    """CMFA's fusion: fundus tokens attend to their own example's OCT tokens; gated residual add.

    Pre-LayerNorm multi-head attention from Linear layers and a softmax (exact Opacus per-sample
    rules for every parameter). ``gate`` ``[N]`` (1 with OCT, 0 without) multiplies the residual.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, fundus: torch.Tensor, oct_map: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The fused map ``[N, C, H, W]`` of a fundus map ``[N, C, H, W]`` and an OCT map ``[N, C, h, w]``."""
        n, c, h, w = fundus.shape
        f = fundus.flatten(2).transpose(1, 2)  # [N, Lf, C]
        o = self.norm_kv(oct_map.flatten(2).transpose(1, 2))  # [N, Lo, C]
        d = c // self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(n, x.shape[1], self.heads, d).transpose(1, 2)  # [N, heads, L, d]

        q, k, v = split(self.q(self.norm_q(f))), split(self.k(o)), split(self.v(o))
        attn = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(dim=-1)
        mixed = (attn @ v).transpose(1, 2).reshape(n, h * w, c)
        fused = f + gate[:, None, None] * self.out(mixed)
        return fused.transpose(1, 2).reshape(n, c, h, w)


class OctBranch(nn.Module):
    """Every tensor that only examples with OCT train: the OCT encoder, then CMFA and both alignment
    projections (``fusion="cmfa"``) or the OCT grade head (``fusion="late"``).

    For an example without OCT the CMFA residual, the alignment term and the OCT grade logits are
    multiplied by 0, so none of these tensors gets a gradient from it (``fundus`` projection
    included: it only feeds the alignment term).
    """

    def __init__(self, cfg: ImoNetConfig) -> None:
        super().__init__()
        c = cfg.widths[-1]
        self.encoder = _Encoder(cfg.oct_channels, cfg)
        if cfg.fusion is ImoFusion.CMFA:
            self.cmfa = CrossModalAttention(c, cfg.attention_heads)
            self.align_fundus = nn.Linear(c, c)
            self.align_oct = nn.Linear(c, c)
        else:
            self.grade_head = _grade_head(cfg)


def _grade_head(cfg: ImoNetConfig) -> nn.Sequential:
    """Pooled map ``[N, 2C]`` -> Linear -> SiLU -> Linear -> ``[N, n_grades]``."""
    c = cfg.widths[-1]
    return nn.Sequential(nn.Linear(2 * c, c), nn.SiLU(), nn.Linear(c, cfg.n_grades))


def _pool(x: torch.Tensor) -> torch.Tensor:
    """Mean and max over H, W of ``[N, C, H, W]``, concatenated: ``[N, 2C]``."""
    return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class _Denoiser(nn.Module):
    """The conditional UNet ``(x_t, t, skips) -> ε̂`` of the segmentation map."""

    def __init__(self, cfg: ImoNetConfig) -> None:
        super().__init__()
        widths, k, td = cfg.widths, cfg.n_seg_classes, cfg.time_dim
        self.time_dim = td
        self.time = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        self.down = nn.ModuleList(_ConvBlock(k if i == 0 else widths[i - 1], w, cfg, stride=1 if i == 0 else 2,
                                             time_dim=td) for i, w in enumerate(widths))
        self.merge = nn.ModuleList(_ConvBlock(2 * w, w, cfg, time_dim=td) for w in widths)
        self.up = nn.ModuleList(_ConvBlock(widths[i + 1] + widths[i], widths[i], cfg, time_dim=td)
                                for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], k, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, skips: tuple[torch.Tensor, ...]) -> torch.Tensor:
        temb = self.time(timestep_embedding(t, self.time_dim).to(x_t.dtype))
        # contiguous: Opacus' Conv2d rule misreads channels-last activations (a permuted one-hot gives one)
        h, levels = x_t.contiguous(), []
        for down, merge, skip in zip(self.down, self.merge, skips, strict=True):
            h = merge(torch.cat([down(h, temb), skip], dim=1), temb)
            levels.append(h)
        for up, skip in zip(self.up, reversed(levels[:-1]), strict=True):
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = up(torch.cat([h, skip], dim=1), temb)
        return self.head(h)


@dataclass(frozen=True, eq=False)
class ImoOutput:
    """What :meth:`ImoNet.forward` returns: predictions, and what :meth:`loss` needs.

    Attributes:
        seg_logits: ``[N, K, H, W]`` (training mode: the sampler's first-step estimate; eval: the
            sampler's; ``decoder="plain"``: the UNet's output in both modes).
        grade_logits: ``[N, n_grades]``.
        align: The per-example CMFA alignment term ``[N]`` (0 without OCT and with ``fusion="late"``).
        t: The DDPM step of each example's loss pass, int64 ``[N]`` (``decoder="plain"``: 0).
        noise: ε of the loss pass, ``[N, K, H, W]`` (``decoder="plain"``: the zero input map).
        denoise: ``(x_t, t) -> ε̂`` conditioned on this batch's fused features.
        schedule: The DDPM schedule.
        config: The network's config (loss weights, ``logit_scale``).
    """

    seg_logits: torch.Tensor
    grade_logits: torch.Tensor
    align: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    denoise: EpsFn = field(repr=False)
    schedule: DdpmSchedule = field(repr=False)
    config: ImoNetConfig = field(repr=False)

    def loss_terms(self, targets: Any) -> dict[str, torch.Tensor]:
        """The unweighted per-example terms ``[N]``: ``seg`` (Dice+CE, averaged over the two
        estimates), ``diffusion`` (ε-MSE), ``grade`` (CE) and ``align``. Runs the denoiser once.
        With ``decoder="plain"``: ``seg`` is Dice+CE of ``seg_logits``, ``diffusion`` is 0 and the
        denoiser is not run.

        Args:
            targets: An object with ``mask`` (int64 ``[N, H, W]``) and ``grade`` (int64 ``[N]``).

        Raises:
            ValueError: On targets of the wrong shape, dtype or range.
        """
        n, k, h, w = self.seg_logits.shape
        mask, grade = getattr(targets, "mask", None), getattr(targets, "grade", None)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.int64 or tuple(mask.shape) != (n, h, w):
            raise ValueError(f"targets.mask must be an int64 tensor [{n}, {h}, {w}], "
                             f"got {getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        if not isinstance(grade, torch.Tensor) or grade.dtype != torch.int64 or tuple(grade.shape) != (n,):
            raise ValueError(f"targets.grade must be an int64 tensor [{n}], "
                             f"got {getattr(grade, 'dtype', type(grade).__name__)} {tuple(getattr(grade, 'shape', ()))}")
        for name, value, top in (("mask", mask, k), ("grade", grade, self.grade_logits.shape[1])):
            if value.numel() and (int(value.min()) < 0 or int(value.max()) >= top):
                raise ValueError(f"targets.{name} must lie in [0, {top}), got [{int(value.min())}, {int(value.max())}]")
        grade_ce = F.cross_entropy(self.grade_logits, grade, reduction="none")
        if self.config.decoder is ImoDecoder.PLAIN:
            return {"seg": dice_ce_per_example(self.seg_logits, mask), "diffusion": self.seg_logits.new_zeros(n),
                    "grade": grade_ce, "align": self.align}
        x0 = F.one_hot(mask, k).permute(0, 3, 1, 2).contiguous().to(self.seg_logits.dtype) * 2.0 - 1.0
        seen: dict[str, torch.Tensor] = {}

        def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen["x_t"], seen["eps"] = x_t, self.denoise(x_t, t)
            return seen["eps"]

        diffusion = ddpm_loss(eps_fn, x0, self.t, self.noise, schedule=self.schedule, reduction="none")
        x0_hat = predict_x0(seen["x_t"], self.t, seen["eps"], self.schedule)
        seg = 0.5 * (dice_ce_per_example(self.seg_logits, mask)
                     + dice_ce_per_example(self.config.logit_scale * x0_hat, mask))
        return {"seg": seg, "diffusion": diffusion, "grade": grade_ce, "align": self.align}

    def per_example_loss(self, targets: Any) -> torch.Tensor:
        """``seg + diffusion_weight * diffusion + grade_weight * grade + align_weight * align``, ``[N]``."""
        terms, cfg = self.loss_terms(targets), self.config
        return (terms["seg"] + cfg.diffusion_weight * terms["diffusion"] + cfg.grade_weight * terms["grade"]
                + cfg.align_weight * terms["align"])

    def loss(self, targets: Any) -> torch.Tensor:
        """The batch mean of :meth:`per_example_loss`, a scalar."""
        return self.per_example_loss(targets).mean()


class ImoNet(nn.Module):
    """IMO (our reading): fundus and OCT encoders, CMFA fusion, a diffusion segmentation decoder, a grade head.

    ``state_dict`` prefixes: ``fundus_encoder.``, ``modality_oct.`` (:class:`OctBranch`: every tensor
    only an example with OCT trains; ``encoder``, ``cmfa``, ``align_fundus``, ``align_oct`` with
    ``fusion="cmfa"``, ``encoder``, ``grade_head`` with ``"late"``), ``denoiser.``, ``grade_head.``. No buffers (the schedule is
    recomputed). The ``modality_oct`` segment follows :mod:`fedsilo.core.phases`' naming rule for
    modality groups: a silo without OCT freezes and never uploads those tensors, and the federation
    averages them over the silos that have OCT.

    Attributes:
        config: The config it was built from.
        schedule: The DDPM schedule (float64, CPU; not part of the state).
    """

    def __init__(self, cfg: ImoNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.fundus_encoder = _Encoder(cfg.fundus_channels, cfg)
        self.modality_oct = OctBranch(cfg)
        self.denoiser = _Denoiser(cfg)
        self.grade_head = _grade_head(cfg)
        self.schedule = ddpm_schedule(cfg.diffusion_steps, cfg.beta_start, cfg.beta_end)
        self.timesteps = ddim_timesteps(cfg.diffusion_steps, cfg.inference_steps)

    def _read(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(fundus, oct with zeros where has_oct is false, has_oct)`` of a batch, validated; with
        ``inputs="fundus"`` has_oct is all false, with ``"oct"`` the fundus image is zeros."""
        cfg = self.config
        fundus, oct_img, has_oct = (getattr(inputs, a, None) for a in ("fundus", "oct", "has_oct"))
        if not isinstance(fundus, torch.Tensor) or fundus.dim() != 4 or fundus.shape[1] != cfg.fundus_channels:
            raise ValueError(f"inputs.fundus must be a tensor [N, {cfg.fundus_channels}, H, W], "
                             f"got {tuple(getattr(fundus, 'shape', ())) or type(fundus).__name__}")
        n = fundus.shape[0]
        if not isinstance(has_oct, torch.Tensor) or has_oct.dtype != torch.bool or tuple(has_oct.shape) != (n,):
            raise ValueError(f"inputs.has_oct must be a bool tensor [{n}], "
                             f"got {getattr(has_oct, 'dtype', type(has_oct).__name__)} {tuple(getattr(has_oct, 'shape', ()))}")
        if cfg.inputs is ImoInputs.FUNDUS:
            has_oct = torch.zeros_like(has_oct)
        elif cfg.inputs is ImoInputs.OCT:
            fundus = torch.zeros_like(fundus)
        if oct_img is None:
            if bool(has_oct.any()):
                raise ValueError("inputs.oct is None but has_oct is true for some examples")
            side = 2 ** (len(cfg.widths) - 1)
            oct_img = fundus.new_zeros((n, cfg.oct_channels, side, side))
        if not isinstance(oct_img, torch.Tensor) or oct_img.dim() != 4 or oct_img.shape[:2] != (n, cfg.oct_channels):
            raise ValueError(f"inputs.oct must be a tensor [{n}, {cfg.oct_channels}, h, w], "
                             f"got {tuple(getattr(oct_img, 'shape', ())) or type(oct_img).__name__}")
        oct_img = torch.where(has_oct[:, None, None, None], oct_img.to(fundus.dtype), 0.0).contiguous()
        return fundus.contiguous(), oct_img, has_oct

    def _fixed_noise(self, like: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The start and evaluation-loss noise maps ``[N, k, H, W]`` (one per map, shared by the batch)."""
        n, _, h, w = like.shape
        gen = torch.Generator().manual_seed(self.config.sample_seed)
        maps = torch.randn((2, 1, k, h, w), generator=gen)
        return tuple(m.to(like.device, like.dtype).expand(n, k, h, w).contiguous() for m in maps)  # type: ignore[return-value]

    def forward(self, inputs: Any) -> ImoOutput:
        """Runs the network on a batch with ``fundus`` ``[N, C_f, H, W]``, ``oct`` ``[N, C_o, h, w]``
        (or None when no example has one) and ``has_oct`` bool ``[N]``.

        Raises:
            ValueError: On inputs of the wrong shape or dtype.
        """
        cfg = self.config
        fundus, oct_img, has_oct = self._read(inputs)
        n, k = fundus.shape[0], cfg.n_seg_classes
        gate = has_oct.to(fundus.dtype)
        branch = self.modality_oct
        f_maps, o_maps = self.fundus_encoder(fundus), branch.encoder(oct_img)
        if cfg.fusion is ImoFusion.CMFA:
            fused = branch.cmfa(f_maps[-1], o_maps[-1], gate)
            align = alignment_loss(branch.align_fundus(f_maps[-1].mean(dim=(2, 3))),
                                   branch.align_oct(o_maps[-1].mean(dim=(2, 3))), has_oct)
            grade_logits = self.grade_head(_pool(fused))
        else:  # late: fundus-only skips, OCT enters through its own gated grade head
            fused, align = f_maps[-1], fundus.new_zeros(n)
            grade_logits = self.grade_head(_pool(fused)) + gate[:, None] * branch.grade_head(_pool(o_maps[-1]))
        skips = (*f_maps[:-1], fused)

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.denoiser(x_t, t, skips)

        if cfg.decoder is ImoDecoder.PLAIN:  # one deterministic call on a zero map at t = 0
            zeros = fundus.new_zeros((n, k, *fundus.shape[2:]))
            t0 = torch.zeros(n, dtype=torch.int64, device=fundus.device)
            return ImoOutput(seg_logits=denoise(zeros, t0), grade_logits=grade_logits, align=align, t=t0,
                             noise=zeros, denoise=denoise, schedule=self.schedule, config=cfg)
        start, eval_noise = self._fixed_noise(fundus, k)
        steps = cfg.diffusion_steps
        if self.training:
            t = torch.randint(0, steps, (n,), dtype=torch.int64).to(fundus.device)
            noise = torch.randn(start.shape, dtype=fundus.dtype).to(fundus.device)
            t_start = torch.full((n,), steps - 1, dtype=torch.int64, device=fundus.device)
            x0_hat = predict_x0(start, t_start, denoise(start, t_start), self.schedule)
        else:
            t = torch.full((n,), steps // 2, dtype=torch.int64, device=fundus.device)
            noise = eval_noise
            x0_hat = ddim_sample(denoise, start, self.timesteps, self.schedule)
        return ImoOutput(seg_logits=cfg.logit_scale * x0_hat, grade_logits=grade_logits, align=align, t=t,
                         noise=noise, denoise=denoise, schedule=self.schedule, config=cfg)


def build_imo_net(cfg: ImoNetConfig) -> ImoNet:
    """:class:`ImoNet` of ``cfg`` with initial weights from ``cfg.seed``, in training mode."""
    from fedsilo.core.rng import seeded_global_rng

    if not isinstance(cfg, ImoNetConfig):
        raise ValueError(f"cfg must be an ImoNetConfig, got {type(cfg).__name__}")
    with seeded_global_rng(cfg.seed):
        model = ImoNet(cfg)
    return model.train()
