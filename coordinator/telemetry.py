"""Liveness, traffic and evaluation numbers: heartbeats, byte counters, metrics reports, run status and round summaries."""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from fedsilo.coordinator.context import RunContext
from fedsilo.coordinator.records import (
    MAX_METRICS,
    MAX_WEIGHT,
    TELEMETRY_FLUSH_S,
    RoundSummary,
    RoundUpload,
    RunState,
    SiloStatus,
    Status,
)
from fedsilo.core.errors import FailedPrecondition, InvalidArgument
from fedsilo.core.validators import excerpt
from fedsilo.privacy.pki import Identity

_METRIC_RE = re.compile(r"[a-z0-9_]{1,64}")


@dataclass(frozen=True, kw_only=True)
class RunCounters:
    """The run's totals for operations metrics, read from the database in a few queries.

    Attributes:
        rounds_opened: rounds opened so far (open, closed or failed).
        rounds_closed: rounds closed with an aggregate (failed ones included).
        rounds_failed: closed rounds marked failed.
        round_seconds: how long each closed round was open, in round order.
        uploads: silo -> uploads accepted from it, open rounds included.
        bytes_up: wire bytes received from silos, as the round summaries count them (all rounds).
        bytes_down: wire bytes sent to silos, likewise.
    """

    rounds_opened: int
    rounds_closed: int
    rounds_failed: int
    round_seconds: tuple[float, ...]
    uploads: Mapping[str, int]
    bytes_up: int
    bytes_down: int


class Telemetry:
    """Batched last-seen times and traffic counters (written every few seconds), metrics, and reports.

    Args:
        ctx: the run's shared state.
    """

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()
        self._last_seen: dict[str, int] = {}
        self._traffic: dict[int, tuple[int, int]] = {}
        self._last_flush = time.monotonic()

    # -- counters -------------------------------------------------------------------------
    def seen(self, name: str) -> None:
        """Records that silo ``name`` was alive now (batched)."""
        with self._lock:
            self._last_seen[name] = self.ctx.now_ms()

    def count_bytes(self, rnd: int, *, up: int = 0, down: int = 0) -> None:
        """Adds wire traffic (serialized message sizes) to a round's counters (batched)."""
        if rnd >= 1:
            with self._lock:
                u, d = self._traffic.get(rnd, (0, 0))
                self._traffic[rnd] = (u + up, d + down)

    def flush(self) -> None:
        """Writes the batched last-seen times and traffic counters to the database."""
        with self._lock:
            seen, traffic = self._last_seen, self._traffic
            self._last_seen, self._traffic = {}, {}
            self._last_flush = time.monotonic()
        if seen or traffic:
            self.ctx.store.flush_telemetry(seen, traffic)

    def maybe_flush(self) -> None:
        """Flushes when ``TELEMETRY_FLUSH_S`` passed since the last write."""
        if time.monotonic() - self._last_flush >= TELEMETRY_FLUSH_S:
            self.flush()

    # -- silo reports -----------------------------------------------------------------------
    def heartbeat(self, caller: Identity) -> tuple[RunState, int]:
        """Records liveness; returns (run state, open round or 0)."""
        self.seen(self.ctx.require_joined(caller))
        return self.ctx.state(), self.ctx.open_round_number()

    def report_metrics(self, caller: Identity, rnd: int, metrics: list[tuple[str, float, int]],
                       wire_bytes: int = 0) -> int:
        """Stores a silo's evaluation numbers for a closed round.

        Raises:
            InvalidArgument: bad names, non-finite values, duplicates, too many.
            FailedPrecondition: the round is not closed.
        """
        ctx = self.ctx
        name = ctx.require_joined(caller)
        if not 1 <= len(metrics) <= MAX_METRICS:
            raise InvalidArgument(f"expected 1..{MAX_METRICS} metrics, got {len(metrics)}")
        for mname, _, _ in metrics:  # every name first: nothing below touches a long one
            if not isinstance(mname, str) or not _METRIC_RE.fullmatch(mname):
                raise InvalidArgument(f"metric name '{excerpt(mname)}' is not 1..64 chars of [a-z0-9_]")
        names: set[str] = set()
        for mname, value, n in metrics:
            if mname in names:
                raise InvalidArgument(f"metric {mname!r} appears twice")
            names.add(mname)
            if not math.isfinite(value):
                raise InvalidArgument(f"metric {mname!r} is not finite ({value})")
            if not 0 <= n <= MAX_WEIGHT:
                raise InvalidArgument(f"metric {mname!r}: num_examples {n} is not in [0, 10^9]")
        row = ctx.store.get_round(rnd) if 1 <= rnd <= ctx.cfg.rounds else None
        if row is None or row.state != "closed":
            raise FailedPrecondition(f"round {rnd} is not closed; metrics are reported after its aggregate")
        ctx.store.put_metrics(rnd, name, metrics)
        self.count_bytes(rnd, up=wire_bytes)
        return len(metrics)

    # -- admin views ----------------------------------------------------------------------
    def status(self) -> Status:
        """The run at a glance."""
        self.flush()
        store = self.ctx.store
        silos = store.silos()
        contrib = store.contributions()
        retired = store.retired()
        return Status(
            run_id=self.ctx.cfg.run_id,
            state=self.ctx.state(),
            open_round=self.ctx.open_round_number(),
            last_closed_round=store.last_closed_round(),
            total_rounds=self.ctx.cfg.rounds,
            silos=tuple(
                SiloStatus(name=s, joined=s in silos, last_seen_ms=silos[s].last_seen_ms if s in silos else 0,
                           rounds_contributed=contrib.get(s, 0),
                           num_train_examples=silos[s].num_train_examples if s in silos else 0,
                           retired_from_round=retired[s][0] if s in retired else 0,
                           retired_reason=retired[s][1] if s in retired else "")
                for s in self.ctx.cfg.silos
            ),
            message=store.get_meta("message") or "",
        )

    def counters(self) -> RunCounters:
        """The run's totals (pending traffic written first), in a few queries whatever the number of rounds."""
        self.flush()
        store = self.ctx.store
        rows = store.rounds()
        closed = [r for r in rows if r.state == "closed"]
        return RunCounters(rounds_opened=len(rows), rounds_closed=len(closed), rounds_failed=len(store.failed_rounds()),
                           round_seconds=tuple((r.closed_at_ms - r.opened_at_ms) / 1000.0 for r in closed),
                           uploads=store.upload_counts(), bytes_up=sum(r.bytes_up for r in rows),
                           bytes_down=sum(r.bytes_down for r in rows))

    def round_summaries(self) -> list[RoundSummary]:
        """Every round so far."""
        self.flush()
        store = self.ctx.store
        out = []
        failed = store.failed_rounds()
        for r in store.rounds():
            seconds = ((r.closed_at_ms - r.opened_at_ms) / 1000.0) if r.closed_at_ms else 0.0
            uploads = tuple(RoundUpload(silo=s, accepted_at_ms=at, payload_bytes=n)
                            for s, at, n in store.upload_log(r.round))
            out.append(RoundSummary(round=r.round, closed=r.state == "closed",
                                    contributors=tuple(u.silo for u in uploads), params_shared=r.params_shared,
                                    bytes_up=r.bytes_up, bytes_down=r.bytes_down, seconds=seconds,
                                    total_weight=r.total_weight, metrics=store.metrics(r.round),
                                    failure=failed.get(r.round, ""), opened_at_ms=r.opened_at_ms,
                                    deadline_ms=r.deadline_ms, closed_at_ms=r.closed_at_ms or 0,
                                    quorum=self.ctx.cfg.min_silos, uploads=uploads))
        return out
