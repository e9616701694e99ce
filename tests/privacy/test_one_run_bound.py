"""The one-run ε lower bound (Steinke, Nasr & Jagielski 2023) against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.privacy.audit.one_run import (
    count_guesses,
    epsilon_lower_bound,
    guess_from_scores,
    one_run_audit,
    p_value,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The paper's bound written another way: scipy's binomial tail and a direct max over i."""
    q = math.exp(epsilon) / (1.0 + math.exp(epsilon))
    f = lambda t: float(scipy.stats.binom.sf(t - 1, r, q))  # noqa: E731 - P[Binomial(r, q) >= t]
    alpha = max(((f(v - i) - f(v)) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, f(v) + 2.0 * m * delta * alpha)


# (m, r, v, δ, β) -> ε̂, computed with `reference_p_value` and a 60-step bisection of the paper's form
# (lo = 0 with p(lo) < β, hi raised from 1 by 1 until p(hi) >= β), not with the module under test.
KNOWN = [
    ((1000, 100, 100, 1e-5, 0.05), 3.4653763478110453),
    ((1000, 500, 500, 1e-5, 0.0125), 4.6783739541176645),
    ((1000, 500, 400, 1e-5, 0.05), 1.1979686462773707),
    ((1000, 200, 150, 1e-5, 0.05), 0.8199729121699937),
    ((100, 100, 100, 0.0, 0.05), 3.4929654311522937),
    ((10000, 1000, 900, 1e-6, 0.05), 2.0206455958654317),
    ((1000, 50, 30, 1e-5, 0.05), 0.0),
]


@pytest.mark.parametrize(("args", "expected"), KNOWN)
def test_known_answers(args: tuple, expected: float) -> None:
    m, r, v, delta, beta = args
    assert epsilon_lower_bound(m, r, v, delta=delta, beta=beta) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("r", [1, 10, 100, 1000])
@pytest.mark.parametrize("beta", [0.05, 0.01])
def test_closed_form_with_all_guesses_right_and_no_delta(r: int, beta: float) -> None:
    # δ = 0, v = r: p(ε) = (e^ε/(1+e^ε))^r, so p = β at ε = log(b/(1-b)) with b = β^(1/r) (0 if negative:
    # one guess can never be significant at β < ½).
    b = beta ** (1.0 / r)
    expected = max(0.0, math.log(b / (1.0 - b)))
    assert epsilon_lower_bound(r, r, r, delta=0.0, beta=beta) == pytest.approx(expected, abs=1e-9)


@st.composite
def counts(draw: st.DrawFn) -> tuple[int, int, int]:
    r = draw(st.integers(1, 400))
    v = draw(st.integers(0, r))
    m = draw(st.integers(r, 4 * r))
    return m, r, v


@SETTINGS
@given(counts(), st.floats(0.0, 8.0), st.sampled_from([0.0, 1e-6, 1e-5, 1e-3]))
def test_p_value_matches_the_reference(c: tuple[int, int, int], epsilon: float, delta: float) -> None:
    m, r, v = c
    assert p_value(m, r, v, epsilon, delta) == pytest.approx(reference_p_value(m, r, v, epsilon, delta),
                                                              rel=1e-9, abs=1e-13)


@SETTINGS
@given(counts(), st.sampled_from([0.0, 1e-5]), st.sampled_from([0.05, 0.01]))
def test_bound_sits_where_the_reference_p_value_crosses_beta(c: tuple[int, int, int], delta: float,
                                                             beta: float) -> None:
    m, r, v = c
    eps = epsilon_lower_bound(m, r, v, delta=delta, beta=beta)
    if eps == 0.0:
        assert reference_p_value(m, r, v, 0.0, delta) >= beta * (1 - 1e-9)
    else:
        assert reference_p_value(m, r, v, eps, delta) < beta * (1 + 1e-9)
        assert reference_p_value(m, r, v, eps + 1e-6, delta) >= beta * (1 - 1e-9)


@SETTINGS
@given(counts(), st.sampled_from([0.0, 1e-5]))
def test_more_correct_guesses_never_lower_the_bound(c: tuple[int, int, int], delta: float) -> None:
    m, r, v = c
    if v < r:
        assert epsilon_lower_bound(m, r, v + 1, delta=delta) >= epsilon_lower_bound(m, r, v, delta=delta)


@SETTINGS
@given(counts())
def test_guesses_at_chance_prove_nothing(c: tuple[int, int, int]) -> None:
    m, r, _ = c
    assert epsilon_lower_bound(m, r, r // 2, delta=1e-5) == 0.0


@SETTINGS
@given(counts())
def test_larger_delta_or_confidence_never_raise_the_bound(c: tuple[int, int, int]) -> None:
    m, r, v = c
    base = epsilon_lower_bound(m, r, v, delta=1e-6, beta=0.05)
    assert epsilon_lower_bound(m, r, v, delta=1e-3, beta=0.05) <= base + 1e-12
    assert epsilon_lower_bound(m, r, v, delta=1e-6, beta=0.01) <= base + 1e-12


def test_monte_carlo_randomized_response_exceeds_its_epsilon_rarely() -> None:
    # ε0-DP randomized response on r canaries: W ~ Binomial(r, e^ε0/(1+e^ε0)). With δ = 0 the bound is
    # tight for it, so P[ε̂ > ε0] must be at most β (up to Monte-Carlo error), and close to it.
    r, eps0, beta, trials = 200, 1.0, 0.05, 20000
    bound = np.array([epsilon_lower_bound(r, r, v, delta=0.0, beta=beta) for v in range(r + 1)])
    wins = np.random.default_rng(7).binomial(r, math.exp(eps0) / (1 + math.exp(eps0)), size=trials)
    rate = float(np.mean(bound[wins] > eps0))
    assert rate <= beta + 3 * math.sqrt(beta * (1 - beta) / trials)
    assert rate >= beta / 4  # the bound is not vacuous either


def test_guesses_take_the_top_and_bottom_scores() -> None:
    scores = np.array([0.5, 3.0, -2.0, 1.0, -1.0, 2.0])
    assert guess_from_scores(scores, k_plus=2, k_minus=1).tolist() == [0, 1, -1, 0, 0, 1]
    included = np.array([False, True, False, True, True, True])
    assert count_guesses(guess_from_scores(scores, k_plus=2, k_minus=2), included).correct == 3


def test_audit_tries_every_size_and_splits_beta() -> None:
    rng = np.random.default_rng(3)
    included = rng.random(1000) < 0.5
    scores = included + 0.3 * rng.standard_normal(1000)
    best = one_run_audit(scores, included, guess_sizes=[(25, 25), (50, 50), (250, 250)], delta=1e-5)
    assert best.tries == 3 and best.beta == pytest.approx(0.05 / 3)
    assert best.epsilon_lower == pytest.approx(epsilon_lower_bound(
        1000, best.counts.guesses, best.counts.correct, delta=1e-5, beta=0.05 / 3))
    for k in (25, 50, 250):
        single = one_run_audit(scores, included, guess_sizes=[(k, k)], delta=1e-5, confidence=1 - 0.05 / 3)
        assert single.epsilon_lower <= best.epsilon_lower + 1e-12


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: epsilon_lower_bound(10, 11, 5, delta=1e-5), "r=11"),
        (lambda: epsilon_lower_bound(10, 5, -1, delta=1e-5), "invalid v -1"),
        (lambda: epsilon_lower_bound(10, 5, 5, delta=1.5), "invalid delta 1.5"),
        (lambda: epsilon_lower_bound(10, 5, 5, delta=1e-5, beta=0.0), "invalid beta 0.0"),
        (lambda: p_value(10, 5, 5, -1.0, 1e-5), "invalid epsilon -1.0"),
        (lambda: guess_from_scores([1.0, math.nan], k_plus=1, k_minus=0), "finite"),
        (lambda: guess_from_scores([1.0, 2.0], k_plus=2, k_minus=1), r"k_plus \+ k_minus = 3"),
        (lambda: one_run_audit([1.0], [True], guess_sizes=[], delta=1e-5), "guess_sizes"),
        (lambda: one_run_audit([1.0], [True], guess_sizes=[(1, 0)], delta=1e-5, confidence=1.0),
         "invalid confidence 1.0"),
    ],
)
def test_bad_input_is_named(call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        call()
