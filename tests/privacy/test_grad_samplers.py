"""Tests of privacy/grad_samplers.py's add_grad_sampler: rules of upper-layer modules reach Opacus."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsilo.privacy import grad_samplers
from fedsilo.privacy.grad_samplers import add_grad_sampler, register_grad_samplers


class _Scale(nn.Module):
    """A layer type Opacus has no rule for."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return x * self.weight


def _rule(layer, activations, backprops):  # type: ignore[no-untyped-def]
    return {layer.weight: (activations[0] * backprops).flatten(1).sum(1, keepdim=True)}


def _other_rule(layer, activations, backprops):  # type: ignore[no-untyped-def]
    raise AssertionError("not called")


@pytest.fixture
def isolated(monkeypatch):  # type: ignore[no-untyped-def]
    """A fresh rule table here, and no rule for ``_Scale`` in Opacus' mappings before or after."""
    monkeypatch.setattr(grad_samplers, "_ADDED_RULES", {})
    for mapping in _opacus_mappings():
        mapping.pop(_Scale, None)
    yield
    for mapping in _opacus_mappings():
        mapping.pop(_Scale, None)


def _opacus_mappings():  # type: ignore[no-untyped-def]
    from opacus.grad_sample.grad_sample_module import GradSampleModule
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping

    return [GradSampleModule.GRAD_SAMPLERS, GradSampleModuleFastGradientClipping.GRAD_SAMPLERS]


def test_added_rule_is_installed_by_register(isolated) -> None:  # type: ignore[no-untyped-def]
    from opacus.grad_sample import GradSampleModule

    add_grad_sampler(_Scale, _rule)
    add_grad_sampler(_Scale, _rule)  # the same rule again: no-op
    assert _Scale not in GradSampleModule.GRAD_SAMPLERS  # nothing touches Opacus before register
    register_grad_samplers()
    assert GradSampleModule.GRAD_SAMPLERS[_Scale] is _rule
    register_grad_samplers()  # idempotent
    assert GradSampleModule.GRAD_SAMPLERS[_Scale] is _rule


def test_a_rule_registered_with_opacus_first_is_kept(isolated, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from opacus.grad_sample import GradSampleModule

    monkeypatch.setitem(GradSampleModule.GRAD_SAMPLERS, _Scale, _other_rule)
    add_grad_sampler(_Scale, _rule)
    register_grad_samplers()
    assert GradSampleModule.GRAD_SAMPLERS[_Scale] is _other_rule


@pytest.mark.parametrize(
    ("layer_type", "rule", "match"),
    [
        (_Scale(), _rule, "layer_type must be a class"),
        (_Scale, "rule", "rule must be callable"),
    ],
)
def test_add_rejects_bad_arguments(isolated, layer_type, rule, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        add_grad_sampler(layer_type, rule)


def test_add_refuses_a_second_rule_for_one_type(isolated) -> None:  # type: ignore[no-untyped-def]
    add_grad_sampler(_Scale, _rule)
    with pytest.raises(ValueError, match="_Scale was already added"):
        add_grad_sampler(_Scale, _other_rule)


def test_population_norm_adds_its_rule_on_import() -> None:
    from fedsilo.models.pn import PopulationNorm, population_norm_grad_sample

    assert grad_samplers._ADDED_RULES[PopulationNorm] is population_norm_grad_sample


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_convolution_rules_are_exact_for_channels_last_inputs(dims: int, stride: int) -> None:
    """Opacus 1.6's conv rule alone is wrong for a channels_last input (a permuted HWC image); after
    register_grad_samplers every example's gradient equals one backward pass of that example alone."""
    from opacus.grad_sample import GradSampleModule

    register_grad_samplers()
    register_grad_samplers()  # idempotent: the rule is wrapped once
    torch.manual_seed(0)
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(3, 4, 3, padding=1, stride=stride)
    shape = (2, 3, 6, 6) if dims == 2 else (2, 3, 4, 5, 6)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = torch.randn(*shape).to(memory_format=fmt)
    assert not x.is_contiguous()
    want = [torch.autograd.grad(conv(x[i : i + 1]).square().sum(), [conv.weight, conv.bias]) for i in range(2)]
    gsm = GradSampleModule(conv, batch_first=True, loss_reduction="sum")
    try:
        gsm(x).square().sum().backward()
        for i in range(2):
            torch.testing.assert_close(conv.weight.grad_sample[i], want[i][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(conv.bias.grad_sample[i], want[i][1], rtol=1e-5, atol=1e-5)
    finally:
        gsm._close()
    rule = GradSampleModule.GRAD_SAMPLERS[type(conv)]
    assert getattr(rule, "fedsilo_contiguous", False)
