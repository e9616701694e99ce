"""Tests of fedsilo.models.pn: Population Normalization (Wang et al., CVPR 2025) and its use in the UNet and DP-SGD."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.losses import DiceCELoss
from torch import nn

from fedsilo.models import (
    Architecture,
    ModelConfig,
    Norm,
    SyntheticConfig,
    TrainConfig,
    build_model,
    local_parameter_names,
    model_fingerprint,
    silo_splits,
    train_local,
)
from fedsilo.models.pn import (
    MONAI_NORM_NAME,
    PN_EPS,
    PopulationNorm,
    pn_norm_spec,
    population_norm_grad_sample,
    register_monai_norm,
)
from fedsilo.privacy.dpsgd import dp_sgd_gradients, make_private_compatible, register_grad_samplers

SMALL_PN = ModelConfig(channels=(4, 8, 16), strides=(2, 2), norm=Norm.PN)
DATA = SyntheticConfig(image_size=32, n_train=6, n_val=0, n_test=0)
PARAMS = ("mean", "log_var", "weight", "bias")


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    return silo_splits(DATA, 0).train


@pytest.fixture(scope="module")
def pn_unet() -> nn.Module:
    return build_model(SMALL_PN)


def _randomised(layer: PopulationNorm, seed: int, dtype: torch.dtype = torch.float64) -> PopulationNorm:
    """The layer in ``dtype`` with random μ, ρ, γ (both signs), β."""
    gen = torch.Generator().manual_seed(seed)
    layer = layer.to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    return layer


def _reference(layer: PopulationNorm, x: torch.Tensor) -> torch.Tensor:
    """The issue's formula y = (x − μ) / √(σ² + ε) · γ + β with σ² = exp(ρ), written out in float64."""
    shape = (1, layer.num_features) + (1,) * (x.dim() - 2)
    p = {n: getattr(layer, n).detach().double().view(shape) for n in PARAMS}
    return (x.double() - p["mean"]) / torch.sqrt(p["log_var"].exp() + layer.eps) * p["weight"] + p["bias"]


# --- the layer -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 5), (3, 4, 5, 6), (2, 4, 3, 4, 5)])
def test_forward_is_the_formula(shape: tuple[int, ...]) -> None:
    layer = _randomised(PopulationNorm(4), seed=1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(layer(x), _reference(layer, x), rtol=1e-12, atol=1e-12)
    layer.eval()  # no mode-dependent behaviour: no batch statistics, no buffers
    assert torch.allclose(layer(x), _reference(layer, x), rtol=1e-12, atol=1e-12)


def test_parameters_only_no_buffers_and_initial_values() -> None:
    layer = PopulationNorm(3)
    assert [n for n, _ in layer.named_parameters()] == list(PARAMS)
    assert list(layer.buffers()) == []
    assert list(layer.state_dict()) == list(PARAMS)
    assert torch.equal(layer.mean, torch.zeros(3)) and torch.equal(layer.log_var, torch.zeros(3))
    assert torch.equal(layer.weight, torch.ones(3)) and torch.equal(layer.bias, torch.zeros(3))
    assert torch.equal(layer.variance, torch.ones(3))
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(layer(x), x / math.sqrt(1 + PN_EPS), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_identity_with_zero_mean_unit_minus_eps_variance(eps: float) -> None:
    """μ = 0, σ² = 1 − ε (ρ = log(1 − ε)), γ = 1, β = 0: y = x / √(1 − ε + ε) = x."""
    layer = PopulationNorm(5, eps=eps).double()
    with torch.no_grad():
        layer.log_var.fill_(math.log1p(-eps))
    x = torch.randn(4, 5, 7, 3, dtype=torch.float64)
    assert torch.allclose(layer(x), x, rtol=1e-14, atol=0.0)
    assert torch.allclose(layer.inv_std(), torch.ones(5, dtype=torch.float64), rtol=1e-15, atol=0.0)


@settings(max_examples=40, deadline=None)
@given(
    pool=st.integers(0, 2**31 - 1),
    batches=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=7), min_size=1, max_size=4),
)
def test_output_of_an_example_does_not_depend_on_its_batch(pool: int, batches: list[list[int]]) -> None:
    """Any batch composition (repeats included) gives every example exactly its output alone."""
    gen = torch.Generator().manual_seed(pool)
    layer = _randomised(PopulationNorm(3), seed=pool % 1000, dtype=torch.float32)
    examples = torch.randn(6, 3, 5, 4, generator=gen)
    alone = [layer(examples[i : i + 1])[0] for i in range(6)]
    for train in (True, False):
        layer.train(train)
        for idx in batches:
            out = layer(examples[idx])
            for row, i in enumerate(idx):
                assert torch.equal(out[row], alone[i])


@settings(max_examples=8, deadline=None)
@given(batches=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=4), min_size=1, max_size=2))
def test_pn_unet_output_does_not_depend_on_its_batch(pn_unet: nn.Module, batches: list[list[int]]) -> None:
    """The whole PN network (training mode) maps each image as it would alone, up to float rounding."""
    model = pn_unet
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        alone = [model(images[i : i + 1])[0] for i in range(4)]
        for idx in batches:
            out = model(images[idx])
            for row, i in enumerate(idx):
                assert torch.allclose(out[row], alone[i], rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(log_var=st.floats(allow_nan=False, allow_infinity=False, width=32), eps=st.sampled_from([1e-5, 0.1]))
def test_variance_stays_positive_and_the_output_finite(log_var: float, eps: float) -> None:
    """σ² = exp(ρ) > 0 wherever float32 can hold it, and for every finite ρ the normaliser
    (σ² + ε)^(−½) is finite and at most ε^(−½), and output and gradients are finite."""
    layer = PopulationNorm(2, eps=eps)
    with torch.no_grad():
        layer.log_var.fill_(log_var)
        layer.mean.copy_(torch.tensor([1e3, -1e3]))
    inv = layer.inv_std()
    assert torch.isfinite(inv).all() and (inv >= 0).all() and (inv <= eps**-0.5 * (1 + 1e-6)).all()
    if -80.0 <= log_var <= 80.0:  # exp(ρ) representable in float32: strictly positive and exact
        assert (layer.variance > 0).all()
        want = 1.0 / math.sqrt(math.exp(log_var) + eps)
        assert torch.allclose(inv.double(), torch.full((2,), want, dtype=torch.float64), rtol=1e-5, atol=0.0)
    x = 100.0 * torch.randn(3, 2, 4, 4)
    y = layer(x)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_gradients_reach_all_four_parameters() -> None:
    layer = _randomised(PopulationNorm(3), seed=3)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    (layer(x) * torch.randn_like(x)).sum().backward()
    for name in PARAMS:
        grad = getattr(layer, name).grad
        assert grad is not None and grad.shape == (3,) and (grad != 0).all(), name
    # the gradient is that of the formula (autograd through the reference, float64)
    ref = copy.deepcopy(layer)
    ref.zero_grad(set_to_none=True)
    shape = (1, 3, 1, 1)
    w = torch.randn_like(x)
    ((x - ref.mean.view(shape)) / torch.sqrt(ref.log_var.exp().view(shape) + ref.eps) * ref.weight.view(shape)
     + ref.bias.view(shape)).mul(w).sum().backward()
    layer.zero_grad(set_to_none=True)
    (layer(x) * w).sum().backward()
    for name in PARAMS:
        assert torch.allclose(getattr(layer, name).grad, getattr(ref, name).grad, rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"num_features": 0}, "num_features"),
    ({"num_features": 2.0}, "num_features"),
    ({"num_features": 2, "eps": 0.0}, "eps"),
    ({"num_features": 2, "eps": math.nan}, "eps"),
    ({"num_features": 2, "eps": 2.0}, "eps"),
])
def test_layer_rejects_bad_arguments(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"PopulationNorm.{field}"):
        PopulationNorm(**kwargs)  # type: ignore[arg-type]


def test_layer_rejects_a_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match=r"PopulationNorm\(3\)"):
        PopulationNorm(3)(torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="pn_norm_spec.eps"):
        pn_norm_spec(eps=-1.0)


def test_monai_factory_registration_is_idempotent() -> None:
    from monai.networks.layers import get_norm_layer

    assert register_monai_norm() == register_monai_norm() == MONAI_NORM_NAME
    for dims in (1, 2, 3):
        layer = get_norm_layer(pn_norm_spec(eps=1e-3), spatial_dims=dims, channels=6)
        assert type(layer) is PopulationNorm and layer.num_features == 6 and layer.eps == 1e-3


# --- in the networks ---------------------------------------------------------------------------


def test_unet_with_pn_builds_trains_and_has_its_own_fingerprint(data) -> None:  # type: ignore[no-untyped-def]
    assert ModelConfig.from_mapping({"norm": "pn"}).norm is Norm.PN
    assert ModelConfig.from_mapping({"norm": "PN", "norm_groups": 3}).norm is Norm.PN  # groups ignored
    model = build_model(SMALL_PN)
    pns = [m for m in model.modules() if isinstance(m, PopulationNorm)]
    assert pns and not any(isinstance(m, nn.InstanceNorm2d | nn.GroupNorm) for m in model.modules())
    assert list(model.buffers()) == []
    instance = build_model(ModelConfig(channels=(4, 8, 16), strides=(2, 2), norm=Norm.INSTANCE))
    assert model_fingerprint(model) != model_fingerprint(instance)
    assert model_fingerprint(model) == model_fingerprint(build_model(SMALL_PN))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_local(model, data, TrainConfig(batch_size=len(data), lr=1e-2), round_index=0)
    assert result.steps == 1 and math.isfinite(result.loss)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    pn_names = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in PARAMS and
                isinstance(model.get_submodule(n.rsplit(".", 1)[0]), PopulationNorm)}
    assert len(pn_names) == 4 * len(pns)
    assert pn_names <= moved  # μ, ρ, γ, β of every PN layer were trained by the step
    assert model_fingerprint(model) != model_fingerprint(build_model(SMALL_PN))


def test_unetr_decoder_takes_pn() -> None:
    cfg = ModelConfig(architecture=Architecture.UNETR, norm=Norm.PN, image_size=16, feature_size=4,
                      hidden_size=8, mlp_dim=8, num_heads=2)
    model = build_model(cfg)
    assert any(isinstance(m, PopulationNorm) for m in model.modules())
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())  # the transformer keeps LayerNorm
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 2, 16, 16)
    assert make_private_compatible(model) is model


def test_pn_layers_are_normalisation_layers_for_the_methods() -> None:
    """FedAvg shares μ, ρ, γ, β; FedBN keeps them local (PN is a norm layer); SioBN shares them
    (it keeps only running statistics, which are buffers, local: PN has none)."""
    from fedsilo.silo_agent.methods.fedavg import FedAvg
    from fedsilo.silo_agent.methods.fedbn import FedBN
    from fedsilo.silo_agent.methods.siobn import SioBN

    model = build_model(SMALL_PN)
    pn_names = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, PopulationNorm) for p in PARAMS}
    assert local_parameter_names(model) == frozenset(pn_names)
    assert pn_names <= set(FedAvg().shared_names(model))
    assert not pn_names & set(FedBN().shared_names(model))
    assert pn_names <= set(SioBN().shared_names(model))


# --- DP-SGD: exact per-sample gradients ----------------------------------------------------------


@pytest.fixture
def no_functorch(monkeypatch):  # type: ignore[no-untyped-def]
    """Fails any use of Opacus' functorch fallback (a layer type without a registered rule)."""
    import opacus.grad_sample.grad_sample_module as gsm_mod

    def fail(module, *args):  # type: ignore[no-untyped-def]
        raise AssertionError(f"functorch fallback used for {type(module).__name__}")

    monkeypatch.setattr(gsm_mod, "ft_compute_per_sample_gradient", fail)


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 5), (3, 4, 5, 6), (2, 4, 3, 2, 3)])
@pytest.mark.parametrize("frozen", [(), ("log_var", "bias")])
def test_grad_sample_rule_matches_one_backward_per_example(shape, frozen, no_functorch) -> None:  # type: ignore[no-untyped-def]
    from opacus.grad_sample import GradSampleModule

    register_grad_samplers()
    assert GradSampleModule.GRAD_SAMPLERS[PopulationNorm] is population_norm_grad_sample
    layer = _randomised(PopulationNorm(4, eps=0.3), seed=11)  # large ε: w = σ²/(σ²+ε) far from 1
    for name in frozen:
        getattr(layer, name).requires_grad_(False)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)

    def losses(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # a nonlinear per-example loss
        return (out * weights).flatten(1).sum(1) + out.square().flatten(1).mean(1)

    gsm = GradSampleModule(nn.Sequential(layer), batch_first=True, loss_reduction="mean", strict=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            losses(gsm(x), w).mean().backward()
        samples = {n: p.grad_sample.detach().clone() for n, p in layer.named_parameters() if p.requires_grad}
    finally:
        gsm._close()
    assert samples.keys() == set(PARAMS) - set(frozen)
    for i in range(shape[0]):
        layer.zero_grad(set_to_none=True)
        losses(layer(x[i : i + 1]), w[i : i + 1]).mean().backward()
        for n, got in samples.items():
            ref = getattr(layer, n).grad
            assert got[i].shape == ref.shape
            assert torch.allclose(got[i], ref, rtol=1e-10, atol=1e-12), (n, i)


def _loss(model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return DiceCELoss(softmax=True, to_onehot_y=True)(model(images), masks)


def _flat_norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))


def test_dp_sgd_on_the_pn_unet_clips_exact_per_example_gradients(data, no_functorch) -> None:  # type: ignore[no-untyped-def]
    """Known answer: DP-SGD's clipped sum (σ = 0) equals Σ_i min(1, C/‖g_i‖)·g_i / B from one
    ordinary backward pass per example, on a PN UNet with every trainable layer on a closed-form rule."""
    model = build_model(SMALL_PN)
    assert make_private_compatible(model) is model  # nothing to fix: PN has no buffers
    with torch.no_grad():  # move PN off its initial values so every term of the rule matters
        gen = torch.Generator().manual_seed(4)
        for m in model.modules():
            if isinstance(m, PopulationNorm):
                for p in m.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
    images, masks = data.images[:4], data.masks[:4]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per_example = []
    for i in range(4):
        model.zero_grad(set_to_none=True)
        _loss(model, images[i : i + 1], masks[i : i + 1]).backward()
        per_example.append({n: p.grad.detach().clone() for n, p in params})
    model.zero_grad(set_to_none=True)
    norms = sorted(_flat_norm(g) for g in per_example)
    clip = 0.5 * (norms[1] + norms[2])  # two examples clipped, two not
    got = dp_sgd_gradients(model, images, masks, max_grad_norm=clip, noise_multiplier=0.0, expected_batch_size=4)
    want = {n: torch.zeros_like(t) for n, t in per_example[0].items()}
    for g in per_example:
        factor = min(1.0, clip / (_flat_norm(g) + 1e-6))  # Opacus' clip factor
        for n in want:
            want[n] += factor * g[n] / 4
    assert _flat_norm({n: got[n] - want[n] for n in want}) <= 1e-5 * _flat_norm(want)
    pn_keys = [n for n in want if n.endswith(".log_var")]
    assert pn_keys and all(_flat_norm({n: got[n]}) > 0 for n in pn_keys)
