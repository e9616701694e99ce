"""Ledger entries: one signed DP release, its guarantee against each observer, and the ledger's errors."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from fedsilo.core.validators import is_hex64
from fedsilo.privacy.accounting import BudgetAccountant, Mechanism, Neighbouring  # one definition for accountant and ledger
from fedsilo.privacy.ledger.fields import (
    _check_run_id,
    _enum,
    _integer,
    _non_negative,
    _optional_epsilon,
    _positive,
    _rdp_order,
    _set,
)
from fedsilo.privacy.pki import validate_name
from fedsilo.privacy.signed import (
    check_created_at,
    delta_field,
    exact_keys,
    float_text,
    parse_enum,
    parse_float,
    parse_int,
    parse_optional_float,
    parse_str,
    real,
)
from fedsilo.privacy.signed.document import SignedDocument


ENTRY_FORMAT = "fedsilo-ledger-entry-v2"
"""Version 2 added ε by PLD beside ε by RDP (``epsilon_pld``, ``cumulative_epsilon_pld``, and the
same two in ``single_upload``) and the ``accountant`` that governed the silo's budget."""
ENTRY_FORMAT_V1 = "fedsilo-ledger-entry-v1"
"""Entries written before PLD: RDP only, and RDP governed. Still read and verified."""
GENESIS_HASH = "0" * 64

_V2_FIELDS = frozenset({"epsilon_pld", "cumulative_epsilon_pld", "accountant"})
_V2_GUARANTEE_FIELDS = frozenset({"epsilon_pld", "cumulative_epsilon_pld"})


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


class MirrorQuotaError(LedgerError):
    """The mirror refused an entry because it already keeps as many entries of that kind from the silo as it may."""


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
        cumulative_epsilon: ε by RDP of every release so far for this neighbouring relation,
            against anyone who sees this silo's uploads.
        epsilon_pld: ε of this release alone by PLD, or None (a version-1 entry, or beyond
            `PldAccountant`'s size guard).
        cumulative_epsilon_pld: ``cumulative_epsilon`` by PLD, or None (as ``epsilon_pld``).
    """

    noise_multiplier: float
    epsilon_rdp: float
    rdp_order: float
    epsilon_prv: float | None = None
    cumulative_epsilon: float
    epsilon_pld: float | None = None
    cumulative_epsilon_pld: float | None = None

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
        for name in _V2_GUARANTEE_FIELDS:
            _set(self, name, _optional_epsilon(getattr(self, name), f"single_upload.{name}"))

    def _to_dict(self, *, v2: bool = True) -> dict[str, Any]:
        out = {
            "noise_multiplier": float_text(self.noise_multiplier),
            "epsilon_rdp": float_text(self.epsilon_rdp),
            "rdp_order": float_text(self.rdp_order),
            "epsilon_prv": _optional_text(self.epsilon_prv),
            "cumulative_epsilon": float_text(self.cumulative_epsilon),
        }
        if v2:
            out["epsilon_pld"] = _optional_text(self.epsilon_pld)
            out["cumulative_epsilon_pld"] = _optional_text(self.cumulative_epsilon_pld)
        return out

    @classmethod
    def _from_dict(cls, data: object, *, v2: bool = True) -> UploadGuarantee:
        if not isinstance(data, Mapping):
            raise ValueError(f"field single_upload must be an object or null, not {data!r}")
        names = {f.name for f in fields(cls)}
        exact_keys(data, names if v2 else names - _V2_GUARANTEE_FIELDS, "single_upload")
        pld = {} if not v2 else {
            name: parse_optional_float(data[name], f"single_upload.{name}") for name in sorted(_V2_GUARANTEE_FIELDS)
        }
        return cls(
            **pld,
            noise_multiplier=parse_float(
                data["noise_multiplier"], "single_upload.noise_multiplier"
            ),
            epsilon_rdp=parse_float(data["epsilon_rdp"], "single_upload.epsilon_rdp"),
            rdp_order=parse_float(data["rdp_order"], "single_upload.rdp_order"),
            epsilon_prv=parse_optional_float(data["epsilon_prv"], "single_upload.epsilon_prv"),
            cumulative_epsilon=parse_float(
                data["cumulative_epsilon"], "single_upload.cumulative_epsilon"
            ),
        )


@dataclass(frozen=True, kw_only=True)
class LedgerEntry(SignedDocument):
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
        cumulative_epsilon: ε by RDP of all this silo's releases so far for ``neighbouring``
            (all runs); never summed across relations.
        epsilon_pld: ε of this release alone by PLD (`PldAccountant`), or None: a version-1
            entry, or a release beyond the PLD size guard (RDP then bounds it above 100).
        cumulative_epsilon_pld: ``cumulative_epsilon`` by PLD, or None (as ``epsilon_pld``).
        accountant: The accountant this silo's budget was enforced on when it wrote the entry
            (its ``[privacy] accountant``); None for a version-1 entry, where RDP governed.
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
    epsilon_pld: float | None = None
    cumulative_epsilon_pld: float | None = None
    accountant: BudgetAccountant | None = None
    created_at: str
    prev_hash: str
    certificate: str = field(repr=False)
    signature: bytes = field(repr=False)

    FORMAT: ClassVar[str] = ENTRY_FORMAT

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
        _set(self, "sample_rate", real(self.sample_rate, "sample_rate"))
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
        _set(self, "delta", delta_field(self.delta))
        _set(self, "epsilon_rdp", _non_negative(self.epsilon_rdp, "epsilon_rdp"))
        _set(self, "rdp_order", _rdp_order(self.rdp_order, "rdp_order"))
        _set(self, "epsilon_prv", _optional_epsilon(self.epsilon_prv, "epsilon_prv"))
        _set(
            self, "cumulative_epsilon", _non_negative(self.cumulative_epsilon, "cumulative_epsilon")
        )
        _set(
            self, "guarantee_scope", _enum(self.guarantee_scope, GuaranteeScope, "guarantee_scope")
        )
        _set(self, "epsilon_pld", _optional_epsilon(self.epsilon_pld, "epsilon_pld"))
        _set(
            self,
            "cumulative_epsilon_pld",
            _optional_epsilon(self.cumulative_epsilon_pld, "cumulative_epsilon_pld"),
        )
        if self.accountant is not None:
            _set(self, "accountant", _enum(self.accountant, BudgetAccountant, "accountant"))
        self._check_single_upload()
        self._check_version()
        check_created_at(self.created_at)
        if not is_hex64(self.prev_hash):
            raise ValueError(
                f"invalid field prev_hash {self.prev_hash!r}: expected 64 lowercase hex digits"
            )
        self._check_signed_fields()

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
            for name in ("noise_multiplier", "epsilon_rdp", "rdp_order", "epsilon_prv", "epsilon_pld"):
                if getattr(upload, name) != getattr(self, name):
                    raise ValueError(
                        f"invalid field single_upload.{name} {getattr(upload, name)!r}: "
                        "guarantee_scope is single_upload (noise added wholly by this silo), so "
                        f"it must equal {name} {getattr(self, name)!r}"
                    )

    def _check_version(self) -> None:
        """A version-1 entry (no ``accountant``) has no PLD figure anywhere."""
        if self.accountant is not None:
            return
        guarantees = [("", self)] + ([("single_upload.", self.single_upload)] if self.single_upload else [])
        for prefix, holder in guarantees:
            for name in ("epsilon_pld", "cumulative_epsilon_pld"):
                if getattr(holder, name) is not None:
                    raise ValueError(
                        f"invalid field {prefix}{name} {getattr(holder, name)!r}: an entry without an "
                        "accountant is a version-1 (RDP-only) entry; state the accountant that governed"
                    )

    @property
    def governing(self) -> BudgetAccountant:
        """The accountant this silo's budget was enforced on at this entry (RDP for version 1)."""
        return BudgetAccountant.RDP if self.accountant is None else self.accountant

    def budget_epsilon(self, scope: GuaranteeScope = GuaranteeScope.SINGLE_UPLOAD) -> float:
        """The cumulative ε the silo's budget was checked against: by the governing accountant.

        Under PLD this is ``cumulative_epsilon_pld``, or, where the PLD size guard left it
        out, the RDP figure (also a valid bound, and the larger); under RDP (and in version-1
        entries) ``cumulative_epsilon``.

        Args:
            scope: Against whom (default ``SINGLE_UPLOAD``, what budgets bound).

        Returns:
            The cumulative ε.
        """
        guarantee = self.guarantee(scope)
        if self.governing is BudgetAccountant.PLD and guarantee.cumulative_epsilon_pld is not None:
            return guarantee.cumulative_epsilon_pld
        return guarantee.cumulative_epsilon

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
            epsilon_pld=self.epsilon_pld,
            cumulative_epsilon_pld=self.cumulative_epsilon_pld,
        )

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready values, e.g. to embed in an audit report.

        Floats are the strings `repr` gives (exact, one spelling per value), enums their
        values, the signature lowercase hex; ``format`` names the encoding version.

        Returns:
            A new dict; `from_json` accepts it back.
        """
        return super().to_dict()

    def entry_hash(self) -> str:
        """SHA-256 of `canonical_bytes`, the next entry's ``prev_hash``.

        Returns:
            64 lowercase hex digits.
        """
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

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
        return cls._decode(data, what="ledger entry", refuse=lambda message, _field: LedgerError(message))

    def _not_canonical(self) -> LedgerError:
        return LedgerError(
            f"ledger entry seq {self.seq} is not in canonical form (the text differs from "
            "what the silo wrote: changed bytes, whitespace, escapes or letter case)",
            seq=self.seq,
        )

    @classmethod
    def _older_formats(cls) -> Mapping[str, frozenset[str]]:
        return {ENTRY_FORMAT_V1: frozenset(f.name for f in fields(cls)) - _V2_FIELDS}

    @classmethod
    def _from_mapping(cls, data: Mapping[str, Any]) -> LedgerEntry:
        signature = cls._envelope(data, what="ledger entry")
        single = data["single_upload"]
        v2 = data["format"] == ENTRY_FORMAT
        pld: dict[str, Any] = {}
        if v2:
            pld = {
                "epsilon_pld": parse_optional_float(data["epsilon_pld"], "epsilon_pld"),
                "cumulative_epsilon_pld": parse_optional_float(
                    data["cumulative_epsilon_pld"], "cumulative_epsilon_pld"
                ),
                "accountant": parse_enum(data["accountant"], BudgetAccountant, "accountant"),
            }
        return cls(
            **pld,
            seq=parse_int(data["seq"], "seq"),
            silo=parse_str(data["silo"], "silo"),
            run_id=parse_str(data["run_id"], "run_id"),
            round=parse_int(data["round"], "round"),
            upload_index=parse_int(data["upload_index"], "upload_index"),
            mechanism=parse_enum(data["mechanism"], Mechanism, "mechanism"),
            neighbouring=parse_enum(data["neighbouring"], Neighbouring, "neighbouring"),
            noise_multiplier=parse_float(data["noise_multiplier"], "noise_multiplier"),
            sample_rate=parse_float(data["sample_rate"], "sample_rate"),
            steps=parse_int(data["steps"], "steps"),
            clip_norm=parse_float(data["clip_norm"], "clip_norm"),
            delta=parse_float(data["delta"], "delta"),
            epsilon_rdp=parse_float(data["epsilon_rdp"], "epsilon_rdp"),
            rdp_order=parse_float(data["rdp_order"], "rdp_order"),
            epsilon_prv=parse_optional_float(data["epsilon_prv"], "epsilon_prv"),
            cumulative_epsilon=parse_float(data["cumulative_epsilon"], "cumulative_epsilon"),
            guarantee_scope=parse_enum(data["guarantee_scope"], GuaranteeScope, "guarantee_scope"),
            single_upload=None if single is None else UploadGuarantee._from_dict(single, v2=v2),
            created_at=parse_str(data["created_at"], "created_at"),
            prev_hash=parse_str(data["prev_hash"], "prev_hash"),
            certificate=parse_str(data["certificate"], "certificate"),
            signature=signature,
        )

    def _unsigned_dict(self) -> dict[str, Any]:
        """Every field but the signature as JSON values: what `canonical_bytes` encodes."""
        v2 = self.accountant is not None
        out = {
            "format": ENTRY_FORMAT if v2 else ENTRY_FORMAT_V1,
            "seq": self.seq,
            "silo": self.silo,
            "run_id": self.run_id,
            "round": self.round,
            "upload_index": self.upload_index,
            "mechanism": self.mechanism.value,
            "neighbouring": self.neighbouring.value,
            "noise_multiplier": float_text(self.noise_multiplier),
            "sample_rate": float_text(self.sample_rate),
            "steps": self.steps,
            "clip_norm": float_text(self.clip_norm),
            "delta": float_text(self.delta),
            "epsilon_rdp": float_text(self.epsilon_rdp),
            "rdp_order": float_text(self.rdp_order),
            "epsilon_prv": _optional_text(self.epsilon_prv),
            "cumulative_epsilon": float_text(self.cumulative_epsilon),
            "guarantee_scope": self.guarantee_scope.value,
            "single_upload": None if self.single_upload is None else self.single_upload._to_dict(v2=v2),
            "created_at": self.created_at,
            "prev_hash": self.prev_hash,
            "certificate": self.certificate,
        }
        if v2:
            assert self.accountant is not None
            out["epsilon_pld"] = _optional_text(self.epsilon_pld)
            out["cumulative_epsilon_pld"] = _optional_text(self.cumulative_epsilon_pld)
            out["accountant"] = self.accountant.value
        return out


def _optional_text(value: float | None) -> str | None:
    return None if value is None else float_text(value)
