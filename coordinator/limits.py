"""Per-caller call limits and stall timeouts, so that one caller can never exhaust what the others need.

Every call to the coordinator passes ``fedsilo.coordinator.guard.CallGuard`` (a gRPC server
interceptor) before any of its request is read. The guard admits it under the caller's identity
(:func:`bucket_of`): each identity may hold at most :attr:`CallLimits.uploads` uploads, :attr:`~CallLimits.downloads`
downloads, :attr:`~CallLimits.long_polls` task long-polls and :attr:`~CallLimits.max_calls`
calls of any kind at once; beyond that it is refused at once (``ResourceExhausted``). The server
sizes its worker pool with :func:`worker_threads` so that every identity's share plus a reserve
always fits: no identity can take the workers another one needs.

While a call waits on its peer (for a request message, or for the client to take a response
message off the wire), :class:`StallWatchdog` measures it. A call is cut (``context.cancel()``;
the client sees ``CANCELLED``) when one message takes longer than ``stall_timeout_s``, or when
over its time spent waiting on the peer, less a first ``stall_timeout_s`` of grace, it moves
fewer than ``min_bytes_per_s`` bytes a second (a trickle of tiny messages). Time the
coordinator spends itself (checking an upload, a long-poll, waiting for a transfer slot) never
counts. Its worker and its slots are freed as soon as the call's handler returns.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedsilo.core.errors import ResourceExhausted

if TYPE_CHECKING:
    from fedsilo.coordinator.config import FederationConfig

log = logging.getLogger("fedsilo.coordinator")

#: Workers left over when every enrolled silo and one admin hold all the calls they may hold.
RESERVE_WORKERS = 16
#: Identity bucket of every caller that is neither an enrolled silo nor an admin.
OTHER_CALLERS = "other"


class CallKind(enum.Enum):
    """What a call holds while it runs."""

    UPLOAD = "upload"
    DOWNLOAD = "download"
    LONG_POLL = "long-poll"
    OTHER = "other"


#: The kind of each method that holds more than a moment; every other call is OTHER.
METHOD_KINDS = {
    "/fedsilo.v1.Federation/SubmitUpdate": CallKind.UPLOAD,
    "/fedsilo.v1.Federation/FetchAggregate": CallKind.DOWNLOAD,
    "/fedsilo.v1.Federation/GetTask": CallKind.LONG_POLL,
}


@dataclass(frozen=True, kw_only=True)
class CallLimits:
    """How many calls one identity may hold, and when a call counts as stalled.

    Attributes:
        max_calls: calls of any kind one identity may hold at once.
        uploads: SubmitUpdate streams one identity may hold at once.
        downloads: FetchAggregate streams one identity may hold at once.
        long_polls: GetTask long-polls one identity may hold at once.
        stall_timeout_s: longest wait for one message from (or to) the peer, in seconds.
        min_bytes_per_s: slowest average a transfer may have after its first ``stall_timeout_s``
            of waiting on the peer; 0 switches the rule off.
    """

    max_calls: int = 8
    uploads: int = 1
    downloads: int = 2
    long_polls: int = 2
    stall_timeout_s: float = 30.0
    min_bytes_per_s: int = 16 * 1024

    def __post_init__(self) -> None:
        for name in ("max_calls", "uploads", "downloads", "long_polls", "min_bytes_per_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "min_bytes_per_s" else 1):
                raise ValueError(f"CallLimits.{name}: {value!r} must be an integer >= 1 (min_bytes_per_s: >= 0)")
        for name in ("uploads", "downloads", "long_polls"):
            if getattr(self, name) > self.max_calls:
                raise ValueError(f"CallLimits.{name}: {getattr(self, name)} exceeds max_calls ({self.max_calls})")
        t = self.stall_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"CallLimits.stall_timeout_s: {t!r} must be a finite number > 0")

    @classmethod
    def from_config(cls, cfg: FederationConfig) -> CallLimits:
        """The limits a run's ``[server]`` settings ask for."""
        return cls(max_calls=cfg.max_calls_per_identity, stall_timeout_s=cfg.stall_timeout_s,
                   min_bytes_per_s=cfg.min_transfer_bytes_per_s)

    def of_kind(self, kind: CallKind) -> int | None:
        """The most calls of ``kind`` one identity may hold (None: only ``max_calls`` bounds it)."""
        return {CallKind.UPLOAD: self.uploads, CallKind.DOWNLOAD: self.downloads,
                CallKind.LONG_POLL: self.long_polls}.get(kind)


def worker_threads(limits: CallLimits, enrolled: int) -> int:
    """Workers enough for every enrolled silo, one admin and all other callers together to hold
    all the calls they may hold, plus :data:`RESERVE_WORKERS`."""
    return limits.max_calls * (enrolled + 2) + RESERVE_WORKERS


def bucket_of(caller: str, enrolled: frozenset[str]) -> str:
    """Whose share a call of ``caller`` ("role:name") counts against: an enrolled silo's or an
    admin's own, else the one share of all other callers (certificates of silos not enrolled,
    unidentified callers)."""
    role, _, name = caller.partition(":")
    if (role == "silo" and name in enrolled) or role == "admin":
        return caller
    return OTHER_CALLERS


class CallGate:
    """Counts the calls each identity holds; refuses one beyond its limits."""

    def __init__(self, limits: CallLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._held: dict[str, dict[CallKind, int]] = {}

    def admit(self, who: str, kind: CallKind) -> Callable[[], None]:
        """Admits a call of ``kind`` under identity ``who``; returns its release (idempotent).

        Raises:
            ResourceExhausted: ``who`` already holds as many such calls, or calls in all, as it may.
        """
        limits = self.limits
        with self._lock:
            held = self._held.setdefault(who, {})
            total = sum(held.values())
            most = limits.of_kind(kind)
            if most is not None and held.get(kind, 0) >= most:
                raise ResourceExhausted(f"{who} already holds {held[kind]} {kind.value} call(s), the most one caller "
                                        f"may hold at once ({kind.value} limit {most}); retry when one has ended")
            if total >= limits.max_calls:
                raise ResourceExhausted(f"{who} already holds {total} calls, the most one caller may hold at once "
                                        f"(server.max_calls_per_identity = {limits.max_calls}); retry when one has ended")
            held[kind] = held.get(kind, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                held[kind] -= 1
                if not any(held.values()) and self._held.get(who) is held:
                    del self._held[who]

        return release


class Watch:
    """One call's waits on its peer, as :class:`StallWatchdog` measures them.

    Attributes:
        what: the call, for log lines ("SubmitUpdate of silo:hospital-a").
        caller: who made it ("role:name").
        cancel: ends the call.
        cut: why the watchdog cut the call; None while it has not.
    """

    def __init__(self, dog: StallWatchdog, what: str, caller: str, cancel: Callable[[], None]) -> None:
        self._dog, self.what, self.caller, self.cancel = dog, what, caller, cancel
        self._since: float | None = None  # when the current wait on the peer began
        self._on = ""  # what it waits for
        self._waited = 0.0  # seconds spent waiting on the peer, finished waits
        self._bytes = 0
        self.cut: str | None = None

    def waiting(self, on: str) -> None:
        """The call starts waiting on its peer: ``on`` says for what ("the client's next message")."""
        with self._dog.lock:
            self._since, self._on = self._dog.clock(), on

    def moved(self, nbytes: int = 0) -> None:
        """The wait ended with ``nbytes`` moved."""
        with self._dog.lock:
            if self._since is not None:
                self._waited += self._dog.clock() - self._since
                self._since = None
            self._bytes += nbytes

    def close(self) -> None:
        """The call ended: stop watching it."""
        self._dog.forget(self)

    def stalled(self, now: float, limits: CallLimits) -> str | None:
        """Why the call counts as stalled at ``now`` (lock held), or None."""
        if self._since is None or self.cut is not None:
            return None
        wait = now - self._since
        if wait > limits.stall_timeout_s:
            return f"waited more than server.stall_timeout_s = {limits.stall_timeout_s:g} s for {self._on}"
        total = self._waited + wait
        rate = limits.min_bytes_per_s
        if rate and total > limits.stall_timeout_s and self._bytes < rate * (total - limits.stall_timeout_s):
            return (f"slower than server.min_transfer_bytes_per_s = {rate} ({self._bytes} bytes in {total:.1f} s "
                    "of waiting on the client)")
        return None


class StallWatchdog:
    """One thread that cuts calls that stall on their peer (see the module docstring).

    Args:
        limits: the stall rules.
        on_cut: called with the watch and the reason after a call was cut.
        clock: seconds, monotonic.
    """

    def __init__(self, limits: CallLimits, *, on_cut: Callable[[Watch, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.lock = threading.Lock()
        self._on_cut = on_cut
        self._watches: set[Watch] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stall-watchdog", daemon=True)

    def watch(self, what: str, caller: str, cancel: Callable[[], None]) -> Watch:
        """Starts watching call ``what`` of ``caller``; ``cancel`` ends it (``context.cancel``)."""
        w = Watch(self, what, caller, cancel)
        with self.lock:
            self._watches.add(w)
        return w

    def forget(self, w: Watch) -> None:
        """Stops watching ``w``."""
        with self.lock:
            self._watches.discard(w)

    def check(self) -> list[Watch]:
        """Cuts every call that counts as stalled now; returns them."""
        now = self.clock()
        with self.lock:
            stalled = [(w, why) for w in self._watches if (why := w.stalled(now, self.limits)) is not None]
            for w, why in stalled:
                w.cut = why
        for w, why in stalled:
            w.cancel()
            if self._on_cut is not None:
                self._on_cut(w, why)
        return [w for w, _ in stalled]

    def start(self) -> None:
        """Starts the watchdog thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stops the watchdog thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        period = min(1.0, self.limits.stall_timeout_s / 4)
        while not self._stop.wait(period):
            try:
                self.check()
            except Exception:
                log.exception("stall check failed")


class RateLimitedLog:
    """Log lines per caller: at most ``per_window`` in each window of ``window_s`` seconds; beyond
    that one line says they are being left out, and once the window ends one line says how many were.

    Args:
        logger: where the lines go.
        per_window: lines one caller may cause in a window.
        window_s: the window, in seconds.
        max_callers: callers tracked at once; callers beyond share one key.
        clock: seconds, monotonic.
    """

    def __init__(self, logger: logging.Logger, *, per_window: int = 20, window_s: float = 60.0,
                 max_callers: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self._logger, self._per_window, self._window_s = logger, per_window, window_s
        self._max_callers, self._clock = max_callers, clock
        self._lock = threading.Lock()
        self._windows: dict[str, list[float]] = {}  # caller -> [start, lines logged, lines left out]

    def log(self, level: int, caller: str, msg: str, *args: object) -> bool:
        """Logs ``msg % args`` unless ``caller`` already caused ``per_window`` lines this window.

        Returns:
            Whether the line was logged.
        """
        now = self._clock()
        notes: list[tuple[int, str, object]] = []
        with self._lock:
            for key, (start, _, left_out) in list(self._windows.items()):
                if now - start >= self._window_s:
                    del self._windows[key]
                    if left_out:
                        notes.append((logging.WARNING, "%s: %d more log lines were left out in %g s (at most %d a "
                                      "caller)", (key, int(left_out), self._window_s, self._per_window)))
            if caller not in self._windows and len(self._windows) >= self._max_callers:
                caller = "(other callers)"
            window = self._windows.setdefault(caller, [now, 0, 0])
            emit = window[1] < self._per_window
            if emit:
                window[1] += 1
            else:
                window[2] += 1
                if window[2] == 1:
                    notes.append((logging.WARNING, "%s: more than %d log lines in %g s; leaving the rest out "
                                  "until the window ends", (caller, self._per_window, self._window_s)))
        for note_level, note, note_args in notes:
            self._logger.log(note_level, note, *note_args)  # type: ignore[misc]
        if emit:
            self._logger.log(level, msg, *args, stacklevel=2)
        return emit


__all__ = ["METHOD_KINDS", "CallGate", "CallKind", "CallLimits", "RateLimitedLog", "StallWatchdog", "Watch",
           "bucket_of", "worker_threads"]
