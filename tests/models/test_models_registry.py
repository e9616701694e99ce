"""Tests of fedsilo.models.registry: config validation, deterministic build, fingerprint, FedBN names."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedsilo.models import (
    Architecture,
    ModelConfig,
    Norm,
    SyntheticConfig,
    build_model,
    local_parameter_names,
    model_fingerprint,
    parameter_count,
    silo_splits,
)


@pytest.fixture(scope="module")
def default_model() -> nn.Module:
    return build_model(ModelConfig())


def test_defaults() -> None:
    cfg = ModelConfig()
    assert cfg.architecture is Architecture.UNET2D
    assert (cfg.in_channels, cfg.out_channels) == (1, 2)
    assert cfg.channels == (8, 16, 32, 64)
    assert cfg.strides == (2, 2, 2)
    assert cfg.num_res_units == 1
    assert cfg.norm is Norm.INSTANCE
    assert cfg.dropout == 0.0
    assert cfg.seed == 0


def test_default_model_shape_and_size(default_model: nn.Module) -> None:
    # Known answer for MONAI 1.6 UNet(8,16,32,64 / 2,2,2, 1 residual unit, affine InstanceNorm).
    assert parameter_count(default_model) == 52117
    out = default_model(torch.zeros(2, 1, 64, 64))
    assert out.shape == (2, 2, 64, 64)


def test_same_config_gives_identical_weights_and_fingerprint(default_model: nn.Module) -> None:
    again = build_model(ModelConfig())
    a, b = default_model.state_dict(), again.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    fp = model_fingerprint(default_model)
    assert fp == model_fingerprint(again)
    assert len(fp) == 64 and int(fp, 16) >= 0


def test_fingerprint_detects_seed_architecture_and_value_changes(default_model: nn.Module) -> None:
    fp = model_fingerprint(default_model)
    assert model_fingerprint(build_model(ModelConfig(seed=1))) != fp
    assert model_fingerprint(build_model(ModelConfig(channels=(8, 16, 32, 32)))) != fp
    assert model_fingerprint(build_model(ModelConfig(norm=Norm.GROUP))) != fp
    assert model_fingerprint(build_model(ModelConfig(norm=Norm.PN))) != fp
    tweaked = build_model(ModelConfig())
    with torch.no_grad():
        first = next(iter(tweaked.parameters()))
        first.view(-1)[0] = torch.nextafter(first.view(-1)[0], torch.tensor(10.0))
    assert model_fingerprint(tweaked) != fp
    assert model_fingerprint(build_model(ModelConfig()).double()) != fp
    assert model_fingerprint(build_model(ModelConfig(dropout=0.1))) != fp


def test_fingerprint_covers_names_and_shapes() -> None:
    a = nn.Sequential(nn.Linear(2, 2, bias=False))
    b = nn.Sequential()
    b.add_module("other", nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        b.other.weight.copy_(a[0].weight)
    assert model_fingerprint(a) != model_fingerprint(b)
    flat = nn.Sequential(nn.Linear(4, 1, bias=False))
    square = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        flat[0].weight.copy_(torch.arange(4.0).reshape(1, 4))
        square[0].weight.copy_(torch.arange(4.0).reshape(2, 2))
    assert model_fingerprint(flat) != model_fingerprint(square)


def test_build_does_not_disturb_global_rng() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_model(ModelConfig(seed=7))
    assert torch.equal(torch.rand(3), expected)


def test_model_and_data_are_identical_in_another_process(default_model: nn.Module) -> None:
    code = (
        "import hashlib\n"
        "from fedsilo.models import ModelConfig, SyntheticConfig, build_model, model_fingerprint, silo_splits\n"
        "print(model_fingerprint(build_model(ModelConfig())))\n"
        "s = silo_splits(SyntheticConfig(n_train=4, n_val=1, n_test=1), 2).train\n"
        "print(hashlib.sha256(s.images.numpy().tobytes() + s.masks.numpy().tobytes()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    here = silo_splits(SyntheticConfig(n_train=4, n_val=1, n_test=1), 2).train
    data_digest = hashlib.sha256(here.images.numpy().tobytes() + here.masks.numpy().tobytes()).hexdigest()
    assert out.stdout.split() == [model_fingerprint(default_model), data_digest]


def test_local_parameter_names_of_unet(default_model: nn.Module) -> None:
    names = local_parameter_names(default_model)
    keys = set(default_model.state_dict())
    assert names <= keys
    norms = [m for m in default_model.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 9
    assert len(names) == 2 * len(norms)  # affine weight + bias, no running stats
    assert all(n.endswith((".N.weight", ".N.bias")) for n in names)
    assert not any("conv.weight" in n for n in names)


def test_local_parameter_names_of_group_norm_unet() -> None:
    model = build_model(ModelConfig(norm=Norm.GROUP, norm_groups=2))
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 2 for m in norms)
    assert len(local_parameter_names(model)) == 2 * len(norms)


def test_local_parameter_names_of_pn_unet() -> None:
    from fedsilo.models.pn import PopulationNorm

    model = build_model(ModelConfig(norm=Norm.PN, norm_groups=3))  # norm_groups is ignored for PN
    norms = [m for m in model.modules() if isinstance(m, PopulationNorm)]
    assert len(norms) == 9 and not list(model.buffers())
    names = local_parameter_names(model)
    assert len(names) == 4 * len(norms)  # learned mean and log-variance, affine weight and bias
    assert {n.rsplit(".", 1)[1] for n in names} == {"mean", "log_var", "weight", "bias"}
    # 4 per channel instead of InstanceNorm's 2: 2 * (sum of the normalised channels) more
    assert parameter_count(model) - parameter_count(build_model(ModelConfig())) == 2 * sum(
        m.num_features for m in norms
    )


def test_local_parameter_names_cover_every_norm_kind() -> None:
    from fedsilo.models.pn import PopulationNorm

    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.LayerNorm(4 * 6 * 6),
        nn.Linear(4 * 6 * 6, 2),
        PopulationNorm(2),
    )
    expected = {
        "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
        "2.weight", "2.bias", "2.running_mean", "2.running_var", "2.num_batches_tracked",
        "3.weight", "3.bias",
        "5.weight", "5.bias",
        "7.mean", "7.log_var", "7.weight", "7.bias",
    }  # fmt: skip
    assert local_parameter_names(model) == frozenset(expected)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"architecture": "unet2d"}, "architecture"),
        ({"in_channels": 0}, "in_channels"),
        ({"in_channels": True}, "in_channels"),
        ({"out_channels": 1}, "out_channels"),
        ({"channels": [8, 16]}, "channels"),
        ({"channels": (8,), "strides": ()}, "channels"),
        ({"channels": (8, 0), "strides": (2,)}, "channels[1]"),
        ({"strides": (2, 2)}, "strides"),
        ({"strides": (2, 2, 0)}, "strides[2]"),
        ({"num_res_units": -1}, "num_res_units"),
        ({"norm": "instance"}, "norm"),
        ({"norm": Norm.GROUP, "norm_groups": 3}, "norm_groups"),
        ({"norm_groups": 0}, "norm_groups"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"ModelConfig.{field}")):
        ModelConfig(**kwargs)  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    cfg = ModelConfig()
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]


def test_from_mapping_accepts_toml_values() -> None:
    cfg = ModelConfig.from_mapping(
        {"architecture": "unet2d", "channels": [4, 8, 16], "strides": [2, 2], "norm": "GROUP", "dropout": 0}
    )
    assert cfg == ModelConfig(channels=(4, 8, 16), strides=(2, 2), norm=Norm.GROUP, dropout=0.0)
    assert ModelConfig.from_mapping({"norm": "pn"}) == ModelConfig(norm=Norm.PN)
    assert ModelConfig.from_mapping({}) == ModelConfig()


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        ({"chanels": [8, 16]}, "chanels"),
        ({"norm": "batch"}, "norm"),
        ({"architecture": "vit"}, "architecture"),
        ({"channels": "8,16"}, "channels"),
        ({"channels": [8, "16"], "strides": [2]}, r"channels\[1\]"),
        ({"seed": "0"}, "seed"),
        ({"dropout": "0.1"}, "dropout"),
        ({"in_channels": 1.0}, "in_channels"),
    ],
)
def test_from_mapping_names_the_bad_key(mapping: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_mapping(mapping)


def test_from_mapping_rejects_non_mapping() -> None:
    with pytest.raises(ValueError, match="mapping"):
        ModelConfig.from_mapping([("seed", 1)])  # type: ignore[arg-type]


@st.composite
def model_configs(draw: st.DrawFn) -> ModelConfig:
    depth = draw(st.integers(min_value=2, max_value=5))
    channels = tuple(draw(st.lists(st.sampled_from([2, 4, 8, 16]), min_size=depth, max_size=depth)))
    strides = tuple(draw(st.lists(st.integers(1, 3), min_size=depth - 1, max_size=depth - 1)))
    return ModelConfig(
        in_channels=draw(st.integers(1, 4)),
        out_channels=draw(st.sampled_from([2, 4])),
        channels=channels,
        strides=strides,
        num_res_units=draw(st.integers(0, 3)),
        norm=draw(st.sampled_from(list(Norm))),
        norm_groups=draw(st.sampled_from([1, 2])),
        dropout=draw(st.floats(0.0, 0.9)),
        seed=draw(st.integers(0, 2**63 - 1)),
    )


@settings(max_examples=50, deadline=None)
@given(model_configs())
def test_to_mapping_round_trips(cfg: ModelConfig) -> None:
    plain = cfg.to_mapping()
    assert all(isinstance(v, (int, float, str, list)) for v in plain.values())
    assert ModelConfig.from_mapping(plain) == cfg
