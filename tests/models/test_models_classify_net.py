"""Tests of the image classification network: shapes, seeded weights, config validation and Opacus compatibility."""

from __future__ import annotations

import warnings

import pytest
import torch

from fedsilo.models.classify_data import BUILTIN_CLASSES
from fedsilo.models.classify_net import ClassifyNet, ClassifyNetConfig, ClassifyNorm, build_classify_net


def test_features_and_head_have_the_documented_shapes() -> None:
    model = build_classify_net(ClassifyNetConfig())
    assert isinstance(model, ClassifyNet) and model.training
    assert (model.embed_dim, model.n_classes, model.class_names) == (64, 5, BUILTIN_CLASSES)
    assert isinstance(model.head, torch.nn.Linear) and (model.head.in_features, model.head.out_features) == (64, 5)
    assert [name for name, _ in model.named_children()] == ["features", "head"]
    x = torch.rand(4, 3, 32, 32)
    assert model.features(x).shape == (4, 64)
    assert torch.allclose(model(x), model.head(model.features(x)))
    for size in (16, 20, 48):  # any size: pooling rounds up
        assert model(torch.rand(2, 3, size, size)).shape == (2, 5)
    other = build_classify_net(ClassifyNetConfig(in_channels=1, class_names=("a", "b"), channels=(8,), embed_dim=12,
                                                 norm=ClassifyNorm.BATCH))
    assert other(torch.rand(3, 1, 10, 10)).shape == (3, 2) and other.features(torch.rand(3, 1, 10, 10)).shape == (3, 12)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in other.modules())
    with pytest.raises(ValueError, match=r"x must be a tensor \[N, 3, H, W\], got \(2, 1, 8, 8\)"):
        model(torch.rand(2, 1, 8, 8))


def test_weights_follow_the_seed() -> None:
    a = build_classify_net(ClassifyNetConfig(seed=3)).state_dict()
    b = build_classify_net(ClassifyNetConfig(seed=3)).state_dict()
    c = build_classify_net(ClassifyNetConfig(seed=4)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])
    before = torch.random.get_rng_state()
    build_classify_net(ClassifyNetConfig(seed=5))
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG is untouched


@pytest.mark.parametrize(("options", "message"), [
    ({"channels": []}, r"channels must be a non-empty list of widths, got \(\)"),
    ({"channels": [16, 0]}, r"channels must be >= 1, got 0"),
    ({"embed_dim": 0}, r"embed_dim must be >= 1, got 0"),
    ({"class_names": ["only"]}, r"class_names must be a list of at least 2 non-empty names, got \('only',\)"),
    ({"class_names": ["a", "b", "a"]}, r"class_names must be distinct, got \['a', 'b', 'a'\]"),
    ({"norm": "layer"}, r"key 'norm' must be one of 'batch', 'group', got 'layer'"),
    ({"norm_groups": 3}, r"norm_groups=3 must divide every entry of channels \[16, 32, 64\]"),
    ({"seed": -1}, r"seed must be >= 0, got -1"),
    ({"width": 2}, r"unknown key\(s\) 'width'"),
])
def test_config_names_the_bad_value(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClassifyNetConfig.from_mapping(options)


def test_config_round_trips_through_plain_values() -> None:
    cfg = ClassifyNetConfig.from_mapping({"seed": 2, "class_names": ["x", "y", "z"], "channels": [8, 16],
                                          "norm": "batch"})
    assert cfg.n_classes == 3 and cfg.norm is ClassifyNorm.BATCH and cfg.class_names == ("x", "y", "z")
    plain = cfg.to_mapping()
    assert plain["norm"] == "batch" and plain["class_names"] == ["x", "y", "z"]
    assert ClassifyNetConfig.from_mapping(plain) == cfg
    assert ClassifyNetConfig().norm is ClassifyNorm.GROUP


def test_group_norm_net_is_opacus_compatible_and_batch_norm_gets_fixed() -> None:
    from fedsilo.privacy.dpsgd import make_private_compatible

    model = build_classify_net(ClassifyNetConfig(norm=ClassifyNorm.GROUP))
    assert make_private_compatible(model) is model
    bn = build_classify_net(ClassifyNetConfig(norm=ClassifyNorm.BATCH))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = make_private_compatible(bn)
    assert fixed is not bn and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fixed.modules())
    assert isinstance(fixed.head, torch.nn.Linear) and fixed(torch.rand(2, 3, 32, 32)).shape == (2, 5)
