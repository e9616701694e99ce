"""Tests of fedsilo.models.lora and the UNETR backbone: targets, frozen base, deterministic init, ΔW."""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.models import (
    Architecture,
    LoraSettings,
    ModelConfig,
    Norm,
    SyntheticConfig,
    TrainConfig,
    add_lora,
    build_lora_model,
    build_model,
    default_target_modules,
    from_matrix,
    local_parameter_names,
    lora_layers,
    lora_parameter_names,
    merged_delta,
    model_fingerprint,
    parameter_count,
    silo_splits,
    to_matrix,
    train_local,
)
from fedsilo.models.dp_training import train_local_dp
from fedsilo.privacy.dpsgd import DpSgdConfig, make_private_compatible

DATA = SyntheticConfig(image_size=32, n_train=8, n_val=0, n_test=0)
SMALL_UNET = ModelConfig(channels=(4, 8, 16), strides=(2, 2))
SMALL_UNETR = ModelConfig(
    architecture=Architecture.UNETR, image_size=32, feature_size=4, hidden_size=32, mlp_dim=32, num_heads=2
)
SETTINGS = LoraSettings(rank=2, alpha=6.0)
DP_ONE_STEP = DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=1)


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    return silo_splits(DATA, 0).train


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _randomise_b(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for layer in lora_layers(model):
            b = params[layer.b_name]
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))


# -- settings -----------------------------------------------------------------------------


def test_settings_defaults_and_mapping_round_trip() -> None:
    s = LoraSettings()
    assert (s.rank, s.alpha, s.target_modules, s.init_seed) == (4, 8.0, (), 0)
    assert s.scaling == 2.0
    custom = LoraSettings(rank=3, alpha=1.5, target_modules=("qkv", "out_proj"), init_seed=9)
    plain = custom.to_mapping()
    assert plain == {"rank": 3, "alpha": 1.5, "target_modules": ["qkv", "out_proj"], "init_seed": 9}
    assert LoraSettings.from_mapping(plain) == custom
    assert LoraSettings.from_mapping({}) == LoraSettings()
    with pytest.raises(AttributeError):
        s.rank = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.0}, "rank"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"alpha": "8"}, "alpha"),
        ({"target_modules": ["qkv"]}, "target_modules"),
        ({"target_modules": ("",)}, "target_modules[0]"),
        ({"target_modules": ("qkv", "qkv")}, "target_modules"),
        ({"init_seed": -1}, "init_seed"),
    ],
)
def test_settings_reject_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"LoraSettings.{field}")):
        LoraSettings(**kwargs)  # type: ignore[arg-type]


def test_settings_from_mapping_names_unknown_key() -> None:
    with pytest.raises(ValueError, match="ranks"):
        LoraSettings.from_mapping({"ranks": 4})


# -- injection ----------------------------------------------------------------------------


def test_unet_default_targets_are_exactly_the_conv2d_layers() -> None:
    plain = build_model(SMALL_UNET)
    convs = [n for n, m in plain.named_modules() if type(m) is nn.Conv2d]
    transposed = [n for n, m in plain.named_modules() if isinstance(m, nn.ConvTranspose2d)]
    assert convs and transposed
    assert default_target_modules(plain, Architecture.UNET2D) == convs
    model = add_lora(build_model(SMALL_UNET), SETTINGS, architecture=Architecture.UNET2D)
    layers = lora_layers(model)
    assert [layer.module for layer in layers] == convs
    assert all(layer.kind == "conv" and layer.rank == 2 for layer in layers)
    assert all(layer.scaling == pytest.approx(3.0) for layer in layers)
    names = {n for n, _ in model.named_modules()}
    assert not any(f"{t}.lora_A" in names for t in transposed)  # no adapters on up-convolutions
    for layer in layers:
        assert layer.a_name == f"{layer.module}.lora_A.default.weight"
        assert layer.b_name == f"{layer.module}.lora_B.default.weight"
        assert layer.weight_name == f"{layer.module}.base_layer.weight"
        c_out, c_in, k, k2 = layer.weight_shape
        assert layer.a_shape == (2, c_in, k, k2) and layer.b_shape == (c_out, 2, 1, 1)


def test_explicit_targets_adapt_only_the_matching_modules() -> None:
    model = add_lora(
        build_model(SMALL_UNET), LoraSettings(target_modules=("residual",)), architecture=Architecture.UNET2D
    )
    modules = [layer.module for layer in lora_layers(model)]
    assert modules and all(m.endswith(".residual") for m in modules)
    plain = build_model(SMALL_UNET)
    assert len(modules) == sum(1 for n, m in plain.named_modules() if n.endswith("residual") and type(m) is nn.Conv2d)


def test_bad_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="matches no nn.Conv2d or nn.Linear"):
        add_lora(build_model(SMALL_UNET), LoraSettings(target_modules=("qkv",)), architecture=Architecture.UNET2D)
    transposed = next(n for n, m in build_model(SMALL_UNET).named_modules() if isinstance(m, nn.ConvTranspose2d))
    with pytest.raises(ValueError, match="ConvTranspose2d"):
        add_lora(build_model(SMALL_UNET), LoraSettings(target_modules=(transposed,)), architecture=Architecture.UNET2D)
    model = add_lora(build_model(SMALL_UNET), SETTINGS, architecture=Architecture.UNET2D)
    with pytest.raises(ValueError, match="already"):
        add_lora(model, SETTINGS, architecture=Architecture.UNET2D)


def test_only_lora_factors_are_trainable() -> None:
    model = build_lora_model(SMALL_UNET, SETTINGS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == lora_parameter_names(model)
    assert len(trainable) == 2 * len(lora_layers(model))
    assert parameter_count(model) == sum(
        math.prod(layer.a_shape) + math.prod(layer.b_shape) for layer in lora_layers(model)
    )
    assert lora_layers(build_model(SMALL_UNET)) == []


def test_a_is_seeded_b_is_zero_and_global_rng_is_untouched() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    one = build_lora_model(SMALL_UNET, SETTINGS)
    assert torch.equal(torch.rand(3), expected)
    two = build_lora_model(SMALL_UNET, SETTINGS)
    other = build_lora_model(SMALL_UNET, LoraSettings(rank=2, alpha=6.0, init_seed=1))
    s1, s2, s3 = _state(one), _state(two), _state(other)
    for layer in lora_layers(one):
        assert torch.equal(s1[layer.a_name], s2[layer.a_name])
        assert not torch.equal(s1[layer.a_name], s3[layer.a_name])
        assert s1[layer.a_name].abs().sum() > 0
        assert not torch.any(s1[layer.b_name])
        fan_in = math.prod(layer.a_shape[1:])
        assert s1[layer.a_name].abs().max() <= 1.0 / math.sqrt(fan_in) + 1e-7  # kaiming_uniform(a=sqrt(5))
    assert model_fingerprint(one) == model_fingerprint(two) != model_fingerprint(other)


@pytest.mark.parametrize("cfg", [SMALL_UNET, SMALL_UNETR], ids=["unet", "unetr"])
def test_output_equals_the_base_exactly_at_init(cfg: ModelConfig) -> None:
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    base = build_model(cfg).eval()
    lora = build_lora_model(cfg, SETTINGS).eval()
    with torch.no_grad():
        assert torch.equal(lora(x), base(x))
        _randomise_b(lora)
        assert not torch.allclose(lora(x), base(x))


@pytest.mark.parametrize("cfg", [SMALL_UNET, SMALL_UNETR], ids=["unet", "unetr"])
def test_merged_delta_is_scaled_b_times_a_and_reproduces_the_output(cfg: ModelConfig) -> None:
    lora = build_lora_model(cfg, SETTINGS).eval()
    _randomise_b(lora)
    deltas = merged_delta(lora)
    state = _state(lora)
    layers = lora_layers(lora)
    assert list(deltas) == [layer.module for layer in layers]
    for layer in layers:
        a, b = state[layer.a_name], state[layer.b_name]
        if layer.kind == "conv":
            manual = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        else:
            manual = b @ a
        assert layer.scaling == SETTINGS.scaling
        torch.testing.assert_close(deltas[layer.module], SETTINGS.scaling * manual, rtol=1e-6, atol=1e-9)
        peft_delta = lora.get_submodule(layer.module).get_delta_weight("default")
        # peft computes the same float32 products in another order (a conv, not an einsum): a few ulp apart
        torch.testing.assert_close(deltas[layer.module], peft_delta, rtol=1e-5, atol=1e-8)
    # The plain network with W + ΔW computes what the adapted one computes.
    merged = build_model(cfg).eval()
    base_state = merged.state_dict()
    with torch.no_grad():
        for layer in layers:
            key = f"{layer.module}.weight"
            base_state[key] = state[layer.weight_name] + deltas[layer.module]
    merged.load_state_dict(base_state)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), lora(x), rtol=1e-4, atol=1e-5)


def test_matrix_round_trip() -> None:
    lora = build_lora_model(SMALL_UNET, SETTINGS)
    state = _state(lora)
    layer = next(layer for layer in lora_layers(lora) if layer.weight_shape[2] == 3)
    a, b = state[layer.a_name], state[layer.b_name]
    a_m, b_m = to_matrix(a), to_matrix(b)
    assert tuple(a_m.shape) == layer.a_matrix_shape == (2, layer.weight_shape[1] * 9)
    assert tuple(b_m.shape) == layer.b_matrix_shape == (layer.weight_shape[0], 2)
    assert torch.equal(from_matrix(a_m, layer.a_shape), a)
    assert torch.equal(from_matrix(b_m, layer.b_shape), b)
    arr = np.arange(24.0).reshape(2, 3, 2, 2)
    assert np.array_equal(from_matrix(to_matrix(arr), arr.shape), arr)
    lin = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(to_matrix(lin), lin)
    with pytest.raises(ValueError, match="does not fit"):
        from_matrix(a_m, layer.b_shape)
    with pytest.raises(ValueError, match="at least 2"):
        to_matrix(torch.zeros(3))
    with pytest.raises(ValueError, match="does not fit"):
        from_matrix(torch.zeros(2, 3, 1), (2, 3, 1))


# -- training keeps the base frozen -----------------------------------------------------


def _check_only_lora_changed(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = _state(model)
    lora_names = set(lora_parameter_names(model))
    assert before.keys() == after.keys()
    for key in before:
        if key in lora_names:
            continue
        assert torch.equal(before[key], after[key]), f"frozen {key} changed"
    changed_b = [k for k in lora_names if ".lora_B." in k and not torch.equal(before[k], after[k])]
    assert changed_b, "no LoRA B factor moved"


def test_train_local_changes_only_lora_factors(data) -> None:  # type: ignore[no-untyped-def]
    model = build_lora_model(SMALL_UNET, SETTINGS)
    before = _state(model)
    train_local(model, data, TrainConfig(batch_size=4), round_index=0)
    _check_only_lora_changed(before, model)
    assert local_parameter_names(model) <= set(before)  # FedBN names still resolve after injection


@pytest.mark.parametrize("cfg", [SMALL_UNET, SMALL_UNETR], ids=["unet", "unetr"])
def test_dp_sgd_step_changes_only_lora_factors(data, cfg: ModelConfig) -> None:  # type: ignore[no-untyped-def]
    model = build_lora_model(cfg, SETTINGS)
    assert make_private_compatible(model) is model
    before = _state(model)
    result = train_local_dp(model, data, TrainConfig(), DP_ONE_STEP, round_index=0, noise_seed=5)
    assert result.steps == 1
    _check_only_lora_changed(before, model)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


# -- UNETR backbone -----------------------------------------------------------------------


def test_unetr_builds_and_segments_64_pixel_images() -> None:
    cfg = ModelConfig(architecture=Architecture.UNETR, image_size=64, feature_size=4, hidden_size=32, mlp_dim=32,
                      num_heads=2, out_channels=3)
    model = build_model(cfg)
    out = model(torch.zeros(2, 1, 64, 64))
    assert out.shape == (2, 3, 64, 64)
    assert model_fingerprint(model) == model_fingerprint(build_model(cfg))
    assert model_fingerprint(model) != model_fingerprint(build_model(dataclasses.replace(cfg, seed=1)))
    assert parameter_count(model) == sum(p.numel() for p in model.parameters())  # nothing dead or frozen


def test_unetr_default_size() -> None:
    model = build_model(ModelConfig(architecture=Architecture.UNETR))
    blocks = model.vit.blocks
    assert len(blocks) == 12 and blocks[0].attn.num_heads == 4
    assert blocks[0].attn.qkv.in_features == 96 and blocks[0].mlp.linear1.out_features == 192
    assert 1_500_000 < parameter_count(model) < 2_500_000


def test_unetr_lora_sits_on_the_attention_projections() -> None:
    plain = build_model(SMALL_UNETR)
    model = build_lora_model(SMALL_UNETR, SETTINGS)
    modules = [layer.module for layer in lora_layers(model)]
    expected = {f"vit.blocks.{i}.attn.{p}" for i in range(12) for p in ("qkv", "out_proj")}
    assert set(modules) == expected and len(modules) == 24
    assert default_target_modules(plain, Architecture.UNETR) == modules
    assert all(layer.kind == "linear" for layer in lora_layers(model))
    qkv = next(layer for layer in lora_layers(model) if layer.module.endswith("qkv"))
    assert qkv.a_shape == (2, 32) and qkv.b_shape == (96, 2)
    explicit = add_lora(build_model(SMALL_UNETR), LoraSettings(rank=2, alpha=6.0, target_modules=("qkv",)),
                        architecture=Architecture.UNETR)
    assert [layer.module for layer in lora_layers(explicit)] == [m for m in modules if m.endswith("qkv")]


def test_unetr_full_network_trains_with_dp_sgd(data) -> None:  # type: ignore[no-untyped-def]
    model = make_private_compatible(build_model(SMALL_UNETR))
    before = copy.deepcopy(model.state_dict())
    train_local_dp(model, data, TrainConfig(), DP_ONE_STEP, round_index=0, noise_seed=1)
    after = model.state_dict()
    assert all(not torch.equal(before[n], after[n]) for n, p in model.named_parameters())


def test_unetr_group_norm_builds() -> None:
    cfg = dataclasses.replace(SMALL_UNETR, norm=Norm.GROUP, norm_groups=2)
    model = build_model(cfg)
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"image_size": 40}, "image_size"),
        ({"image_size": 8}, "image_size"),
        ({"num_heads": 5}, "num_heads"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"mlp_dim": 0}, "mlp_dim"),
        ({"feature_size": 6, "norm": Norm.GROUP, "norm_groups": 4}, "norm_groups"),
    ],
)
def test_unetr_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"ModelConfig.{field}")):
        ModelConfig(architecture=Architecture.UNETR, **kwargs)  # type: ignore[arg-type]


def test_unet_config_ignores_unetr_fields_and_round_trips() -> None:
    cfg = ModelConfig(image_size=48, num_heads=5)  # UNETR-only fields are not checked against each other
    assert ModelConfig.from_mapping(cfg.to_mapping()) == cfg
    unetr = ModelConfig.from_mapping({"architecture": "unetr", "image_size": 32, "hidden_size": 64})
    assert unetr.architecture is Architecture.UNETR and ModelConfig.from_mapping(unetr.to_mapping()) == unetr
