"""A silo's signed privacy budget statement, and where the privacy files live in state dirs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedsilo.core.atomic import atomic_write
from fedsilo.privacy.keywrap import (
    _CERT_PARSE_ERRORS,
    SIGNATURE_BYTES,
    KeyWrapError,
    _check_silo_certificate,
    _own_signer,
    _sign,
    _verify,
)
from fedsilo.privacy.ledger import (
    _check_created_at,
    _dumps,
    _exact_keys,
    _float_text,
    _now_text,
    _parse_created_at,
    _parse_float,
    _parse_str,
    parse_json_object,
)
from fedsilo.privacy.pki import CertificateError, Role, identity_from_pem, validate_name

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

_MAX_CERT_CHARS = 16 * 1024
_MAX_FILE_BYTES = 64 * 1024


class BudgetError(Exception):
    """A budget statement is malformed, not canonical, or does not verify.

    Attributes:
        field: The statement field at fault, or None when the error is not about one field.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, kw_only=True)
class BudgetStatement:
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

    def __post_init__(self) -> None:
        try:
            validate_name(self.silo)
        except ValueError as exc:
            raise ValueError(f"invalid field silo: {exc}") from None
        epsilon = _finite(self.epsilon, "epsilon")
        if epsilon <= 0.0:
            raise ValueError(f"invalid field epsilon {self.epsilon!r}: must be > 0")
        object.__setattr__(self, "epsilon", epsilon)
        delta = _finite(self.delta, "delta")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"invalid field delta {self.delta!r}: must be in (0, 1)")
        object.__setattr__(self, "delta", delta)
        _check_created_at(self.created_at)
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
            object.__setattr__(self, "signature", bytes(self.signature))
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            shown = len(self.signature) if isinstance(self.signature, bytes) else self.signature
            raise ValueError(
                f"invalid field signature {shown!r}: expected {SIGNATURE_BYTES} bytes"
            )

    def to_dict(self) -> dict[str, Any]:
        """The statement as JSON-ready values (floats as their `repr` text, signature hex).

        Returns:
            A new dict; `from_json` accepts it back.
        """
        data = self._unsigned_dict()
        data["signature"] = self.signature.hex()
        return data

    def canonical_bytes(self) -> bytes:
        """The bytes the silo signs: `to_dict` without ``signature`` as canonical JSON.

        Returns:
            JSON with sorted keys, no whitespace and ASCII escapes.
        """
        return _dumps(self._unsigned_dict()).encode("ascii")

    def to_json(self) -> str:
        """The statement as canonical JSON text (sorted keys, no whitespace, ASCII escapes)."""
        return _dumps(self.to_dict())

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
        try:
            parsed, text = parse_json_object(data, what="budget statement")
        except ValueError as exc:
            raise BudgetError(str(exc)) from None
        try:
            statement = cls._from_mapping(parsed)
        except _FieldError as exc:
            raise BudgetError(f"malformed budget statement: {exc}", field=exc.field) from None
        if text is not None and statement.to_json() != text:
            raise BudgetError(
                f"budget statement of silo {statement.silo!r} is not in canonical form (the text "
                "differs from what the silo signed: changed bytes, whitespace, escapes or "
                "letter case)"
            )
        return statement

    def verify(self, *, ca_pem: bytes | str) -> None:
        """Checks the certificate and the signature.

        The certificate must be a silo certificate issued by the CA to ``silo``, valid
        (with the CA) at ``created_at``; the signature must verify with its key.

        Args:
            ca_pem: The federation CA certificate, PEM.

        Raises:
            BudgetError: Saying what is wrong (naming the field).
        """
        ca_bytes = ca_pem.encode("ascii") if isinstance(ca_pem, str) else bytes(ca_pem)
        cert_pem = self.certificate.encode("ascii")
        whose = f"the certificate in silo {self.silo!r}'s budget statement"
        try:
            identity = identity_from_pem(cert_pem)
        except (CertificateError, *_CERT_PARSE_ERRORS):  # a damaged certificate may raise
            identity = None  # _check_silo_certificate below says what is wrong with it
        if identity is not None and identity.role is not Role.SILO:
            raise BudgetError(
                f"{whose} belongs to the {identity.role.value} {identity.name!r}, not to a "
                "silo; only a silo states its own privacy budget",
                field="certificate",
            )
        try:
            public_key = _check_silo_certificate(
                cert_pem,
                ca_bytes,
                name=self.silo,
                now=_parse_created_at(self.created_at),
                whose=whose,
                consequence="do not trust this budget statement",
            )
        except KeyWrapError as exc:
            raise BudgetError(str(exc), field="certificate") from None
        if not _verify(public_key, self.signature, self.canonical_bytes()):
            raise BudgetError(
                f"silo {self.silo!r}'s budget statement: the signature does not match its "
                "certificate, so a field was changed after the silo signed it (or another key "
                "signed it)",
                field="signature",
            )

    @classmethod
    def _from_mapping(cls, data: Mapping[str, Any]) -> BudgetStatement:
        try:
            _exact_keys(data, {"format", *(f.name for f in fields(cls))}, "budget statement")
        except ValueError as exc:
            raise _FieldError(str(exc), field=None) from None
        if data["format"] != BUDGET_FORMAT:
            raise _FieldError(
                f"field format is {data['format']!r}, this fedsilo reads {BUDGET_FORMAT!r}",
                field="format",
            )
        signature = data["signature"]
        if (
            not isinstance(signature, str)
            or len(signature) != 2 * SIGNATURE_BYTES
            or any(c not in "0123456789abcdef" for c in signature)
        ):
            raise _FieldError(
                f"invalid field signature {signature!r}: expected {2 * SIGNATURE_BYTES} "
                "lowercase hex digits",
                field="signature",
            )
        values: dict[str, Any] = {"signature": bytes.fromhex(signature)}
        for name, parse in (
            ("silo", _parse_str),
            ("epsilon", _parse_float),
            ("delta", _parse_float),
            ("created_at", _parse_str),
            ("certificate", _parse_str),
        ):
            try:
                values[name] = parse(data[name], name)
            except ValueError as exc:
                raise _FieldError(str(exc), field=name) from None
        try:
            return cls(**values)
        except ValueError as exc:
            raise _FieldError(str(exc), field=_field_named(str(exc))) from None

    def _unsigned_dict(self) -> dict[str, Any]:
        return {
            "format": BUDGET_FORMAT,
            "silo": self.silo,
            "epsilon": _float_text(self.epsilon),
            "delta": _float_text(self.delta),
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
        created_at=_now_text(),
        certificate=cert_text,
        signature=bytes(SIGNATURE_BYTES),
    )
    key = private_key_pem.encode("ascii") if isinstance(private_key_pem, str) else private_key_pem
    try:
        signer = _own_signer(
            cert_text.encode("ascii"), key, name=silo, purpose="privacy budget statements"
        )
    except KeyWrapError as exc:
        raise BudgetError(str(exc), field="certificate") from None
    return replace(unsigned, signature=_sign(signer, unsigned.canonical_bytes()))


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


class _FieldError(ValueError):
    def __init__(self, message: str, *, field: str | None) -> None:
        super().__init__(message)
        self.field = field


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"invalid field {name} {value!r}: expected a number")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"invalid field {name} {value!r}: must be finite")
    return result


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
