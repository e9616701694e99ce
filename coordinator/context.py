"""What every part of the coordinator shares: the run's config, store, lock, clock, folders and aggregator."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fedsilo.coordinator.aggregation import Aggregator
from fedsilo.coordinator.config import ConfigError, FederationConfig
from fedsilo.coordinator.records import RunState
from fedsilo.coordinator.store import Store
from fedsilo.core.atomic import atomic_write
from fedsilo.core.errors import FailedPrecondition, PermissionDenied
from fedsilo.core.tensors import Manifest
from fedsilo.privacy.ledger import LedgerMirror
from fedsilo.privacy.pki import Identity, Role


class RunContext:
    """One run's shared state, persisted in ``config.state_dir``.

    Opens (or creates) the state dir, its database and, for a DP run, the ledger mirror; refuses
    a state dir that holds another run. The parts of the coordinator (rounds, admission, relays,
    mirror, telemetry) each hold this object; ``cond`` guards every change of round state.

    Raises:
        ConfigError: the state dir holds a run with another configuration.
    """

    def __init__(self, config: FederationConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = config
        self.method = config.method
        self.clock = clock
        self.cond = threading.Condition(threading.RLock())
        self.state_dir = state_dir = Path(config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.spool = state_dir / "spool"
        self.sums = state_dir / "sums"
        self.aggregates = state_dir / "aggregates"
        self.accepted = state_dir / "accepted"
        for d in (self.spool, self.sums, self.aggregates, self.accepted):
            d.mkdir(exist_ok=True)
        for leftover in self.spool.iterdir():
            leftover.unlink()
        self.store = Store(state_dir / "coordinator.sqlite")
        #: The federation CA (verifies what silos sign: upload statements, announcements, ledgers); None without TLS.
        self.ca_pem: bytes | None = Path(config.tls.ca).read_bytes() if config.tls is not None else None
        self.mirror: LedgerMirror | None = None
        #: The open round's aggregator (None until the first silo joined and fixed the manifest).
        self.agg: Aggregator | None = None
        try:
            self._check_fingerprint()
            if config.privacy is not None:
                self._open_privacy()
        except BaseException:
            self.close()
            raise

    def _check_fingerprint(self) -> None:
        fingerprint = self.cfg.run_fingerprint()
        stored = self.store.get_meta("run_fingerprint")
        if stored is None:
            with self.store.transaction():
                self.store.set_meta("run_fingerprint", fingerprint)
                self.store.set_meta("run_id", self.cfg.run_id)
                self.store.set_meta("state", RunState.WAITING.value)
                self.store.set_meta("message", "waiting for silos to join")
        elif stored != fingerprint:
            run_id = self.store.get_meta("run_id")
            raise ConfigError(
                f"state dir {self.state_dir} holds run {run_id!r} with a different "
                "configuration (run id, silos, rounds, strategy, aggregation, model or training changed); "
                "start the new run with a new server.state_dir"
            )

    def _open_privacy(self) -> None:
        """The CA (to verify ledger entries and budgets), the mirror, and the method's disclosures."""
        from fedsilo.privacy.budget import CA_FILE, MIRROR_FILE

        assert self.cfg.tls is not None  # the config refuses DP without TLS
        assert self.ca_pem is not None
        atomic_write(self.state_dir / CA_FILE, self.ca_pem)
        self.mirror = LedgerMirror.open(self.state_dir / MIRROR_FILE, run_id=self.cfg.run_id,
                                        last_round=self.method.ledger_position(self.cfg.rounds)[0])
        disclosures = self.method.run_disclosures(self.cfg)
        if disclosures:
            from fedsilo.privacy.audit import write_disclosures

            write_disclosures(self.state_dir, disclosures)

    # -- reads --------------------------------------------------------------------------
    def now_ms(self) -> int:
        """The clock, in milliseconds."""
        return int(self.clock() * 1000)

    def state(self) -> RunState:
        """The run's stored state."""
        return RunState(self.store.get_meta("state"))

    def manifest(self) -> Manifest | None:
        """The shared tensors the first joining silo announced (None before)."""
        data = self.store.get_json("manifest")
        return None if data is None else Manifest.from_json(data)

    def round_layout(self, rnd: int, manifest: Manifest | None = None) -> Manifest:
        """What an upload of round ``rnd`` carries, as the run's method lays it out."""
        manifest = manifest or self.manifest()
        assert manifest is not None
        return self.method.upload_layout(manifest, rnd, self.cfg.rounds)

    def training_silos(self) -> list[str]:
        """Enrolled silos that have not retired from training."""
        retired = self.store.retired()
        return [s for s in self.cfg.silos if s not in retired]

    def open_round_number(self) -> int:
        """The round accepting uploads, 0 if none (also 0 once the run has ended)."""
        row = self.store.open_round()
        return row.round if row is not None and self.state() is RunState.RUNNING else 0

    # -- paths --------------------------------------------------------------------------
    def sum_path(self, rnd: int, version: int) -> Path:
        """A saved running sum of round ``rnd``."""
        return self.sums / f"round_{rnd:06d}_v{version:06d}.f64"

    def aggregate_path(self, rnd: int) -> Path:
        """A closed round's aggregate."""
        return self.aggregates / f"round_{rnd:06d}.bin"

    def accepted_path(self, rnd: int, seq: int) -> Path:
        """An accepted payload kept until the next checkpoint of the running sum."""
        return self.accepted / f"round_{rnd:06d}_{seq:06d}.part"

    # -- identity -----------------------------------------------------------------------
    def require_silo(self, caller: Identity) -> str:
        """The caller's silo name.

        Raises:
            PermissionDenied: not a silo certificate, or a silo the run does not enrol.
        """
        if caller.role is not Role.SILO:
            raise PermissionDenied(f"a {caller.role.value} certificate cannot act as a silo")
        if caller.name not in self.cfg.silos:
            raise PermissionDenied(f"silo {caller.name!r} is not enrolled in run {self.cfg.run_id!r}")
        return caller.name

    def require_joined(self, caller: Identity) -> str:
        """As :meth:`require_silo`, for a silo that has joined.

        Raises:
            FailedPrecondition: the silo has not joined.
        """
        name = self.require_silo(caller)
        if name not in self.store.silos():
            raise FailedPrecondition(f"silo {name!r} has not joined run {self.cfg.run_id!r}; call Join first")
        return name

    def close(self) -> None:
        """Closes the database and the mirror."""
        self.store.close()
        if self.mirror is not None:
            self.mirror.close()


def to_json(data: object) -> str:
    """Compact JSON, as stored in the database."""
    return json.dumps(data, separators=(",", ":"))


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
