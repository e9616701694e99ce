"""The "segmentation-3d" Task: volumetric segmentation (3-D UNet, DiceCE) scored by Dice and HD95 in millimetres."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsilo.core.validators import MappingConfig, check_float, check_int, check_seed
from fedsilo.models.unet_shape import check_unet_shape
from fedsilo.models.tasks.base import DataSpec, SiloData, Task, pooled, register_task

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

__all__ = ["Segmentation3D", "UNet3DConfig"]


@dataclass(frozen=True, kw_only=True)
class UNet3DConfig(MappingConfig):
    """The 3-D network: MONAI ``UNet(spatial_dims=3)`` with InstanceNorm (no BatchNorm: DP-SGD needs per-sample gradients).

    With the defaults it has 0.1 M parameters; an epoch of 8 built-in 32³ volumes takes about a
    second on one CPU thread.

    Attributes:
        in_channels: Input image channels.
        out_channels: Classes, background included (softmax output, >= 2).
        channels: Feature channels per level, top to bottom (>= 2 levels).
        strides: Down-sampling stride between levels; one fewer than ``channels``. The patch
            side must be divisible by their product.
        num_res_units: Residual units per block (0: plain convolutions).
        dropout: Dropout probability in [0, 1).
        seed: Seed of the initial weights.
        sw_batch_size: Patches per forward pass of the sliding-window evaluation (>= 1).
        sw_overlap: Overlap of neighbouring windows, in [0, 1).
    """

    in_channels: int = 1
    out_channels: int = 2
    channels: tuple[int, ...] = (8, 16, 32)
    strides: tuple[int, ...] = (2, 2)
    num_res_units: int = 1
    dropout: float = 0.0
    seed: int = 0
    sw_batch_size: int = 2
    sw_overlap: float = 0.25

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_unet_shape(owner, self)
        check_float(owner, "dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
        check_seed(owner, "seed", self.seed)
        check_int(owner, "sw_batch_size", self.sw_batch_size, minimum=1)
        check_float(owner, "sw_overlap", self.sw_overlap, low=0.0, high=1.0, high_inclusive=False)


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
    * Model: :class:`UNet3DConfig`, ``[N, K, D, H, W]`` logits.
    * Loss: MONAI ``DiceCELoss(softmax=True, to_onehot_y=True)`` (Dice: Milletari et al. 2016).
    * Metrics: per-volume Dice (headline) and HD95 in mm (lower is better), predictions by
      sliding-window inference over volumes larger than the patch.
    """

    name = "segmentation-3d"
    summary = "3-D volume segmentation (3-D UNet, DiceCE loss) scored by Dice and HD95 in mm"
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
        if isinstance(config, UNet3DConfig):
            return config
        if not isinstance(config, Mapping):
            raise ValueError(f"model config must be a mapping or a UNet3DConfig, got {type(config).__name__}")
        return UNet3DConfig.from_mapping(config)

    def default_model_config(self, seed: int = 0) -> dict[str, Any]:
        """The default UNet with initial weights from the run's seed."""
        return {"seed": seed}

    def build_model(self, config: Mapping[str, Any] | UNet3DConfig) -> nn.Module:
        """MONAI ``UNet(spatial_dims=3, norm=INSTANCE (affine))`` with weights from ``seed``.

        Raises:
            ValueError: On a bad config.
        """
        from monai.networks.nets import UNet

        from fedsilo.core.rng import seeded_global_rng

        cfg = self.model_config(config)
        with seeded_global_rng(cfg.seed):
            model = UNet(spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                         channels=cfg.channels, strides=cfg.strides, num_res_units=cfg.num_res_units,
                         norm=("instance", {"affine": True}), dropout=cfg.dropout)
        # read by evaluate (a wrapper that hides them, e.g. LoRA's, scores with the defaults)
        model.sw_batch_size = cfg.sw_batch_size  # type: ignore[assignment]
        model.sw_overlap = cfg.sw_overlap  # type: ignore[assignment]
        return model.train()

    def collate(self, dataset: Dataset[Any], indices: Sequence[int], device: torch.device) -> tuple[Any, Any]:
        """:func:`~fedsilo.models.volumes.collate_patches`: ``[B, C, P, P, P]`` patches and ``[B, 1, P, P, P]`` labels."""
        from fedsilo.models.volumes import collate_patches

        return collate_patches(dataset, indices, device)

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
            ValueError: On an empty dataset or a bad batch size.
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
