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
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedsilo.privacy.update_noise import (
    _cast_toward_zero,
    _check_clip_norm,
    _check_noise_multiplier,
    _check_shares,
    _is_real,
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


class LoraPhase(enum.Enum):
    """Which LoRA factor an upload trains and shares (the other one is frozen)."""

    A = "a"
    """A is trained and shared; B is frozen."""
    B = "b"
    """B is trained and shared; A is frozen."""


@dataclass(frozen=True, kw_only=True)
class LoraFactors:
    """The current (public, identical on every silo) LoRA factors of one adapted layer.

    The arrays are stored as read-only copies, validated once here.

    Attributes:
        a: A as an r × d_in floating-point matrix (a convolution's A flattened, see
            :func:`to_matrix`).
        b: B as a d_out × r floating-point matrix.
        scaling: s = alpha / r (or alpha / √r with rsLoRA), a finite number > 0.
    """

    a: np.ndarray
    b: np.ndarray
    scaling: float = 1.0

    def __post_init__(self) -> None:
        a = _check_matrix("LoraFactors.a", self.a)
        b = _check_matrix("LoraFactors.b", self.b)
        if a.shape[0] != b.shape[1]:
            raise ValueError(
                f"invalid LoraFactors: a has rank {a.shape[0]} (shape {a.shape}) but b has "
                f"rank {b.shape[1]} (shape {b.shape}); need a: r × d_in and b: d_out × r"
            )
        s = self.scaling
        if not _is_real(s) or not math.isfinite(float(s)) or not float(s) > 0.0:
            raise ValueError(f"invalid LoraFactors.scaling {s!r}: must be a finite number > 0")
        a = np.array(a, copy=True)
        b = np.array(b, copy=True)
        a.setflags(write=False)
        b.setflags(write=False)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "scaling", float(s))

    @property
    def rank(self) -> int:
        """r, the LoRA rank."""
        return int(self.a.shape[0])


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


# ----------------------------------------------------------------------------- validation


def _check_matrix(field: str, value: object) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise ValueError(f"invalid {field}: must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"invalid {field}: must be a 2-D matrix, got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"invalid {field}: must have no empty dimension, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"invalid {field}: contains NaN or inf values")
    return arr


def _check_phase(phase: object) -> LoraPhase:
    if not isinstance(phase, LoraPhase):
        raise ValueError(f"invalid phase {phase!r}: must be a LoraPhase (LoraPhase.A or LoraPhase.B)")
    return phase


def _check_kind(kind: object) -> LoraPhase:
    if isinstance(kind, LoraPhase):
        return kind
    if kind in ("a", "b"):
        return LoraPhase(kind)
    raise ValueError(f"invalid kind {kind!r}: must be 'a', 'b' or a LoraPhase")


def _check_ridge(value: object) -> float:
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) < 0.0:  # type: ignore[arg-type]
        raise ValueError(f"invalid ridge {value!r}: must be a finite number >= 0")
    return float(value)  # type: ignore[arg-type]


def _check_layers(layers: object) -> dict[str, LoraFactors]:
    if not isinstance(layers, Mapping):
        raise ValueError(f"invalid layers: must be a mapping of names to LoraFactors, got {type(layers).__name__}")
    out: dict[str, LoraFactors] = {}
    for name, factors in layers.items():
        if not isinstance(name, str):
            raise ValueError(f"invalid layers key {name!r}: must be a string")
        if not isinstance(factors, LoraFactors):
            raise ValueError(f"invalid layers[{name!r}]: must be LoraFactors, got {type(factors).__name__}")
        out[name] = factors
    return out


def _check_delta(layers: Mapping[str, LoraFactors], delta: object, phase: LoraPhase) -> dict[str, np.ndarray]:
    """``{name: delta matrix}`` (views, never modified), one per layer, of the trained factor's shape."""
    if not isinstance(delta, Mapping):
        raise ValueError(f"invalid delta: must be a mapping of layer names to arrays, got {type(delta).__name__}")
    for name in delta:
        if name not in layers:
            raise ValueError(f"invalid delta[{name!r}]: no such layer in layers")
    out: dict[str, np.ndarray] = {}
    for name, factors in layers.items():
        if name not in delta:
            raise ValueError(f"invalid delta: missing layer {name!r}")
        arr = _check_matrix(f"delta[{name!r}]", delta[name])
        trained = factors.b if phase is LoraPhase.B else factors.a
        if arr.shape != trained.shape:
            raise ValueError(
                f"invalid delta[{name!r}]: shape {arr.shape} does not match the trained factor "
                f"{phase.name} of shape {trained.shape}"
            )
        out[name] = arr
    return out


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


# ------------------------------------------------------------------------------- deviation


def _check_silo_factors(field: str, silos: object, count: int | None) -> list[Mapping[str, object]]:
    if isinstance(silos, (str, bytes, Mapping)) or not isinstance(silos, Sequence):
        raise ValueError(f"invalid {field}: must be a sequence (one mapping per silo)")
    items = list(silos)
    if not items:
        raise ValueError(f"invalid {field}: need at least one silo")
    if count is not None and len(items) != count:
        raise ValueError(f"invalid {field}: {len(items)} silos, expected {count}")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"invalid {field}[{i}]: must be a mapping of layer names to arrays")
    return items


def aggregation_deviation(
    bs: Sequence[Mapping[str, np.ndarray]],
    as_: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    *,
    scaling: Mapping[str, float] | float = 1.0,
) -> float:
    """How far averaging both LoRA factors at once is from averaging the silos' ΔW.

    Per layer, D = Σ_i w_i·s·B_i·A_i − s·B̄·Ā with weighted means B̄ = Σ_i w_i·B_i,
    Ā = Σ_i w_i·A_i and weights normalised to sum to 1; returns ‖(D_ℓ)_ℓ‖_F jointly over the
    layers. This is the aggregation deviation of FedAvg-style LoRA (Zhu et al. 2024, DEeR,
    §3); it is zero when all silos share the same A (B phase) or the same B (A phase). It is
    computed as D = s·Σ_i w_i·(B_i − B̄)(A_i − Ā), algebraically equal, which avoids
    cancelling large terms.

    Args:
        bs: Per silo, ``{layer: B_i}`` (d_out × r); never modified.
        as_: Per silo, ``{layer: A_i}`` (r × d_in), the same layers; never modified.
        weights: Per silo, a finite weight >= 0 (e.g. dataset sizes), not all zero.
        scaling: s for every layer, or ``{layer: s}`` for each layer; finite, > 0.

    Returns:
        The joint Frobenius norm of the deviation (``inf`` only beyond the float64 range).

    Raises:
        ValueError: On a bad argument or input, naming it (silo index and layer).
    """
    b_list = _check_silo_factors("bs", bs, None)
    a_list = _check_silo_factors("as_", as_, len(b_list))
    if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence):
        raise ValueError("invalid weights: must be a sequence of numbers, one per silo")
    if len(weights) != len(b_list):
        raise ValueError(f"invalid weights: {len(weights)} weights for {len(b_list)} silos")
    for i, w in enumerate(weights):
        if not _is_real(w) or not math.isfinite(float(w)) or float(w) < 0.0:
            raise ValueError(f"invalid weights[{i}] {w!r}: must be a finite number >= 0")
    w_arr = np.array([float(w) for w in weights], dtype=np.float64)
    total = math.fsum(w_arr.tolist())
    if not total > 0.0:
        raise ValueError("invalid weights: they must not all be zero")
    w_arr = w_arr / total

    names = list(b_list[0].keys())
    for field, silos in (("bs", b_list), ("as_", a_list)):
        for i, silo in enumerate(silos):
            if set(silo.keys()) != set(names):
                raise ValueError(
                    f"invalid {field}[{i}]: layers {sorted(map(str, silo.keys()))} differ from "
                    f"bs[0]'s {sorted(map(str, names))}"
                )
    if isinstance(scaling, Mapping):
        if set(scaling.keys()) != set(names):
            raise ValueError(
                f"invalid scaling: layers {sorted(map(str, scaling.keys()))} differ from "
                f"{sorted(map(str, names))}"
            )
        scales = dict(scaling)
    else:
        scales = {name: scaling for name in names}
    for name, s in scales.items():
        if not _is_real(s) or not math.isfinite(float(s)) or not float(s) > 0.0:
            raise ValueError(f"invalid scaling[{name!r}] {s!r}: must be a finite number > 0")

    deviations: dict[str, np.ndarray] = {}
    for name in names:
        b_mats = [_check_matrix(f"bs[{i}][{name!r}]", silo[name]) for i, silo in enumerate(b_list)]
        a_mats = [_check_matrix(f"as_[{i}][{name!r}]", silo[name]) for i, silo in enumerate(a_list)]
        for i, (b, a) in enumerate(zip(b_mats, a_mats)):
            if b.shape != b_mats[0].shape:
                raise ValueError(f"invalid bs[{i}][{name!r}]: shape {b.shape}, bs[0] has {b_mats[0].shape}")
            if a.shape != a_mats[0].shape:
                raise ValueError(f"invalid as_[{i}][{name!r}]: shape {a.shape}, as_[0] has {a_mats[0].shape}")
            if b.shape[1] != a.shape[0]:
                raise ValueError(
                    f"invalid layer {name!r} of silo {i}: B {b.shape} and A {a.shape} do not multiply "
                    "(need B: d_out × r, A: r × d_in)"
                )
        b64 = [b.astype(np.float64) for b in b_mats]
        a64 = [a.astype(np.float64) for a in a_mats]
        with np.errstate(over="ignore", invalid="ignore"):
            b_bar = sum((w * b for w, b in zip(w_arr, b64)), np.zeros_like(b64[0]))
            a_bar = sum((w * a for w, a in zip(w_arr, a64)), np.zeros_like(a64[0]))
            dev = sum(
                (w * ((b - b_bar) @ (a - a_bar)) for w, b, a in zip(w_arr, b64, a64)),
                np.zeros((b64[0].shape[0], a64[0].shape[1])),
            )
            deviations[name] = float(scales[name]) * dev
    m, r = _scaled_norm(deviations)
    if not (math.isfinite(m) and math.isfinite(r)):
        return math.inf
    return m * r


# ------------------------------------------------------------------------- conv LoRA shapes


def to_matrix(array: np.ndarray, kind: LoraPhase | str) -> np.ndarray:
    """A peft LoRA weight as the 2-D matrix this module works on (a new array).

    ``kind`` "a" (or ``LoraPhase.A``): ``lora_A`` weight (r, d_in) for a linear layer or
    (r, c_in, k, …) for a convolution → r × (c_in·k·…). ``kind`` "b": ``lora_B`` weight
    (d_out, r) or (c_out, r, 1, …) for a convolution (peft's 1×…×1 conv) → c_out × r. Then
    ΔW = s·B·A reshaped to (c_out, c_in, k, …) is the convolution's weight update (grouped
    convolutions are not covered).

    Raises:
        ValueError: On a bad kind or shape.
    """
    which = _check_kind(kind)
    arr = np.asarray(array)
    if arr.ndim < 2:
        raise ValueError(f"invalid array: a LoRA {which.name} weight needs >= 2 dimensions, got shape {arr.shape}")
    if which is LoraPhase.A:
        return np.array(arr, copy=True).reshape(arr.shape[0], -1)
    if any(d != 1 for d in arr.shape[2:]):
        raise ValueError(f"invalid array: a conv LoRA B weight must be (c_out, r, 1, …), got shape {arr.shape}")
    return np.array(arr, copy=True).reshape(arr.shape[0], arr.shape[1])


def from_matrix(matrix: np.ndarray, kind: LoraPhase | str, shape: Sequence[int]) -> np.ndarray:
    """The inverse of :func:`to_matrix`: a 2-D factor matrix reshaped to peft's weight ``shape`` (a new array).

    Raises:
        ValueError: On a bad kind, or a shape that does not fit the matrix (naming both).
    """
    which = _check_kind(kind)
    mat = np.asarray(matrix)
    if mat.ndim != 2:
        raise ValueError(f"invalid matrix: must be 2-D, got shape {mat.shape}")
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) < 2:
        raise ValueError(f"invalid shape {shape!r}: must be a sequence of >= 2 dimensions")
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and int(d) >= 1 for d in shape):
        raise ValueError(f"invalid shape {tuple(shape)!r}: dimensions must be integers >= 1")
    dims = tuple(int(d) for d in shape)
    if which is LoraPhase.A:
        fits = dims[0] == mat.shape[0] and math.prod(dims[1:]) == mat.shape[1]
    else:
        fits = dims[:2] == mat.shape and all(d == 1 for d in dims[2:])
    if not fits:
        raise ValueError(f"invalid shape {dims}: does not fit a LoRA {which.name} matrix of shape {mat.shape}")
    return np.array(mat, copy=True).reshape(dims)
