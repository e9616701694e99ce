"""The ``Coordinator`` facade: one run, composed of its parts, with the plain methods servicers and the in-process transport call.

Where things happen:

- ``coordinator.rounds``: the round state machine (start, open, tasks, accept, close at quorum,
  deadlines, declines, resume);
- ``coordinator.admission``: every check of an upload, and receiving its stream;
- ``coordinator.weights``: upload weights and the weight normalizer, fixed by the coordinator;
- ``coordinator.failures``: silos' reports of unusable aggregates, and failed rounds;
- ``coordinator.membership``: the run's config for silos, and joins;
- ``coordinator.keys``: the HE key relay; ``coordinator.relay``: the generic sealed relay;
- ``coordinator.mirror``: the privacy-ledger mirror, budget statements, planned spend;
- ``coordinator.telemetry``: heartbeats, byte counters, metrics, status and round summaries.

All of it is plain Python: the gRPC servicer only converts messages and maps the exceptions of
``fedsilo.core.errors`` to status codes. What a run shares and how uploads are laid out come
from the run's method (``config.method``); nothing here names one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from fedsilo.coordinator.admission import Admission
from fedsilo.coordinator.config import ConfigError, FederationConfig
from fedsilo.coordinator.context import RunContext
from fedsilo.coordinator.failures import RoundFailures
from fedsilo.coordinator.keys import KeyRelay
from fedsilo.coordinator.membership import Membership
from fedsilo.coordinator.mirror import Mirror
from fedsilo.coordinator.records import (
    AggregateInfo,
    FailureReport,
    PrivacyView,
    RoundSummary,
    RunState,
    SealedPage,
    Status,
    SubmitResult,
    Task,
    UploadPart,
)
from fedsilo.coordinator.relay import SealedRelay
from fedsilo.coordinator.rounds import Rounds
from fedsilo.coordinator.telemetry import RunCounters, Telemetry
from fedsilo.core.errors import PermissionDenied
from fedsilo.core.tensors import Manifest
from fedsilo.privacy.ledger import LedgerMirror
from fedsilo.privacy.pki import Identity, Role

__all__ = ["Coordinator"]


class Coordinator:
    """One federated run, persisted in ``config.state_dir``.

    A coordinator started on an existing state dir resumes the run exactly where the database
    says it is.

    Args:
        config: the validated run config.
        clock: seconds since the epoch (tests pass a fake clock).

    Raises:
        ConfigError: the state dir holds another run, or the run's planned privacy spend
            exceeds a budget agreed with a silo.
    """

    def __init__(self, config: FederationConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = config
        self._ctx = ctx = RunContext(config, clock=clock)
        self._telemetry = Telemetry(ctx)
        self._mirror = Mirror(ctx)
        self._keys = KeyRelay(ctx, on_published=lambda: self._rounds.maybe_start())
        self._rounds = Rounds(ctx, gate=self._keys.start_gate)
        self._admission = Admission(ctx, self._rounds)
        self._members = Membership(ctx, self._rounds, self._mirror, self._keys)
        self._relay = SealedRelay(ctx)
        self._failures = RoundFailures(ctx, self._rounds)
        try:
            self._mirror.check_planned_spend()
            self._rounds.resume()
        except ConfigError:
            self.close()
            raise

    # -- identity and run info ----------------------------------------------------------
    def require_admin(self, caller: Identity) -> None:
        """Admin RPCs need an admin certificate.

        Raises:
            PermissionDenied: for any other role.
        """
        if caller.role is not Role.ADMIN:
            raise PermissionDenied(f"admin RPCs need an admin certificate, not a {caller.role.value} one")

    def run_config(self, caller: Identity) -> FederationConfig:
        """The run's config, for an enrolled silo (see ``Membership.run_config``)."""
        return self._members.run_config(caller)

    def join(self, caller: Identity, *, model_fingerprint: str, num_train_examples: int,
             manifest: Manifest, agent_version: str, kem_announcement: bytes = b"",
             budget_statement: bytes = b"") -> tuple[str, RunState, int]:
        """Joins (or re-joins) the run; returns (silo name, run state, last closed round). See ``Membership.join``."""
        return self._members.join(caller, model_fingerprint=model_fingerprint, num_train_examples=num_train_examples,
                                  manifest=manifest, agent_version=agent_version, kem_announcement=kem_announcement,
                                  budget_statement=budget_statement)

    # -- rounds -------------------------------------------------------------------------
    def get_task(self, caller: Identity, *, after_round: int, wait_s: float,
                 alive: Callable[[], bool] = lambda: True) -> Task:
        """Long-polls for the next task of ``caller`` after ``after_round``, while ``alive()`` (see
        ``Rounds.wait_task``)."""
        name = self._ctx.require_joined(caller)
        self._rounds.check_poll(after_round=after_round, wait_s=wait_s)
        self._telemetry.seen(name)
        return self._rounds.wait_task(name, after_round=after_round, wait_s=wait_s, alive=alive)

    def submit(self, caller: Identity, parts: Iterable[UploadPart]) -> SubmitResult:
        """Receives, checks and adds one upload stream (see ``Admission.submit``)."""
        return self._admission.submit(caller, parts)

    def tick(self) -> None:
        """Writes batched counters when due and applies deadlines (see ``Rounds.tick``)."""
        self._telemetry.maybe_flush()
        self._rounds.tick()

    def decline(self, caller: Identity, *, rnd: int, reason: str, final: bool) -> tuple[RunState, int]:
        """A silo declines a round; returns (run state, silos still training). See ``Rounds.decline``."""
        return self._rounds.decline(self._ctx.require_joined(caller), rnd=rnd, reason=reason, final=final)

    def aggregate(self, caller: Identity, rnd: int) -> AggregateInfo:
        """A closed round's aggregate, for a joined silo (see ``Rounds.aggregate``)."""
        return self._rounds.aggregate(caller, rnd)

    def report_aggregate_failure(self, caller: Identity, rnd: int, reason: str) -> FailureReport:
        """A silo reports round ``rnd``'s aggregate unusable; a majority marks it failed (see ``RoundFailures.report``)."""
        name = self._ctx.require_joined(caller)
        self._telemetry.seen(name)
        return self._failures.report(name, rnd, reason)

    # -- telemetry ----------------------------------------------------------------------
    def count_bytes(self, rnd: int, *, up: int = 0, down: int = 0) -> None:
        """Adds wire traffic to a round's counters (batched)."""
        self._telemetry.count_bytes(rnd, up=up, down=down)

    def flush_telemetry(self) -> None:
        """Writes the batched last-seen times and traffic counters to the database."""
        self._telemetry.flush()

    def heartbeat(self, caller: Identity) -> tuple[RunState, int]:
        """Records liveness; returns (run state, open round or 0)."""
        return self._telemetry.heartbeat(caller)

    def report_metrics(self, caller: Identity, rnd: int, metrics: list[tuple[str, float, int]],
                       wire_bytes: int = 0) -> int:
        """Stores a silo's evaluation numbers for a closed round (see ``Telemetry.report_metrics``)."""
        return self._telemetry.report_metrics(caller, rnd, metrics, wire_bytes)

    def status(self) -> Status:
        """The run at a glance."""
        return self._telemetry.status()

    def round_summaries(self) -> list[RoundSummary]:
        """Every round so far."""
        return self._telemetry.round_summaries()

    def counters(self) -> RunCounters:
        """The run's totals for operations metrics (see ``Telemetry.counters``)."""
        return self._telemetry.counters()

    @property
    def ledger_mirror(self) -> LedgerMirror | None:
        """The verified mirror of the silos' privacy ledgers, for reading; None in a run without DP."""
        return self._ctx.mirror

    # -- relays -------------------------------------------------------------------------
    def key_recipients(self, caller: Identity) -> list[tuple[str, bytes]]:
        """Key holder only: joined silos still without a wrapped key (see ``KeyRelay.recipients``)."""
        return self._keys.recipients(caller)

    def publish_wrapped_keys(self, caller: Identity, entries: list[tuple[str, bytes]]) -> int:
        """Key holder only: stores wrapped keys, opaque to the coordinator (see ``KeyRelay.publish``)."""
        return self._keys.publish(caller, entries)

    def wrapped_key(self, caller: Identity) -> bytes | None:
        """The run's key wrapped for the caller, or None while it is not published."""
        return self._keys.wrapped_key(caller)

    def publish_sealed(self, caller: Identity, purpose: str, blob: bytes) -> int:
        """Stores the caller's sealed blob under ``purpose``; returns how many silos published
        under it (see ``SealedRelay.publish``)."""
        return self._relay.publish(caller, purpose, blob)

    def sealed(self, caller: Identity, purpose: str, *, after_silo: str = "") -> SealedPage:
        """A page of the other silos' sealed blobs under ``purpose`` (see ``SealedRelay.page``)."""
        return self._relay.page(caller, purpose, after_silo=after_silo)

    # -- privacy ------------------------------------------------------------------------
    def submit_ledger_entries(self, caller: Identity, entries_json: list[str]) -> int:
        """Verifies and mirrors a silo's ledger entries; returns its highest mirrored seq (see ``Mirror.submit``)."""
        name, last = self._mirror.submit(caller, entries_json)
        self._telemetry.seen(name)
        return last

    def privacy(self) -> PrivacyView:
        """Each silo's verified budget and cumulative ε from the ledger mirror (see ``Mirror.view``)."""
        return self._mirror.view()

    def close(self) -> None:
        """Writes pending counters and closes the databases."""
        self._telemetry.flush()
        self._ctx.close()
