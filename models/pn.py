"""Population Normalization (Wang et al., CVPR 2025): channels normalised by learned, not batch, statistics.

Zhuoyao Wang, Fan Yi, Peizhu Gong, Caitou He, Cheng Jin, Weizhong Zhang, "Population Normalization
for Federated Learning", CVPR 2025, pp. 10214-10223 (used as the "PN" method of FL-MedSegBench).
The paper's abstract (what was reachable here) defines PN as batch normalisation whose population
statistics are "learned as trainable parameters rather than calculated from mini-batches"; the
layer below implements the issue's per-channel formula::

    y = (x − μ) / √(σ² + ε) · γ + β,        σ² = exp(ρ)

with μ, ρ, γ, β trainable per-channel parameters (no buffers, no batch statistics). The paper's
optional artificial noise (mimicking BN's batch-statistics jitter for large batches) is not
implemented.

Parameterisation (ours): the variance is stored as its logarithm ρ (``log_var``), so σ² = exp(ρ) is
positive for every real ρ, whatever an optimiser step, DP-SGD's Gaussian noise, a silo-level noised
update or an average across silos does to the stored value (FL-MedSegBench stores σ² itself, which
a step or noise can push below −ε, giving NaN). Why the logarithm rather than e.g. softplus:

* the gradient ∂L/∂ρ = σ² · ∂L/∂σ² makes every step a relative change of σ², the same for
  layers whose activations differ by orders of magnitude in scale (Adam's steps are then
  multiplicative factors of the variance);
* FedAvg averages ρ, so the aggregated variance is the (weighted) geometric mean of the silos'
  variances, a natural mean for a scale, and never below the smallest of them;
* the closed-form per-sample gradient (for DP-SGD) stays simple: ∂/∂ρ (σ² + ε)^(−½) =
  −½ (σ² + ε)^(−½) · σ²/(σ² + ε), and σ²/(σ² + ε) = sigmoid(ρ − log ε).

The layer never forms σ² itself: it computes (σ² + ε)^(−½) = exp(−½ · logaddexp(ρ, log ε)), which is
finite and at most ε^(−½) for every finite ρ (σ² = exp(ρ) alone would underflow to 0 below ρ ≈ −103
and overflow above ρ ≈ 88 in float32), with finite gradients everywhere. The initial values are
μ = 0, ρ = 0 (σ² = 1), γ = 1, β = 0: y = x / √(1 + ε), as FL-MedSegBench's initialisation.

Since the output for one example depends on that example alone, per-sample gradients are exact
and cheap: :func:`population_norm_grad_sample` is the closed-form rule registered with Opacus (via
:func:`fedsilo.privacy.grad_samplers.add_grad_sampler`), so DP-SGD needs neither functorch nor a
replacement of the layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedsilo.core.validators import check_float, check_int
from fedsilo.privacy.grad_samplers import add_grad_sampler

__all__ = [
    "MONAI_NORM_NAME",
    "PN_EPS",
    "PopulationNorm",
    "pn_norm_spec",
    "population_norm_grad_sample",
    "register_monai_norm",
]

#: Default ε of :class:`PopulationNorm` (as BatchNorm's and FL-MedSegBench's).
PN_EPS = 1e-5

#: The name under which :func:`register_monai_norm` adds PN to MONAI's ``Norm`` layer factory
#: (prefixed, so it cannot collide with a name MONAI itself may add).
MONAI_NORM_NAME = "fedsilo_population"


class PopulationNorm(nn.Module):
    """Population Normalization: ``y = (x − μ) / √(exp(ρ) + ε) · γ + β`` per channel (Wang et al., CVPR 2025).

    Works on ``[N, C, *spatial]`` inputs of any number of spatial dimensions (none included), like
    BatchNorm in evaluation mode, except that μ and σ² = exp(ρ) are trained by gradient descent
    (and averaged across silos with the other parameters) instead of estimated from batches. No
    state beyond the four parameters: training and evaluation mode compute the same function, and
    each example's output depends on that example only.

    Attributes:
        num_features: Channels C.
        eps: ε > 0 added to the variance.
        mean: μ, shape ``[C]``.
        log_var: ρ = log σ², shape ``[C]``.
        weight: γ, shape ``[C]``.
        bias: β, shape ``[C]``.
    """

    def __init__(self, num_features: int, eps: float = PN_EPS) -> None:
        """Creates the layer with μ = 0, σ² = 1, γ = 1, β = 0.

        Args:
            num_features: Channels C (>= 1); MONAI's ``get_norm_layer`` fills it in.
            eps: ε, a finite number in (0, 1].

        Raises:
            ValueError: If ``num_features`` or ``eps`` is out of range.
        """
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "num_features", num_features, minimum=1)
        check_float(owner, "eps", eps, low=0.0, high=1.0, low_inclusive=False)
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.mean = nn.Parameter(torch.zeros(self.num_features))
        self.log_var = nn.Parameter(torch.zeros(self.num_features))
        self.weight = nn.Parameter(torch.ones(self.num_features))
        self.bias = nn.Parameter(torch.zeros(self.num_features))

    @property
    def variance(self) -> torch.Tensor:
        """σ² = exp(ρ), shape ``[C]`` (detached; for inspection: the forward pass never forms it)."""
        return self.log_var.detach().exp()

    def inv_std(self) -> torch.Tensor:
        """(σ² + ε)^(−½) = exp(−½ · logaddexp(ρ, log ε)), shape ``[C]``; in (0, ε^(−½)], finite for finite ρ."""
        return torch.exp(-0.5 * torch.logaddexp(self.log_var, self.log_var.new_tensor(math.log(self.eps))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises ``x`` (``[N, C, *spatial]``) channel by channel with the learned statistics.

        Raises:
            ValueError: If ``x`` has fewer than 2 dimensions or not ``num_features`` channels.
        """
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"PopulationNorm({self.num_features}) needs an input [N, {self.num_features}, ...], "
                f"got shape {tuple(x.shape)}"
            )
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        scale = (self.inv_std() * self.weight).view(shape)
        return (x - self.mean.view(shape)) * scale + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, variance=exp(log_var)"


def population_norm_grad_sample(
    layer: PopulationNorm, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Exact per-sample gradients of :class:`PopulationNorm` (Opacus grad-sampler signature).

    With b = ∂L/∂y of one example (``backprops``), s = (σ² + ε)^(−½), x̂ = (x − μ)·s and sums over
    the example's positions of channel c:

    * ∂L/∂β = Σ b;
    * ∂L/∂γ = Σ b·x̂ = s·(Σ b·x − μ·Σ b);
    * ∂L/∂μ = −γ·s·Σ b;
    * ∂L/∂ρ = γ·Σ b·(x − μ)·∂s/∂ρ = −½·γ·w·∂L/∂γ, with w = σ²/(σ² + ε) = sigmoid(ρ − log ε).

    Args:
        layer: The layer.
        activations: ``[x]``, its input ``[N, C, *spatial]``, as Opacus' hooks captured it.
        backprops: ∂L/∂y per example, the output's shape (Opacus has already scaled it for the
            loss reduction).

    Returns:
        ``{parameter: [N, C] per-example gradient}`` for each parameter that requires grad.
    """
    x = activations[0].to(backprops.dtype)
    n, c = backprops.shape[0], backprops.shape[1]
    b = backprops.reshape(n, c, -1)
    x = x.reshape(n, c, -1)
    with torch.no_grad():
        log_var = layer.log_var.detach().to(backprops.dtype)
        mean = layer.mean.detach().to(backprops.dtype)
        gamma = layer.weight.detach().to(backprops.dtype)
        log_eps = math.log(layer.eps)
        s = torch.exp(-0.5 * torch.logaddexp(log_var, log_var.new_tensor(log_eps)))
        sum_b = b.sum(2)
        d_gamma = s * ((b * x).sum(2) - mean * sum_b)
        out: dict[nn.Parameter, torch.Tensor] = {}
        if layer.bias.requires_grad:
            out[layer.bias] = sum_b
        if layer.weight.requires_grad:
            out[layer.weight] = d_gamma
        if layer.mean.requires_grad:
            out[layer.mean] = -(gamma * s) * sum_b
        if layer.log_var.requires_grad:
            out[layer.log_var] = (-0.5 * gamma * torch.sigmoid(log_var - log_eps)) * d_gamma
    return out


add_grad_sampler(PopulationNorm, population_norm_grad_sample)


def _monai_factory(dim: Any = None) -> type[PopulationNorm]:
    """MONAI ``Norm`` factory: PN for any number of spatial dimensions."""
    return PopulationNorm


def register_monai_norm() -> str:
    """Adds PN to MONAI's ``Norm`` layer factory under :data:`MONAI_NORM_NAME`; returns that name.

    MONAI networks build their norms with ``get_norm_layer((name, kwargs), spatial_dims, channels)``,
    which looks ``name`` up in the factory (a class in place of the name is not accepted there) and
    fills in ``num_features``. Idempotent: a second call changes nothing.
    """
    from monai.networks.layers.factories import Norm

    if MONAI_NORM_NAME.upper() not in Norm.components:
        Norm.add_factory_callable(MONAI_NORM_NAME, _monai_factory, "Population Normalization (Wang et al., CVPR 2025)")
    return MONAI_NORM_NAME


def pn_norm_spec(eps: float = PN_EPS) -> tuple[str, dict[str, Any]]:
    """A MONAI norm spec (e.g. a UNet's ``norm=``) that builds :class:`PopulationNorm` layers.

    Args:
        eps: ε of every layer.

    Returns:
        ``(name, {"eps": eps})``, with the name registered in MONAI's factory.
    """
    check_float("pn_norm_spec", "eps", eps, low=0.0, high=1.0, low_inclusive=False)
    return (register_monai_norm(), {"eps": float(eps)})
