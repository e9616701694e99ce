"""fedsilo.models.tasks: the Task registry and the built-in Tasks (every module of this folder registers its own).

Importing the package imports each of its modules, so each ``@register_task`` runs and the
registry is complete; no list of Tasks is kept by hand. Nothing here imports torch: a Task
module loads torch and the model code only when its methods run.
"""

from __future__ import annotations

import importlib
import pkgutil

from fedsilo.models.tasks.base import (
    EVAL_SPLITS,
    DataSpec,
    SiloData,
    Task,
    canonical_task_name,
    get_task,
    register_task,
    task_names,
    unregister_task,
)

__all__ = [
    "EVAL_SPLITS",
    "DataSpec",
    "SiloData",
    "Task",
    "canonical_task_name",
    "get_task",
    "register_task",
    "task_names",
    "unregister_task",
]



def _import_task_modules() -> None:
    """Imports every public module of this package, so that each registers its Tasks."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base" and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_task_modules()
