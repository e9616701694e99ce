"""Noise calibration: the smallest noise multiplier σ whose ε for a whole run meets a target."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fedsilo.privacy.accounting.accountants import Accountant, RdpAccountant
from fedsilo.privacy.accounting.releases import (
    AccountingError,
    Mechanism,
    Neighbouring,
    Release,
    _check_delta,
    _check_positive,
    _is_real,
)

_SIGMA_MIN = 2.0**-5
_SIGMA_MAX = 2.0**14


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant | None = None,
    rtol: float = 1e-4,
    fixed: Sequence[Release] = (),
    upper: float | None = None,
    coarse: Accountant | None = None,
) -> float:
    """The smallest noise multiplier σ whose ε for the whole run is at most the target.

    The run is ``steps`` Poisson-subsampled Gaussian steps with rate ``sample_rate`` (a
    GAUSSIAN release when it is 1). ε falls as σ grows, so σ is bracketed by doubling or
    halving from 1 and then bisected until the bracket is narrower than ``rtol · σ``: the
    result is at most a relative ``rtol`` above the exact smallest σ, and it is always a σ
    the accountant was asked about and answered ε ≤ target for — never one whose ε exceeds
    the target. σ below 2⁻⁵ is never proposed. The neighbouring relation does not change
    the arithmetic, so the same σ serves record- and silo-level runs.

    Args:
        target_epsilon: ε for the whole run, > 0.
        delta: δ, in (0, 1).
        sample_rate: q, in (0, 1].
        steps: Number of steps (≥ 1).
        accountant: Defaults to `RdpAccountant()`; any `Accountant` (e.g. `PrvAccountant`,
            `PldAccountant`, whose tighter ε gives a smaller σ for the same target). A history
            the accountant cannot bound (`AccountingError`) counts as exceeding the target.
        rtol: Relative bisection tolerance on σ, in (0, 0.5].
        fixed: Other releases of the run with their own σ (e.g. pFL-ResFIM's noisy Fisher and
            style bank), composed with the calibrated ones; the target covers them all.
        upper: A σ expected to meet the target, e.g. the RDP-calibrated σ when calibrating
            against the tighter PLD: the search then steps down from it by factors of 0.9
            instead of bracketing from 1 (a few accountant calls instead of a dozen, which
            matters when each costs a second). It is checked like any other σ; one that does
            not meet the target is ignored.
        coarse: A faster accountant whose ε is at least ``accountant``'s, e.g. `PldAccountant`
            on a 10x coarser grid: σ is searched with it first and returned if ``accountant``
            confirms that it meets the target (one call); else the search runs again with
            ``accountant``. Its σ is then at most the coarse grid's slack above the exact one.

    Returns:
        σ.

    Raises:
        ValueError: A bad argument (naming it), or the target is unreachable: even
            σ = 2¹⁴ exceeds it (RDP cannot go below about 0.0035 at δ = 1e-5 on the
            default orders).
    """
    target = _check_positive("target_epsilon", target_epsilon)
    delta = _check_delta(delta)
    if not _is_real(rtol) or not 0.0 < float(rtol) <= 0.5:
        raise ValueError(f"invalid rtol {rtol!r}: must be a number in (0, 0.5]")
    if accountant is None:
        accountant = RdpAccountant()
    elif not isinstance(accountant, Accountant):
        raise ValueError(f"invalid accountant {accountant!r}: must be an Accountant")
    full_batch = _is_real(sample_rate) and sample_rate == 1
    mechanism = Mechanism.GAUSSIAN if full_batch else Mechanism.SUBSAMPLED_GAUSSIAN

    def release(sigma: float) -> Release:
        return Release(
            mechanism=mechanism,
            neighbouring=Neighbouring.RECORD,
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            steps=steps,
        )

    release(1.0)  # validates sample_rate and steps, naming them

    def fits(sigma: float) -> bool:
        try:
            return accountant.epsilon([release(sigma), *fixed], delta=delta).epsilon <= target
        except AccountingError:
            return False

    if coarse is not None:
        found = calibrate_noise(target_epsilon=target, delta=delta, sample_rate=sample_rate, steps=steps,
                                accountant=coarse, rtol=rtol, fixed=fixed, upper=upper)
        if fits(found):
            return found
        upper = found if upper is None else upper
    if upper is not None and _is_real(upper) and _SIGMA_MIN <= float(upper) <= _SIGMA_MAX and fits(float(upper)):
        hi = float(upper)
        while hi * _STEP_DOWN >= _SIGMA_MIN and fits(hi * _STEP_DOWN):
            hi *= _STEP_DOWN
        lo = hi * _STEP_DOWN
        if lo < _SIGMA_MIN:
            return hi
        return _bisect(fits, lo, hi, rtol)
    hi = 1.0
    if not fits(hi):
        lo = hi
        while True:
            hi *= 2.0
            if hi > _SIGMA_MAX:
                raise ValueError(
                    f"invalid target_epsilon {target_epsilon!r}: unreachable at delta={delta}, "
                    f"sample_rate={sample_rate}, steps={steps} even with "
                    f"noise_multiplier={_SIGMA_MAX:g}"
                )
            if fits(hi):
                break
            lo = hi
    else:
        while True:
            lo = hi / 2.0
            if lo < _SIGMA_MIN:
                return hi
            if not fits(lo):
                break
            hi = lo
    return _bisect(fits, lo, hi, rtol)


_STEP_DOWN = 0.9


def _bisect(fits: Callable[[float], bool], lo: float, hi: float, rtol: float) -> float:
    """The smallest σ in (lo, hi] that fits, to a relative ``rtol``: ``lo`` does not fit, ``hi`` does."""
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi
