"""The one-run ε lower bound of Steinke, Nasr & Jagielski 2023 from canary guesses (float64, torch-free)."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GuessCounts",
    "OneRunBound",
    "count_guesses",
    "epsilon_lower_bound",
    "guess_from_scores",
    "one_run_audit",
    "p_value",
]

#: Bisection steps of `epsilon_lower_bound` on a bracket of width <= its upper end (the paper
#: uses 30; 60 takes the bracket below float64 resolution for ε up to ~1e3).
_BISECTION_STEPS = 60
_MAX_EPSILON = 1e3


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_counts(m: object, r: object, v: object) -> tuple[int, int, int]:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if not _is_int(value) or int(value) < 0:  # type: ignore[arg-type]
            raise ValueError(f"invalid {name} {value!r}: must be an integer >= 0")
    m, r, v = int(m), int(r), int(v)  # type: ignore[arg-type]
    if not v <= r <= m:
        raise ValueError(f"invalid counts m={m}, r={r}, v={v}: need 0 <= v <= r <= m")
    return m, r, v


def _check_delta(delta: object) -> float:
    if not _is_real(delta) or not 0.0 <= float(delta) < 1.0:  # type: ignore[arg-type]
        raise ValueError(f"invalid delta {delta!r}: must be a number in [0, 1)")
    return float(delta)  # type: ignore[arg-type]


def _check_beta(beta: object) -> float:
    if not _is_real(beta) or not 0.0 < float(beta) < 1.0:  # type: ignore[arg-type]
        raise ValueError(f"invalid beta {beta!r}: must be a number in (0, 1) (1 - confidence)")
    return float(beta)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=64)
def _log_choose(r: int) -> np.ndarray:
    """log C(r, k) for k = 0..r (read-only)."""
    log_factorial = np.array([math.lgamma(k + 1.0) for k in range(r + 1)], dtype=np.float64)
    out = log_factorial[r] - log_factorial - log_factorial[::-1]
    out.setflags(write=False)
    return out


def _binomial_pmf(r: int, epsilon: float) -> np.ndarray:
    """P[Binomial(r, e^ε/(1+e^ε)) = k] for k = 0..r, in float64 via log-space terms."""
    k = np.arange(r + 1, dtype=np.float64)
    log_q = -math.log1p(math.exp(-epsilon))  # log(e^ε / (1 + e^ε))
    log_1mq = -math.log1p(math.exp(epsilon)) if epsilon < 700.0 else -epsilon  # log(1 / (1 + e^ε))
    return np.exp(_log_choose(r) + k * log_q + (r - k) * log_1mq)


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The largest probability of at least ``v`` correct guesses out of ``r`` under (ε, δ)-DP.

    Steinke, Nasr & Jagielski 2023 ("Privacy Auditing with One (1) Training Run", NeurIPS),
    main theorem for (ε, δ)-DP (Theorem 3.1 of arXiv:2305.08846): with m canaries each
    included independently with probability ½ and guesses on r of them,

        P[W >= v] <= f(v) + 2·m·δ · max_{1<=i<=v} (f(v - i) - f(v)) / i,

    where W is the number of correct guesses and f(v) = P[Binomial(r, e^ε/(e^ε+1)) >= v]
    (randomized response is the worst case). Computed in float64, capped at 1.

    Args:
        m: Canaries (each in or out with probability ½), >= r.
        r: Guesses made (abstentions excluded), >= v.
        v: Correct guesses, >= 0.
        epsilon: ε >= 0 of the null hypothesis.
        delta: δ in [0, 1) of the null hypothesis.

    Returns:
        The p-value in [0, 1].

    Raises:
        ValueError: On counts outside 0 <= v <= r <= m, a negative or non-finite ε, or a bad δ.
    """
    m, r, v = _check_counts(m, r, v)
    delta = _check_delta(delta)
    if not _is_real(epsilon) or not 0.0 <= float(epsilon) < math.inf:
        raise ValueError(f"invalid epsilon {epsilon!r}: must be a finite number >= 0")
    pmf = _binomial_pmf(r, float(epsilon))
    tail = math.fsum(pmf[v:].tolist())  # f(v)
    # (f(v - i) - f(v)) / i = P[v - i <= Binomial < v] / i, for i = 1..v
    below = np.cumsum(pmf[:v][::-1])
    alpha = float(np.max(below / np.arange(1, v + 1))) if v > 0 else 0.0
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, beta: float = 0.05) -> float:
    """ε̂: the ε lower bound at confidence 1 - β from ``v`` correct guesses out of ``r``.

    The search of Steinke, Nasr & Jagielski 2023 (their code for the ε lower bound, with
    `p_value` as the bound): keep ``lo`` with p(lo) < β (starting at 0) and ``hi`` with
    p(hi) >= β (starting at 1, raised by 1 until it holds), then bisect. If p(0) >= β the
    guesses prove nothing and ε̂ = 0. A mechanism that is (ε, δ)-DP gives ε̂ > ε with
    probability at most β.

    Args:
        m: Canaries.
        r: Guesses.
        v: Correct guesses.
        delta: δ of the claim being audited, in [0, 1).
        beta: 1 - confidence, in (0, 1).

    Returns:
        ε̂ >= 0 (float64).

    Raises:
        ValueError: On bad counts, δ or β.
    """
    m, r, v = _check_counts(m, r, v)
    delta = _check_delta(delta)
    beta = _check_beta(beta)
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        hi += 1.0
        if hi > _MAX_EPSILON:  # pragma: no cover - p -> 1 as ε grows for every v <= r
            raise ValueError(f"no ε up to {_MAX_EPSILON} explains {v} of {r} correct guesses")
    for _ in range(_BISECTION_STEPS):
        middle = (lo + hi) / 2.0
        if p_value(m, r, v, middle, delta) < beta:
            lo = middle
        else:
            hi = middle
    return lo


def guess_from_scores(scores: Sequence[float] | np.ndarray, *, k_plus: int, k_minus: int) -> np.ndarray:
    """Guesses "in" (+1) for the ``k_plus`` highest scores, "out" (-1) for the ``k_minus`` lowest.

    The rest are abstentions (0), as in Steinke, Nasr & Jagielski 2023, Algorithm 1. Ties are
    broken by position (a stable sort), never by the secret.

    Args:
        scores: One finite score per canary; higher means "more likely included".
        k_plus: Guesses "in", >= 0.
        k_minus: Guesses "out", >= 0; ``k_plus + k_minus`` at most the number of canaries.

    Returns:
        int8 array of -1, 0, +1, one per canary.

    Raises:
        ValueError: On non-finite scores or bad guess counts.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ValueError("invalid scores: must be a 1-D sequence of finite numbers")
    for name, k in (("k_plus", k_plus), ("k_minus", k_minus)):
        if not _is_int(k) or int(k) < 0:
            raise ValueError(f"invalid {name} {k!r}: must be an integer >= 0")
    if k_plus + k_minus > values.size:
        raise ValueError(
            f"invalid k_plus + k_minus = {k_plus + k_minus}: more guesses than the {values.size} canaries"
        )
    order = np.argsort(values, kind="stable")
    guesses = np.zeros(values.size, dtype=np.int8)
    guesses[order[values.size - k_plus:]] = 1
    guesses[order[:k_minus]] = -1
    return guesses


@dataclass(frozen=True, kw_only=True)
class GuessCounts:
    """How the auditor's guesses fared.

    Attributes:
        canaries: m, the number of canaries.
        guesses: r, guesses made (abstentions excluded).
        correct: v, correct guesses.
    """

    canaries: int
    guesses: int
    correct: int

    def __post_init__(self) -> None:
        _check_counts(self.canaries, self.guesses, self.correct)


def count_guesses(guesses: np.ndarray, included: np.ndarray) -> GuessCounts:
    """Counts guesses and correct ones against the secret inclusion bits.

    Args:
        guesses: -1 / 0 / +1 per canary (from `guess_from_scores`).
        included: bool per canary, the secret.

    Returns:
        The counts.
    """
    guesses = np.asarray(guesses)
    included = np.asarray(included, dtype=bool)
    if guesses.shape != included.shape or guesses.ndim != 1:
        raise ValueError(f"guesses {guesses.shape} and included {included.shape} must be equal 1-D shapes")
    if not np.isin(guesses, (-1, 0, 1)).all():
        raise ValueError("invalid guesses: every guess must be -1, 0 or +1")
    truth = np.where(included, 1, -1)
    return GuessCounts(
        canaries=int(guesses.size),
        guesses=int(np.count_nonzero(guesses)),
        correct=int(np.count_nonzero(guesses == truth)),
    )


@dataclass(frozen=True, kw_only=True)
class OneRunBound:
    """The best of the auditor's tries, with what it takes to recompute ε̂.

    Attributes:
        counts: m, r and v of the best try.
        k_plus: Its "in" guesses.
        k_minus: Its "out" guesses.
        delta: δ of the audited claim.
        confidence: Overall confidence, e.g. 0.95.
        tries: How many (k_plus, k_minus) choices were tried; each is tested at
            β = (1 - confidence) / tries (Bonferroni), so the best of them still holds at
            the overall confidence.
        epsilon_lower: ε̂ of the best try.
    """

    counts: GuessCounts
    k_plus: int
    k_minus: int
    delta: float
    confidence: float
    tries: int
    epsilon_lower: float

    @property
    def beta(self) -> float:
        """β of each try: (1 - confidence) / tries."""
        return (1.0 - self.confidence) / self.tries


def one_run_audit(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    guess_sizes: Sequence[tuple[int, int]],
    delta: float,
    confidence: float = 0.95,
) -> OneRunBound:
    """Scores to ε̂: guess for each (k_plus, k_minus), keep the largest ε̂ (Bonferroni-corrected).

    Args:
        scores: One finite score per canary (higher: more likely included).
        included: The secret inclusion bit of each canary.
        guess_sizes: The (k_plus, k_minus) choices to try, at least one.
        delta: δ of the claim being audited.
        confidence: Overall confidence in (0, 1).

    Returns:
        The best try.

    Raises:
        ValueError: On bad scores, bits, sizes, δ or confidence.
    """
    if not _is_real(confidence) or not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"invalid confidence {confidence!r}: must be a number in (0, 1)")
    sizes = list(guess_sizes)
    if not sizes:
        raise ValueError("invalid guess_sizes: give at least one (k_plus, k_minus)")
    beta = (1.0 - float(confidence)) / len(sizes)
    best: OneRunBound | None = None
    for k_plus, k_minus in sizes:
        counts = count_guesses(guess_from_scores(scores, k_plus=k_plus, k_minus=k_minus), np.asarray(included))
        eps = epsilon_lower_bound(counts.canaries, counts.guesses, counts.correct, delta=delta, beta=beta)
        if best is None or eps > best.epsilon_lower:
            best = OneRunBound(counts=counts, k_plus=int(k_plus), k_minus=int(k_minus), delta=float(delta),
                               confidence=float(confidence), tries=len(sizes), epsilon_lower=eps)
    assert best is not None
    return best
