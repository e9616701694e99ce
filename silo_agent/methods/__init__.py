"""The built-in methods, one module each; importing this package registers every one of them.

The modules are found by listing this folder (nothing lists methods by hand); each registers its
class with :func:`fedsilo.core.methods.register_method`. They import without torch, so the
coordinator can validate a run's method with them.
"""

from __future__ import annotations

import importlib
import pkgutil

from fedsilo.core.methods import get_method
from fedsilo.silo_agent.strategy import Strategy

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")


def strategy_for(name: str, tables: dict | None = None) -> Strategy:
    """The agent-side strategy of registered method ``name`` for a run with method ``tables``.

    Raises:
        UnknownMethod: no module registered ``name``.
    """
    cls = get_method(name)
    if not issubclass(cls, Strategy):
        raise TypeError(f"method {name!r} has no agent implementation (its class is not a Strategy)")
    return cls.for_run(tables or {})


__all__ = ["strategy_for"]
