"""The coordinator database's tables (SQLite, WAL) and the row records ``coordinator.store`` returns."""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 3  # 2: one table of sealed-relay blobs by (purpose, silo); 3: upload statements, failed rounds

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS silos (
    name TEXT PRIMARY KEY,
    joined_at_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    num_train_examples INTEGER NOT NULL,
    agent_version TEXT NOT NULL,
    kem_public_key BLOB
);
CREATE TABLE IF NOT EXISTS wrapped_keys (
    recipient TEXT PRIMARY KEY,
    wrapped BLOB NOT NULL,
    stored_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sealed_blobs (
    purpose TEXT NOT NULL,
    silo TEXT NOT NULL,
    blob BLOB NOT NULL,
    stored_at_ms INTEGER NOT NULL,
    PRIMARY KEY (purpose, silo)
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    opened_at_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    closed_at_ms INTEGER,
    sum_version INTEGER NOT NULL DEFAULT 0,
    total_weight REAL NOT NULL DEFAULT 0,
    params_shared INTEGER NOT NULL,
    weight_normalizer REAL NOT NULL DEFAULT 1,
    bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0,
    aggregate_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS uploads (
    round INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    silo TEXT NOT NULL,
    weight REAL NOT NULL,
    payload_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    accepted_at_ms INTEGER NOT NULL,
    PRIMARY KEY (round, silo),
    UNIQUE (round, seq)
);
CREATE TABLE IF NOT EXISTS retired (
    silo TEXT PRIMARY KEY,
    from_round INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS upload_statements (
    round INTEGER NOT NULL,
    silo TEXT NOT NULL,
    statement TEXT NOT NULL,
    PRIMARY KEY (round, silo)
);
CREATE TABLE IF NOT EXISTS failure_reports (
    round INTEGER NOT NULL,
    silo TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (round, silo)
);
CREATE TABLE IF NOT EXISTS failed_rounds (
    round INTEGER PRIMARY KEY,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    round INTEGER NOT NULL,
    silo TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    num_examples INTEGER NOT NULL,
    PRIMARY KEY (round, silo, name)
);
"""


@dataclass(frozen=True, kw_only=True)
class RoundRow:
    """One row of the ``rounds`` table."""

    round: int
    state: str
    opened_at_ms: int
    deadline_ms: int
    closed_at_ms: int | None
    sum_version: int
    total_weight: float
    params_shared: int
    weight_normalizer: float
    bytes_up: int
    bytes_down: int
    aggregate_sha256: str | None


@dataclass(frozen=True, kw_only=True)
class SiloRow:
    """One row of the ``silos`` table."""

    name: str
    joined_at_ms: int
    last_seen_ms: int
    num_train_examples: int
    agent_version: str
    kem_public_key: bytes | None = None


__all__ = ["SCHEMA", "SCHEMA_VERSION", "RoundRow", "SiloRow"]
