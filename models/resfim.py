"""pFL-ResFIM: parameter-level personalisation from the residual of two diagonal Fisher matrices.

A silo compares how strongly each parameter "matters" on its own images and on the same
images re-styled as another silo's scanner would see them (simulated images, made elsewhere,
e.g. by spectral transfer of low-frequency Fourier amplitudes; this module only receives
them as a tensor). Parameters whose importance changes most with the style are
domain-sensitive and stay local; the rest are domain-invariant and are aggregated.

The ResFIM paper's exact formulas are not public. **Every formula below is our own choice**
and is stated as such:

1. *Fisher.* The diagonal **empirical** Fisher of a trainable tensor is the mean over
   examples of the squared **per-example** gradient of the training loss (MONAI's
   ``DiceCELoss(softmax=True, to_onehot_y=True)``, as in
   :func:`fedsilo.models.training.train_local`): ``F = (1/n) Σ_i g_i ⊙ g_i``. It is not the
   square of the batch gradient. Per-example gradients come from Opacus' ``GradSampleModule``
   through :class:`fedsilo.privacy.dpsgd.DpSgdStep` (its hooks, its exact PReLU and
   transposed-convolution rules, its clean-up), so the model must be Opacus-compatible
   (see :func:`~fedsilo.privacy.dpsgd.make_private_compatible`; the default UNet is).
2. *Simulated data* keep the local labels: ``F_sim`` uses the simulated images with the
   local masks, example by example.
3. *Residual.* ``R = |F_sim − F_loc|`` per element, normalised per tensor by the tensor's
   mean Fisher ``mean((F_loc + F_sim) / 2)`` (:attr:`ScoreNorm.MEAN_FISHER`, the default).
   Why: the ranking inside a tensor, and so the mask, is the same for any positive
   per-tensor scale; the scale only matters when tensors are compared (reports, the choice
   of which layers to inspect). Dividing by the tensor's own Fisher level makes R a
   *relative* change, free of the very different gradient magnitudes of shallow and deep
   layers and of the loss scale, and its tensor mean ``Σ|ΔF| / Σ(F_loc + F_sim)/2`` lies in
   [0, 2] and says how much that tensor's importance moved as a whole. Dividing by the
   per-tensor maximum (:attr:`ScoreNorm.MAX`, offered) pins every tensor's top entry at 1,
   so a tensor with one outlier and a tensor that shifted everywhere look alike. A tensor
   whose Fisher is zero, or round-off (mean at most 1e-10 of the largest tensor's mean,
   e.g. a convolution bias right before InstanceNorm), scores 0.
4. *Mask.* In every trainable tensor the ``k = ceil(ρ · numel)`` entries with the largest R
   are domain-sensitive (True = stays local). ρ is read at its shortest decimal form
   (``Fraction(repr(ρ))``) so that e.g. ρ = 0.1 of 30 entries is 3, not 4 by rounding.
   Ties go to the lower flat index (a stable sort), so the mask is deterministic. A tensor
   whose scores are all 0 (no Fisher signal: e.g. a bias right before InstanceNorm, or LoRA's
   A while B is still 0) carries no evidence of domain sensitivity and is shared whole.
   Normalisation-layer parameters (:func:`~fedsilo.models.registry.local_parameter_names`)
   are local as a whole when ``local_norm_layers`` (the FedBN choice; default). Masks cover
   the model's floating-point *parameters* only. Buffers (e.g. running statistics) get no
   mask: they have no gradient, hence no Fisher, and the federation keeps normalisation
   buffers local anyway. A frozen parameter (``requires_grad=False``, e.g. a LoRA base) has
   no Fisher and never changes, so it is marked shared (all False) unless it is a
   normalisation parameter kept local.
5. *Schedule.* Masks are recomputed every ``recompute_every`` rounds (rounds 0, k, 2k, …;
   :func:`needs_recompute`) and reused in between.
6. *Cap.* :func:`compute_resfim` uses the first ``max_examples`` local examples (and their
   simulated twins), in the order given; a deterministic subset, accounted as full-batch
   (q = 1), which is an upper bound on the loss of privacy.

Differential privacy (:class:`FisherDp`). The mask depends on local data. Without DP it is
protected only by the encryption of the updates (which entries a silo shares is visible to
whoever sees its plaintext layout); with DP the Fisher matrices are noised and the mask is
post-processing of DP releases. The DP Fisher is, per computation:

* clip every example's gradient, jointly over all trainable tensors, to L2 norm ≤ C
  (factor ``min(1, C / ‖g_i‖₂)``);
* sum the element-wise squares of the clipped gradients: ``S = Σ_i ḡ_i ⊙ ḡ_i``;
* add N(0, (σ · C²)²) independently to every coordinate of S;
* divide by n and clamp at 0 (post-processing).

Sensitivity (add/remove one record): S changes by ``v = ḡ ⊙ ḡ`` for that record's clipped
gradient ḡ, and ``‖v‖₂² = Σ_j ḡ_j⁴ ≤ (Σ_j ḡ_j²)² = ‖ḡ‖₂⁴`` (all terms are non-negative), so
``‖v‖₂ ≤ ‖ḡ‖₂² ≤ C²``. The L2 sensitivity is C², and noise of std σ · C² is the Gaussian
mechanism with noise multiplier σ: one record-level ``Release(GAUSSIAN, RECORD, σ, q = 1,
steps = 1)`` (:meth:`FisherDp.release`). The divisor n is treated as public, as the expected
batch size of DP-SGD is (:func:`fedsilo.models.dp_training.train_local_dp` derives it from the
dataset size).

A recompute runs two such computations on the same silo's records (F_loc on the local
images, F_sim on their simulated twins, each record contributing one clipped example to
each). We ledger them as **two** releases of σ each. Under Rényi-DP this is exactly the
same as one release of the concatenated vector (sensitivity C²·√2) with noise σC², i.e.
multiplier σ/√2; two entries keep each computation visible in the ledger and need no
second noise scale. The style bank that produced the simulated images belongs to other
silos and is accounted where it is released, not here.
"""

from __future__ import annotations

import enum
import math
import numbers
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedsilo.core.validators import check_enum, check_float, check_int
from fedsilo.models.registry import local_parameter_names

if TYPE_CHECKING:
    from fedsilo.privacy.accounting import Release

__all__ = [
    "FisherDp",
    "ResFimConfig",
    "ResFimResult",
    "ScoreNorm",
    "compute_resfim",
    "empirical_fisher",
    "needs_recompute",
    "resfim_scores",
    "sensitive_count",
    "sensitive_mask",
    "shared_fraction",
]


class ScoreNorm(enum.Enum):
    """Per-tensor normalisation of ``R = |F_sim − F_loc|`` (see the module docstring, choice 3)."""

    MEAN_FISHER = "mean_fisher"
    """Divide by the tensor's mean of ``(F_loc + F_sim) / 2``: a relative change (default)."""
    MAX = "max"
    """Divide by the tensor's largest R: every tensor's top entry is 1."""


@dataclass(frozen=True, kw_only=True)
class ResFimConfig:
    """Settings of ResFIM masking.

    Attributes:
        rho: ρ in (0, 1), the fraction of each trainable tensor (rounded up) that is
            domain-sensitive and stays local.
        local_norm_layers: Whether normalisation-layer parameters stay local as a whole.
        recompute_every: Rounds between two mask computations (>= 1).
        batch_size: Examples per forward/backward pass when computing a Fisher (>= 1);
            memory grows with it (one gradient copy per example), the result does not change.
        max_examples: Cap on the examples used per Fisher (>= 1): the first ones are used.
        norm: Per-tensor normalisation of the residual.
    """

    rho: float = 0.1
    local_norm_layers: bool = True
    recompute_every: int = 5
    batch_size: int = 8
    max_examples: int = 64
    norm: ScoreNorm = ScoreNorm.MEAN_FISHER

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_float(owner, "rho", self.rho, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        if not isinstance(self.local_norm_layers, bool):
            raise ValueError(f"{owner}.local_norm_layers must be a bool, got {self.local_norm_layers!r}")
        check_int(owner, "recompute_every", self.recompute_every, minimum=1)
        check_int(owner, "batch_size", self.batch_size, minimum=1)
        check_int(owner, "max_examples", self.max_examples, minimum=1)
        check_enum(owner, "norm", self.norm, ScoreNorm)


@dataclass(frozen=True, kw_only=True)
class FisherDp:
    """Record-level DP for one Fisher computation (see the module docstring).

    Attributes:
        clip_norm: C > 0 (finite): each example's gradient is clipped to this joint L2 norm.
        noise_multiplier: σ >= 0: the noise std on the sum of squares is σ · C². 0 is
            accepted for tests (no privacy; :meth:`release` then refuses).
    """

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        owner = type(self).__name__
        c = self.clip_norm
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(float(c)) or not float(c) > 0:
            raise ValueError(f"{owner}.clip_norm must be a finite number > 0, got {c!r}")
        s = self.noise_multiplier
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(float(s)) or float(s) < 0:
            raise ValueError(f"{owner}.noise_multiplier must be a finite number >= 0, got {s!r}")

    def release(self) -> Release:
        """The ledger entry of one Fisher computation: Gaussian, record-level, σ, q = 1, 1 step.

        Raises:
            ValueError: If σ = 0 (no guarantee to ledger).
        """
        from fedsilo.privacy.accounting import Mechanism, Neighbouring, Release

        if self.noise_multiplier == 0:
            raise ValueError("FisherDp.noise_multiplier is 0: the Fisher is not private, nothing to ledger")
        return Release(
            mechanism=Mechanism.GAUSSIAN,
            neighbouring=Neighbouring.RECORD,
            noise_multiplier=float(self.noise_multiplier),
            sample_rate=1.0,
            steps=1,
        )


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _check_data(images: torch.Tensor, masks: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or not isinstance(masks, torch.Tensor):
        raise ValueError("images and masks must be tensors")
    if images.dim() < 3 or masks.dim() != images.dim():
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} must be [N, C, *spatial]")
    if images.shape[0] != masks.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and masks ({masks.shape[0]}) differ in batch size")
    if images.shape[0] == 0:
        raise ValueError("cannot compute a Fisher from zero examples")
    if images.shape[2:] != masks.shape[2:]:
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} differ in spatial size")


def empirical_fisher(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    batch_size: int,
    dp: FisherDp | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``(1/n) Σ_i g_i ⊙ g_i`` of every trainable parameter.

    ``g_i`` is example i's own gradient of the DiceCE loss (per-example gradients from Opacus,
    exact). With ``dp``, each ``g_i`` is first clipped jointly to L2 norm C, the sum of squares
    gets N(0, (σC²)²) per coordinate, and the result is divided by n and clamped at 0; ledger
    ``dp.release()`` once per call. Squares are summed in float64 and returned in each
    parameter's dtype. The weights, ``.grad`` and training mode of ``model`` are left as they
    were (the passes run in training mode, as Opacus requires; dropout, if any, draws from
    the global RNG).

    Args:
        model: Opacus-compatible network producing ``[N, K, *spatial]`` logits.
        images: ``[n, C, *spatial]`` float images, n >= 1.
        masks: ``[n, 1, *spatial]`` integer labels.
        batch_size: Examples per pass (>= 1).
        dp: Clipping and noise, or None for the exact Fisher.
        generator: Noise source when ``dp.noise_multiplier > 0``; None for a fresh one seeded
            from the OS CSPRNG. Unused otherwise.

    Returns:
        ``{name: F}`` for every trainable parameter, names as in ``model.named_parameters()``.

    Raises:
        ValueError: On bad arguments, no trainable parameter, or an Opacus-incompatible model.
    """
    from fedsilo.privacy.dpsgd import HOOK_WARNING, DpSgdStep, secure_generator

    check_int("empirical_fisher", "batch_size", batch_size, minimum=1)
    if dp is not None and not isinstance(dp, FisherDp):
        raise ValueError(f"dp must be a FisherDp or None, got {type(dp).__name__}")
    _check_data(images, masks)
    params = _trainable(model)
    if not params:
        raise ValueError("model has no trainable parameters")
    device = params[0][1].device
    n = images.shape[0]
    clip = float(dp.clip_norm) if dp is not None else None
    sums = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for _, p in params]
    saved = [p.grad for _, p in params]
    scratch = torch.optim.SGD([p for _, p in params], lr=0.0)  # never stepped
    try:
        with (
            DpSgdStep(model, scratch, max_grad_norm=math.inf, noise_multiplier=0.0, expected_batch_size=1) as step,
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", message=HOOK_WARNING, category=UserWarning)
            for start in range(0, n, batch_size):
                x = images[start : start + batch_size].to(device=device, dtype=torch.float32)
                y = masks[start : start + batch_size].to(device=device, dtype=torch.int64)
                step._per_sample_gradients(x, y)  # sets p.grad_sample: [b, *p.shape], each example's own gradient
                grads = [p.grad_sample.detach().to(torch.float64) for _, p in params]
                if clip is not None:
                    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads))  # type: ignore[arg-type]
                    factor = (clip / torch.clamp(norms, min=clip)).clamp(max=1.0)  # min(1, C/‖g‖), 1 at ‖g‖ = 0
                    grads = [g * factor.view(-1, *([1] * (g.dim() - 1))) for g in grads]
                for s, g in zip(sums, grads, strict=True):
                    s += g.pow(2).sum(0)
    finally:
        for (_, p), g in zip(params, saved, strict=True):
            p.grad = g
    if dp is not None and dp.noise_multiplier > 0:
        from opacus.optimizers.optimizer import _generate_noise

        gen = generator if generator is not None else secure_generator(device)
        std = float(dp.noise_multiplier) * float(dp.clip_norm) ** 2
        flat = torch.cat([s.reshape(-1) for s in sums])
        noise = _generate_noise(std=std, reference=flat, generator=gen, secure_mode=True)
        for s, chunk in zip(sums, noise.split([s.numel() for s in sums]), strict=True):
            s += chunk.view_as(s)
    out: dict[str, torch.Tensor] = {}
    for (name, p), s in zip(params, sums, strict=True):
        f = s / n
        if dp is not None:
            f = f.clamp(min=0.0)
        out[name] = f.to(p.dtype)
    return out


#: A tensor whose mean Fisher is at most this fraction of the largest tensor's mean Fisher
#: scores 0: its Fisher is float round-off (e.g. the bias of a convolution followed by
#: InstanceNorm has zero gradient in exact arithmetic, about 1e-17 of the top level in
#: float32), and normalising it would blow the round-off up to O(1) scores.
_NEGLIGIBLE_FISHER = 1e-10


def resfim_scores(
    f_loc: dict[str, torch.Tensor],
    f_sim: dict[str, torch.Tensor],
    *,
    norm: ScoreNorm = ScoreNorm.MEAN_FISHER,
) -> dict[str, torch.Tensor]:
    """Per-tensor normalised residual ``R = |F_sim − F_loc| / scale`` (module docstring, choice 3).

    Args:
        f_loc: Fisher on local data, ``{name: tensor}``.
        f_sim: Fisher on simulated data, same names and shapes.
        norm: ``MEAN_FISHER``: scale = mean((F_loc + F_sim) / 2); ``MAX``: scale = max R.
            A zero scale, or a tensor whose mean Fisher is at most 1e-10 of the largest
            tensor's (round-off, see ``_NEGLIGIBLE_FISHER``), gives R = 0.

    Returns:
        ``{name: R}`` (float, non-negative), in ``f_loc``'s order.

    Raises:
        ValueError: On different names or shapes, or non-finite values.
    """
    check_enum("resfim_scores", "norm", norm, ScoreNorm)
    if set(f_loc) != set(f_sim):
        raise ValueError(f"f_loc and f_sim name different tensors: {sorted(set(f_loc) ^ set(f_sim))}")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, a in f_loc.items():
        b = f_sim[name]
        if a.shape != b.shape:
            raise ValueError(f"{name!r}: f_loc {tuple(a.shape)} and f_sim {tuple(b.shape)} differ in shape")
        a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
        if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
            raise ValueError(f"{name!r}: Fisher values must be finite")
        pairs[name] = (a64, b64)
    levels = {name: float(((a + b) / 2).mean()) if a.numel() else 0.0 for name, (a, b) in pairs.items()}
    floor = _NEGLIGIBLE_FISHER * max(levels.values(), default=0.0)
    out: dict[str, torch.Tensor] = {}
    for name, (a64, b64) in pairs.items():
        r = (b64 - a64).abs()
        if levels[name] <= floor:
            scale = 0.0  # numerically zero Fisher (round-off only): no signal to rank
        elif norm is ScoreNorm.MEAN_FISHER:
            scale = levels[name]
        else:
            scale = float(r.max())
        dtype = f_loc[name].dtype if f_loc[name].is_floating_point() else torch.float32
        out[name] = (r / scale if scale > 0 else torch.zeros_like(r)).to(dtype)
    return out


def sensitive_count(numel: int, rho: float) -> int:
    """``ceil(ρ · numel)`` with ρ read at its shortest decimal form (0.1 · 30 = 3, not 4)."""
    check_int("sensitive_count", "numel", numel, minimum=0)
    return math.ceil(Fraction(repr(float(rho))) * numel)


def sensitive_mask(
    scores: dict[str, torch.Tensor],
    model: nn.Module,
    cfg: ResFimConfig,
) -> dict[str, torch.Tensor]:
    """Bool masks, True = domain-sensitive (stays local), for every floating parameter of ``model``.

    Trainable tensor: its ``ceil(ρ · numel)`` top entries by R (ties to the lower flat index);
    a tensor whose scores are all 0 (its Fisher is zero, e.g. LoRA's A while B is still 0, so
    there is no evidence either way) is shared whole rather than cut at arbitrary indices.
    Normalisation-layer parameter with ``cfg.local_norm_layers``: all True. Frozen parameter
    otherwise: all False (it has no score and never changes). Buffers get no mask.

    Args:
        scores: ``{name: R}`` for every trainable parameter (e.g. from :func:`resfim_scores`).
        model: The network, whose ``state_dict`` names the masks use.
        cfg: ρ and the normalisation-layer choice.

    Returns:
        ``{state_dict name: bool tensor of the parameter's shape}``, in ``state_dict`` order.

    Raises:
        ValueError: On a bad config, or a trainable parameter without (a well-shaped, finite) score.
    """
    if not isinstance(cfg, ResFimConfig):
        raise ValueError(f"cfg must be a ResFimConfig, got {type(cfg).__name__}")
    params = dict(model.named_parameters())
    norm_names = local_parameter_names(model) if cfg.local_norm_layers else frozenset()
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        p = params.get(name)
        if p is None or not value.is_floating_point():
            continue  # buffers and non-float entries: no mask
        mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        if name in norm_names:
            mask.fill_(True)
        elif p.requires_grad:
            r = scores.get(name)
            if r is None:
                raise ValueError(f"no ResFIM score for trainable parameter {name!r}")
            if r.shape != p.shape:
                raise ValueError(f"score of {name!r} has shape {tuple(r.shape)}, parameter {tuple(p.shape)}")
            flat = r.detach().reshape(-1).to(torch.float64)
            if not torch.isfinite(flat).all():
                raise ValueError(f"score of {name!r} has non-finite values")
            if not bool((flat > 0).any()):
                out[name] = mask  # no evidence of domain sensitivity (e.g. LoRA A while B = 0): shared
                continue
            k = sensitive_count(flat.numel(), cfg.rho)
            order = torch.sort(flat.cpu(), descending=True, stable=True).indices
            mask.view(-1)[order[:k].to(mask.device)] = True
        out[name] = mask
    return out


def shared_fraction(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of masked elements that are shared (False), over all tensors; NaN for no elements."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        return math.nan
    local = sum(int(m.sum()) for m in masks.values())
    return (total - local) / total


def needs_recompute(round_index: int, cfg: ResFimConfig) -> bool:
    """Whether the masks are (re)computed in ``round_index``: rounds 0, k, 2k, … (k = ``recompute_every``)."""
    check_int("needs_recompute", "round_index", round_index, minimum=0)
    return round_index % cfg.recompute_every == 0


@dataclass(frozen=True, kw_only=True)
class ResFimResult:
    """Everything one ResFIM computation produced.

    Attributes:
        f_loc: Fisher on the local examples.
        f_sim: Fisher on their simulated twins (local labels).
        scores: Normalised residual R per trainable tensor.
        masks: True = domain-sensitive, stays local (see :func:`sensitive_mask`).
        shared_fraction: Fraction of masked elements that are shared.
        n_examples: Examples used per Fisher (after ``max_examples``).
        releases: Ledger entries (two with DP of σ > 0: F_loc and F_sim; else none, and
            the mask is protected only by encryption).
    """

    f_loc: dict[str, torch.Tensor]
    f_sim: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    shared_fraction: float
    n_examples: int
    releases: tuple[Release, ...]


def compute_resfim(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    simulated_images: torch.Tensor,
    cfg: ResFimConfig,
    *,
    dp: FisherDp | None = None,
    generator: torch.Generator | None = None,
) -> ResFimResult:
    """F_loc, F_sim, scores and masks for one silo, from its images and their simulated twins.

    Args:
        model: Opacus-compatible network.
        images: ``[n, C, *spatial]`` local images.
        masks: ``[n, 1, *spatial]`` local labels (used for both Fisher matrices).
        simulated_images: ``[n, C, *spatial]``: ``simulated_images[i]`` is ``images[i]`` re-styled.
        cfg: ResFIM settings (the first ``cfg.max_examples`` pairs are used).
        dp: DP of the Fisher computations, or None.
        generator: Noise source for both computations (see :func:`empirical_fisher`).

    Returns:
        The result; ledger its ``releases``.
    """
    if not isinstance(cfg, ResFimConfig):
        raise ValueError(f"cfg must be a ResFimConfig, got {type(cfg).__name__}")
    if not isinstance(simulated_images, torch.Tensor) or simulated_images.shape != images.shape:
        raise ValueError("simulated_images must be a tensor of the same shape as images")
    releases: tuple[Release, ...] = ()
    if dp is not None and dp.noise_multiplier > 0:
        releases = (dp.release(), dp.release())
    if dp is not None and generator is None and dp.noise_multiplier > 0:
        from fedsilo.privacy.dpsgd import secure_generator

        generator = secure_generator(next(iter(model.parameters())).device)
    m = cfg.max_examples
    x, y, xs = images[:m], masks[:m], simulated_images[:m]
    f_loc = empirical_fisher(model, x, y, batch_size=cfg.batch_size, dp=dp, generator=generator)
    f_sim = empirical_fisher(model, xs, y, batch_size=cfg.batch_size, dp=dp, generator=generator)
    scores = resfim_scores(f_loc, f_sim, norm=cfg.norm)
    mask = sensitive_mask(scores, model, cfg)
    return ResFimResult(
        f_loc=f_loc,
        f_sim=f_sim,
        scores=scores,
        masks=mask,
        shared_fraction=shared_fraction(mask),
        n_examples=int(x.shape[0]),
        releases=releases,
    )
