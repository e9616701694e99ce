"""The "segmentation-3d" Task (alias "seg3d"): volumetric segmentation (3-D UNet or SwinUNETR, DiceCE)
scored by Dice and HD95 in millimetres."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsilo.core.validators import MappingConfig, check_enum, check_float, check_int, check_seed
from fedsilo.models.unet_shape import check_unet_shape
from fedsilo.models.tasks.base import DataSpec, SiloData, Task, parsed_config, pooled, register_task

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

__all__ = ["SWIN_DP_REFUSAL", "SWIN_INPUT_MULTIPLE", "SWIN_NORM_GROUPS", "Architecture3D", "Segmentation3D",
           "UNet3DConfig"]

#: SwinUNETR: every side of its input must be a multiple of this (2-voxel tokens, merged four times: 2**5).
SWIN_INPUT_MULTIPLE = 32
#: SwinUNETR: GroupNorm groups of its convolutional blocks; they divide every width (multiples of
#: ``feature_size``, itself a multiple of 12). InstanceNorm cannot be used: a 32³ patch leaves one
#: voxel at the bottleneck, which InstanceNorm refuses to normalise in training.
SWIN_NORM_GROUPS = 12

#: Why SwinUNETR is refused under record-level DP (see :meth:`Segmentation3D.build_model`).
SWIN_DP_REFUSAL = (
    "architecture = 'swinunetr' cannot be trained with DP-SGD (a record-level privacy plan): its windowed "
    "attention folds the windows of every example into the batch dimension, so Opacus' per-sample gradients "
    "of the attention layers would be per window, not per example (and its relative-position table sits "
    "in a layer with buffers, which Opacus refuses); use architecture = 'unet' under record-level DP")


class Architecture3D(enum.Enum):
    """The network of the 3-D Task."""

    UNET = "unet"  # MONAI UNet(spatial_dims=3), InstanceNorm
    SWINUNETR = "swinunetr"  # MONAI SwinUNETR: a Swin transformer encoder with a convolutional decoder


@dataclass(frozen=True, kw_only=True)
class UNet3DConfig(MappingConfig):
    """The 3-D network: MONAI ``UNet(spatial_dims=3)`` with InstanceNorm (no BatchNorm: DP-SGD needs
    per-sample gradients), or MONAI ``SwinUNETR`` (Hatamizadeh et al. 2022) with GroupNorm.

    With the defaults the UNet has 0.1 M parameters; an epoch of 8 built-in 32³ volumes takes about a
    second on one CPU thread. ``channels``, ``strides`` and ``num_res_units`` shape the UNet only;
    ``feature_size`` and ``window_size`` shape SwinUNETR only (each architecture ignores the other's,
    which are still validated). SwinUNETR is built from code (no pretrained weights are downloaded);
    with ``feature_size = 12`` it has 4.1 M parameters. It needs patches whose sides are multiples of
    :data:`SWIN_INPUT_MULTIPLE` (32: data option ``size`` of the built-in data, ``patch_size`` of a
    folder), which the Task checks on the first batch, and it cannot be trained under record-level DP
    (DP-SGD): building the DP-SGD model refuses it (:data:`SWIN_DP_REFUSAL`).

    Attributes:
        architecture: ``"unet"`` (default) or ``"swinunetr"``.
        in_channels: Input image channels.
        out_channels: Classes, background included (softmax output, >= 2).
        channels: UNet: feature channels per level, top to bottom (>= 2 levels).
        strides: UNet: down-sampling stride between levels; one fewer than ``channels``. The patch
            side must be divisible by their product.
        num_res_units: UNet: residual units per block (0: plain convolutions).
        dropout: Dropout probability in [0, 1) (SwinUNETR: inside the transformer).
        seed: Seed of the initial weights.
        sw_batch_size: Patches per forward pass of the sliding-window evaluation (>= 1).
        sw_overlap: Overlap of neighbouring windows, in [0, 1).
        feature_size: SwinUNETR: embedding width of the first stage (later stages have 2x, 4x, 8x;
            the decoder's top level has it); a multiple of 12 (its 3/6/12/24 attention heads and
            :data:`SWIN_NORM_GROUPS` must divide every width).
        window_size: SwinUNETR: side of the local attention windows, in tokens (>= 1).
    """

    architecture: Architecture3D = Architecture3D.UNET
    in_channels: int = 1
    out_channels: int = 2
    channels: tuple[int, ...] = (8, 16, 32)
    strides: tuple[int, ...] = (2, 2)
    num_res_units: int = 1
    dropout: float = 0.0
    seed: int = 0
    sw_batch_size: int = 2
    sw_overlap: float = 0.25
    feature_size: int = 12
    window_size: int = 7

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_enum(owner, "architecture", self.architecture, Architecture3D)
        check_unet_shape(owner, self)
        check_float(owner, "dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
        check_seed(owner, "seed", self.seed)
        check_int(owner, "sw_batch_size", self.sw_batch_size, minimum=1)
        check_float(owner, "sw_overlap", self.sw_overlap, low=0.0, high=1.0, high_inclusive=False)
        check_int(owner, "feature_size", self.feature_size, minimum=12)
        if self.feature_size % 12:
            raise ValueError(f"{owner}.feature_size must be a multiple of 12 (SwinUNETR's attention heads and "
                             f"GroupNorm groups divide it), got {self.feature_size}")
        check_int(owner, "window_size", self.window_size, minimum=1)

    @property
    def input_multiple(self) -> int:
        """Every side of the network's input (a training patch, a sliding window) must be a multiple of this."""
        if self.architecture is Architecture3D.SWINUNETR:
            return SWIN_INPUT_MULTIPLE
        return math.prod(self.strides)


def _check_patch(model: nn.Module, spatial: Sequence[int]) -> None:
    """Raises ValueError naming the patch unless every side of ``spatial`` is a multiple of the
    ``input_multiple`` that :meth:`Segmentation3D.build_model` put on ``model`` (none: no check)."""
    multiple = getattr(model, "input_multiple", None)
    if isinstance(multiple, int) and multiple > 1 and any(int(side) % multiple for side in spatial):
        raise ValueError(
            f"patch {tuple(int(side) for side in spatial)}: every side must be a multiple of {multiple} for this "
            f"network (SwinUNETR: {SWIN_INPUT_MULTIPLE}; UNet: the product of its strides); set the data option "
            f"size (built-in data) or patch_size (folder) to a multiple of {multiple}")


_REFUSAL_ATTR = "_fedsilo_dp_refusal"


def _refuse_dp_sgd_for_swin(model: nn.Module) -> None:
    """Makes Opacus refuse ``model`` (a SwinUNETR) with :data:`SWIN_DP_REFUSAL`.

    Registers (once) an Opacus validator for MONAI's ``WindowAttention`` that reports the refusal
    of the first attention layer of ``model`` (marked here; once, not once per layer). Opacus itself
    refuses those layers too (a trainable layer with buffers), in terms that do not say why.
    ``make_private_compatible`` and ``DpSgdStep`` run Opacus' validators, so every record-level DP
    path refuses the model with this message first.
    """
    from monai.networks.nets.swin_unetr import WindowAttention
    from opacus.validators import ModuleValidator, register_module_validator
    from opacus.validators.errors import UnsupportedModuleError

    if WindowAttention not in ModuleValidator.VALIDATORS:

        def refuse(module: nn.Module) -> list[UnsupportedModuleError]:
            reason = getattr(module, _REFUSAL_ATTR, None)
            return [UnsupportedModuleError(reason)] if reason else []

        register_module_validator(WindowAttention)(refuse)
    first = next(m for m in model.modules() if isinstance(m, WindowAttention))
    setattr(first, _REFUSAL_ATTR, SWIN_DP_REFUSAL)


@register_task
class Segmentation3D(Task):
    """3-D segmentation of an organ across scanners with their own intensities and voxel spacings.

    * Data: ``builtin`` is :func:`~fedsilo.models.synthetic3d.silo_volumes` of
      ``Synthetic3DConfig(seed=spec.seed, **spec.options)`` (options ``size``, ``n_train``,
      ``n_val``, ``n_test``); ``folder`` is :func:`~fedsilo.models.folder3d.load_folder3d` of
      ``Folder3DConfig(path=spec.path, seed=spec.seed, **spec.options)`` (NIfTI, RAS, optional
      target spacing, CT window or MR percentiles, balanced random crops for training).
      Examples are ``(image float32 [C, D, H, W], label int64 [1, D, H, W])`` with a spacing in mm.
    * Unseen domain: built-in, a held-out scanner (isotropic 1.25 mm, other intensities);
      folder, every case of ``spec.unseen_path``.
    * Model: :class:`UNet3DConfig`, ``[N, K, D, H, W]`` logits: a 3-D UNet, or with
      ``architecture = "swinunetr"`` MONAI's SwinUNETR (``feature_size`` a multiple of 12, patches
      a multiple of 32; not under record-level DP, whose per-sample gradients it cannot give).
    * Loss: MONAI ``DiceCELoss(softmax=True, to_onehot_y=True)`` (Dice: Milletari et al. 2016).
    * Metrics: per-volume Dice (headline) and HD95 in mm (lower is better), predictions by
      sliding-window inference over volumes larger than the patch.

    ``seg3d`` is an alias of its name (``fedsilo demo --task seg3d``, ``task = "seg3d"``):
    ``get_task("seg3d").name`` is ``segmentation-3d``, the name ``fedsilo demo`` and ``fedsilo bench`` record.
    """

    name = "segmentation-3d"
    aliases = ("seg3d",)
    summary = "3-D volume segmentation (3-D UNet or SwinUNETR, DiceCE loss) scored by Dice and HD95 in mm"
    metric_names = ("dice", "hd95")
    headline_metric = "dice"
    lower_is_better = frozenset({"hd95"})
    unseen_domain = ("built-in: a scanner no silo holds (isotropic 1.25 mm voxels, other intensities); "
                     "folder: every case of data.unseen_path")
    data_sources = ("builtin", "folder")
    spatial_dims = 3

    def __init__(self) -> None:
        """Creates the Task; the loss module is built on first use."""
        self._loss_module: Any = None

    def read_data(self, spec: DataSpec) -> SiloData:
        """Loads the built-in domain ``spec.domain`` or the folder ``spec.path`` (see the class doc).

        Raises:
            ValueError: On bad options.
            FileNotFoundError: If a folder, datalist or listed file does not exist.
        """
        if spec.source == "builtin":
            from fedsilo.models.synthetic3d import Synthetic3DConfig, silo_volumes, unseen_volumes

            scfg = Synthetic3DConfig.from_mapping({"seed": spec.seed, **spec.options})
            return SiloData(splits=silo_volumes(scfg, spec.domain), unseen=unseen_volumes(scfg))
        from fedsilo.models.folder3d import Folder3DConfig, load_folder3d

        fcfg = Folder3DConfig.from_mapping({"path": str(spec.path), "seed": spec.seed, **spec.options})
        unseen = None
        if spec.unseen_path is not None:
            unseen = pooled(load_folder3d(Folder3DConfig.from_mapping({**fcfg.to_mapping(),
                                                                      "path": str(spec.unseen_path)})))
        return SiloData(splits=load_folder3d(fcfg), unseen=unseen)

    def model_config(self, config: Mapping[str, Any] | UNet3DConfig) -> UNet3DConfig:
        """Parses a :class:`UNet3DConfig` (a parsed one is returned as is).

        Raises:
            ValueError: Naming a bad or unknown key.
        """
        return parsed_config(config, UNet3DConfig)

    def default_model_config(self, seed: int = 0) -> dict[str, Any]:
        """The default UNet with initial weights from the run's seed."""
        return {"seed": seed}

    def build_model(self, config: Mapping[str, Any] | UNet3DConfig) -> nn.Module:
        """The network of ``architecture`` with weights from ``seed``.

        * ``unet``: MONAI ``UNet(spatial_dims=3, norm=INSTANCE (affine))``;
        * ``swinunetr``: MONAI ``SwinUNETR(spatial_dims=3)`` (2-voxel tokens, depths 2/2/2/2, heads
          3/6/12/24) with ``GroupNorm(SWIN_NORM_GROUPS)`` in its convolutional blocks. Building one
          also registers with Opacus the refusal of its attention layers (:data:`SWIN_DP_REFUSAL`),
          so a record-level DP plan refuses it when it makes the model DP-SGD compatible.

        Raises:
            ValueError: On a bad config.
        """
        from fedsilo.core.rng import seeded_global_rng

        cfg = self.model_config(config)
        model: nn.Module
        if cfg.architecture is Architecture3D.SWINUNETR:
            from monai.networks.nets import SwinUNETR

            with seeded_global_rng(cfg.seed):
                model = SwinUNETR(in_channels=cfg.in_channels, out_channels=cfg.out_channels, spatial_dims=3,
                                  feature_size=cfg.feature_size, window_size=cfg.window_size,
                                  norm_name=("group", {"num_groups": SWIN_NORM_GROUPS, "affine": True}),
                                  drop_rate=cfg.dropout)
            _refuse_dp_sgd_for_swin(model)
        else:
            from monai.networks.nets import UNet

            with seeded_global_rng(cfg.seed):
                model = UNet(spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                             channels=cfg.channels, strides=cfg.strides, num_res_units=cfg.num_res_units,
                             norm=("instance", {"affine": True}), dropout=cfg.dropout)
        # read by evaluate and forward (a wrapper that hides them, e.g. LoRA's, scores with the defaults)
        model.sw_batch_size = cfg.sw_batch_size  # type: ignore[assignment]
        model.sw_overlap = cfg.sw_overlap  # type: ignore[assignment]
        model.input_multiple = cfg.input_multiple  # type: ignore[assignment]
        return model.train()

    def collate(self, dataset: Dataset[Any], indices: Sequence[int], device: torch.device) -> tuple[Any, Any]:
        """:func:`~fedsilo.models.volumes.collate_patches`: ``[B, C, P, P, P]`` patches and ``[B, 1, P, P, P]`` labels."""
        from fedsilo.models.volumes import collate_patches

        return collate_patches(dataset, indices, device)

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """``model(inputs)``, after checking the patch against the network (see :meth:`evaluate`).

        Raises:
            ValueError: Naming the patch if a side is not a multiple of the network's
                ``input_multiple`` (SwinUNETR: 32; UNet: the product of its strides).
        """
        _check_patch(model, inputs.shape[2:])
        return model(inputs)

    def loss(self, output: Any, target: Any) -> torch.Tensor:
        """MONAI ``DiceCELoss(softmax=True, to_onehot_y=True)`` of logits ``[B, K, D, H, W]`` and labels ``[B, 1, D, H, W]``."""
        if self._loss_module is None:
            from monai.losses import DiceCELoss

            self._loss_module = DiceCELoss(softmax=True, to_onehot_y=True)
        return self._loss_module(output, target)

    def evaluate(self, model: nn.Module, dataset: Dataset[Any], *, batch_size: int = 16) -> dict[str, tuple[float, int]]:
        """Mean per-volume Dice and HD95 (mm, at each volume's spacing) of the argmax prediction.

        Each whole volume is predicted by MONAI ``sliding_window_inference`` with the dataset's
        patch as ROI (a volume of the patch size is one window); scores are
        :func:`~fedsilo.models.volumes.dice_and_hd95_mm`. Volumes go one at a time, so
        ``batch_size`` changes nothing.

        Raises:
            ValueError: On an empty dataset, a bad batch size, or a patch that is not a multiple of
                the network's ``input_multiple``.
        """
        import torch
        from monai.inferers import sliding_window_inference

        from fedsilo.models.volumes import VolumeDataset, dice_and_hd95_mm, spacing_of

        check_int("evaluate", "batch_size", batch_size, minimum=1)
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        was_training = model.training
        model.eval()
        dice_sum = hd_sum = 0.0
        try:
            with torch.no_grad():
                for i in range(n):
                    image, label = dataset[i]
                    image = torch.as_tensor(image).as_subclass(torch.Tensor).to(device=device, dtype=torch.float32)
                    label = torch.as_tensor(label).as_subclass(torch.Tensor).to(torch.int64)
                    base = dataset
                    while not isinstance(base, VolumeDataset) and hasattr(base, "datasets"):
                        base = base.datasets[0]  # type: ignore[attr-defined]
                    patch = base.patch_size if isinstance(base, VolumeDataset) else int(image.shape[-1])
                    _check_patch(model, (patch,) * 3)
                    logits = sliding_window_inference(
                        image[None], roi_size=(patch,) * 3, sw_batch_size=int(getattr(model, "sw_batch_size", 2)),
                        predictor=model, overlap=float(getattr(model, "sw_overlap", 0.25)), mode="gaussian")
                    pred = torch.as_tensor(logits).argmax(dim=1)[0].cpu()
                    dice, hd = dice_and_hd95_mm(pred, label[0].cpu(), int(logits.shape[1]), spacing_of(dataset, i))
                    dice_sum += dice
                    hd_sum += hd
        finally:
            model.train(was_training)
        return {"dice": (dice_sum / n, n), "hd95": (hd_sum / n, n)}
