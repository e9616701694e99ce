"""Contract of the sharing Strategy seam, run on every implementation."""

import pytest
import torch

from fedsilo.coordinator.config import Strategy as StrategyName
from fedsilo.models import ModelConfig, Norm, build_model, local_parameter_names
from fedsilo.silo_agent.strategies import STRATEGIES, FedAvg, FedBN, strategy_for

MODELS = {
    "instance": ModelConfig(channels=(4, 8, 16), strides=(2, 2), norm=Norm.INSTANCE),
    "group": ModelConfig(channels=(4, 8, 16), strides=(2, 2), norm=Norm.GROUP),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("model_key", list(MODELS))
def test_contract(name: StrategyName, model_key: str) -> None:
    model = build_model(MODELS[model_key])
    strategy = strategy_for(name)
    shared = strategy.shared_names(model)
    sd = model.state_dict()
    keys = list(sd)
    # shared names are state_dict entries, in state_dict order, floating point, without duplicates
    assert shared == [k for k in keys if k in set(shared)]
    assert len(set(shared)) == len(shared)
    assert all(sd[k].is_floating_point() for k in shared)
    # at least the convolution weights are shared: otherwise nothing is federated
    conv_weights = [k for k, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv_weights and all(f"{k}.weight" in shared for k in conv_weights)
    # deterministic: the same model gives the same list (all silos must agree on the manifest)
    assert strategy.shared_names(build_model(MODELS[model_key])) == shared


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
