"""The round state machine, top to bottom: start, open, task, accept, close at quorum, deadline, decline, resume.

A run is WAITING until enough silos joined (and whatever gate the run sets, e.g. the key
ceremony, is passed), then RUNNING with exactly one open round at a time, then FINISHED after
its last round or FAILED when a quorum cannot be had. Every change happens under the run's lock
(``RunContext.cond``) and inside a database transaction, so a restarted coordinator resumes
exactly where the database says the run is. Upload admission (``coordinator.admission``) checks
an upload completely before it reaches :meth:`Rounds.accept`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from fedsilo.coordinator import weights
from fedsilo.coordinator.aggregation import aggregator_for
from fedsilo.coordinator.context import RunContext, file_sha256
from fedsilo.coordinator.records import (
    ENCODING_FOR,
    MAX_WAIT_S,
    RESUME_GRACE_S,
    SUM_CHECKPOINT_EVERY,
    AggregateInfo,
    RunState,
    SubmitResult,
    Task,
    TaskKind,
    UploadHeader,
)
from fedsilo.coordinator.schema import SiloRow
from fedsilo.core.atomic import fsync_dir
from fedsilo.core.errors import FailedPrecondition, InvalidArgument, NotFound
from fedsilo.core.phases import shared_numel
from fedsilo.privacy.pki import Identity

log = logging.getLogger("fedsilo.coordinator")

#: Why the run may not start yet although enough silos joined (None: it may), given the joined silos.
StartGate = Callable[[dict[str, SiloRow]], "str | None"]


class Rounds:
    """Where a round happens: opening, tasks, accepting uploads, closing, deadlines and declines.

    Args:
        ctx: the run's shared state.
        gate: what else must hold before round 1 opens (e.g. every joined silo has its wrapped key).
    """

    def __init__(self, ctx: RunContext, gate: StartGate) -> None:
        self.ctx = ctx
        self._gate = gate
        self._waiting_logged = -1

    # -- start ----------------------------------------------------------------------------
    def maybe_start(self) -> None:
        """Opens round 1 once ``min_silos`` joined and the gate allows, after the join grace or
        as soon as every enrolled silo joined (lock held)."""
        ctx = self.ctx
        if ctx.state() is not RunState.WAITING:
            return
        silos = ctx.store.silos()
        joined = len(silos)
        if joined < ctx.cfg.min_silos:
            return
        waiting_for = self._gate(silos)
        if waiting_for is not None:
            ctx.store.set_meta("message", waiting_for)
            return
        now = ctx.now_ms()
        quorum_at = ctx.store.get_meta("quorum_at_ms")
        if quorum_at is None:
            ctx.store.set_meta("quorum_at_ms", str(now))
            quorum_at = str(now)
        if joined == len(ctx.cfg.silos) or now >= int(quorum_at) + ctx.cfg.start_grace_s * 1000:
            with ctx.store.transaction():
                self._open_round(1)
            log.info("run %s started with %d of %d silos", ctx.cfg.run_id, joined, len(ctx.cfg.silos))

    def _open_round(self, rnd: int) -> None:
        """Opens a round (inside a transaction, lock held)."""
        ctx = self.ctx
        assert ctx.agg is not None
        layout = ctx.round_layout(rnd)
        if layout != ctx.agg.manifest:  # another phase shares other tensors
            ctx.agg = aggregator_for(ctx.cfg, layout)
        now = ctx.now_ms()
        normalizer = weights.fix_normalizer(ctx, ctx.store.silos())
        ctx.store.insert_round(rnd, opened_at_ms=now, deadline_ms=now + int(ctx.cfg.round_deadline_s * 1000),
                               params_shared=shared_numel(ctx.agg.manifest), weight_normalizer=normalizer)
        ctx.store.set_meta("state", RunState.RUNNING.value)
        ctx.store.set_meta("message", f"round {rnd} open")
        ctx.agg.reset()
        self._waiting_logged = -1

    # -- tasks ----------------------------------------------------------------------------
    def check_poll(self, *, after_round: int, wait_s: float) -> None:
        """Raises InvalidArgument unless a task poll's ``after_round`` and ``wait_s`` are in range."""
        rounds = self.ctx.cfg.rounds
        if not 0 <= after_round <= rounds:
            raise InvalidArgument(f"after_round {after_round} is not in [0, {rounds}]")
        if not 0 <= wait_s <= MAX_WAIT_S:
            raise InvalidArgument(f"wait_seconds {wait_s} is not in [0, {MAX_WAIT_S}]")

    def wait_task(self, name: str, *, after_round: int, wait_s: float,
                  alive: Callable[[], bool] = lambda: True) -> Task:
        """Long-polls for the next task of silo ``name`` after ``after_round``; ends early (within a
        second) once ``alive`` says the caller has gone, so a cancelled poll frees its slot.

        Raises:
            InvalidArgument: ``after_round`` or ``wait_s`` out of range.
        """
        ctx = self.ctx
        self.check_poll(after_round=after_round, wait_s=wait_s)
        end = time.monotonic() + wait_s
        with ctx.cond:
            while True:
                task = self._task_for(name, after_round)
                left = end - time.monotonic()
                if task.kind is not TaskKind.WAIT or left <= 0 or not alive():
                    return task
                ctx.cond.wait(timeout=min(left, 1.0))

    def _task_for(self, name: str, after_round: int) -> Task:
        ctx = self.ctx
        state = ctx.state()
        last_closed = ctx.store.last_closed_round()
        message = ctx.store.get_meta("message") or ""
        if state in (RunState.FINISHED, RunState.FAILED):
            return Task(kind=TaskKind.STOP, last_closed_round=last_closed, state=state, message=message)
        retired = ctx.store.retired().get(name)
        if retired is not None:
            message = f"this silo stopped training from round {retired[0]} ({retired[1]}); {message}"
            return Task(kind=TaskKind.WAIT, last_closed_round=last_closed, state=state, message=message[:1024])
        row = ctx.store.open_round()
        if state is RunState.RUNNING and row is not None and row.round > after_round:
            if name not in ctx.store.uploads(row.round):
                return Task(kind=TaskKind.TRAIN, round=row.round, base_round=row.round - 1,
                            deadline_ms=row.deadline_ms, last_closed_round=last_closed, state=state,
                            message=message, weight_normalizer=row.weight_normalizer,
                            phase=ctx.method.phase(row.round))
        return Task(kind=TaskKind.WAIT, last_closed_round=last_closed, state=state, message=message)

    # -- accept and close -------------------------------------------------------------------
    def accept(self, name: str, header: UploadHeader, spool: os.PathLike[str], digest: str, wire: int,
               received: int, *, statement: str = "") -> SubmitResult:
        """Adds an admitted upload and makes it durable before recording it (lock held).

        The payload file is kept (renamed into ``accepted/``) until the round closes, so a
        restarted coordinator rebuilds the running sum from the last checkpoint plus the
        accepted payloads after it: nothing is lost and nothing is added twice. Every
        ``SUM_CHECKPOINT_EVERY`` uploads the sum itself is saved and the payloads it covers
        are deleted, which bounds the disk used by an open round. The round closes as soon as
        every silo still training has uploaded.
        """
        ctx = self.ctx
        assert ctx.agg is not None
        rnd = header.round
        seq = len(ctx.store.uploads(rnd)) + 1
        kept = ctx.accepted_path(rnd, seq)
        checkpoint = seq % SUM_CHECKPOINT_EVERY == 0
        ctx.agg.add(spool, header.weight)
        try:
            os.replace(spool, kept)
            fsync_dir(ctx.accepted)
            if checkpoint:
                ctx.agg.save(ctx.sum_path(rnd, seq))
            with ctx.store.transaction():
                ctx.store.record_upload(rnd, name, seq=seq, weight=header.weight, payload_bytes=received,
                                        sha256=digest, wire_bytes=wire, now_ms=ctx.now_ms(), statement=statement)
                if checkpoint:
                    ctx.store.set_sum_version(rnd, seq)
        except BaseException:
            kept.unlink(missing_ok=True)
            if checkpoint:
                ctx.sum_path(rnd, seq).unlink(missing_ok=True)
            self._rebuild_sum(rnd)
            raise
        if checkpoint:
            for f in ctx.sums.glob(f"round_{rnd:06d}_v*"):
                if f != ctx.sum_path(rnd, seq):
                    f.unlink()
            for old in range(1, seq + 1):
                ctx.accepted_path(rnd, old).unlink(missing_ok=True)
        training = ctx.training_silos()
        log.info("round %d: accepted upload from %s (%d/%d)", rnd, name, seq, len(training))
        if all(s in ctx.store.uploads(rnd) for s in training):
            self._close_round(rnd)
        return SubmitResult(round=rnd, bytes_received=received, uploads_in_round=seq)

    def _close_round(self, rnd: int) -> None:
        """Writes the aggregate, closes the round and opens the next one or finishes the run (lock held)."""
        ctx = self.ctx
        assert ctx.agg is not None
        row = ctx.store.get_round(rnd)
        assert row is not None and row.state == "open"
        path = ctx.aggregate_path(rnd)
        ctx.agg.write_result(path, row.total_weight)
        digest = file_sha256(path)
        with ctx.store.transaction():
            ctx.store.close_round(rnd, now_ms=ctx.now_ms(), aggregate_sha256=digest)
            if rnd >= ctx.cfg.rounds:
                ctx.store.set_meta("state", RunState.FINISHED.value)
                ctx.store.set_meta("message", f"finished: all {ctx.cfg.rounds} rounds closed")
            else:
                self._open_round(rnd + 1)
        for f in [*ctx.sums.glob(f"round_{rnd:06d}_v*"), *ctx.accepted.glob(f"round_{rnd:06d}_*")]:
            f.unlink()
        n = len(ctx.store.uploads(rnd))
        log.info("round %d closed with %d contributor(s), total weight %g", rnd, n, row.total_weight)
        ctx.cond.notify_all()

    # -- deadlines ------------------------------------------------------------------------
    def tick(self) -> None:
        """Applies deadlines: starts the run after the join grace; past a round's deadline, closes
        it with a quorum of ``min_silos`` uploads, or fails the run once ``quorum_timeout_s`` more passed."""
        ctx = self.ctx
        with ctx.cond:
            state = ctx.state()
            if state is RunState.WAITING:
                self.maybe_start()
                if ctx.state() is RunState.RUNNING:
                    ctx.cond.notify_all()
                return
            row = ctx.store.open_round() if state is RunState.RUNNING else None
            if row is None:
                return
            now = ctx.now_ms()
            if now < row.deadline_ms:
                return
            n = len(ctx.store.uploads(row.round))
            if n >= ctx.cfg.min_silos:
                log.warning("round %d: deadline passed, closing with %d of %d silos (quorum %d)",
                            row.round, n, len(ctx.cfg.silos), ctx.cfg.min_silos)
                self._close_round(row.round)
            elif now >= row.deadline_ms + ctx.cfg.quorum_timeout_s * 1000:
                self.fail(f"failed: round {row.round} got {n} upload(s), fewer than min_silos = "
                           f"{ctx.cfg.min_silos}, within round_deadline_s + quorum_timeout_s")
            elif self._waiting_logged != row.round:
                self._waiting_logged = row.round
                log.warning("round %d: deadline passed with %d upload(s); waiting for quorum (%d)",
                            row.round, n, ctx.cfg.min_silos)

    def fail(self, msg: str) -> None:
        """Ends the run as failed, saying why (lock held)."""
        with self.ctx.store.transaction():
            self.ctx.store.set_meta("state", RunState.FAILED.value)
            self.ctx.store.set_meta("message", msg[:1024])
        log.error("run %s %s", self.ctx.cfg.run_id, msg)
        self.ctx.cond.notify_all()

    # -- declines -----------------------------------------------------------------------------
    def decline(self, name: str, *, rnd: int, reason: str, final: bool) -> tuple[RunState, int]:
        """Silo ``name`` declines a round; ``final`` retires it from training for the rest of the run.

        The run goes on without it; if fewer than ``min_silos`` silos are left training, the
        run ends as failed, saying why. If every silo still training has uploaded the open
        round, the round closes now.

        Returns:
            (run state afterwards, number of silos still training).

        Raises:
            InvalidArgument: round out of range or an empty / overlong reason.
            FailedPrecondition: the run has ended, or the silo already uploaded this round.
        """
        ctx = self.ctx
        if not 1 <= rnd <= ctx.cfg.rounds:
            raise InvalidArgument(f"round {rnd} is not in [1, {ctx.cfg.rounds}]")
        if not isinstance(reason, str) or not 1 <= len(reason) <= 1024:
            raise InvalidArgument("reason must be 1..1024 characters")
        with ctx.cond:
            state = ctx.state()
            if state in (RunState.FINISHED, RunState.FAILED):
                raise FailedPrecondition(f"run {ctx.cfg.run_id!r} is {state.value}")
            if name in ctx.store.uploads(rnd):
                raise FailedPrecondition(f"silo {name!r} already uploaded round {rnd}; it cannot decline it")
            log.warning("silo %s declines round %d%s: %s", name, rnd, " and every later round" if final else "",
                        reason)
            if not final:
                return state, len(ctx.training_silos())
            with ctx.store.transaction():
                ctx.store.retire(name, from_round=rnd, reason=reason, now_ms=ctx.now_ms())
            training = ctx.training_silos()
            if len(training) < ctx.cfg.min_silos:
                retired = ctx.store.retired()
                self.fail(f"failed: only {len(training)} silo(s) still training, fewer than min_silos = "
                           f"{ctx.cfg.min_silos}; stopped training: "
                           + "; ".join(f"{s} from round {r} ({why})" for s, (r, why) in sorted(retired.items())))
            else:
                row = ctx.store.open_round()
                if (state is RunState.RUNNING and row is not None and ctx.agg is not None
                        and ctx.store.uploads(row.round)
                        and all(s in ctx.store.uploads(row.round) for s in training)):
                    self._close_round(row.round)
            ctx.cond.notify_all()
            return ctx.state(), len(training)

    # -- aggregates -------------------------------------------------------------------------
    def aggregate(self, caller: Identity, rnd: int) -> AggregateInfo:
        """A closed round's aggregate, for a joined silo.

        Raises:
            InvalidArgument: round out of range.
            FailedPrecondition: the round is not closed yet.
            NotFound: its file is missing from the state dir.
        """
        ctx = self.ctx
        ctx.require_joined(caller)
        if not 1 <= rnd <= ctx.cfg.rounds:
            raise InvalidArgument(f"round {rnd} is not in [1, {ctx.cfg.rounds}]")
        row = ctx.store.get_round(rnd)
        if row is None or row.state != "closed":
            raise FailedPrecondition(f"round {rnd} is not closed yet; its aggregate does not exist")
        path = ctx.aggregate_path(rnd)
        if not path.is_file():
            raise NotFound(f"aggregate of round {rnd} is missing from the state dir")
        return AggregateInfo(round=rnd, num_contributors=len(ctx.store.uploads(rnd)),
                             total_weight=row.total_weight, manifest=ctx.round_layout(rnd), path=path,
                             encoding=ENCODING_FOR[ctx.cfg.aggregation], weight_normalizer=row.weight_normalizer,
                             failed=ctx.store.failed_rounds().get(rnd, ""))

    # -- resume ---------------------------------------------------------------------------------
    def resume(self) -> None:
        """Rebuilds the open round's aggregator and running sum, re-arms its deadline, removes leftovers."""
        ctx = self.ctx
        manifest = ctx.manifest()
        row = ctx.store.open_round()
        if manifest is not None:
            ctx.agg = aggregator_for(ctx.cfg, ctx.round_layout(row.round if row is not None else 1, manifest))
        keep = set()
        if row is not None and ctx.agg is not None:
            rnd = row.round
            keep.add(ctx.sum_path(rnd, row.sum_version))
            keep.update(ctx.accepted_path(rnd, seq) for seq, _ in ctx.store.uploads_after(rnd, row.sum_version))
            self._rebuild_sum(rnd)
            grace = ctx.now_ms() + int(min(ctx.cfg.round_deadline_s, RESUME_GRACE_S) * 1000)
            if row.deadline_ms < grace:
                ctx.store.set_deadline(rnd, grace)
            log.info("resuming round %d with %d upload(s) already counted", rnd, len(ctx.store.uploads(rnd)))
        for f in [*ctx.sums.iterdir(), *ctx.accepted.iterdir(), *ctx.aggregates.glob("*.tmp")]:
            if f not in keep:
                f.unlink()

    def _rebuild_sum(self, rnd: int) -> None:
        """Running sum of an open round = its last saved checkpoint + the accepted uploads after it."""
        ctx = self.ctx
        assert ctx.agg is not None
        row = ctx.store.get_round(rnd)
        assert row is not None
        ctx.agg.reset()
        if row.sum_version > 0:
            ctx.agg.load(ctx.sum_path(rnd, row.sum_version))
        for seq, weight in ctx.store.uploads_after(rnd, row.sum_version):
            ctx.agg.add(ctx.accepted_path(rnd, seq), weight)
