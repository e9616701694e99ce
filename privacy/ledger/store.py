"""A silo's append-only privacy ledger in SQLite: reserve, commit, abandon and read entries."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedsilo.privacy.accounting import Neighbouring
from fedsilo.privacy.ledger.chain import _check_spend, verify_chain
from fedsilo.privacy.ledger.entries import (
    EntryStatus,
    GENESIS_HASH,
    GuaranteeScope,
    LedgerEntry,
    LedgerError,
)
from fedsilo.privacy.ledger.fields import _enum, _integer
from fedsilo.privacy.ledger.sqlite import _LEDGER_SCHEMA, _LEDGER_SCHEMA_VERSION, _transaction, open_database
from fedsilo.privacy.pki import validate_name
from fedsilo.privacy.signed import SIGNATURE_BYTES, SignatureError, now_text, own_signer


# Fields of `LedgerEntry` that `Ledger.append` / `Ledger.reserve` take from the caller.
_CALLER_FIELDS = frozenset(
    {
        "run_id",
        "round",
        "upload_index",
        "mechanism",
        "neighbouring",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "clip_norm",
        "delta",
        "epsilon_rdp",
        "rdp_order",
        "epsilon_prv",
        "cumulative_epsilon",
        "guarantee_scope",
        "single_upload",
        "epsilon_pld",
        "cumulative_epsilon_pld",
        "accountant",
    }
)


_CALLER_DEFAULTS: dict[str, Any] = {
    "epsilon_prv": None,
    "guarantee_scope": GuaranteeScope.SINGLE_UPLOAD,
    "single_upload": None,
    "epsilon_pld": None,
    "cumulative_epsilon_pld": None,
    "accountant": None,  # a caller that states no accountant writes a version-1 (RDP-only) entry
}


_COMPUTED_FIELDS = frozenset({f.name for f in fields(LedgerEntry)}) - _CALLER_FIELDS


class Ledger:
    """A silo's append-only privacy ledger in SQLite (WAL, synchronous=FULL).

    Crash safety is write-ahead: an entry is appended, signed and made durable *before*
    its release leaves the silo, and its spend counts from that moment in every state, so
    a SIGKILL at any point can over-count (a release that never left) but never
    under-count. The outcome is tracked in a local, unsigned status: `reserve` writes the
    entry as ``PENDING`` just before the upload; `commit` (upload sent) or `abandon`
    (it will not be sent) close it. No state refunds spend: the ledger cannot prove that
    noised data never left, and the signed chain, the mirror and the audit report all
    count every entry. After a restart, `pending` lists reservations whose outcome is
    unknown; resend that same payload and `commit`, or `abandon` it. A new reservation
    (or entry) for a run/round/upload/relation that still has a pending one is refused,
    so a retry cannot count one release twice by accident. `append` writes an entry already
    ``RELEASED`` (write-ahead as well, without the outcome tracking).

    Attributes:
        path: The SQLite file.
        silo: The silo whose ledger this is.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        path: Path,
        silo: str,
        certificate_pem: str,
        signer: object,
    ) -> None:
        self._conn = conn
        self.path = path
        self.silo = silo
        self._certificate = certificate_pem
        self._signer = signer
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        silo: str,
        certificate_pem: bytes | str,
        private_key_pem: bytes | str,
    ) -> Ledger:
        """Opens (or creates) a silo's ledger.

        Args:
            path: The SQLite file, in the agent's state directory; its directory is
                created if missing.
            silo: This silo's name; must be the certificate's CN.
            certificate_pem: This silo's federation certificate (role silo), PEM.
            private_key_pem: That certificate's private key (ECDSA P-256 or Ed25519), PEM.

        Returns:
            The open ledger; close it with `close` (or use it as a context manager).

        Raises:
            LedgerError: If the certificate is not silo ``silo``'s, the key does not
                belong to it, the file is another silo's ledger, or SQLite cannot use
                write-ahead logging there.
            ValueError: If ``silo`` is not a valid name.
        """
        validate_name(silo)
        cert_bytes = _pem_bytes(certificate_pem, "certificate_pem")
        key_bytes = _pem_bytes(private_key_pem, "private_key_pem")
        try:
            signer = own_signer(cert_bytes, key_bytes, name=silo, purpose="privacy ledger entries")
        except SignatureError as exc:
            raise LedgerError(str(exc)) from None
        path = Path(path)

        def check(stored: dict[str, str]) -> None:
            if stored.get("kind") != "silo-ledger" or stored.get("silo") != silo:
                raise LedgerError(f"{str(path)!r} is not silo {silo!r}'s privacy ledger (it is "
                                  f"{stored.get('kind')!r} of {stored.get('silo')!r}); check the state directory")
            if stored.get("schema") != _LEDGER_SCHEMA_VERSION:
                raise LedgerError(f"{str(path)!r} has ledger schema {stored.get('schema')!r}, this "
                                  f"fedsilo reads {_LEDGER_SCHEMA_VERSION!r}")

        meta = {"schema": _LEDGER_SCHEMA_VERSION, "kind": "silo-ledger", "silo": silo}
        conn = open_database(path, _LEDGER_SCHEMA, meta, check)
        return cls(
            conn,
            path=path,
            silo=silo,
            certificate_pem=cert_bytes.decode("ascii"),
            signer=signer,
        )

    def close(self) -> None:
        """Closes the database."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def append(self, **fields_: Any) -> LedgerEntry:
        """Records a release, already ``RELEASED``; call it before the release leaves.

        Args:
            **fields_: The caller's `LedgerEntry` fields: ``run_id``, ``round``,
                ``upload_index``, ``mechanism``, ``neighbouring``, ``noise_multiplier``,
                ``sample_rate``, ``steps``, ``clip_norm``, ``delta``, ``epsilon_rdp``,
                ``rdp_order``, ``cumulative_epsilon``, and optionally ``epsilon_prv``
                (None), ``guarantee_scope`` (``SINGLE_UPLOAD``), ``single_upload``
                (None), ``epsilon_pld`` and ``cumulative_epsilon_pld`` (None) and
                ``accountant`` (None: a version-1, RDP-only entry; `fedsilo.privacy.plan.
                ledger_fields` states PLD and the accountant). ``seq``, ``silo``, ``created_at``, ``prev_hash``, ``certificate``
                and ``signature`` are computed.

        Returns:
            The signed entry, durable on disk.

        Raises:
            ValueError: Naming the field, if a field is missing, unknown, malformed, or a
                cumulative ε is lower than this relation's previous one; or if this
                run/round/upload/relation has a pending reservation (resolve it first).
        """
        return self._append(fields_, EntryStatus.RELEASED)

    def reserve(self, **fields_: Any) -> LedgerEntry:
        """Records a release about to leave, as ``PENDING``; its spend counts from now.

        Args:
            **fields_: As for `append`.

        Returns:
            The signed entry, durable on disk; pass its ``seq`` to `commit` or `abandon`.

        Raises:
            ValueError: As for `append`.
        """
        return self._append(fields_, EntryStatus.PENDING)

    def commit(self, seq: int) -> LedgerEntry:
        """Marks a reservation as released (the upload was sent). Idempotent.

        Args:
            seq: The reserved entry's seq.

        Returns:
            The entry.

        Raises:
            ValueError: If there is no such entry or it was abandoned.
        """
        return self._resolve(seq, EntryStatus.RELEASED)

    def abandon(self, seq: int) -> LedgerEntry:
        """Marks a reservation as not to be sent. Idempotent; its spend still counts.

        Args:
            seq: The reserved entry's seq.

        Returns:
            The entry.

        Raises:
            ValueError: If there is no such entry or it was already released.
        """
        return self._resolve(seq, EntryStatus.ABANDONED)

    def status(self, seq: int) -> EntryStatus:
        """The local state of an entry.

        Args:
            seq: The entry's seq.

        Returns:
            Its status.

        Raises:
            ValueError: If there is no such entry.
        """
        row = self._query(
            "SELECT status FROM entries WHERE seq = ?", (_integer(seq, "seq", minimum=1),)
        )
        if not row:
            raise ValueError(self._no_such(seq))
        return EntryStatus(row[0][0])

    def pending(self) -> list[LedgerEntry]:
        """Reservations neither committed nor abandoned (after a crash: outcome unknown).

        Returns:
            The pending entries, oldest first.
        """
        rows = self._query("SELECT entry_json FROM entries WHERE status = 'pending' ORDER BY seq")
        return [self._load(r[0]) for r in rows]

    def entries(self, neighbouring: Neighbouring | None = None) -> list[LedgerEntry]:
        """The entries, oldest first.

        Args:
            neighbouring: Only this relation's entries (its history); None for all.

        Returns:
            The entries in every status.
        """
        if neighbouring is None:
            rows = self._query("SELECT entry_json FROM entries ORDER BY seq")
        else:
            relation = _enum(neighbouring, Neighbouring, "neighbouring")
            rows = self._query(
                "SELECT entry_json FROM entries WHERE neighbouring = ? ORDER BY seq",
                (relation.value,),
            )
        return [self._load(r[0]) for r in rows]

    def entry(self, seq: int) -> LedgerEntry:
        """One entry.

        Args:
            seq: Its seq.

        Returns:
            The entry.

        Raises:
            ValueError: If there is no such entry.
        """
        rows = self._query(
            "SELECT entry_json FROM entries WHERE seq = ?", (_integer(seq, "seq", minimum=1),)
        )
        if not rows:
            raise ValueError(self._no_such(seq))
        return self._load(rows[0][0])

    def last(self) -> LedgerEntry | None:
        """The newest entry, or None for an empty ledger."""
        rows = self._query("SELECT entry_json FROM entries ORDER BY seq DESC LIMIT 1")
        return self._load(rows[0][0]) if rows else None

    def cumulative(
        self,
        neighbouring: Neighbouring,
        *,
        scope: GuaranteeScope = GuaranteeScope.SINGLE_UPLOAD,
    ) -> float:
        """This silo's cumulative ε for one neighbouring relation, pending entries included.

        Args:
            neighbouring: Record-level or silo-level; the two are never added up.
            scope: Against whom: ``SINGLE_UPLOAD`` (the default, the conservative figure:
                anyone who sees this silo's uploads) or ``AGGREGATE``.

        Returns:
            The latest entry's cumulative ε for that relation and scope by the accountant
            that governed it (`LedgerEntry.budget_epsilon`); 0.0 if none.
        """
        relation = _enum(neighbouring, Neighbouring, "neighbouring")
        rows = self._query(
            "SELECT entry_json FROM entries WHERE neighbouring = ? ORDER BY seq DESC LIMIT 1",
            (relation.value,),
        )
        if not rows:
            return 0.0
        return self._load(rows[0][0]).budget_epsilon(scope)

    def verify(self, *, ca_pem: bytes | str) -> None:
        """Runs `verify_chain` over this ledger (e.g. after a restart).

        Args:
            ca_pem: The federation CA certificate, PEM.

        Raises:
            LedgerError: Naming the first bad entry.
        """
        verify_chain(self._raw_entries(), ca_pem=ca_pem, expected_silo=self.silo)

    # --- internals -------------------------------------------------------------------

    def _append(self, given: dict[str, Any], status: EntryStatus) -> LedgerEntry:
        values = _caller_fields(given)
        with self._lock, _transaction(self._conn):
            row = self._conn.execute(
                "SELECT entry_json FROM entries ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            previous = self._load(row[0]) if row else None
            unsigned = LedgerEntry(
                **values,
                seq=1 if previous is None else previous.seq + 1,
                silo=self.silo,
                created_at=now_text(),
                prev_hash=GENESIS_HASH if previous is None else previous.entry_hash(),
                certificate=self._certificate,
                signature=bytes(SIGNATURE_BYTES),
            )
            row = self._conn.execute(
                "SELECT entry_json FROM entries WHERE neighbouring = ? ORDER BY seq DESC LIMIT 1",
                (unsigned.neighbouring.value,),
            ).fetchone()
            _check_spend(unsigned, self._load(row[0]) if row else None)
            # One pending reservation per release: the same run, round, upload, relation and
            # mechanism parameters (a round may hold several releases, e.g. a ResFIM mask's
            # noisy Fisher beside the DP-SGD training it shapes).
            same = _release_key(unsigned)
            clash = next((
                (seq,) for seq, text in self._conn.execute(
                    "SELECT seq, entry_json FROM entries WHERE run_id = ? AND round = ? AND upload_index = ? "
                    "AND neighbouring = ? AND status = 'pending'",
                    (
                        unsigned.run_id,
                        unsigned.round,
                        unsigned.upload_index,
                        unsigned.neighbouring.value,
                    ),
                ).fetchall()
                if _release_key(self._load(text)) == same
            ), None)
            if clash:
                raise ValueError(
                    f"run {unsigned.run_id!r} round {unsigned.round} upload "
                    f"{unsigned.upload_index} ({unsigned.neighbouring.value}-level) already has "
                    f"pending reservation seq {clash[0]}, whose outcome is unknown; resend that "
                    f"release and commit({clash[0]}), or abandon({clash[0]}), before recording "
                    "this release again"
                )
            entry = unsigned.signed_with(self._signer)
            self._conn.execute(
                "INSERT INTO entries (seq, run_id, round, upload_index, neighbouring, entry_json, "
                "status) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.seq,
                    entry.run_id,
                    entry.round,
                    entry.upload_index,
                    entry.neighbouring.value,
                    entry.to_json(),
                    status.value,
                ),
            )
        return entry

    def _resolve(self, seq: int, outcome: EntryStatus) -> LedgerEntry:
        seq = _integer(seq, "seq", minimum=1)
        with self._lock, _transaction(self._conn):
            row = self._conn.execute(
                "SELECT status, entry_json FROM entries WHERE seq = ?", (seq,)
            ).fetchone()
            if row is None:
                raise ValueError(self._no_such(seq))
            current = EntryStatus(row[0])
            if current is EntryStatus.PENDING:
                self._conn.execute(
                    "UPDATE entries SET status = ? WHERE seq = ?", (outcome.value, seq)
                )
            elif current is not outcome:
                raise ValueError(
                    f"invalid seq {seq!r}: entry {seq} is already {current.value}, it cannot "
                    f"become {outcome.value}"
                )
        return self._load(row[1])

    def _no_such(self, seq: object) -> str:
        return f"invalid seq {seq!r}: no such entry in silo {self.silo!r}'s ledger"

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _raw_entries(self) -> list[str]:
        return [r[0] for r in self._query("SELECT entry_json FROM entries ORDER BY seq")]

    def _load(self, text: str) -> LedgerEntry:
        try:
            return LedgerEntry.from_json(text)
        except LedgerError as exc:
            raise LedgerError(
                f"silo {self.silo!r}'s ledger {str(self.path)!r} holds a damaged entry: {exc}",
                seq=exc.seq,
            ) from None


def _release_key(entry: LedgerEntry) -> tuple[Any, ...]:
    return (entry.mechanism, entry.noise_multiplier, entry.sample_rate, entry.steps, entry.clip_norm)


def _caller_fields(given: Mapping[str, Any]) -> dict[str, Any]:
    computed = sorted(set(given) & _COMPUTED_FIELDS)
    if computed:
        raise ValueError(
            f"invalid field {computed[0]}: it is computed by the ledger, do not pass it"
        )
    unknown = sorted(set(given) - _CALLER_FIELDS)
    if unknown:
        raise ValueError(
            f"invalid field {unknown[0]}: not a ledger field (expected {sorted(_CALLER_FIELDS)})"
        )
    values = {**_CALLER_DEFAULTS, **given}
    missing = sorted(_CALLER_FIELDS - set(values))
    if missing:
        raise ValueError(f"missing field {missing[0]}: every release needs it")
    return values


def _pem_bytes(value: object, name: str) -> bytes:
    if isinstance(value, str):
        return value.encode("ascii")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise LedgerError(f"{name} must be PEM bytes or text, not {type(value).__name__}")
