"""Tests for DEeR's LoRA noise regulator (privacy/lora_noise.py): product-space clip, noise, deviation."""

from __future__ import annotations

import copy
import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsilo.privacy.lora_noise import (
    LoraFactors,
    LoraPhase,
    RegulatedUpdate,
    aggregation_deviation,
    clip_lora_update,
    from_matrix,
    product_update,
    regulate,
    to_matrix,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

B, A = LoraPhase.B, LoraPhase.A


# ----------------------------------------------------------------------------- helpers


def _frozen(layer: LoraFactors, phase: LoraPhase) -> np.ndarray:
    return layer.a if phase is B else layer.b


def _decimal_matmul(x: np.ndarray, y: np.ndarray, *, absolute: bool = False) -> list[list[Decimal]]:
    xd = [[Decimal(float(v)) for v in row] for row in x]
    yd = [[Decimal(float(v)) for v in row] for row in y]
    if absolute:
        xd = [[abs(v) for v in row] for row in xd]
        yd = [[abs(v) for v in row] for row in yd]
    inner = len(yd)
    return [
        [sum((xd[i][k] * yd[k][j] for k in range(inner)), Decimal(0)) for j in range(len(yd[0]))]
        for i in range(len(xd))
    ]


def _oracle(
    layers: dict[str, LoraFactors], deltas: dict[str, np.ndarray], phase: LoraPhase
) -> tuple[Decimal, Decimal]:
    """(joint ‖ΔW‖_F in near-exact decimal arithmetic, a bound on the float64 rounding of ΔW).

    The rounding bound is (r + 3)·2^-52·s·‖|Δ|·|F|‖_F (dot-product error, Higham 2002, §3.1)
    plus r·2^-1070·s·max|Δ|·max|F| per element for underflow of normalised products.
    """
    with localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = 60, 10**6, -(10**6)
        total, slack_sq = Decimal(0), Decimal(0)
        for name, layer in layers.items():
            d = deltas[name].astype(np.float64)
            f = _frozen(layer, phase)
            x, y = (d, f) if phase is B else (f, d)
            s = Decimal(layer.scaling)
            r = layer.rank
            prod = _decimal_matmul(x, y)
            absprod = _decimal_matmul(x, y, absolute=True)
            total += sum((s * v) ** 2 for row in prod for v in row)
            gamma = Decimal(r + 3) * Decimal(2) ** -52
            slack_sq += sum((gamma * s * v) ** 2 for row in absprod for v in row)
            under = Decimal(r) * Decimal(2) ** -1070 * s
            under *= Decimal(float(np.max(np.abs(d)))) * Decimal(float(np.max(np.abs(f))))
            slack_sq += Decimal(len(prod) * len(prod[0])) * under**2
        return total.sqrt(), slack_sq.sqrt()


def _element_values(dtype: np.dtype) -> st.SearchStrategy[float]:
    """Adversarial finite values for a dtype: huge, tiny, subnormal, zero, ordinary."""
    info = np.finfo(dtype)
    return st.one_of(
        st.floats(allow_nan=False, allow_infinity=False, width=info.bits),
        st.sampled_from([0.0, -0.0, float(info.max), -float(info.max), float(info.smallest_subnormal), 1.0, -1.0]),
    )


_frozen_values = st.one_of(
    st.floats(min_value=-1e300, max_value=1e300, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, -1.0, 0.01, 5e-324, 1e-300, 1.7e308, -1.7e308]),
)


@st.composite
def lora_cases(draw: st.DrawFn) -> tuple[LoraPhase, dict[str, LoraFactors], dict[str, np.ndarray]]:
    """A phase, 1–4 layers of mixed shapes and ranks 1..8, and adversarial deltas of mixed dtypes."""
    phase = draw(st.sampled_from([A, B]))
    layers: dict[str, LoraFactors] = {}
    deltas: dict[str, np.ndarray] = {}
    for i in range(draw(st.integers(min_value=1, max_value=4))):
        r = draw(st.integers(min_value=1, max_value=8))
        d_out = draw(st.integers(min_value=1, max_value=6))
        d_in = draw(st.integers(min_value=1, max_value=6))
        a_shape, b_shape = (r, d_in), (d_out, r)
        frozen_shape, trained_shape = (a_shape, b_shape) if phase is B else (b_shape, a_shape)
        frozen = draw(hnp.arrays(np.float64, frozen_shape, elements=_frozen_values))
        trained = np.zeros(trained_shape)
        a, b = (frozen, trained) if phase is B else (trained, frozen)
        scaling = draw(
            st.one_of(st.floats(min_value=1e-3, max_value=1e3), st.sampled_from([1.0, 2.0, 0.125, 16.0]))
        )
        layers[f"l{i}"] = LoraFactors(a=a, b=b, scaling=scaling)
        dtype = np.dtype(draw(st.sampled_from(["float16", "float32", "float64"])))
        deltas[f"l{i}"] = draw(hnp.arrays(dtype, trained_shape, elements=_element_values(dtype)))
    return phase, layers, deltas


clip_norms = st.one_of(
    st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False),
    st.sampled_from([1e-3, 1.0, 10.0]),
)


def _random_layers(
    rng: np.random.Generator, shapes: dict[str, tuple[int, int, int]], scaling: float = 2.0
) -> dict[str, LoraFactors]:
    """Well-conditioned Gaussian factors {name: (d_out, r, d_in)} with r <= min(d_out, d_in)."""
    return {
        name: LoraFactors(a=rng.standard_normal((r, d_in)), b=rng.standard_normal((d_out, r)), scaling=scaling)
        for name, (d_out, r, d_in) in shapes.items()
    }


def _random_delta(
    rng: np.random.Generator, layers: dict[str, LoraFactors], phase: LoraPhase
) -> dict[str, np.ndarray]:
    return {name: rng.standard_normal((l.b if phase is B else l.a).shape) for name, l in layers.items()}


def _joint_norm(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(v, dtype=np.float64) ** 2)) for v in arrays.values()))


def _dw(layers: dict[str, LoraFactors], deltas: dict[str, np.ndarray], phase: LoraPhase) -> dict[str, np.ndarray]:
    """The ΔW of factor deltas, straight from the formula (test oracle)."""
    return {
        name: l.scaling * (deltas[name] @ l.a if phase is B else l.b @ deltas[name]) for name, l in layers.items()
    }


SHAPES = {"attn.q": (6, 3, 8), "conv": (4, 2, 3 * 3 * 3), "mlp": (5, 4, 4)}


# ------------------------------------------------------------------- 1. product-space clip


@SETTINGS
@given(lora_cases(), clip_norms)
def test_clip_bounds_joint_product_norm(case, clip: float) -> None:
    phase, layers, deltas = case
    before = copy.deepcopy(deltas)
    clipped, norm = clip_lora_update(layers, deltas, phase=phase, clip_norm=clip)
    for name in deltas:
        np.testing.assert_array_equal(deltas[name], before[name])
        assert clipped[name].dtype == deltas[name].dtype and clipped[name].shape == deltas[name].shape
    exact_in, slack_in = _oracle(layers, deltas, phase)
    with localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = 60, 10**6, -(10**6)
        # The reported norm is the input's product norm, up to the float64 rounding of the
        # product (BLAS may use FMA: exact cancellations need not give 0), inf beyond float64.
        top = Decimal(float(np.finfo(np.float64).max))
        if norm == math.inf:
            assert exact_in + 2 * slack_in >= top
        else:
            assert exact_in - 2 * slack_in <= top
            subnormal_step = Decimal(2) ** -1074  # a subnormal norm has few significant bits
            assert abs(Decimal(norm) - exact_in) <= exact_in * Decimal("1e-9") + slack_in * 2 + 2 * subnormal_step
        exact_out, slack_out = _oracle(layers, clipped, phase)
        assert exact_out <= Decimal(clip) * (1 + Decimal("1e-9")) + slack_out


@SETTINGS
@given(lora_cases(), st.floats(min_value=1.0 + 1e-6, max_value=1e6))
def test_clip_leaves_small_updates_unchanged(case, headroom: float) -> None:
    phase, layers, deltas = case
    exact, slack = _oracle(layers, deltas, phase)
    with localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = 60, 10**6, -(10**6)
        bound = (exact + slack) * Decimal(headroom)
    if bound > Decimal("1e300"):
        return
    clip = max(float(bound), 1e-300)  # never below the bound, never subnormal
    clipped, norm = clip_lora_update(layers, deltas, phase=phase, clip_norm=clip)
    for name in deltas:
        np.testing.assert_array_equal(clipped[name], deltas[name])
        assert clipped[name] is not deltas[name]
    assert norm <= clip
    # float64: the release (a projection of the delta) may legitimately exceed float16's range.
    wide = {name: arr.astype(np.float64) for name, arr in deltas.items()}
    out = regulate(layers, wide, phase=phase, clip_norm=clip, noise_multiplier=0.0, rng=np.random.default_rng(0))
    assert not out.clipped and out.original_norm == norm


def test_clip_is_joint_over_layers_and_scales_every_delta_alike() -> None:
    rng = np.random.default_rng(1)
    layers = _random_layers(rng, SHAPES)
    for phase in (A, B):
        delta = _random_delta(rng, layers, phase)
        dw = _dw(layers, delta, phase)
        full = _joint_norm(dw)
        clipped, norm = clip_lora_update(layers, delta, phase=phase, clip_norm=full / 4)
        assert norm == pytest.approx(full, rel=1e-12)
        for name in delta:  # one common factor C / norm, not per layer
            np.testing.assert_allclose(clipped[name], delta[name] / 4, rtol=1e-12)
        assert _joint_norm(_dw(layers, clipped, phase)) == pytest.approx(full / 4, rel=1e-12)
        assert _joint_norm(_dw(layers, clipped, phase)) <= full / 4 * (1 + 1e-12)
        # Per-tensor clipping of the raw factor would be a different (and here wrong) bound.
        assert not np.allclose(_joint_norm(clipped), full / 4)


@pytest.mark.parametrize("excess", [1.0 + 1e-9, 1.01, 1.4, 3.0])
def test_clip_applies_just_above_the_bound_and_not_just_below(excess: float) -> None:
    rng = np.random.default_rng(16)
    layers = _random_layers(rng, SHAPES)
    for phase in (A, B):
        delta = _random_delta(rng, layers, phase)
        norm = _joint_norm(_dw(layers, delta, phase))
        clipped, _ = clip_lora_update(layers, delta, phase=phase, clip_norm=norm / excess)
        assert _joint_norm(_dw(layers, clipped, phase)) <= norm / excess * (1 + 1e-12)
        assert not np.array_equal(clipped["mlp"], delta["mlp"])
        kept, _ = clip_lora_update(layers, delta, phase=phase, clip_norm=norm * excess)
        np.testing.assert_array_equal(kept["mlp"], delta["mlp"])


def test_clip_survives_rounding_to_float16() -> None:
    """ΔW = Δ0 − Δ1 cancels: rounding 0.3·(1000, 999) toward zero in float16 gives (300, 299.5),
    whose product 0.5 exceeds C = 0.3; the clip must notice and shrink further."""
    layers = {"l": LoraFactors(a=np.array([[1.0], [-1.0]]), b=np.zeros((1, 2)))}
    delta = {"l": np.array([[1000.0, 999.0]], dtype=np.float16)}
    clipped, norm = clip_lora_update(layers, delta, phase=B, clip_norm=0.3)
    assert norm == 1.0 and clipped["l"].dtype == np.float16
    product = abs(float(clipped["l"][0, 0]) - float(clipped["l"][0, 1]))
    assert 0.0 < product <= 0.3


def test_product_update_matches_formula() -> None:
    rng = np.random.default_rng(2)
    layers = _random_layers(rng, SHAPES, scaling=0.5)
    for phase in (A, B):
        delta = _random_delta(rng, layers, phase)
        got = product_update(layers, delta, phase=phase)
        want = _dw(layers, delta, phase)
        for name in layers:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-14)
            assert got[name].shape == (layers[name].b.shape[0], layers[name].a.shape[1])


# ------------------------------------------------------------------------- 2. exactness


@pytest.mark.parametrize("phase", [A, B])
@pytest.mark.parametrize("ridge", [0.0, 1e-14])
def test_regulate_without_noise_returns_the_input(phase: LoraPhase, ridge: float) -> None:
    rng = np.random.default_rng(3)
    layers = _random_layers(rng, SHAPES, scaling=4.0)
    delta = _random_delta(rng, layers, phase)
    before = copy.deepcopy(delta)
    out = regulate(layers, delta, phase=phase, clip_norm=1e6, noise_multiplier=0.0, ridge=ridge)
    assert isinstance(out, RegulatedUpdate)
    assert not out.clipped and out.noise_std == 0.0
    assert out.original_norm == pytest.approx(_joint_norm(_dw(layers, delta, phase)), rel=1e-12)
    for name in delta:
        np.testing.assert_array_equal(delta[name], before[name])
        np.testing.assert_allclose(out.deltas[name], delta[name], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("phase", [A, B])
def test_regulate_without_noise_clips_exactly(phase: LoraPhase) -> None:
    rng = np.random.default_rng(4)
    layers = _random_layers(rng, SHAPES)
    delta = _random_delta(rng, layers, phase)
    norm = _joint_norm(_dw(layers, delta, phase))
    out = regulate(layers, delta, phase=phase, clip_norm=norm / 3, noise_multiplier=0.0, ridge=0.0)
    assert out.clipped and out.original_norm == pytest.approx(norm, rel=1e-12)
    for name in delta:
        np.testing.assert_allclose(out.deltas[name], delta[name] / 3, rtol=1e-9, atol=1e-11)
    assert _joint_norm(_dw(layers, out.deltas, phase)) <= norm / 3 * (1 + 1e-9)


@pytest.mark.parametrize("phase", [A, B])
def test_regulate_keeps_float32(phase: LoraPhase) -> None:
    rng = np.random.default_rng(5)
    layers = _random_layers(rng, SHAPES)
    delta = {k: v.astype(np.float32) for k, v in _random_delta(rng, layers, phase).items()}
    out = regulate(layers, delta, phase=phase, clip_norm=1e6, noise_multiplier=0.0, ridge=0.0)
    for name in delta:
        assert out.deltas[name].dtype == np.float32
        np.testing.assert_allclose(out.deltas[name], delta[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("phase", [A, B])
def test_ridge_bias_is_small_and_toward_zero(phase: LoraPhase) -> None:
    rng = np.random.default_rng(6)
    layers = _random_layers(rng, SHAPES)
    delta = _random_delta(rng, layers, phase)
    ridge = 0.05
    out = regulate(layers, delta, phase=phase, clip_norm=1e6, noise_multiplier=0.0, ridge=ridge)
    small = regulate(layers, delta, phase=phase, clip_norm=1e6, noise_multiplier=0.0)  # default ridge 1e-6
    for name, l in layers.items():
        d, got = delta[name], out.deltas[name]
        r = l.rank
        if phase is B:  # the spec's formula: Y·Aᵀ(AAᵀ + λI)⁻¹ / s with λ = ridge·trace(AAᵀ)/r
            gram = l.a @ l.a.T
            lam = ridge * np.trace(gram) / r
            want = np.linalg.solve(gram + lam * np.eye(r), (l.scaling * d @ l.a @ l.a.T).T).T / l.scaling
            u = np.linalg.svd(l.a, full_matrices=False)[0]  # left singular vectors of A (r × r)
            coeff_in, coeff_out = d @ u, got @ u
        else:  # (BᵀB + λI)⁻¹BᵀY / s with λ = ridge·trace(BᵀB)/r
            gram = l.b.T @ l.b
            lam = ridge * np.trace(gram) / r
            want = np.linalg.solve(gram + lam * np.eye(r), l.b.T @ (l.scaling * l.b @ d)) / l.scaling
            v = np.linalg.svd(l.b, full_matrices=False)[2].T  # right singular vectors of B (r × r)
            coeff_in, coeff_out = v.T @ d, v.T @ got
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        # Toward 0: each singular direction shrinks by a factor σ²/(σ²+λ) in (0, 1).
        ratio = coeff_out / coeff_in
        axis = 0 if phase is B else 1
        assert np.all((ratio > 0.0) & (ratio < 1.0))
        assert np.allclose(ratio, ratio.take([0], axis=axis), rtol=1e-8)  # one factor per direction
        assert np.linalg.norm(got) < np.linalg.norm(d)
        # The default ridge's bias is tiny.
        rel = np.linalg.norm(small.deltas[name] - d) / np.linalg.norm(d)
        sv_min = np.linalg.svd(_frozen(l, phase), compute_uv=False).min()
        assert 0.0 < rel <= 2e-6 * np.trace(gram) / r / sv_min**2


def test_update_invisible_in_product_space_is_not_released() -> None:
    """B = 0 (first A phase): no ΔA changes ΔW, so nothing is released and nothing is clipped."""
    rng = np.random.default_rng(7)
    layers = {"l": LoraFactors(a=rng.standard_normal((2, 5)), b=np.zeros((3, 2)))}
    delta = {"l": rng.standard_normal((2, 5))}
    out = regulate(layers, delta, phase=A, clip_norm=1.0, noise_multiplier=2.0, rng=rng)
    assert out.original_norm == 0.0 and not out.clipped
    np.testing.assert_array_equal(out.deltas["l"], np.zeros((2, 5)))


# --------------------------------------------------------------- 3. noise statistics


def _projector(frozen: np.ndarray, phase: LoraPhase, ridge: float) -> np.ndarray:
    """P_A = Aᵀ(AAᵀ+λI)⁻¹A (B phase) or P_B = B(BᵀB+λI)⁻¹Bᵀ (A phase), λ relative."""
    r = frozen.shape[0] if phase is B else frozen.shape[1]
    if phase is B:
        gram = frozen @ frozen.T
        return frozen.T @ np.linalg.solve(gram + ridge * np.trace(gram) / r * np.eye(r), frozen)
    gram = frozen.T @ frozen
    return frozen @ np.linalg.solve(gram + ridge * np.trace(gram) / r * np.eye(r), frozen.T)


@pytest.mark.parametrize("phase", [A, B])
def test_product_space_noise_has_the_projected_covariance(phase: LoraPhase) -> None:
    rng = np.random.default_rng(8)
    d_out, r, d_in = 4, 3, 7
    # A rank-deficient frozen factor (rank 2 of 3) checks "rank", not "r", in E‖noise‖².
    a = rng.standard_normal((r, d_in))
    b = rng.standard_normal((d_out, r))
    if phase is B:
        a[2] = a[0] + a[1]
    else:
        b[:, 2] = b[:, 0] - b[:, 1]
    layers = {"l": LoraFactors(a=a, b=b, scaling=1.5)}
    trained = b if phase is B else a
    zero = {"l": np.zeros_like(trained)}
    clip, sigma, shares, n = 1.5, 0.8, 3, 4000
    std = sigma * clip / math.sqrt(shares)
    frozen = a if phase is B else b
    proj = _projector(frozen, phase, 1e-6)
    rank = np.linalg.matrix_rank(frozen)
    assert rank == 2

    samples = np.empty((n, d_out * d_in))
    draw_rng = np.random.default_rng(9)
    for i in range(n):
        out = regulate(
            layers, zero, phase=phase, clip_norm=clip, noise_multiplier=sigma, shares=shares, rng=draw_rng
        )
        assert out.noise_std == pytest.approx(std)
        samples[i] = _dw(layers, out.deltas, phase)["l"].ravel()

    # Covariance of vec(Z·P) (row-major) is std²·(I ⊗ P); of vec(P·Z) it is std²·(P ⊗ I).
    cov = std**2 * (np.kron(np.eye(d_out), proj) if phase is B else np.kron(proj, np.eye(d_in)))
    mean = samples.mean(axis=0)
    assert np.all(np.abs(mean) <= 5.0 * np.sqrt(np.diag(cov)) / math.sqrt(n) + 1e-12)
    sq = float(np.mean(np.sum(samples**2, axis=1)))
    expected_sq = std**2 * (d_out if phase is B else d_in) * rank
    assert sq == pytest.approx(expected_sq, rel=0.05)
    emp = samples.T @ samples / n
    assert np.max(np.abs(emp - cov)) <= 0.15 * std**2
    # Fixed directions: a random one, one inside the noise subspace, one orthogonal to it.
    shape = (d_out, d_in)
    side = (lambda m: m @ proj) if phase is B else (lambda m: proj @ m)
    free = rng.standard_normal(shape)
    # Exactly orthogonal to the frozen factor's row (A) or column (B) space: no noise at all.
    u, _, vt = np.linalg.svd(frozen, full_matrices=False)
    if phase is B:  # remove the components in A's row space
        null = free - (free @ vt[:rank].T) @ vt[:rank]
    else:  # remove the components in B's column space
        null = free - u[:, :rank] @ (u[:, :rank].T @ free)
    for direction, want in (
        (free, std**2 * np.sum(side(free) ** 2)),
        (side(free), std**2 * np.sum(side(side(free)) ** 2)),
        (null, 0.0),
    ):
        var = float(np.var(samples @ direction.ravel()))
        assert var == pytest.approx(want, rel=0.1, abs=1e-20 * std**2)


@pytest.mark.parametrize("phase", [A, B])
def test_noise_on_delta_w_is_invariant_to_the_frozen_factors_scale(phase: LoraPhase) -> None:
    rng = np.random.default_rng(10)
    layers = _random_layers(rng, SHAPES)
    big = {
        name: LoraFactors(a=l.a * 10 if phase is B else l.a, b=l.b if phase is B else l.b * 10, scaling=l.scaling)
        for name, l in layers.items()
    }
    delta = _random_delta(rng, layers, phase)
    delta_big = {name: v / 10 for name, v in delta.items()}  # the same ΔW, hence the same clip
    kwargs = dict(phase=phase, clip_norm=0.5, noise_multiplier=1.3)
    for seed in range(5):
        small = regulate(layers, delta, rng=np.random.default_rng(seed), **kwargs)
        large = regulate(big, delta_big, rng=np.random.default_rng(seed), **kwargs)
        assert small.clipped and large.clipped
        assert large.original_norm == pytest.approx(small.original_norm, rel=1e-12)
        dw_small, dw_large = _dw(layers, small.deltas, phase), _dw(big, large.deltas, phase)
        for name in layers:
            np.testing.assert_allclose(dw_large[name], dw_small[name], rtol=1e-6, atol=1e-9)
            # The factor itself, and its noise, shrink by 10.
            np.testing.assert_allclose(large.deltas[name], small.deltas[name] / 10, rtol=1e-6, atol=1e-10)
        # The noise part alone (delta 0): same ΔW noise, factor noise / 10.
        zero = {name: np.zeros_like(v) for name, v in delta.items()}
        n_small = regulate(layers, zero, rng=np.random.default_rng(seed), **kwargs)
        n_large = regulate(big, zero, rng=np.random.default_rng(seed), **kwargs)
        for name in layers:
            assert np.linalg.norm(n_small.deltas[name]) > 0
            np.testing.assert_allclose(n_large.deltas[name], n_small.deltas[name] / 10, rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(
                _dw(big, n_large.deltas, phase)[name],
                _dw(layers, n_small.deltas, phase)[name],
                rtol=1e-6,
                atol=1e-10,
            )


def test_os_randomness_by_default() -> None:
    rng = np.random.default_rng(11)
    layers = _random_layers(rng, SHAPES)
    zero = {name: np.zeros_like(l.b) for name, l in layers.items()}
    first = regulate(layers, zero, phase=B, clip_norm=1.0, noise_multiplier=1.0)
    second = regulate(layers, zero, phase=B, clip_norm=1.0, noise_multiplier=1.0)
    for name in layers:
        assert np.isfinite(first.deltas[name]).all()
        assert not np.array_equal(first.deltas[name], second.deltas[name])
    seeded = [
        regulate(layers, zero, phase=B, clip_norm=1.0, noise_multiplier=1.0, rng=np.random.default_rng(3))
        for _ in range(2)
    ]
    for name in layers:
        np.testing.assert_array_equal(seeded[0].deltas[name], seeded[1].deltas[name])


# ------------------------------------------------------------------ 4. deviation helper


def test_deviation_zero_when_the_frozen_factor_is_shared() -> None:
    rng = np.random.default_rng(12)
    silos, weights = 4, [10.0, 3.0, 0.0, 7.5]
    shapes = {"q": (6, 3, 8), "conv": (4, 2, 27)}
    shared_a = {name: rng.standard_normal((r, d_in)) for name, (_, r, d_in) in shapes.items()}
    shared_b = {name: rng.standard_normal((d_out, r)) for name, (d_out, r, _) in shapes.items()}
    bs = [{name: rng.standard_normal((d_out, r)) for name, (d_out, r, _) in shapes.items()} for _ in range(silos)]
    as_ = [{name: rng.standard_normal((r, d_in)) for name, (_, r, d_in) in shapes.items()} for _ in range(silos)]
    b_phase = aggregation_deviation(bs, [shared_a] * silos, weights, scaling=2.0)
    a_phase = aggregation_deviation([shared_b] * silos, as_, weights, scaling={"q": 2.0, "conv": 0.5})
    fedavg = aggregation_deviation(bs, as_, weights, scaling=2.0)
    assert b_phase <= 1e-13 and a_phase <= 1e-13
    assert fedavg > 1.0
    # Against the literal definition ‖mean(s·B_i·A_i) − s·mean(B)·mean(A)‖.
    w = np.array(weights) / sum(weights)
    want = math.sqrt(
        sum(
            np.sum(
                (
                    sum(wi * 2.0 * b[n] @ a[n] for wi, b, a in zip(w, bs, as_))
                    - 2.0 * sum(wi * b[n] for wi, b in zip(w, bs)) @ sum(wi * a[n] for wi, a in zip(w, as_))
                )
                ** 2
            )
            for n in shapes
        )
    )
    assert fedavg == pytest.approx(want, rel=1e-10)


def test_deviation_known_answers() -> None:
    # Scalars: mean(BA) = (1·2 + 3·4)/2 = 7, mean(B)·mean(A) = 2·3 = 6.
    assert aggregation_deviation([{"x": [[1.0]]}, {"x": [[3.0]]}], [{"x": [[2.0]]}, {"x": [[4.0]]}], [1, 1]) == 1.0
    # Weights 1:3: 0.25·2 + 0.75·12 = 9.5 against 2.5·3.5 = 8.75.
    got = aggregation_deviation([{"x": [[1.0]]}, {"x": [[3.0]]}], [{"x": [[2.0]]}, {"x": [[4.0]]}], [1.0, 3.0])
    assert got == pytest.approx(0.75, rel=1e-15)
    # Rank 1, 2 × 2: mean(BA) = [[0, .5], [.5, 0]], mean(B)·mean(A) = all .25 → ‖·‖ = 0.5;
    # jointly with the first layer scaled by 2 (deviation 2): √(4 + 0.25).
    bs = [{"x": [[1.0]], "y": [[1.0], [0.0]]}, {"x": [[3.0]], "y": [[0.0], [1.0]]}]
    as_ = [{"x": [[2.0]], "y": [[0.0, 1.0]]}, {"x": [[4.0]], "y": [[1.0, 0.0]]}]
    got = aggregation_deviation(bs, as_, [2, 2], scaling={"x": 2.0, "y": 1.0})
    assert got == pytest.approx(math.sqrt(4.25), rel=1e-15)


# ------------------------------------------------------------------- conv shape helpers


def test_conv_matrix_helpers_match_a_conv_lora() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    c_in, c_out, r, k, s = 3, 5, 2, 3, 0.75
    a_w = rng.standard_normal((r, c_in, k, k))
    b_w = rng.standard_normal((c_out, r, 1, 1))
    a, b = to_matrix(a_w, "a"), to_matrix(b_w, LoraPhase.B)
    assert a.shape == (r, c_in * k * k) and b.shape == (c_out, r)
    x = torch.from_numpy(rng.standard_normal((2, c_in, 9, 9)))
    conv2d = torch.nn.functional.conv2d
    lora = conv2d(conv2d(x, torch.from_numpy(a_w), padding=1), torch.from_numpy(b_w)) * s
    layers = {"c": LoraFactors(a=a, b=np.zeros_like(b), scaling=s)}
    dw = product_update(layers, {"c": b}, phase=B)["c"]
    merged = conv2d(x, torch.from_numpy(dw.reshape(c_out, c_in, k, k)), padding=1)
    np.testing.assert_allclose(lora.numpy(), merged.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(from_matrix(a, "a", a_w.shape), a_w)
    np.testing.assert_array_equal(from_matrix(b, "b", b_w.shape), b_w)
    a3 = rng.standard_normal((r, c_in, k, k, k))
    np.testing.assert_array_equal(from_matrix(to_matrix(a3, "a"), "a", a3.shape), a3)
    with pytest.raises(ValueError, match="shape"):
        from_matrix(b, "b", (c_out, r, 3, 3))
    with pytest.raises(ValueError, match="array"):
        to_matrix(rng.standard_normal((c_out, r, 3, 3)), "b")
    with pytest.raises(ValueError, match="kind"):
        to_matrix(a_w, "A")


# ------------------------------------------------------------------------- 5. validation


def _good() -> tuple[dict[str, LoraFactors], dict[str, np.ndarray]]:
    rng = np.random.default_rng(14)
    layers = _random_layers(rng, {"q": (4, 2, 5)})
    return layers, {"q": rng.standard_normal((4, 2))}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"clip_norm": math.inf}, "clip_norm"),
        ({"clip_norm": True}, "clip_norm"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"shares": 0}, "shares"),
        ({"shares": 1.5}, "shares"),
        ({"ridge": -1e-6}, "ridge"),
        ({"ridge": math.inf}, "ridge"),
        ({"phase": "b"}, "phase"),
        ({"rng": 42}, "rng"),
    ],
)
def test_regulate_rejects_bad_arguments(kwargs: dict, field: str) -> None:
    layers, delta = _good()
    args = {"phase": B, "clip_norm": 1.0, "noise_multiplier": 1.0, "rng": np.random.default_rng(0)} | kwargs
    with pytest.raises(ValueError, match=field):
        regulate(layers, delta, **args)


def test_factors_validated() -> None:
    good_a, good_b = np.ones((2, 5)), np.ones((4, 2))
    for kwargs, field in [
        ({"a": np.ones((3, 5))}, "rank"),
        ({"a": np.ones(5)}, "LoraFactors.a"),
        ({"b": np.ones((4, 2), dtype=np.int64)}, "LoraFactors.b"),
        ({"b": np.full((4, 2), np.nan)}, "LoraFactors.b"),
        ({"a": np.ones((0, 5)), "b": np.ones((4, 0))}, "LoraFactors.a"),
        ({"scaling": 0.0}, "scaling"),
        ({"scaling": math.inf}, "scaling"),
    ]:
        with pytest.raises(ValueError, match=field):
            LoraFactors(**({"a": good_a, "b": good_b} | kwargs))
    src = np.ones((2, 5))
    layer = LoraFactors(a=src, b=good_b)
    src[0, 0] = 99.0  # the stored copy is independent and read-only
    assert layer.a[0, 0] == 1.0 and not layer.a.flags.writeable


@pytest.mark.parametrize("func", ["regulate", "clip", "product"])
def test_bad_layers_and_deltas_name_the_layer(func: str) -> None:
    layers, delta = _good()

    def call(lay, dlt, phase=B):
        if func == "regulate":
            rng = np.random.default_rng(0)
            return regulate(lay, dlt, phase=phase, clip_norm=1.0, noise_multiplier=1.0, rng=rng)
        if func == "clip":
            return clip_lora_update(lay, dlt, phase=phase, clip_norm=1.0)
        return product_update(lay, dlt, phase=phase)

    for lay, dlt, pattern in [
        (layers, {}, "missing layer 'q'"),
        (layers, delta | {"k": delta["q"]}, r"delta\['k'\]"),
        (layers, {"q": delta["q"].T}, r"delta\['q'\].*shape"),
        (layers, {"q": np.full((4, 2), np.inf)}, r"delta\['q'\].*NaN or inf"),
        (layers, {"q": delta["q"].astype(np.int32)}, r"delta\['q'\].*floating"),
        (layers, {"q": delta["q"][None]}, r"delta\['q'\].*2-D"),
        ({"q": (np.ones((2, 5)), np.ones((4, 2)))}, delta, r"layers\['q'\]"),
        ([layers["q"]], delta, "layers"),
        (layers, [delta["q"]], "delta"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            call(lay, dlt)
    with pytest.raises(ValueError, match=r"delta\['q'\].*shape"):
        call(layers, delta, phase=A)  # A phase trains A (2 × 5)
    with pytest.raises(ValueError, match="phase"):
        call(layers, delta, phase="B")


def test_deviation_rejects_bad_inputs() -> None:
    b = {"x": np.ones((3, 2))}
    a = {"x": np.ones((2, 4))}
    for args, kwargs, pattern in [
        (([b, b], [a], [1, 1]), {}, "as_"),
        (([b, b], [a, a], [1]), {}, "weights"),
        (([b, b], [a, a], [0, 0]), {}, "weights"),
        (([b, b], [a, a], [1, -1]), {}, r"weights\[1\]"),
        (([b, b], [a, a], [1, math.nan]), {}, r"weights\[1\]"),
        (([], [], []), {}, "bs"),
        ((b, [a], [1]), {}, "bs"),
        (([b, {"y": b["x"]}], [a, a], [1, 1]), {}, r"bs\[1\]"),
        (([b, b], [a, {"x": np.ones((3, 4))}], [1, 1]), {}, r"as_\[1\]\['x'\].*shape"),
        (([b], [{"x": np.ones((3, 4))}], [1]), {}, "layer 'x'"),
        (([b], [{"x": np.full((2, 4), np.nan)}], [1]), {}, r"as_\[0\]\['x'\]"),
        (([b], [a], [1]), {"scaling": 0.0}, "scaling"),
        (([b], [a], [1]), {"scaling": {"y": 1.0}}, "scaling"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            aggregation_deviation(*args, **kwargs)


def test_inputs_are_never_modified_and_outputs_never_alias() -> None:
    rng = np.random.default_rng(15)
    layers = _random_layers(rng, SHAPES)
    for phase in (A, B):
        delta = _random_delta(rng, layers, phase)
        before = copy.deepcopy(delta)
        frozen = {name: (l.a.copy(), l.b.copy()) for name, l in layers.items()}
        outs = [
            regulate(layers, delta, phase=phase, clip_norm=0.1, noise_multiplier=1.0, rng=rng).deltas,
            regulate(layers, delta, phase=phase, clip_norm=1e9, noise_multiplier=0.0).deltas,
            clip_lora_update(layers, delta, phase=phase, clip_norm=0.1)[0],
            clip_lora_update(layers, delta, phase=phase, clip_norm=1e9)[0],
            product_update(layers, delta, phase=phase),
        ]
        for out in outs:
            for arr in out.values():
                arr[...] = 123.0
        for name, l in layers.items():
            np.testing.assert_array_equal(delta[name], before[name])
            np.testing.assert_array_equal(l.a, frozen[name][0])
            np.testing.assert_array_equal(l.b, frozen[name][1])
    bs = [{"x": np.ones((3, 2))}]
    as_ = [{"x": np.ones((2, 4))}]
    aggregation_deviation(bs, as_, [1.0])
    assert np.array_equal(bs[0]["x"], np.ones((3, 2))) and np.array_equal(as_[0]["x"], np.ones((2, 4)))


def test_release_overflow_is_refused() -> None:
    layers = {"l": LoraFactors(a=np.full((1, 3), 1e-3), b=np.zeros((2, 1)))}
    delta = {"l": np.zeros((2, 1), dtype=np.float16)}
    with pytest.raises(ValueError, match=r"delta\['l'\].*float16"):
        regulate(layers, delta, phase=B, clip_norm=100.0, noise_multiplier=10.0, rng=np.random.default_rng(0))
