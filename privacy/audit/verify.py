"""Verifying an audit report: canonical form, every chain and budget, and every ε recomputed."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsilo.privacy.audit.build import (
    _accounting,
    _ca_identity,
    _verify_chain,
    derive_silo_summary,
)
from fedsilo.privacy.audit.disclosures import _checked_disclosure
from fedsilo.privacy.audit.empirical import EMPIRICAL_KEY, check_empirical_audits
from fedsilo.privacy.audit.recompute import EpsilonCheck, check_epsilons
from fedsilo.privacy.audit.report import (
    AuditError,
    REPORT_FORMAT,
    THREAT_MODEL,
    VerifyResult,
    _DERIVED_KEYS,
    _MAX_REPORT_BYTES,
    _SILO_KEYS,
    _SOURCES,
    _Silo,
    _TOP_KEYS,
    _canon,
    _field_error,
    _keys,
    _serialise,
)
from fedsilo.privacy.audit.tamper import _located, _refuse_constant
from fedsilo.privacy.budget import BudgetError, BudgetStatement
from fedsilo.privacy.ledger import LedgerEntry, LedgerError
from fedsilo.privacy.pki import validate_name
from fedsilo.privacy.signed import check_created_at


def verify_report(
    path: Path | str, *, ca_pem: bytes | str | None = None, tolerance: float = 1e-3
) -> VerifyResult:
    """Verifies a ``report.json`` from the entries up, recomputing every ε independently.

    Checks, in order: the file is exactly the canonical text of its content; the format;
    the CA (against ``ca_pem`` when given); every silo's chain (hash links, certificates,
    signatures) and budget statement; every derived field (releases, cumulative,
    budget_left, within_budget) and the rest of the report against what `build_report`
    derives; and every ε, per release and cumulative for both scopes, recomputed with
    Google's dp_accounting: by RDP (`DpAccountingVerifier` on ``LEDGER_RDP_ORDERS``) and by
    PLD (`PldAccountant`, the ledger's settings; an entry without a PLD figure must be one
    beyond its size guard, or of format v1), plus ``epsilon_prv`` never above
    ``epsilon_rdp``; where torch is installed, each silo's final PLD figures are cross-checked
    against Opacus' PRV accountant (`fedsilo.privacy.audit.recompute.check_epsilons`).

    Args:
        path: The ``report.json``.
        ca_pem: The federation CA certificate (PEM) to trust; None trusts the CA in the
            report (then compare `VerifyResult.ca_sha256` with the federation CA's
            fingerprint).
        tolerance: Largest accepted absolute ε difference.

    Returns:
        A summary of what was verified.

    Raises:
        AuditError: At the first failure; the message names the silo and entry seq, or
            the report field.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
        0.0 <= float(tolerance) < math.inf
    ):
        raise ValueError(f"invalid tolerance {tolerance!r}: must be a finite number >= 0")
    path = Path(path)
    where = str(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_REPORT_BYTES + 1)
    except OSError as exc:
        raise AuditError(f"cannot read the report {where}: {exc}") from None
    if len(raw) > _MAX_REPORT_BYTES:
        raise AuditError(f"{where}: larger than {_MAX_REPORT_BYTES} bytes, not a report")
    report = _parse_canonical(raw, where)
    _check_top(report, where)
    _check_empirical(report, where, float(tolerance))
    ca_text = report["ca_certificate"]
    _, ca_sha = _ca_identity(ca_text, "the report's ca_certificate")
    if ca_sha != report["ca_sha256"]:
        raise AuditError(
            f"{where}: report field ca_sha256 {report['ca_sha256']!r} is not the SHA-256 of the "
            f"report's ca_certificate ({ca_sha})",
            field="ca_sha256",
        )
    if ca_pem is not None:
        _, given_sha = _ca_identity(ca_pem, "the CA certificate given")
        if given_sha != ca_sha:
            raise AuditError(
                f"{where}: the report's CA (SHA-256 {ca_sha}) is not the CA you gave (SHA-256 "
                f"{given_sha}): the report was made for another federation or its CA was "
                "replaced; do not trust it",
                field="ca_certificate",
            )
    silos = [_verified_silo(report, i, where, ca_text) for i in range(len(report["silos"]))]
    for index, silo in enumerate(silos):
        _check_derived(report["silos"][index], index, silo, where)
    checked: EpsilonCheck = check_epsilons(silos, where, float(tolerance))
    return VerifyResult(
        source=report["source"],
        silos=tuple(s.name for s in silos),
        entries=sum(len(s.entries) for s in silos),
        max_epsilon_difference=checked.max_rdp_difference,
        ca_sha256=ca_sha,
        ca_from_report=ca_pem is None,
        max_pld_difference=checked.max_pld_difference,
        pld_figures=checked.pld_figures,
        prv_cross_check=checked.prv_cross_check,
    )


def _parse_canonical(raw: bytes, where: str) -> dict[str, Any]:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise _located(
            raw.decode("latin-1"), exc.start, where, "holds a byte that is not ASCII"
        ) from None
    try:
        parsed = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise _located(text, exc.pos, where, f"is not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        raise AuditError(f"{where}: not a valid report: {exc}") from None
    if not isinstance(parsed, dict):
        raise AuditError(f"{where}: not an audit report (not a JSON object)")
    if parsed.get("format") != REPORT_FORMAT:
        raise AuditError(
            f"{where}: report field format is {parsed.get('format')!r}; this fedsilo verifies "
            f"{REPORT_FORMAT!r}"
            + (" (a report made before PLD: rebuild it with `fedsilo audit report --state DIR`; the ledgers "
               "themselves still verify)" if parsed.get("format") == "fedsilo-audit-report-v1" else ""),
            field="format",
        )
    try:
        canonical = _serialise(parsed)
    except (ValueError, TypeError) as exc:
        raise AuditError(f"{where}: not a valid report: {exc}") from None
    if canonical != text:
        position = next(
            (i for i, (a, b) in enumerate(zip(text, canonical)) if a != b),
            min(len(text), len(canonical)),
        )
        raise _located(
            text,
            position,
            where,
            "is not in the exact form fedsilo writes (whitespace, escapes, key order or number "
            "spelling changed)",
        )
    return parsed


def _check_top(report: Mapping[str, Any], where: str) -> None:
    _keys(report, _TOP_KEYS | ({"disclosures", EMPIRICAL_KEY} & set(report)), "", where)  # reports before disclosures lack it
    if "disclosures" in report:
        if not isinstance(report["disclosures"], list):
            raise _field_error(where, "disclosures", "must be a list")
        for i, item in enumerate(report["disclosures"]):
            try:
                _checked_disclosure(item, f"disclosures[{i}]")
            except AuditError as exc:
                raise _field_error(where, f"disclosures[{i}]", str(exc).split(": ", 1)[1]) from None
    generated = report["generated_at"]
    if not isinstance(generated, str):
        raise _field_error(where, "generated_at", "must be UTC time as text")
    try:
        check_created_at(generated)
    except ValueError:
        raise _field_error(
            where, "generated_at", "must be UTC time as YYYY-MM-DDTHH:MM:SS.ffffffZ"
        ) from None
    if report["source"] not in _SOURCES:
        raise _field_error(where, "source", f"must be one of {list(_SOURCES)}")
    for name in ("ca_certificate", "ca_sha256"):
        if not isinstance(report[name], str):
            raise _field_error(where, name, "must be text")
    if _canon(report["accounting"]) != _canon(_accounting()):
        raise _field_error(
            where, "accounting", "differs from how fedsilo accounts ε (it was changed)"
        )
    if report["threat_model"] != THREAT_MODEL:
        raise _field_error(
            where,
            "threat_model",
            f"differs from the threat model of {REPORT_FORMAT} (it was changed)",
        )
    silos = report["silos"]
    if not isinstance(silos, list):
        raise _field_error(where, "silos", "must be a list")
    names = []
    for index, section in enumerate(silos):
        if not isinstance(section, dict):
            raise _field_error(where, f"silos[{index}]", "must be an object")
        _keys(section, _SILO_KEYS, f"silos[{index}].", where)
        name = section["silo"]
        try:
            validate_name(name)
        except ValueError as exc:
            raise _field_error(where, f"silos[{index}].silo", str(exc)) from None
        if not isinstance(section["entries"], list):
            raise _field_error(where, f"silos[{index}].entries", "must be a list", silo=name)
        names.append(name)
    if names != sorted(set(names)):
        raise _field_error(where, "silos", "must list each silo once, sorted by name")
    if report["source"] == "silo" and len(names) != 1:
        raise _field_error(where, "silos", "a silo's report covers exactly that one silo")


def _check_empirical(report: Mapping[str, Any], where: str, tolerance: float) -> None:
    """The empirical-audit section, when present: shape, ε̂ from its counts, ledger ε by dp_accounting."""
    if EMPIRICAL_KEY in report:
        check_empirical_audits(report[EMPIRICAL_KEY], where, epsilon_tolerance=tolerance)


def _verified_silo(report: Mapping[str, Any], index: int, where: str, ca_pem: str) -> _Silo:
    section = report["silos"][index]
    name = section["silo"]
    raw_entries = section["entries"]
    try:
        _verify_chain(raw_entries, ca_pem=ca_pem, silo=name)
    except LedgerError as exc:
        raise AuditError(f"{where}: silo {name!r}: {exc}", silo=name, seq=exc.seq) from None
    entries = tuple(LedgerEntry.from_json(e) for e in raw_entries)
    for entry, raw in zip(entries, raw_entries):
        if _canon(entry.to_dict()) != _canon(raw):
            raise AuditError(
                f"{where}: silo {name!r}: ledger entry seq {entry.seq} is not spelled as the "
                "silo wrote it",
                silo=name,
                seq=entry.seq,
            )
    budget = None
    if section["budget"] is not None:
        try:
            budget = BudgetStatement.from_json(section["budget"])
            budget.verify(ca_pem=ca_pem)
        except BudgetError as exc:
            raise AuditError(
                f"{where}: silo {name!r}'s budget statement (report field silos[{index}].budget) "
                f"fails verification: {exc}",
                silo=name,
                field=f"silos[{index}].budget",
            ) from None
        if budget.silo != name or _canon(budget.to_dict()) != _canon(section["budget"]):
            raise AuditError(
                f"{where}: report field silos[{index}].budget is not silo {name!r}'s budget "
                f"statement as it was signed (it belongs to silo {budget.silo!r})",
                silo=name,
                field=f"silos[{index}].budget",
            )
    return _Silo(name=name, entries=entries, budget=budget)


def _check_derived(section: Mapping[str, Any], index: int, silo: _Silo, where: str) -> None:
    derived = derive_silo_summary(silo.entries, silo.budget)
    for key in _DERIVED_KEYS:
        found = _first_difference(section[key], derived[key], f"silos[{index}].{key}")
        if found is not None:
            field, stored, expected = found
            raise AuditError(
                f"{where}: report field {field} of silo {silo.name!r} is {stored!r}, but the "
                f"silo's signed entries and budget give {expected!r}; the report was changed "
                "after it was written",
                silo=silo.name,
                field=field,
            )


def _first_difference(stored: object, expected: object, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(expected, dict) and isinstance(stored, dict):
        for key in sorted(set(stored) | set(expected)):
            if key not in stored or key not in expected:
                return f"{path}.{key}", stored.get(key), expected.get(key)
            found = _first_difference(stored[key], expected[key], f"{path}.{key}")
            if found is not None:
                return found
        return None
    if isinstance(expected, list) and isinstance(stored, list):
        for i, (a, b) in enumerate(zip(stored, expected)):
            found = _first_difference(a, b, f"{path}[{i}]")
            if found is not None:
                return found
        if len(stored) != len(expected):
            return f"{path} (length)", len(stored), len(expected)
        return None
    if _canon(stored) != _canon(expected):
        return path, stored, expected
    return None
