"""fedsilo.models: MONAI networks, their registry, built-in and folder datasets, training and metrics."""

from fedsilo.models.data import SegmentationDataset, SiloSplits
from fedsilo.models.folder import FolderConfig, load_folder
from fedsilo.models.metrics import SegmentationScores, dice_and_hd95, hd95_pixels, to_labels
from fedsilo.models.registry import (
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
    "UNSEEN_DOMAIN",
    "Architecture",
    "DomainStyle",
    "EvalResult",
    "FolderConfig",
    "ModelConfig",
    "Norm",
    "Optimizer",
    "SegmentationDataset",
    "SegmentationScores",
    "SiloSplits",
    "SyntheticConfig",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "dice_and_hd95",
    "domain_style",
    "evaluate",
    "hd95_pixels",
    "load_folder",
    "local_parameter_names",
    "model_fingerprint",
    "parameter_count",
    "silo_splits",
    "to_labels",
    "train_local",
    "unseen_domain",
]
