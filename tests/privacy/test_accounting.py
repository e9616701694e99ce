"""Tests for privacy accounting (privacy/accounting/): known answers, invariants, validation."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedsilo.privacy.accounting import (
    DEFAULT_RDP_ORDERS,
    INTEGER_RDP_ORDERS,
    AccountingError,
    AccountingMethod,
    DpAccountingVerifier,
    EpsilonResult,
    Mechanism,
    Neighbouring,
    PrvAccountant,
    RdpAccountant,
    Release,
    calibrate_noise,
    check_privacy_config,
)
from accounting_releases import dpsgd as _dpsgd, gaussian as _gaussian

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW_SETTINGS = settings(SETTINGS, max_examples=10)
DELTA = 1e-5
RDP = RdpAccountant()
PRV = PrvAccountant()
VERIFIER = DpAccountingVerifier()


# Issue 4's known answers: (history, ε_RDP at δ = 1e-5, best order on DEFAULT_RDP_ORDERS).
KNOWN = [
    pytest.param([_dpsgd(q=0.04, sigma=1.5, steps=2250)], 7.3291, 3.9, id="q0.04-s1.5-T2250"),
    pytest.param([_dpsgd(q=0.01, sigma=1.1, steps=10_000)], 5.6320, 4.7, id="q0.01-s1.1-T10000"),
    pytest.param([_gaussian(sigma=1.0)], 4.7285, 5.4, id="gaussian-s1"),
]

qs = st.floats(min_value=0.001, max_value=1.0)
small_qs = st.floats(min_value=0.001, max_value=0.2)
# Opacus' fractional-order series converges slowly for q near 0.5 (up to 0.7 s per curve).
practical_qs = st.one_of(small_qs, st.just(1.0))
sigmas = st.floats(min_value=0.6, max_value=4.0)
step_counts = st.integers(min_value=1, max_value=5000)


# --- known answers -------------------------------------------------------------------------


@pytest.mark.parametrize(("history", "expected", "order"), KNOWN)
def test_rdp_reproduces_known_answers(
    history: list[Release], expected: float, order: float
) -> None:
    result = RDP.epsilon(history, delta=DELTA)
    assert result.epsilon == pytest.approx(expected, abs=1e-3)
    assert result.order == order
    assert result.method is AccountingMethod.RDP
    assert result.neighbouring is Neighbouring.RECORD
    assert result.delta == DELTA


@pytest.mark.parametrize(("history", "expected", "order"), KNOWN)
def test_rdp_equals_opacus_default_accountant(
    history: list[Release], expected: float, order: float
) -> None:
    """Our wider grid changes nothing where Opacus' own RDPAccountant finds the optimum."""
    from opacus.accountants import RDPAccountant

    opacus = RDPAccountant()
    opacus.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in history]
    eps, alpha = opacus.get_privacy_spent(delta=DELTA)
    ours = RDP.epsilon(history, delta=DELTA)
    assert ours.epsilon == pytest.approx(eps, rel=1e-12)
    assert ours.order == alpha


def test_default_orders_are_documented_grid() -> None:
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS as google
    from opacus.accountants import RDPAccountant

    assert list(DEFAULT_RDP_ORDERS) == [float(a) for a in google]
    assert set(map(float, RDPAccountant.DEFAULT_ALPHAS)) <= set(DEFAULT_RDP_ORDERS)
    assert INTEGER_RDP_ORDERS == tuple(a for a in DEFAULT_RDP_ORDERS if a == int(a))
    assert RDP.orders == DEFAULT_RDP_ORDERS


@pytest.mark.parametrize(("history", "expected", "order"), KNOWN)
def test_verifier_agrees_on_known_answers(
    history: list[Release], expected: float, order: float
) -> None:
    theirs = VERIFIER.epsilon(history, delta=DELTA)
    ours = RDP.epsilon(history, delta=DELTA)
    assert theirs.method is AccountingMethod.DP_ACCOUNTING_RDP
    assert theirs.epsilon == pytest.approx(expected, abs=1e-3)
    assert abs(theirs.epsilon - ours.epsilon) <= 1e-3
    assert theirs.order == ours.order


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        pytest.param([_dpsgd(q=0.04, sigma=1.5, steps=2250)], 6.7791, id="q0.04-s1.5-T2250"),
        pytest.param([_dpsgd(q=0.01, sigma=1.1, steps=10_000)], 5.2029, id="q0.01-s1.1-T10000"),
        pytest.param([_gaussian(sigma=1.0)], 4.3874, id="gaussian-s1"),
    ],
)
def test_prv_known_answers_below_rdp(history: list[Release], expected: float) -> None:
    prv = PRV.epsilon(history, delta=DELTA)
    rdp = RDP.epsilon(history, delta=DELTA)
    assert prv.method is AccountingMethod.PRV and prv.order is None
    assert prv.epsilon == pytest.approx(expected, abs=1e-3)
    # PRV is the tighter accountant; RDP's slack here is 7-8 %.
    assert 0.85 * rdp.epsilon <= prv.epsilon <= rdp.epsilon


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0])
def test_prv_brackets_exact_gaussian_epsilon(sigma: float) -> None:
    """One Gaussian release: exact ε (Balle & Wang 2018) ≤ PRV's bound ≤ exact + 2·eps_error."""
    from dp_accounting import get_epsilon_gaussian

    exact = get_epsilon_gaussian(sigma, DELTA)
    prv = PRV.epsilon([_gaussian(sigma=sigma)], delta=DELTA).epsilon
    assert exact <= prv <= exact + 0.02
    assert prv < RDP.epsilon([_gaussian(sigma=sigma)], delta=DELTA).epsilon


def test_prv_matches_opacus_prv_accountant() -> None:
    from opacus.accountants import PRVAccountant

    history = [_dpsgd(q=0.05, sigma=1.2, steps=300), _gaussian(sigma=3.0, steps=2)]
    opacus = PRVAccountant()
    opacus.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in history]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = opacus.get_epsilon(DELTA)
    assert PRV.epsilon(history, delta=DELTA).epsilon == pytest.approx(expected, rel=1e-9)


def test_prv_refuses_oversized_grid_instead_of_exhausting_memory() -> None:
    # ε_RDP ≈ 400: the PRV grid would need ~10^8 points.
    with pytest.raises(AccountingError, match="max_points"):
        PRV.epsilon([_dpsgd(q=0.5, sigma=0.3, steps=10_000)], delta=DELTA)
    with pytest.raises(AccountingError, match="max_points"):
        PrvAccountant(max_points=1000).epsilon([_dpsgd(q=0.04, sigma=1.5, steps=2250)], delta=DELTA)


# --- the independent verifier ---------------------------------------------------------------


def test_conversions_are_the_same_bound() -> None:
    """Opacus' get_privacy_spent and dp_accounting's compute_epsilon agree on any curve."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = list(DEFAULT_RDP_ORDERS)
    for release in (_dpsgd(q=0.04, sigma=1.5, steps=2250), _gaussian(sigma=0.8, steps=7)):
        curve = RDP.rdp([release])
        for delta in (1e-3, 1e-5, 1e-9):
            ours, our_order = get_privacy_spent(orders=orders, rdp=curve, delta=delta)
            theirs, their_order = compute_epsilon(orders, curve, delta)
            assert ours == pytest.approx(theirs, rel=1e-12)
            assert our_order == their_order


@SETTINGS
@given(q=qs, sigma=sigmas, steps=step_counts, extra=st.integers(min_value=0, max_value=3))
def test_verifier_exact_on_integer_orders(q: float, sigma: float, steps: int, extra: int) -> None:
    history = [_dpsgd(q=q, sigma=sigma, steps=steps)] + [_gaussian(sigma=2 * sigma)] * extra
    ours = RdpAccountant(orders=INTEGER_RDP_ORDERS).epsilon(history, delta=DELTA)
    theirs = DpAccountingVerifier(orders=INTEGER_RDP_ORDERS).epsilon(history, delta=DELTA)
    assert theirs.epsilon == pytest.approx(ours.epsilon, rel=1e-9, abs=1e-12)


@SETTINGS
@given(q=practical_qs, sigma=sigmas, steps=step_counts)
def test_verifier_never_below_rdp_on_default_orders(q: float, sigma: float, steps: int) -> None:
    history = [_dpsgd(q=q, sigma=sigma, steps=steps)]
    theirs = VERIFIER.epsilon(history, delta=DELTA).epsilon
    ours = RDP.epsilon(history, delta=DELTA).epsilon
    assert theirs >= ours - 1e-9 * max(1.0, ours)


@SETTINGS
@given(
    sigma=st.floats(min_value=0.3, max_value=50.0), steps=st.integers(min_value=1, max_value=500)
)
def test_verifier_exact_for_gaussian_releases(sigma: float, steps: int) -> None:
    history = [_gaussian(sigma=sigma, steps=steps, relation=Neighbouring.SILO)]
    theirs = VERIFIER.epsilon(history, delta=DELTA)
    ours = RDP.epsilon(history, delta=DELTA)
    assert theirs.epsilon == pytest.approx(ours.epsilon, rel=1e-9, abs=1e-12)
    assert theirs.neighbouring is Neighbouring.SILO


# --- invariants -------------------------------------------------------------------------------


@SLOW_SETTINGS
@given(
    target=st.floats(min_value=0.5, max_value=20.0),
    q=practical_qs,
    steps=st.integers(min_value=1, max_value=3000),
)
def test_calibrated_sigma_meets_target_and_is_minimal(target: float, q: float, steps: int) -> None:
    rtol = 1e-3
    sigma = calibrate_noise(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, rtol=rtol
    )
    mechanism = Mechanism.GAUSSIAN if q == 1.0 else Mechanism.SUBSAMPLED_GAUSSIAN

    def eps(s: float) -> float:
        release = Release(
            mechanism=mechanism,
            neighbouring=Neighbouring.RECORD,
            noise_multiplier=s,
            sample_rate=q,
            steps=steps,
        )
        return RDP.epsilon([release], delta=DELTA).epsilon

    assert eps(sigma) <= target
    if sigma > 2.0**-5:
        assert eps(sigma * (1 - rtol)) > target


def test_calibrate_with_prv_accountant() -> None:
    sigma = calibrate_noise(
        target_epsilon=2.0, delta=DELTA, sample_rate=0.05, steps=200, accountant=PRV, rtol=1e-3
    )
    assert PRV.epsilon([_dpsgd(q=0.05, sigma=sigma, steps=200)], delta=DELTA).epsilon <= 2.0
    # PRV is tighter, so it needs less noise than RDP for the same target.
    assert sigma < calibrate_noise(target_epsilon=2.0, delta=DELTA, sample_rate=0.05, steps=200)


def test_calibrate_refuses_unreachable_target() -> None:
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise(target_epsilon=1e-3, delta=DELTA, sample_rate=0.01, steps=10)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": math.nan}, "target_epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"rtol": 0.0}, "rtol"),
    ],
)
def test_calibrate_rejects_bad_arguments(kwargs: dict[str, float], field: str) -> None:
    args = {"target_epsilon": 1.0, "delta": DELTA, "sample_rate": 0.01, "steps": 100} | kwargs
    with pytest.raises(ValueError, match=field):
        calibrate_noise(**args)


@SETTINGS
@given(q=practical_qs, sigma=sigmas, steps=step_counts, more=step_counts)
def test_epsilon_non_decreasing_in_steps(q: float, sigma: float, steps: int, more: int) -> None:
    fewer = RDP.epsilon([_dpsgd(q=q, sigma=sigma, steps=steps)], delta=DELTA).epsilon
    longer = RDP.epsilon([_dpsgd(q=q, sigma=sigma, steps=steps + more)], delta=DELTA).epsilon
    assert longer >= fewer


@SLOW_SETTINGS
@given(q1=qs, q2=qs, sigma=sigmas, steps=step_counts)
def test_epsilon_non_decreasing_in_sample_rate(
    q1: float, q2: float, sigma: float, steps: int
) -> None:
    low, high = sorted((q1, q2))
    e_low = RDP.epsilon([_dpsgd(q=low, sigma=sigma, steps=steps)], delta=DELTA).epsilon
    e_high = RDP.epsilon([_dpsgd(q=high, sigma=sigma, steps=steps)], delta=DELTA).epsilon
    assert e_high >= e_low * (1 - 1e-9)


@SETTINGS
@given(q=practical_qs, s1=sigmas, s2=sigmas, steps=step_counts)
def test_epsilon_non_increasing_in_sigma(q: float, s1: float, s2: float, steps: int) -> None:
    assume(abs(s1 - s2) > 1e-6)
    low, high = sorted((s1, s2))
    e_low = RDP.epsilon([_dpsgd(q=q, sigma=low, steps=steps)], delta=DELTA).epsilon
    e_high = RDP.epsilon([_dpsgd(q=q, sigma=high, steps=steps)], delta=DELTA).epsilon
    assert e_high <= e_low


@SETTINGS
@given(q=practical_qs, sigma=sigmas, n1=step_counts, n2=step_counts)
def test_split_release_composes_like_one(q: float, sigma: float, n1: int, n2: int) -> None:
    split = [_dpsgd(q=q, sigma=sigma, steps=n1), _dpsgd(q=q, sigma=sigma, steps=n2)]
    whole = [_dpsgd(q=q, sigma=sigma, steps=n1 + n2)]
    np.testing.assert_allclose(RDP.rdp(split), RDP.rdp(whole), rtol=1e-12)
    assert RDP.epsilon(split, delta=DELTA).epsilon == pytest.approx(
        RDP.epsilon(whole, delta=DELTA).epsilon, rel=1e-12
    )


@SETTINGS
@given(
    releases=st.lists(
        st.builds(
            lambda q, sigma, steps, full: _gaussian(sigma=sigma, steps=steps)
            if full
            else _dpsgd(q=q, sigma=sigma, steps=steps),
            small_qs,
            sigmas,
            st.integers(min_value=1, max_value=500),
            st.booleans(),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_history_curve_is_sum_of_release_curves(releases: list[Release]) -> None:
    total = sum(RDP.rdp([r]) for r in releases)
    np.testing.assert_allclose(RDP.rdp(releases), total, rtol=1e-12)
    np.testing.assert_allclose(RDP.rdp(releases[::-1]), total, rtol=1e-12)
    eps = RDP.epsilon(releases, delta=DELTA).epsilon
    assert eps >= max(RDP.epsilon([r], delta=DELTA).epsilon for r in releases)
    assert eps <= sum(RDP.epsilon([r], delta=DELTA).epsilon for r in releases) + 1e-9


def test_prv_composition_matches_single_release() -> None:
    split = [_dpsgd(q=0.04, sigma=1.5, steps=1000), _dpsgd(q=0.04, sigma=1.5, steps=1250)]
    whole = [_dpsgd(q=0.04, sigma=1.5, steps=2250)]
    assert PRV.epsilon(split, delta=DELTA).epsilon == pytest.approx(
        PRV.epsilon(whole, delta=DELTA).epsilon, abs=1e-9
    )


@pytest.mark.parametrize("accountant", [RDP, PRV, VERIFIER], ids=lambda a: type(a).__name__)
def test_empty_history_costs_nothing(accountant) -> None:
    result = accountant.epsilon([], delta=DELTA)
    assert result.epsilon == 0.0
    assert result.order is None and result.neighbouring is None


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", [RDP, PRV, VERIFIER], ids=lambda a: type(a).__name__)
def test_mixed_neighbouring_relations_raise(accountant) -> None:
    history = [
        _dpsgd(q=0.01, sigma=1.0, steps=10, relation=Neighbouring.RECORD),
        _gaussian(sigma=1.0, relation=Neighbouring.SILO),
    ]
    with pytest.raises(ValueError, match="RECORD, SILO"):
        accountant.epsilon(history, delta=DELTA)


def test_silo_history_is_accounted_like_record_history() -> None:
    record = [_gaussian(sigma=1.3, steps=4)]
    silo = [_gaussian(sigma=1.3, steps=4, relation=Neighbouring.SILO)]
    assert RDP.epsilon(silo, delta=DELTA).epsilon == RDP.epsilon(record, delta=DELTA).epsilon
    assert RDP.epsilon(silo, delta=DELTA).neighbouring is Neighbouring.SILO


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan, "1e-5", True])
def test_epsilon_rejects_bad_delta(delta: object) -> None:
    with pytest.raises(ValueError, match="delta"):
        RDP.epsilon([_gaussian(sigma=1.0)], delta=delta)


def test_history_rejects_non_release() -> None:
    with pytest.raises(ValueError, match=r"history\[1\]"):
        RDP.epsilon([_gaussian(sigma=1.0), (1.0, 0.5, 3)], delta=DELTA)


_GOOD_RELEASE = {
    "mechanism": Mechanism.SUBSAMPLED_GAUSSIAN,
    "neighbouring": Neighbouring.RECORD,
    "noise_multiplier": 1.0,
    "sample_rate": 0.01,
    "steps": 10,
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mechanism", "gaussian"),
        ("neighbouring", "record"),
        ("noise_multiplier", 0.0),
        ("noise_multiplier", -1.0),
        ("noise_multiplier", math.nan),
        ("noise_multiplier", math.inf),
        ("noise_multiplier", "1.0"),
        ("sample_rate", 0.0),
        ("sample_rate", 1.01),
        ("sample_rate", math.nan),
        ("steps", 0),
        ("steps", 1.5),
        ("steps", True),
    ],
)
def test_release_rejects_bad_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"invalid {field} "):
        Release(**(_GOOD_RELEASE | {field: value}))


def test_gaussian_release_must_be_full_batch() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        Release(**(_GOOD_RELEASE | {"mechanism": Mechanism.GAUSSIAN, "sample_rate": 0.5}))


def test_release_is_frozen_keyword_only_and_normalised() -> None:
    release = Release(**(_GOOD_RELEASE | {"steps": np.int64(7), "noise_multiplier": np.float32(2)}))
    assert type(release.steps) is int and type(release.noise_multiplier) is float
    with pytest.raises(AttributeError):
        release.steps = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        Release(Mechanism.GAUSSIAN, Neighbouring.RECORD, 1.0, 1.0, 1)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [("epsilon", -0.1), ("epsilon", math.nan), ("delta", 0.0), ("order", 1.0), ("method", "rdp")],
)
def test_epsilon_result_rejects_bad_field(field: str, value: object) -> None:
    good = {
        "epsilon": 1.0,
        "delta": DELTA,
        "method": AccountingMethod.RDP,
        "neighbouring": Neighbouring.RECORD,
        "order": 4.0,
    }
    with pytest.raises(ValueError, match=f"invalid {field} "):
        EpsilonResult(**(good | {field: value}))


_GOOD_CONFIG = {
    "epsilon": 8.0,
    "delta": 1e-5,
    "noise_multiplier": 1.1,
    "clip_norm": 1.0,
    "dataset_size": 1000,
}


def test_good_privacy_config_passes() -> None:
    check_privacy_config(**_GOOD_CONFIG)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epsilon", 0.0),
        ("epsilon", -1.0),
        ("epsilon", math.inf),
        ("delta", 0.0),
        ("delta", -1e-6),
        ("delta", 1e-3),  # = 1/n
        ("delta", 0.5),
        ("noise_multiplier", 0.0),
        ("noise_multiplier", -0.5),
        ("clip_norm", 0.0),
        ("clip_norm", -1.0),
        ("clip_norm", math.nan),
        ("dataset_size", 0),
    ],
)
def test_bad_privacy_config_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"invalid {field} {value!r}"):
        check_privacy_config(**(_GOOD_CONFIG | {field: value}))


def test_privacy_config_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        check_privacy_config(8.0, 1e-5, 1.1, 1.0, 1000)  # type: ignore[misc]


def test_import_does_not_load_torch() -> None:
    code = (
        "import sys\n"
        "import fedsilo.privacy.accounting as a\n"
        "a.check_privacy_config(epsilon=1.0, delta=1e-5, noise_multiplier=1.0, clip_norm=1.0,"
        " dataset_size=100)\n"
        "loaded = [m for m in ('torch', 'opacus', 'dp_accounting') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
