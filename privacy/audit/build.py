"""Building an audit report from a silo's or the coordinator's state directory, and writing it."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedsilo.core.atomic import atomic_write
from fedsilo.privacy.audit.disclosures import _read_disclosures
from fedsilo.privacy.audit.empirical import empirical_section
from fedsilo.privacy.audit.render import _render_html
from fedsilo.privacy.audit.report import (
    ACCOUNTING,
    AuditError,
    REPORT_FORMAT,
    REPORT_HTML,
    REPORT_JSON,
    THREAT_MODEL,
    _Silo,
    _serialise,
)
from fedsilo.privacy.budget import (
    BUDGETS_DIR,
    BUDGET_FILE,
    BudgetError,
    BudgetStatement,
    CA_FILE,
    LEDGER_FILE,
    MIRROR_FILE,
    load_budget,
)
from fedsilo.privacy.ledger import (
    GuaranteeScope,
    LedgerEntry,
    LedgerError,
    LedgerMirror,
    verify_chain,
)
from fedsilo.privacy.pki import validate_name
from fedsilo.privacy.signed import now_text


def build_report(state_dir: Path | str) -> dict[str, Any]:
    """Builds the audit report of an agent's or the coordinator's state directory.

    An agent's state directory holds its ledger (``ledger.sqlite``), read read-only, and
    optionally its budget (``privacy_budget.json``); the coordinator's holds the ledger
    mirror (``ledger_mirror.sqlite``) and ``budgets/<silo>.json``. Both hold the federation
    CA (``federation_ca.pem``). Every silo's chain and every budget statement is verified
    first; stored ε values are reported as they are (`verify_report` recomputes them).

    Args:
        state_dir: The state directory.

    Returns:
        The report, JSON-ready (see `write_report`): ``format``, ``generated_at``,
        ``source`` (``"silo"`` or ``"coordinator"``), ``ca_certificate``, ``ca_sha256``,
        ``accounting``, ``threat_model`` and ``silos``, one dict per silo sorted by name
        with ``silo``, ``budget``, ``entries`` and the fields `derive_silo_summary` gives.

    Raises:
        AuditError: If the directory holds neither a ledger nor a mirror (or both), lacks
            the CA, or a chain or budget fails verification (naming the silo and entry).
    """
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise AuditError(f"state directory {str(state_dir)!r} does not exist or is not a folder")
    ledger_path = state_dir / LEDGER_FILE
    mirror_path = state_dir / MIRROR_FILE
    if ledger_path.exists() and mirror_path.exists():
        raise AuditError(
            f"{str(state_dir)!r} holds both a silo's ledger ({LEDGER_FILE}) and a ledger mirror "
            f"({MIRROR_FILE}); an agent and the coordinator must not share a state directory"
        )
    if not ledger_path.exists() and not mirror_path.exists():
        raise AuditError(
            f"{str(state_dir)!r} is not a fedsilo state directory with privacy records: it holds "
            f"neither a silo's privacy ledger ({LEDGER_FILE}) nor the coordinator's ledger "
            f"mirror ({MIRROR_FILE}); pass the agent's state_dir (silo.toml) or the "
            "coordinator's server.state_dir (federation.toml) of a run with differential privacy"
        )
    ca_path = state_dir / CA_FILE
    try:
        ca_bytes = ca_path.read_bytes()
    except FileNotFoundError:
        raise AuditError(
            f"{str(state_dir)!r} lacks the federation CA certificate {CA_FILE}; without it "
            "nothing can be verified"
        ) from None
    except OSError as exc:
        raise AuditError(f"cannot read {str(ca_path)!r}: {exc}") from None
    ca_text, ca_sha = _ca_identity(ca_bytes, f"{str(ca_path)!r}")
    if ledger_path.exists():
        source = "silo"
        silos = [_agent_silo(state_dir, ledger_path, ca_bytes)]
    else:
        source = "coordinator"
        silos = _coordinator_silos(state_dir, mirror_path, ca_bytes)
    return {
        "format": REPORT_FORMAT,
        "generated_at": now_text(),
        "source": source,
        "ca_certificate": ca_text,
        "ca_sha256": ca_sha,
        "accounting": _accounting(),
        "threat_model": THREAT_MODEL,
        "silos": [_silo_section(s) for s in sorted(silos, key=lambda s: s.name)],
        "disclosures": _read_disclosures(state_dir),
        **empirical_section(state_dir),
    }


def derive_silo_summary(
    entries: Sequence[LedgerEntry], budget: BudgetStatement | None
) -> dict[str, Any]:
    """The report fields derived from a silo's entries and budget.

    Args:
        entries: The silo's verified entries, oldest first.
        budget: Its verified budget statement, or None.

    Returns:
        ``releases``: one row per entry (seq, run_id, round, upload_index, mechanism,
        neighbouring, noise_multiplier, single_upload_noise_multiplier, sample_rate, steps,
        clip_norm, delta, epsilon_rdp, rdp_order, epsilon_prv, epsilon_pld,
        single_upload_epsilon_rdp, cumulative ε by RDP and by PLD against the aggregate and a
        single upload, guarantee_scope, accountant); ``cumulative``: per relation present,
        ``aggregate`` and ``single_upload`` (RDP), ``aggregate_pld`` and
        ``single_upload_pld`` (PLD, None where not stated), ``accountant`` (whose figure
        governed the latest entry) and ``spent`` (that figure against a single upload,
        `LedgerEntry.budget_epsilon`); ``budget_left``: ``{relation: ε_max − spent}`` (None
        without a budget); ``within_budget``: ``{relation: bool}`` (None without a budget),
        true when ``spent`` is at most ε_max and stated at a δ no larger than the budget's.
    """
    releases = [_release_row(e) for e in entries]
    last: dict[str, LedgerEntry] = {}
    for entry in entries:
        last[entry.neighbouring.value] = entry
    cumulative = {}
    for relation, entry in sorted(last.items()):
        aggregate = entry.guarantee(GuaranteeScope.AGGREGATE)
        single = entry.guarantee(GuaranteeScope.SINGLE_UPLOAD)
        cumulative[relation] = {
            "aggregate": aggregate.cumulative_epsilon,
            "single_upload": single.cumulative_epsilon,
            "aggregate_pld": aggregate.cumulative_epsilon_pld,
            "single_upload_pld": single.cumulative_epsilon_pld,
            "accountant": entry.governing.value,
            "spent": entry.budget_epsilon(GuaranteeScope.SINGLE_UPLOAD),
        }
    if budget is None:
        return {
            "releases": releases,
            "cumulative": cumulative,
            "budget_left": None,
            "within_budget": None,
        }
    return {
        "releases": releases,
        "cumulative": cumulative,
        "budget_left": {
            relation: budget.epsilon - spent["spent"]
            for relation, spent in cumulative.items()
        },
        "within_budget": {
            relation: bool(
                spent["spent"] <= budget.epsilon and last[relation].delta <= budget.delta
            )
            for relation, spent in cumulative.items()
        },
    }


def report_summary(report: Mapping[str, Any]) -> list[str]:
    """One line per silo: cumulative ε per relation and budget left, for a terminal.

    Args:
        report: A report from `build_report`.

    Returns:
        The lines.
    """
    lines = []
    for section in report["silos"]:
        parts = []
        for relation, spent in section["cumulative"].items():
            pld = spent["single_upload_pld"]
            text = (
                f"{relation}-level ε {spent['spent']:.4g} by {spent['accountant'].upper()} "
                f"(RDP {spent['single_upload']:.4g}, PLD {'n/a' if pld is None else format(pld, '.4g')})"
            )
            if spent["aggregate"] != spent["single_upload"]:
                text += f" (aggregate RDP {spent['aggregate']:.4g})"
            if section["budget_left"] is not None:
                text += f", budget left {section['budget_left'][relation]:.4g}"
                if not section["within_budget"][relation]:
                    text += " (OVER BUDGET)"
            parts.append(text)
        if not parts:
            parts.append("no releases")
        if section["budget"] is None:
            parts.append("no signed budget")
        else:
            parts.append(
                f"budget ε {float(section['budget']['epsilon']):.4g} at δ "
                f"{float(section['budget']['delta']):.3g}"
            )
        lines.append(f"{section['silo']}: " + "; ".join(parts))
    for item in report.get("disclosures", []):
        lines.append(f"not in the ledger: {item['topic']}")
    return lines


def _agent_silo(state_dir: Path, ledger_path: Path, ca_pem: bytes) -> _Silo:
    silo, texts = _read_ledger(ledger_path)
    try:
        _verify_chain(texts, ca_pem=ca_pem, silo=silo)
    except LedgerError as exc:
        raise AuditError(
            f"silo {silo!r}'s ledger {str(ledger_path)!r} fails verification, refusing to report "
            f"on it: {exc}",
            silo=silo,
            seq=exc.seq,
        ) from None
    entries = tuple(LedgerEntry.from_json(t) for t in texts)
    budget = _checked_budget(state_dir / BUDGET_FILE, silo, ca_pem)
    return _Silo(name=silo, entries=entries, budget=budget)


def _verify_chain(entries: Sequence[Any], *, ca_pem: bytes | str, silo: str) -> None:
    """`verify_chain`, turning any stray parse error of a damaged entry into a LedgerError.

    A damaged certificate in an entry can make `cryptography` raise (ValueError,
    InvalidVersion, ...) from inside the check instead of LedgerError; the first bad entry
    is then found by bisecting over prefixes (a prefix fails iff it holds that entry).
    """
    try:
        verify_chain(entries, ca_pem=ca_pem, expected_silo=silo)
        return
    except LedgerError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure of damaged input
        problem = exc
    good, bad = 0, len(entries)  # entries[:good] verify, entries[:bad] do not
    while bad - good > 1:
        middle = (good + bad) // 2
        try:
            verify_chain(entries[:middle], ca_pem=ca_pem, expected_silo=silo)
            good = middle
        except Exception:  # noqa: BLE001 - as above
            bad = middle
    raise LedgerError(
        f"ledger entry seq {bad}: it cannot be read ({problem}); it was damaged or changed",
        seq=bad,
    )


def _read_ledger(path: Path) -> tuple[str, list[str]]:
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            rows = conn.execute("SELECT entry_json FROM entries ORDER BY seq").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise AuditError(
            f"cannot read the privacy ledger {str(path)!r}: {exc}; is it a fedsilo agent's "
            f"{LEDGER_FILE}?"
        ) from None
    if meta.get("kind") != "silo-ledger":
        raise AuditError(
            f"{str(path)!r} is not a silo's privacy ledger (it says it is {meta.get('kind')!r})"
        )
    silo = meta.get("silo")
    try:
        validate_name(silo)  # type: ignore[arg-type]
    except ValueError:
        raise AuditError(f"{str(path)!r} names no valid silo (it says {silo!r})") from None
    texts = []
    for (text,) in rows:
        if not isinstance(text, str):
            raise AuditError(f"{str(path)!r} holds a ledger entry that is not text", silo=silo)
        texts.append(text)
    return silo, texts  # type: ignore[return-value]


def _coordinator_silos(state_dir: Path, mirror_path: Path, ca_pem: bytes) -> list[_Silo]:
    try:
        mirror = LedgerMirror.open(mirror_path)
    except LedgerError as exc:
        raise AuditError(f"cannot open the ledger mirror: {exc}") from None
    mirrored: dict[str, tuple[LedgerEntry, ...]] = {}
    with mirror:
        for silo in mirror.silos():
            try:
                entries = mirror.entries(silo)
                _verify_chain(entries, ca_pem=ca_pem, silo=silo)
            except LedgerError as exc:
                raise AuditError(
                    f"silo {silo!r}'s mirrored ledger in {str(mirror_path)!r} fails "
                    f"verification, refusing to report on it: {exc}",
                    silo=silo,
                    seq=exc.seq,
                ) from None
            mirrored[silo] = tuple(entries)
    budgets: dict[str, BudgetStatement] = {}
    budgets_dir = state_dir / BUDGETS_DIR
    if budgets_dir.is_dir():
        for path in sorted(budgets_dir.glob("*.json")):
            try:
                name = validate_name(path.stem)
            except ValueError:
                raise AuditError(
                    f"{str(path)!r} is not named after a silo (<silo>.json); remove it or "
                    "rename it"
                ) from None
            statement = _checked_budget(path, name, ca_pem)
            if statement is not None:
                budgets[name] = statement
    return [
        _Silo(name=name, entries=mirrored.get(name, ()), budget=budgets.get(name))
        for name in sorted(set(mirrored) | set(budgets))
    ]


def _checked_budget(path: Path, silo: str, ca_pem: bytes) -> BudgetStatement | None:
    try:
        statement = load_budget(path)
        if statement is None:
            return None
        statement.verify(ca_pem=ca_pem)
    except BudgetError as exc:
        raise AuditError(
            f"silo {silo!r}'s budget statement {str(path)!r} fails verification: {exc}",
            silo=silo,
            field="budget",
        ) from None
    if statement.silo != silo:
        raise AuditError(
            f"the budget statement {str(path)!r} belongs to silo {statement.silo!r}, not to "
            f"silo {silo!r}",
            silo=silo,
            field="budget",
        )
    return statement


def _silo_section(silo: _Silo) -> dict[str, Any]:
    return {
        "silo": silo.name,
        "budget": None if silo.budget is None else silo.budget.to_dict(),
        "entries": [e.to_dict() for e in silo.entries],
        **derive_silo_summary(silo.entries, silo.budget),
    }


def _release_row(entry: LedgerEntry) -> dict[str, Any]:
    single = entry.guarantee(GuaranteeScope.SINGLE_UPLOAD)
    aggregate = entry.guarantee(GuaranteeScope.AGGREGATE)
    return {
        "seq": entry.seq,
        "run_id": entry.run_id,
        "round": entry.round,
        "upload_index": entry.upload_index,
        "mechanism": entry.mechanism.value,
        "neighbouring": entry.neighbouring.value,
        "noise_multiplier": entry.noise_multiplier,
        "single_upload_noise_multiplier": single.noise_multiplier,
        "sample_rate": entry.sample_rate,
        "steps": entry.steps,
        "clip_norm": entry.clip_norm,
        "delta": entry.delta,
        "epsilon_rdp": entry.epsilon_rdp,
        "rdp_order": entry.rdp_order,
        "epsilon_prv": entry.epsilon_prv,
        "epsilon_pld": entry.epsilon_pld,
        "single_upload_epsilon_rdp": single.epsilon_rdp,
        "cumulative_epsilon_aggregate": aggregate.cumulative_epsilon,
        "cumulative_epsilon_single_upload": single.cumulative_epsilon,
        "cumulative_epsilon_pld_aggregate": aggregate.cumulative_epsilon_pld,
        "cumulative_epsilon_pld_single_upload": single.cumulative_epsilon_pld,
        "guarantee_scope": entry.guarantee_scope.value,
        "accountant": entry.governing.value,
    }


def _accounting() -> dict[str, Any]:
    return json.loads(json.dumps(ACCOUNTING))


def _ca_identity(ca_pem: bytes | str, what: str) -> tuple[str, str]:
    """(PEM text, SHA-256 hex of the DER) of a CA certificate."""
    try:
        text = ca_pem if isinstance(ca_pem, str) else ca_pem.decode("ascii")
        cert = x509.load_pem_x509_certificate(text.encode("ascii"))
        der = cert.public_bytes(serialization.Encoding.DER)
    except (UnicodeError, ValueError, TypeError):
        raise AuditError(f"{what} is not a readable PEM certificate") from None
    return text, hashlib.sha256(der).hexdigest()


def write_report(report: Mapping[str, Any], out_dir: Path | str) -> tuple[Path, Path]:
    """Writes ``report.json`` and ``report.html`` into ``out_dir`` (created), atomically.

    ``report.json`` is ``json.dumps(report, sort_keys=True, indent=1, ensure_ascii=True)``
    plus a newline: `verify_report` refuses any other spelling. ``report.html`` is
    self-contained (inline CSS and SVG, no scripts): per silo a plot of cumulative ε, the
    budget, a table of releases, and the threat model, CA fingerprint and how to verify.

    Args:
        report: A report from `build_report`.
        out_dir: The output folder.

    Returns:
        The paths of ``report.json`` and ``report.html``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / REPORT_JSON
    html_path = out_dir / REPORT_HTML
    json_bytes = _serialise(report).encode("ascii")
    html_bytes = _render_html(report).encode("utf-8")
    atomic_write(json_path, json_bytes)
    atomic_write(html_path, html_bytes)
    return json_path, html_path
