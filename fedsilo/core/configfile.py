"""Config files, each rule once: TOML reading, unknown-key refusal, paths, TLS file triples and enum fields."""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

__all__ = ["ConfigError", "TlsFiles", "check_keys", "parse_enum", "read_toml", "resolve_path", "tls_files"]


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the field."""


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """PEM files for mutual TLS."""

    ca: Path
    cert: Path
    key: Path

    def check_exist(self, section: str) -> None:
        """Raises ConfigError naming the first missing file."""
        for f in fields(self):
            p = getattr(self, f.name)
            if not Path(p).is_file():
                raise ConfigError(f"{section}.{f.name}: file {p} does not exist")


def parse_enum(enum_cls: type[enum.Enum], name: str, value: Any) -> Any:
    """Parses a config string into ``enum_cls``, naming the field and the choices on error."""
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"{name}: {value!r} is not one of {choices}") from None


def check_keys(data: Mapping[str, Any], sections: Mapping[str, set[str] | None], path: str) -> None:
    """Raises ConfigError for unknown sections or keys (typos must not pass silently)."""
    for sec, value in data.items():
        if sec not in sections:
            raise ConfigError(f"{path}: unknown section [{sec}] (expected one of {sorted(sections)})")
        allowed = sections[sec]
        if allowed is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: [{sec}] must be a table")
        for key in value:
            if key not in allowed:
                raise ConfigError(f"{sec}.{key}: unknown key (expected one of {sorted(allowed)})")


def read_toml(path: Path) -> dict[str, Any]:
    """Reads a TOML file; ConfigError with the parser's message on a syntax error."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def tls_files(table: Mapping[str, Any], section: str, base: Path, *, insecure: bool,
              insecure_key: str) -> TlsFiles | None:
    """The ca/cert/key entries of a config table, resolved and checked to exist.

    Returns None only for an insecure config that names none of them.

    Raises:
        ConfigError: a missing entry or file, naming it.
    """
    keys = ("ca", "cert", "key")
    if insecure and not any(k in table for k in keys):
        return None
    missing = [k for k in keys if k not in table]
    if missing:
        raise ConfigError(f"{section}.{missing[0]}: missing (required unless {insecure_key} = true)")
    tls = TlsFiles(**{k: resolve_path(base, table[k], f"{section}.{k}") for k in keys})
    tls.check_exist(section)
    return tls


def resolve_path(base: Path, value: Any, name: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: {value!r} must be a path string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


_S = TypeVar("_S", bound="MethodTable")


class MethodTable:
    """Mixin of a method's settings table (``[resfim]``, ``[moon]``…): a frozen keyword-only dataclass
    read from a TOML/JSON table, written back as plain values; errors name ``<TABLE>.<key>``.

    Subclasses set ``TABLE`` and validate their fields in ``__post_init__``.
    """

    TABLE: ClassVar[str] = ""

    @classmethod
    def from_mapping(cls: type[_S], table: Mapping[str, Any]) -> _S:
        """Builds the settings from a table; missing keys take the defaults.

        Raises:
            ConfigError: an unknown key (or, from ``__post_init__``, a bad value), named ``<TABLE>.<key>``.
        """
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        for key in table:
            if key not in known:
                raise ConfigError(f"{cls.TABLE}.{key}: unknown key (expected one of {sorted(known)})")
        return cls(**dict(table))

    def to_mapping(self) -> dict[str, Any]:
        """The plain table form (what GetRun sends the silos)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def parse(cls, table: Mapping[str, Any]) -> dict[str, Any]:
        """The table validated and completed with the defaults: a method's ``tables`` parser."""
        return cls.from_mapping(table).to_mapping()
