"""Failed rounds: silos report an unusable aggregate; a majority of the silos still training marks the round failed.

The coordinator adds ciphertexts it cannot read, so a silo that encrypts its upload under a key
of its own (or sends values far outside the public bound) makes the round's aggregate
undecryptable or meaningless, and only the silos can tell. Each silo that finds a closed round's
aggregate unusable reports it (``ReportAggregateFailure``); once a strict majority of the silos
still training have reported it, the round is marked failed. A failed round's aggregate is
never handed out again: the fetch says it failed, naming the round, who reported it and who
uploaded to it, and every silo skips it (keeps its model from the last good round). The run then
continues or stops as ``run.on_failed_round`` says. The round's DP releases stay in the silos'
ledgers (they happened), and each contributor's signed upload statement stays in the database,
so the study can hold every uploader to exactly what it sent.

One hostile silo alone cannot fail a round: it needs a majority of the silos training.
"""

from __future__ import annotations

import logging

from fedsilo.coordinator.config import FailedRoundPolicy
from fedsilo.coordinator.context import RunContext
from fedsilo.coordinator.records import MAX_FAILURE_REASON_CHARS, FailureReport, RunState
from fedsilo.coordinator.rounds import Rounds
from fedsilo.core.errors import FailedPrecondition, InvalidArgument
from fedsilo.core.validators import excerpt

log = logging.getLogger("fedsilo.coordinator")


def needed_reports(training: int) -> int:
    """Reports that mark a round failed: a strict majority of the ``training`` silos (at least 1)."""
    return training // 2 + 1


class RoundFailures:
    """Takes the silos' reports of unusable aggregates and marks rounds failed.

    Args:
        ctx: the run's shared state.
        rounds: the round state machine (ends the run when the policy says stop).
    """

    def __init__(self, ctx: RunContext, rounds: Rounds) -> None:
        self.ctx = ctx
        self.rounds = rounds

    def report(self, name: str, rnd: int, reason: str) -> FailureReport:
        """Silo ``name`` reports that round ``rnd``'s aggregate is unusable.

        A silo's first report on a round stands (reporting again changes nothing).

        Raises:
            InvalidArgument: round out of range, or an empty or overlong reason.
            FailedPrecondition: the round is not closed.
        """
        ctx = self.ctx
        if not 1 <= rnd <= ctx.cfg.rounds:
            raise InvalidArgument(f"round {rnd} is not in [1, {ctx.cfg.rounds}]")
        if not isinstance(reason, str) or not 1 <= len(reason) <= MAX_FAILURE_REASON_CHARS:
            raise InvalidArgument(f"reason must be 1..{MAX_FAILURE_REASON_CHARS} characters")
        with ctx.cond:
            row = ctx.store.get_round(rnd)
            if row is None or row.state != "closed":
                raise FailedPrecondition(f"round {rnd} is not closed; only a closed round's aggregate can be reported")
            ctx.store.add_failure_report(rnd, name, reason, ctx.now_ms())
            reports = ctx.store.failure_reports(rnd)
            needed = needed_reports(len(ctx.training_silos()))
            failed = ctx.store.failed_rounds()
            if rnd not in failed:
                log.warning("round %d: silo %s reports its aggregate unusable (%d of %d reports needed): %s",
                            rnd, name, len(reports), needed, excerpt(reason, 200))
                if len(reports) >= needed:
                    self._mark_failed(rnd, reports)
            return FailureReport(round_failed=rnd in ctx.store.failed_rounds(), reports=len(reports), needed=needed)

    def _mark_failed(self, rnd: int, reports: dict[str, str]) -> None:
        """Marks the round failed, naming who reported it and who uploaded to it (lock held)."""
        ctx = self.ctx
        uploaders = ", ".join(sorted(ctx.store.uploads(rnd))) or "nobody"
        first = excerpt(next(iter(reports.values())), 200)
        why = (f"round {rnd} failed: its aggregate is unusable (reported by {', '.join(sorted(reports))}: {first}); "
               f"uploads from {uploaders}; nobody applies it")[:1024]
        stop = ctx.cfg.on_failed_round is FailedRoundPolicy.STOP and ctx.state() is not RunState.FINISHED
        with ctx.store.transaction():
            ctx.store.mark_failed(rnd, why, ctx.now_ms())
            ctx.store.set_meta("message", why)
        log.error("%s", why)
        if stop:
            self.rounds.fail(f"failed: {why} (run.on_failed_round = stop)")
        ctx.cond.notify_all()

    def failure(self, rnd: int) -> str:
        """Why round ``rnd`` failed, or "" if it did not."""
        return self.ctx.store.failed_rounds().get(rnd, "")
