"""LoRA adapters (peft) on a frozen base network: settings, deterministic injection, factor bookkeeping."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
import torch
from torch import nn

from fedsilo.core.validators import MappingConfig, check_float, check_int, check_seed
from fedsilo.models.registry import Architecture, ModelConfig, build_model
from fedsilo.core.rng import seeded_global_rng

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "ADAPTER",
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
]

#: Name of the single peft adapter that :func:`add_lora` injects (it appears in state_dict keys).
ADAPTER = "default"

_TAG_LORA_A = 0x10_4A
_ArrayT = TypeVar("_ArrayT", torch.Tensor, np.ndarray)


@dataclass(frozen=True, kw_only=True)
class LoraSettings(MappingConfig):
    """Run-wide LoRA settings; every silo must use the same ones.

    Attributes:
        rank: r, the inner dimension of each adapter (>= 1).
        alpha: LoRA alpha (> 0); peft scales each update by ``alpha / rank``.
        target_modules: Module-name patterns that get an adapter: a module matches a pattern
            equal to its full name or to a trailing, dot-separated part of it (``"qkv"`` matches
            ``vit.blocks.0.attn.qkv``), as in peft. Empty: the architecture's default (see
            :func:`default_target_modules`). Matching ``nn.Conv2d`` and ``nn.Linear`` layers
            get adapters, matching parameter-free placeholders (``nn.Identity``) are skipped,
            and any other match with weights (e.g. ``nn.ConvTranspose2d``, which peft cannot
            adapt) is an error, as is a pattern without any adaptable match.
        init_seed: Seed of every ``lora_A`` (B starts at zero), so all silos start from the
            identical adapters and the initial model equals the base exactly.
    """

    rank: int = 4
    alpha: float = 8.0
    target_modules: tuple[str, ...] = ()
    init_seed: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank, minimum=1)
        check_float(owner, "alpha", self.alpha, low=0.0, high=math.inf, low_inclusive=False, high_inclusive=False)
        if not isinstance(self.target_modules, tuple):
            raise ValueError(f"{owner}.target_modules must be a tuple of strings, got {self.target_modules!r}")
        for i, name in enumerate(self.target_modules):
            if not isinstance(name, str) or not name.strip() or name != name.strip():
                raise ValueError(f"{owner}.target_modules[{i}] must be a non-empty module name, got {name!r}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"{owner}.target_modules has duplicates: {self.target_modules!r}")
        check_seed(owner, "init_seed", self.init_seed)

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` by which peft multiplies ``B @ A``."""
        return self.alpha / self.rank



@dataclass(frozen=True, kw_only=True)
class LoraLayer:
    """One adapted layer of a model returned by :func:`add_lora`.

    Attributes:
        module: Full name of the adapted (peft wrapper) module, e.g. ``model.0.conv.unit0.conv``.
        weight_name: ``state_dict`` key of the frozen base weight (``<module>.base_layer.weight``).
        a_name: ``state_dict`` key of the ``lora_A`` weight (``<module>.lora_A.default.weight``).
        b_name: ``state_dict`` key of the ``lora_B`` weight (``<module>.lora_B.default.weight``).
        kind: ``"conv"`` (A ``[r, c_in, k, k]``, B ``[c_out, r, 1, 1]``) or ``"linear"``
            (A ``[r, in]``, B ``[out, r]``).
        rank: r.
        scaling: The factor peft applies to ``B @ A`` (read from the layer: ``alpha / r``).
        weight_shape: Shape of the base weight (and of the update ``scaling * B @ A``).
        a_shape: Shape of the ``lora_A`` weight.
        b_shape: Shape of the ``lora_B`` weight.
    """

    module: str
    weight_name: str
    a_name: str
    b_name: str
    kind: Literal["conv", "linear"]
    rank: int
    scaling: float
    weight_shape: tuple[int, ...]
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]

    @property
    def a_matrix_shape(self) -> tuple[int, int]:
        """Shape of A as a matrix: ``(r, c_in * k * k)`` or ``(r, in)``."""
        return (self.a_shape[0], math.prod(self.a_shape[1:]))

    @property
    def b_matrix_shape(self) -> tuple[int, int]:
        """Shape of B as a matrix: ``(c_out, r)`` or ``(out, r)``."""
        return (self.b_shape[0], math.prod(self.b_shape[1:]))


# ---------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------

_SUPPORTED = (nn.Conv2d, nn.Linear)


def default_target_modules(model: nn.Module, architecture: Architecture) -> list[str]:
    """Returns the full names of the modules that get adapters when no targets are configured.

    ``UNET2D``: every ``nn.Conv2d`` (not the ``nn.ConvTranspose2d`` up-sampling layers, which
    peft cannot adapt). ``UNETR``: the attention projections of every transformer layer, i.e.
    the ``qkv`` and ``out_proj`` ``nn.Linear`` layers of MONAI's ``SABlock``.

    Args:
        model: The plain (not yet adapted) network.
        architecture: Its architecture.

    Returns:
        Module names in ``named_modules`` order.

    Raises:
        ValueError: On an unknown architecture.
    """
    if architecture is Architecture.UNET2D:
        return [name for name, m in model.named_modules() if type(m) is nn.Conv2d]
    if architecture is Architecture.UNETR:
        from monai.networks.blocks.selfattention import SABlock

        wanted = {
            f"{name}.{child}"
            for name, m in model.named_modules()
            if isinstance(m, SABlock)
            for child in ("qkv", "out_proj")
            if type(getattr(m, child, None)) is nn.Linear
        }
        return [name for name, _ in model.named_modules() if name in wanted]
    raise ValueError(f"no default LoRA targets for architecture {architecture!r}")


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _resolve_targets(model: nn.Module, settings: LoraSettings, architecture: Architecture) -> list[str]:
    if not settings.target_modules:
        names = default_target_modules(model, architecture)
        if not names:
            raise ValueError(f"the {architecture.value} model has no layers that LoRA can adapt")
        return names
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for pattern in settings.target_modules:
        hits = [n for n in modules if n and _matches(n, pattern)]
        for n in hits:
            m = modules[n]
            if type(m) in _SUPPORTED:
                chosen.add(n)
            elif next(m.parameters(recurse=False), None) is not None:
                raise ValueError(
                    f"LoraSettings.target_modules: {pattern!r} matches {n!r}, a {type(m).__name__}; "
                    "LoRA adapts only nn.Conv2d and nn.Linear"
                )
        if not any(n in chosen for n in hits):
            raise ValueError(f"LoraSettings.target_modules: {pattern!r} matches no nn.Conv2d or nn.Linear of the model")
    return [n for n in modules if n in chosen]


# ---------------------------------------------------------------------------------------
# Injection
# ---------------------------------------------------------------------------------------


def _peft_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    for name, m in model.named_modules():
        if isinstance(m, PeftLoraLayer):
            yield name, m


def add_lora(model: nn.Module, settings: LoraSettings, *, architecture: Architecture) -> nn.Module:
    """Injects peft LoRA adapters into ``model`` and freezes everything else.

    Uses ``peft.inject_adapter_in_model`` (adapter name ``"default"``, no dropout, no bias,
    plain ``alpha / r`` scaling). Then every non-LoRA parameter gets ``requires_grad=False``,
    every ``lora_A`` is drawn kaiming-uniform (``a=sqrt(5)``, peft's own choice) from one
    generator seeded by ``settings.init_seed``, layer by layer in ``state_dict`` order, and
    every ``lora_B`` is set to zero. Hence the same base and settings give bit-identical
    adapters on every silo, and the adapted model's output equals the base's exactly until B
    moves. The global torch RNG is left untouched.

    The adapted layers' base weights move to ``<module>.base_layer.weight`` (and ``.bias``)
    in ``state_dict``: load base checkpoints into the plain network *before* calling this
    (see :func:`build_lora_model`). The result works with :func:`~fedsilo.models.training.train_local`,
    Opacus DP-SGD (:func:`fedsilo.models.dp_training.train_local_dp`) and
    :func:`~fedsilo.models.registry.model_fingerprint`.

    Args:
        model: The plain network (modified in place and returned).
        settings: Rank, alpha, targets and seed.
        architecture: The network's architecture (chooses the default targets).

    Returns:
        ``model``, with adapters.

    Raises:
        ValueError: On bad arguments, a model that already has adapters, or targets that match
            nothing or a layer type LoRA cannot adapt.
    """
    import peft

    if not isinstance(model, nn.Module):
        raise ValueError(f"add_lora needs an nn.Module, got {type(model).__name__}")
    if not isinstance(settings, LoraSettings):
        raise ValueError(f"add_lora needs LoraSettings, got {type(settings).__name__}")
    if not isinstance(architecture, Architecture):
        raise ValueError(f"add_lora: architecture must be an Architecture, got {architecture!r}")
    if next(_peft_layers(model), None) is not None:
        raise ValueError("model already has LoRA adapters")
    targets = _resolve_targets(model, settings, architecture)
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
        use_rslora=False,
        init_lora_weights=False,  # overwritten below from init_seed
    )
    with seeded_global_rng(None):  # the adapters' construction draws default inits
        model = peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    adapted = [name for name, _ in _peft_layers(model)]
    if set(adapted) != set(targets):  # pragma: no cover - guards against peft matching differently
        raise ValueError(f"peft adapted {adapted!r}, expected exactly {targets!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    seed = int(np.random.SeedSequence([_TAG_LORA_A, settings.init_seed]).generate_state(1, dtype=np.uint64)[0] >> 1)
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for layer in lora_layers(model):
            a, b = params[layer.a_name], params[layer.b_name]
            init = torch.empty(a.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=gen)
            a.copy_(init.to(dtype=a.dtype, device=a.device))
            b.zero_()
    return model


def build_lora_model(
    cfg: ModelConfig,
    settings: LoraSettings,
    *,
    base_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Builds ``cfg``'s network, loads the frozen base weights into it, then adds LoRA.

    Args:
        cfg: The model config.
        settings: The LoRA settings.
        base_state_dict: Weights of the plain network (e.g. from
            :func:`fedsilo.models.pretrain.load_base_checkpoint`); None keeps ``cfg.seed``'s
            initial weights.

    Returns:
        The adapted network, in training mode, base frozen.

    Raises:
        ValueError: If the base weights do not fit ``cfg``'s network, or on bad settings.
    """
    model = build_model(cfg)
    if base_state_dict is not None:
        try:
            model.load_state_dict(base_state_dict, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"base weights do not fit the {cfg.architecture.value} network: {exc}") from None
    return add_lora(model, settings, architecture=cfg.architecture)


# ---------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    """Describes every adapted layer of ``model``, in ``state_dict`` order.

    Args:
        model: A model returned by :func:`add_lora`.

    Returns:
        One entry per adapted layer (empty for a model without adapters).

    Raises:
        ValueError: If a layer has another adapter than ``"default"`` or an unsupported base type.
    """
    keys = list(model.state_dict().keys())
    position = {k: i for i, k in enumerate(keys)}
    out: list[LoraLayer] = []
    for name, m in _peft_layers(model):
        if list(m.lora_A.keys()) != [ADAPTER] or list(m.lora_B.keys()) != [ADAPTER]:
            raise ValueError(f"{name}: expected the single adapter {ADAPTER!r}, got {list(m.lora_A.keys())!r}")
        base = m.get_base_layer()
        if type(base) is nn.Conv2d:
            kind: Literal["conv", "linear"] = "conv"
        elif type(base) is nn.Linear:
            kind = "linear"
        else:
            raise ValueError(f"{name}: LoRA on a {type(base).__name__} is not supported")
        prefix = f"{name}." if name else ""
        a_w = m.lora_A[ADAPTER].weight
        b_w = m.lora_B[ADAPTER].weight
        out.append(
            LoraLayer(
                module=name,
                weight_name=f"{prefix}base_layer.weight",
                a_name=f"{prefix}lora_A.{ADAPTER}.weight",
                b_name=f"{prefix}lora_B.{ADAPTER}.weight",
                kind=kind,
                rank=int(m.r[ADAPTER]),
                scaling=float(m.scaling[ADAPTER]),
                weight_shape=tuple(base.weight.shape),
                a_shape=tuple(a_w.shape),
                b_shape=tuple(b_w.shape),
            )
        )
    for layer in out:
        for key in (layer.weight_name, layer.a_name, layer.b_name):
            if key not in position:  # pragma: no cover - peft's naming changed
                raise ValueError(f"expected state_dict key {key!r} is missing")
    out.sort(key=lambda layer: position[layer.a_name])
    return out


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Returns the ``state_dict`` keys of all LoRA factors: A then B of each layer, in order.

    Args:
        model: A model returned by :func:`add_lora`.

    Returns:
        ``[layer0.a_name, layer0.b_name, layer1.a_name, ...]``.
    """
    return [name for layer in lora_layers(model) for name in (layer.a_name, layer.b_name)]


def to_matrix(factor: _ArrayT) -> _ArrayT:
    """Flattens a LoRA factor to a matrix (a view where possible).

    Conv A ``[r, c_in, k, k]`` -> ``[r, c_in*k*k]``; conv B ``[c_out, r, 1, 1]`` -> ``[c_out, r]``;
    linear factors are already matrices. Then ``ΔW = scaling * B @ A`` in matrix form.

    Args:
        factor: A torch tensor or numpy array with at least 2 dimensions.

    Returns:
        The same kind of array, 2-D.

    Raises:
        ValueError: If ``factor`` has fewer than 2 dimensions or is of another type.
    """
    if not isinstance(factor, (torch.Tensor, np.ndarray)):
        raise ValueError(f"to_matrix needs a torch.Tensor or numpy array, got {type(factor).__name__}")
    if factor.ndim < 2:
        raise ValueError(f"to_matrix needs at least 2 dimensions, got shape {tuple(factor.shape)}")
    return factor.reshape(factor.shape[0], -1)


def from_matrix(matrix: _ArrayT, shape: tuple[int, ...] | torch.Size) -> _ArrayT:
    """Inverse of :func:`to_matrix`: reshapes a factor matrix to the layer's weight ``shape``.

    Args:
        matrix: 2-D torch tensor or numpy array.
        shape: Target shape, e.g. ``LoraLayer.a_shape`` or ``b_shape``.

    Returns:
        The same kind of array, of ``shape``.

    Raises:
        ValueError: If ``matrix`` is not 2-D or does not fit ``shape``.
    """
    if not isinstance(matrix, (torch.Tensor, np.ndarray)):
        raise ValueError(f"from_matrix needs a torch.Tensor or numpy array, got {type(matrix).__name__}")
    shape = tuple(int(s) for s in shape)
    if matrix.ndim != 2 or len(shape) < 2 or tuple(matrix.shape) != (shape[0], math.prod(shape[1:])):
        raise ValueError(f"matrix of shape {tuple(matrix.shape)} does not fit factor shape {shape}")
    return matrix.reshape(shape)


def merged_delta(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns each adapted layer's weight update ``scaling * B @ A``, in the base weight's shape.

    For a conv layer, ``ΔW[o, i, u, v] = scaling * Σ_r B[o, r] A[r, i, u, v]``; adding ΔW to
    the base weight gives the layer that the adapted module computes.

    Args:
        model: A model returned by :func:`add_lora`.

    Returns:
        ``{module name: ΔW}`` (detached float tensors), in :func:`lora_layers` order.
    """
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for layer in lora_layers(model):
        a = to_matrix(state[layer.a_name].detach())
        b = to_matrix(state[layer.b_name].detach())
        out[layer.module] = (layer.scaling * (b @ a)).reshape(layer.weight_shape)
    return out
