"""Locating tampering in a report's text: the line, column, silo and ledger entry that changed."""

from __future__ import annotations

import json

from fedsilo.privacy.audit.report import AuditError
from fedsilo.privacy.pki import validate_name


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed in a report")


def _located(text: str, position: int, where: str, problem: str) -> AuditError:
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    silo, seq = _damaged_entry(text)
    inside = ""
    if seq is not None:
        inside = (
            f" inside silo {silo!r}'s ledger entry seq {seq}"
            if silo is not None
            else f" inside ledger entry seq {seq}"
        )
    return AuditError(
        f"{where}: the report{inside} {problem} (line {line}, column {column}); it was changed "
        "after it was written, do not trust it",
        silo=silo,
        seq=seq,
    )


_ENTRIES_OPEN = '   "entries": ['
_ENTRIES_CLOSE = ("   ]", "   ],")
_ENTRY_OPEN = "    {"
_ENTRY_CLOSE = ("    }", "    },")
_SILO_KEY = '   "silo": "'
_ENTRY_SILO_KEY = '     "silo": "'


def _damaged_entry(text: str) -> tuple[str | None, int | None]:
    """(silo, seq) of the first ledger entry whose text is not canonical, or (None, None).

    Works on damaged text: each entry spans the lines from ``    {`` to ``    }`` inside a
    silo's ``"entries": [`` block (the layout `write_report` gives); an entry whose braces
    do not pair up or whose text is not the canonical spelling of its content is damaged.
    Its seq is its position in the block, as `verify_chain` numbers entries.
    """
    lines = text.split("\n")
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    i = 0
    while i < len(lines):
        if lines[i] != _ENTRIES_OPEN:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j] in _ENTRIES_CLOSE), len(lines))
        spans: list[tuple[int | None, int | None]] = []
        opened: int | None = None
        for k in range(i + 1, end):
            if lines[k] == _ENTRY_OPEN:
                if opened is not None:
                    spans.append((opened, None))
                opened = k
            elif lines[k] in _ENTRY_CLOSE:
                spans.append((opened, k))
                opened = None
        if opened is not None:
            spans.append((opened, None))
        for index, (first, last) in enumerate(spans, start=1):
            damaged = first is None or last is None
            if not damaged:
                chunk = text[starts[first] + 4 : starts[last] + 5]  # type: ignore[index]
                damaged = not _canonical_entry_text(chunk)
            if damaged:
                return _block_silo(lines, i, end, spans, first, last), index
        i = end
    return None, None


def _canonical_entry_text(chunk: str) -> bool:
    try:
        value = json.loads(chunk, parse_constant=_refuse_constant)
        expected = json.dumps(value, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return False
    return isinstance(value, dict) and expected.replace("\n", "\n    ") == chunk


def _block_silo(
    lines: list[str],
    start: int,
    end: int,
    spans: list[tuple[int | None, int | None]],
    first: int | None,
    last: int | None,
) -> str | None:
    """The silo a damaged entries block belongs to: its own key, else an entry's."""
    for k in range(end + 1, len(lines)):
        if lines[k].startswith("  }") or lines[k] == _ENTRIES_OPEN:
            break
        name = _quoted_name(lines[k], _SILO_KEY)
        if name is not None:
            return name
    for k in range(start + 1, end):
        name = _quoted_name(lines[k], _ENTRY_SILO_KEY)
        if name is not None:
            return name
    return None


def _quoted_name(line: str, prefix: str) -> str | None:
    if not line.startswith(prefix):
        return None
    rest = line[len(prefix) :].rstrip(",")
    if not rest.endswith('"'):
        return None
    try:
        return validate_name(rest[:-1])
    except ValueError:
        return None
