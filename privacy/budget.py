"""A silo's signed privacy budget statement, and where the privacy files live in state dirs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fedsilo.core.atomic import atomic_write
from fedsilo.privacy.pki import validate_name
from fedsilo.privacy.signed import (
    SIGNATURE_BYTES,
    DocumentError,
    FieldError,
    SignatureError,
    SignedDocument,
    check_created_at,
    delta_field,
    float_text,
    now_text,
    own_signer,
    parse_float,
    parse_str,
    real,
)

__all__ = [
    "BUDGETS_DIR",
    "BUDGET_FILE",
    "BUDGET_FORMAT",
    "CA_FILE",
    "LEDGER_FILE",
    "MIRROR_FILE",
    "BudgetError",
    "BudgetStatement",
    "load_budget",
    "save_budget",
    "sign_budget",
]

BUDGET_FORMAT = "fedsilo-budget-v1"

BUDGET_FILE = "privacy_budget.json"
"""The silo's own `BudgetStatement` in the agent's state directory."""
CA_FILE = "federation_ca.pem"
"""A copy of the federation CA certificate, in agent and coordinator state directories."""
LEDGER_FILE = "ledger.sqlite"
"""The silo's privacy `Ledger` in the agent's state directory."""
MIRROR_FILE = "ledger_mirror.sqlite"
"""The coordinator's `LedgerMirror` in its state directory."""
BUDGETS_DIR = "budgets"
"""Folder of the coordinator's state directory holding each silo's ``<silo>.json`` budget."""

_MAX_FILE_BYTES = 64 * 1024


class BudgetError(DocumentError):
    """A budget statement is malformed, not canonical, or does not verify (``field`` names the field at fault)."""


@dataclass(frozen=True, kw_only=True)
class BudgetStatement(SignedDocument):
    """A silo's promise of the most ε it will ever spend, signed with its certificate's key.

    The budget (ε_max, δ) bounds, for each neighbouring relation separately, the cumulative
    ε against anyone who sees this silo's uploads (the single-upload scope of the ledger).

    Attributes:
        silo: The silo's name; its certificate's CN.
        epsilon: ε_max, a finite number > 0.
        delta: The δ the budget is stated at, in (0, 1).
        created_at: When the statement was signed, UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``.
        certificate: The silo's federation certificate (PEM) whose key signed it.
        signature: Raw 64-byte ECDSA P-256/SHA-256 ``r || s`` (or Ed25519) signature over
            `canonical_bytes`.
    """

    silo: str
    epsilon: float
    delta: float
    created_at: str
    certificate: str = field(repr=False)
    signature: bytes = field(repr=False)

    FORMAT: ClassVar[str] = BUDGET_FORMAT

    def __post_init__(self) -> None:
        try:
            validate_name(self.silo)
        except ValueError as exc:
            raise ValueError(f"invalid field silo: {exc}") from None
        epsilon = real(self.epsilon, "epsilon")
        if epsilon <= 0.0:
            raise ValueError(f"invalid field epsilon {self.epsilon!r}: must be > 0")
        object.__setattr__(self, "epsilon", epsilon)
        object.__setattr__(self, "delta", delta_field(self.delta))
        check_created_at(self.created_at)
        self._check_signed_fields()

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> BudgetStatement:
        """Parses `to_json` text or a `to_dict` mapping. Does not verify the signature.

        Text must be exactly what `to_json` writes; any other spelling is refused.

        Args:
            data: JSON text (str or UTF-8 bytes), or an already-parsed mapping.

        Returns:
            The statement.

        Raises:
            BudgetError: If the data is not a well-formed, canonical budget statement; the
                message names the field.
        """
        return cls._decode(
            data,
            what="budget statement",
            refuse=lambda message, field_: BudgetError(message, field=field_),
        )

    def _not_canonical(self) -> BudgetError:
        return BudgetError(
            f"budget statement of silo {self.silo!r} is not in canonical form (the text "
            "differs from what the silo signed: changed bytes, whitespace, escapes or "
            "letter case)"
        )

    def verify(self, *, ca_pem: bytes | str) -> None:
        """Checks the certificate and the signature.

        The certificate must be a silo certificate issued by the CA to ``silo``, valid
        (with the CA) at ``created_at``; the signature must verify with its key.

        Args:
            ca_pem: The federation CA certificate, PEM.

        Raises:
            BudgetError: Saying what is wrong (naming the field).
        """
        self.verify_signature(ca_pem, what="budget statement", consequence="do not trust this budget statement",
                              only="only a silo states its own privacy budget", error=BudgetError)

    @classmethod
    def _from_mapping(cls, data: Mapping[str, Any]) -> BudgetStatement:
        values: dict[str, Any] = {"signature": cls._envelope(data, what="budget statement")}
        for name, parse in (
            ("silo", parse_str),
            ("epsilon", parse_float),
            ("delta", parse_float),
            ("created_at", parse_str),
            ("certificate", parse_str),
        ):
            try:
                values[name] = parse(data[name], name)
            except ValueError as exc:
                raise FieldError(str(exc), field=name) from None
        try:
            return cls(**values)
        except ValueError as exc:
            raise FieldError(str(exc), field=_field_named(str(exc))) from None

    def _unsigned_dict(self) -> dict[str, Any]:
        """Every field but the signature as JSON values: what `canonical_bytes` encodes."""
        return {
            "format": BUDGET_FORMAT,
            "silo": self.silo,
            "epsilon": float_text(self.epsilon),
            "delta": float_text(self.delta),
            "created_at": self.created_at,
            "certificate": self.certificate,
        }


def sign_budget(
    *,
    silo: str,
    epsilon: float,
    delta: float,
    certificate_pem: bytes | str,
    private_key_pem: bytes | str,
) -> BudgetStatement:
    """Signs a budget statement now with this silo's certificate key.

    Args:
        silo: This silo's name; must be the certificate's CN.
        epsilon: ε_max, a finite number > 0.
        delta: δ, in (0, 1).
        certificate_pem: This silo's federation certificate (role silo), PEM.
        private_key_pem: That certificate's private key, PEM.

    Returns:
        The signed statement.

    Raises:
        ValueError: Naming the field, if ``silo``, ``epsilon`` or ``delta`` is invalid.
        BudgetError: If the certificate is not silo ``silo``'s or the key is not its key.
    """
    cert_text = _pem_text(certificate_pem, "certificate_pem")
    unsigned = BudgetStatement(
        silo=silo,
        epsilon=epsilon,
        delta=delta,
        created_at=now_text(),
        certificate=cert_text,
        signature=bytes(SIGNATURE_BYTES),
    )
    key = private_key_pem.encode("ascii") if isinstance(private_key_pem, str) else private_key_pem
    try:
        signer = own_signer(
            cert_text.encode("ascii"), key, name=silo, purpose="privacy budget statements"
        )
    except SignatureError as exc:
        raise BudgetError(str(exc), field="certificate") from None
    return unsigned.signed_with(signer)


def save_budget(statement: BudgetStatement, path: Path | str) -> Path:
    """Writes a statement's `BudgetStatement.to_json` text to a file, atomically.

    Args:
        statement: The statement.
        path: The file (e.g. ``<agent state>/privacy_budget.json``); its folder must exist.

    Returns:
        The path written.
    """
    if not isinstance(statement, BudgetStatement):
        raise TypeError(f"expected a BudgetStatement, not {type(statement).__name__}")
    path = Path(path)
    atomic_write(path, statement.to_json().encode("ascii"))
    return path


def load_budget(path: Path | str) -> BudgetStatement | None:
    """Reads a statement `save_budget` wrote. Does not verify it (see `BudgetStatement.verify`).

    Args:
        path: The file.

    Returns:
        The statement, or None if the file does not exist.

    Raises:
        BudgetError: If the file cannot be read or is not a canonical budget statement.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BudgetError(f"cannot read the budget statement {str(path)!r}: {exc}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise BudgetError(
            f"{str(path)!r} is larger than {_MAX_FILE_BYTES} bytes; it is not a budget statement"
        )
    try:
        return BudgetStatement.from_json(data)
    except BudgetError as exc:
        raise BudgetError(f"{str(path)!r}: {exc}", field=exc.field) from None


def _field_named(message: str) -> str | None:
    for name in ("silo", "epsilon", "delta", "created_at", "certificate", "signature"):
        if message.startswith(f"invalid field {name}"):
            return name
    return None


def _pem_text(value: object, name: str) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"invalid {name}: a PEM certificate is ASCII text") from None
    if isinstance(value, str):
        return value
    raise ValueError(f"invalid {name}: expected PEM bytes or text, not {type(value).__name__}")
