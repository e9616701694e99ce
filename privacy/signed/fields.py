"""Canonical JSON and strict field parsing for signed documents: one spelling per value."""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

from fedsilo.core.validators import probability
from fedsilo.privacy.signed.keys import SIGNATURE_BYTES

MAX_CERT_CHARS = 16 * 1024
MAX_RUN_ID_BYTES = 256
CREATED_AT_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_CREATED_AT_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


class DocumentError(Exception):
    """A signed document is malformed, not canonical, or does not verify; each kind of document
    subclasses it (e.g. ``BudgetError``).

    Attributes:
        field: The document field at fault, or None when the error is not about one field.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class FieldError(ValueError):
    """A field of a signed document is malformed.

    Attributes:
        field: The field at fault, or None when the error is not about one field.
    """

    def __init__(self, message: str, *, field: str | None) -> None:
        super().__init__(message)
        self.field = field


def canonical_json(data: Mapping[str, Any]) -> str:
    """JSON with sorted keys, no whitespace and ASCII escapes: one spelling per document."""
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


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


def exact_keys(data: Mapping[str, Any], expected: set[str], what: str) -> None:
    """Raises ValueError unless ``data`` has exactly the keys ``expected``."""
    keys = set(data)
    missing = sorted(expected - keys)
    if missing:
        raise ValueError(f"{what} lacks field {missing[0]}")
    extra = sorted(str(k) for k in keys - expected)
    if extra:
        raise ValueError(f"{what} has unknown field {extra[0]!r}")


def real(value: object, name: str) -> float:
    """``value`` as a finite float (a real number, not a bool), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"invalid field {name} {value!r}: expected a number")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"invalid field {name} {value!r}: must be finite")
    return result


def delta_field(value: object, name: str = "delta") -> float:
    """A δ as a float: a finite number in (0, 1) (`validators.probability`), else ValueError naming ``name``."""
    result = real(value, name)
    try:
        return probability(name, result)
    except ValueError:
        raise ValueError(f"invalid field {name} {value!r}: must be in (0, 1)") from None


def float_text(value: float) -> str:
    """The one JSON spelling of a float: its `repr`, as a string."""
    return repr(float(value))


def parse_float(value: object, name: str) -> float:
    """Parses `float_text` output, refusing any other spelling."""
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


def parse_optional_float(value: object, name: str) -> float | None:
    """`parse_float`, or None for a JSON null."""
    return None if value is None else parse_float(value, name)


def parse_int(value: object, name: str) -> int:
    """A JSON integer (not a bool, not a float), else ValueError naming ``name``."""
    if type(value) is not int:
        raise ValueError(f"invalid field {name} {value!r}: expected a JSON integer")
    return value


def parse_str(value: object, name: str) -> str:
    """A JSON string, else ValueError naming ``name``."""
    if not isinstance(value, str):
        raise ValueError(f"invalid field {name} {value!r}: expected a string")
    return value


def parse_enum(value: object, kind: type[enum.Enum], name: str) -> Any:
    """The member of ``kind`` whose value is ``value``, else ValueError naming ``name``."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(
            f"invalid field {name} {value!r}: expected one of {[m.value for m in kind]}"
        ) from None


def parse_signature_hex(value: object) -> bytes:
    """A signature written as lowercase hex, else ValueError naming the field."""
    if (
        not isinstance(value, str)
        or len(value) != 2 * SIGNATURE_BYTES
        or any(c not in "0123456789abcdef" for c in value)
    ):
        raise ValueError(
            f"invalid field signature {value!r}: expected {2 * SIGNATURE_BYTES} "
            "lowercase hex digits"
        )
    return bytes.fromhex(value)


def is_printable_run_id(value: object) -> bool:
    """Whether ``value`` is a run id as signed documents carry it: 1 to 256 bytes of printable text."""
    return (
        isinstance(value, str)
        and bool(value)
        and value.isprintable()
        and len(value.encode("utf-8")) <= MAX_RUN_ID_BYTES
    )


def now_text() -> str:
    """The current UTC time as signed documents write it (``YYYY-MM-DDTHH:MM:SS.ffffffZ``)."""
    return dt.datetime.now(dt.timezone.utc).strftime(CREATED_AT_FORMAT)


def parse_created_at(value: str) -> dt.datetime:
    """A `now_text` time as an aware UTC datetime."""
    return dt.datetime.strptime(value, CREATED_AT_FORMAT).replace(tzinfo=dt.timezone.utc)


def check_created_at(value: object) -> None:
    """Raises ValueError unless ``value`` is a real time written as `now_text` writes it."""
    if not isinstance(value, str) or _CREATED_AT_RE.fullmatch(value) is None:
        raise ValueError(
            f"invalid field created_at {value!r}: expected UTC time as "
            "YYYY-MM-DDTHH:MM:SS.ffffffZ"
        )
    try:
        parse_created_at(value)
    except ValueError:
        raise ValueError(f"invalid field created_at {value!r}: not a real date and time") from None
