"""fedsilo.models: MONAI networks, their registry, LoRA, built-in and folder datasets, training and metrics."""

from fedsilo.models.data import SegmentationDataset, SiloSplits
from fedsilo.models.folder import FolderConfig, load_folder
from fedsilo.models.lora import (
    LoraLayer,
    LoraSettings,
    add_lora,
    build_lora_model,
    default_target_modules,
    from_matrix,
    lora_layers,
    lora_parameter_names,
    merged_delta,
    to_matrix,
)
from fedsilo.models.metrics import SegmentationScores, dice_and_hd95, hd95_pixels, to_labels
# The function pretrain() stays in fedsilo.models.pretrain: exported here it would shadow that module.
from fedsilo.models.pretrain import PRETRAIN_DOMAIN, PretrainConfig, load_base_checkpoint, save_checkpoint
from fedsilo.models.rdn import Normalized, RandomNormalized, channel_stats
from fedsilo.models.registry import (
    UNETR_PATCH,
    Architecture,
    ModelConfig,
    Norm,
    build_model,
    local_parameter_names,
    model_fingerprint,
    parameter_count,
)
from fedsilo.models.synthetic import (
    UNSEEN_DOMAIN,
    DomainStyle,
    SyntheticConfig,
    domain_style,
    silo_splits,
    unseen_domain,
)
from fedsilo.models.training import EvalResult, Optimizer, TrainConfig, TrainResult, evaluate, train_local

__all__ = [
    "PRETRAIN_DOMAIN",
    "UNETR_PATCH",
    "UNSEEN_DOMAIN",
    "Architecture",
    "DomainStyle",
    "EvalResult",
    "FolderConfig",
    "LoraLayer",
    "LoraSettings",
    "ModelConfig",
    "Norm",
    "Normalized",
    "Optimizer",
    "PretrainConfig",
    "RandomNormalized",
    "SegmentationDataset",
    "SegmentationScores",
    "SiloSplits",
    "SyntheticConfig",
    "TrainConfig",
    "TrainResult",
    "add_lora",
    "build_lora_model",
    "build_model",
    "channel_stats",
    "default_target_modules",
    "dice_and_hd95",
    "domain_style",
    "evaluate",
    "from_matrix",
    "hd95_pixels",
    "load_base_checkpoint",
    "load_folder",
    "local_parameter_names",
    "lora_layers",
    "lora_parameter_names",
    "merged_delta",
    "model_fingerprint",
    "parameter_count",
    "save_checkpoint",
    "silo_splits",
    "to_labels",
    "to_matrix",
    "train_local",
    "unseen_domain",
]
