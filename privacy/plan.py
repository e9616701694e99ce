"""A run's differential-privacy plan, and the ledger arithmetic of the releases it makes."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedsilo.core.validators import probability
from fedsilo.privacy.accounting import (
    LEDGER_RDP_ORDERS,
    Accountant,
    AccountingError,
    BudgetAccountant,
    DpAccountingVerifier,
    Mechanism,
    Neighbouring,
    Release,
    pld_or_none,
)
from fedsilo.privacy.ledger import GuaranteeScope, LedgerEntry, UploadGuarantee

__all__ = [
    "MAX_NOISE_SHARES",
    "MAX_STEPS_PER_ROUND",
    "PlannedRelease",
    "PrivacyPlan",
    "entry_key",
    "entry_release",
    "ledger_fields",
    "projected_spend",
]

MAX_STEPS_PER_ROUND = 1_000_000
MAX_NOISE_SHARES = 10_000


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


@dataclass(frozen=True, kw_only=True)
class PlannedRelease:
    """One release a silo makes each round (one ledger entry).

    Attributes:
        mechanism: GAUSSIAN (one full-batch release) or SUBSAMPLED_GAUSSIAN (DP-SGD steps).
        neighbouring: RECORD (one patient's record) or SILO (one silo's whole dataset).
        noise_multiplier: σ of the guarantee against the aggregate.
        single_upload_noise_multiplier: σ against someone who sees this silo's upload alone;
            below ``noise_multiplier`` only when the noise is split into shares.
        sample_rate: Poisson rate q (1.0 for GAUSSIAN).
        steps: Mechanism applications per round.
        clip_norm: C, the L2 sensitivity.
    """

    mechanism: Mechanism
    neighbouring: Neighbouring
    noise_multiplier: float
    single_upload_noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float

    @property
    def distributed(self) -> bool:
        """Whether the upload carries only a share of the noise."""
        return self.single_upload_noise_multiplier < self.noise_multiplier

    def key(self) -> tuple[str, float, float, int, float]:
        """(mechanism, σ, q, steps, C): how a ledger entry of this release is recognised."""
        return (self.mechanism.value, self.noise_multiplier, self.sample_rate, self.steps, self.clip_norm)

    def release(self, scope: GuaranteeScope, *, steps: int | None = None) -> Release:
        """The accountant's view of this release against one observer."""
        sigma = self.single_upload_noise_multiplier if scope is GuaranteeScope.SINGLE_UPLOAD else self.noise_multiplier
        return Release(mechanism=self.mechanism, neighbouring=self.neighbouring, noise_multiplier=sigma,
                       sample_rate=self.sample_rate, steps=self.steps if steps is None else steps)


@dataclass(frozen=True, kw_only=True)
class PrivacyPlan:
    """What differential privacy every silo of a run applies each round (DESIGN §4).

    Record-level: DP-SGD with Poisson sampling at rate ``sample_rate``, per-sample clipping to
    ``max_grad_norm`` and noise ``noise_multiplier`` (Abadi et al. 2016), ``steps_per_round``
    steps per round. Silo-level: the whole shared update clipped to ``update_clip_norm`` and
    Gaussian noise of std ``update_noise_multiplier`` × C added (McMahan et al. 2018,
    DP-FedAvg); with ``noise_shares`` K > 1 each silo adds std σC/√K so the sum of any K
    uploads carries σC (distributed noise under secure aggregation).

    Attributes:
        record_level: DP-SGD on.
        sample_rate: q in (0, 1].
        steps_per_round: DP-SGD steps per round, 1..10^6.
        max_grad_norm: Per-sample clip norm, > 0.
        noise_multiplier: DP-SGD σ, > 0.
        silo_level: Update noise on.
        update_clip_norm: Clip norm of the whole update, > 0.
        update_noise_multiplier: σ of the aggregate, > 0.
        noise_shares: K, 1..10^4.
        delta: The δ the run is planned with, in (0, 1).
        resfim_every: pFL-ResFIM runs whose masks and style banks are differentially private:
            rounds between two mask computations (masks before rounds 1, 1+k, …); 0 for no
            ResFIM releases. Needs record-level DP and the four settings below.
        fisher_noise_multiplier: σ of each noisy Fisher computation (noise std σ·C_F² on the
            sum of squared clipped per-example gradients; ``fedsilo.models.resfim.FisherDp``).
        fisher_clip_norm: C_F, the joint L2 clip of each example's gradient for the Fisher.
        style_noise_multiplier: σ of the style bank's one Gaussian release (relative to its
            sensitivity √2·C_S; ``fedsilo.models.style``).
        style_clip_norm: C_S, the L2 clip of each image's log-amplitude window.
    """

    record_level: bool = False
    sample_rate: float = 0.0
    steps_per_round: int = 0
    max_grad_norm: float = 0.0
    noise_multiplier: float = 0.0
    silo_level: bool = False
    update_clip_norm: float = 0.0
    update_noise_multiplier: float = 0.0
    noise_shares: int = 1
    delta: float = 1e-5
    resfim_every: int = 0
    fisher_noise_multiplier: float = 0.0
    fisher_clip_norm: float = 0.0
    style_noise_multiplier: float = 0.0
    style_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("record_level", "silo_level"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"invalid {name} {getattr(self, name)!r}: must be true or false")
        try:
            probability("delta", float(self.delta) if _real(self.delta) else self.delta)
        except ValueError:
            raise ValueError(f"invalid delta {self.delta!r}: must be a number in (0, 1)") from None
        if self.record_level:
            if not _real(self.sample_rate) or not 0.0 < float(self.sample_rate) <= 1.0:
                raise ValueError(f"invalid sample_rate {self.sample_rate!r}: must be a number in (0, 1]")
            _count("steps_per_round", self.steps_per_round, MAX_STEPS_PER_ROUND)
            _positive("max_grad_norm", self.max_grad_norm)
            _positive("noise_multiplier", self.noise_multiplier)
        if self.silo_level:
            _positive("update_clip_norm", self.update_clip_norm)
            _positive("update_noise_multiplier", self.update_noise_multiplier)
        _count("noise_shares", self.noise_shares, MAX_NOISE_SHARES)
        if self.noise_shares > 1 and not self.silo_level:
            raise ValueError(f"invalid noise_shares {self.noise_shares!r}: only silo-level noise can be "
                             "split into shares; use 1")
        resfim = ("fisher_noise_multiplier", "fisher_clip_norm", "style_noise_multiplier", "style_clip_norm")
        if isinstance(self.resfim_every, bool) or not isinstance(self.resfim_every, numbers.Integral) \
                or not 0 <= int(self.resfim_every) <= 100_000:
            raise ValueError(f"invalid resfim_every {self.resfim_every!r}: must be an integer in [0, 100000]")
        if self.resfim_every:
            if not self.record_level:
                raise ValueError(f"invalid resfim_every {self.resfim_every!r}: ResFIM releases are record-level; "
                                 "they need record_level = true")
            for name in resfim:
                _positive(name, getattr(self, name))
            if self.fisher_release().key() == self.round_releases()[0].key():
                raise ValueError("invalid fisher_noise_multiplier: the Fisher release would be indistinguishable "
                                 "from a round's DP-SGD release in the ledger; change σ or C")
        else:
            for name in resfim:
                if getattr(self, name) != 0:
                    raise ValueError(f"invalid {name} {getattr(self, name)!r}: set only for pFL-ResFIM runs "
                                     "whose masks are differentially private (resfim_every > 0)")

    @property
    def enabled(self) -> bool:
        """Whether the run has any differential privacy."""
        return self.record_level or self.silo_level

    def round_releases(self) -> list[PlannedRelease]:
        """The releases each silo makes per round (one ledger entry each), record-level first."""
        out: list[PlannedRelease] = []
        if self.record_level:
            q = float(self.sample_rate)
            out.append(PlannedRelease(
                mechanism=Mechanism.GAUSSIAN if q == 1.0 else Mechanism.SUBSAMPLED_GAUSSIAN,
                neighbouring=Neighbouring.RECORD, noise_multiplier=float(self.noise_multiplier),
                single_upload_noise_multiplier=float(self.noise_multiplier), sample_rate=q,
                steps=self.steps_per_round, clip_norm=float(self.max_grad_norm)))
        if self.silo_level:
            sigma = float(self.update_noise_multiplier)
            out.append(PlannedRelease(
                mechanism=Mechanism.GAUSSIAN, neighbouring=Neighbouring.SILO, noise_multiplier=sigma,
                single_upload_noise_multiplier=sigma / math.sqrt(self.noise_shares), sample_rate=1.0, steps=1,
                clip_norm=float(self.update_clip_norm)))
        return out

    def fisher_release(self) -> PlannedRelease:
        """One mask computation of pFL-ResFIM: two noisy Fisher matrices (local images and their
        re-styled twins), each a Gaussian mechanism of L2 sensitivity C_F² on the sum of squared
        clipped per-example gradients; one ledger entry of 2 steps."""
        sigma = float(self.fisher_noise_multiplier)
        return PlannedRelease(mechanism=Mechanism.GAUSSIAN, neighbouring=Neighbouring.RECORD, noise_multiplier=sigma,
                              single_upload_noise_multiplier=sigma, sample_rate=1.0, steps=2,
                              clip_norm=float(self.fisher_clip_norm) ** 2)

    def style_release(self) -> PlannedRelease:
        """The style bank's one Gaussian release (clipped window sums and counts, sensitivity √2·C_S)."""
        sigma = float(self.style_noise_multiplier)
        return PlannedRelease(mechanism=Mechanism.GAUSSIAN, neighbouring=Neighbouring.RECORD, noise_multiplier=sigma,
                              single_upload_noise_multiplier=sigma, sample_rate=1.0, steps=1,
                              clip_norm=math.sqrt(2.0) * float(self.style_clip_norm))

    def release_for_relay(self, purpose: str) -> PlannedRelease | None:
        """The planned release that must be mirrored before a silo's blob under ``purpose`` of the
        sealed relay is accepted (the style bank of private masks); None: the plan accounts none."""
        return self.style_release() if purpose == "style-bank" and self.resfim_every else None

    @property
    def has_extra_releases(self) -> bool:
        """Whether the plan schedules releases besides the rounds' uploads (a method's own, e.g. masks)."""
        return bool(self.resfim_every)

    def mask_round(self, rnd: int) -> bool:
        """Whether the schedule computes ResFIM masks before round ``rnd`` (1-based)."""
        return bool(self.resfim_every) and (rnd - 1) % self.resfim_every == 0

    def extra_releases(self, rnd: int) -> list[PlannedRelease]:
        """Releases beyond `round_releases` that round ``rnd``'s upload depends on by schedule (the
        Fisher of the masks computed before it); accounted at the upload's ledger position."""
        return [self.fisher_release()] if self.mask_round(rnd) else []

    def run_extras(self, rounds: int) -> list[PlannedRelease]:
        """Every once-off release of a run of ``rounds`` rounds: the style bank and the scheduled masks."""
        if not self.resfim_every:
            return []
        return [self.style_release()] + [self.fisher_release() for r in range(1, rounds + 1) if self.mask_round(r)]

    def to_mapping(self) -> dict[str, Any]:
        """Plain values (for fingerprints and reports); ResFIM fields only when used, so the
        fingerprints of runs without them are unchanged."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__}
        if not self.resfim_every:
            for f in ("resfim_every", "fisher_noise_multiplier", "fisher_clip_norm", "style_noise_multiplier",
                      "style_clip_norm"):
                out.pop(f)
        return out


def _positive(name: str, value: object) -> None:
    if not _real(value) or not float(value) > 0.0:
        raise ValueError(f"invalid {name} {value!r}: must be a finite number > 0")


def _count(name: str, value: object, most: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= int(value) <= most:
        raise ValueError(f"invalid {name} {value!r}: must be an integer in [1, {most}]")


def entry_key(entry: LedgerEntry) -> tuple[str, float, float, int, float]:
    """The (mechanism, σ, q, steps, C) of a ledger entry, to compare with `PlannedRelease.key`."""
    return (entry.mechanism.value, entry.noise_multiplier, entry.sample_rate, entry.steps, entry.clip_norm)


def entry_release(entry: LedgerEntry, scope: GuaranteeScope) -> Release:
    """The accountant's view of a stored ledger entry against one observer."""
    return Release(mechanism=entry.mechanism, neighbouring=entry.neighbouring,
                   noise_multiplier=entry.guarantee(scope).noise_multiplier, sample_rate=entry.sample_rate,
                   steps=entry.steps)


def _history(entries: Sequence[LedgerEntry], relation: Neighbouring, scope: GuaranteeScope) -> list[Release]:
    return [entry_release(e, scope) for e in entries if e.neighbouring is relation]


def projected_spend(
    history: Sequence[LedgerEntry],
    planned: Sequence[PlannedRelease],
    *,
    delta: float,
    repeats: int = 1,
    extra: Sequence[PlannedRelease] = (),
    accountant: Accountant | None = None,
    governing: BudgetAccountant = BudgetAccountant.RDP,
) -> dict[Neighbouring, float]:
    """Cumulative ε against one silo's upload, per relation, after ``repeats`` more rounds.

    Composes the stored history with the planned releases (each repeated ``repeats`` times)
    and the ``extra`` ones (once each); this is the figure a silo's budget is checked against
    (single-upload scope, the conservative one), by the ``governing`` accountant: RDP
    (``accountant``), or PLD — where PLD cannot bound the history (its size guard), RDP's
    figure stands, as in `LedgerEntry.budget_epsilon`.

    Args:
        history: The silo's ledger entries (any relations).
        planned: The releases of one round.
        delta: The δ to state ε at.
        repeats: Rounds ahead, ≥ 1.
        extra: Once-off releases (e.g. pFL-ResFIM's style bank and mask computations).
        accountant: The RDP accountant; defaults to dp_accounting's RDP on `LEDGER_RDP_ORDERS`
            (torch-free).
        governing: The accountant the budget is enforced on.

    Returns:
        ε per relation of the planned releases; ``math.inf`` where no bound exists.
    """
    accountant = accountant or DpAccountingVerifier(orders=LEDGER_RDP_ORDERS)
    scope = GuaranteeScope.SINGLE_UPLOAD
    ahead: dict[Neighbouring, list[Release]] = {}
    for p in planned:
        ahead.setdefault(p.neighbouring, []).append(p.release(scope, steps=p.steps * repeats))
    for p in extra:
        ahead.setdefault(p.neighbouring, []).append(p.release(scope))
    out: dict[Neighbouring, float] = {}
    for relation, releases in ahead.items():
        whole = _history(history, relation, scope) + releases
        pld = pld_or_none(whole, delta=delta) if governing is BudgetAccountant.PLD else None
        if pld is not None:
            out[relation] = pld
            continue
        try:
            out[relation] = accountant.epsilon(whole, delta=delta).epsilon
        except AccountingError:
            out[relation] = math.inf
    return out


def ledger_fields(
    history: Sequence[LedgerEntry],
    planned: PlannedRelease,
    *,
    delta: float,
    run_id: str,
    round: int,  # noqa: A002 - the ledger's field name
    upload_index: int = 0,
    accountant: Accountant,
    prv_accountant: Accountant | None = None,
    governing: BudgetAccountant = BudgetAccountant.RDP,
) -> dict[str, Any]:
    """The caller fields of `Ledger.reserve` for one planned release.

    Per-release ε and cumulative ε (over ``history``'s entries of the same relation, all
    runs) come from ``accountant`` (RDP) and from `PldAccountant` (both always; PLD's are
    None beyond its size guard); ε by PRV, when a PRV accountant is given, is of this release
    alone (None where PRV cannot bound it). With distributed noise, or once the relation's
    history has single-upload blocks, the entry states both guarantees. ``governing`` is
    recorded as the entry's ``accountant``.

    Args:
        history: The silo's ledger entries so far (any relations, oldest first).
        planned: The release.
        delta: The silo's δ.
        run_id: The run.
        round: The round.
        upload_index: Which upload of the round.
        accountant: The RDP accountant (the agent: Opacus on `LEDGER_RDP_ORDERS`).
        prv_accountant: Optional PRV accountant.
        governing: The accountant this silo's budget is enforced on.

    Returns:
        Keyword arguments for `Ledger.reserve`.
    """
    relation = planned.neighbouring
    same = [e for e in history if e.neighbouring is relation]

    def alone(scope: GuaranteeScope) -> dict[str, Any]:
        this = planned.release(scope)
        rdp = accountant.epsilon([this], delta=delta)
        prv = None
        if prv_accountant is not None:
            try:
                prv = prv_accountant.epsilon([this], delta=delta).epsilon
            except AccountingError:
                prv = None
        return {
            "epsilon_rdp": rdp.epsilon,
            "rdp_order": rdp.order if rdp.order is not None else float(LEDGER_RDP_ORDERS[-1]),
            "epsilon_prv": prv,
            "epsilon_pld": pld_or_none([this], delta=delta),
        }

    def cumulative(scope: GuaranteeScope) -> dict[str, Any]:
        whole = _history(same, relation, scope) + [planned.release(scope)]
        return {
            "cumulative_epsilon": accountant.epsilon(whole, delta=delta).epsilon,
            "cumulative_epsilon_pld": pld_or_none(whole, delta=delta),
        }

    aggregate = alone(GuaranteeScope.AGGREGATE)
    fields: dict[str, Any] = {
        "run_id": run_id, "round": round, "upload_index": upload_index,
        "mechanism": planned.mechanism, "neighbouring": relation,
        "noise_multiplier": planned.noise_multiplier, "sample_rate": planned.sample_rate,
        "steps": planned.steps, "clip_norm": planned.clip_norm, "delta": delta,
        **aggregate, **cumulative(GuaranteeScope.AGGREGATE),
        "guarantee_scope": GuaranteeScope.AGGREGATE if planned.distributed else GuaranteeScope.SINGLE_UPLOAD,
        "single_upload": None,
        "accountant": governing,
    }
    if planned.distributed or any(e.single_upload is not None for e in same):
        # Without distributed noise this release's single-upload figures are the aggregate ones (the
        # same σ); the cumulative ones still compose the relation's single-upload history.
        single = alone(GuaranteeScope.SINGLE_UPLOAD) if planned.distributed else aggregate
        fields["single_upload"] = UploadGuarantee(noise_multiplier=planned.single_upload_noise_multiplier,
                                                  **single, **cumulative(GuaranteeScope.SINGLE_UPLOAD))
    return fields


def plan_from_mapping(data: Mapping[str, Any]) -> PrivacyPlan:
    """A plan from plain values (unknown keys refused, naming them)."""
    known = set(PrivacyPlan.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"invalid {unknown[0]}: not a privacy-plan field (expected one of {sorted(known)})")
    return PrivacyPlan(**dict(data))
