"""Privacy audit reports: verified ledgers, budgets and ε of every silo, as JSON and HTML."""

from __future__ import annotations

import hashlib
import html
import json
import math
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedsilo.core.atomic import atomic_write
from fedsilo.privacy import accounting
from fedsilo.privacy.accounting import LEDGER_RDP_ORDERS, DpAccountingVerifier, Release
from fedsilo.privacy.budget import (
    BUDGET_FILE,
    BUDGETS_DIR,
    CA_FILE,
    LEDGER_FILE,
    MIRROR_FILE,
    BudgetError,
    BudgetStatement,
    load_budget,
)
from fedsilo.privacy.ledger import (
    GuaranteeScope,
    LedgerEntry,
    LedgerError,
    LedgerMirror,
    _check_created_at,
    _now_text,
    verify_chain,
)
from fedsilo.privacy.pki import validate_name

__all__ = [
    "ACCOUNTING",
    "REPORT_FORMAT",
    "REPORT_HTML",
    "REPORT_JSON",
    "THREAT_MODEL",
    "AuditError",
    "VerifyResult",
    "DISCLOSURES_FILE",
    "build_report",
    "resfim_disclosures",
    "write_disclosures",
    "derive_silo_summary",
    "report_summary",
    "verify_report",
    "write_report",
]

REPORT_FORMAT = "fedsilo-audit-report-v1"
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
"""The plain-words threat model every report carries (part of format v1)."""

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
#: Statements about releases the ledger does not account (e.g. ResFIM masks protected by
#: encryption only), written into a state directory by whoever makes them; every report built
#: from that directory carries them.
DISCLOSURES_FILE = "privacy_disclosures.json"
_DISCLOSURE_KEYS = frozenset({"topic", "statement"})
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
        max_epsilon_difference: The largest absolute difference between a stored ε and
            dp_accounting's recomputation (0.0 without entries).
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


# --- building -----------------------------------------------------------------------------


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
        "generated_at": _now_text(),
        "source": source,
        "ca_certificate": ca_text,
        "ca_sha256": ca_sha,
        "accounting": _accounting(),
        "threat_model": THREAT_MODEL,
        "silos": [_silo_section(s) for s in sorted(silos, key=lambda s: s.name)],
        "disclosures": _read_disclosures(state_dir),
    }


def resfim_disclosures(*, rho: float, recompute_every: int, beta: float, clusters: int,
                       plan: Any = None) -> list[dict[str, str]]:
    """What a pFL-ResFIM run shares, in words for the privacy officer.

    Args:
        rho, recompute_every, beta, clusters: the run's ResFIM settings.
        plan: The run's `PrivacyPlan` when its masks and style banks are differentially private
            (``plan.resfim_every > 0``): the statements then say how to find their ledger
            entries. None: they are protected by encryption only, and the statements say so.
    """
    if plan is not None and plan.resfim_every:
        c_f, c_s = float(plan.fisher_clip_norm), float(plan.style_clip_norm)
        return [
            {"topic": "ResFIM masks (differentially private, in the ledger)", "statement": (
                f"Each silo keeps local the top {rho:g} of every tensor by Residual Fisher Information, "
                f"recomputed every {recompute_every} round(s). The Fisher information is computed with DP: every "
                f"example's gradient is clipped to L2 norm {c_f:g}, and Gaussian noise of std "
                f"{plan.fisher_noise_multiplier:g} x {c_f:g}^2 is added to the sums of squared gradients, once on "
                "the silo's images and once on their re-styled twins. Each mask computation is one ledger entry: "
                f"mechanism gaussian, record-level, sigma = {plan.fisher_noise_multiplier:g}, q = 1, steps = 2, "
                f"C = {c_f ** 2:g}. The masks are post-processing of these releases. The coordinator sees "
                "only ciphertexts and never a mask; the other silos decrypt, per element, the total weight of "
                "the silos that share it.")},
            {"topic": "ResFIM style banks (differentially private, in the ledger)", "statement": (
                f"Once per run each silo shares a style bank: the low-frequency window (beta = {beta:g}) of the "
                "Fourier log-amplitude spectra of its training images, each clipped to L2 norm "
                f"{c_s:g}, summed in up to {clusters} bins chosen by a data-independent rule, with the counts, "
                f"in one Gaussian release: ledger entry gaussian, record-level, sigma = "
                f"{plan.style_noise_multiplier:g}, q = 1, steps = 1, C = {2 ** 0.5 * c_s:.6g} (sqrt(2) x "
                f"{c_s:g}). The bank is sealed (AES-256-GCM under a key derived from the run's shared secret "
                "key, which the coordinator does not hold), so only the other silos can read it.")},
            _CONSENSUS_DISCLOSURE,
        ]
    return [
        {"topic": "ResFIM masks (protected by encryption only)", "statement": (
            f"Each silo decides which parameter elements it keeps local: the top {rho:g} of every tensor by "
            "Residual Fisher Information, computed from its own training images and those images re-styled "
            f"toward the other silos' style banks, recomputed every {recompute_every} round(s). These masks are "
            "computed WITHOUT differential-privacy noise and have no ledger entry: they are protected by "
            "encryption only. The coordinator sees only ciphertexts of w*m*theta, w*m and w*(1-m)*theta "
            "(m = 1 where the element is shared) and never a mask. Every silo decrypts, per element, the sum "
            "of the weights of the silos that share it: with two silos each learns the other's mask, with "
            "more silos how many share each element.")},
        {"topic": "ResFIM style banks (not differentially private)", "statement": (
            f"Once per run each silo shares a style bank: up to {clusters} cluster means (k-means) of the "
            f"low-frequency window (beta = {beta:g}) of the Fourier log-amplitude spectra of its training "
            "images. No per-image spectra, no phases and no pixels leave the silo. The bank is sealed "
            "(AES-256-GCM under a key derived from the run's shared secret key, which the coordinator does not "
            "hold), so only the other silos can read it. It has no noise and no ledger entry: it reveals the "
            "average scanner appearance (brightness, contrast, blur) of groups of the silo's images, and a "
            "cluster of few images comes close to those images' own low-frequency amplitudes.")},
        _CONSENSUS_DISCLOSURE,
    ]


def fedrdn_disclosures(*, channels: int | None = None) -> list[dict[str, str]]:
    """What a FedRDN run shares besides its model updates, in words for the privacy officer.

    Args:
        channels: the images' channel count C, when known.
    """
    c = f"{channels}" if channels is not None else "C"
    return [{"topic": "FedRDN normalisation statistics (not differentially private)", "statement": (
        f"Once per run each silo shares 2 x {c} numbers: the mean and standard deviation, per image channel, of all "
        "pixels of its training images (FedRDN normalises each training image with a randomly drawn silo's "
        "statistics). They are computed without noise and have no ledger entry: they are a deterministic "
        "function of the training data and reveal the silo's average image brightness and contrast. They are "
        "sealed (AES-256-GCM under a key derived from the run's shared secret key, which the coordinator does "
        "not hold), so only the other silos can read them.")}]


_CONSENSUS_DISCLOSURE = {"topic": "ResFIM consensus model", "statement": (
    "For the consensus model (used on unseen domains) each silo also uploads, encrypted, its weighted "
    "values of the elements it keeps local; the silos decrypt only their sum over all silos. These "
    "values come from the same DP-SGD training as the shared ones (record-level runs), so they are "
    "covered by the ledger's record-level entries.")}


def write_disclosures(state_dir: Path | str, disclosures: Sequence[Mapping[str, str]]) -> Path:
    """Writes the disclosures of a run into a state directory (atomically); reports built there carry them."""
    items = [_checked_disclosure(d, f"disclosures[{i}]") for i, d in enumerate(disclosures)]
    path = Path(state_dir) / DISCLOSURES_FILE
    atomic_write(path, (json.dumps(items, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def _checked_disclosure(item: object, where: str) -> dict[str, str]:
    if not isinstance(item, Mapping) or set(item) != _DISCLOSURE_KEYS:
        raise AuditError(f"{where}: a disclosure is an object with exactly the fields topic and statement")
    if not all(isinstance(item[k], str) and item[k] for k in _DISCLOSURE_KEYS):
        raise AuditError(f"{where}: topic and statement must be non-empty text")
    return {"topic": item["topic"], "statement": item["statement"]}


def _read_disclosures(state_dir: Path) -> list[dict[str, str]]:
    path = state_dir / DISCLOSURES_FILE
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(data, list):
        raise AuditError(f"{str(path)!r} must hold a list of disclosures")
    return [_checked_disclosure(d, f"{path.name}[{i}]") for i, d in enumerate(data)]


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
        clip_norm, delta, epsilon_rdp, rdp_order, epsilon_prv, single_upload_epsilon_rdp,
        cumulative_epsilon_aggregate, cumulative_epsilon_single_upload, guarantee_scope);
        ``cumulative``: ``{relation: {"aggregate": ε, "single_upload": ε}}`` for the
        relations present; ``budget_left``: ``{relation: ε_max − single-upload ε}`` (None
        without a budget); ``within_budget``: ``{relation: bool}`` (None without a budget),
        true when the single-upload ε is at most ε_max and stated at a δ no larger than the
        budget's.
    """
    releases = [_release_row(e) for e in entries]
    last: dict[str, LedgerEntry] = {}
    for entry in entries:
        last[entry.neighbouring.value] = entry
    cumulative = {
        relation: {
            "aggregate": entry.guarantee(GuaranteeScope.AGGREGATE).cumulative_epsilon,
            "single_upload": entry.guarantee(GuaranteeScope.SINGLE_UPLOAD).cumulative_epsilon,
        }
        for relation, entry in sorted(last.items())
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
            relation: budget.epsilon - spent["single_upload"]
            for relation, spent in cumulative.items()
        },
        "within_budget": {
            relation: bool(
                spent["single_upload"] <= budget.epsilon and last[relation].delta <= budget.delta
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
            text = f"{relation}-level ε {spent['single_upload']:.4g}"
            if spent["aggregate"] != spent["single_upload"]:
                text += f" (aggregate {spent['aggregate']:.4g})"
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
        "single_upload_epsilon_rdp": single.epsilon_rdp,
        "cumulative_epsilon_aggregate": entry.guarantee(
            GuaranteeScope.AGGREGATE
        ).cumulative_epsilon,
        "cumulative_epsilon_single_upload": single.cumulative_epsilon,
        "guarantee_scope": entry.guarantee_scope.value,
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


# --- writing ------------------------------------------------------------------------------


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


def _serialise(report: object) -> str:
    return (
        json.dumps(report, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n"
    )


# --- verifying ----------------------------------------------------------------------------


def verify_report(
    path: Path | str, *, ca_pem: bytes | str | None = None, tolerance: float = 1e-3
) -> VerifyResult:
    """Verifies a ``report.json`` from the entries up, recomputing every ε independently.

    Checks, in order: the file is exactly the canonical text of its content; the format;
    the CA (against ``ca_pem`` when given); every silo's chain (hash links, certificates,
    signatures) and budget statement; every derived field (releases, cumulative,
    budget_left, within_budget) and the rest of the report against what `build_report`
    derives; and every ε, per release and cumulative for both scopes, recomputed with
    Google's dp_accounting (`DpAccountingVerifier` on ``LEDGER_RDP_ORDERS``), plus
    ``epsilon_prv`` never above ``epsilon_rdp``.

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
    largest = _check_epsilons(silos, where, float(tolerance))
    return VerifyResult(
        source=report["source"],
        silos=tuple(s.name for s in silos),
        entries=sum(len(s.entries) for s in silos),
        max_epsilon_difference=float(largest),
        ca_sha256=ca_sha,
        ca_from_report=ca_pem is None,
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
            f"{REPORT_FORMAT!r}",
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


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed in a report")


def _located(text: str, position: int, where: str, problem: str) -> AuditError:
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    silo, seq = _damaged_entry(text)
    inside = ""
    if seq is not None:
        inside = (
            f" inside silo {silo!r}'s ledger entry seq {seq}"
            if silo is not None
            else f" inside ledger entry seq {seq}"
        )
    return AuditError(
        f"{where}: the report{inside} {problem} (line {line}, column {column}); it was changed "
        "after it was written, do not trust it",
        silo=silo,
        seq=seq,
    )


_ENTRIES_OPEN = '   "entries": ['
_ENTRIES_CLOSE = ("   ]", "   ],")
_ENTRY_OPEN = "    {"
_ENTRY_CLOSE = ("    }", "    },")
_SILO_KEY = '   "silo": "'
_ENTRY_SILO_KEY = '     "silo": "'


def _damaged_entry(text: str) -> tuple[str | None, int | None]:
    """(silo, seq) of the first ledger entry whose text is not canonical, or (None, None).

    Works on damaged text: each entry spans the lines from ``    {`` to ``    }`` inside a
    silo's ``"entries": [`` block (the layout `write_report` gives); an entry whose braces
    do not pair up or whose text is not the canonical spelling of its content is damaged.
    Its seq is its position in the block, as `verify_chain` numbers entries.
    """
    lines = text.split("\n")
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    i = 0
    while i < len(lines):
        if lines[i] != _ENTRIES_OPEN:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j] in _ENTRIES_CLOSE), len(lines))
        spans: list[tuple[int | None, int | None]] = []
        opened: int | None = None
        for k in range(i + 1, end):
            if lines[k] == _ENTRY_OPEN:
                if opened is not None:
                    spans.append((opened, None))
                opened = k
            elif lines[k] in _ENTRY_CLOSE:
                spans.append((opened, k))
                opened = None
        if opened is not None:
            spans.append((opened, None))
        for index, (first, last) in enumerate(spans, start=1):
            damaged = first is None or last is None
            if not damaged:
                chunk = text[starts[first] + 4 : starts[last] + 5]  # type: ignore[index]
                damaged = not _canonical_entry_text(chunk)
            if damaged:
                return _block_silo(lines, i, end, spans, first, last), index
        i = end
    return None, None


def _canonical_entry_text(chunk: str) -> bool:
    try:
        value = json.loads(chunk, parse_constant=_refuse_constant)
        expected = json.dumps(value, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return False
    return isinstance(value, dict) and expected.replace("\n", "\n    ") == chunk


def _block_silo(
    lines: list[str],
    start: int,
    end: int,
    spans: list[tuple[int | None, int | None]],
    first: int | None,
    last: int | None,
) -> str | None:
    """The silo a damaged entries block belongs to: its own key, else an entry's."""
    for k in range(end + 1, len(lines)):
        if lines[k].startswith("  }") or lines[k] == _ENTRIES_OPEN:
            break
        name = _quoted_name(lines[k], _SILO_KEY)
        if name is not None:
            return name
    for k in range(start + 1, end):
        name = _quoted_name(lines[k], _ENTRY_SILO_KEY)
        if name is not None:
            return name
    return None


def _quoted_name(line: str, prefix: str) -> str | None:
    if not line.startswith(prefix):
        return None
    rest = line[len(prefix) :].rstrip(",")
    if not rest.endswith('"'):
        return None
    try:
        return validate_name(rest[:-1])
    except ValueError:
        return None


def _check_top(report: Mapping[str, Any], where: str) -> None:
    _keys(report, _TOP_KEYS | ({"disclosures"} & set(report)), "", where)  # reports before disclosures lack it
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
        _check_created_at(generated)
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


def _check_epsilons(silos: Sequence[_Silo], where: str, tolerance: float) -> float:
    verifier = DpAccountingVerifier(orders=LEDGER_RDP_ORDERS)
    cache: dict[tuple[Any, ...], float] = {}

    def epsilon(history: Sequence[tuple[LedgerEntry, GuaranteeScope]], delta: float) -> float:
        groups: dict[tuple[str, str, float, float], int] = {}
        for entry, scope in history:
            key = (
                entry.mechanism.value,
                entry.neighbouring.value,
                entry.guarantee(scope).noise_multiplier,
                entry.sample_rate,
            )
            groups[key] = groups.get(key, 0) + entry.steps
        cache_key = (delta, tuple(sorted(groups.items())))
        if cache_key not in cache:
            releases = [
                Release(
                    mechanism=accounting.Mechanism(mechanism),
                    neighbouring=accounting.Neighbouring(relation),
                    noise_multiplier=sigma,
                    sample_rate=q,
                    steps=steps,
                )
                for (mechanism, relation, sigma, q), steps in groups.items()
            ]
            cache[cache_key] = verifier.epsilon(releases, delta=delta).epsilon
        return cache[cache_key]

    largest = 0.0
    for silo in silos:
        history: dict[str, list[LedgerEntry]] = {}
        for entry in silo.entries:
            prefix = history.setdefault(entry.neighbouring.value, [])
            prefix.append(entry)
            scopes = [GuaranteeScope.AGGREGATE]
            if entry.single_upload is not None:
                scopes.append(GuaranteeScope.SINGLE_UPLOAD)
            for scope in scopes:
                stated = entry.guarantee(scope)
                what = f"{entry.neighbouring.value}-level, against {scope.value}"
                checks = (
                    ("ε of this release", stated.epsilon_rdp, [(entry, scope)]),
                    ("cumulative ε", stated.cumulative_epsilon, [(e, scope) for e in prefix]),
                )
                for label, stored, releases in checks:
                    fresh = epsilon(releases, entry.delta)
                    difference = abs(fresh - stored) if math.isfinite(fresh) else math.inf
                    if difference > tolerance:
                        raise AuditError(
                            f"{where}: silo {silo.name!r}: ledger entry seq {entry.seq}: stored "
                            f"{label} {stored!r} ({what}) differs from dp_accounting's "
                            f"{fresh!r} by {difference:.3g}, more than the tolerance "
                            f"{tolerance!r}",
                            silo=silo.name,
                            seq=entry.seq,
                        )
                    largest = max(largest, difference)
                if (
                    stated.epsilon_prv is not None
                    and stated.epsilon_prv > stated.epsilon_rdp + tolerance
                ):
                    raise AuditError(
                        f"{where}: silo {silo.name!r}: ledger entry seq {entry.seq}: its PRV ε "
                        f"{stated.epsilon_prv!r} ({what}) exceeds its RDP ε "
                        f"{stated.epsilon_rdp!r} by more than {tolerance!r}; PRV accounting is "
                        "tighter than RDP, so one of them is wrong",
                        silo=silo.name,
                        seq=entry.seq,
                    )
    return largest


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


# --- HTML ---------------------------------------------------------------------------------

_COLOURS = {"record": "#1f5fa8", "silo": "#b3541e"}
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:75em;
padding:0 1em;color:#1b1b1b;line-height:1.45}
h1,h2,h3{line-height:1.2}
table{border-collapse:collapse;margin:.8em 0;font-size:.85em}
th,td{border:1px solid #c8c8c8;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f0f0f0}
td.t,th.t{text-align:left}
.over{color:#a00000;font-weight:bold}
.ok{color:#006000}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;word-break:break-all}
section.silo{border-top:2px solid #888;margin-top:2em}
.scroll{overflow-x:auto}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: object, digits: int = 5) -> str:
    if value is None:
        return "&#8212;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _e(f"{value:.{digits}g}")
    return _e(value)


def _render_html(report: Mapping[str, Any]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>fedsilo privacy audit report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>fedsilo privacy audit report</h1>",
        "<table>",
        f'<tr><th class="t">Generated</th><td class="t">{_e(report["generated_at"])}</td></tr>',
        f'<tr><th class="t">Source</th><td class="t">{_e(_source_text(report["source"]))}'
        "</td></tr>",
        f'<tr><th class="t">Silos</th><td class="t">'
        f'{_e(", ".join(s["silo"] for s in report["silos"]) or "none")}</td></tr>',
        f'<tr><th class="t">Federation CA SHA-256</th><td class="t mono">'
        f'{_e(report["ca_sha256"])}</td></tr>',
        f'<tr><th class="t">Report format</th><td class="t">{_e(report["format"])}</td></tr>',
        "</table>",
        "<h2>How to verify this report</h2>",
        "<p>The numbers below come from each silo's signed, hash-chained privacy ledger. To check "
        "that nothing was changed and that every &#949; is computed correctly, run (with the "
        "federation CA certificate obtained from the operator):</p>",
        "<pre><code>fedsilo audit verify report.json --ca federation_ca.pem</code></pre>",
        "<p>It checks every signature and hash link, every budget statement, and recomputes every "
        "&#949; with Google's dp_accounting library (independent of the code that wrote the "
        "ledger). Without <code>--ca</code> it trusts the CA inside the report: then compare the "
        "SHA-256 it prints with the one above and with the federation CA's fingerprint you "
        "received from the operator.</p>",
    ]
    for section in report["silos"]:
        parts.append(_silo_html(section))
    if report.get("disclosures"):
        parts.append("<h2>Disclosures not covered by the ledger</h2>")
        for item in report["disclosures"]:
            parts.append(f"<h3>{_e(item['topic'])}</h3><p>{_e(item['statement'])}</p>")
    parts.append("<h2>Threat model</h2>")
    for paragraph in str(report["threat_model"]).split("\n\n"):
        parts.append(f"<p>{_e(paragraph)}</p>")
    accounting_desc = report["accounting"]
    parts.append("<h2>Accounting</h2><table>")
    for key in sorted(accounting_desc):
        value = accounting_desc[key]
        if isinstance(value, list):
            value = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        parts.append(f'<tr><th class="t">{_e(key)}</th><td class="t">{_e(value)}</td></tr>')
    parts.append("</table>")
    parts.append("<h2>Federation CA certificate</h2>")
    parts.append(f'<pre class="mono">{_e(report["ca_certificate"])}</pre>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _source_text(source: str) -> str:
    if source == "silo":
        return "a silo's own ledger (agent state directory)"
    if source == "coordinator":
        return "the coordinator's verified mirror of every silo's ledger"
    return source


def _silo_html(section: Mapping[str, Any]) -> str:
    name = section["silo"]
    budget = section["budget"]
    parts = [f'<section class="silo"><h2>Silo {_e(name)}</h2>']
    if budget is None:
        parts.append("<p>No signed budget statement.</p>")
    else:
        parts.append(
            f"<p>Budget signed by silo {_e(budget['silo'])} at {_e(budget['created_at'])}: "
            f"&#949;<sub>max</sub> = {_num(float(budget['epsilon']))} at "
            f"&#948; = {_num(float(budget['delta']))}, for each neighbouring relation "
            "separately, against anyone who sees this silo's uploads.</p>"
        )
    cumulative = section["cumulative"]
    if cumulative:
        parts.append(
            '<table><tr><th class="t">Relation</th><th>Cumulative &#949; (single upload)</th>'
            "<th>Cumulative &#949; (aggregate)</th><th>Budget &#949;<sub>max</sub></th>"
            "<th>Budget left</th><th>Within budget</th></tr>"
        )
        for relation, spent in cumulative.items():
            left = None if section["budget_left"] is None else section["budget_left"][relation]
            within = (
                None if section["within_budget"] is None else section["within_budget"][relation]
            )
            css = "" if within is None else (' class="ok"' if within else ' class="over"')
            parts.append(
                f'<tr><td class="t">{_e(relation)}-level</td>'
                f"<td>{_num(spent['single_upload'])}</td><td>{_num(spent['aggregate'])}</td>"
                f"<td>{_num(None if budget is None else float(budget['epsilon']))}</td>"
                f"<td>{_num(left)}</td><td{css}>{_num(within)}</td></tr>"
            )
        parts.append("</table>")
    parts.append(_svg_plot(section))
    parts.append(_releases_table(section["releases"]))
    parts.append("</section>")
    return "\n".join(parts)


_RELEASE_COLUMNS = (
    ("seq", "Seq", False),
    ("run_id", "Run", True),
    ("round", "Round", False),
    ("upload_index", "Upload", False),
    ("neighbouring", "Relation", True),
    ("mechanism", "Mechanism", True),
    ("guarantee_scope", "Noise added for", True),
    ("noise_multiplier", "&#963; (aggregate)", False),
    ("single_upload_noise_multiplier", "&#963; (single upload)", False),
    ("sample_rate", "q", False),
    ("steps", "Steps", False),
    ("clip_norm", "Clip C", False),
    ("delta", "&#948;", False),
    ("epsilon_rdp", "&#949; release (RDP)", False),
    ("rdp_order", "Order &#945;", False),
    ("epsilon_prv", "&#949; release (PRV)", False),
    ("single_upload_epsilon_rdp", "&#949; release, single upload", False),
    ("cumulative_epsilon_single_upload", "Cumulative &#949; (single upload)", False),
    ("cumulative_epsilon_aggregate", "Cumulative &#949; (aggregate)", False),
)


def _releases_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "<p>No releases recorded.</p>"
    head = "".join(
        (f'<th class="t">{label}</th>' if text else f"<th>{label}</th>")
        for _, label, text in _RELEASE_COLUMNS
    )
    body = []
    for row in rows:
        cells = []
        for key, _, text in _RELEASE_COLUMNS:
            value = row[key]
            if key == "guarantee_scope":
                value = "aggregate (distributed)" if value == "aggregate" else "single upload"
            cells.append(f'<td class="t">{_e(value)}</td>' if text else f"<td>{_num(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        "<h3>Releases</h3><p>Each row is one ledger entry: one DP release, counted from the "
        'moment it was written.</p><div class="scroll"><table><tr>'
        + head
        + "</tr>"
        + "".join(body)
        + "</table></div>"
    )


def _svg_plot(section: Mapping[str, Any]) -> str:
    rows = section["releases"]
    if not rows:
        return ""
    # x = round, runs laid end to end in ledger order so that a new run continues the axis.
    runs: list[str] = []
    low: dict[str, int] = {}
    high: dict[str, int] = {}
    for row in rows:
        run, rnd = row["run_id"], row["round"]
        if run not in low:
            runs.append(run)
            low[run], high[run] = rnd, rnd
        low[run], high[run] = min(low[run], rnd), max(high[run], rnd)
    offset: dict[str, int] = {}
    position = 0
    for run in runs:
        offset[run] = position - low[run]
        position += high[run] - low[run] + 1
    series: list[tuple[str, str, bool, list[tuple[float, float]]]] = []
    for relation in sorted({r["neighbouring"] for r in rows}):
        mine = [r for r in rows if r["neighbouring"] == relation]
        for scope, dotted in (("single_upload", False), ("aggregate", True)):
            key = f"cumulative_epsilon_{scope}"
            if dotted and all(r[key] == r["cumulative_epsilon_single_upload"] for r in mine):
                continue  # the same line twice
            points = [(offset[r["run_id"]] + r["round"], r[key]) for r in mine]
            series.append((relation, scope.replace("_", " "), dotted, points))
    budget = None if section["budget"] is None else float(section["budget"]["epsilon"])
    ys = [y for *_, points in series for _, y in points] + ([budget] if budget else [])
    y_step = _nice_step(max(ys) * 1.05 / 5) if max(ys) > 0 else 0.2
    y_max = y_step * max(1, math.ceil(max(ys) * 1.05 / y_step))
    x_min, x_max = -0.5, position - 0.5
    width, height, left, right, top, bottom = 760, 320, 64, 190, 20, 48
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x_min) / (x_max - x_min) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - y / y_max * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" font-size="11" '
        f'font-family="sans-serif"><title>Cumulative privacy loss of silo {_e(section["silo"])}'
        "</title>",
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#999"/>',
    ]
    for i in range(round(y_max / y_step) + 1):
        y = y_step * i
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
            'stroke="#e2e2e2"/>'
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{_e(f"{y:.3g}")}</text>'
        )
    step = max(1, math.ceil(position / 12))
    for run in runs:
        for rnd in range(low[run], high[run] + 1):
            x = offset[run] + rnd
            if x % step == 0:
                out.append(
                    f'<text x="{sx(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                    f"{_e(rnd)}</text>"
                )
        if len(runs) > 1:
            x0 = sx(offset[run] + low[run] - 0.5)
            out.append(
                f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{top}" y2="{top + plot_h}" '
                'stroke="#bbb" stroke-dasharray="2 3"/>'
                f'<text x="{x0 + 3:.1f}" y="{top + 12}" fill="#666">{_e(run[:24])}</text>'
            )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 10}" text-anchor="middle">round'
        f'{" (runs in ledger order)" if len(runs) > 1 else ""}</text>'
        f'<text x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">cumulative &#949;</text>'
    )
    legend_y = top + 8
    if budget is not None:
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(budget):.1f}" y2="{sy(budget):.1f}" '
            'stroke="#c00000" stroke-width="1.5" stroke-dasharray="8 5"/>'
        )
        out.append(_legend(left + plot_w + 12, legend_y, "#c00000", "8 5", f"budget {budget:.4g}"))
        legend_y += 18
    for relation, scope, dotted, points in series:
        colour = _COLOURS.get(relation, "#444")
        dash = ' stroke-dasharray="3 3"' if dotted else ""
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(
            f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'
        )
        for x, y in points:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>')
        out.append(
            _legend(left + plot_w + 12, legend_y, colour, "3 3" if dotted else None,
                    f"{relation}-level, {scope}")
        )
        legend_y += 18
    out.append("</svg>")
    return "<h3>Cumulative &#949; by round</h3>" + "".join(out)


def _nice_step(rough: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``rough`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(rough))
    for factor in (1.0, 2.0, 5.0, 10.0):
        if factor * power >= rough:
            return factor * power
    return 10.0 * power


def _legend(x: float, y: float, colour: str, dash: str | None, label: str) -> str:
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<line x1="{x:.1f}" x2="{x + 22:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{colour}" '
        f'stroke-width="2"{dash_attr}/><text x="{x + 28:.1f}" y="{y + 4:.1f}">{_e(label)}</text>'
    )
