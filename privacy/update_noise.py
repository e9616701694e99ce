"""Silo-level DP on a model update (McMahan et al. 2018): joint L2 clipping and Gaussian noise, numpy only."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["PrivatizedUpdate", "add_gaussian_noise", "clip_update", "privatize_update"]

_MAX_SHRINK_STEPS = 64

_Sampler = Callable[[int], np.ndarray]
"""Returns that many iid standard normal draws as a float64 vector."""


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_clip_norm(value: object) -> float:
    if not _is_real(value) or not math.isfinite(float(value)) or not float(value) > 0.0:  # type: ignore[arg-type]
        raise ValueError(f"invalid clip_norm {value!r}: must be a finite number > 0")
    return float(value)  # type: ignore[arg-type]


def _check_noise_multiplier(value: object) -> float:
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) < 0.0:  # type: ignore[arg-type]
        raise ValueError(f"invalid noise_multiplier {value!r}: must be a finite number >= 0")
    return float(value)  # type: ignore[arg-type]


def _check_shares(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"invalid shares {value!r}: must be an integer >= 1")
    return int(value)


def _check_update(update: object) -> dict[str, np.ndarray]:
    """Returns ``{name: array}`` views of the input (never modified); rejects non-floats and NaN/inf."""
    if not isinstance(update, Mapping):
        raise ValueError(f"invalid update: must be a mapping of names to arrays, got {type(update).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for name, value in update.items():
        if not isinstance(name, str):
            raise ValueError(f"invalid update key {name!r}: must be a string")
        arr = np.asarray(value)
        if arr.dtype.kind != "f":
            raise ValueError(f"invalid update[{name!r}]: must be a floating-point array, got dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            raise ValueError(f"invalid update[{name!r}]: contains NaN or inf values")
        arrays[name] = arr
    return arrays


def _scaled_norm(arrays: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """Returns (m, r) with the joint L2 norm = m * r, m the largest |value|, without overflow.

    Sums in float64 of values divided by m (so each square is <= 1): huge inputs cannot
    overflow and tiny ones cannot underflow to a zero norm.
    """
    m = 0.0
    for arr in arrays.values():
        if arr.size:
            m = max(m, float(np.max(np.abs(arr.astype(np.float64, copy=False)))))
    if m == 0.0:
        return 0.0, 0.0
    total = 0.0
    for arr in arrays.values():
        if arr.size:
            scaled = arr.astype(np.float64, copy=False) / m
            total += float(np.dot(scaled.ravel(), scaled.ravel()))
    return m, math.sqrt(total)


def _cast_toward_zero(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Casts float64 ``values`` to ``dtype`` without ever increasing a magnitude."""
    out = np.array(values, dtype=dtype)
    if out.dtype == np.float64:
        return out
    grew = np.abs(out.astype(np.float64)) > np.abs(values)
    if grew.any():
        out[grew] = np.nextafter(out[grew], np.zeros((), dtype=out.dtype))
    return out


def _within(arrays: Mapping[str, np.ndarray], clip: float) -> bool:
    """Whether the joint norm is <= ``clip``, compared as r <= clip / m (exact enough for subnormals)."""
    m, r = _scaled_norm(arrays)
    return m == 0.0 or r <= clip / m


def clip_update(update: Mapping[str, np.ndarray], *, clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scales an update so that its joint L2 norm over all tensors is at most ``clip_norm``.

    This is DP-FedAvg's flat clipping (McMahan et al. 2018, "Learning Differentially Private
    Recurrent Language Models", Algorithm 1): Δ · min(1, C / ‖Δ‖), with ‖Δ‖ taken jointly
    over every tensor. The norm is accumulated in float64 after dividing by the largest
    magnitude, so huge and tiny inputs are handled; scaled values are cast back to each
    tensor's dtype rounding toward zero, and if rounding still leaves the norm above C every
    value is stepped one ulp toward zero until it is not, so the result's norm never
    exceeds C beyond the rounding of the norm computation itself (about 1e-15 relative).
    An update already within C is returned as exact copies.

    Args:
        update: ``{name: floating-point array}``; never modified.
        clip_norm: C, a finite number > 0.

    Returns:
        ``(clipped, norm)``: new arrays with the input dtypes and shapes, and the input's
        joint L2 norm (``inf`` only if it exceeds the float64 range).

    Raises:
        ValueError: On a bad clip_norm, a non-floating array, or NaN/inf values (naming the key).
    """
    clip = _check_clip_norm(clip_norm)
    arrays = _check_update(update)
    m, r = _scaled_norm(arrays)
    norm = m * r
    if m == 0.0 or r <= clip / m:  # not norm <= clip: among subnormals m * r rounds down to C or below
        return {name: np.array(arr, copy=True) for name, arr in arrays.items()}, norm
    factor = clip / r  # applied to arr / m, so neither step overflows nor underflows needlessly
    clipped = {
        name: _cast_toward_zero(np.asarray(arr.astype(np.float64, copy=False) / m) * factor, arr.dtype)
        for name, arr in arrays.items()
    }
    # Rounding can still leave the norm a few ulps above C (or, among subnormals, far above in
    # relative terms): step every value one ulp toward zero until it is not.
    for _ in range(_MAX_SHRINK_STEPS):
        if _within(clipped, clip):
            return clipped, norm
        clipped = {name: np.nextafter(arr, np.zeros((), dtype=arr.dtype)) for name, arr in clipped.items()}
    return {name: np.zeros_like(arr) for name, arr in clipped.items()}, norm  # pragma: no cover


def _os_standard_normal(n: int) -> np.ndarray:
    """``n`` standard normal draws from the OS CSPRNG (``os.urandom``), by Box-Muller.

    Each uniform has 53 random bits and lies in (0, 1), so the radius is finite (at most
    about 8.6 standard deviations, a truncation of probability < 1e-17 per draw).
    """
    pairs = (n + 1) // 2
    if pairs == 0:
        return np.zeros(0, dtype=np.float64)
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u[0]))
    angle = (2.0 * math.pi) * u[1]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def _sampler(rng: object) -> _Sampler:
    if rng is None:
        return _os_standard_normal
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"invalid rng {rng!r}: must be a numpy.random.Generator or None")
    return lambda n: rng.standard_normal(n, dtype=np.float64)


def _add_noise(arrays: Mapping[str, np.ndarray], std: float, draw: _Sampler) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        if std == 0.0:
            out[name] = np.array(arr, copy=True)
            continue
        noisy64 = arr.astype(np.float64, copy=False) + std * draw(arr.size).reshape(arr.shape)
        noisy = np.array(noisy64, dtype=arr.dtype)
        if not np.isfinite(noisy).all():
            raise ValueError(f"invalid update[{name!r}]: noise of std {std!r} overflows dtype {arr.dtype}")
        out[name] = noisy
    return out


def add_gaussian_noise(
    update: Mapping[str, np.ndarray],
    *,
    clip_norm: float,
    noise_multiplier: float,
    shares: int = 1,
    rng: np.random.Generator | None,
) -> dict[str, np.ndarray]:
    """Adds iid N(0, (σC/√K)^2) to every element: the Gaussian mechanism, or one of K shares of it.

    For a clipped update (sensitivity C) and K = 1 this is DP-FedAvg's noise (McMahan et al.
    2018) with std σC. Under secure aggregation each of K silos adds a share of std σC/√K,
    so the K shares in the aggregate sum to std σC; the guarantee then holds only if all K
    shares are in the sum and no coalition subtracts its own shares (t colluding silos
    leave std σC·√((K - t)/K) against themselves).

    Noise is computed in float64 and cast back to each input's dtype.

    Args:
        update: ``{name: floating-point array}`` (normally clipped); never modified.
        clip_norm: C, a finite number > 0.
        noise_multiplier: σ, a finite number >= 0 (0 adds nothing: tests only).
        shares: K >= 1, the number of silos whose noise shares add up in the aggregate.
        rng: A numpy Generator (reproducible, for tests; numpy's PCG64 is not a CSPRNG), or
            None for draws from the OS CSPRNG (``os.urandom``, Box-Muller).

    Returns:
        New noised arrays with the input dtypes and shapes.

    Raises:
        ValueError: On a bad argument or input (naming it), or noise overflowing a dtype.
    """
    clip = _check_clip_norm(clip_norm)
    sigma = _check_noise_multiplier(noise_multiplier)
    k = _check_shares(shares)
    draw = _sampler(rng)
    arrays = _check_update(update)
    return _add_noise(arrays, sigma * clip / math.sqrt(k), draw)


@dataclass(frozen=True, kw_only=True)
class PrivatizedUpdate:
    """An update after clipping and noising.

    Attributes:
        arrays: The noised arrays, same names, dtypes and shapes as the input.
        original_norm: Joint L2 norm of the input before clipping.
        clipped: Whether clipping changed the update (``original_norm > clip_norm``).
        noise_std: Std of the noise added per element here, σC/√K (0 without noise).
    """

    arrays: dict[str, np.ndarray]
    original_norm: float
    clipped: bool
    noise_std: float


def privatize_update(
    update: Mapping[str, np.ndarray],
    *,
    clip_norm: float,
    noise_multiplier: float,
    shares: int = 1,
    rng: np.random.Generator | None = None,
) -> PrivatizedUpdate:
    """Clips an update to joint L2 norm C, then adds N(0, (σC/√K)^2) per element.

    The silo-level Gaussian mechanism of DP-FedAvg (McMahan et al. 2018): the whole update
    of one silo is the protected unit, with sensitivity C. See :func:`clip_update` and
    :func:`add_gaussian_noise`.

    Randomness: with ``rng=None`` (production) every draw comes from the OS CSPRNG
    (``os.urandom``, 53-bit uniforms, Box-Muller), not from a seeded numpy generator, whose
    PCG64 is not cryptographically secure. Floating-point attacks on Gaussian samplers
    (Mironov 2012 for Laplace; later work for Gaussians) are out of scope. A given numpy
    Generator makes the result reproducible (tests).

    Args:
        update: ``{name: floating-point array}``; never modified.
        clip_norm: C, a finite number > 0.
        noise_multiplier: σ, a finite number >= 0.
        shares: K >= 1 silos sharing the noise under secure aggregation.
        rng: None for OS randomness, or a numpy Generator.

    Returns:
        The noised arrays, the input norm, whether it was clipped, and the noise std.

    Raises:
        ValueError: On a bad argument or input, naming it.
    """
    clip = _check_clip_norm(clip_norm)
    sigma = _check_noise_multiplier(noise_multiplier)
    k = _check_shares(shares)
    draw = _sampler(rng)
    clipped, norm = clip_update(update, clip_norm=clip)
    std = sigma * clip / math.sqrt(k)
    return PrivatizedUpdate(
        arrays=_add_noise(clipped, std, draw),
        original_norm=norm,
        clipped=norm > clip,
        noise_std=std,
    )
