"""Modules imported on first use, so torch-free processes (the coordinator) can import method modules."""

from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["lazy_module"]


class _LazyModule(types.ModuleType):
    """Stands in for a module until an attribute is read; then imports it and delegates."""

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        return getattr(module, attr)


def lazy_module(name: str) -> Any:
    """A stand-in for module ``name`` that imports it when first used (never at import time).

    Method modules use it for torch and the model code: the coordinator reads their torch-free
    declarations without ever importing torch; an agent imports it on the first call that needs it.
    """
    return _LazyModule(name)
