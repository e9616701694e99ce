"""Empirical privacy audits in a state directory: the record, the report section, its checks and HTML."""

from __future__ import annotations

import enum
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsilo.core.atomic import atomic_write
from fedsilo.privacy.accounting import (
    LEDGER_RDP_ORDERS,
    DpAccountingVerifier,
    Mechanism,
    Neighbouring,
    Release,
    pld_or_none,
)
from fedsilo.privacy.audit.membership import MembershipResult
from fedsilo.privacy.audit.one_run import OneRunBound, epsilon_lower_bound
from fedsilo.privacy.audit.report import AuditError
from fedsilo.privacy.signed import check_created_at

__all__ = [
    "EMPIRICAL_FILE",
    "EMPIRICAL_FORMAT",
    "EMPIRICAL_KEY",
    "ScoreMode",
    "append_empirical_audit",
    "check_empirical_audits",
    "empirical_audit_record",
    "empirical_html",
    "empirical_section",
    "read_empirical_audits",
]

#: Written by ``fedsilo audit empirical --out DIR`` into DIR; reports built there carry it.
EMPIRICAL_FILE = "empirical_audit.json"
EMPIRICAL_FORMAT = "fedsilo-empirical-audit-v1"
#: The report's top-level key for the section (present only when the file exists).
EMPIRICAL_KEY = "empirical_audits"

_RECORD_KEYS = frozenset({
    "level", "mode", "canaries", "guesses", "correct", "k_plus", "k_minus", "tries", "confidence",
    "delta", "epsilon_lower", "release", "ledger_epsilon", "ledger_epsilon_pld", "exceeds_ledger", "noise_scale_actual",
    "membership_inference", "seconds", "created_at",
})
_RELEASE_KEYS = frozenset({"mechanism", "neighbouring", "noise_multiplier", "sample_rate", "steps"})
_MIA_KEYS = frozenset({"silo", "members", "non_members", "auroc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr"})
_BOUND_TOLERANCE = 1e-6


class ScoreMode(enum.Enum):
    """What the auditor sees of the trained model (Steinke, Nasr & Jagielski 2023, Section 6)."""

    WHITE_BOX = "white_box"
    """The model change's inner product with each inserted canary gradient (Dirac canaries)."""
    BLACK_BOX = "black_box"
    """Each input-space canary's loss decrease from the initial to the final model."""


def empirical_audit_record(
    *,
    bound: OneRunBound,
    mode: ScoreMode,
    release: Release,
    ledger_epsilon: float,
    ledger_epsilon_pld: float | None,
    noise_scale_actual: float,
    membership: Mapping[str, MembershipResult],
    seconds: float,
    created_at: str,
) -> dict[str, Any]:
    """One audit as the JSON-ready record `append_empirical_audit` stores.

    Args:
        bound: The one-run ε lower bound and the counts it came from.
        mode: White- or black-box scoring.
        release: The DP release the training claims (what its ledger entry would hold).
        ledger_epsilon: ε of ``release`` at ``bound.delta`` by RDP (as the ledger states it).
        ledger_epsilon_pld: The same by PLD (the ledger's tighter figure), or None beyond its size
            guard. ε̂ is compared with the smaller of the two: the tightest claim the ledger makes.
        noise_scale_actual: The noise actually added divided by the claimed noise (1.0 except
            under the testing fault switch).
        membership: The loss-threshold attack's result per silo.
        seconds: Wall time of the audit.
        created_at: UTC time text (``now_text()``).

    Returns:
        The record.
    """
    return {
        "level": release.neighbouring.value,
        "mode": mode.value,
        "canaries": bound.counts.canaries,
        "guesses": bound.counts.guesses,
        "correct": bound.counts.correct,
        "k_plus": bound.k_plus,
        "k_minus": bound.k_minus,
        "tries": bound.tries,
        "confidence": bound.confidence,
        "delta": bound.delta,
        "epsilon_lower": bound.epsilon_lower,
        "release": {
            "mechanism": release.mechanism.value,
            "neighbouring": release.neighbouring.value,
            "noise_multiplier": release.noise_multiplier,
            "sample_rate": release.sample_rate,
            "steps": release.steps,
        },
        "ledger_epsilon": float(ledger_epsilon),
        "ledger_epsilon_pld": None if ledger_epsilon_pld is None else float(ledger_epsilon_pld),
        "exceeds_ledger": bool(bound.epsilon_lower > tightest_claim(ledger_epsilon, ledger_epsilon_pld)),
        "noise_scale_actual": float(noise_scale_actual),
        "membership_inference": [{"silo": name, **result.to_dict()} for name, result in sorted(membership.items())],
        "seconds": float(seconds),
        "created_at": created_at,
    }


def append_empirical_audit(state_dir: Path | str, record: Mapping[str, Any]) -> Path:
    """Appends one checked audit record to ``<state_dir>/empirical_audit.json`` (atomically).

    Raises:
        AuditError: If the record or the existing file is not well formed.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    audits = read_empirical_audits(state_dir)
    audits.append(json.loads(json.dumps(record)))
    check_empirical_audits(audits, EMPIRICAL_FILE)
    path = state_dir / EMPIRICAL_FILE
    text = json.dumps({"format": EMPIRICAL_FORMAT, "audits": audits}, indent=1, sort_keys=True, allow_nan=False)
    atomic_write(path, (text + "\n").encode("ascii"))
    return path


def read_empirical_audits(state_dir: Path | str) -> list[dict[str, Any]]:
    """The audit records in ``<state_dir>/empirical_audit.json`` ([] without the file), checked."""
    path = Path(state_dir) / EMPIRICAL_FILE
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="ascii"))
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != EMPIRICAL_FORMAT or set(data) != {"format", "audits"}:
        raise AuditError(f"{str(path)!r} is not a {EMPIRICAL_FORMAT} file (format and audits)")
    check_empirical_audits(data["audits"], str(path))
    return data["audits"]


def empirical_section(state_dir: Path) -> dict[str, Any]:
    """The report's section: ``{"empirical_audits": [...]}`` when the state directory has audits, else {}."""
    audits = read_empirical_audits(state_dir)
    return {EMPIRICAL_KEY: audits} if audits else {}


def _number(item: Mapping[str, Any], key: str, where: str, low: float, high: float) -> float:
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise AuditError(f"{where}.{key} is {value!r}: must be a number in [{low:g}, {high:g}]")
    return float(value)


def _count(item: Mapping[str, Any], key: str, where: str) -> int:
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AuditError(f"{where}.{key} is {value!r}: must be an integer >= 0")
    return value


def _exact_keys(item: object, keys: frozenset[str], where: str) -> Mapping[str, Any]:
    if not isinstance(item, Mapping) or set(item) != keys:
        found = sorted(item) if isinstance(item, Mapping) else type(item).__name__
        raise AuditError(f"{where} must be an object with exactly the fields {sorted(keys)}, got {found}")
    return item


def _checked_release(item: object, where: str) -> Release:
    data = _exact_keys(item, _RELEASE_KEYS, where)
    try:
        return Release(
            mechanism=Mechanism(data["mechanism"]),
            neighbouring=Neighbouring(data["neighbouring"]),
            noise_multiplier=data["noise_multiplier"],
            sample_rate=data["sample_rate"],
            steps=data["steps"],
        )
    except (ValueError, TypeError) as exc:
        raise AuditError(f"{where}: {exc}") from None


def check_empirical_audits(
    audits: object, where: str, *, epsilon_tolerance: float | None = None
) -> list[Mapping[str, Any]]:
    """Checks every audit record's shape and arithmetic.

    ε̂ is recomputed from the stored counts (`epsilon_lower_bound` at β = (1 - confidence) /
    tries), ``exceeds_ledger`` from ε̂ and the ledger ε; with ``epsilon_tolerance`` the ledger ε
    is also recomputed from the stored release with Google's dp_accounting.

    Args:
        audits: The list of records.
        where: Names the source in messages.
        epsilon_tolerance: Largest accepted |ledger ε - dp_accounting's|; None skips that check.

    Returns:
        The records.

    Raises:
        AuditError: At the first bad field, naming it.
    """
    if not isinstance(audits, list):
        raise AuditError(f"{where}: the empirical audits must be a list")
    for i, raw in enumerate(audits):
        at = f"{where}: {EMPIRICAL_KEY}[{i}]"
        item = _exact_keys(raw, _RECORD_KEYS, at)
        release = _checked_release(item["release"], f"{at}.release")
        if item["level"] != release.neighbouring.value:
            raise AuditError(f"{at}.level is {item['level']!r} but its release is {release.neighbouring.value}-level")
        if item["mode"] not in {m.value for m in ScoreMode}:
            raise AuditError(f"{at}.mode is {item['mode']!r}: must be one of {[m.value for m in ScoreMode]}")
        m, r, v = (_count(item, k, at) for k in ("canaries", "guesses", "correct"))
        k_plus, k_minus, tries = (_count(item, k, at) for k in ("k_plus", "k_minus", "tries"))
        if not v <= r <= m or r > k_plus + k_minus or tries < 1:
            raise AuditError(f"{at}: counts do not add up (canaries {m}, guesses {r}, correct {v}, k+ {k_plus}, "
                             f"k- {k_minus}, tries {tries})")
        confidence = _number(item, "confidence", at, 1e-12, 1.0 - 1e-12)
        delta = _number(item, "delta", at, 0.0, 1.0 - 1e-12)
        stored = _number(item, "epsilon_lower", at, 0.0, math.inf)
        fresh = epsilon_lower_bound(m, r, v, delta=delta, beta=(1.0 - confidence) / tries)
        if abs(fresh - stored) > _BOUND_TOLERANCE:
            raise AuditError(f"{at}.epsilon_lower is {stored!r}, but {v} correct of {r} guesses on {m} canaries "
                             f"give {fresh!r} (Steinke, Nasr & Jagielski 2023)")
        ledger = _number(item, "ledger_epsilon", at, 0.0, math.inf)
        ledger_pld = None if item["ledger_epsilon_pld"] is None else _number(item, "ledger_epsilon_pld", at, 0.0,
                                                                             math.inf)
        claim = tightest_claim(ledger, ledger_pld)
        if item["exceeds_ledger"] is not (stored > claim):
            raise AuditError(f"{at}.exceeds_ledger is {item['exceeds_ledger']!r}, but ε̂ {stored!r} vs ledger ε {claim!r}")
        if epsilon_tolerance is not None and delta > 0.0:
            verified = DpAccountingVerifier(orders=LEDGER_RDP_ORDERS).epsilon([release], delta=delta).epsilon
            if abs(verified - ledger) > epsilon_tolerance:
                raise AuditError(f"{at}.ledger_epsilon is {ledger!r}, but dp_accounting gives {verified!r} for its "
                                 f"release (tolerance {epsilon_tolerance!r})")
            pld = pld_or_none([release], delta=delta)
            if (pld is None) != (ledger_pld is None) or (
                    pld is not None and ledger_pld is not None and abs(pld - ledger_pld) > epsilon_tolerance):
                raise AuditError(f"{at}.ledger_epsilon_pld is {ledger_pld!r}, but dp_accounting's PLD gives {pld!r} "
                                 f"for its release (tolerance {epsilon_tolerance!r})")
        _number(item, "noise_scale_actual", at, 0.0, 1.0)
        _number(item, "seconds", at, 0.0, math.inf)
        if not isinstance(item["created_at"], str):
            raise AuditError(f"{at}.created_at must be UTC time as text")
        try:
            check_created_at(item["created_at"])
        except ValueError:
            raise AuditError(f"{at}.created_at is {item['created_at']!r}: not UTC time as fedsilo writes it") from None
        if not isinstance(item["membership_inference"], list):
            raise AuditError(f"{at}.membership_inference must be a list")
        for j, row in enumerate(item["membership_inference"]):
            mia = _exact_keys(row, _MIA_KEYS, f"{at}.membership_inference[{j}]")
            try:
                MembershipResult(**{k: mia[k] for k in _MIA_KEYS - {"silo"}})
            except ValueError as exc:
                raise AuditError(f"{at}.membership_inference[{j}]: {exc}") from None
            if not isinstance(mia["silo"], str) or not mia["silo"]:
                raise AuditError(f"{at}.membership_inference[{j}].silo must be a non-empty name")
    return audits


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _optional(value: float | None) -> str:
    return "&#8212;" if value is None else f"{value:.4g}"


def tightest_claim(rdp: float, pld: float | None) -> float:
    """The smallest ε the ledger states for a release (PLD where stated, else RDP): what ε̂ must not exceed."""
    return rdp if pld is None else min(rdp, pld)


def empirical_html(audits: Sequence[Mapping[str, Any]]) -> str:
    """The report's HTML section: one row per audit (ε̂ beside the ledger ε), then the attack per silo."""
    if not audits:
        return ""
    rows = []
    for a in audits:
        fault = "" if a["noise_scale_actual"] == 1.0 else (
            f' <span class="over">TESTING FAULT: noise x{a["noise_scale_actual"]:g}</span>')
        verdict = '<td class="over">EXCEEDS</td>' if a["exceeds_ledger"] else '<td class="ok">within</td>'
        rows.append(
            f'<tr><td class="t">{_e(a["level"])}-level{fault}</td><td class="t">{_e(a["mode"].replace("_", "-"))}</td>'
            f'<td>{a["release"]["noise_multiplier"]:.4g}</td><td>{a["release"]["sample_rate"]:.4g}</td>'
            f'<td>{a["release"]["steps"]}</td><td>{a["delta"]:.3g}</td><td>{a["canaries"]}</td>'
            f'<td>{a["correct"]} / {a["guesses"]}</td><td>{a["epsilon_lower"]:.4g}</td>'
            f'<td>{a["ledger_epsilon"]:.4g}</td><td>{_optional(a["ledger_epsilon_pld"])}</td>{verdict}'
            f'<td>{a["seconds"]:.3g}</td></tr>'
        )
    mia = []
    for a in audits:
        for row in a["membership_inference"]:
            mia.append(
                f'<tr><td class="t">{_e(a["created_at"])}</td><td class="t">{_e(row["silo"])}</td>'
                f'<td>{row["members"]}</td><td>{row["non_members"]}</td><td>{row["auroc"]:.4f}</td>'
                f'<td>{row["tpr_at_1pct_fpr"]:.4f}</td><td>{row["tpr_at_0_1pct_fpr"]:.4f}</td></tr>'
            )
    return (
        "<h2>Empirical privacy audits</h2><p>Each row is one audit training run with canaries "
        "(Steinke, Nasr &amp; Jagielski 2023, &#8220;Privacy Auditing with One (1) Training Run&#8221;): "
        "&#949;&#770; is a lower bound on the &#949; the training actually achieved, at the stated confidence; "
        "a correct implementation keeps it at or below the ledger's &#949; (usually far below). "
        "An &#949;&#770; above the ledger's &#949; means the training leaks more than the ledger claims. "
        "<code>fedsilo audit verify</code> recomputes &#949;&#770; from the counts.</p>"
        '<div class="scroll"><table><tr><th class="t">Relation</th><th class="t">Scores</th><th>&#963;</th>'
        "<th>q</th><th>Steps</th><th>&#948;</th><th>Canaries</th><th>Correct / guesses</th>"
        "<th>&#949;&#770; (lower bound)</th><th>Ledger &#949; (RDP)</th><th>Ledger &#949; (PLD)</th>"
        "<th>Verdict (against the smaller)</th><th>Seconds</th></tr>"
        + "".join(rows) + "</table></div>"
        + ("<h3>Loss-threshold membership inference per silo</h3><table><tr><th class=\"t\">Audit</th>"
           '<th class="t">Silo</th><th>Members</th><th>Non-members</th><th>AUROC</th><th>TPR at 1% FPR</th>'
           "<th>TPR at 0.1% FPR</th></tr>" + "".join(mia) + "</table>" if mia else "")
    )
