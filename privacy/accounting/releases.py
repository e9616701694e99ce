"""What privacy accounting counts: mechanisms, neighbouring relations, releases and ε results."""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class AccountingError(Exception):
    """An accountant could not bound ε for a history; the message says why."""


class Mechanism(enum.Enum):
    """Which Gaussian mechanism a release used."""

    SUBSAMPLED_GAUSSIAN = "subsampled_gaussian"
    """DP-SGD steps: Poisson sampling with rate q, clipping to C, Gaussian noise of std σC."""
    GAUSSIAN = "gaussian"
    """One full-batch release (a silo-level noised update): q = 1, noise of std σC."""


class BudgetAccountant(enum.Enum):
    """The accountant whose ε a silo's budget is enforced on and σ is calibrated against
    (``[privacy] accountant``); every ledger entry states both figures either way."""

    RDP = "rdp"
    """Rényi DP on integer orders (Mironov 2017): the default, what studies usually quote."""
    PLD = "pld"
    """The privacy loss distribution (dp_accounting, pessimistic): the tightest sound figure."""


class Neighbouring(enum.Enum):
    """The unit a guarantee protects; guarantees for different units never add up."""

    RECORD = "record"
    """Add or remove one record (one patient's sample) of a silo's dataset."""
    SILO = "silo"
    """Add or remove one whole silo's dataset (the silo's update as a unit)."""


class AccountingMethod(enum.Enum):
    """How an ε was computed."""

    RDP = "rdp"
    """`RdpAccountant`: Opacus' Rényi-DP analysis."""
    PRV = "prv"
    """`PrvAccountant`: Opacus' privacy-loss-random-variable (PRV) composition."""
    DP_ACCOUNTING_RDP = "dp_accounting_rdp"
    """`DpAccountingVerifier`: Google's dp_accounting RDP accountant (independent code)."""
    PLD = "pld"
    """`PldAccountant`: Google's dp_accounting privacy-loss-distribution (PLD) accountant."""


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_delta(delta: object, *, name: str = "delta") -> float:
    if not _is_real(delta) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"invalid {name} {delta!r}: must be a number in (0, 1)")
    return float(delta)


def _check_positive(name: str, value: object) -> float:
    if not _is_real(value) or not math.isfinite(float(value)) or not float(value) > 0.0:
        raise ValueError(f"invalid {name} {value!r}: must be a finite number > 0")
    return float(value)


def _check_count(name: str, value: object) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or int(value) < 1:
        raise ValueError(f"invalid {name} {value!r}: must be an integer >= 1")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class Release:
    """One accounted release: a run of Gaussian-mechanism steps on one silo's data.

    Attributes:
        mechanism: The mechanism; GAUSSIAN requires ``sample_rate == 1``.
        neighbouring: What the guarantee protects (one record, or one silo's whole dataset).
        noise_multiplier: σ, the noise std divided by the L2 sensitivity (the clip norm C).
        sample_rate: q, the Poisson sampling rate of each step, in (0, 1].
        steps: How many times the mechanism was applied (≥ 1).
    """

    mechanism: Mechanism
    neighbouring: Neighbouring
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not isinstance(self.mechanism, Mechanism):
            raise ValueError(
                f"invalid mechanism {self.mechanism!r}: must be a Mechanism "
                f"({', '.join(m.name for m in Mechanism)})"
            )
        if not isinstance(self.neighbouring, Neighbouring):
            raise ValueError(
                f"invalid neighbouring {self.neighbouring!r}: must be a Neighbouring "
                f"({', '.join(n.name for n in Neighbouring)})"
            )
        sigma = _check_positive("noise_multiplier", self.noise_multiplier)
        q = self.sample_rate
        if not _is_real(q) or not 0.0 < float(q) <= 1.0:
            raise ValueError(f"invalid sample_rate {q!r}: must be a number in (0, 1]")
        if self.mechanism is Mechanism.GAUSSIAN and float(q) != 1.0:
            raise ValueError(
                f"invalid sample_rate {q!r}: a GAUSSIAN release is full-batch, "
                "sample_rate must be 1"
            )
        steps = _check_count("steps", self.steps)
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", steps)


@dataclass(frozen=True, kw_only=True)
class EpsilonResult:
    """The ε an accountant proves for a history at a given δ.

    Attributes:
        epsilon: ε ≥ 0; ``math.inf`` when no finite bound exists on the order grid.
        delta: The δ it holds for.
        method: Which accountant computed it.
        neighbouring: The relation of the history; None for an empty history.
        order: The RDP order α that gave the best bound (RDP methods); None for PRV and PLD,
            for an empty history and for an infinite ε.
    """

    epsilon: float
    delta: float
    method: AccountingMethod
    neighbouring: Neighbouring | None
    order: float | None

    def __post_init__(self) -> None:
        eps = self.epsilon
        if not _is_real(eps) or math.isnan(float(eps)) or float(eps) < 0.0:
            raise ValueError(f"invalid epsilon {eps!r}: must be a number >= 0 (inf allowed)")
        delta = _check_delta(self.delta)
        if not isinstance(self.method, AccountingMethod):
            raise ValueError(f"invalid method {self.method!r}: must be an AccountingMethod")
        if self.neighbouring is not None and not isinstance(self.neighbouring, Neighbouring):
            raise ValueError(
                f"invalid neighbouring {self.neighbouring!r}: must be a Neighbouring or None"
            )
        order = self.order
        if order is not None:
            if not _is_real(order) or not 1.0 < float(order) < math.inf:
                raise ValueError(f"invalid order {order!r}: must be a finite number > 1 or None")
            order = float(order)
        object.__setattr__(self, "epsilon", float(eps))
        object.__setattr__(self, "delta", delta)
        object.__setattr__(self, "order", order)


def _check_history(history: Iterable[Release]) -> tuple[Release, ...]:
    releases = tuple(history)
    for i, release in enumerate(releases):
        if not isinstance(release, Release):
            raise ValueError(f"invalid history[{i}] {release!r}: must be a Release")
    relations = {r.neighbouring for r in releases}
    if len(relations) > 1:
        raise ValueError(
            "invalid history: it mixes neighbouring relations "
            f"({', '.join(sorted(n.name for n in relations))}); record-level and silo-level "
            "guarantees never add up into one ε, account them in separate histories"
        )
    return releases


def _group(releases: Sequence[Release]) -> list[tuple[Mechanism, float, float, int]]:
    """(mechanism, q, σ, total steps) per distinct mechanism; composition only adds steps."""
    steps: dict[tuple[Mechanism, float, float], int] = {}
    for r in releases:
        key = (r.mechanism, r.sample_rate, r.noise_multiplier)
        steps[key] = steps.get(key, 0) + r.steps
    return [(m, q, s, n) for (m, q, s), n in steps.items()]
