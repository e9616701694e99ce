"""Verifying a silo's ledger: hash links, signatures, certificates and cumulative ε in order."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cryptography import x509

from fedsilo.privacy.accounting import Neighbouring
from fedsilo.privacy.ledger.entries import GENESIS_HASH, GuaranteeScope, LedgerEntry, LedgerError
from fedsilo.privacy.signed import SignatureError, parse_created_at


class _ChainVerifier:
    """Checks entries one at a time, in order, against everything seen before them."""

    def __init__(self, ca_pem: bytes | str, *, expected_silo: str | None) -> None:
        self._ca_pem = ca_pem.encode("ascii") if isinstance(ca_pem, str) else bytes(ca_pem)
        self._silo = expected_silo
        self._next_seq = 1
        self._prev_hash = GENESIS_HASH
        self._last: dict[Neighbouring, LedgerEntry] = {}
        # certificate PEM -> (public key, earliest and latest time it and the CA are valid)
        self._certs: dict[str, tuple[object, dt.datetime, dt.datetime]] = {}

    def resume(
        self, last: LedgerEntry, last_by_relation: Mapping[Neighbouring, LedgerEntry]
    ) -> None:
        """Continues after ``last``, an entry already verified (e.g. in the mirror)."""
        self._silo = last.silo
        self._next_seq = last.seq + 1
        self._prev_hash = last.entry_hash()
        self._last = dict(last_by_relation)

    def feed(self, raw: LedgerEntry | str | bytes | Mapping[str, Any]) -> LedgerEntry:
        seq = self._next_seq
        if isinstance(raw, LedgerEntry):
            entry = raw
        else:
            try:
                entry = LedgerEntry.from_json(raw)
            except LedgerError as exc:
                raise LedgerError(f"ledger entry seq {seq}: {exc}", seq=seq) from None
        if entry.seq != seq:
            raise LedgerError(
                f"ledger entry seq {seq}: the entry at this position says seq {entry.seq}, "
                f"expected {seq}; an entry was removed, inserted, reordered or replayed, or "
                "its seq was changed",
                seq=seq,
            )
        if self._silo is not None and entry.silo != self._silo:
            raise LedgerError(
                f"ledger entry seq {seq}: belongs to silo {entry.silo!r}, but this is silo "
                f"{self._silo!r}'s ledger; an entry from another silo's ledger was inserted",
                seq=seq,
            )
        if entry.prev_hash != self._prev_hash:
            raise LedgerError(
                f"ledger entry seq {seq}: broken hash link (prev_hash {entry.prev_hash[:16]}... "
                f"but the previous entry hashes to {self._prev_hash[:16]}...); an earlier "
                "entry was changed, removed or reordered, or this one was",
                seq=seq,
            )
        public_key = self._certificate_key(entry)
        if not entry.signature_matches(public_key):
            raise LedgerError(
                f"ledger entry seq {seq}: the signature does not match silo {entry.silo!r}'s "
                "certificate, so a field was changed after the silo signed it (or another "
                "key signed it)",
                seq=seq,
            )
        try:
            _check_spend(entry, self._last.get(entry.neighbouring))
        except ValueError as exc:
            raise LedgerError(f"ledger entry seq {seq}: {exc}", seq=seq) from None
        self._silo = entry.silo
        self._next_seq = seq + 1
        self._prev_hash = entry.entry_hash()
        self._last[entry.neighbouring] = entry
        return entry

    def _certificate_key(self, entry: LedgerEntry) -> object:
        when = parse_created_at(entry.created_at)
        cached = self._certs.get(entry.certificate)
        if cached is not None and cached[1] <= when <= cached[2]:
            return cached[0]
        try:
            public_key = entry.certificate_key(
                self._ca_pem,
                whose=f"the certificate in ledger entry seq {entry.seq}",
                consequence="do not trust this entry",
                only="only a silo signs its own ledger",
            )
        except SignatureError as exc:
            raise LedgerError(f"ledger entry seq {entry.seq}: {exc}", seq=entry.seq) from None
        cert_pem = entry.certificate.encode("ascii")
        self._certs[entry.certificate] = (public_key, *_validity(cert_pem, self._ca_pem))
        return public_key


def verify_chain(
    entries: Iterable[LedgerEntry | str | bytes | Mapping[str, Any]],
    *,
    ca_pem: bytes | str,
    expected_silo: str | None = None,
) -> None:
    """Checks a silo's whole ledger, from seq 1, and names the first bad entry.

    For each entry in order: it parses (for JSON input: canonical text only); its seq is
    its position; it is the same silo's (and ``expected_silo``'s); its ``prev_hash`` is
    the previous entry's hash; its certificate was issued by the CA, is a silo
    certificate for the entry's silo and was valid at ``created_at``; the signature over
    its canonical bytes verifies; and its cumulative ε does not decrease for its
    neighbouring relation.

    Args:
        entries: The entries, oldest first: `LedgerEntry` objects, `LedgerEntry.to_json`
            text, or `LedgerEntry.to_dict` mappings (e.g. parsed from an audit report).
        ca_pem: The federation CA certificate, PEM.
        expected_silo: The silo whose ledger this must be; None accepts the silo of the
            first entry (and then only that silo).

    Raises:
        LedgerError: At the first bad entry; ``seq`` names it and the message says what
            is wrong.
    """
    verifier = _ChainVerifier(ca_pem, expected_silo=expected_silo)
    for raw in entries:
        verifier.feed(raw)


def check_cumulative(
    entries: Sequence[LedgerEntry],
    recompute: Callable[[Sequence[LedgerEntry], GuaranteeScope], float],
    *,
    tolerance: float = 1e-3,
) -> None:
    """Checks every stored cumulative ε against a fresh recomputation from the history.

    For each entry, ``recompute`` gets that entry's history (every entry of the same
    neighbouring relation up to and including it, oldest first) and a scope, and must
    return the cumulative ε for that observer; use `LedgerEntry.guarantee` for the
    per-release parameters of a scope. The single-upload figure is checked on entries
    that carry a ``single_upload`` block.

    Args:
        entries: A silo's entries, oldest first (e.g. `Ledger.entries`).
        recompute: The accountant's composition, e.g. RDP over the stored mechanisms.
        tolerance: Largest accepted absolute difference.

    Raises:
        LedgerError: Naming the first entry whose stored cumulative ε differs.
    """
    history: dict[Neighbouring, list[LedgerEntry]] = {}
    for entry in entries:
        prefix = history.setdefault(entry.neighbouring, [])
        prefix.append(entry)
        scopes = [GuaranteeScope.AGGREGATE]
        if entry.single_upload is not None:
            scopes.append(GuaranteeScope.SINGLE_UPLOAD)
        for scope in scopes:
            stored = entry.guarantee(scope).cumulative_epsilon
            fresh = float(recompute(tuple(prefix), scope))
            if not math.isfinite(fresh) or abs(fresh - stored) > tolerance:
                raise LedgerError(
                    f"ledger entry seq {entry.seq}: stored cumulative ε {stored!r} "
                    f"({entry.neighbouring.value}-level, against {scope.value}) differs from "
                    f"the recomputed {fresh!r} by more than {tolerance!r}",
                    seq=entry.seq,
                )


def _check_spend(entry: LedgerEntry, previous: LedgerEntry | None) -> None:
    """Checks ``entry`` against the previous entry of its neighbouring relation."""
    if previous is None:
        return
    relation = entry.neighbouring.value
    if entry.cumulative_epsilon < previous.cumulative_epsilon:
        raise ValueError(
            f"invalid field cumulative_epsilon {entry.cumulative_epsilon!r}: lower than the "
            f"{relation}-level cumulative ε {previous.cumulative_epsilon!r} of entry "
            f"{previous.seq}; cumulative ε never decreases"
        )
    _check_pld_spend(entry, previous, entry, previous, "")
    if previous.single_upload is None:
        return
    if entry.single_upload is None:
        raise ValueError(
            f"invalid field single_upload None: {relation}-level entry {previous.seq} states a "
            "single-upload guarantee, so every later entry of that relation must carry the "
            "single-upload cumulative ε too"
        )
    before = previous.single_upload.cumulative_epsilon
    if entry.single_upload.cumulative_epsilon < before:
        raise ValueError(
            "invalid field single_upload.cumulative_epsilon "
            f"{entry.single_upload.cumulative_epsilon!r}: lower than the {relation}-level "
            f"single-upload cumulative ε {before!r} of entry {previous.seq}; cumulative ε "
            "never decreases"
        )
    _check_pld_spend(entry, previous, entry.single_upload, previous.single_upload, "single_upload.")


_PLD_SLACK = 1e-9
"""How far a PLD cumulative ε may dip below the previous one: floating-point noise of the FFT
composition, never a real decrease (composition cannot lower a privacy loss)."""


def _check_pld_spend(entry: LedgerEntry, previous: LedgerEntry, now: Any, before: Any, prefix: str) -> None:
    """The PLD cumulative ε of ``now`` (an entry or its single-upload block) against ``before``'s,
    where both state one (the size guard may leave one out)."""
    if now.cumulative_epsilon_pld is None or before.cumulative_epsilon_pld is None:
        return
    if now.cumulative_epsilon_pld < before.cumulative_epsilon_pld - _PLD_SLACK:
        raise ValueError(
            f"invalid field {prefix}cumulative_epsilon_pld {now.cumulative_epsilon_pld!r}: lower than the "
            f"{entry.neighbouring.value}-level PLD cumulative ε {before.cumulative_epsilon_pld!r} of entry "
            f"{previous.seq}; cumulative ε never decreases"
        )


def _validity(cert_pem: bytes, ca_pem: bytes) -> tuple[dt.datetime, dt.datetime]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    return (
        max(cert.not_valid_before_utc, ca.not_valid_before_utc),
        min(cert.not_valid_after_utc, ca.not_valid_after_utc),
    )
