"""Opacus compatibility for DP-SGD: model validation/fixing and closed-form per-sample gradient rules."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

# torch and Opacus are imported inside the functions that use them, so that importing this
# module (and :mod:`fedsilo.privacy.dpsgd`, which re-exports it) needs neither.
if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["add_grad_sampler", "make_private_compatible", "register_grad_samplers"]

#: Rules added by layers defined above the privacy layer (e.g. ``fedsilo.models.pn``), by layer type;
#: :func:`register_grad_samplers` installs them next to the built-in ones.
_ADDED_RULES: dict[type, Callable[..., Any]] = {}


# ---------------------------------------------------------------------------------------
# Model compatibility
# ---------------------------------------------------------------------------------------


def _compatibility_problems(model: nn.Module) -> list[str]:
    """Returns Opacus' objections to ``model`` (validated as if in training mode), as text."""
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()
    try:
        errors: list[Exception] = list(ModuleValidator.validate(model, strict=False))
        # Trainable layers with buffers (e.g. running statistics): GradSampleModule refuses them.
        errors += list(GradSampleModule.validate(model, strict=False))
    finally:
        model.train(was_training)
    return [f"{type(e).__name__}: {e}" for e in errors]


def make_private_compatible(model: nn.Module) -> nn.Module:
    """Returns ``model``, or a fixed copy of it, that Opacus can train with DP-SGD.

    Runs ``opacus.validators.ModuleValidator.validate`` (and GradSampleModule's check for
    trainable layers with buffers). Without objections the very same object is returned,
    unchanged: the default UNet (InstanceNorm without running statistics) passes as is. Otherwise
    ``ModuleValidator.fix`` builds a fixed deep copy (e.g. BatchNorm -> GroupNorm with
    weight 1 and bias 0, InstanceNorm running statistics switched off), which is validated
    again. The fix uses no randomness, so every silo turns the same architecture and weights
    into the same fixed model. The model's training/eval mode is kept.

    Args:
        model: The network.

    Returns:
        ``model`` itself if it was compatible, else the fixed copy (``model`` is not modified).

    Raises:
        ValueError: Listing the problems that remain after fixing.
    """
    from opacus.validators import ModuleValidator

    if not _compatibility_problems(model):
        return model
    was_training = model.training
    model.train()
    try:
        fixed = ModuleValidator.fix(model)
    finally:
        model.train(was_training)
    fixed.train(was_training)
    remaining = _compatibility_problems(fixed)
    if remaining:
        raise ValueError("model cannot be trained with DP-SGD even after fixing: " + "; ".join(remaining))
    return fixed


# ---------------------------------------------------------------------------------------
# Per-sample gradient rules for layers Opacus has none for
# ---------------------------------------------------------------------------------------


def _prelu_grad_sample(
    layer: nn.PReLU, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Exact per-sample gradient of ``nn.PReLU``'s weight (Opacus grad-sampler signature).

    PReLU computes ``y = x`` for ``x >= 0`` and ``y = a * x`` otherwise, so ``dy/da = x``
    where ``x < 0`` and 0 elsewhere, i.e. ``min(0, x)`` (also at ``x = 0``, where both
    sides are 0). Example n's gradient is the sum over its positions of
    ``backprops * min(0, x)``: over everything but the batch dimension for a single
    shared ``a`` (``num_parameters == 1``), else per channel (dimension 1, as PReLU
    broadcasts its weight) over the remaining dimensions.
    """
    if not layer.weight.requires_grad:
        return {}
    x = activations[0].to(backprops.dtype)
    contrib = x.clamp(max=0) * backprops
    if layer.num_parameters == 1:
        grad = contrib.flatten(1).sum(1, keepdim=True) if contrib.dim() > 1 else contrib.unsqueeze(1)
    else:
        grad = contrib.flatten(2).sum(2) if contrib.dim() > 2 else contrib
    return {layer.weight: grad}


def _conv_transpose_grad_sample(
    layer: nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d,
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
) -> dict[nn.Parameter, torch.Tensor]:
    """Exact per-sample gradients of ``nn.ConvTranspose{1,2,3}d`` (Opacus grad-sampler signature).

    A transposed convolution is the input-gradient of the ordinary convolution with the
    same weight, stride, padding, dilation and groups: input position ``l`` and kernel tap
    ``k`` write to output position ``l * stride + k * dilation - padding``. Hence the
    weight gradient (layout ``[C_in, C_out / groups, *kernel]``) is
    ``dW[i, o, k] = sum_l x[i, l] * b[g(i) * C_out / groups + o, l * stride + k * dilation - padding]``
    (out-of-range positions count as 0): the backprops are unfolded (im2col) with the
    layer's kernel size, dilation, padding and stride, which gives one column per input
    position, and contracted with the activations per example and group, the same
    unfold-and-einsum construction as Opacus' rule for ``nn.Conv*d``. ``output_padding``
    (or a forward ``output_size``) only changes how many output positions there are at
    the end, which the backprops' size shows; where the unfold then yields more windows
    per dimension than there are input positions (output_padding >= stride, possible with
    dilation), only the first ones are used: the others belong to no input position. The
    bias gradient is the sum of the backprops over space.
    """
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if n == 0:
            ret[layer.weight] = layer.weight.new_zeros((0, *layer.weight.shape))
        else:
            ret[layer.weight] = _conv_transpose_weight_grad(layer, x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.flatten(2).sum(2)
    return ret


def _conv_transpose_weight_grad(layer: Any, x: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """``[N, *layer.weight.shape]`` per-sample weight gradients of a transposed convolution (N >= 1)."""
    import torch
    from torch.nn import functional as F

    n, dims = x.shape[0], x.dim() - 2
    kernel, stride = tuple(layer.kernel_size), tuple(layer.stride)
    padding, dilation = tuple(layer.padding), tuple(layer.dilation)
    if dims == 2:
        cols = F.unfold(backprops, kernel_size=kernel, dilation=dilation, padding=padding, stride=stride)
    elif dims == 1:
        cols = F.unfold(
            backprops.unsqueeze(2),
            kernel_size=(1, *kernel),
            dilation=(1, *dilation),
            padding=(0, *padding),
            stride=(1, *stride),
        )
    else:
        from opacus.utils.tensor_utils import unfold3d

        cols = unfold3d(backprops, kernel_size=kernel, padding=padding, stride=stride, dilation=dilation)
    # Windows per spatial dimension: at least the input size (more with output_padding >= stride).
    windows = tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(backprops.shape[2:], kernel, stride, padding, dilation, strict=True)
    )
    in_size = tuple(x.shape[2:])
    if windows != in_size:
        cols = cols.reshape(n, cols.shape[1], *windows)[(..., *(slice(0, m) for m in in_size))].flatten(2)
    groups = layer.groups
    taps = math.prod(kernel)
    cols = cols.reshape(n, groups, layer.out_channels // groups * taps, -1)
    acts = x.reshape(n, groups, layer.in_channels // groups, -1)
    grad = torch.einsum("ngil,ngjl->ngij", acts, cols)  # j = (output channel in group, kernel tap)
    return grad.reshape(n, *layer.weight.shape)


def add_grad_sampler(layer_type: type, rule: Callable[..., Any]) -> None:
    """Adds an exact per-sample gradient rule for a layer type that this (lower) layer cannot import.

    A network layer defined in :mod:`fedsilo.models` (e.g.
    :class:`~fedsilo.models.pn.PopulationNorm`) calls this when its module is imported, so the rule
    is here for any model that contains the layer; :func:`register_grad_samplers` (run by every
    :class:`~fedsilo.privacy.dpsgd.DpSgdStep`) then installs it with Opacus like the built-in ones.
    Needs neither torch nor Opacus. Adding the same rule again is a no-op.

    Args:
        layer_type: The exact ``nn.Module`` subclass (Opacus looks rules up by exact type).
        rule: ``rule(layer, activations, backprops) -> {parameter: [N, *parameter.shape]}``, Opacus'
            grad-sampler signature; it must be exact (tests compare it with one backward pass per
            example).

    Raises:
        ValueError: If ``layer_type`` is not a class, ``rule`` is not callable, or another rule was
            already added for ``layer_type``.
    """
    if not isinstance(layer_type, type):
        raise ValueError(f"add_grad_sampler.layer_type must be a class, got {layer_type!r}")
    if not callable(rule):
        raise ValueError(f"add_grad_sampler.rule must be callable, got {rule!r}")
    known = _ADDED_RULES.get(layer_type)
    if known is not None and known is not rule:
        raise ValueError(
            f"add_grad_sampler: a per-sample gradient rule for {layer_type.__qualname__} was already added ({known!r})"
        )
    _ADDED_RULES[layer_type] = rule


def register_grad_samplers() -> None:
    """Registers exact per-sample gradient rules for ``nn.PReLU`` and ``nn.ConvTranspose{1,2,3}d`` with Opacus.

    Opacus 1.6 has no rule for these layers (both are in MONAI's UNet) and falls back to
    functorch (``vmap`` over a per-layer ``grad``), which is several times slower. The
    rules here compute the same exact per-example gradients in closed form from the
    activations and backprops that Opacus' hooks capture, the way Opacus' own rules do
    (Goodfellow 2015, "Efficient per-example gradient computations"; Opacus'
    ``compute_conv_grad_sample``): PReLU's weight gradient is ``backprops * min(0, x)``
    summed over positions (per channel if it has one weight per channel); a transposed
    convolution's weight gradient is its unfolded backprops contracted with its input, per
    group, and its bias gradient the backprops summed over space. They are not
    approximations: tests compare them with one ordinary backward pass per example. Rules that
    upper layers added with :func:`add_grad_sampler` (PN's:
    :func:`fedsilo.models.pn.population_norm_grad_sample`) are installed the same way.

    Opacus' own ``Conv1d/2d/3d`` rule is wrapped so that it always sees contiguous tensors (see
    :func:`_contiguous`: it is wrong for ``channels_last`` inputs).

    Uses Opacus' public ``register_grad_sampler``, which fills the grad-sampler mapping
    shared by every hooks-based ``GradSampleModule`` in the process (``hooks`` and the
    fast/ghost-clipping modes). A layer type that already has a rule (registered by Opacus
    or by other code) keeps it. Idempotent and cheap;
    :class:`~fedsilo.privacy.dpsgd.DpSgdStep` calls it, so importing this module needs
    neither torch nor Opacus.
    """
    from opacus.grad_sample import GradSampleModule, register_grad_sampler
    from torch import nn

    rules = {
        nn.PReLU: _prelu_grad_sample,
        nn.ConvTranspose1d: _conv_transpose_grad_sample,
        nn.ConvTranspose2d: _conv_transpose_grad_sample,
        nn.ConvTranspose3d: _conv_transpose_grad_sample,
        **_ADDED_RULES,
    }
    for cls, rule in rules.items():
        if cls not in GradSampleModule.GRAD_SAMPLERS:
            register_grad_sampler(cls)(rule)
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        rule = GradSampleModule.GRAD_SAMPLERS.get(cls)
        if rule is not None and not getattr(rule, "fedsilo_contiguous", False):
            GradSampleModule.GRAD_SAMPLERS[cls] = _contiguous(rule)


def _contiguous(rule: Any) -> Any:
    """``rule`` (Opacus' convolution rule) fed contiguous activations and backprops.

    Opacus 1.6's ``compute_conv_grad_sample`` returns wrong per-example gradients (and a wrong
    batch sum) when a convolution's input is in ``channels_last`` memory layout, which a
    ``permute`` of an HWC image or of a one-hot map, or ``torch.stack`` of such tensors, silently
    produces: its unfold-and-reshape assumes the default layout. Per-example gradients that are
    wrong would be clipped wrongly, so the DP guarantee would not hold. The values are the same
    tensors in the default layout; the rule is otherwise Opacus' own.
    """

    def contiguous_rule(layer: Any, activations: Any, backprops: Any) -> Any:
        return rule(layer, [a.contiguous() for a in activations], backprops.contiguous())

    contiguous_rule.fedsilo_contiguous = True  # type: ignore[attr-defined]
    return contiguous_rule
