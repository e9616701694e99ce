"""The README's method list is the registry's (a method is added in its own module, never in the docs by hand)."""

from __future__ import annotations

import re
from pathlib import Path

from fedsilo.core.methods import DpLevel, methods

README = Path(__file__).resolve().parents[1] / "README.md"


def method_list() -> str:
    """The README's method list as the registry makes it: one line per method, in registry order."""
    lines = []
    for m in methods():
        notes = [f"no {level.value.replace('_', '-')} DP" for level in DpLevel if level in m.refuses]
        if m.needs_he:
            notes.append("HE only")
        if not m.modality_counts:
            notes.append("no modality groups")
        if m.bench is not None:
            notes.append("in the bench study")
        lines.append(f"- `{m.name}`: {m.summary}" + (f" ({'; '.join(notes)})" if notes else ""))
    return "\n".join(lines)


def test_readme_lists_the_registered_methods() -> None:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- methods:begin -->\n(.*?)<!-- methods:end -->", text, re.S)
    assert found, "README.md has no <!-- methods:begin --> ... <!-- methods:end --> block"
    assert found.group(1).strip() == method_list(), (
        "README.md's method list differs from the registry; replace the block with:\n" + method_list())


def test_readme_has_an_architecture_section() -> None:
    text = README.read_text(encoding="utf-8")
    assert "## Architecture" in text and "**Adding a method**" in text and "**Adding a Task**" in text
