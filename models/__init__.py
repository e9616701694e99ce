"""fedsilo.models: Tasks, MONAI networks, their registry, LoRA, built-in and folder datasets, training and metrics.

The package imports its parts lazily (PEP 562): ``from fedsilo.models import ModelConfig`` loads
``fedsilo.models.registry`` (and torch) on first use, so a torch-free install can still import
``fedsilo.models.tasks`` to list the registered Tasks.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the submodule that defines it. The function pretrain() stays in
# fedsilo.models.pretrain: exported here it would shadow that module.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("SegmentationDataset", "SiloSplits"), "data"),
    **dict.fromkeys(("FolderConfig", "load_folder"), "folder"),
    **dict.fromkeys(
        (
            "LoraLayer",
            "LoraSettings",
            "add_lora",
            "build_lora_model",
            "default_target_modules",
            "from_matrix",
            "lora_layers",
            "lora_parameter_names",
            "merged_delta",
            "to_matrix",
        ),
        "lora",
    ),
    **dict.fromkeys(("SegmentationScores", "dice_and_hd95", "hd95_pixels", "to_labels"), "metrics"),
    **dict.fromkeys(("PRETRAIN_DOMAIN", "PretrainConfig", "load_base_checkpoint", "save_checkpoint"), "pretrain"),
    **dict.fromkeys(("Normalized", "RandomNormalized", "channel_stats"), "rdn"),
    **dict.fromkeys(
        (
            "UNETR_PATCH",
            "Architecture",
            "ModelConfig",
            "Norm",
            "build_model",
            "local_parameter_names",
            "model_fingerprint",
            "parameter_count",
        ),
        "registry",
    ),
    **dict.fromkeys(
        ("UNSEEN_DOMAIN", "DomainStyle", "SyntheticConfig", "domain_style", "silo_splits", "unseen_domain"),
        "synthetic",
    ),
    **dict.fromkeys(
        ("EvalResult", "Optimizer", "TrainConfig", "TrainResult", "evaluate", "train_local"), "training"
    ),
    **dict.fromkeys(("DataSpec", "SiloData", "Task", "get_task", "register_task", "task_names"), "tasks"),
}

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
