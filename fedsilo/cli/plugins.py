"""Extra method and task modules named by ``FEDSILO_PLUGINS``, imported before any command runs.

A site (or a test) adds a method or a Task by writing one module that registers it; setting
``FEDSILO_PLUGINS`` to that module's import name or file path makes every ``fedsilo`` process
know it — the coordinator, the agents the demo spawns and the bench alike (child processes
inherit the variable).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["ENV", "PluginError", "load_plugins"]

#: The environment variable: module names or ``.py`` paths, separated by commas.
ENV = "FEDSILO_PLUGINS"


class PluginError(ImportError):
    """A plugin named by ``FEDSILO_PLUGINS`` could not be imported; the message names it."""


def load_plugins(spec: str | None = None) -> list[str]:
    """Imports every plugin named in ``spec`` (default: the ``FEDSILO_PLUGINS`` variable).

    Returns:
        The plugins imported, as named.

    Raises:
        PluginError: a named module or file that cannot be imported.
    """
    raw = os.environ.get(ENV, "") if spec is None else spec
    loaded = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        try:
            if item.endswith(".py"):
                path = Path(item).resolve()
                name = f"fedsilo_plugin_{path.stem}"
                if name not in sys.modules:
                    module_spec = importlib.util.spec_from_file_location(name, path)
                    if module_spec is None or module_spec.loader is None:
                        raise ImportError(f"not a Python file: {path}")
                    module = importlib.util.module_from_spec(module_spec)
                    sys.modules[name] = module
                    module_spec.loader.exec_module(module)
            else:
                importlib.import_module(item)
        except Exception as exc:  # noqa: BLE001 - any failure of a plugin is reported with its name
            raise PluginError(f"{ENV}: cannot import {item!r}: {exc}") from exc
        loaded.append(item)
    return loaded
