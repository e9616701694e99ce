"""Certificate time helpers: the current UTC time, timestamps in messages, timezone-aware checks."""

from __future__ import annotations

import datetime as dt


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _fmt(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _require_aware(when: dt.datetime, what: str) -> dt.datetime:
    if not isinstance(when, dt.datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{what}={when!r} must be a timezone-aware datetime (e.g. UTC)")
    return when.astimezone(dt.timezone.utc)
