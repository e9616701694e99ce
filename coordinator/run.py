"""The run and round state machine: joins, tasks, streamed uploads, quorum and deadlines."""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fedsilo.coordinator.aggregation import Aggregator, PlainAggregator
from fedsilo.core.atomic import atomic_write, fsync_dir
from fedsilo.coordinator.config import AggregationMode, ConfigError, FederationConfig
from fedsilo.core.phases import SharePhase, masked_manifest, phase_manifest, shared_numel
from fedsilo.coordinator.phases import carries_local_part, ledger_position, phase_for
from fedsilo.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from fedsilo.coordinator.store import SiloRow, Store
from fedsilo.core.tensors import Manifest
from fedsilo.privacy.ledger import DuplicateEntryError, GuaranteeScope, LedgerError, LedgerMirror
from fedsilo.privacy.pki import Identity, Role
from fedsilo.privacy.plan import entry_key

log = logging.getLogger("fedsilo.coordinator")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SINGLE = GuaranteeScope.SINGLE_UPLOAD
_METRIC_RE = re.compile(r"^[a-z0-9_]{1,64}$")
MAX_WEIGHT = 1e9
MAX_WAIT_S = 60
RESUME_GRACE_S = 30.0
#: The running sum is saved after every this many uploads; payloads after it are kept until then.
SUM_CHECKPOINT_EVERY = 8
#: Seconds between writes of the batched liveness and traffic counters.
TELEMETRY_FLUSH_S = 2.0


class RunState(enum.Enum):
    """Life cycle of a run (values are stored in the database)."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class PayloadEncoding(enum.Enum):
    """Layout of an upload or aggregate payload (values match ``fedsilo.v1.PayloadEncoding``)."""

    RAW_TENSORS = 1
    HE_CIPHERTEXTS = 2


ENCODING_FOR: dict[AggregationMode, PayloadEncoding] = {
    AggregationMode.PLAIN: PayloadEncoding.RAW_TENSORS,
    AggregationMode.HE: PayloadEncoding.HE_CIPHERTEXTS,
}
MAX_WRAPPED_KEY_BYTES = 4 * 2**20
MAX_ANNOUNCEMENT_BYTES = 16 * 2**10
MAX_BUDGET_STATEMENT_BYTES = 32 * 2**10
MAX_LEDGER_BATCH = 64
MAX_LEDGER_ENTRY_CHARS = 32 * 2**10
MAX_STYLE_BANK_BYTES = 4 * 2**20
STYLE_BANK_PAGE_BYTES = 4 * 2**20


class TaskKind(enum.Enum):
    """What an agent should do next."""

    WAIT = "wait"
    TRAIN = "train"
    STOP = "stop"


@dataclass(frozen=True, kw_only=True)
class Task:
    """Answer to a task poll."""

    kind: TaskKind
    round: int = 0
    base_round: int = 0
    deadline_ms: int = 0
    last_closed_round: int = 0
    state: RunState = RunState.WAITING
    message: str = ""
    weight_normalizer: float = 0.0
    phase: SharePhase = SharePhase.ALL


@dataclass(frozen=True, kw_only=True)
class UploadHeader:
    """First part of an upload stream."""

    round: int
    weight: float
    manifest: Manifest
    encoding: PayloadEncoding = PayloadEncoding.RAW_TENSORS
    payload_bytes: int = -1  # -1: the manifest's raw size
    wire_bytes: int = 0

    @property
    def size(self) -> int:
        """Payload bytes that follow the header."""
        return self.manifest.total_bytes if self.payload_bytes < 0 else self.payload_bytes


@dataclass(frozen=True, kw_only=True)
class UploadChunk:
    """Payload bytes of an upload stream."""

    data: bytes
    wire_bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class UploadTrailer:
    """Last part of an upload stream."""

    num_chunks: int
    sha256: bytes
    wire_bytes: int = 0


UploadPart = UploadHeader | UploadChunk | UploadTrailer


@dataclass(frozen=True, kw_only=True)
class SubmitResult:
    """An accepted upload."""

    round: int
    bytes_received: int
    uploads_in_round: int


@dataclass(frozen=True, kw_only=True)
class AggregateInfo:
    """A closed round's aggregate on disk."""

    round: int
    num_contributors: int
    total_weight: float
    manifest: Manifest
    path: Path
    encoding: PayloadEncoding
    weight_normalizer: float


@dataclass(frozen=True, kw_only=True)
class SiloStatus:
    """An enrolled silo as the coordinator sees it."""

    name: str
    joined: bool
    last_seen_ms: int
    rounds_contributed: int
    num_train_examples: int
    retired_from_round: int = 0
    retired_reason: str = ""


@dataclass(frozen=True, kw_only=True)
class Status:
    """The run at a glance."""

    run_id: str
    state: RunState
    open_round: int
    last_closed_round: int
    total_rounds: int
    silos: tuple[SiloStatus, ...]
    message: str


@dataclass(frozen=True, kw_only=True)
class RoundSummary:
    """One round's record."""

    round: int
    closed: bool
    contributors: tuple[str, ...]
    params_shared: int
    bytes_up: int
    bytes_down: int
    seconds: float
    total_weight: float
    metrics: dict[str, list[tuple[str, float, int]]]


def _aggregator_for(config: FederationConfig, manifest: Manifest) -> Aggregator:
    if config.aggregation is AggregationMode.PLAIN:
        return PlainAggregator(manifest)
    if config.aggregation is AggregationMode.HE:
        from fedsilo.coordinator.aggregation.he import HeAggregator

        return HeAggregator(manifest, config.he_params())
    raise ConfigError(f"run.aggregation: {config.aggregation.value!r} is not supported")


class Coordinator:
    """One federated run, persisted in ``config.state_dir``.

    All methods are plain Python: the gRPC servicer only converts messages and maps the
    exceptions of ``fedsilo.core.errors`` to status codes. A coordinator started on an
    existing state dir resumes the run exactly where the database says it is.

    Args:
        config: the validated run config.
        clock: seconds since the epoch (tests pass a fake clock).
    """

    def __init__(self, config: FederationConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = config
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())
        state_dir = Path(config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self._spool = state_dir / "spool"
        self._sums = state_dir / "sums"
        self._aggregates = state_dir / "aggregates"
        self._accepted = state_dir / "accepted"
        for d in (self._spool, self._sums, self._aggregates, self._accepted):
            d.mkdir(exist_ok=True)
        for leftover in self._spool.iterdir():
            leftover.unlink()
        self._store = Store(state_dir / "coordinator.sqlite")
        self._state_dir = state_dir
        self._ca_pem: bytes | None = None
        self._mirror: LedgerMirror | None = None
        if config.privacy is not None:
            from fedsilo.privacy.budget import CA_FILE, MIRROR_FILE

            assert config.tls is not None  # the config refuses DP without TLS
            self._ca_pem = Path(config.tls.ca).read_bytes()
            atomic_write(state_dir / CA_FILE, self._ca_pem)
            self._mirror = LedgerMirror.open(state_dir / MIRROR_FILE)
            if config.strategy.masked:
                from fedsilo.privacy.audit import resfim_disclosures, write_disclosures

                assert config.resfim is not None
                r = config.resfim
                write_disclosures(state_dir, resfim_disclosures(
                    rho=r.rho, recompute_every=r.recompute_every, beta=r.beta, clusters=r.clusters,
                    plan=config.privacy if config.privacy.resfim_every else None))
        fingerprint = config.run_fingerprint()
        stored = self._store.get_meta("run_fingerprint")
        if stored is None:
            with self._store.transaction():
                self._store.set_meta("run_fingerprint", fingerprint)
                self._store.set_meta("run_id", config.run_id)
                self._store.set_meta("state", RunState.WAITING.value)
                self._store.set_meta("message", "waiting for silos to join")
        elif stored != fingerprint:
            run_id = self._store.get_meta("run_id")
            self._store.close()
            raise ConfigError(
                f"state dir {state_dir} holds run {run_id!r} with a different "
                "configuration (run id, silos, rounds, strategy, aggregation, model or training changed); "
                "start the new run with a new server.state_dir"
            )
        self._agg: Aggregator | None = None
        self._waiting_logged = -1
        # liveness and traffic counters are batched in memory and written every few seconds
        self._telemetry_lock = threading.Lock()
        self._last_seen: dict[str, int] = {}
        self._traffic: dict[int, tuple[int, int]] = {}
        self._last_flush = time.monotonic()
        manifest = self._manifest()
        if manifest is not None:
            open_round = self._store.open_round()
            self._agg = _aggregator_for(config, self._layout(manifest) if open_round is None else
                                        self._round_manifest(open_round.round))
        try:
            self._check_planned_spend()
        except ConfigError:
            self.close()
            raise
        self._resume()

    def _check_planned_spend(self) -> None:
        """Refuses to start a run whose planned spend exceeds a budget agreed with a silo.

        Checked while no round has opened yet: the mirrored history of each silo with a
        budget in ``[privacy.budgets]``, composed with every round of this run's plan, must
        stay within that budget for every neighbouring relation (single-upload scope).

        Raises:
            ConfigError: naming the silo, the relation and both figures.
        """
        plan = self.cfg.privacy
        if plan is None or not self.cfg.budgets or self._store.rounds():
            return
        from fedsilo.privacy.plan import projected_spend

        assert self._mirror is not None
        for silo, budget in self.cfg.budgets.items():
            spend = projected_spend(self._mirror.entries(silo), plan.round_releases(), delta=plan.delta,
                                    repeats=self.cfg.rounds, extra=plan.run_extras(self.cfg.rounds))
            for relation, eps in spend.items():
                if eps > budget:
                    raise ConfigError(
                        f"privacy.budgets.{silo}: the run's plan would bring silo {silo!r}'s {relation.value}-level "
                        f"ε to {eps:.4f} after {self.cfg.rounds} rounds (δ = {plan.delta:g}, its history included), "
                        f"above its budget {budget:g}; lower run.rounds or raise the noise"
                    )

    # -- helpers ------------------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _state(self) -> RunState:
        return RunState(self._store.get_meta("state"))

    def _manifest(self) -> Manifest | None:
        data = self._store.get_json("manifest")
        return None if data is None else Manifest.from_json(data)

    def _layout(self, manifest: Manifest, *, local_part: bool = True) -> Manifest:
        """What an upload of ``manifest``'s tensors carries: masked strategies add the companion sets."""
        return masked_manifest(manifest, local_part=local_part) if self.cfg.strategy.masked else manifest

    def _params_shared(self) -> int:
        """Parameters the open round shares (a masked upload carries each one three times)."""
        assert self._agg is not None
        return shared_numel(self._agg.manifest)

    def _round_manifest(self, rnd: int) -> Manifest:
        """The layout of round ``rnd``'s uploads: the run's manifest restricted to the round's phase
        (with the masked companion sets for ResFIM strategies)."""
        manifest = self._manifest()
        assert manifest is not None
        return self._layout(phase_manifest(manifest, phase_for(self.cfg.strategy, rnd)),
                            local_part=carries_local_part(self.cfg.strategy, rnd, self.cfg.rounds))

    def _sum_path(self, rnd: int, version: int) -> Path:
        return self._sums / f"round_{rnd:06d}_v{version:06d}.f64"

    def _aggregate_path(self, rnd: int) -> Path:
        return self._aggregates / f"round_{rnd:06d}.bin"

    def _accepted_path(self, rnd: int, seq: int) -> Path:
        return self._accepted / f"round_{rnd:06d}_{seq:06d}.part"

    def _rebuild_sum(self, rnd: int) -> None:
        """Running sum of an open round = its last saved checkpoint + the accepted uploads after it."""
        assert self._agg is not None
        row = self._store.get_round(rnd)
        assert row is not None
        self._agg.reset()
        if row.sum_version > 0:
            self._agg.load(self._sum_path(rnd, row.sum_version))
        for seq, weight in self._store.uploads_after(rnd, row.sum_version):
            self._agg.add(self._accepted_path(rnd, seq), weight)

    def _resume(self) -> None:
        """Rebuilds the running sum of the open round, re-arms its deadline, removes leftovers."""
        open_round = self._store.open_round()
        keep: set[Path] = set()
        if open_round is not None and self._agg is not None:
            rnd = open_round.round
            keep.add(self._sum_path(rnd, open_round.sum_version))
            keep.update(self._accepted_path(rnd, seq) for seq, _ in self._store.uploads_after(rnd, open_round.sum_version))
            self._rebuild_sum(rnd)
            grace = self._now_ms() + int(min(self.cfg.round_deadline_s, RESUME_GRACE_S) * 1000)
            if open_round.deadline_ms < grace:
                self._store.set_deadline(rnd, grace)
            log.info("resuming round %d with %d upload(s) already counted", rnd, len(self._store.uploads(rnd)))
        for f in [*self._sums.iterdir(), *self._accepted.iterdir(), *self._aggregates.glob("*.tmp")]:
            if f not in keep:
                f.unlink()

    def _require_silo(self, caller: Identity) -> str:
        if caller.role is not Role.SILO:
            raise PermissionDenied(f"a {caller.role.value} certificate cannot act as a silo")
        if caller.name not in self.cfg.silos:
            raise PermissionDenied(f"silo {caller.name!r} is not enrolled in run {self.cfg.run_id!r}")
        return caller.name

    def _require_joined(self, caller: Identity) -> str:
        name = self._require_silo(caller)
        if name not in self._store.silos():
            raise FailedPrecondition(f"silo {name!r} has not joined run {self.cfg.run_id!r}; call Join first")
        return name

    def require_admin(self, caller: Identity) -> None:
        """Admin RPCs need an admin certificate.

        Raises:
            PermissionDenied: for any other role.
        """
        if caller.role is not Role.ADMIN:
            raise PermissionDenied(f"admin RPCs need an admin certificate, not a {caller.role.value} one")

    # -- run info and join --------------------------------------------------------------
    def run_config(self, caller: Identity) -> FederationConfig:
        """The run's config, for an enrolled silo (model and training settings included).

        Raises:
            PermissionDenied: not an enrolled silo.
        """
        self._require_silo(caller)
        return self.cfg

    def join(self, caller: Identity, *, model_fingerprint: str, num_train_examples: int,
             manifest: Manifest, agent_version: str, kem_announcement: bytes = b"",
             budget_statement: bytes = b"") -> tuple[str, RunState, int]:
        """Joins (or re-joins) the run.

        Returns:
            (silo name, run state, last closed round).

        Raises:
            PermissionDenied: not an enrolled silo.
            InvalidArgument: malformed fingerprint, example count or manifest.
            FailedPrecondition: a model or manifest that differs from the other silos'.
        """
        name = self._require_silo(caller)
        if not isinstance(model_fingerprint, str) or not _HEX64.match(model_fingerprint):
            raise InvalidArgument("model_fingerprint must be 64 lowercase hex characters (SHA-256)")
        if not 1 <= num_train_examples <= MAX_WEIGHT:
            raise InvalidArgument(f"num_train_examples {num_train_examples} is not in [1, 10^9]")
        if len(agent_version) > 64:
            raise InvalidArgument("agent_version is longer than 64 characters")
        if self.cfg.aggregation is AggregationMode.HE and not 1 <= len(kem_announcement) <= MAX_ANNOUNCEMENT_BYTES:
            raise InvalidArgument("kem_announcement (the silo's signed X25519 key) is required for HE aggregation, "
                                  f"1..{MAX_ANNOUNCEMENT_BYTES} bytes")
        budget = self._check_budget_statement(name, budget_statement)
        with self._cond:
            known_fp = self._store.get_meta("model_fingerprint")
            if known_fp is not None and known_fp != model_fingerprint:
                raise FailedPrecondition(
                    f"model fingerprint {model_fingerprint[:12]}… differs from the run's {known_fp[:12]}…: "
                    "the silo built a different model (check the fedsilo version and model settings)"
                )
            known_manifest = self._manifest()
            if known_manifest is not None:
                diff = manifest.difference(known_manifest)
                if diff is not None:
                    raise FailedPrecondition(f"shared tensors differ from the run's: {diff}")
            if self.cfg.strategy.alternates_factors:
                for phase in (SharePhase.LORA_B, SharePhase.LORA_A):
                    try:
                        phase_manifest(manifest, phase)
                    except InvalidArgument:
                        raise InvalidArgument(f"strategy {self.cfg.strategy.value} needs LoRA factors to share, but no shared tensor is a "
                                              f"{phase.value.replace('_', ' ').replace('lora', 'LoRA')} factor") from None
            agg = self._agg or _aggregator_for(self.cfg, self._layout(manifest))
            if agg.payload_bytes_bound() > self.cfg.max_upload_bytes:
                raise ResourceExhausted(
                    f"this model's uploads take up to {agg.payload_bytes_bound()} bytes "
                    f"({self.cfg.aggregation.value} aggregation), more than server.max_upload_bytes "
                    f"({self.cfg.max_upload_bytes})"
                )
            now = self._now_ms()
            with self._store.transaction():
                if known_fp is None:
                    self._store.set_meta("model_fingerprint", model_fingerprint)
                    self._store.set_meta("manifest", _json(manifest.to_json()))
                self._store.upsert_silo(SiloRow(name=name, joined_at_ms=now, last_seen_ms=now,
                                                num_train_examples=int(num_train_examples),
                                                agent_version=agent_version,
                                                kem_public_key=bytes(kem_announcement) or None))
            if budget is not None:
                from fedsilo.privacy.budget import BUDGETS_DIR

                (self._state_dir / BUDGETS_DIR).mkdir(exist_ok=True)
                atomic_write(self._state_dir / BUDGETS_DIR / f"{name}.json", budget.to_json().encode("ascii"))
            self._agg = agg
            log.info("silo %s joined (%d training examples%s)", name, num_train_examples,
                     "" if budget is None else f"; privacy budget ε = {budget.epsilon:g} at δ = {budget.delta:g}")
            self._maybe_start()
            self._cond.notify_all()
            return name, self._state(), self._store.last_closed_round()

    def _check_budget_statement(self, name: str, raw: bytes):  # -> BudgetStatement | None
        """Verifies a joining silo's signed budget (DP runs need one; others must send none)."""
        if self.cfg.privacy is None:
            if raw:
                raise InvalidArgument("budget_statement given, but this run has no differential privacy")
            return None
        if not 1 <= len(raw) <= MAX_BUDGET_STATEMENT_BYTES:
            raise InvalidArgument("budget_statement (the silo's signed privacy budget) is required in a run with "
                                  f"differential privacy, 1..{MAX_BUDGET_STATEMENT_BYTES} bytes")
        from fedsilo.privacy.budget import BudgetError, BudgetStatement

        assert self._ca_pem is not None
        try:
            statement = BudgetStatement.from_json(bytes(raw))
            statement.verify(ca_pem=self._ca_pem)
        except BudgetError as exc:
            raise InvalidArgument(f"budget_statement refused: {exc}") from None
        if statement.silo != name:
            raise InvalidArgument(f"budget_statement is silo {statement.silo!r}'s, but the caller is {name!r}")
        return statement

    def _training_silos(self) -> list[str]:
        """Enrolled silos that have not retired from training."""
        retired = self._store.retired()
        return [s for s in self.cfg.silos if s not in retired]

    def _maybe_start(self) -> None:
        if self._state() is not RunState.WAITING:
            return
        silos = self._store.silos()
        joined = len(silos)
        if joined < self.cfg.min_silos:
            return
        if self.cfg.aggregation is AggregationMode.HE:
            missing = self._key_recipients_missing(silos)
            if self.cfg.key_holder not in silos or missing:
                self._store.set_meta("message", f"waiting for the key holder {self.cfg.key_holder!r} to join and "
                                                f"wrap the run's key for {sorted(missing) or 'the others'}")
                return
        now = self._now_ms()
        quorum_at = self._store.get_meta("quorum_at_ms")
        if quorum_at is None:
            self._store.set_meta("quorum_at_ms", str(now))
            quorum_at = str(now)
        if joined == len(self.cfg.silos) or now >= int(quorum_at) + self.cfg.start_grace_s * 1000:
            with self._store.transaction():
                self._open_round(1)
            log.info("run %s started with %d of %d silos", self.cfg.run_id, joined, len(self.cfg.silos))

    def _open_round(self, rnd: int) -> None:
        """Opens a round (inside a transaction, lock held)."""
        assert self._agg is not None
        manifest = self._round_manifest(rnd)
        if manifest != self._agg.manifest:  # a new phase shares other tensors
            self._agg = _aggregator_for(self.cfg, manifest)
        now = self._now_ms()
        silos = self._store.silos()
        if self.cfg.privacy is not None and self.cfg.privacy.silo_level:
            normalizer = float(len(silos))  # every silo has weight 1 (silo-level DP)
        else:
            normalizer = float(sum(s.num_train_examples for s in silos.values()))
        self._store.insert_round(rnd, opened_at_ms=now, deadline_ms=now + int(self.cfg.round_deadline_s * 1000),
                                 params_shared=self._params_shared(), weight_normalizer=normalizer)
        self._store.set_meta("state", RunState.RUNNING.value)
        self._store.set_meta("message", f"round {rnd} open")
        self._agg.reset()
        self._waiting_logged = -1

    # -- tasks --------------------------------------------------------------------------
    def get_task(self, caller: Identity, *, after_round: int, wait_s: float) -> Task:
        """Long-polls for the next task of ``caller`` after ``after_round``.

        Raises:
            InvalidArgument: ``after_round`` or ``wait_s`` out of range.
        """
        name = self._require_joined(caller)
        if not 0 <= after_round <= self.cfg.rounds:
            raise InvalidArgument(f"after_round {after_round} is not in [0, {self.cfg.rounds}]")
        if not 0 <= wait_s <= MAX_WAIT_S:
            raise InvalidArgument(f"wait_seconds {wait_s} is not in [0, {MAX_WAIT_S}]")
        end = time.monotonic() + wait_s
        self._seen(name)
        with self._cond:
            while True:
                task = self._task_for(name, after_round)
                left = end - time.monotonic()
                if task.kind is not TaskKind.WAIT or left <= 0:
                    return task
                self._cond.wait(timeout=min(left, 1.0))

    def _task_for(self, name: str, after_round: int) -> Task:
        state = self._state()
        last_closed = self._store.last_closed_round()
        message = self._store.get_meta("message") or ""
        if state in (RunState.FINISHED, RunState.FAILED):
            return Task(kind=TaskKind.STOP, last_closed_round=last_closed, state=state, message=message)
        retired = self._store.retired().get(name)
        if retired is not None:
            message = f"this silo stopped training from round {retired[0]} ({retired[1]}); {message}"
            return Task(kind=TaskKind.WAIT, last_closed_round=last_closed, state=state, message=message[:1024])
        open_round = self._store.open_round()
        if state is RunState.RUNNING and open_round is not None and open_round.round > after_round:
            if name not in self._store.uploads(open_round.round):
                return Task(kind=TaskKind.TRAIN, round=open_round.round, base_round=open_round.round - 1,
                            deadline_ms=open_round.deadline_ms, last_closed_round=last_closed, state=state,
                            message=message, weight_normalizer=open_round.weight_normalizer,
                            phase=phase_for(self.cfg.strategy, open_round.round))
        return Task(kind=TaskKind.WAIT, last_closed_round=last_closed, state=state, message=message)

    # -- uploads ------------------------------------------------------------------------
    def _check_upload(self, name: str, header: UploadHeader) -> None:
        """Raises unless ``name`` may upload ``header`` now (lock held)."""
        state = self._state()
        if state is not RunState.RUNNING:
            raise FailedPrecondition(f"run {self.cfg.run_id!r} is {state.value}; no round is open")
        open_round = self._store.open_round()
        assert open_round is not None and self._agg is not None
        if header.round != open_round.round:
            when = "closed" if header.round < open_round.round else "not open yet"
            raise FailedPrecondition(
                f"round {header.round} is {when}; the open round is {open_round.round}"
            )
        if name in self._store.uploads(header.round):
            raise AlreadyExists(f"silo {name!r} already uploaded its update for round {header.round}")
        retired = self._store.retired().get(name)
        if retired is not None:
            raise FailedPrecondition(f"silo {name!r} stopped training from round {retired[0]} ({retired[1]})")
        plan = self.cfg.privacy
        if plan is not None:
            if plan.silo_level and header.weight != 1.0:
                raise InvalidArgument(f"weight {header.weight} must be 1: silo-level DP weights every silo equally")
            self._check_accounted(name, header.round)

    def _check_accounted(self, name: str, rnd: int) -> None:
        """An upload of a DP run needs its ledger entries mirrored first, matching the plan."""
        plan = self.cfg.privacy
        assert plan is not None and self._mirror is not None
        position = ledger_position(self.cfg.strategy, rnd)
        entries = [e for e in self._mirror.entries(name)
                   if e.run_id == self.cfg.run_id and (e.round, e.upload_index) == position]
        extra = plan.extra_releases(rnd)
        for planned in plan.round_releases() + extra:
            relation = planned.neighbouring.value
            what = "ResFIM mask (noisy Fisher)" if planned in extra else f"{relation}-level"
            found = [e for e in entries if e.neighbouring.value == relation]
            if not found:
                raise FailedPrecondition(
                    f"round {rnd}: no {what} privacy-ledger entry of silo {name!r} is mirrored; send it "
                    "with SubmitLedgerEntries before uploading (every DP release is accounted first)")
            want = planned.key()
            if not any(entry_key(e) == want and e.guarantee(_SINGLE).noise_multiplier
                       == planned.single_upload_noise_multiplier for e in found):
                e = found[-1]
                raise FailedPrecondition(
                    f"round {rnd}: no mirrored {what} ledger entry of silo {name!r} matches the run's plan "
                    f"(mechanism, σ, q, steps, C) = {want}; its latest {relation}-level entry there, seq {e.seq}, "
                    f"accounts {entry_key(e)}")

    def submit(self, caller: Identity, parts: Iterable[UploadPart]) -> SubmitResult:
        """Receives one upload stream, validates it completely, then adds it to the round.

        Nothing is stored unless the whole stream is well-formed: one header, chunks whose
        sizes add up to the manifest's, a trailer whose chunk count and SHA-256 match, finite
        values. The payload is spooled to disk while it streams, so memory does not depend on
        the update size or on the number of silos uploading at once.

        Raises:
            InvalidArgument, FailedPrecondition, AlreadyExists, ResourceExhausted: see the
            messages; the running sum and the database are unchanged.
        """
        name = self._require_joined(caller)
        it = iter(parts)
        try:
            header = next(it)
        except StopIteration:
            raise InvalidArgument("empty upload stream: expected a header") from None
        if not isinstance(header, UploadHeader):
            raise InvalidArgument("an upload stream must start with a header")
        if not math.isfinite(header.weight) or not 0 < header.weight <= MAX_WEIGHT:
            raise InvalidArgument(f"weight {header.weight} is not a finite number in (0, 10^9]")
        expected = ENCODING_FOR[self.cfg.aggregation]
        if header.encoding is not expected:
            raise InvalidArgument(f"payload encoding {header.encoding.name} does not match the run's "
                                  f"{self.cfg.aggregation.value} aggregation (expected {expected.name})")
        if header.encoding is PayloadEncoding.RAW_TENSORS and header.size != header.manifest.total_bytes:
            raise InvalidArgument(f"payload_bytes {header.size} != the manifest's raw size {header.manifest.total_bytes}")
        if not 1 <= header.size:
            raise InvalidArgument(f"payload_bytes {header.size} must be >= 1")
        if header.size > self.cfg.max_upload_bytes:
            raise ResourceExhausted(
                f"upload of {header.size} bytes exceeds server.max_upload_bytes ({self.cfg.max_upload_bytes})"
            )
        with self._cond:
            self._check_upload(name, header)
            assert self._agg is not None
            diff = header.manifest.difference(self._agg.manifest)
            if diff is not None:
                raise InvalidArgument(f"update does not match the run's shared tensors: {diff}")
            if header.size > self._agg.payload_bytes_bound():
                raise InvalidArgument(f"payload of {header.size} bytes is larger than any upload of this model "
                                      f"can be ({self._agg.payload_bytes_bound()} bytes)")
        spool = self._spool / f"r{header.round:06d}-{name}-{uuid.uuid4().hex}.part"
        try:
            received, digest, wire = self._receive(it, header, spool)
            self._agg.validate(spool)
            with self._cond:
                self._check_upload(name, header)
                return self._accept(name, header, spool, digest, wire + header.wire_bytes, received)
        finally:
            spool.unlink(missing_ok=True)

    def _receive(self, it: Iterator[UploadPart], header: UploadHeader, spool: Path) -> tuple[int, str, int]:
        total = header.size
        received = chunks = wire = 0
        sha = hashlib.sha256()
        trailer: UploadTrailer | None = None
        with open(spool, "wb") as f:
            while True:
                try:
                    part = next(it)
                except StopIteration:
                    break
                except InvalidArgument:
                    raise
                except Exception as exc:  # the transport broke mid-stream (client cancelled, reset)
                    raise InvalidArgument(f"upload stream broken after {received} of {total} bytes: {exc}") from None
                if trailer is not None:
                    raise InvalidArgument("message after the trailer")
                wire += part.wire_bytes
                if isinstance(part, UploadHeader):
                    raise InvalidArgument("a second header in one upload stream")
                if isinstance(part, UploadTrailer):
                    trailer = part
                    continue
                n = len(part.data)
                if n == 0:
                    raise InvalidArgument("empty chunk")
                if n > self.cfg.max_chunk_bytes:
                    raise ResourceExhausted(
                        f"chunk of {n} bytes exceeds the limit of {self.cfg.max_chunk_bytes} bytes")
                if received + n > total:
                    raise InvalidArgument(f"more payload bytes than the {total} announced")
                f.write(part.data)
                sha.update(part.data)
                received += n
                chunks += 1
        if trailer is None:
            raise InvalidArgument(f"upload truncated: stream ended after {received} of {total} bytes without a trailer")
        if received != total:
            raise InvalidArgument(f"upload truncated: {received} of {total} payload bytes received")
        if trailer.num_chunks != chunks:
            raise InvalidArgument(f"trailer announces {trailer.num_chunks} chunks, {chunks} were received")
        if trailer.sha256 != sha.digest():
            raise InvalidArgument("payload SHA-256 does not match the trailer: the upload was corrupted")
        return received, sha.hexdigest(), wire

    def _accept(self, name: str, header: UploadHeader, spool: Path, digest: str, wire: int,
                received: int) -> SubmitResult:
        """Adds a validated upload and makes it durable before recording it (lock held).

        The payload file is kept (renamed into ``accepted/``) until the round closes, so a
        restarted coordinator rebuilds the running sum from the last checkpoint plus the
        accepted payloads after it: nothing is lost and nothing is added twice. Every
        ``SUM_CHECKPOINT_EVERY`` uploads the sum itself is saved and the payloads it covers
        are deleted, which bounds the disk used by an open round.
        """
        assert self._agg is not None
        rnd = header.round
        seq = len(self._store.uploads(rnd)) + 1
        kept = self._accepted_path(rnd, seq)
        checkpoint = seq % SUM_CHECKPOINT_EVERY == 0
        self._agg.add(spool, header.weight)
        try:
            os.replace(spool, kept)
            fsync_dir(self._accepted)
            if checkpoint:
                self._agg.save(self._sum_path(rnd, seq))
            with self._store.transaction():
                self._store.record_upload(rnd, name, seq=seq, weight=header.weight, payload_bytes=received,
                                          sha256=digest, wire_bytes=wire, now_ms=self._now_ms())
                if checkpoint:
                    self._store.set_sum_version(rnd, seq)
        except BaseException:
            kept.unlink(missing_ok=True)
            if checkpoint:
                self._sum_path(rnd, seq).unlink(missing_ok=True)
            self._rebuild_sum(rnd)
            raise
        if checkpoint:
            for f in self._sums.glob(f"round_{rnd:06d}_v*"):
                if f != self._sum_path(rnd, seq):
                    f.unlink()
            for old in range(1, seq + 1):
                self._accepted_path(rnd, old).unlink(missing_ok=True)
        n = seq
        training = self._training_silos()
        log.info("round %d: accepted upload from %s (%d/%d)", rnd, name, n, len(training))
        if all(s in self._store.uploads(rnd) for s in training):
            self._close_round(rnd)
        return SubmitResult(round=rnd, bytes_received=received, uploads_in_round=n)

    def _close_round(self, rnd: int) -> None:
        """Writes the aggregate, closes the round and opens the next one (lock held)."""
        assert self._agg is not None
        row = self._store.get_round(rnd)
        assert row is not None and row.state == "open"
        path = self._aggregate_path(rnd)
        self._agg.write_result(path, row.total_weight)
        digest = _file_sha256(path)
        with self._store.transaction():
            self._store.close_round(rnd, now_ms=self._now_ms(), aggregate_sha256=digest)
            if rnd >= self.cfg.rounds:
                self._store.set_meta("state", RunState.FINISHED.value)
                self._store.set_meta("message", f"finished: all {self.cfg.rounds} rounds closed")
            else:
                self._open_round(rnd + 1)
        for f in [*self._sums.glob(f"round_{rnd:06d}_v*"), *self._accepted.glob(f"round_{rnd:06d}_*")]:
            f.unlink()
        n = len(self._store.uploads(rnd))
        log.info("round %d closed with %d contributor(s), total weight %g", rnd, n, row.total_weight)
        self._cond.notify_all()

    def tick(self) -> None:
        """Applies deadlines: starts the run after the join grace, closes rounds at quorum."""
        if time.monotonic() - self._last_flush >= TELEMETRY_FLUSH_S:
            self.flush_telemetry()
        with self._cond:
            state = self._state()
            if state is RunState.WAITING:
                self._maybe_start()
                if self._state() is RunState.RUNNING:
                    self._cond.notify_all()
                return
            if state is not RunState.RUNNING:
                return
            row = self._store.open_round()
            if row is None:
                return
            now = self._now_ms()
            if now < row.deadline_ms:
                return
            n = len(self._store.uploads(row.round))
            if n >= self.cfg.min_silos:
                log.warning("round %d: deadline passed, closing with %d of %d silos (quorum %d)",
                            row.round, n, len(self.cfg.silos), self.cfg.min_silos)
                self._close_round(row.round)
            elif now >= row.deadline_ms + self.cfg.quorum_timeout_s * 1000:
                msg = (f"failed: round {row.round} got {n} upload(s), fewer than min_silos = {self.cfg.min_silos}, "
                       f"within round_deadline_s + quorum_timeout_s")
                with self._store.transaction():
                    self._store.set_meta("state", RunState.FAILED.value)
                    self._store.set_meta("message", msg)
                log.error("run %s %s", self.cfg.run_id, msg)
                self._cond.notify_all()
            elif self._waiting_logged != row.round:
                self._waiting_logged = row.round
                log.warning("round %d: deadline passed with %d upload(s); waiting for quorum (%d)",
                            row.round, n, self.cfg.min_silos)

    # -- aggregates, heartbeats, metrics ------------------------------------------------
    def aggregate(self, caller: Identity, rnd: int) -> AggregateInfo:
        """A closed round's aggregate, for an enrolled silo.

        Raises:
            InvalidArgument: round out of range.
            FailedPrecondition: the round is not closed yet.
        """
        self._require_joined(caller)
        if not 1 <= rnd <= self.cfg.rounds:
            raise InvalidArgument(f"round {rnd} is not in [1, {self.cfg.rounds}]")
        row = self._store.get_round(rnd)
        if row is None or row.state != "closed":
            raise FailedPrecondition(f"round {rnd} is not closed yet; its aggregate does not exist")
        path = self._aggregate_path(rnd)
        if not path.is_file():
            raise NotFound(f"aggregate of round {rnd} is missing from the state dir")
        manifest = self._round_manifest(rnd)
        return AggregateInfo(round=rnd, num_contributors=len(self._store.uploads(rnd)),
                             total_weight=row.total_weight, manifest=manifest, path=path,
                             encoding=ENCODING_FOR[self.cfg.aggregation], weight_normalizer=row.weight_normalizer)

    def count_bytes(self, rnd: int, *, up: int = 0, down: int = 0) -> None:
        """Adds wire traffic (serialized message sizes) to a round's counters (batched)."""
        if rnd >= 1:
            with self._telemetry_lock:
                u, d = self._traffic.get(rnd, (0, 0))
                self._traffic[rnd] = (u + up, d + down)

    def _seen(self, name: str) -> None:
        with self._telemetry_lock:
            self._last_seen[name] = self._now_ms()

    def flush_telemetry(self) -> None:
        """Writes the batched last-seen times and traffic counters to the database."""
        with self._telemetry_lock:
            seen, traffic = self._last_seen, self._traffic
            self._last_seen, self._traffic = {}, {}
            self._last_flush = time.monotonic()
        if seen or traffic:
            self._store.flush_telemetry(seen, traffic)

    def heartbeat(self, caller: Identity) -> tuple[RunState, int]:
        """Records liveness; returns (run state, open round or 0)."""
        self._seen(self._require_joined(caller))
        return self._state(), self._open_round_number()

    def _open_round_number(self) -> int:
        """The round accepting uploads, 0 if none (also 0 once the run has ended)."""
        row = self._store.open_round()
        return row.round if row is not None and self._state() is RunState.RUNNING else 0

    def report_metrics(self, caller: Identity, rnd: int, metrics: list[tuple[str, float, int]],
                       wire_bytes: int = 0) -> int:
        """Stores a silo's evaluation numbers for a closed round.

        Raises:
            InvalidArgument: bad names, non-finite values, duplicates, too many.
            FailedPrecondition: the round is not closed.
        """
        name = self._require_joined(caller)
        if not 1 <= len(metrics) <= 64:
            raise InvalidArgument(f"expected 1..64 metrics, got {len(metrics)}")
        seen: set[str] = set()
        for mname, value, n in metrics:
            if not _METRIC_RE.match(mname):
                raise InvalidArgument(f"metric name {mname!r} is not 1..64 chars of [a-z0-9_]")
            if mname in seen:
                raise InvalidArgument(f"metric {mname!r} appears twice")
            seen.add(mname)
            if not math.isfinite(value):
                raise InvalidArgument(f"metric {mname!r} is not finite ({value})")
            if not 0 <= n <= MAX_WEIGHT:
                raise InvalidArgument(f"metric {mname!r}: num_examples {n} is not in [0, 10^9]")
        row = self._store.get_round(rnd) if 1 <= rnd <= self.cfg.rounds else None
        if row is None or row.state != "closed":
            raise FailedPrecondition(f"round {rnd} is not closed; metrics are reported after its aggregate")
        self._store.put_metrics(rnd, name, metrics)
        self.count_bytes(rnd, up=wire_bytes)
        return len(metrics)

    # -- HE key ceremony: the coordinator only relays opaque wrapped keys --------------------
    def _require_he(self) -> None:
        if self.cfg.aggregation is not AggregationMode.HE:
            raise FailedPrecondition(f"run {self.cfg.run_id!r} uses {self.cfg.aggregation.value} aggregation; "
                                     "there is no key ceremony")

    def _key_recipients_missing(self, silos: dict[str, SiloRow]) -> set[str]:
        have = self._store.wrapped_key_recipients()
        return {n for n in silos if n != self.cfg.key_holder and n not in have}

    def key_recipients(self, caller: Identity) -> list[tuple[str, bytes]]:
        """Key holder only: joined silos still without a wrapped key, with their signed X25519 keys.

        Raises:
            PermissionDenied: the caller is not the key holder.
            FailedPrecondition: the run does not use HE.
        """
        name = self._require_joined(caller)
        self._require_he()
        if name != self.cfg.key_holder:
            raise PermissionDenied(f"only the key holder {self.cfg.key_holder!r} lists key recipients")
        silos = self._store.silos()
        return [(n, silos[n].kem_public_key or b"") for n in sorted(self._key_recipients_missing(silos))]

    def publish_wrapped_keys(self, caller: Identity, entries: list[tuple[str, bytes]]) -> int:
        """Key holder only: stores wrapped keys (opaque: the coordinator cannot open them).

        Raises:
            PermissionDenied: the caller is not the key holder.
            InvalidArgument: empty, duplicate, oversized, or for a silo not joined / the holder itself.
        """
        name = self._require_joined(caller)
        self._require_he()
        if name != self.cfg.key_holder:
            raise PermissionDenied(f"only the key holder {self.cfg.key_holder!r} publishes wrapped keys")
        if not 1 <= len(entries) <= 1000:
            raise InvalidArgument(f"expected 1..1000 wrapped keys, got {len(entries)}")
        silos = self._store.silos()
        seen: set[str] = set()
        for recipient, wrapped in entries:
            if recipient in seen:
                raise InvalidArgument(f"two wrapped keys for {recipient!r}")
            seen.add(recipient)
            if recipient == name or recipient not in silos:
                raise InvalidArgument(f"{recipient!r} is not a joined silo that needs the key")
            if not 1 <= len(wrapped) <= MAX_WRAPPED_KEY_BYTES:
                raise InvalidArgument(f"wrapped key for {recipient!r} has {len(wrapped)} bytes (1..4 MiB allowed)")
        with self._cond:
            self._store.put_wrapped_keys(entries, self._now_ms())
            log.info("stored wrapped keys for %s", ", ".join(sorted(seen)))
            self._maybe_start()
            self._cond.notify_all()
        return len(entries)

    def wrapped_key(self, caller: Identity) -> bytes | None:
        """The run's key wrapped for the caller, or None while the key holder has not published it."""
        name = self._require_joined(caller)
        self._require_he()
        return self._store.wrapped_key(name)

    # -- pFL-ResFIM style banks: the coordinator only relays opaque sealed bytes -------------
    def _require_masked(self) -> None:
        if not self.cfg.strategy.exchanges_banks:
            raise FailedPrecondition(f"run {self.cfg.run_id!r} uses strategy {self.cfg.strategy.value!r}; sealed banks "
                                     "are exchanged only by resfim, deer+resfim and fedrdn runs")

    def publish_style_bank(self, caller: Identity, sealed: bytes) -> int:
        """Stores the caller's style bank, sealed for the other silos (the coordinator cannot open it).

        A silo publishes once per run; sending the same bytes again (an agent restarted before it
        saw the reply) is accepted and changes nothing.

        Returns:
            How many silos have published a bank.

        Raises:
            InvalidArgument: an empty or oversized bank.
            AlreadyExists: the caller already published a different bank.
            FailedPrecondition: the run's strategy exchanges no style banks.
        """
        name = self._require_joined(caller)
        self._require_masked()
        if not 1 <= len(sealed) <= MAX_STYLE_BANK_BYTES:
            raise InvalidArgument(f"sealed_bank has {len(sealed)} bytes; 1..{MAX_STYLE_BANK_BYTES} allowed")
        plan = self.cfg.privacy
        if plan is not None and plan.resfim_every:
            assert self._mirror is not None
            want = plan.style_release().key()
            if not any(e.run_id == self.cfg.run_id and entry_key(e) == want for e in self._mirror.entries(name)):
                raise FailedPrecondition(f"silo {name!r}: no mirrored privacy-ledger entry accounts its style bank "
                                         f"(mechanism, σ, q, steps, C) = {want}; send it with SubmitLedgerEntries "
                                         "before publishing")
        with self._cond:
            banks = self._store.style_banks()
            known = banks.get(name)
            if known is not None:
                if known != bytes(sealed):
                    raise AlreadyExists(f"silo {name!r} already published its style bank for this run "
                                        "(one per run; the agent keeps the sealed copy in its state dir)")
                return len(banks)
            self._store.put_style_bank(name, bytes(sealed), self._now_ms())
            log.info("stored the sealed style bank of %s (%d bytes)", name, len(sealed))
            self._cond.notify_all()
            return len(banks) + 1

    def style_banks(self, caller: Identity, *, after_silo: str = "") -> tuple[list[tuple[str, bytes]], int, bool]:
        """A page of the other silos' sealed style banks, how many silos have joined, and whether more follow.

        A page holds the banks of the silos named after ``after_silo`` (in name order) up to
        ``STYLE_BANK_PAGE_BYTES`` in all, and at least one, so every reply fits in one gRPC message
        however many silos publish.

        Raises:
            InvalidArgument: an ``after_silo`` longer than a silo name can be.
            FailedPrecondition: the run's strategy exchanges no style banks.
        """
        name = self._require_joined(caller)
        self._require_masked()
        if not isinstance(after_silo, str) or len(after_silo) > 64:
            raise InvalidArgument("after_silo must be a silo name (at most 64 characters) or empty")
        page: list[tuple[str, bytes]] = []
        size = 0
        more = False
        for silo, blob in self._store.style_banks().items():  # ordered by silo name
            if silo == name or silo <= after_silo:
                continue
            if page and size + len(blob) > STYLE_BANK_PAGE_BYTES:
                more = True
                break
            page.append((silo, blob))
            size += len(blob)
        return page, len(self._store.silos()), more

    # -- admin --------------------------------------------------------------------------
    def status(self) -> Status:
        """The run at a glance."""
        self.flush_telemetry()
        silos = self._store.silos()
        contrib = self._store.contributions()
        retired = self._store.retired()
        return Status(
            run_id=self.cfg.run_id,
            state=self._state(),
            open_round=self._open_round_number(),
            last_closed_round=self._store.last_closed_round(),
            total_rounds=self.cfg.rounds,
            silos=tuple(
                SiloStatus(name=s, joined=s in silos, last_seen_ms=silos[s].last_seen_ms if s in silos else 0,
                           rounds_contributed=contrib.get(s, 0),
                           num_train_examples=silos[s].num_train_examples if s in silos else 0,
                           retired_from_round=retired[s][0] if s in retired else 0,
                           retired_reason=retired[s][1] if s in retired else "")
                for s in self.cfg.silos
            ),
            message=self._store.get_meta("message") or "",
        )

    def round_summaries(self) -> list[RoundSummary]:
        """Every round so far."""
        self.flush_telemetry()
        out = []
        for r in self._store.rounds():
            seconds = ((r.closed_at_ms - r.opened_at_ms) / 1000.0) if r.closed_at_ms else 0.0
            out.append(RoundSummary(round=r.round, closed=r.state == "closed",
                                    contributors=tuple(self._store.uploads(r.round)), params_shared=r.params_shared,
                                    bytes_up=r.bytes_up, bytes_down=r.bytes_down, seconds=seconds,
                                    total_weight=r.total_weight, metrics=self._store.metrics(r.round)))
        return out

    # -- privacy ------------------------------------------------------------------------
    def submit_ledger_entries(self, caller: Identity, entries_json: list[str]) -> int:
        """Verifies a silo's ledger entries and appends them to the mirror, in order.

        Entries already mirrored verbatim are skipped (a resend). Each entry is stored only
        if it verifies and extends the chain; at the first bad one the call fails and the
        mirror keeps the entries before it, so it always holds a verified prefix.

        Returns:
            The highest mirrored seq of the caller's ledger (0 if none).

        Raises:
            InvalidArgument: too many or too large entries, or one that does not verify
                (chain, signature, certificate, another silo's, not canonical); the message
                names its seq.
            FailedPrecondition: the run has no differential privacy.
        """
        name = self._require_joined(caller)
        if self._mirror is None:
            raise FailedPrecondition(f"run {self.cfg.run_id!r} has no differential privacy; there is no ledger mirror")
        if len(entries_json) > MAX_LEDGER_BATCH:
            raise InvalidArgument(f"{len(entries_json)} ledger entries in one call; at most {MAX_LEDGER_BATCH}")
        for i, text in enumerate(entries_json):
            if not 1 <= len(text) <= MAX_LEDGER_ENTRY_CHARS:
                raise InvalidArgument(f"ledger entry {i} is {len(text)} characters; 1..{MAX_LEDGER_ENTRY_CHARS}")
        assert self._ca_pem is not None
        for text in entries_json:
            try:
                self._mirror.accept(text, ca_pem=self._ca_pem, expected_silo=name)
            except DuplicateEntryError:
                continue
            except LedgerError as exc:
                raise InvalidArgument(str(exc)) from None
        self._seen(name)
        last = self._mirror.last(name)
        return 0 if last is None else last.seq

    def decline(self, caller: Identity, *, rnd: int, reason: str, final: bool) -> tuple[RunState, int]:
        """A silo declines a round; ``final`` retires it from training for the rest of the run.

        The run goes on without it; if fewer than ``min_silos`` silos are left training, the
        run ends as failed, saying why. If every silo still training has uploaded the open
        round, the round closes now.

        Returns:
            (run state afterwards, number of silos still training).

        Raises:
            InvalidArgument: round out of range or an empty / overlong reason.
            FailedPrecondition: the run has ended, or the caller already uploaded this round.
        """
        name = self._require_joined(caller)
        if not 1 <= rnd <= self.cfg.rounds:
            raise InvalidArgument(f"round {rnd} is not in [1, {self.cfg.rounds}]")
        if not isinstance(reason, str) or not 1 <= len(reason) <= 1024:
            raise InvalidArgument("reason must be 1..1024 characters")
        with self._cond:
            state = self._state()
            if state in (RunState.FINISHED, RunState.FAILED):
                raise FailedPrecondition(f"run {self.cfg.run_id!r} is {state.value}")
            if name in self._store.uploads(rnd):
                raise FailedPrecondition(f"silo {name!r} already uploaded round {rnd}; it cannot decline it")
            log.warning("silo %s declines round %d%s: %s", name, rnd, " and every later round" if final else "",
                        reason)
            if not final:
                return state, len(self._training_silos())
            with self._store.transaction():
                self._store.retire(name, from_round=rnd, reason=reason, now_ms=self._now_ms())
            training = self._training_silos()
            if len(training) < self.cfg.min_silos:
                retired = self._store.retired()
                msg = (f"failed: only {len(training)} silo(s) still training, fewer than min_silos = "
                       f"{self.cfg.min_silos}; stopped training: "
                       + "; ".join(f"{s} from round {r} ({why})" for s, (r, why) in sorted(retired.items())))
                with self._store.transaction():
                    self._store.set_meta("state", RunState.FAILED.value)
                    self._store.set_meta("message", msg[:1024])
                log.error("run %s %s", self.cfg.run_id, msg)
            else:
                open_round = self._store.open_round()
                if (state is RunState.RUNNING and open_round is not None and self._agg is not None
                        and self._store.uploads(open_round.round)
                        and all(s in self._store.uploads(open_round.round) for s in training)):
                    self._close_round(open_round.round)
            self._cond.notify_all()
            return self._state(), len(training)

    def close(self) -> None:
        """Writes pending counters and closes the databases."""
        self.flush_telemetry()
        self._store.close()
        if self._mirror is not None:
            self._mirror.close()


def _json(data: object) -> str:
    return json.dumps(data, separators=(",", ":"))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
