"""Per-silo privacy ledger: signed, hash-chained DP releases in SQLite, and their mirror."""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import math
import numbers
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cryptography import x509

from fedsilo.privacy.accounting import Mechanism, Neighbouring  # one definition for accountant and ledger
from fedsilo.privacy.keywrap import (
    _CERT_PARSE_ERRORS,
    SIGNATURE_BYTES,
    KeyWrapError,
    _check_silo_certificate,
    _own_signer,
    _sign,
    _verify,
)
from fedsilo.privacy.pki import CertificateError, Role, identity_from_pem, validate_name

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
    "Neighbouring",
    "UploadGuarantee",
    "check_cumulative",
    "parse_json_object",
    "verify_chain",
]

ENTRY_FORMAT = "fedsilo-ledger-entry-v1"
GENESIS_HASH = "0" * 64

_MAX_RUN_ID_BYTES = 256
_MAX_CERT_CHARS = 16 * 1024
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_HEX_RE = re.compile(r"[0-9a-f]{%d}" % (2 * SIGNATURE_BYTES))
_CREATED_AT_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_CREATED_AT_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_BUSY_TIMEOUT_S = 30.0
_SCHEMA_VERSION = "1"


class LedgerError(Exception):
    """A ledger entry or chain failed verification, or a ledger cannot be used.

    Attributes:
        seq: The sequence number of the first bad entry (the number it should have at its
            position in the chain), or None when the error is not about one entry.
    """

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


class DuplicateEntryError(LedgerError):
    """The mirror already holds this exact entry: a resend, safe to treat as delivered."""


class GuaranteeScope(enum.Enum):
    """Who a guarantee holds against.

    ``SINGLE_UPLOAD``: anyone who sees this silo's upload (and so, by post-processing, the
    aggregate too). ``AGGREGATE``: only someone who sees the securely aggregated sum, when
    each silo adds just its share of the noise (std σC/√K).
    """

    AGGREGATE = "aggregate"
    SINGLE_UPLOAD = "single_upload"


class EntryStatus(enum.Enum):
    """Local (unsigned) state of a silo's entry; the spend counts in every state."""

    PENDING = "pending"
    RELEASED = "released"
    ABANDONED = "abandoned"


@dataclass(frozen=True, kw_only=True)
class UploadGuarantee:
    """The guarantee against anyone who sees this silo's upload alone.

    Required on a `LedgerEntry` whose noise is distributed (``guarantee_scope`` is
    ``AGGREGATE``): the upload then carries only this silo's noise share.

    Attributes:
        noise_multiplier: The noise multiplier of the upload alone (σ/√K for K silos).
        epsilon_rdp: ε of this release alone against this observer, by RDP.
        rdp_order: The RDP order that gave ``epsilon_rdp``.
        epsilon_prv: ε of this release alone by the PRV accountant, or None.
        cumulative_epsilon: ε of every release so far for this neighbouring relation,
            against anyone who sees this silo's uploads.
    """

    noise_multiplier: float
    epsilon_rdp: float
    rdp_order: float
    epsilon_prv: float | None = None
    cumulative_epsilon: float

    def __post_init__(self) -> None:
        _set(
            self,
            "noise_multiplier",
            _positive(self.noise_multiplier, "single_upload.noise_multiplier"),
        )
        _set(self, "epsilon_rdp", _non_negative(self.epsilon_rdp, "single_upload.epsilon_rdp"))
        _set(self, "rdp_order", _rdp_order(self.rdp_order, "single_upload.rdp_order"))
        _set(self, "epsilon_prv", _optional_epsilon(self.epsilon_prv, "single_upload.epsilon_prv"))
        _set(
            self,
            "cumulative_epsilon",
            _non_negative(self.cumulative_epsilon, "single_upload.cumulative_epsilon"),
        )

    def _to_dict(self) -> dict[str, Any]:
        return {
            "noise_multiplier": _float_text(self.noise_multiplier),
            "epsilon_rdp": _float_text(self.epsilon_rdp),
            "rdp_order": _float_text(self.rdp_order),
            "epsilon_prv": None if self.epsilon_prv is None else _float_text(self.epsilon_prv),
            "cumulative_epsilon": _float_text(self.cumulative_epsilon),
        }

    @classmethod
    def _from_dict(cls, data: object) -> UploadGuarantee:
        if not isinstance(data, Mapping):
            raise ValueError(f"field single_upload must be an object or null, not {data!r}")
        _exact_keys(data, {f.name for f in fields(cls)}, "single_upload")
        return cls(
            noise_multiplier=_parse_float(
                data["noise_multiplier"], "single_upload.noise_multiplier"
            ),
            epsilon_rdp=_parse_float(data["epsilon_rdp"], "single_upload.epsilon_rdp"),
            rdp_order=_parse_float(data["rdp_order"], "single_upload.rdp_order"),
            epsilon_prv=_parse_optional_float(data["epsilon_prv"], "single_upload.epsilon_prv"),
            cumulative_epsilon=_parse_float(
                data["cumulative_epsilon"], "single_upload.cumulative_epsilon"
            ),
        )


@dataclass(frozen=True, kw_only=True)
class LedgerEntry:
    """One DP release by one silo: its mechanism, the ε it cost, and its place in the chain.

    The per-release guarantee fields (``noise_multiplier``, ``epsilon_rdp``, ``rdp_order``,
    ``epsilon_prv``, ``cumulative_epsilon``) hold against the observer ``guarantee_scope``
    names. With noise added wholly by this silo (``SINGLE_UPLOAD``) they hold against
    anyone who sees the upload, hence also the aggregate. With distributed noise
    (``AGGREGATE``) they hold only against someone who sees the aggregate, whose noise
    multiplier is σ, and ``single_upload`` states the weaker guarantee of one upload. Once
    a neighbouring relation has had a ``single_upload`` block, every later entry of that
    relation carries one too (for ``SINGLE_UPLOAD`` entries it repeats the per-release
    values), so both cumulative figures are always on the latest entry.

    Attributes:
        seq: Position in the silo's chain, from 1.
        silo: The silo's name; its certificate's CN.
        run_id: The run the release belongs to.
        round: The round number.
        upload_index: Which upload of the round (DEeR uploads twice per round), from 0.
        mechanism: The DP mechanism released.
        neighbouring: The neighbouring relation the ε values are for.
        noise_multiplier: σ (noise std divided by the sensitivity ``clip_norm``).
        sample_rate: Poisson sampling rate q; 1.0 for a plain Gaussian release.
        steps: How many times the mechanism ran in this release (DP-SGD steps, or 1).
        clip_norm: The clipping norm C (the sensitivity).
        delta: The δ the ε values are stated at.
        epsilon_rdp: ε of this release alone, by RDP at its best order.
        rdp_order: The RDP order that gave ``epsilon_rdp``.
        epsilon_prv: ε of this release alone by the PRV accountant, or None.
        cumulative_epsilon: ε of all this silo's releases so far for ``neighbouring`` (all
            runs), from the accountant; never summed across relations.
        guarantee_scope: Who the per-release fields hold against (see above).
        single_upload: The guarantee against one upload, when noise is distributed.
        created_at: When the entry was made, UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``.
        prev_hash: SHA-256 hex of the previous entry's `canonical_bytes` (64 zeros for
            the first entry).
        certificate: The silo's federation certificate (PEM) whose key signed the entry.
        signature: Raw 64-byte ECDSA P-256/SHA-256 ``r || s`` (or Ed25519) signature over
            `canonical_bytes`.
    """

    seq: int
    silo: str
    run_id: str
    round: int
    upload_index: int
    mechanism: Mechanism
    neighbouring: Neighbouring
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    epsilon_rdp: float
    rdp_order: float
    epsilon_prv: float | None
    cumulative_epsilon: float
    guarantee_scope: GuaranteeScope
    single_upload: UploadGuarantee | None
    created_at: str
    prev_hash: str
    certificate: str = field(repr=False)
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _set(self, "seq", _integer(self.seq, "seq", minimum=1))
        try:
            validate_name(self.silo)
        except ValueError as exc:
            raise ValueError(f"invalid field silo: {exc}") from None
        _check_run_id(self.run_id)
        _set(self, "round", _integer(self.round, "round", minimum=0))
        _set(self, "upload_index", _integer(self.upload_index, "upload_index", minimum=0))
        _set(self, "mechanism", _enum(self.mechanism, Mechanism, "mechanism"))
        _set(self, "neighbouring", _enum(self.neighbouring, Neighbouring, "neighbouring"))
        _set(self, "noise_multiplier", _positive(self.noise_multiplier, "noise_multiplier"))
        _set(self, "sample_rate", _real(self.sample_rate, "sample_rate"))
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"invalid field sample_rate {self.sample_rate!r}: must be in (0, 1]")
        if self.mechanism is Mechanism.GAUSSIAN and self.sample_rate != 1.0:
            raise ValueError(
                f"invalid field sample_rate {self.sample_rate!r}: a plain gaussian release "
                "has no subsampling, so sample_rate must be 1.0 (use mechanism "
                "subsampled_gaussian for Poisson-subsampled releases)"
            )
        _set(self, "steps", _integer(self.steps, "steps", minimum=1))
        _set(self, "clip_norm", _positive(self.clip_norm, "clip_norm"))
        _set(self, "delta", _real(self.delta, "delta"))
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"invalid field delta {self.delta!r}: must be in (0, 1)")
        _set(self, "epsilon_rdp", _non_negative(self.epsilon_rdp, "epsilon_rdp"))
        _set(self, "rdp_order", _rdp_order(self.rdp_order, "rdp_order"))
        _set(self, "epsilon_prv", _optional_epsilon(self.epsilon_prv, "epsilon_prv"))
        _set(
            self, "cumulative_epsilon", _non_negative(self.cumulative_epsilon, "cumulative_epsilon")
        )
        _set(
            self, "guarantee_scope", _enum(self.guarantee_scope, GuaranteeScope, "guarantee_scope")
        )
        self._check_single_upload()
        _check_created_at(self.created_at)
        if not isinstance(self.prev_hash, str) or _HASH_RE.fullmatch(self.prev_hash) is None:
            raise ValueError(
                f"invalid field prev_hash {self.prev_hash!r}: expected 64 lowercase hex digits"
            )
        if (
            not isinstance(self.certificate, str)
            or not 0 < len(self.certificate) <= _MAX_CERT_CHARS
            or not self.certificate.startswith("-----BEGIN CERTIFICATE-----")
            or not self.certificate.isascii()
        ):
            raise ValueError(
                "invalid field certificate: expected the silo's PEM certificate as ASCII text "
                f"of at most {_MAX_CERT_CHARS} characters"
            )
        if isinstance(self.signature, (bytearray, memoryview)):
            _set(self, "signature", bytes(self.signature))
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            shown = len(self.signature) if isinstance(self.signature, bytes) else self.signature
            raise ValueError(
                f"invalid field signature {shown!r}: expected {SIGNATURE_BYTES} bytes"
            )

    def _check_single_upload(self) -> None:
        upload = self.single_upload
        if upload is not None and not isinstance(upload, UploadGuarantee):
            raise ValueError(
                f"invalid field single_upload {upload!r}: expected an UploadGuarantee or None"
            )
        if self.guarantee_scope is GuaranteeScope.AGGREGATE:
            if upload is None:
                raise ValueError(
                    "invalid field single_upload None: guarantee_scope is aggregate "
                    "(distributed noise), so the weaker guarantee against one silo's upload "
                    "must be stated too"
                )
            if upload.noise_multiplier > self.noise_multiplier:
                raise ValueError(
                    f"invalid field single_upload.noise_multiplier {upload.noise_multiplier!r}: "
                    "one silo's share cannot carry more noise than the aggregate "
                    f"(noise_multiplier {self.noise_multiplier!r}); were they swapped?"
                )
        elif upload is not None:
            for name in ("noise_multiplier", "epsilon_rdp", "rdp_order", "epsilon_prv"):
                if getattr(upload, name) != getattr(self, name):
                    raise ValueError(
                        f"invalid field single_upload.{name} {getattr(upload, name)!r}: "
                        "guarantee_scope is single_upload (noise added wholly by this silo), so "
                        f"it must equal {name} {getattr(self, name)!r}"
                    )

    def guarantee(self, scope: GuaranteeScope) -> UploadGuarantee:
        """This release's guarantee against one observer.

        Args:
            scope: ``AGGREGATE`` for someone who sees only the aggregate; ``SINGLE_UPLOAD``
                for someone who sees this silo's upload.

        Returns:
            The noise multiplier, per-release ε values and cumulative ε for that observer.

        Raises:
            ValueError: If ``scope`` is not a `GuaranteeScope`.
        """
        scope = _enum(scope, GuaranteeScope, "scope")
        if scope is GuaranteeScope.SINGLE_UPLOAD and self.single_upload is not None:
            return self.single_upload
        return UploadGuarantee(
            noise_multiplier=self.noise_multiplier,
            epsilon_rdp=self.epsilon_rdp,
            rdp_order=self.rdp_order,
            epsilon_prv=self.epsilon_prv,
            cumulative_epsilon=self.cumulative_epsilon,
        )

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready values, e.g. to embed in an audit report.

        Floats are the strings `repr` gives (exact, one spelling per value), enums their
        values, the signature lowercase hex; ``format`` names the encoding version.

        Returns:
            A new dict; `from_json` accepts it back.
        """
        data = self._unsigned_dict()
        data["signature"] = self.signature.hex()
        return data

    def canonical_bytes(self) -> bytes:
        """The bytes the silo signs and the next entry's ``prev_hash`` hashes.

        Returns:
            `to_dict` without ``signature``, as JSON with sorted keys, no whitespace and
            ASCII escapes, UTF-8 encoded.
        """
        return _dumps(self._unsigned_dict()).encode("ascii")

    def entry_hash(self) -> str:
        """SHA-256 of `canonical_bytes`, the next entry's ``prev_hash``.

        Returns:
            64 lowercase hex digits.
        """
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def to_json(self) -> str:
        """The entry as canonical JSON text (what the agent sends to the coordinator).

        Returns:
            `to_dict` as JSON with sorted keys, no whitespace and ASCII escapes.
        """
        return _dumps(self.to_dict())

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> LedgerEntry:
        """Parses `to_json` text or a `to_dict` mapping. Does not verify the signature.

        Text must be exactly what `to_json` writes: any other spelling of the same values
        (whitespace, escapes, hex case) is refused, so a changed byte never goes unnoticed.

        Args:
            data: JSON text (str or UTF-8 bytes), or an already-parsed mapping.

        Returns:
            The entry.

        Raises:
            LedgerError: If the data is not a well-formed, canonical ledger entry; the
                message names the field.
        """
        try:
            parsed, text = parse_json_object(data, what="ledger entry")
        except ValueError as exc:
            raise LedgerError(str(exc)) from None
        try:
            entry = cls._from_mapping(parsed)
        except ValueError as exc:
            raise LedgerError(f"malformed ledger entry: {exc}") from None
        if text is not None and entry.to_json() != text:
            raise LedgerError(
                f"ledger entry seq {entry.seq} is not in canonical form (the text differs from "
                "what the silo wrote: changed bytes, whitespace, escapes or letter case)",
                seq=entry.seq,
            )
        return entry

    @classmethod
    def _from_mapping(cls, data: Mapping[str, Any]) -> LedgerEntry:
        names = [f.name for f in fields(cls)]
        _exact_keys(data, {"format", *names}, "ledger entry")
        if data["format"] != ENTRY_FORMAT:
            raise ValueError(
                f"field format is {data['format']!r}, this fedsilo reads {ENTRY_FORMAT!r}"
            )
        signature = data["signature"]
        if not isinstance(signature, str) or _SIGNATURE_HEX_RE.fullmatch(signature) is None:
            raise ValueError(
                f"invalid field signature {signature!r}: expected {2 * SIGNATURE_BYTES} "
                "lowercase hex digits"
            )
        single = data["single_upload"]
        return cls(
            seq=_parse_int(data["seq"], "seq"),
            silo=_parse_str(data["silo"], "silo"),
            run_id=_parse_str(data["run_id"], "run_id"),
            round=_parse_int(data["round"], "round"),
            upload_index=_parse_int(data["upload_index"], "upload_index"),
            mechanism=_parse_enum(data["mechanism"], Mechanism, "mechanism"),
            neighbouring=_parse_enum(data["neighbouring"], Neighbouring, "neighbouring"),
            noise_multiplier=_parse_float(data["noise_multiplier"], "noise_multiplier"),
            sample_rate=_parse_float(data["sample_rate"], "sample_rate"),
            steps=_parse_int(data["steps"], "steps"),
            clip_norm=_parse_float(data["clip_norm"], "clip_norm"),
            delta=_parse_float(data["delta"], "delta"),
            epsilon_rdp=_parse_float(data["epsilon_rdp"], "epsilon_rdp"),
            rdp_order=_parse_float(data["rdp_order"], "rdp_order"),
            epsilon_prv=_parse_optional_float(data["epsilon_prv"], "epsilon_prv"),
            cumulative_epsilon=_parse_float(data["cumulative_epsilon"], "cumulative_epsilon"),
            guarantee_scope=_parse_enum(data["guarantee_scope"], GuaranteeScope, "guarantee_scope"),
            single_upload=None if single is None else UploadGuarantee._from_dict(single),
            created_at=_parse_str(data["created_at"], "created_at"),
            prev_hash=_parse_str(data["prev_hash"], "prev_hash"),
            certificate=_parse_str(data["certificate"], "certificate"),
            signature=bytes.fromhex(signature),
        )

    def _unsigned_dict(self) -> dict[str, Any]:
        return {
            "format": ENTRY_FORMAT,
            "seq": self.seq,
            "silo": self.silo,
            "run_id": self.run_id,
            "round": self.round,
            "upload_index": self.upload_index,
            "mechanism": self.mechanism.value,
            "neighbouring": self.neighbouring.value,
            "noise_multiplier": _float_text(self.noise_multiplier),
            "sample_rate": _float_text(self.sample_rate),
            "steps": self.steps,
            "clip_norm": _float_text(self.clip_norm),
            "delta": _float_text(self.delta),
            "epsilon_rdp": _float_text(self.epsilon_rdp),
            "rdp_order": _float_text(self.rdp_order),
            "epsilon_prv": None if self.epsilon_prv is None else _float_text(self.epsilon_prv),
            "cumulative_epsilon": _float_text(self.cumulative_epsilon),
            "guarantee_scope": self.guarantee_scope.value,
            "single_upload": None if self.single_upload is None else self.single_upload._to_dict(),
            "created_at": self.created_at,
            "prev_hash": self.prev_hash,
            "certificate": self.certificate,
        }


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
    }
)
_CALLER_DEFAULTS: dict[str, Any] = {
    "epsilon_prv": None,
    "guarantee_scope": GuaranteeScope.SINGLE_UPLOAD,
    "single_upload": None,
}
_COMPUTED_FIELDS = frozenset({f.name for f in fields(LedgerEntry)}) - _CALLER_FIELDS


# --- verification -------------------------------------------------------------------


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
        if not _verify(public_key, entry.signature, entry.canonical_bytes()):
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
        when = _parse_created_at(entry.created_at)
        cached = self._certs.get(entry.certificate)
        if cached is not None and cached[1] <= when <= cached[2]:
            return cached[0]
        whose = f"the certificate in ledger entry seq {entry.seq}"
        cert_pem = entry.certificate.encode("ascii")
        try:
            identity = identity_from_pem(cert_pem)
        except (CertificateError, *_CERT_PARSE_ERRORS):  # a damaged certificate may raise late
            identity = None  # _check_silo_certificate below says what is wrong with it
        if identity is not None and identity.role is not Role.SILO:
            raise LedgerError(
                f"ledger entry seq {entry.seq}: {whose} belongs to the {identity.role.value} "
                f"{identity.name!r}, not to a silo; only a silo signs its own ledger",
                seq=entry.seq,
            )
        try:
            public_key = _check_silo_certificate(
                cert_pem,
                self._ca_pem,
                name=entry.silo,
                now=when,
                whose=whose,
                consequence="do not trust this entry",
            )
        except KeyWrapError as exc:
            raise LedgerError(f"ledger entry seq {entry.seq}: {exc}", seq=entry.seq) from None
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


# --- the silo's ledger ----------------------------------------------------------------

_LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    upload_index INTEGER NOT NULL,
    neighbouring TEXT NOT NULL,
    entry_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'released', 'abandoned'))
);
CREATE INDEX IF NOT EXISTS entries_by_release
    ON entries (run_id, round, upload_index, neighbouring);
CREATE INDEX IF NOT EXISTS entries_by_relation ON entries (neighbouring, seq);
CREATE TRIGGER IF NOT EXISTS entries_append_only_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_append_only_update
BEFORE UPDATE OF seq, run_id, round, upload_index, neighbouring, entry_json ON entries
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_status_once BEFORE UPDATE OF status ON entries
WHEN OLD.status != 'pending' OR NEW.status NOT IN ('released', 'abandoned')
BEGIN SELECT RAISE(ABORT, 'only a pending ledger entry may be committed or abandoned'); END;
"""


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
            signer = _own_signer(cert_bytes, key_bytes, name=silo, purpose="privacy ledger entries")
        except KeyWrapError as exc:
            raise LedgerError(str(exc)) from None
        path = Path(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        conn = _connect(path)
        try:
            with _transaction(conn):
                for statement in _statements(_LEDGER_SCHEMA):
                    conn.execute(statement)
                stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                if not stored:
                    conn.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [("schema", _SCHEMA_VERSION), ("kind", "silo-ledger"), ("silo", silo)],
                    )
                elif stored.get("kind") != "silo-ledger" or stored.get("silo") != silo:
                    raise LedgerError(
                        f"{str(path)!r} is not silo {silo!r}'s privacy ledger (it is "
                        f"{stored.get('kind')!r} of {stored.get('silo')!r}); check the state "
                        "directory"
                    )
                elif stored.get("schema") != _SCHEMA_VERSION:
                    raise LedgerError(
                        f"{str(path)!r} has ledger schema {stored.get('schema')!r}, this "
                        f"fedsilo reads {_SCHEMA_VERSION!r}"
                    )
        except BaseException:
            conn.close()
            raise
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
                (None), ``guarantee_scope`` (``SINGLE_UPLOAD``) and ``single_upload``
                (None). ``seq``, ``silo``, ``created_at``, ``prev_hash``, ``certificate``
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
            The latest entry's cumulative ε for that relation and scope; 0.0 if none.
        """
        relation = _enum(neighbouring, Neighbouring, "neighbouring")
        rows = self._query(
            "SELECT entry_json FROM entries WHERE neighbouring = ? ORDER BY seq DESC LIMIT 1",
            (relation.value,),
        )
        if not rows:
            return 0.0
        return self._load(rows[0][0]).guarantee(scope).cumulative_epsilon

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
                created_at=_now_text(),
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
            entry = replace(unsigned, signature=_sign(self._signer, unsigned.canonical_bytes()))
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


# --- the coordinator's mirror ---------------------------------------------------------

_MIRROR_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mirrored (
    silo TEXT NOT NULL,
    seq INTEGER NOT NULL,
    neighbouring TEXT NOT NULL,
    entry_json TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (silo, seq)
);
CREATE INDEX IF NOT EXISTS mirrored_by_relation ON mirrored (silo, neighbouring, seq);
CREATE TRIGGER IF NOT EXISTS mirrored_append_only_delete BEFORE DELETE ON mirrored
BEGIN SELECT RAISE(ABORT, 'the ledger mirror is append-only'); END;
CREATE TRIGGER IF NOT EXISTS mirrored_append_only_update BEFORE UPDATE ON mirrored
BEGIN SELECT RAISE(ABORT, 'the ledger mirror is append-only'); END;
"""


class LedgerMirror:
    """The coordinator's verified copy of every silo's ledger (SQLite, WAL). No keys.

    Attributes:
        path: The SQLite file.
    """

    def __init__(self, conn: sqlite3.Connection, *, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path | str) -> LedgerMirror:
        """Opens (or creates) the mirror.

        Args:
            path: The SQLite file, in the coordinator's state directory.

        Returns:
            The open mirror.

        Raises:
            LedgerError: If the file is not a ledger mirror or SQLite cannot use
                write-ahead logging there.
        """
        path = Path(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        conn = _connect(path)
        try:
            with _transaction(conn):
                for statement in _statements(_MIRROR_SCHEMA):
                    conn.execute(statement)
                stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                if not stored:
                    conn.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [("schema", _SCHEMA_VERSION), ("kind", "ledger-mirror")],
                    )
                elif stored.get("kind") != "ledger-mirror":
                    raise LedgerError(
                        f"{str(path)!r} is not a ledger mirror (it is {stored.get('kind')!r}); "
                        "check the coordinator's state directory"
                    )
        except BaseException:
            conn.close()
            raise
        return cls(conn, path=path)

    def close(self) -> None:
        """Closes the database."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> LedgerMirror:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def accept(
        self,
        entry_json: str | bytes,
        *,
        ca_pem: bytes | str,
        expected_silo: str | None = None,
    ) -> LedgerEntry:
        """Verifies one entry from a silo and stores it if it extends that silo's chain.

        The entry must be the silo's next one (seq 1 first), link to the previously
        mirrored entry's hash, carry a silo certificate from the CA for its silo, verify,
        and not lower a cumulative ε. On any failure nothing is stored.

        Args:
            entry_json: `LedgerEntry.to_json` text as the silo sent it.
            ca_pem: The federation CA certificate, PEM.
            expected_silo: The silo that sent it (its mTLS identity); the entry must be
                that silo's. None skips this check.

        Returns:
            The stored entry.

        Raises:
            DuplicateEntryError: If exactly this entry is already mirrored (a resend).
            LedgerError: If the entry does not verify, is another silo's, or does not
                extend the chain (a gap, a replay of a different entry, a fork).
        """
        try:
            entry = LedgerEntry.from_json(entry_json)
        except LedgerError as exc:
            raise LedgerError(f"refusing a ledger entry: {exc}", seq=exc.seq) from None
        if expected_silo is not None and entry.silo != expected_silo:
            raise LedgerError(
                f"refusing ledger entry seq {entry.seq} of silo {entry.silo!r}: it was sent by "
                f"silo {expected_silo!r}; a silo may only send its own ledger",
                seq=entry.seq,
            )
        with self._lock, _transaction(self._conn):
            last = self._last(entry.silo)
            last_seq = 0 if last is None else last.seq
            if entry.seq <= last_seq:
                stored = self._conn.execute(
                    "SELECT entry_json FROM mirrored WHERE silo = ? AND seq = ?",
                    (entry.silo, entry.seq),
                ).fetchone()
                if stored is not None and stored[0] == entry.to_json():
                    raise DuplicateEntryError(
                        f"ledger entry seq {entry.seq} of silo {entry.silo!r} is already "
                        "mirrored (identical resend; nothing to do)",
                        seq=entry.seq,
                    )
                raise LedgerError(
                    f"refusing ledger entry seq {entry.seq} of silo {entry.silo!r}: the mirror "
                    f"already holds a different entry seq {entry.seq} (a replay or a forked "
                    f"ledger); the next entry expected is seq {last_seq + 1}",
                    seq=entry.seq,
                )
            if entry.seq != last_seq + 1:
                raise LedgerError(
                    f"refusing ledger entry seq {entry.seq} of silo {entry.silo!r}: out of "
                    f"order, the mirror holds up to seq {last_seq}; send seq {last_seq + 1} "
                    "first",
                    seq=entry.seq,
                )
            verifier = _ChainVerifier(ca_pem, expected_silo=entry.silo)
            if last is not None:
                verifier.resume(last, self._last_by_relation(entry.silo))
            try:
                verifier.feed(entry)
            except LedgerError as exc:
                raise LedgerError(f"refusing a ledger entry: {exc}", seq=exc.seq) from None
            self._conn.execute(
                "INSERT INTO mirrored (silo, seq, neighbouring, entry_json, received_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (entry.silo, entry.seq, entry.neighbouring.value, entry.to_json(), _now_text()),
            )
        return entry

    def silos(self) -> list[str]:
        """The silos with mirrored entries, sorted."""
        return [r[0] for r in self._query("SELECT DISTINCT silo FROM mirrored ORDER BY silo")]

    def entries(self, silo: str) -> list[LedgerEntry]:
        """A silo's mirrored entries, oldest first.

        Args:
            silo: The silo's name.

        Returns:
            The entries (empty if none).
        """
        rows = self._query(
            "SELECT entry_json FROM mirrored WHERE silo = ? ORDER BY seq", (silo,)
        )
        return [LedgerEntry.from_json(r[0]) for r in rows]

    def last(self, silo: str) -> LedgerEntry | None:
        """A silo's newest mirrored entry, or None."""
        with self._lock:
            return self._last(silo)

    def cumulative(
        self,
        silo: str,
        neighbouring: Neighbouring,
        *,
        scope: GuaranteeScope = GuaranteeScope.SINGLE_UPLOAD,
    ) -> float:
        """A silo's mirrored cumulative ε for one relation; see `Ledger.cumulative`.

        Args:
            silo: The silo's name.
            neighbouring: Record-level or silo-level.
            scope: Against whom (default ``SINGLE_UPLOAD``, the conservative figure).

        Returns:
            The cumulative ε; 0.0 if the silo has no entries for that relation.
        """
        relation = _enum(neighbouring, Neighbouring, "neighbouring")
        with self._lock:
            entry = self._last_by_relation(silo).get(relation)
        return 0.0 if entry is None else entry.guarantee(scope).cumulative_epsilon

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _last(self, silo: str) -> LedgerEntry | None:
        row = self._conn.execute(
            "SELECT entry_json FROM mirrored WHERE silo = ? ORDER BY seq DESC LIMIT 1", (silo,)
        ).fetchone()
        return None if row is None else LedgerEntry.from_json(row[0])

    def _last_by_relation(self, silo: str) -> dict[Neighbouring, LedgerEntry]:
        result: dict[Neighbouring, LedgerEntry] = {}
        for relation in Neighbouring:
            row = self._conn.execute(
                "SELECT entry_json FROM mirrored WHERE silo = ? AND neighbouring = ? "
                "ORDER BY seq DESC LIMIT 1",
                (silo, relation.value),
            ).fetchone()
            if row is not None:
                result[relation] = LedgerEntry.from_json(row[0])
        return result


# --- helpers ---------------------------------------------------------------------------


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"invalid field {name} {value!r}: expected a number")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"invalid field {name} {value!r}: must be finite")
    return result


def _positive(value: object, name: str) -> float:
    result = _real(value, name)
    if result <= 0.0:
        raise ValueError(f"invalid field {name} {value!r}: must be > 0")
    return result


def _non_negative(value: object, name: str) -> float:
    result = _real(value, name)
    if result < 0.0:
        raise ValueError(f"invalid field {name} {value!r}: must be >= 0")
    return result + 0.0  # -0.0 -> 0.0: one spelling per value


def _optional_epsilon(value: object, name: str) -> float | None:
    return None if value is None else _non_negative(value, name)


def _rdp_order(value: object, name: str) -> float:
    result = _real(value, name)
    if result <= 1.0:
        raise ValueError(f"invalid field {name} {value!r}: an RDP order must be > 1")
    return result


def _integer(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"invalid field {name} {value!r}: expected an integer")
    result = int(value)
    if result < minimum:
        raise ValueError(f"invalid field {name} {value!r}: must be >= {minimum}")
    return result


def _enum(value: object, kind: type[enum.Enum], name: str) -> Any:
    if isinstance(value, kind):
        return value
    # The accountant's own enums (same values) are accepted; bare strings are not.
    if isinstance(value, enum.Enum):
        try:
            return kind(value.value)
        except ValueError:
            pass
    raise ValueError(
        f"invalid field {name} {value!r}: expected a {kind.__name__} "
        f"({', '.join(m.name for m in kind)})"
    )


def _check_run_id(run_id: object) -> None:
    if (
        not isinstance(run_id, str)
        or not run_id
        or not run_id.isprintable()
        or len(run_id.encode("utf-8")) > _MAX_RUN_ID_BYTES
    ):
        raise ValueError(
            f"invalid field run_id {run_id!r}: expected 1 to {_MAX_RUN_ID_BYTES} bytes of "
            "printable text"
        )


def _check_created_at(value: object) -> None:
    if not isinstance(value, str) or _CREATED_AT_RE.fullmatch(value) is None:
        raise ValueError(
            f"invalid field created_at {value!r}: expected UTC time as "
            "YYYY-MM-DDTHH:MM:SS.ffffffZ"
        )
    try:
        _parse_created_at(value)
    except ValueError:
        raise ValueError(f"invalid field created_at {value!r}: not a real date and time") from None


def _parse_created_at(value: str) -> dt.datetime:
    return dt.datetime.strptime(value, _CREATED_AT_FORMAT).replace(tzinfo=dt.timezone.utc)


def _now_text() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime(_CREATED_AT_FORMAT)


def _float_text(value: float) -> str:
    return repr(float(value))


def _parse_float(value: object, name: str) -> float:
    if not isinstance(value, str):
        raise ValueError(f"invalid field {name} {value!r}: expected a float written as a string")
    try:
        result = float(value)
    except ValueError:
        raise ValueError(f"invalid field {name} {value!r}: not a number") from None
    if not math.isfinite(result) or repr(result) != value:
        raise ValueError(
            f"invalid field {name} {value!r}: not the canonical spelling of a finite float "
            f"({repr(result)!r})"
        )
    return result


def _parse_optional_float(value: object, name: str) -> float | None:
    return None if value is None else _parse_float(value, name)


def _parse_int(value: object, name: str) -> int:
    if type(value) is not int:
        raise ValueError(f"invalid field {name} {value!r}: expected a JSON integer")
    return value


def _parse_str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"invalid field {name} {value!r}: expected a string")
    return value


def _parse_enum(value: object, kind: type[enum.Enum], name: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(
            f"invalid field {name} {value!r}: expected one of {[m.value for m in kind]}"
        ) from None


def _exact_keys(data: Mapping[str, Any], expected: set[str], what: str) -> None:
    keys = set(data)
    missing = sorted(expected - keys)
    if missing:
        raise ValueError(f"{what} lacks field {missing[0]}")
    extra = sorted(str(k) for k in keys - expected)
    if extra:
        raise ValueError(f"{what} has unknown field {extra[0]!r}")


def parse_json_object(data: str | bytes | Mapping[str, Any], *, what: str) -> tuple[Mapping[str, Any], str | None]:
    """Parses signed-record JSON strictly: UTF-8, no duplicate keys, no NaN/Infinity, an object.

    Args:
        data: JSON text (str or UTF-8 bytes), or an already-parsed mapping.
        what: What the record is, for messages (e.g. "ledger entry").

    Returns:
        The mapping, and the text it came from (None when ``data`` was a mapping), so the
        caller can insist that the text is exactly its canonical form.

    Raises:
        ValueError: Saying what is wrong with the data.
    """
    text: str | None = None
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not valid UTF-8 text") from None
    elif isinstance(data, str):
        text = data
    if text is not None:
        try:
            parsed = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"{what} is not valid JSON: {exc}") from None
    else:
        parsed = data
    if not isinstance(parsed, Mapping):
        raise ValueError(f"{what} must be a JSON object, not {type(parsed).__name__}")
    return parsed, text


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate field {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def _dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _pem_bytes(value: object, name: str) -> bytes:
    if isinstance(value, str):
        return value.encode("ascii")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise LedgerError(f"{name} must be PEM bytes or text, not {type(value).__name__}")


def _validity(cert_pem: bytes, ca_pem: bytes) -> tuple[dt.datetime, dt.datetime]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    return (
        max(cert.not_valid_before_utc, ca.not_valid_before_utc),
        min(cert.not_valid_after_utc, ca.not_valid_after_utc),
    )


def _statements(script: str) -> list[str]:
    """Splits a schema script into statements (trigger bodies keep their ``;``)."""
    statements: list[str] = []
    buffer = ""
    for line in script.strip().splitlines():
        buffer += line + "\n"
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise AssertionError(f"incomplete schema statement: {buffer!r}")
    return statements


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(
            str(path), timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open {str(path)!r}: {exc}") from None
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LedgerError(
                f"SQLite cannot use write-ahead logging for {str(path)!r} (journal mode "
                f"{mode!r}); put the state directory on a local disk"
            )
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise LedgerError(f"{str(path)!r} is not a usable SQLite database: {exc}") from None
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
