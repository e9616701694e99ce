"""Defining rules of the personalisation strategies not yet in the protocol (issue 7): SioBN shares
normalisation affine parameters but not running statistics; FedPer keeps exactly the output head."""

from __future__ import annotations

import torch
from torch import nn

from fedsilo.models import ModelConfig, build_model
from fedsilo.silo_agent.methods.fedper import FedPer, head_prefix
from fedsilo.silo_agent.methods.siobn import SioBN


def test_siobn_shares_affine_not_running_statistics() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    shared = set(SioBN().shared_names(net))
    assert {"1.weight", "1.bias", "0.weight", "0.bias", "3.weight", "3.bias"} <= shared
    assert not {"1.running_mean", "1.running_var"} & shared
    assert "1.num_batches_tracked" not in shared  # not floating point either way
    # on fedsilo's UNet (InstanceNorm without running statistics) nothing stays local: FedAvg
    unet = build_model(ModelConfig(channels=(4, 8, 16), strides=(2, 2)))
    assert SioBN().shared_names(unet) == [k for k, v in unet.state_dict().items() if v.is_floating_point()]


def test_fedper_keeps_exactly_the_output_head() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    assert head_prefix(net) == "2"
    assert FedPer().shared_names(net) == ["0.weight", "0.bias"]
    torch.manual_seed(0)
    unet = build_model(ModelConfig(channels=(4, 8, 16), strides=(2, 2)))
    head = head_prefix(unet)
    local = [k for k in unet.state_dict() if k.startswith(head + ".")]
    assert local and set(FedPer().shared_names(unet)) == {
        k for k, v in unet.state_dict().items() if v.is_floating_point()} - set(local)
    # the head is the last convolution, the one that produces the 2 class logits
    module = dict(unet.named_modules())[head]
    assert isinstance(module, nn.Conv2d) and module.out_channels == 2
