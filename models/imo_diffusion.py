"""DDPM noise schedule, forward process, ε-loss and a deterministic strided sampler (Ho, Jain, Abbeel 2020; DDIM)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from fedsilo.core.validators import check_float, check_int

__all__ = [
    "DdpmSchedule",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_loss",
    "ddpm_schedule",
    "predict_x0",
    "q_sample",
    "timestep_embedding",
]

#: ``eps_fn(x_t, t) -> predicted noise``, ``x_t`` ``[N, ...]``, ``t`` int64 ``[N]`` (0-based steps).
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DdpmSchedule(NamedTuple):
    """A DDPM variance schedule, float64 tensors ``[T]`` indexed by the 0-based step ``t``.

    Step ``t`` here is step ``t + 1`` of Ho et al.: ``alpha_bars[t] = prod_{s <= t} (1 - betas[s])``,
    so ``alpha_bars[T - 1]`` is their ᾱ_T.

    Attributes:
        betas: β_t.
        alphas: α_t = 1 - β_t.
        alpha_bars: ᾱ_t, the cumulative product of ``alphas``.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bars: torch.Tensor

    @property
    def steps(self) -> int:
        """T, the number of diffusion steps."""
        return int(self.betas.shape[0])


def ddpm_schedule(steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> DdpmSchedule:
    """The linear schedule of Ho, Jain, Abbeel 2020 ("Denoising Diffusion Probabilistic Models"):
    ``betas = linspace(beta_start, beta_end, steps)`` in float64.

    Note that with their β range and a short chain (T = 100) ᾱ_T ≈ 0.36: x_T still holds
    ≈ 0.6 x_0 (their T = 1000 gives ≈ 4e-5).

    Args:
        steps: T >= 1.
        beta_start: β of the first step, in (0, 1).
        beta_end: β of the last step, in [beta_start, 1).

    Raises:
        ValueError: On a bad count or β range (the message names the value).
    """
    check_int("ddpm_schedule", "steps", steps, minimum=1)
    check_float("ddpm_schedule", "beta_start", beta_start, low=0.0, high=1.0, low_inclusive=False,
                high_inclusive=False)
    check_float("ddpm_schedule", "beta_end", beta_end, low=float(beta_start), high=1.0, high_inclusive=False)
    betas = torch.linspace(float(beta_start), float(beta_end), steps, dtype=torch.float64)
    alphas = 1.0 - betas
    return DdpmSchedule(betas=betas, alphas=alphas, alpha_bars=torch.cumprod(alphas, dim=0))


def _per_example(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` as ``like``'s dtype and device, shaped ``[N, 1, ..., 1]`` to broadcast against ``like``."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != like.shape[:1]:
        raise ValueError(f"t must be an int64 tensor [N] with N = {like.shape[0]}, "
                         f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= values.shape[0]):
        raise ValueError(f"t must lie in [0, {values.shape[0]}), got values in [{int(t.min())}, {int(t.max())}]")
    picked = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return picked.reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: DdpmSchedule) -> torch.Tensor:
    """The forward process in closed form (Ho et al. eq. 4): ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise``.

    Args:
        x0: Clean data ``[N, ...]``.
        t: 0-based steps, int64 ``[N]``.
        noise: ε, the shape of ``x0``.
        schedule: The schedule (:func:`ddpm_schedule`).

    Raises:
        ValueError: On mismatched shapes or a step out of range.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must have the shape of x0 {tuple(x0.shape)}")
    ab = _per_example(schedule.alpha_bars, t, x0)
    return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise


def ddpm_loss(model_eps: EpsFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
              schedule: DdpmSchedule, reduction: str = "mean") -> torch.Tensor:
    """The simplified DDPM objective (Ho et al. eq. 14): ``|| noise - model_eps(q_sample(x0, t, noise), t) ||²``.

    Args:
        model_eps: The noise predictor ``(x_t, t) -> ε̂`` (the shape of ``x_t``).
        x0: Clean data ``[N, ...]``.
        t: 0-based steps, int64 ``[N]``.
        noise: ε, the shape of ``x0``.
        schedule: The schedule.
        reduction: ``"mean"`` (a scalar, the mean over examples of the per-example losses) or
            ``"none"`` (``[N]``: each example's squared error averaged over its elements).

    Raises:
        ValueError: On a bad reduction, mismatched shapes or a step out of range.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    eps = model_eps(q_sample(x0, t, noise, schedule), t)
    if eps.shape != noise.shape:
        raise ValueError(f"model_eps returned {tuple(eps.shape)}, expected {tuple(noise.shape)}")
    per_example = (eps - noise).square().flatten(1).mean(dim=1)
    return per_example.mean() if reduction == "mean" else per_example


def predict_x0(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: DdpmSchedule) -> torch.Tensor:
    """The x_0 estimate of a noise prediction: ``(x_t - sqrt(1 - ᾱ_t) eps) / sqrt(ᾱ_t)`` (Ho et al. eq. 15)."""
    ab = _per_example(schedule.alpha_bars, t, x_t)
    return (x_t - (1.0 - ab).sqrt() * eps) / ab.sqrt()


def ddim_timesteps(steps: int, sampling_steps: int) -> list[int]:
    """``sampling_steps`` distinct 0-based steps from ``steps - 1`` down to 0, evenly strided (rounded).

    Raises:
        ValueError: Unless ``1 <= sampling_steps <= steps``.
    """
    check_int("ddim_timesteps", "steps", steps, minimum=1)
    check_int("ddim_timesteps", "sampling_steps", sampling_steps, minimum=1)
    if sampling_steps > steps:
        raise ValueError(f"ddim_timesteps.sampling_steps={sampling_steps} must be <= steps={steps}")
    if sampling_steps == 1:
        return [steps - 1]
    stride = (steps - 1) / (sampling_steps - 1)
    return [round(steps - 1 - i * stride) for i in range(sampling_steps)]


def ddim_sample(eps_fn: EpsFn, x_start: torch.Tensor, timesteps: list[int], schedule: DdpmSchedule) -> torch.Tensor:
    """Deterministic strided sampling (DDIM with η = 0, Song, Meng, Ermon 2021); returns the last x_0 estimate.

    From ``x = x_start`` at ``timesteps[0]``, each step predicts ε̂, forms the x_0 estimate,
    clips it to [-1, 1] (Ho et al.'s clipping of the denoised data), re-derives ε̂ from the clipped
    estimate and moves to the next step: ``x = sqrt(ᾱ_next) x̂_0 + sqrt(1 - ᾱ_next) ε̂``. The
    *unclipped* estimate of the last step is returned (its magnitude carries the confidence).

    Args:
        eps_fn: The noise predictor ``(x_t, t) -> ε̂``.
        x_start: The starting noise ``[N, ...]``.
        timesteps: Decreasing 0-based steps (:func:`ddim_timesteps`).
        schedule: The schedule.

    Raises:
        ValueError: On empty or non-decreasing timesteps.
    """
    if not timesteps or any(b >= a for a, b in zip(timesteps, timesteps[1:], strict=False)):
        raise ValueError(f"timesteps must be a non-empty, strictly decreasing list, got {timesteps}")
    x = x_start
    n = x.shape[0]
    x0 = x
    for i, step in enumerate(timesteps):
        t = torch.full((n,), step, dtype=torch.int64, device=x.device)
        eps = eps_fn(x, t)
        x0 = predict_x0(x, t, eps, schedule)
        if i + 1 == len(timesteps):
            break
        clipped = x0.clamp(-1.0, 1.0)
        ab = _per_example(schedule.alpha_bars, t, x)
        eps = (x - ab.sqrt() * clipped) / (1.0 - ab).sqrt()
        t_next = torch.full((n,), timesteps[i + 1], dtype=torch.int64, device=x.device)
        ab_next = _per_example(schedule.alpha_bars, t_next, x)
        x = ab_next.sqrt() * clipped + (1.0 - ab_next).sqrt() * eps
    return x0


def timestep_embedding(t: torch.Tensor, dim: int, *, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` of steps ``t`` ``[N]`` (the Transformer's, as in Ho et al.'s UNet).

    The first half of the columns are ``cos(t * f_k)``, the second ``sin(t * f_k)``, with
    frequencies ``f_k = max_period ** (-k / half)``; an odd ``dim`` gets a zero last column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half, 1))
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb
