"""Field rules of ledger entries: numbers, ε, RDP orders, integers, enums and run ids."""

from __future__ import annotations

import enum
import numbers
from typing import Any

from fedsilo.privacy.signed import MAX_RUN_ID_BYTES, is_printable_run_id, real


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _positive(value: object, name: str) -> float:
    result = real(value, name)
    if result <= 0.0:
        raise ValueError(f"invalid field {name} {value!r}: must be > 0")
    return result


def _non_negative(value: object, name: str) -> float:
    result = real(value, name)
    if result < 0.0:
        raise ValueError(f"invalid field {name} {value!r}: must be >= 0")
    return result + 0.0  # -0.0 -> 0.0: one spelling per value


def _optional_epsilon(value: object, name: str) -> float | None:
    return None if value is None else _non_negative(value, name)


def _rdp_order(value: object, name: str) -> float:
    result = real(value, name)
    if result <= 1.0:
        raise ValueError(f"invalid field {name} {value!r}: an RDP order must be > 1")
    return result


#: The largest integer field: SQLite's INTEGER (the ledger and its mirror store seq, round, upload_index).
_MAX_INTEGER = 2**63 - 1


def _integer(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"invalid field {name} {value!r}: expected an integer")
    result = int(value)
    if result < minimum:
        raise ValueError(f"invalid field {name} {value!r}: must be >= {minimum}")
    if result > _MAX_INTEGER:
        raise ValueError(f"invalid field {name} {value!r}: must be <= {_MAX_INTEGER} (a 64-bit integer)")
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
    if not is_printable_run_id(run_id):
        raise ValueError(
            f"invalid field run_id {run_id!r}: expected 1 to {MAX_RUN_ID_BYTES} bytes of "
            "printable text"
        )
