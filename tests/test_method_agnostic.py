"""The coordinator and the agent's daemon know no method: every method-specific rule lives in its method module."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedsilo.core.methods import method_names

ROOT = Path(__file__).resolve().parents[1]

#: Every registered method's name and the words its name is made of (``deer+resfim`` → deer, resfim).
WORDS = sorted({w for name in method_names() for w in re.split(r"[+-]", name) if len(w) > 3} | set(method_names()))

FILES = sorted(ROOT.joinpath("coordinator").rglob("*.py")) + [ROOT / "silo_agent" / "daemon.py"]


def test_the_registry_has_the_built_in_methods() -> None:
    assert {"fedavg", "fedbn", "resfim", "deer", "pfa"} <= set(method_names())
    assert "resfim" in WORDS and "deer" in WORDS


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_method_name_appears(path: Path) -> None:
    text = path.read_text(encoding="utf-8").lower()
    found = sorted({w for w in WORDS if re.search(r"(?<![a-z0-9])" + re.escape(w) + r"(?![a-z0-9])", text)})
    assert not found, f"{path.relative_to(ROOT)} names method(s) {found}: move the rule into the method's module"
