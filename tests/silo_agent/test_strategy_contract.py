"""Contract of the sharing Strategy seam, run on every implementation."""

import pytest
import torch

from fedsilo.models import ModelConfig, Norm, build_model, local_parameter_names
from fedsilo.core.phases import SharePhase, phase_manifest
from fedsilo.core.tensors import Manifest
from fedsilo.models.lora import LoraSettings, add_lora, lora_layers, lora_parameter_names
from fedsilo.core.methods import get_method, method_names
from fedsilo.silo_agent.methods import strategy_for
from fedsilo.silo_agent.methods.deer import Deer
from fedsilo.silo_agent.methods.fedavg import FedAvg
from fedsilo.silo_agent.methods.fedbn import FedBN
from fedsilo.silo_agent.methods.fedper import head_prefix
from fedsilo.silo_agent.methods.ffa_lora import FfaLora

MODELS = {
    "instance": ModelConfig(channels=(4, 8, 16), strides=(2, 2), norm=Norm.INSTANCE),
    "group": ModelConfig(channels=(4, 8, 16), strides=(2, 2), norm=Norm.GROUP),
}


@pytest.mark.parametrize("name", method_names())
@pytest.mark.parametrize("model_key", list(MODELS))
def test_contract(name: str, model_key: str) -> None:
    method = get_method(name)

    def make() -> torch.nn.Module:
        model = build_model(MODELS[model_key])
        return add_lora(model, LoraSettings(rank=2), architecture=MODELS[model_key].architecture) \
            if method.uses_lora else model

    model = make()
    strategy = strategy_for(name)
    shared = strategy.shared_names(model)
    sd = model.state_dict()
    keys = list(sd)
    # shared names are state_dict entries, in state_dict order, floating point, without duplicates
    assert shared == [k for k in keys if k in set(shared)]
    assert len(set(shared)) == len(shared)
    assert all(sd[k].is_floating_point() for k in shared)
    trainable = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    if method.uses_lora:
        # only adapter factors are shared, never the frozen base, and some of every layer's
        lora = set(lora_parameter_names(model))
        assert shared and set(shared) <= lora and set(shared) <= trainable
        assert all(layer.b_name in shared for layer in lora_layers(model))
    else:
        # at least the convolution weights are shared: otherwise nothing is federated
        # (FedPer's output head, the last convolution, is the one exception: it stays local by design)
        conv_weights = [k for k, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
                        and not (name == "fedper" and k == head_prefix(model))]
        assert conv_weights and all(f"{k}.weight" in shared for k in conv_weights)
    # every phase trains a non-empty subset of the trainable parameters, all of it shared in that phase
    for phase in SharePhase:
        if not method.alternates and phase is not SharePhase.ALL:
            continue
        strategy.set_trainable(model, phase, trainable)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and trained <= trainable
        if method.uses_lora:
            manifest = Manifest.of_arrays({k: sd[k].numpy() for k in shared})
            assert trained <= {t.name for t in phase_manifest(manifest, phase).tensors}
        strategy.set_trainable(model, SharePhase.ALL, trainable)
    # deterministic: the same model gives the same list (all silos must agree on the manifest)
    assert strategy.shared_names(make()) == shared


def test_fedavg_shares_every_float_entry() -> None:
    model = build_model(MODELS["group"])
    sd = model.state_dict()
    assert FedAvg().shared_names(model) == [k for k, v in sd.items() if v.is_floating_point()]


def test_fedbn_keeps_normalisation_local() -> None:
    model = build_model(MODELS["group"])
    local = local_parameter_names(model)
    assert local, "GroupNorm has affine parameters that FedBN must keep local"
    shared = FedBN().shared_names(model)
    assert not set(shared) & local
    assert set(shared) | local >= {k for k, v in model.state_dict().items() if v.is_floating_point()}
    assert len(shared) < len(FedAvg().shared_names(model))


def test_lora_strategies_share_and_train_the_right_factors() -> None:
    model = add_lora(build_model(MODELS["instance"]), LoraSettings(rank=2), architecture=MODELS["instance"].architecture)
    layers = lora_layers(model)
    a, b = {x.a_name for x in layers}, {x.b_name for x in layers}
    trainable = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == a | b
    assert set(FfaLora().shared_names(model)) == b
    assert set(Deer().shared_names(model)) == a | b
    deer = Deer()
    for phase, want in ((SharePhase.LORA_B, b), (SharePhase.LORA_A, a)):
        deer.set_trainable(model, phase, trainable)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    FfaLora().set_trainable(model, SharePhase.ALL, trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == b
