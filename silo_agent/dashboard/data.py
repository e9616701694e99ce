"""The dashboard's data layer: one poll of the Admin API as immutable records, and the warnings they raise.

:func:`build_snapshot` turns what ``CoordinatorClient.status``, ``rounds`` and ``privacy`` return into a
:class:`Snapshot` and is pure (tests feed it plain data); :class:`Poller` calls the coordinator every
``refresh_s`` in a thread and keeps the newest snapshot, or the last good one marked with why the
latest poll failed. ε is taken as the coordinator's ledger mirror reports it, never recomputed here.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from fedsilo.coordinator.records import RunState
from fedsilo.privacy.accounting import BudgetAccountant, Neighbouring

log = logging.getLogger("fedsilo.dashboard")

__all__ = [
    "Alert", "AlertKind", "DashboardSettings", "Poller", "PrivacySilo", "RoundPhase", "RoundView", "Severity",
    "SiloView", "Snapshot", "Spend", "Upload", "build_snapshot", "compute_alerts",
]


class RoundPhase(enum.Enum):
    """Where a round stands."""

    OPEN = "open"
    """Accepting uploads, fewer than its quorum in."""
    QUORUM = "quorum"
    """Accepting uploads, its quorum in: it closes at its deadline or when every silo uploaded."""
    CLOSED = "closed"
    """Its aggregate exists."""
    FAILED = "failed"
    """Its aggregate was reported unusable, or the run failed while it was open."""


class Severity(enum.Enum):
    """How urgent a warning is."""

    WARNING = "warning"
    CRITICAL = "critical"


class AlertKind(enum.Enum):
    """What a warning is about."""

    NEAR_BUDGET = "near-budget"
    OVER_BUDGET = "over-budget"
    BUDGET_UNVERIFIED = "budget-unverified"
    ROUND_FAILED = "round-failed"
    RUN_FAILED = "run-failed"
    SILO_QUIET = "silo-quiet"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, kw_only=True)
class DashboardSettings:
    """What the dashboard polls and when it warns.

    Attributes:
        refresh_s: Seconds between polls of the coordinator (and between page updates), 0.2..3600.
        near_budget_fraction: Warn when a silo's ε reaches this fraction of its budget, in (0, 1].
        quiet_after_s: Warn when a training silo has not been heard from for this long, > 0 seconds.
    """

    refresh_s: float = 2.0
    near_budget_fraction: float = 0.8
    quiet_after_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("refresh_s", "near_budget_fraction", "quiet_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.2 <= self.refresh_s <= 3600:
            raise ValueError(f"refresh_s must be in [0.2, 3600] seconds, got {self.refresh_s!r}")
        if not 0 < self.near_budget_fraction <= 1:
            raise ValueError(f"near_budget_fraction must be in (0, 1], got {self.near_budget_fraction!r}")
        if not self.quiet_after_s > 0:
            raise ValueError(f"quiet_after_s must be > 0 seconds, got {self.quiet_after_s!r}")


@dataclass(frozen=True, kw_only=True)
class SiloView:
    """An enrolled silo as the coordinator sees it."""

    name: str
    joined: bool
    last_seen_ms: int
    rounds_contributed: int
    num_train_examples: int
    retired_from_round: int
    retired_reason: str


@dataclass(frozen=True, kw_only=True)
class Upload:
    """One accepted upload of a round."""

    silo: str
    accepted_at_ms: int
    payload_bytes: int


@dataclass(frozen=True, kw_only=True)
class RoundView:
    """One round of the timeline. ``metrics`` maps silo -> metric name -> value."""

    round: int
    phase: RoundPhase
    uploads: tuple[Upload, ...]
    quorum: int
    bytes_up: int
    bytes_down: int
    seconds: float
    opened_at_ms: int
    deadline_ms: int
    closed_at_ms: int
    failure: str
    metrics: Mapping[str, Mapping[str, float]]


@dataclass(frozen=True, kw_only=True)
class Spend:
    """One silo's spend for one relation: the mirror's cumulative single-upload ε."""

    relation: Neighbouring
    epsilon: float
    delta: float
    entries: int
    last_round: int
    #: Whose figure ``epsilon`` is, and the figure by each (PLD None where not stated).
    accountant: BudgetAccountant
    epsilon_rdp: float
    epsilon_pld: float | None


@dataclass(frozen=True, kw_only=True)
class PrivacySilo:
    """One silo's verified budget (None without one) and spend per relation."""

    silo: str
    budget_epsilon: float | None
    budget_delta: float | None
    budget_error: str
    spends: tuple[Spend, ...]


@dataclass(frozen=True, kw_only=True)
class Alert:
    """One warning on the page; ``subject`` is the silo or round it is about ("" for the run)."""

    severity: Severity
    kind: AlertKind
    subject: str
    text: str


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """Everything the page shows, as of one poll (``error`` says why the newest poll failed, if it did)."""

    run_id: str
    state: RunState | None
    open_round: int
    last_closed_round: int
    total_rounds: int
    message: str
    silos: tuple[SiloView, ...]
    rounds: tuple[RoundView, ...]
    privacy_enabled: bool
    plan_delta: float
    privacy: tuple[PrivacySilo, ...]
    alerts: tuple[Alert, ...]
    fetched_at_ms: int
    error: str = ""

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Every metric some silo reported, sorted."""
        return tuple(sorted({n for r in self.rounds for ms in r.metrics.values() for n in ms}))


def _phase(r: Mapping[str, Any], state: RunState | None) -> RoundPhase:
    if r["failure"] or (not r["closed"] and state is RunState.FAILED):
        return RoundPhase.FAILED
    if r["closed"]:
        return RoundPhase.CLOSED
    return RoundPhase.QUORUM if r.get("quorum_reached") else RoundPhase.OPEN


def _state(text: str) -> RunState | None:
    try:
        return RunState(text)
    except ValueError:
        return None


def build_snapshot(status: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]], privacy: Mapping[str, Any],
                   settings: DashboardSettings, *, fetched_at_ms: int) -> Snapshot:
    """The snapshot of one poll, with its warnings.

    Args:
        status: ``CoordinatorClient.status()``.
        rounds: ``CoordinatorClient.rounds()``.
        privacy: ``CoordinatorClient.privacy()``.
        settings: When to warn.
        fetched_at_ms: When the poll was made (this machine's clock, epoch ms): "last contact" and quiet silos
            are measured from it, against the coordinator's timestamps (clocks kept by NTP agree far
            closer than the quiet threshold).
    """
    state = _state(status["state"])
    silos = tuple(SiloView(name=s["name"], joined=s["joined"], last_seen_ms=s["last_seen_unix_ms"],
                           rounds_contributed=s["rounds_contributed"], num_train_examples=s["num_train_examples"],
                           retired_from_round=s["retired_from_round"], retired_reason=s["retired_reason"])
                  for s in status["silos"])
    views = tuple(RoundView(
        round=r["round"], phase=_phase(r, state),
        uploads=tuple(Upload(silo=u["silo"], accepted_at_ms=u["accepted_at_unix_ms"], payload_bytes=u["payload_bytes"])
                      for u in r.get("uploads", ())),
        quorum=r.get("quorum", 0), bytes_up=r["bytes_up"], bytes_down=r["bytes_down"], seconds=r["seconds"],
        opened_at_ms=r.get("opened_at_unix_ms", 0), deadline_ms=r.get("deadline_unix_ms", 0),
        closed_at_ms=r.get("closed_at_unix_ms", 0), failure=r["failure"],
        metrics={silo: {name: m["value"] for name, m in ms.items()} for silo, ms in r["metrics"].items()},
    ) for r in rounds)
    spent = tuple(PrivacySilo(
        silo=p["silo"], budget_error=p["budget_error"],
        budget_epsilon=None if p["budget"] is None else p["budget"]["epsilon"],
        budget_delta=None if p["budget"] is None else p["budget"]["delta"],
        spends=tuple(Spend(relation=Neighbouring(rel), epsilon=s["epsilon"], delta=s["delta"], entries=s["entries"],
                           last_round=s["last_round"], accountant=BudgetAccountant(s["accountant"]),
                           epsilon_rdp=s["epsilon_rdp"],
                           epsilon_pld=s["epsilon_pld"])
                     for rel, s in p["relations"].items() if rel in {n.value for n in Neighbouring}),
    ) for p in privacy["silos"])
    snap = Snapshot(
        run_id=status["run_id"], state=state, open_round=status["open_round"],
        last_closed_round=status["last_closed_round"], total_rounds=status["total_rounds"],
        message=status["message"],
        silos=silos, rounds=views, privacy_enabled=privacy["enabled"], plan_delta=privacy["plan_delta"],
        privacy=spent, alerts=(), fetched_at_ms=fetched_at_ms)
    return replace(snap, alerts=compute_alerts(snap, settings))


def compute_alerts(snap: Snapshot, settings: DashboardSettings) -> tuple[Alert, ...]:
    """The warnings a snapshot raises, most urgent first: the run failed, a silo over (or near) its
    budget or with a budget that no longer verifies, a failed round, a training silo gone quiet."""
    out: list[Alert] = []
    if snap.error:
        out.append(Alert(severity=Severity.CRITICAL, kind=AlertKind.UNREACHABLE, subject="",
                         text=f"the coordinator did not answer the latest poll: {snap.error}"))
    if snap.state is RunState.FAILED:
        out.append(Alert(severity=Severity.CRITICAL, kind=AlertKind.RUN_FAILED, subject="",
                         text=f"the run failed: {snap.message}"))
    for p in snap.privacy:
        if p.budget_error:
            out.append(Alert(severity=Severity.CRITICAL, kind=AlertKind.BUDGET_UNVERIFIED, subject=p.silo,
                             text=p.budget_error))
        if p.budget_epsilon is None:
            continue
        for s in p.spends:
            used = s.epsilon / p.budget_epsilon
            figures = f"{s.relation.value}-level ε {s.epsilon:.4g} of its budget {p.budget_epsilon:.4g} ({used:.0%})"
            if s.epsilon > p.budget_epsilon:
                out.append(Alert(severity=Severity.CRITICAL, kind=AlertKind.OVER_BUDGET, subject=p.silo,
                                 text=f"{p.silo} is over its privacy budget: {figures}"))
            elif used >= settings.near_budget_fraction:
                out.append(Alert(severity=Severity.WARNING, kind=AlertKind.NEAR_BUDGET, subject=p.silo,
                                 text=f"{p.silo} is near its privacy budget: {figures}"))
    for r in snap.rounds:
        if r.phase is RoundPhase.FAILED:
            why = r.failure or "the run failed while it was open"
            out.append(Alert(severity=Severity.WARNING, kind=AlertKind.ROUND_FAILED, subject=str(r.round),
                             text=f"round {r.round} failed: {why}"))
    if snap.state in (RunState.WAITING, RunState.RUNNING):
        for s in snap.silos:
            if not s.joined or s.retired_from_round or s.last_seen_ms <= 0:
                continue
            quiet_s = (snap.fetched_at_ms - s.last_seen_ms) / 1000.0
            if quiet_s >= settings.quiet_after_s:
                out.append(Alert(severity=Severity.WARNING, kind=AlertKind.SILO_QUIET, subject=s.name,
                                 text=f"{s.name} has gone quiet: last contact {quiet_s:.0f} s ago"))
    return tuple(sorted(out, key=lambda a: a.severity is not Severity.CRITICAL))


class AdminCalls(Protocol):
    """The Admin calls the dashboard makes (``CoordinatorClient`` has them)."""

    def status(self) -> dict[str, Any]: ...  # noqa: D102

    def rounds(self) -> list[dict[str, Any]]: ...  # noqa: D102

    def privacy(self) -> dict[str, Any]: ...  # noqa: D102


class Poller:
    """Polls the coordinator every ``settings.refresh_s`` in a thread and keeps the newest snapshot.

    Args:
        client: The Admin calls (an admin ``CoordinatorClient``).
        settings: Refresh interval and warning thresholds.
        clock: Seconds since the epoch.
    """

    def __init__(self, client: AdminCalls, settings: DashboardSettings, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: Snapshot | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> Snapshot:
        """Polls once and keeps the result; a failed poll keeps the last good data, marked with the error.

        Raises:
            Exception: what the client raised, when no poll has succeeded yet (there is nothing to show).
        """
        now_ms = int(self._clock() * 1000)
        try:
            snap = build_snapshot(self._client.status(), self._client.rounds(), self._client.privacy(),
                                  self.settings, fetched_at_ms=now_ms)
        except Exception as exc:
            with self._lock:
                previous = self._latest
            if previous is None:
                raise
            if not previous.error:  # logged once per outage, not at every poll
                log.warning("dashboard: polling the coordinator failed (showing the last good data): %s",
                            _describe(exc))
            failed = replace(previous, error=_describe(exc))
            snap = replace(failed, alerts=compute_alerts(failed, self.settings))
        else:
            with self._lock:
                recovered = self._latest is not None and bool(self._latest.error)
            if recovered:
                log.warning("dashboard: the coordinator answers again")
        with self._lock:
            self._latest = snap
        return snap

    def latest(self) -> Snapshot | None:
        """The newest snapshot (None before the first successful poll)."""
        with self._lock:
            return self._latest

    def start(self) -> None:
        """Polls in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name="dashboard-poller", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.refresh_s):
            try:
                self.poll()
            except Exception as exc:  # no good poll yet: try again next time
                log.warning("dashboard: polling the coordinator failed: %s", _describe(exc))

    def stop(self) -> None:
        """Stops the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _describe(exc: BaseException) -> str:
    """An exception as one line: a gRPC error's status code and details, else its text."""
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"
    return str(exc) or type(exc).__name__
