"""Per-silo privacy ledger: signed, hash-chained DP releases in SQLite, and their mirror."""

from fedsilo.privacy.ledger.entries import (
    DuplicateEntryError,
    ENTRY_FORMAT,
    EntryStatus,
    GENESIS_HASH,
    GuaranteeScope,
    LedgerEntry,
    LedgerError,
    MirrorQuotaError,
    UploadGuarantee,
)
from fedsilo.privacy.ledger.store import Ledger
from fedsilo.privacy.ledger.mirror import LedgerMirror
from fedsilo.privacy.accounting import Mechanism, Neighbouring
from fedsilo.privacy.ledger.chain import check_cumulative, verify_chain
from fedsilo.privacy.signed import parse_json_object

__all__ = [
    "ENTRY_FORMAT",
    "GENESIS_HASH",
    "DuplicateEntryError",
    "EntryStatus",
    "GuaranteeScope",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "LedgerMirror",
    "Mechanism",
    "MirrorQuotaError",
    "Neighbouring",
    "UploadGuarantee",
    "check_cumulative",
    "parse_json_object",
    "verify_chain",
]
