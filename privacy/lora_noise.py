"""Silo-level DP for federated LoRA (DEeR): product-space clipping and the noise regulator, numpy only.

Each adapted layer has LoRA factors ``A`` (r × d_in) and ``B`` (d_out × r) and adds
ΔW = s·B·A to its frozen weight, with s = alpha / r (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models"). A convolution's factors are flattened to matrices
first (:func:`to_matrix`): ``A`` (r, c_in, k, …) becomes r × (c_in·k·…) and ``B``
(c_out, r, 1, …) becomes c_out × r.

Noise amplification. Adding DP noise to both factors of a LoRA update, as DP-FedAvg on the
raw parameters does, perturbs ΔW by s·(N_B·A + B·N_A + N_B·N_A): the noise is multiplied by
the other factor, so its effect on the model grows with that factor's scale, and the last
term is quadratic in the noise (Sun, Li, Li and Ding, "Improving LoRA in Privacy-preserving
Federated Learning", ICLR 2024, §3, who then freeze A for the whole run: FFA-LoRA).

DEeR (Zhu, Mao, Liu and Yuan, "DEeR: Deviation Eliminating and Noise Regulating for
Privacy-preserving Federated Low-rank Adaptation", arXiv:2410.12926, 2024) alternates
phases. In the B phase A is frozen, public and identical on every silo, and silos train and
share only B; in the A phase B is frozen and they share only A. Averaging one factor with the
other fixed is exact, mean_i(s·B_i·A) = s·mean_i(B_i)·A, so there is no aggregation deviation
(:func:`aggregation_deviation` measures the deviation that averaging both factors at once
causes). Its noise regulator draws the noise in the product space and maps it to the shared
factor, so that the noise's effect on ΔW does not depend on the frozen factor's scale.

What this module does (our own sound variant). The published DEeR code clips each tensor
separately and accounts the result as DP-SGD; we do not. Here a silo's upload is one Gaussian
mechanism in the product space, released through a fixed map:

1. Product-space clipping, jointly over all adapted layers ℓ. B phase:
   ‖(s_ℓ·ΔB_ℓ·A_ℓ)_ℓ‖_F ≤ C; A phase: ‖(s_ℓ·B_ℓ·ΔA_ℓ)_ℓ‖_F ≤ C. The product is linear in the
   trained delta, so this scales every delta by min(1, C / norm).
2. The Gaussian mechanism: Y_ℓ = P_ℓ + Z_ℓ with P_ℓ the clipped product and Z_ℓ iid
   N(0, (σC/√K)²) of shape d_out × d_in. Adding or removing one silo changes (P_ℓ)_ℓ by at most
   C in joint L2 norm, so this is the Gaussian mechanism of sensitivity C and noise multiplier
   σ (Dwork and Roth 2014, "The Algorithmic Foundations of Differential Privacy", Thm. A.1;
   for accounting, Mironov 2017, "Rényi Differential Privacy", Prop. 7).
3. Release of the trained factor, a fixed map of Y (ridge λ ≥ 0, below):

   - B phase: ΔB̃ = Y·Aᵀ(AAᵀ + λI)⁻¹ / s;
   - A phase: ΔÃ = (BᵀB + λI)⁻¹Bᵀ·Y / s.

   With λ = 0, Z = 0 and A of full row rank (B of full column rank) this returns the clipped
   delta exactly: ΔB·A·Aᵀ(AAᵀ)⁻¹ = ΔB.

The map in step 3 depends only on the frozen factor, which is public (the same on every silo,
itself derived from earlier DP releases or from a data-independent initialisation), so each
upload is post-processing of ONE Gaussian mechanism with sensitivity C and noise multiplier
σ: one ``Mechanism.GAUSSIAN`` release under ``Neighbouring.SILO`` in the ledger, in each
phase. This holds only if the frozen factor really is the public one: a silo-local or
personalised frozen factor would make the map data-dependent and void the argument.

Effect of the noise on ΔW. B phase: s·Ñ_B·A = Z·P_A with P_A = Aᵀ(AAᵀ + λI)⁻¹A, which is
(up to the ridge) the orthogonal projector onto A's row space; so the ΔW noise has covariance
(σC/√K)²·(I_{d_out} ⊗ P_A) and E‖s·Ñ_B·A‖²_F = (σC/√K)²·d_out·rank(A) (for λ = 0). Scaling A
by c leaves P_A unchanged (the ridge is relative, below) and divides the factor-space noise Ñ_B
by c: the noise on the model no longer depends on the frozen factor's scale. A phase,
symmetrically: s·B·Ñ_A = P_B·Z with P_B = B(BᵀB + λI)⁻¹Bᵀ.

Components of the delta that do not change ΔW (ΔB along the null space of Aᵀ, ΔA along the
null space of B, e.g. everything while B is still zero) are invisible in the product space
and are not released: the released factor is a function of Y only.

Ridge. λ = ridge · trace(AAᵀ) / r (B phase; trace(BᵀB) / r in the A phase), relative to the
frozen factor's scale so that P_A stays scale-invariant; the default ridge 1e-6 keeps the
inverse well-conditioned. It shrinks each component of the released factor along the frozen
factor's singular directions by σ_i² / (σ_i² + λ) ∈ (0, 1]: a small bias toward 0 (relative
size about λ / σ_min²). Soundness does not depend on it: any λ ≥ 0 gives a fixed map of Y.
Singular values below the usual numerical-rank tolerance (max(shape)·eps·σ_max) are treated
as zero, so with λ = 0 the map is the pseudo-inverse.

Numerics: products are computed in float64 from power-of-two-normalised factors, so huge and
tiny values neither overflow nor underflow needlessly; the clip bound then holds up to the
rounding of the float64 product itself (relative to s·‖|ΔB|·|A|‖_F, which matters only under
catastrophic cancellation). Outputs are cast to each delta's dtype.

The factor types and reshaping live in :mod:`fedsilo.privacy.lora_factors`, the deviation in
:mod:`fedsilo.privacy.lora_deviation`; both are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedsilo.privacy.lora_deviation import aggregation_deviation
from fedsilo.privacy.lora_factors import (
    LoraFactors,
    LoraPhase,
    _check_delta,
    _check_layers,
    _check_phase,
    _check_ridge,
    from_matrix,
    to_matrix,
)
from fedsilo.privacy.update_noise import (
    _cast_toward_zero,
    _check_clip_norm,
    _check_noise_multiplier,
    _check_shares,
    _sampler,
    _scaled_norm,
    _within,
)

__all__ = [
    "LoraFactors",
    "LoraPhase",
    "RegulatedUpdate",
    "aggregation_deviation",
    "clip_lora_update",
    "from_matrix",
    "product_update",
    "regulate",
    "to_matrix",
]

_MAX_SHRINK_STEPS = 64


@dataclass(frozen=True, kw_only=True)
class RegulatedUpdate:
    """A LoRA upload after product-space clipping, noise and the map back to the factor.

    Attributes:
        deltas: The released factor deltas, same names, shapes and dtypes as the input deltas.
        original_norm: Joint Frobenius norm of the product-space update before clipping
            (``inf`` only if it exceeds the float64 range).
        clipped: Whether clipping changed the update (``original_norm > clip_norm``).
        noise_std: Std of the product-space noise per element, σC/√K (0 without noise).
    """

    deltas: dict[str, np.ndarray]
    original_norm: float
    clipped: bool
    noise_std: float


# ------------------------------------------------------------------ scaled float64 products


def _pow2_split(x: np.ndarray) -> tuple[np.ndarray, int]:
    """``(x / 2**e, e)`` in float64 with max |x / 2**e| in [0.5, 1); ``(x, 0)`` if x is all zero."""
    x = x.astype(np.float64, copy=False)
    m = float(np.max(np.abs(x))) if x.size else 0.0
    if m == 0.0:
        return x, 0
    e = math.frexp(m)[1]
    return np.ldexp(x, -e), e


@dataclass(frozen=True)
class _Product:
    """One layer's product update as ``unit * 2**exponent``; its norm is ``mantissa * 2**norm_exponent``."""

    unit: np.ndarray
    exponent: int
    mantissa: float
    norm_exponent: int


def _layer_product(delta: np.ndarray, factors: LoraFactors, phase: LoraPhase) -> _Product:
    d_hat, e_d = _pow2_split(delta)
    frozen = factors.a if phase is LoraPhase.B else factors.b
    f_hat, e_f = _pow2_split(frozen)
    m_s, e_s = math.frexp(factors.scaling)
    unit = (d_hat @ f_hat) if phase is LoraPhase.B else (f_hat @ d_hat)
    unit *= m_s
    m, r = _scaled_norm({"": unit})
    norm = m * r
    if norm == 0.0:
        return _Product(unit, 0, 0.0, 0)
    mantissa, e_n = math.frexp(norm)
    exponent = e_d + e_f + e_s
    return _Product(unit, exponent, mantissa, exponent + e_n)


def _joint(products: Iterable[_Product]) -> tuple[float, int]:
    """``(rho, t)`` with the joint Frobenius norm = rho * 2**t (rho = 0 for a zero update)."""
    nonzero = [p for p in products if p.mantissa > 0.0]
    if not nonzero:
        return 0.0, 0
    t = max(p.norm_exponent for p in nonzero)
    rho = math.sqrt(math.fsum(math.ldexp(p.mantissa, p.norm_exponent - t) ** 2 for p in nonzero))
    return rho, t


def _to_float(rho: float, t: int) -> float:
    try:
        return math.ldexp(rho, t)
    except OverflowError:
        return math.inf


def _ratio_to_clip(rho: float, t: int, clip: float) -> float:
    """norm / clip for norm = rho * 2**t, without overflow (``inf`` when beyond float64)."""
    if rho == 0.0:
        return 0.0
    m_c, e_c = math.frexp(clip)
    d = t - e_c
    if d > 1000:
        return math.inf
    if d < -1000:
        return 0.0
    return math.ldexp(rho / m_c, d)


def _products(
    layers: Mapping[str, LoraFactors], deltas: Mapping[str, np.ndarray], phase: LoraPhase
) -> dict[str, _Product]:
    return {name: _layer_product(deltas[name], layers[name], phase) for name in layers}


def _scaled_deltas(
    layers: Mapping[str, LoraFactors],
    deltas: Mapping[str, np.ndarray],
    phase: LoraPhase,
    clip: float,
    rho: float,
    t: int,
) -> dict[str, np.ndarray]:
    """Every delta times C / norm, cast to its dtype, with the cast result's product norm <= C.

    Rounding a delta to its dtype (toward zero, per element) does not necessarily shrink the
    product, so the product norm of the cast result is recomputed and, while it exceeds C,
    the factor is reduced by the observed excess and a growing margin; zeros as a last resort.
    """
    m_c, e_c = math.frexp(clip)
    g = m_c / rho  # C / norm = g * 2**shift, with g in (0, 2]
    shift = e_c - t
    splits = {name: _pow2_split(arr) for name, arr in deltas.items()}
    margin = 4.0 * max((float(np.finfo(arr.dtype).eps) for arr in deltas.values()), default=0.0)
    for _ in range(_MAX_SHRINK_STEPS):
        out = {
            name: _cast_toward_zero(np.ldexp(d_hat * g, e_d + shift), deltas[name].dtype)
            for name, (d_hat, e_d) in splits.items()
        }
        excess = _ratio_to_clip(*_joint(_products(layers, out, phase).values()), clip)
        if excess <= 1.0:
            return out
        g = 0.0 if math.isinf(excess) else g / excess * (1.0 - margin)
        margin = min(2.0 * margin, 0.5)
    return {name: np.zeros_like(arr) for name, arr in deltas.items()}  # pragma: no cover


# ---------------------------------------------------------------------------------- public API


def product_update(
    layers: Mapping[str, LoraFactors], delta: Mapping[str, np.ndarray], *, phase: LoraPhase
) -> dict[str, np.ndarray]:
    """The product-space (ΔW) update of each layer: s·ΔB·A (B phase) or s·B·ΔA (A phase).

    Args:
        layers: ``{name: LoraFactors}``, the current public factors.
        delta: ``{name: delta of the trained factor}`` with that factor's 2-D shape (ΔB:
            d_out × r in the B phase, ΔA: r × d_in in the A phase); never modified.
        phase: Which factor is trained.

    Returns:
        ``{name: d_out × d_in array}``, computed in float64 and cast to the numpy promotion of
        the delta's and the frozen factor's dtypes.

    Raises:
        ValueError: On a bad argument or input (naming it), or a product beyond the dtype's range.
    """
    phase = _check_phase(phase)
    factors = _check_layers(layers)
    deltas = _check_delta(factors, delta, phase)
    out: dict[str, np.ndarray] = {}
    for name, p in _products(factors, deltas, phase).items():
        frozen = factors[name].a if phase is LoraPhase.B else factors[name].b
        with np.errstate(over="ignore"):
            value = np.array(np.ldexp(p.unit, p.exponent), dtype=np.result_type(deltas[name], frozen))
        if not np.isfinite(value).all():
            raise ValueError(f"invalid delta[{name!r}]: its product update overflows dtype {value.dtype}")
        out[name] = value
    return out


def clip_lora_update(
    layers: Mapping[str, LoraFactors],
    delta: Mapping[str, np.ndarray],
    *,
    phase: LoraPhase,
    clip_norm: float,
) -> tuple[dict[str, np.ndarray], float]:
    """Scales the deltas so that their product-space update has joint Frobenius norm <= C.

    The norm is ‖(s_ℓ·ΔB_ℓ·A_ℓ)_ℓ‖_F over all layers ℓ (B phase) or ‖(s_ℓ·B_ℓ·ΔA_ℓ)_ℓ‖_F
    (A phase): DP-FedAvg's flat clipping (McMahan et al. 2018, "Learning Differentially Private
    Recurrent Language Models", Algorithm 1) applied to ΔW instead of the raw parameters. The
    product is linear in the delta, so every delta is multiplied by min(1, C / norm). Values
    are cast back to each delta's dtype and the product norm of the cast result is checked
    (and the factor reduced if rounding pushed it above C), so the bound holds up to the
    float64 rounding of the product (see the module docstring). An update already within C is
    returned as exact copies.

    Args:
        layers: ``{name: LoraFactors}``, the current public factors.
        delta: ``{name: delta of the trained factor}``, 2-D, of that factor's shape; never
            modified.
        phase: Which factor is trained.
        clip_norm: C, a finite number > 0.

    Returns:
        ``(clipped, norm)``: new arrays with the input dtypes and shapes, and the joint
        product-space norm of the input (``inf`` only if it exceeds the float64 range).

    Raises:
        ValueError: On a bad argument or input, naming it (and the layer).
    """
    clip = _check_clip_norm(clip_norm)
    phase = _check_phase(phase)
    factors = _check_layers(layers)
    deltas = _check_delta(factors, delta, phase)
    rho, t = _joint(_products(factors, deltas, phase).values())
    norm = _to_float(rho, t)
    if _ratio_to_clip(rho, t, clip) <= 1.0:
        return {name: np.array(arr, copy=True) for name, arr in deltas.items()}, norm
    return _scaled_deltas(factors, deltas, phase, clip, rho, t), norm


def _release(y: np.ndarray, factors: LoraFactors, phase: LoraPhase, ridge: float) -> np.ndarray:
    """Maps a product-space matrix to the trained factor: Y·Aᵀ(AAᵀ+λI)⁻¹/s or (BᵀB+λI)⁻¹BᵀY/s.

    Computed from the SVD of the frozen factor normalised by a power of two, F = 2**e·U·S·Vᵀ:
    Aᵀ(AAᵀ+λI)⁻¹ = 2**-e · V·diag(S/(S²+λ̂))·Uᵀ (and (BᵀB+λI)⁻¹Bᵀ = 2**-e · V·diag(…)·Uᵀ
    for B = 2**e·U·S·Vᵀ), with λ̂ = ridge·ΣS²/r, i.e. λ = ridge·trace(FᵀF)/r in the frozen
    factor's own units. Singular values under the numerical-rank tolerance count as zero.
    """
    frozen = factors.a if phase is LoraPhase.B else factors.b
    f_hat, e_f = _pow2_split(frozen)
    u, sv, vt = np.linalg.svd(f_hat, full_matrices=False)
    lam = ridge * float(np.sum(sv * sv)) / factors.rank
    tol = float(sv.max()) * max(f_hat.shape) * float(np.finfo(np.float64).eps) if sv.size else 0.0
    keep = sv > tol
    filt = np.zeros_like(sv)
    filt[keep] = sv[keep] / (sv[keep] * sv[keep] + lam)
    m_s, e_s = math.frexp(factors.scaling)
    with np.errstate(over="ignore", invalid="ignore"):
        if phase is LoraPhase.B:  # A = 2**e·U·S·Vᵀ (u: r × k, vt: k × d_in)
            core = ((y @ vt.T) * filt) @ u.T  # d_out × r
        else:  # B = 2**e·U·S·Vᵀ (u: d_out × k, vt: k × r)
            core = vt.T @ (filt[:, None] * (u.T @ y))  # r × d_in
        return np.ldexp(core / m_s, -(e_f + e_s))


def regulate(
    layers: Mapping[str, LoraFactors],
    delta: Mapping[str, np.ndarray],
    *,
    phase: LoraPhase,
    clip_norm: float,
    noise_multiplier: float,
    shares: int = 1,
    ridge: float = 1e-6,
    rng: np.random.Generator | None = None,
) -> RegulatedUpdate:
    """DEeR's noise regulator, done soundly: clip in product space, noise there, map back.

    For each layer: P = clipped s·ΔB·A (B phase) or s·B·ΔA (A phase), the clip being joint
    over all layers (:func:`clip_lora_update`); Y = P + Z with Z iid N(0, (σC/√K)²) of shape
    d_out × d_in; released ΔB̃ = Y·Aᵀ(AAᵀ + λI)⁻¹ / s or ΔÃ = (BᵀB + λI)⁻¹Bᵀ·Y / s with
    λ = ridge·trace(AAᵀ)/r (trace(BᵀB)/r). The release is a fixed function of the frozen,
    public factor applied to one Gaussian mechanism's output (sensitivity C, noise multiplier
    σ), so the upload is ONE silo-level Gaussian release (``Mechanism.GAUSSIAN``,
    ``Neighbouring.SILO``, q = 1) whatever the ridge. The noise reaches ΔW as Z·P_A
    (s·B·Ñ_A = P_B·Z in the A phase), independent of the frozen factor's scale. See the module
    docstring for the derivation, the ridge's bias and what is not released.

    With secure aggregation each of K silos adds a share of std σC/√K so that the aggregate
    carries σC (as in :func:`fedsilo.privacy.update_noise.add_gaussian_noise`); one upload on
    its own then has noise multiplier σ/√K.

    Randomness: with ``rng=None`` (production) the noise comes from the OS CSPRNG
    (``os.urandom``, Box-Muller), as in :func:`fedsilo.privacy.update_noise.privatize_update`;
    a numpy Generator makes the result reproducible (tests; PCG64 is not a CSPRNG).

    Args:
        layers: ``{name: LoraFactors}``, the current public factors (the frozen one must be
            the one every silo and the server hold).
        delta: ``{name: delta of the trained factor}``, 2-D, of that factor's shape; never
            modified.
        phase: Which factor is trained and released.
        clip_norm: C, a finite number > 0.
        noise_multiplier: σ, a finite number >= 0 (0 adds nothing: tests only).
        shares: K >= 1 silos sharing the noise under secure aggregation.
        ridge: Relative ridge >= 0 of the inverse (default 1e-6).
        rng: None for OS randomness, or a numpy Generator.

    Returns:
        The released deltas (the input dtypes and shapes), the input's product-space norm,
        whether it was clipped, and the per-element noise std σC/√K.

    Raises:
        ValueError: On a bad argument or input (naming it and the layer), or a released value
            beyond its dtype's range.
    """
    clip = _check_clip_norm(clip_norm)
    sigma = _check_noise_multiplier(noise_multiplier)
    k = _check_shares(shares)
    lam = _check_ridge(ridge)
    phase = _check_phase(phase)
    draw = _sampler(rng)
    factors = _check_layers(layers)
    deltas = _check_delta(factors, delta, phase)

    products = _products(factors, deltas, phase)
    rho, t = _joint(products.values())
    norm = _to_float(rho, t)
    clipped = _ratio_to_clip(rho, t, clip) > 1.0
    if clipped:
        m_c, e_c = math.frexp(clip)
        g, shift = m_c / rho, e_c - t
        points = {name: np.ldexp(p.unit * g, p.exponent + shift) for name, p in products.items()}
    else:
        points = {name: np.ldexp(p.unit, p.exponent) for name, p in products.items()}
    # Rounding may leave the clipped product a few ulps above C: step toward zero until it is not.
    for _ in range(_MAX_SHRINK_STEPS):
        if _within(points, clip):
            break
        points = {name: np.nextafter(arr, 0.0) for name, arr in points.items()}
    else:  # pragma: no cover
        points = {name: np.zeros_like(arr) for name, arr in points.items()}

    std = sigma * clip / math.sqrt(k)
    released: dict[str, np.ndarray] = {}
    for name, point in points.items():
        y = point
        if std > 0.0:
            with np.errstate(over="ignore", invalid="ignore"):
                y = point + std * draw(point.size).reshape(point.shape)
            if not np.isfinite(y).all():
                raise ValueError(f"invalid delta[{name!r}]: noise of std {std!r} overflows float64")
        value64 = _release(y, factors[name], phase, lam)
        with np.errstate(over="ignore"):
            value = np.array(value64, dtype=deltas[name].dtype)
        if not np.isfinite(value).all():
            raise ValueError(
                f"invalid delta[{name!r}]: the released {phase.name} overflows dtype {value.dtype} "
                "(the frozen factor is too small or ill-conditioned for this noise)"
            )
        released[name] = value
    return RegulatedUpdate(deltas=released, original_norm=norm, clipped=clipped, noise_std=std)
