"""Model registry: the network config, its deterministic builder, fingerprint and FedBN-local names."""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedsilo.core.rng import seeded_global_rng
from fedsilo.models.pn import PopulationNorm, pn_norm_spec
from fedsilo.models.unet_shape import check_unet_shape
from fedsilo.core.validators import (
    MappingConfig,
    check_enum,
    check_float,
    check_int,
    check_seed,
)

__all__ = [
    "UNETR_PATCH",
    "Architecture",
    "ModelConfig",
    "Norm",
    "build_model",
    "local_parameter_names",
    "model_fingerprint",
    "parameter_count",
]


#: Patch size (pixels per side) of the ViT inside MONAI's UNETR; fixed by MONAI.
UNETR_PATCH = 16


class Norm(enum.Enum):
    """Normalisation layer of the network.

    BatchNorm is deliberately absent: its running statistics mix samples, which breaks the
    per-sample gradients that DP-SGD needs. All three normalise each example on its own.
    """

    INSTANCE = "instance"
    GROUP = "group"
    #: Population Normalization (Wang et al., CVPR 2025; :class:`~fedsilo.models.pn.PopulationNorm`):
    #: per-channel mean and variance are trained parameters, shared by FedAvg like every weight.
    PN = "pn"


class Architecture(enum.Enum):
    """Network architectures that :func:`build_model` knows how to build."""

    UNET2D = "unet2d"
    UNETR = "unetr"  # MONAI UNETR (2-D): a ViT encoder with a convolutional decoder


@dataclass(frozen=True, kw_only=True)
class ModelConfig(MappingConfig):
    """Everything needed to build the same network, with the same initial weights, anywhere.

    ``channels``, ``strides`` and ``num_res_units`` shape ``Architecture.UNET2D`` only;
    ``image_size``, ``feature_size``, ``hidden_size``, ``mlp_dim`` and ``num_heads`` shape
    ``Architecture.UNETR`` only (the other architecture ignores them). The remaining fields
    apply to both. With the defaults, the UNet has 52 k parameters and UNETR (12 transformer
    layers on 4x4 patches of 16 pixels, decoder without residual blocks) 1.83 M; an epoch of
    48 built-in 64x64 images takes about 0.2 s and 1-2 s respectively on one CPU thread.

    Attributes:
        architecture: Which network to build.
        in_channels: Number of input image channels.
        out_channels: Number of output classes, background included (softmax output, >= 2).
        channels: Feature channels of each UNet level, top to bottom.
        strides: Down-sampling stride between consecutive levels; one fewer than ``channels``.
            Input height and width must be divisible by the product of the strides.
        num_res_units: Residual units per block (0 for plain convolutions).
        norm: Normalisation layer (always with a learnable affine), in every convolutional block
            (UNETR: of its decoder; its transformer keeps LayerNorm).
        norm_groups: Groups of GroupNorm; must divide every entry of ``channels`` and
            ``out_channels`` (UNet), or ``feature_size`` (UNETR). Ignored for ``Norm.INSTANCE``
            and ``Norm.PN``.
        dropout: Dropout probability in [0, 1) (UNETR: inside the transformer).
        seed: Seed of the initial weights; same config gives bit-identical weights.
        image_size: UNETR: height and width of the (square) input, a multiple of the ViT's
            16-pixel patch; the network accepts only this size.
        feature_size: UNETR: channels of the top decoder level (levels below have 2x, 4x, 8x).
        hidden_size: UNETR: width of the 12 transformer layers (MONAI fixes the depth).
        mlp_dim: UNETR: hidden width of each transformer layer's MLP.
        num_heads: UNETR: attention heads; must divide ``hidden_size``.
    """

    architecture: Architecture = Architecture.UNET2D
    in_channels: int = 1
    out_channels: int = 2
    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    norm: Norm = Norm.INSTANCE
    norm_groups: int = 2
    dropout: float = 0.0
    seed: int = 0
    image_size: int = 64
    feature_size: int = 16
    hidden_size: int = 96
    mlp_dim: int = 192
    num_heads: int = 4

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_enum(owner, "architecture", self.architecture, Architecture)
        check_unet_shape(owner, self)
        check_enum(owner, "norm", self.norm, Norm)
        check_int(owner, "norm_groups", self.norm_groups, minimum=1)
        if self.norm is Norm.GROUP and self.architecture is Architecture.UNET2D:
            for width in (*self.channels, self.out_channels):
                if width % self.norm_groups:
                    raise ValueError(
                        f"{owner}.norm_groups={self.norm_groups} must divide every entry of channels "
                        f"{self.channels!r} and out_channels={self.out_channels}"
                    )
        check_float(owner, "dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
        check_seed(owner, "seed", self.seed)
        check_int(owner, "image_size", self.image_size, minimum=UNETR_PATCH)
        for name in ("feature_size", "hidden_size", "mlp_dim", "num_heads"):
            check_int(owner, name, getattr(self, name), minimum=1)
        if self.architecture is Architecture.UNETR:
            if self.image_size % UNETR_PATCH:
                raise ValueError(
                    f"{owner}.image_size must be a multiple of the UNETR patch size {UNETR_PATCH}, "
                    f"got {self.image_size}"
                )
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"{owner}.num_heads={self.num_heads} must divide hidden_size={self.hidden_size}"
                )
            if self.norm is Norm.GROUP and self.feature_size % self.norm_groups:
                raise ValueError(
                    f"{owner}.norm_groups={self.norm_groups} must divide feature_size={self.feature_size}"
                )



def _norm_spec(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """The MONAI norm spec of ``cfg.norm`` (PN: registered in MONAI's ``Norm`` factory on first use)."""
    if cfg.norm is Norm.INSTANCE:
        return ("instance", {"affine": True})
    if cfg.norm is Norm.PN:
        return pn_norm_spec()
    return ("group", {"num_groups": cfg.norm_groups, "affine": True})


def _build_unet2d(cfg: ModelConfig) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
        norm=_norm_spec(cfg),
        dropout=cfg.dropout,
    )


def _build_unetr(cfg: ModelConfig) -> nn.Module:
    try:
        import einops  # noqa: F401  (MONAI's attention blocks need it; MONAI imports it lazily)
    except ImportError as exc:  # pragma: no cover - einops is part of the agent extra
        raise ValueError("Architecture.UNETR needs the einops package (pip install 'fedsilo[agent]')") from exc
    from monai.networks.nets import UNETR

    model = UNETR(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        img_size=cfg.image_size,
        feature_size=cfg.feature_size,
        hidden_size=cfg.hidden_size,
        mlp_dim=cfg.mlp_dim,
        num_heads=cfg.num_heads,
        proj_type="conv",
        norm_name=_norm_spec(cfg),
        conv_block=True,
        res_block=False,  # MONAI's residual block adds in place to a norm output: Opacus forbids it
        dropout_rate=cfg.dropout,
        spatial_dims=2,
        qkv_bias=False,
    )
    # Each transformer layer keeps a LayerNorm for cross-attention that UNETR never calls;
    # unused trainable weights would break DP-SGD (no per-sample gradient) and waste updates.
    from monai.networks.blocks.transformerblock import TransformerBlock

    for module in model.modules():
        if isinstance(module, TransformerBlock) and not module.with_cross_attention:
            module.norm_cross_attn = nn.Identity()
    # MONAI's blocks apply LeakyReLU in place to a normalisation layer's output; Opacus'
    # backward hooks on that (trainable) layer forbid it. Same values, computed out of place.
    for module in model.modules():
        if isinstance(module, nn.LeakyReLU | nn.ReLU):
            module.inplace = False
    return model


_BUILDERS: dict[Architecture, Callable[[ModelConfig], nn.Module]] = {
    Architecture.UNET2D: _build_unet2d,
    Architecture.UNETR: _build_unetr,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Builds the network of ``cfg`` on the CPU with weights drawn from ``cfg.seed``.

    The global torch RNG is forked and restored, so callers' random streams are untouched,
    and the same config yields bit-identical weights in any process (same torch build).

    Args:
        cfg: The model config.

    Returns:
        The freshly initialised network, in training mode.

    Raises:
        ValueError: If ``cfg`` is not a ModelConfig or names an architecture without builder.
    """
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"build_model needs a ModelConfig, got {type(cfg).__name__}")
    builder = _BUILDERS.get(cfg.architecture)
    if builder is None:  # pragma: no cover - every enum member is registered
        raise ValueError(f"no builder registered for architecture {cfg.architecture.value!r}")
    with seeded_global_rng(cfg.seed):
        model = builder(cfg)
    model.train()
    return model


def parameter_count(model: nn.Module) -> int:
    """Returns the number of trainable scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: nn.Module) -> str:
    """Returns a sha256 hex digest of the model's state (structure and values).

    The digest covers the module tree (each submodule's name, class and ``extra_repr``, so
    e.g. GroupNorm and InstanceNorm, or two dropout rates, differ even where their tensors
    coincide), then, in ``state_dict`` order, each entry's name, dtype, shape and raw bytes.
    Every field is length-prefixed, so no two different states collide by concatenation.
    Taken right after :func:`build_model`, it identifies architecture, config and initial
    weights: two silos that built different networks, or the same network from different
    seeds, disagree. Silos must run the same torch and MONAI versions to agree.

    Args:
        model: The network.

    Returns:
        64 lowercase hex characters.
    """
    h = hashlib.sha256(b"fedsilo.model_fingerprint.v1\0")

    def put(chunk: bytes) -> None:
        h.update(struct.pack("<Q", len(chunk)))
        h.update(chunk)

    for name, module in model.named_modules():
        put(name.encode("utf-8"))
        put(f"{type(module).__module__}.{type(module).__qualname__}({module.extra_repr()})".encode())
    put(b"state_dict")
    for name, tensor in model.state_dict().items():
        put(name.encode("utf-8"))
        put(str(tensor.dtype).encode("ascii"))
        put(struct.pack(f"<{tensor.dim()}q", *tensor.shape))
        put(_tensor_bytes(tensor))
    return h.hexdigest()


_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d and InstanceNorm*d (and their lazy forms)
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    PopulationNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)


def local_parameter_names(model: nn.Module) -> frozenset[str]:
    """Returns the ``state_dict`` names of all normalisation-layer parameters and buffers.

    Covers InstanceNorm, BatchNorm, GroupNorm, LayerNorm (and RMSNorm): affine weight and bias,
    running mean/var and ``num_batches_tracked``; and PN (:class:`~fedsilo.models.pn.PopulationNorm`):
    its learned mean and log-variance with its affine weight and bias (it has no buffers). FedBN keeps
    exactly these local.

    Args:
        model: The network.

    Returns:
        The set of names, each a key of ``model.state_dict()``.
    """
    keys = set(model.state_dict().keys())
    names: set[str] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, _NORM_TYPES):
            continue
        prefix = f"{module_name}." if module_name else ""
        for local, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
            full = prefix + local
            if full in keys:
                names.add(full)
    return frozenset(names)
