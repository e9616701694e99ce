"""Tests for silo-level update clipping and noise (privacy/update_noise.py): bounds, statistics, validation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsilo.privacy.update_noise import PrivatizedUpdate, add_gaussian_noise, clip_update, privatize_update

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _scaled(arrays: dict[str, np.ndarray]) -> tuple[float, float]:
    """(m, r) with joint L2 norm m * r, m the largest |value|; computed with math.fsum."""
    flat = [np.abs(a.astype(np.float64)).ravel() for a in arrays.values() if a.size]
    m = max((float(f.max()) for f in flat), default=0.0)
    if m == 0.0:
        return 0.0, 0.0
    return m, math.sqrt(math.fsum(float(x) for f in flat for x in (f / m) ** 2))


def _norm(arrays: dict[str, np.ndarray]) -> float:
    m, r = _scaled(arrays)
    return m * r


def _norm_over(arrays: dict[str, np.ndarray], clip: float) -> float:
    """Joint norm divided by ``clip``, accurate even when the values are subnormal."""
    m, r = _scaled(arrays)
    return 0.0 if m == 0.0 else r / (clip / m)


def _element_values(dtype: np.dtype) -> st.SearchStrategy[float]:
    """Adversarial finite values for a dtype: huge, tiny, subnormal, zero, ordinary."""
    info = np.finfo(dtype)
    return st.one_of(
        st.floats(allow_nan=False, allow_infinity=False, width=info.bits),
        st.sampled_from([0.0, -0.0, float(info.max), -float(info.max), float(info.smallest_subnormal), 1.0, -1.0]),
    )


@st.composite
def updates(draw: st.DrawFn) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i in range(draw(st.integers(min_value=0, max_value=4))):
        dtype = np.dtype(draw(st.sampled_from(["float16", "float32", "float64"])))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
        out[f"t{i}"] = draw(hnp.arrays(dtype, shape, elements=_element_values(dtype)))
    return out


clip_norms = st.one_of(
    st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False),
    st.sampled_from([1e-3, 1.0, 10.0, 5e-324]),
)


# --- clip_update: properties ----------------------------------------------------------------


@SETTINGS
@given(update=updates(), clip=clip_norms)
def test_clipped_norm_is_at_most_c(update, clip) -> None:  # type: ignore[no-untyped-def]
    original = copy.deepcopy(update)
    clipped, norm = clip_update(update, clip_norm=clip)
    assert _norm_over(clipped, clip) <= 1 + 1e-12
    assert norm == pytest.approx(_norm(original), rel=1e-12) or (math.isinf(norm) and math.isinf(_norm(original)))
    assert clipped.keys() == update.keys()
    for name, arr in update.items():
        assert clipped[name].dtype == arr.dtype and clipped[name].shape == arr.shape
        assert clipped[name] is not arr
        np.testing.assert_array_equal(arr, original[name])  # input untouched


@SETTINGS
@given(update=updates(), clip=clip_norms)
def test_update_within_c_is_unchanged(update, clip) -> None:  # type: ignore[no-untyped-def]
    norm = _norm(update)
    # at least the norm plus a margin: this test's float64 norm and clip_update's scaled one may
    # differ in the last bit, and an update at C to the last bit may legitimately be scaled by 1 - 2^-52
    bumped = norm * (1 + 1e-9)
    if not math.isfinite(bumped):
        return
    clip = max(clip, bumped) if norm > 0 else clip
    if not bumped <= clip:
        return
    clipped, _ = clip_update(update, clip_norm=clip)
    for name, arr in update.items():
        np.testing.assert_array_equal(clipped[name], arr)
        assert not np.shares_memory(clipped[name], arr)


@SETTINGS
@given(update=updates(), clip=clip_norms)
def test_clipping_preserves_direction(update, clip) -> None:  # type: ignore[no-untyped-def]
    clipped, norm = clip_update(update, clip_norm=clip)
    if not norm > clip:
        return
    m, r = _scaled(update)
    for name, arr in update.items():
        got = clipped[name].astype(np.float64)
        want = (arr.astype(np.float64) / m) * (clip / r)  # x * C / |x|, without overflow
        info = np.finfo(arr.dtype)
        # Only rounding (toward zero, in the input dtype) separates got from want.
        assert np.all((np.sign(got) == np.sign(arr)) | (got == 0))
        np.testing.assert_allclose(got, want, rtol=4 * float(info.eps), atol=2 * float(info.smallest_subnormal))


def test_clip_known_answer() -> None:
    update = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]], dtype=np.float32)}
    clipped, norm = clip_update(update, clip_norm=1.0)
    assert norm == 5.0
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0])
    np.testing.assert_allclose(clipped["b"], [[0.8]], rtol=1e-7)
    assert clipped["b"].dtype == np.float32


def test_clip_of_huge_values_does_not_overflow() -> None:
    big = np.finfo(np.float64).max
    update = {"w": np.full(16, big)}
    clipped, norm = clip_update(update, clip_norm=2.0)
    assert math.isinf(norm)  # 4 * max does not fit in float64
    np.testing.assert_allclose(clipped["w"], np.full(16, 0.5), rtol=1e-15)


# --- noise: statistics --------------------------------------------------------------------


@pytest.mark.parametrize("shares", [1, 4])
@pytest.mark.parametrize("secure", [False, True])
def test_noise_std_is_sigma_c_over_root_k(shares, secure) -> None:  # type: ignore[no-untyped-def]
    sigma, clip = 1.7, 0.3
    update = {"w": np.zeros((200, 250), dtype=np.float32), "b": np.zeros(10_000)}
    rng = None if secure else np.random.default_rng(0)
    noised = add_gaussian_noise(update, clip_norm=clip, noise_multiplier=sigma, shares=shares, rng=rng)
    assert noised["w"].dtype == np.float32 and noised["b"].dtype == np.float64
    draws = np.concatenate([noised["w"].astype(np.float64).ravel(), noised["b"].ravel()])
    want = sigma * clip / math.sqrt(shares)
    assert abs(draws.std() / want - 1) < 0.02  # 60k draws: relative s.e. of the std ~0.3 %
    assert abs(draws.mean()) < 5 * want / math.sqrt(draws.size)
    # Tails of a Gaussian: ~4.55 % beyond 2 std, ~0.27 % beyond 3 std.
    assert abs(np.mean(np.abs(draws) > 2 * want) - 0.0455) < 0.005
    assert abs(np.mean(np.abs(draws) > 3 * want) - 0.0027) < 0.001
    assert np.all(update["w"] == 0) and np.all(update["b"] == 0)  # input untouched


@pytest.mark.parametrize("secure", [False, True])
def test_k_shares_sum_to_sigma_c(secure) -> None:  # type: ignore[no-untyped-def]
    sigma, clip, k = 0.9, 2.0, 5
    rng = None if secure else np.random.default_rng(1)
    zero = {"w": np.zeros(40_000)}
    shares = [
        add_gaussian_noise(zero, clip_norm=clip, noise_multiplier=sigma, shares=k, rng=rng) for _ in range(k)
    ]
    total = sum(share["w"] for share in shares)
    assert abs(total.std() / (sigma * clip) - 1) < 0.02


def test_noise_is_reproducible_with_a_generator_and_fresh_without() -> None:
    update = {"w": np.ones(100, dtype=np.float32)}

    def run(rng: np.random.Generator | None) -> np.ndarray:
        return add_gaussian_noise(update, clip_norm=1.0, noise_multiplier=1.0, rng=rng)["w"]

    np.testing.assert_array_equal(run(np.random.default_rng(3)), run(np.random.default_rng(3)))
    assert not np.array_equal(run(np.random.default_rng(3)), run(np.random.default_rng(4)))
    assert not np.array_equal(run(None), run(None))


def test_zero_noise_multiplier_adds_nothing() -> None:
    update = {"w": np.arange(5, dtype=np.float32)}
    out = add_gaussian_noise(update, clip_norm=1.0, noise_multiplier=0.0, rng=None)
    np.testing.assert_array_equal(out["w"], update["w"])
    assert not np.shares_memory(out["w"], update["w"])


# --- privatize_update ---------------------------------------------------------------------


def test_privatize_clips_then_noises() -> None:
    update = {"a": np.array([30.0, 40.0]), "b": np.zeros((2, 2), dtype=np.float32)}
    original = copy.deepcopy(update)
    result = privatize_update(update, clip_norm=5.0, noise_multiplier=0.0)
    assert isinstance(result, PrivatizedUpdate)
    assert (result.original_norm, result.clipped, result.noise_std) == (50.0, True, 0.0)
    np.testing.assert_allclose(result.arrays["a"], [3.0, 4.0])
    noisy = privatize_update(update, clip_norm=5.0, noise_multiplier=2.0, shares=4, rng=np.random.default_rng(0))
    assert noisy.noise_std == pytest.approx(2.0 * 5.0 / 2.0)
    assert noisy.arrays["b"].dtype == np.float32
    assert not np.array_equal(noisy.arrays["a"], result.arrays["a"])
    small = privatize_update(update, clip_norm=100.0, noise_multiplier=0.0)
    assert (small.clipped, small.original_norm) == (False, 50.0)
    for name in update:
        np.testing.assert_array_equal(update[name], original[name])
    with pytest.raises(AttributeError):
        result.clipped = False  # type: ignore[misc]


def test_privatized_noise_is_centred_on_the_clipped_update() -> None:
    update = {"w": np.full(50_000, 10.0)}
    result = privatize_update(update, clip_norm=1.0, noise_multiplier=1.0, rng=None)
    clipped_value = 1.0 / math.sqrt(50_000)
    noise = result.arrays["w"] - clipped_value
    assert abs(noise.std() - 1.0) < 0.02
    assert abs(noise.mean()) < 5 / math.sqrt(50_000)


# --- validation ---------------------------------------------------------------------------

GOOD = {"w": np.ones(3)}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"clip_norm": math.nan}, "clip_norm"),
        ({"clip_norm": math.inf}, "clip_norm"),
        ({"clip_norm": True}, "clip_norm"),
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"noise_multiplier": math.inf}, "noise_multiplier"),
        ({"shares": 0}, "shares"),
        ({"shares": 1.5}, "shares"),
        ({"shares": True}, "shares"),
        ({"rng": 42}, "rng"),
    ],
)
@pytest.mark.parametrize("func", ["add", "privatize"])
def test_bad_arguments_are_named(kwargs, field, func) -> None:  # type: ignore[no-untyped-def]
    args = {"clip_norm": 1.0, "noise_multiplier": 1.0, "shares": 2, "rng": np.random.default_rng(0), **kwargs}
    f = add_gaussian_noise if func == "add" else privatize_update
    with pytest.raises(ValueError, match=field):
        f(GOOD, **args)


@pytest.mark.parametrize("bad", [0.0, -2.0, math.nan, math.inf, "1"])
def test_clip_rejects_bad_clip_norm(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update(GOOD, clip_norm=bad)


@pytest.mark.parametrize(
    "value",
    [
        np.array([1.0, np.nan]),
        np.array([np.inf], dtype=np.float32),
        np.array([-np.inf, 0.0], dtype=np.float16),
        np.array([1, 2], dtype=np.int64),
        np.array([1 + 2j]),
    ],
)
@pytest.mark.parametrize("func", ["clip", "add", "privatize"])
def test_bad_values_are_named(value, func) -> None:  # type: ignore[no-untyped-def]
    update = {"fine": np.ones(2), "layer.weight": value}
    before = value.copy()
    with pytest.raises(ValueError, match=r"update\['layer.weight'\]"):
        if func == "clip":
            clip_update(update, clip_norm=1.0)
        elif func == "add":
            add_gaussian_noise(update, clip_norm=1.0, noise_multiplier=1.0, rng=None)
        else:
            privatize_update(update, clip_norm=1.0, noise_multiplier=1.0)
    np.testing.assert_array_equal(value, before)


def test_not_a_mapping_is_rejected() -> None:
    with pytest.raises(ValueError, match="update"):
        clip_update([np.ones(2)], clip_norm=1.0)  # type: ignore[arg-type]


def test_empty_and_zero_updates() -> None:
    assert clip_update({}, clip_norm=1.0) == ({}, 0.0)
    clipped, norm = clip_update({"z": np.zeros((0, 3)), "o": np.zeros(2, np.float32)}, clip_norm=1.0)
    assert norm == 0.0 and clipped["z"].shape == (0, 3) and clipped["o"].dtype == np.float32


def test_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import builtins; real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('torch', 'opacus', 'monai'): raise ImportError(name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import numpy as np\n"
        "from fedsilo.privacy.update_noise import privatize_update\n"
        "privatize_update({'w': np.ones(3)}, clip_norm=1.0, noise_multiplier=1.0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
