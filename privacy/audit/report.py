"""The audit report's format: its constants, accounting and threat-model text, errors and results."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedsilo.privacy.accounting import (
    DEFAULT_PLD_DISCRETIZATION,
    DEFAULT_PLD_MAX_RDP_EPSILON,
    LEDGER_RDP_ORDERS,
)
from fedsilo.privacy.budget import BudgetStatement
from fedsilo.privacy.ledger import LedgerEntry


REPORT_FORMAT = "fedsilo-audit-report-v2"
"""Version 2 states every ε by PLD beside RDP and which accountant governed each silo's budget;
a version-1 report is rebuilt from its state directory (its ledgers still verify)."""
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


ACCOUNTING: Mapping[str, Any] = {
    "method": "rdp",
    "orders": [float(a) for a in LEDGER_RDP_ORDERS],
    "conversion": (
        "RDP to (epsilon, delta) by Balle et al. 2020, Thm. 21 (= Canonne, Kamath, Steinke "
        "2020, Prop. 12), best order of the grid"
    ),
    "composition": (
        "all of a silo's releases of one neighbouring relation, over every run in its ledger; "
        "record-level and silo-level epsilon are never added together"
    ),
    "verifier": "dp_accounting",
    "pld": {
        "library": "dp_accounting",
        "value_discretization_interval": DEFAULT_PLD_DISCRETIZATION,
        "estimate": "pessimistic",
        "neighbouring": "add_or_remove_one",
        "size_guard": (
            f"not computed where RDP bounds the history above {DEFAULT_PLD_MAX_RDP_EPSILON:g}; "
            "the RDP figure then stands"
        ),
        "cross_check": "Opacus' PRV accountant, where torch is installed",
    },
    "governing": (
        "each entry's accountant field names whose epsilon the silo's budget was enforced on "
        "(rdp, or pld: the silo's [privacy] accountant); entries of format v1 are rdp"
    ),
}
"""How every ε in a report was computed, and what `verify_report` recomputes it with."""


THREAT_MODEL = "\n\n".join(
    (
        "What is protected. Each ledger entry is one differentially private (DP) release by "
        "one silo (hospital). A record-level guarantee (neighbouring relation 'record', from "
        "DP-SGD training) limits what anything the silo released can reveal about any single "
        "patient record: adding or removing one record changes the probability of any outcome "
        "by at most a factor e^epsilon, except with probability delta. A silo-level guarantee "
        "(relation 'silo', from noise added to the silo's whole model update) limits the same "
        "for adding or removing the silo's entire dataset at once. The two protect different "
        "units, so their epsilon values are accounted separately and never added together.",
        "Against whom. When a silo adds all the noise itself (guarantee scope "
        "'single_upload'), its guarantee holds against anyone who sees its uploads, and so "
        "also against anyone who sees only the aggregate or the final model. When the noise "
        "is shared among K silos under homomorphic encryption (guarantee scope 'aggregate'), "
        "each silo adds only its share (noise multiplier sigma divided by the square root of "
        "K); the full guarantee then holds only against someone who sees the decrypted "
        "aggregate (the other silos and the users of the model; the coordinator cannot "
        "decrypt). Against someone who could see one silo's upload decrypted on its own, for "
        "example if key-holding silos colluded with the coordinator, only the weaker "
        "single-upload guarantee holds. The aggregate figure also assumes that all K silos "
        "added their share in that round; if fewer did, the aggregate carried less noise "
        "than stated (each silo's single-upload figure still holds). This report gives both "
        "figures; a silo's budget applies to the weaker single-upload figure.",
        "Two accountants. Every epsilon is stated twice: by Renyi DP (RDP) and by the privacy "
        "loss distribution (PLD). Both are valid upper bounds on the same privacy loss; PLD is "
        "the tighter one (often about 8% lower), RDP the one most studies quote. Each silo "
        "enforces its budget on the one it chose, and every entry names it. Which figure "
        "governed changes how many rounds fit in a budget, not what was released.",
        "When spend counts. A silo writes, signs and stores a ledger entry before its upload "
        "leaves (write-ahead). The epsilon counts from that moment, even if the upload was "
        "never sent or never used, and it is never refunded: the silo cannot prove that "
        "noised data did not leave. The cumulative epsilon may therefore over-count, but "
        "never under-count.",
        "What is not protected. DP does not hide: how many training examples each silo has "
        "(it is reported to the coordinator), the model architecture and training settings, "
        "which silos took part and when (round timing, upload sizes), or anything shared "
        "outside fedsilo. Encryption keeps each silo's update from the coordinator, but it "
        "does nothing about what the trained model itself reveals: DP is what protects "
        "patients against the eventual users of the model. The guarantees assume each silo's "
        "software added the noise it recorded; the signatures prove what a silo stated and "
        "that nobody changed it afterwards, not that its code was honest.",
        "Integrity. Every entry is hash-chained to the previous one and signed with the "
        "silo's federation certificate; every budget is signed the same way. A report that "
        "verifies proves the entries and budgets are the silos' own and unchanged, provided "
        "the CA fingerprint in it matches the federation CA you obtained from the operator "
        "through a trusted channel.",
    )
)
"""The plain-words threat model every report carries (part of the format)."""


_TOP_KEYS = frozenset(
    {
        "format",
        "generated_at",
        "source",
        "ca_certificate",
        "ca_sha256",
        "accounting",
        "threat_model",
        "silos",
    }
)


_SILO_KEYS = frozenset(
    {"silo", "budget", "entries", "releases", "cumulative", "budget_left", "within_budget"}
)


_DERIVED_KEYS = ("releases", "cumulative", "budget_left", "within_budget")
_SOURCES = ("silo", "coordinator")
_MAX_REPORT_BYTES = 512 * 1024 * 1024


class AuditError(Exception):
    """A state directory or report failed verification, or cannot be read.

    Attributes:
        silo: The silo at fault, or None.
        seq: The seq of the first bad ledger entry of that silo, or None.
        field: The report field at fault (e.g. ``silos[0].budget_left``), or None.
    """

    def __init__(
        self,
        message: str,
        *,
        silo: str | None = None,
        seq: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.silo = silo
        self.seq = seq
        self.field = field


@dataclass(frozen=True, kw_only=True)
class VerifyResult:
    """What `verify_report` checked.

    Attributes:
        source: Where the report came from: ``"silo"`` or ``"coordinator"``.
        silos: The silos in the report, sorted.
        entries: How many ledger entries were verified, all silos together.
        max_epsilon_difference: The largest absolute difference between a stored ε by RDP
            and dp_accounting's recomputation (0.0 without entries).
        max_pld_difference: The same for the stored ε by PLD (0.0 without PLD figures).
        pld_figures: How many stored PLD figures were recomputed.
        prv_cross_check: (figures compared, largest |PLD − PRV|) of each silo's final
            cumulative PLD figures against Opacus' PRV accountant; None without torch.
        ca_sha256: SHA-256 (hex) of the DER of the CA the report was verified against.
        ca_from_report: True when no CA was given, so the trust anchor is the CA inside the
            report itself: compare ``ca_sha256`` with the federation CA's fingerprint.
    """

    source: str
    silos: tuple[str, ...]
    entries: int
    max_epsilon_difference: float
    ca_sha256: str
    ca_from_report: bool
    max_pld_difference: float = 0.0
    pld_figures: int = 0
    prv_cross_check: tuple[int, float] | None = None

    def __post_init__(self) -> None:
        if self.source not in _SOURCES:
            raise ValueError(f"invalid field source {self.source!r}: expected one of {_SOURCES}")
        if not isinstance(self.silos, tuple) or not all(isinstance(s, str) for s in self.silos):
            raise ValueError(f"invalid field silos {self.silos!r}: expected a tuple of names")
        if isinstance(self.entries, bool) or not isinstance(self.entries, int) or self.entries < 0:
            raise ValueError(f"invalid field entries {self.entries!r}: expected an integer >= 0")
        if not isinstance(self.max_epsilon_difference, float) or not (
            self.max_epsilon_difference >= 0.0
        ):
            raise ValueError(
                f"invalid field max_epsilon_difference {self.max_epsilon_difference!r}: "
                "expected a float >= 0"
            )
        if not isinstance(self.ca_sha256, str) or len(self.ca_sha256) != 64:
            raise ValueError(f"invalid field ca_sha256 {self.ca_sha256!r}: expected 64 hex digits")
        if not isinstance(self.ca_from_report, bool):
            raise ValueError(
                f"invalid field ca_from_report {self.ca_from_report!r}: expected a bool"
            )


@dataclass(frozen=True, kw_only=True)
class _Silo:
    """One silo's verified entries (oldest first) and budget statement."""

    name: str
    entries: tuple[LedgerEntry, ...]
    budget: BudgetStatement | None


def _serialise(report: object) -> str:
    return (
        json.dumps(report, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n"
    )


def _keys(data: Mapping[str, Any], expected: frozenset[str], prefix: str, where: str) -> None:
    missing = sorted(expected - set(data))
    if missing:
        raise _field_error(where, f"{prefix}{missing[0]}", "is missing")
    extra = sorted(set(data) - expected)
    if extra:
        raise _field_error(where, f"{prefix}{extra[0]}", "is not a report field")


def _field_error(where: str, field: str, problem: str, *, silo: str | None = None) -> AuditError:
    return AuditError(f"{where}: report field {field} {problem}", silo=silo, field=field)


def _canon(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
