"""Plain records the coordinator's functions take and return: run states, tasks, upload parts, summaries, limits."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from fedsilo.coordinator.config import AggregationMode
from fedsilo.core.phases import SharePhase
from fedsilo.core.tensors import Manifest, PayloadEncoding
from fedsilo.privacy.accounting import BudgetAccountant, Neighbouring

#: Largest weight (example count) an upload or a join may carry.
MAX_WEIGHT = 1e9
#: Most metrics one silo report may hold.
MAX_METRICS = 64
#: Longest task long-poll, in seconds.
MAX_WAIT_S = 60
#: A resumed open round gets at least this long (or its whole deadline) before it may close.
RESUME_GRACE_S = 30.0
#: The running sum is saved after every this many uploads; payloads after it are kept until then.
SUM_CHECKPOINT_EVERY = 8
#: Seconds between writes of the batched liveness and traffic counters.
TELEMETRY_FLUSH_S = 2.0
MAX_WRAPPED_KEY_BYTES = 4 * 2**20
MAX_ANNOUNCEMENT_BYTES = 16 * 2**10
MAX_BUDGET_STATEMENT_BYTES = 32 * 2**10
MAX_LEDGER_BATCH = 64
MAX_LEDGER_ENTRY_CHARS = 32 * 2**10
#: Longest signed upload statement (it carries the silo's certificate).
MAX_UPLOAD_STATEMENT_CHARS = 16 * 2**10
#: Longest reason a silo gives when it reports a round's aggregate unusable.
MAX_FAILURE_REASON_CHARS = 1024
#: Largest blob of the sealed relay (one per purpose and silo).
MAX_SEALED_BYTES = 4 * 2**20
#: A page of relayed blobs holds at most this many bytes (and always at least one blob).
SEALED_PAGE_BYTES = 4 * 2**20


class RunState(enum.Enum):
    """Life cycle of a run (values are stored in the database)."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


ENCODING_FOR: dict[AggregationMode, PayloadEncoding] = {
    AggregationMode.PLAIN: PayloadEncoding.RAW_TENSORS,
    AggregationMode.HE: PayloadEncoding.HE_CIPHERTEXTS,
}


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
    #: The sender's signed statement of the upload (``fedsilo.privacy.upload_statement``); "" if none.
    statement: str = ""


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
    #: Why the round failed ("" if it did not): then nobody applies it and no payload is sent.
    failed: str = ""


@dataclass(frozen=True, kw_only=True)
class SealedPage:
    """A page of the sealed relay: other silos' blobs under one purpose, in silo-name order."""

    entries: tuple[tuple[str, bytes], ...]
    silos_joined: int
    more: bool


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
class RoundUpload:
    """One accepted upload of a round."""

    silo: str
    accepted_at_ms: int
    payload_bytes: int


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
    #: Why the round failed ("" if it did not).
    failure: str = ""
    opened_at_ms: int = 0
    deadline_ms: int = 0
    #: 0 while the round is open.
    closed_at_ms: int = 0
    #: Uploads the round needs to close (the run's ``min_silos``).
    quorum: int = 0
    #: The accepted uploads, in arrival order.
    uploads: tuple[RoundUpload, ...] = ()

    @property
    def quorum_reached(self) -> bool:
        """Whether at least ``quorum`` uploads are in."""
        return len(self.uploads) >= self.quorum > 0


@dataclass(frozen=True, kw_only=True)
class RelationSpend:
    """One silo's spend for one neighbouring relation, as the verified ledger mirror gives it."""

    relation: Neighbouring
    #: Cumulative ε against a single upload over all the silo's mirrored entries (the budgeted figure).
    epsilon: float
    #: The same figure by RDP, and by PLD (None where the newest entry states none).
    epsilon_rdp: float
    epsilon_pld: float | None
    #: Whose figure ``epsilon`` is (the newest entry's governing accountant).
    accountant: BudgetAccountant
    #: δ of the newest entry for the relation.
    delta: float
    #: Mirrored entries for the relation in this run.
    entries: int
    #: Ledger round of the newest of them (0 if none in this run).
    last_round: int


@dataclass(frozen=True, kw_only=True)
class SiloPrivacy:
    """One silo's budget (from its verified statement) and spend per relation."""

    silo: str
    #: (ε, δ) of its verified budget statement; None without one.
    budget: tuple[float, float] | None
    #: Why the kept statement does not verify ("" if it does or there is none).
    budget_error: str
    relations: tuple[RelationSpend, ...]
    #: Seq of its newest mirrored entry (0 if none).
    last_seq: int


@dataclass(frozen=True, kw_only=True)
class PrivacyView:
    """The run's privacy spend for the study lead; ``enabled`` is False (and ``silos`` empty) without DP."""

    enabled: bool
    plan_delta: float
    silos: tuple[SiloPrivacy, ...]


@dataclass(frozen=True, kw_only=True)
class FailureReport:
    """The state of a round's failure reports after one more."""

    round_failed: bool
    reports: int
    needed: int
