"""Validators, each rule once: names, run ids, digests, numbers, δ, and the config-dataclass helpers.

Two message shapes exist: ``field: value must be …`` (``int_in``, ``positive``, ``non_negative``,
``probability``, the name checks; ``error`` picks the exception, e.g. a ``ConfigError``) and
``Owner.field must be …`` (``check_*`` of the frozen config dataclasses).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: A silo (and any certificate) name: lowercase, 1..63 chars of [a-z0-9._-], starting alphanumeric.
SILO_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
#: A run id: 1..64 chars of [A-Za-z0-9._-], starting alphanumeric.
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: A SHA-256 digest as 64 lowercase hex characters.
HEX64_RE = re.compile(r"[0-9a-f]{64}")
#: A Task name: lowercase words of [a-z0-9] joined by '-', starting with a letter (e.g. "segmentation-2d").
TASK_NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def is_silo_name(value: object) -> bool:
    """Whether ``value`` is a valid silo name (:data:`SILO_NAME_RE`)."""
    return isinstance(value, str) and SILO_NAME_RE.fullmatch(value) is not None


def is_run_id(value: object) -> bool:
    """Whether ``value`` is a valid run id (:data:`RUN_ID_RE`)."""
    return isinstance(value, str) and RUN_ID_RE.fullmatch(value) is not None


def is_task_name(value: object) -> bool:
    """Whether ``value`` is a valid Task name (:data:`TASK_NAME_RE`)."""
    return isinstance(value, str) and TASK_NAME_RE.fullmatch(value) is not None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine only:
    ``localhost`` or a loopback address. A host name other than localhost may resolve anywhere."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_hex64(value: object) -> bool:
    """Whether ``value`` is a SHA-256 digest in lowercase hex (:data:`HEX64_RE`)."""
    return isinstance(value, str) and HEX64_RE.fullmatch(value) is not None


def excerpt(text: object, limit: int = 80) -> str:
    """Caller-supplied text as it may appear in a message or a log line: at most ``limit`` characters
    (non-printable ones escaped), then how many were left out. No message quotes unbounded input.
    """
    s = text if isinstance(text, str) else str(text)
    head = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s[:limit])
    return head if len(s) <= limit else f"{head}… ({len(s) - limit} more characters)"


def silo_name(field: str, value: object, *, error: type[Exception] = ValueError) -> str:
    """Returns ``value`` if it is a valid silo name, else raises ``error`` naming ``field``."""
    if not is_silo_name(value):
        raise error(f"{field}: {value!r} is not a valid silo name ([a-z0-9][a-z0-9._-]{{0,62}})")
    return value  # type: ignore[return-value]


def run_id(field: str, value: object, *, error: type[Exception] = ValueError) -> str:
    """Returns ``value`` if it is a valid run id, else raises ``error`` naming ``field``."""
    if not is_run_id(value):
        raise error(f"{field}: {value!r} is not 1..64 chars of [A-Za-z0-9._-]")
    return value  # type: ignore[return-value]


def int_in(field: str, value: object, lo: int, hi: int, *, error: type[Exception] = ValueError) -> int:
    """Returns ``value`` if it is an int (not a bool) in [lo, hi], else raises ``error`` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise error(f"{field}: {value!r} must be an integer in [{lo}, {hi}]")
    return value


def _is_finite_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def positive(field: str, value: object, *, error: type[Exception] = ValueError) -> float:
    """Returns ``value`` if it is a finite number > 0 (a σ, a clip norm, a time), else raises ``error``."""
    if not _is_finite_number(value) or value <= 0:  # type: ignore[operator]
        raise error(f"{field}: {value!r} must be a finite number > 0")
    return value  # type: ignore[return-value]


def non_negative(field: str, value: object, *, error: type[Exception] = ValueError) -> float:
    """Returns ``value`` if it is a finite number >= 0, else raises ``error`` naming ``field``."""
    if not _is_finite_number(value) or value < 0:  # type: ignore[operator]
        raise error(f"{field}: {value!r} must be a finite number >= 0")
    return value  # type: ignore[return-value]


def probability(field: str, value: object, *, error: type[Exception] = ValueError) -> float:
    """Returns ``value`` if it is a number in the open interval (0, 1) (a δ), else raises ``error``."""
    if not _is_finite_number(value) or not 0 < value < 1:  # type: ignore[operator]
        raise error(f"{field}: {value!r} must be a number in (0, 1)")
    return value  # type: ignore[return-value]

_MAX_SEED = 2**63 - 1


def check_int(owner: str, name: str, value: object, *, minimum: int | None = None) -> None:
    """Raises ValueError unless ``value`` is an int (not a bool) that is at least ``minimum``.

    Args:
        owner: Name of the config class, used in the message.
        name: Name of the field, used in the message.
        value: The value to check.
        minimum: Smallest allowed value, or None for no bound.

    Raises:
        ValueError: If the value is not an int or is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value!r}")


def check_seed(owner: str, name: str, value: object) -> None:
    """Raises ValueError unless ``value`` is an int in [0, 2**63 - 1].

    Args:
        owner: Name of the config class, used in the message.
        name: Name of the field, used in the message.
        value: The value to check.

    Raises:
        ValueError: If the value is not a usable seed.
    """
    check_int(owner, name, value, minimum=0)
    assert isinstance(value, int)
    if value > _MAX_SEED:
        raise ValueError(f"{owner}.{name} must be <= 2**63 - 1, got {value!r}")


def check_float(
    owner: str,
    name: str,
    value: object,
    *,
    low: float,
    high: float,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raises ValueError unless ``value`` is a finite real number inside the given interval.

    Args:
        owner: Name of the config class, used in the message.
        name: Name of the field, used in the message.
        value: The value to check (an int is accepted, a bool is not).
        low: Lower bound of the interval.
        high: Upper bound of the interval.
        low_inclusive: Whether ``low`` itself is allowed.
        high_inclusive: Whether ``high`` itself is allowed.

    Raises:
        ValueError: If the value is not a number or lies outside the interval.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}.{name} must be a number, got {value!r}")
    v = float(value)
    ok_low = v >= low if low_inclusive else v > low
    ok_high = v <= high if high_inclusive else v < high
    if not math.isfinite(v) or not (ok_low and ok_high):
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{owner}.{name} must be in {lo}{low}, {high}{hi}, got {value!r}")


def check_enum(owner: str, name: str, value: object, enum_type: type[enum.Enum]) -> None:
    """Raises ValueError unless ``value`` is a member of ``enum_type``.

    Args:
        owner: Name of the config class, used in the message.
        name: Name of the field, used in the message.
        value: The value to check.
        enum_type: The required enum class.

    Raises:
        ValueError: If the value is not a member (plain strings are rejected; use from_mapping).
    """
    if not isinstance(value, enum_type):
        allowed = ", ".join(repr(m.value) for m in enum_type)
        raise ValueError(f"{owner}.{name} must be a {enum_type.__name__} ({allowed}), got {value!r}")


def _convert(owner: str, key: str, value: Any, hint: Any) -> Any:
    """Converts one plain (TOML/JSON) value to the type that a config field declares."""
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        if isinstance(value, str):
            for member in hint:
                if value.strip().lower() in (str(member.value).lower(), member.name.lower()):
                    return member
        allowed = ", ".join(repr(m.value) for m in hint)
        raise ValueError(f"{owner}: key {key!r} must be one of {allowed}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{owner}: key {key!r} must be a list, got {value!r}")
        (item_hint, _ellipsis) = typing.get_args(hint)
        return tuple(_convert(owner, f"{key}[{i}]", v, item_hint) for i, v in enumerate(value))
    if hint is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise ValueError(f"{owner}: key {key!r} must be a path string, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{owner}: key {key!r} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{owner}: key {key!r} must be an integer, got {value!r}")
        return value
    return value


def config_from_mapping(cls: type[T], data: Mapping[str, Any]) -> T:
    """Builds a config dataclass from plain values (strings for enums, lists for tuples).

    Args:
        cls: The frozen config dataclass to build.
        data: A mapping as read from TOML or JSON. Missing keys take the defaults.

    Returns:
        A validated instance of ``cls``.

    Raises:
        ValueError: On a non-mapping, an unknown key, or a bad value (the message names the key).
    """
    owner = cls.__name__
    if not isinstance(data, Mapping):
        raise ValueError(f"{owner}: expected a mapping (table), got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise ValueError(
            f"{owner}: unknown key(s) {', '.join(repr(k) for k in unknown)}; allowed keys: {', '.join(names)}"
        )
    kwargs = {k: _convert(owner, k, v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # e.g. a required field is missing
        raise ValueError(f"{owner}: {exc}") from exc


def config_to_mapping(config: object) -> dict[str, Any]:
    """Returns the plain (TOML-writable) form of a config dataclass.

    Enums become their values, tuples become lists and paths become strings, so that
    ``type(c).from_mapping(c.to_mapping()) == c``.

    Args:
        config: A config dataclass instance.

    Returns:
        A new dict with one entry per field.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        v = getattr(config, f.name)
        if isinstance(v, enum.Enum):
            v = v.value
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, Path):
            v = str(v)
        out[f.name] = v
    return out


class MappingConfig:
    """Mixin of the frozen config dataclasses: built from plain TOML values and turned back into them.

    ``Config.from_mapping(c.to_mapping()) == c``; enum values travel as strings, tuples as lists,
    and an unknown key or bad value raises ValueError naming it (:func:`config_from_mapping`).
    """

    @classmethod
    def from_mapping(cls: type[T], d: Mapping[str, Any]) -> T:
        """Builds a config from plain TOML values; missing keys take the defaults.

        Raises:
            ValueError: on an unknown key or a bad value; the message names the key.
        """
        return config_from_mapping(cls, d)

    def to_mapping(self) -> dict[str, Any]:
        """Returns the plain TOML form of this config."""
        return config_to_mapping(self)


def check_split_fractions(owner: str, val_fraction: object, test_fraction: object) -> None:
    """Raises ValueError naming ``owner`` unless both hold-out fractions are in [0, 1) and sum to < 1
    (the rest is the training set)."""
    check_float(owner, "val_fraction", val_fraction, low=0.0, high=1.0, high_inclusive=False)
    check_float(owner, "test_fraction", test_fraction, low=0.0, high=1.0, high_inclusive=False)
    if val_fraction + test_fraction >= 1.0:  # type: ignore[operator]
        raise ValueError(f"{owner}.val_fraction + test_fraction must be < 1, got {val_fraction!r} + {test_fraction!r}")


def coerce_folder_path(owner: str, value: object) -> Path:
    """A config's ``path`` as a :class:`~pathlib.Path` (from a str or path-like).

    Raises:
        ValueError: naming ``owner``: an empty string or not a path.
    """
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{owner}.path must not be empty, got {value!r}")
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, Path):
        value = Path(value)
    if not isinstance(value, Path):
        raise ValueError(f"{owner}.path must be a path, got {value!r}")
    return value
