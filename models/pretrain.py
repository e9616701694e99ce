"""Base checkpoints for LoRA fine-tuning: pretraining on one built-in source domain or the user's own folder, saving and loading."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedsilo.core.validators import check_int, check_seed, config_from_mapping
from fedsilo.models.registry import Architecture, ModelConfig, build_model, model_fingerprint, parameter_count
from fedsilo.models.synthetic import SyntheticConfig, silo_splits
from fedsilo.models.training import TrainConfig, evaluate, train_local

__all__ = [
    "PRETRAIN_DOMAIN",
    "PretrainConfig",
    "load_base_checkpoint",
    "pretrain",
    "save_checkpoint",
]

#: Default source domain: beyond every silo of ``fedsilo demo`` (at most 16 silos, domains
#: 0-15), so the federation fine-tunes on scanners the base has never seen.
PRETRAIN_DOMAIN = 16


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """How to pretrain a base network on one domain of the built-in data.

    Attributes:
        model: The network to train (its ``seed`` gives the initial weights).
        training: Optimiser, learning rate, batch size and shuffling seed; ``local_epochs``
            is ignored (``epochs`` replaces it). All epochs share one optimiser.
        domain: Built-in source domain (>= 0). The default lies outside every demo silo's.
        epochs: Passes over the source training set (>= 1). The default takes a few seconds
            for the default UNet on one CPU thread.
        seed: Seed of the built-in data; use the federation's data seed so that domain
            indices mean the same scanners as there.
        image_size: Height and width of the images (>= 32); must equal ``model.image_size``
            for UNETR and be divisible by the product of ``model.strides`` for the UNet.
        n_train: Source training images (>= 1; built-in data).
        n_test: Source test images for the reported Dice (>= 1; built-in data).
        folder: The user's own data instead of a built-in domain: a folder of images/ + masks/
            (or a MONAI datalist JSON), read as a silo's ``[data] source = "folder"`` is, resized to
            ``image_size``; its test split gives the reported Dice. A base pretrained on data
            like the federation's (same anatomy and modality, none of the silos' patients) is
            what LoRA fine-tuning needs: a base from unrelated images can leave it stuck.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    domain: int = PRETRAIN_DOMAIN
    epochs: int = 30
    seed: int = 0
    image_size: int = 64
    n_train: int = 48
    n_test: int = 24
    folder: str | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.model, ModelConfig):
            raise ValueError(f"{owner}.model must be a ModelConfig, got {type(self.model).__name__}")
        if not isinstance(self.training, TrainConfig):
            raise ValueError(f"{owner}.training must be a TrainConfig, got {type(self.training).__name__}")
        check_int(owner, "domain", self.domain, minimum=0)
        check_int(owner, "epochs", self.epochs, minimum=1)
        check_seed(owner, "seed", self.seed)
        check_int(owner, "image_size", self.image_size, minimum=32)
        check_int(owner, "n_train", self.n_train, minimum=1)
        check_int(owner, "n_test", self.n_test, minimum=1)
        if self.folder is not None and (not isinstance(self.folder, str) or not self.folder):
            raise ValueError(f"{owner}.folder must be a folder or datalist path, got {self.folder!r}")
        if self.model.architecture is Architecture.UNETR and self.image_size != self.model.image_size:
            raise ValueError(
                f"{owner}.image_size={self.image_size} must equal model.image_size={self.model.image_size} for UNETR"
            )
        if self.model.architecture is Architecture.UNET2D:
            factor = math.prod(self.model.strides)
            if self.image_size % factor:
                raise ValueError(
                    f"{owner}.image_size={self.image_size} must be divisible by the product of "
                    f"model.strides ({factor})"
                )

    @property
    def data(self) -> SyntheticConfig:
        """The built-in data config of the source domain (no validation images)."""
        return SyntheticConfig(seed=self.seed, image_size=self.image_size, n_train=self.n_train, n_val=0,
                               n_test=self.n_test)

    @property
    def run_id(self) -> str:
        """The checkpoint's run id, ``pretrain-<domain>-<seed>`` (``pretrain-folder-<seed>`` on a folder)."""
        return f"pretrain-{'folder' if self.folder is not None else self.domain}-{self.seed}"

    def splits(self) -> Any:  # -> fedsilo.models.data.Splits
        """The training and test data: the built-in source domain, or the folder.

        Raises:
            ValueError: bad folder options, or a folder with no test images.
            FileNotFoundError: the folder does not exist.
        """
        if self.folder is None:
            return silo_splits(self.data, self.domain)
        from fedsilo.models.tasks import DataSpec, get_task

        data = get_task("segmentation-2d").load_data(DataSpec(source="folder", path=self.folder, seed=self.seed,
                                                             options={"image_size": self.image_size}))
        if not len(data.splits.train) or not len(data.splits.test):
            raise ValueError(f"folder {self.folder}: needs training and test images (it gave "
                             f"{len(data.splits.train)} and {len(data.splits.test)})")
        return data.splits

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> PretrainConfig:
        """Builds a config from plain TOML values; ``model`` and ``training`` are nested tables.

        Args:
            d: Mapping of field names to values; missing keys (also inside the nested tables)
                take the defaults.

        Returns:
            The validated config.

        Raises:
            ValueError: On an unknown key or a bad value; the message names the key.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"{cls.__name__}: expected a mapping (table), got {type(d).__name__}")
        values = dict(d)
        if "model" in values:
            values["model"] = ModelConfig.from_mapping(values["model"])
        if "training" in values:
            values["training"] = TrainConfig.from_mapping(values["training"])
        return config_from_mapping(cls, values)

    def to_mapping(self) -> dict[str, Any]:
        """Returns the plain TOML form; ``PretrainConfig.from_mapping(c.to_mapping()) == c``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_mapping() if hasattr(value, "to_mapping") else value
        return out


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Trains ``cfg.model`` from scratch on one built-in domain and returns its checkpoint.

    Deterministic: the same config gives bit-identical weights (same torch build). The
    checkpoint has the format that ``fedsilo export`` writes, so either can serve as the
    frozen base of a LoRA run (see :func:`load_base_checkpoint`):
    ``{"run_id": "pretrain-<domain>-<seed>", "round": 0, "fingerprint", "model_config",
    "state_dict", "pretrain": {...}}``, where ``fingerprint`` identifies the initial network
    (as in an agent's state) and ``pretrain`` holds ``domain``, ``epochs``, ``seed``, the test
    ``dice`` and ``hd95`` on the source domain, ``n_test``, ``train_loss``, ``parameters``
    (trainable count) and the whole ``config`` mapping.

    Args:
        cfg: What to train, on which domain, for how long.

    Returns:
        The checkpoint (CPU tensors; plain Python values otherwise).

    Raises:
        ValueError: If ``cfg`` is not a PretrainConfig, or its folder has no usable data.
        FileNotFoundError: If its folder does not exist.
    """
    if not isinstance(cfg, PretrainConfig):
        raise ValueError(f"pretrain needs a PretrainConfig, got {type(cfg).__name__}")
    splits = cfg.splits()
    model = build_model(cfg.model)
    fingerprint = model_fingerprint(model)
    result = train_local(model, splits.train, dataclasses.replace(cfg.training, local_epochs=cfg.epochs),
                         round_index=0)
    scores = evaluate(model, splits.test)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    return {
        "run_id": cfg.run_id,
        "round": 0,
        "fingerprint": fingerprint,
        "model_config": cfg.model.to_mapping(),
        "state_dict": state,
        "pretrain": {
            "domain": None if cfg.folder is not None else cfg.domain,
            "folder": cfg.folder,
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "dice": scores.dice,
            "hd95": scores.hd95,
            "n_test": scores.n,
            "train_loss": result.loss,
            "parameters": parameter_count(model),
            "config": cfg.to_mapping(),
        },
    }


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> Path:
    """Writes a checkpoint with ``torch.save``, atomically (old file or whole new one).

    Args:
        checkpoint: E.g. the result of :func:`pretrain`.
        path: Output file; its folder is created.

    Returns:
        The path written.

    Raises:
        OSError: If the file cannot be written.
    """
    from fedsilo.core.atomic import atomic_write_with

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = dict(checkpoint)
    atomic_write_with(out, lambda f: torch.save(data, f))
    return out


def _differences(got: ModelConfig, want: ModelConfig) -> str:
    diffs = [
        f"{f.name}={getattr(got, f.name)!r} (expected {getattr(want, f.name)!r})"
        for f in dataclasses.fields(want)
        if getattr(got, f.name) != getattr(want, f.name)
    ]
    return ", ".join(diffs)


def load_base_checkpoint(path: str | Path, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Reads a base checkpoint (from :func:`pretrain` or ``fedsilo export``) for ``model_cfg``.

    Loads with ``torch.load(weights_only=True)`` onto the CPU and checks that the checkpoint
    was made for exactly ``model_cfg`` (its ``model_config`` mapping, defaults filled in) and
    that its state dict has exactly the keys and shapes of ``build_model(model_cfg)``, so it
    loads with ``load_state_dict(strict=True)`` into the plain network (before LoRA is added).

    Args:
        path: The checkpoint file.
        model_cfg: The run's model config.

    Returns:
        The state dict (name -> tensor).

    Raises:
        OSError: If the file cannot be read.
        ValueError: If the file is not such a checkpoint, or was made for another network.
    """
    import pickle

    if not isinstance(model_cfg, ModelConfig):
        raise ValueError(f"model_cfg must be a ModelConfig, got {type(model_cfg).__name__}")
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable torch checkpoint: {exc}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a fedsilo checkpoint (needs 'model_config' and 'state_dict')")
    try:
        got = ModelConfig.from_mapping(ckpt["model_config"])
    except ValueError as exc:
        raise ValueError(f"{path}: bad model_config: {exc}") from None
    if got != model_cfg:
        raise ValueError(f"{path} was made for another model config: {_differences(got, model_cfg)}")
    state = ckpt["state_dict"]
    expected = build_model(model_cfg).state_dict()
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        extra = sorted(set(state) - set(expected))[:3]
        hint = " (a LoRA model's state? export the plain base network)" if any("lora_" in k for k in state) else ""
        raise ValueError(f"{path}: state_dict keys do not fit the network: missing {missing}, unexpected {extra}{hint}")
    for key, ref in expected.items():
        t = state[key]
        if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{path}: {key} has shape {shape}, the network needs {tuple(ref.shape)} {ref.dtype}")
    return dict(state)
