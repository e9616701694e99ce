"""Every ε of an audit report recomputed from the stored releases: RDP and PLD by dp_accounting, PLD
cross-checked against Opacus' PRV accountant where torch is installed."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedsilo.privacy.accounting import (
    LEDGER_RDP_ORDERS,
    Accountant,
    AccountingError,
    DpAccountingVerifier,
    Mechanism,
    Neighbouring,
    PldAccountant,
    PrvAccountant,
    Release,
)
from fedsilo.privacy.audit.report import AuditError, _Silo
from fedsilo.privacy.ledger import GuaranteeScope, LedgerEntry

__all__ = ["PRV_SLACK", "EpsilonCheck", "check_epsilons"]

PRV_SLACK = 0.03
"""How far a PLD figure may lie below Opacus' PRV upper bound: PRV's own error (eps_error 0.01 on
each side of the true ε) plus 0.01. Below that PLD would undercut PRV's lower bound, so one of
the two accountants is wrong."""

_History = Sequence[tuple[LedgerEntry, GuaranteeScope]]


@dataclass(frozen=True, kw_only=True)
class EpsilonCheck:
    """What `check_epsilons` recomputed.

    Attributes:
        max_rdp_difference: Largest |stored − recomputed| ε by RDP.
        max_pld_difference: Largest |stored − recomputed| ε by PLD.
        pld_figures: How many stored PLD figures were recomputed.
        prv_cross_check: (figures compared, largest |PLD − PRV|), or None without torch.
    """

    max_rdp_difference: float
    max_pld_difference: float
    pld_figures: int
    prv_cross_check: tuple[int, float] | None


class _Composer:
    """ε of a history by one accountant, with histories that group the same way computed once."""

    def __init__(self, accountant: Accountant) -> None:
        self._accountant = accountant
        self._cache: dict[tuple[object, ...], float | None] = {}

    def __call__(self, history: _History, delta: float) -> float | None:
        """ε, or None where the accountant cannot bound the history (`AccountingError`)."""
        groups: dict[tuple[str, str, float, float], int] = {}
        for entry, scope in history:
            key = (entry.mechanism.value, entry.neighbouring.value, entry.guarantee(scope).noise_multiplier,
                   entry.sample_rate)
            groups[key] = groups.get(key, 0) + entry.steps
        cache_key = (delta, tuple(sorted(groups.items())))
        if cache_key not in self._cache:
            releases = [
                Release(mechanism=Mechanism(m), neighbouring=Neighbouring(r), noise_multiplier=sigma,
                        sample_rate=q, steps=steps)
                for (m, r, sigma, q), steps in groups.items()
            ]
            try:
                self._cache[cache_key] = self._accountant.epsilon(releases, delta=delta).epsilon
            except AccountingError:
                self._cache[cache_key] = None
        return self._cache[cache_key]


def check_epsilons(silos: Sequence[_Silo], where: str, tolerance: float) -> EpsilonCheck:
    """Recomputes every stored ε of every silo's verified entries; raises at the first that differs.

    Per entry and scope: ε of the release and the cumulative ε by RDP (dp_accounting's RDP on
    ``LEDGER_RDP_ORDERS``) and, in version-2 entries, by PLD (`PldAccountant` with the
    ledger's settings: a missing PLD figure must be one its size guard refuses); ``epsilon_prv``
    never above ``epsilon_rdp``. Then, where torch is installed, each silo's final cumulative
    PLD figures against Opacus' PRV upper bound: PLD more than `PRV_SLACK` below it fails.

    Args:
        silos: The verified silos.
        where: The report, for messages.
        tolerance: Largest accepted absolute ε difference.

    Returns:
        What was recomputed.

    Raises:
        AuditError: Naming the silo, the entry seq and the figure.
    """
    rdp = _Composer(DpAccountingVerifier(orders=LEDGER_RDP_ORDERS))
    pld = _Composer(PldAccountant())
    largest = {"rdp": 0.0, "pld": 0.0}
    pld_figures = 0
    finals: list[tuple[_Silo, LedgerEntry, GuaranteeScope, float, _History]] = []
    for silo in silos:
        history: dict[str, list[LedgerEntry]] = {}
        for entry in silo.entries:
            prefix = history.setdefault(entry.neighbouring.value, [])
            prefix.append(entry)
            scopes = [GuaranteeScope.AGGREGATE]
            if entry.single_upload is not None:
                scopes.append(GuaranteeScope.SINGLE_UPLOAD)
            for scope in scopes:
                stated = entry.guarantee(scope)
                what = f"{entry.neighbouring.value}-level, against {scope.value}"
                alone: _History = [(entry, scope)]
                whole: _History = [(e, scope) for e in prefix]
                checks: list[tuple[str, str, float | None, _History, Callable[..., float | None]]] = [
                    ("rdp", "ε of this release", stated.epsilon_rdp, alone, rdp),
                    ("rdp", "cumulative ε", stated.cumulative_epsilon, whole, rdp),
                ]
                if entry.accountant is not None:  # format v2: PLD figures too
                    checks += [
                        ("pld", "PLD ε of this release", stated.epsilon_pld, alone, pld),
                        ("pld", "cumulative PLD ε", stated.cumulative_epsilon_pld, whole, pld),
                    ]
                for kind, label, stored, releases, compose in checks:
                    fresh = compose(releases, entry.delta)
                    difference = _difference(silo, entry, label, what, stored, fresh, where)
                    if difference is not None:
                        if difference > tolerance:
                            raise AuditError(
                                f"{where}: silo {silo.name!r}: ledger entry seq {entry.seq}: stored "
                                f"{label} {stored!r} ({what}) differs from dp_accounting's "
                                f"{fresh!r} by {difference:.3g}, more than the tolerance {tolerance!r}",
                                silo=silo.name, seq=entry.seq)
                        largest[kind] = max(largest[kind], difference)
                        pld_figures += kind == "pld"
                if stated.epsilon_prv is not None and stated.epsilon_prv > stated.epsilon_rdp + tolerance:
                    raise AuditError(
                        f"{where}: silo {silo.name!r}: ledger entry seq {entry.seq}: its PRV ε "
                        f"{stated.epsilon_prv!r} ({what}) exceeds its RDP ε "
                        f"{stated.epsilon_rdp!r} by more than {tolerance!r}; PRV accounting is "
                        "tighter than RDP, so one of them is wrong",
                        silo=silo.name, seq=entry.seq)
        for prefix in history.values():
            last = prefix[-1]
            scopes = [GuaranteeScope.AGGREGATE] + ([GuaranteeScope.SINGLE_UPLOAD] if last.single_upload else [])
            for scope in scopes:
                value = last.guarantee(scope).cumulative_epsilon_pld
                if value is not None:
                    finals.append((silo, last, scope, value, [(e, scope) for e in prefix]))
    return EpsilonCheck(max_rdp_difference=largest["rdp"], max_pld_difference=largest["pld"],
                        pld_figures=pld_figures, prv_cross_check=_cross_check(finals, where))


def _difference(silo: _Silo, entry: LedgerEntry, label: str, what: str, stored: float | None,
                fresh: float | None, where: str) -> float | None:
    """|stored − fresh|; None when both are absent (beyond PLD's size guard); raises on a mismatch of presence."""
    if stored is None and fresh is None:
        return None
    if stored is None:
        raise AuditError(
            f"{where}: silo {silo.name!r}: ledger entry seq {entry.seq}: no {label} stated ({what}), but "
            f"dp_accounting bounds it at {fresh!r}: only a release beyond PLD's size guard may leave it out",
            silo=silo.name, seq=entry.seq)
    if fresh is None or not math.isfinite(fresh):
        return math.inf
    return abs(fresh - stored)


def _cross_check(finals: Sequence[tuple[_Silo, LedgerEntry, GuaranteeScope, float, _History]],
                 where: str) -> tuple[int, float] | None:
    """Each final PLD figure against Opacus' PRV upper bound (None when torch/Opacus is missing)."""
    try:  # Opacus (and so torch) is on agents, not on the coordinator's base install
        import opacus.accountants.analysis.prv  # noqa: F401
    except ImportError:
        return None
    prv = _Composer(PrvAccountant())
    compared, largest = 0, 0.0
    for silo, entry, scope, value, history in finals:
        upper = prv(history, entry.delta)
        if upper is None:
            continue  # PRV's own size guard: nothing to compare
        if value < upper - PRV_SLACK:
            raise AuditError(
                f"{where}: silo {silo.name!r}: ledger entry seq {entry.seq}: cumulative PLD ε {value!r} "
                f"({entry.neighbouring.value}-level, against {scope.value}) is {upper - value:.3g} below Opacus' "
                f"PRV upper bound {upper!r}, more than PRV's own error allows ({PRV_SLACK}); one of the two "
                "accountants is wrong",
                silo=silo.name, seq=entry.seq)
        compared += 1
        largest = max(largest, abs(value - upper))
    return compared, largest
