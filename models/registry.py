"""Model registry: the network config, its deterministic builder, fingerprint and FedBN-local names."""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedsilo.models._config import (
    check_enum,
    check_float,
    check_int,
    check_seed,
    config_from_mapping,
    config_to_mapping,
)

__all__ = [
    "Architecture",
    "ModelConfig",
    "Norm",
    "build_model",
    "local_parameter_names",
    "model_fingerprint",
    "parameter_count",
]


class Norm(enum.Enum):
    """Normalisation layer of the network.

    BatchNorm is deliberately absent: its running statistics mix samples, which breaks the
    per-sample gradients that DP-SGD needs.
    """

    INSTANCE = "instance"
    GROUP = "group"


class Architecture(enum.Enum):
    """Network architectures that :func:`build_model` knows how to build."""

    UNET2D = "unet2d"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything needed to build the same network, with the same initial weights, anywhere.

    Attributes:
        architecture: Which network to build.
        in_channels: Number of input image channels.
        out_channels: Number of output classes, background included (softmax output, >= 2).
        channels: Feature channels of each UNet level, top to bottom.
        strides: Down-sampling stride between consecutive levels; one fewer than ``channels``.
            Input height and width must be divisible by the product of the strides.
        num_res_units: Residual units per block (0 for plain convolutions).
        norm: Normalisation layer (always with a learnable affine).
        norm_groups: Groups of GroupNorm; must divide every entry of ``channels`` and
            ``out_channels``. Ignored for ``Norm.INSTANCE``.
        dropout: Dropout probability in [0, 1).
        seed: Seed of the initial weights; same config gives bit-identical weights.
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

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_enum(owner, "architecture", self.architecture, Architecture)
        check_int(owner, "in_channels", self.in_channels, minimum=1)
        check_int(owner, "out_channels", self.out_channels, minimum=2)
        for name in ("channels", "strides"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                raise ValueError(f"{owner}.{name} must be a tuple of ints, got {value!r}")
            for i, item in enumerate(value):
                check_int(owner, f"{name}[{i}]", item, minimum=1)
        if len(self.channels) < 2:
            raise ValueError(f"{owner}.channels needs at least 2 levels, got {self.channels!r}")
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"{owner}.strides must have len(channels) - 1 = {len(self.channels) - 1} entries, "
                f"got {self.strides!r}"
            )
        check_int(owner, "num_res_units", self.num_res_units, minimum=0)
        check_enum(owner, "norm", self.norm, Norm)
        check_int(owner, "norm_groups", self.norm_groups, minimum=1)
        if self.norm is Norm.GROUP:
            for width in (*self.channels, self.out_channels):
                if width % self.norm_groups:
                    raise ValueError(
                        f"{owner}.norm_groups={self.norm_groups} must divide every entry of channels "
                        f"{self.channels!r} and out_channels={self.out_channels}"
                    )
        check_float(owner, "dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
        check_seed(owner, "seed", self.seed)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from plain TOML values (enum values as strings, lists for tuples).

        Args:
            d: Mapping of field names to values; missing keys take the defaults.

        Returns:
            The validated config.

        Raises:
            ValueError: On an unknown key or a bad value; the message names the key.
        """
        return config_from_mapping(cls, d)

    def to_mapping(self) -> dict[str, Any]:
        """Returns the plain TOML form; ``ModelConfig.from_mapping(c.to_mapping()) == c``."""
        return config_to_mapping(self)


def _build_unet2d(cfg: ModelConfig) -> nn.Module:
    from monai.networks.nets import UNet

    norm: tuple[str, dict[str, Any]]
    if cfg.norm is Norm.INSTANCE:
        norm = ("instance", {"affine": True})
    else:
        norm = ("group", {"num_groups": cfg.norm_groups, "affine": True})
    return UNet(
        spatial_dims=2,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
        norm=norm,
        dropout=cfg.dropout,
    )


_BUILDERS: dict[Architecture, Callable[[ModelConfig], nn.Module]] = {
    Architecture.UNET2D: _build_unet2d,
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
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg.seed)
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
)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)


def local_parameter_names(model: nn.Module) -> frozenset[str]:
    """Returns the ``state_dict`` names of all normalisation-layer parameters and buffers.

    Covers InstanceNorm, BatchNorm, GroupNorm, LayerNorm (and RMSNorm): affine weight and bias,
    running mean/var and ``num_batches_tracked``. FedBN keeps exactly these local.

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
