"""fedsilo.models: Tasks, MONAI networks, their registry, LoRA, built-in and folder datasets, training and metrics.

The package imports its parts lazily (PEP 562): ``from fedsilo.models import ModelConfig`` loads
``fedsilo.models.registry`` (and torch) on first use, so a torch-free install can still import
``fedsilo.models.tasks`` to list the registered Tasks.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

#: The submodules whose public names (their ``__all__``) the package re-exports.
_PARTS = ("data", "folder", "lora", "metrics", "objective", "pn", "precision", "pretrain", "rdn", "registry", "synthetic", "training", "tasks")


def _exports() -> dict[str, str]:
    """Public name -> the submodule that defines it, read from each part's ``__all__`` without importing
    it (so no torch). A name equal to a submodule's (e.g. the function ``pretrain``) is not exported:
    it would shadow that module."""
    here = Path(__file__).parent
    out: dict[str, str] = {}
    for part in _PARTS:
        path = here / part / "__init__.py" if (here / part).is_dir() else here / f"{part}.py"
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                out.update((name, part) for name in ast.literal_eval(node.value) if name not in _PARTS)
    return out


_EXPORTS = _exports()

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Loads an exported name, or a submodule, on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
