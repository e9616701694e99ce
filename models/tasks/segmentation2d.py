"""The "segmentation-2d" Task: binary/multi-class 2-D segmentation with Dice and HD95 (the first Task).

It wraps the existing code unchanged: the built-in multi-domain generator
(:mod:`fedsilo.models.synthetic`), the PNG/NIfTI folder and datalist loader
(:mod:`fedsilo.models.folder`), the MONAI networks (:mod:`fedsilo.models.registry`), DiceCE
training (:mod:`fedsilo.models.training`) and Dice/HD95 (:mod:`fedsilo.models.metrics`). Its
results are those of the direct calls, bit for bit. torch and those modules load on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedsilo.models.tasks.base import DataSpec, SiloData, Task, parsed_config, pooled, register_task

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from fedsilo.models.registry import ModelConfig

__all__ = ["Segmentation2D"]


@register_task
class Segmentation2D(Task):
    """2-D segmentation of one structure (or a few classes) across scanner domains.

    * Data: ``builtin`` is :func:`~fedsilo.models.synthetic.silo_splits` of
      ``SyntheticConfig(seed=spec.seed, **spec.options)`` for domain ``spec.domain``;
      ``folder`` is :func:`~fedsilo.models.folder.load_folder` of
      ``FolderConfig(path=spec.path, seed=spec.seed, **spec.options)``. Examples are
      ``(image float32 [C, H, W], mask int64 [1, H, W])``.
    * Unseen domain: built-in, the generator's held-out scanner style
      (:func:`~fedsilo.models.synthetic.unseen_domain`); folder, every image of
      ``spec.unseen_path`` (all three of its splits, loaded with the silo's options).
    * Model: :class:`~fedsilo.models.registry.ModelConfig` (UNet or UNETR), ``[N, K, H, W]`` logits.
    * Loss: MONAI ``DiceCELoss(softmax=True, to_onehot_y=True)``.
    * Metrics: mean per-image Dice (headline) and HD95 in pixels (lower is better).

    ``seg2d`` is an alias of its name (``--task seg2d``, ``task = "seg2d"``): ``get_task("seg2d").name``
    is ``segmentation-2d``, the name ``fedsilo demo`` and ``fedsilo bench`` record.
    """

    name = "segmentation-2d"
    aliases = ("seg2d",)
    summary = "2-D image segmentation (UNet/UNETR, DiceCE loss) scored by Dice and HD95"
    metric_names = ("dice", "hd95")
    headline_metric = "dice"
    lower_is_better = frozenset({"hd95"})
    unseen_domain = ("built-in: a scanner style no silo holds (domain -1 of the generator); "
                     "folder: every image of data.unseen_path")
    data_sources = ("builtin", "folder")

    def __init__(self) -> None:
        """Creates the Task; the loss module is built on first use."""
        self._loss_module: Any = None

    def read_data(self, spec: DataSpec) -> SiloData:
        """Loads the built-in domain ``spec.domain`` or the folder ``spec.path`` (see the class doc).

        Args:
            spec: The validated data spec.

        Returns:
            The silo's splits and unseen domain (None for a folder without ``unseen_path``).

        Raises:
            ValueError: On bad options.
            FileNotFoundError: If a folder does not exist.
            OSError: If a file cannot be read.
        """
        if spec.source == "builtin":
            from fedsilo.models.synthetic import SyntheticConfig, silo_splits, unseen_domain

            scfg = SyntheticConfig.from_mapping({"seed": spec.seed, **spec.options})
            return SiloData(splits=silo_splits(scfg, spec.domain), unseen=unseen_domain(scfg))
        from fedsilo.models.folder import FolderConfig, load_folder

        fcfg = FolderConfig.from_mapping({"path": str(spec.path), "seed": spec.seed, **spec.options})
        unseen = None
        if spec.unseen_path is not None:
            unseen = pooled(load_folder(FolderConfig.from_mapping({**fcfg.to_mapping(),
                                                                  "path": str(spec.unseen_path)})))
        return SiloData(splits=load_folder(fcfg), unseen=unseen)

    def model_config(self, config: Mapping[str, Any] | ModelConfig) -> ModelConfig:
        """Parses a :class:`~fedsilo.models.registry.ModelConfig` (a parsed one is returned as is).

        Raises:
            ValueError: Naming a bad or unknown key.
        """
        from fedsilo.models.registry import ModelConfig

        return parsed_config(config, ModelConfig)

    def build_model(self, config: Mapping[str, Any] | ModelConfig) -> nn.Module:
        """:func:`fedsilo.models.registry.build_model` of the parsed config.

        Raises:
            ValueError: On a bad config.
        """
        from fedsilo.models.registry import build_model

        return build_model(self.model_config(config))

    def collate(self, dataset: Dataset[Any], indices: Sequence[int], device: torch.device) -> tuple[Any, Any]:
        """:func:`fedsilo.models.training.stack_batch`: float32 images ``[B, C, H, W]``, int64 masks ``[B, 1, H, W]``."""
        from fedsilo.models.training import stack_batch

        return stack_batch(dataset, indices, device)

    def loss(self, output: Any, target: Any) -> torch.Tensor:
        """MONAI ``DiceCELoss(softmax=True, to_onehot_y=True)`` of logits ``[B, K, H, W]`` and masks ``[B, 1, H, W]``."""
        if self._loss_module is None:
            from monai.losses import DiceCELoss

            self._loss_module = DiceCELoss(softmax=True, to_onehot_y=True)
        return self._loss_module(output, target)

    def evaluate(self, model: nn.Module, dataset: Dataset[Any], *, batch_size: int = 16) -> dict[str, tuple[float, int]]:
        """:func:`fedsilo.models.training.evaluate`: ``{"dice": (mean Dice, n), "hd95": (mean HD95, n)}``.

        Raises:
            ValueError: On an empty dataset or a bad batch size.
        """
        from fedsilo.models.training import evaluate

        res = evaluate(model, dataset, batch_size=batch_size)
        return {"dice": (res.dice, res.n), "hd95": (res.hd95, res.n)}
