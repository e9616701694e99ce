"""FedRoD (Chen & Chao, ICLR 2022): generic + personal heads, the balanced loss, what is shared and evaluated."""

from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path

import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import Dataset

from fedsilo.coordinator.config import ConfigError
from fedsilo.coordinator.loading import load_federation_config
from fedsilo.core.methods import DpLevel, get_method
from fedsilo.models import ModelConfig, Optimizer, SegmentationDataset, TrainConfig, build_model, train_local
from fedsilo.models.objective import LocalObjective
from fedsilo.silo_agent.methods import strategy_for
from fedsilo.silo_agent.methods.fedrod import (
    COUNTS_KEY,
    FedRoD,
    FedRodObjective,
    balanced_logits,
    class_counts,
    is_personal,
    log_prior,
    two_head_net_class,
)
from fedsilo.silo_agent.model_pin import build_run_model
from fedsilo.silo_agent.state import AgentState

NET = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "seed": 0}
SGD = TrainConfig(batch_size=3, lr=0.05, optimizer=Optimizer.SGD)
DICE_CE = DiceCELoss(softmax=True, to_onehot_y=True)


class _Pairs(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Six random 16x16 images; the mask marks the pixels above 0.7 (so the classes are unbalanced)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        images = torch.rand(6, 1, 16, 16, generator=gen)
        self.items = [(im, (im > 0.7).long()) for im in images]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i]


DATA = _Pairs()
IMAGES = torch.stack([im for im, _ in DATA.items])
MASKS = torch.stack([m for _, m in DATA.items])


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _wrapped() -> nn.Module:
    return FedRoD().wrap_model(build_model(ModelConfig.from_mapping(NET)), model_cfg=None, base_checkpoint=None)


def _sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _randomise_personal(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.personal_head.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _head_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    h = model.net.get_submodule(model.head_name).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    try:
        model.net(x)
    finally:
        h.remove()
    return seen[0]


# -- the network -----------------------------------------------------------------------------

def test_personalised_output_is_generic_plus_personal() -> None:
    model = _wrapped()
    assert isinstance(model, two_head_net_class()) and model.head_name == "model.2.1.conv.unit0.conv"
    assert isinstance(model.personal_head, nn.Conv2d) and model.num_classes == 2
    # built zero: the personalised model is the generic one, bit for bit
    assert all(not p.any() for p in model.personal_head.parameters())
    assert torch.equal(model(IMAGES), model.generic(IMAGES))
    _randomise_personal(model)
    want = model.generic(IMAGES) + model.personal_head(_head_input(model, IMAGES))
    assert torch.allclose(model(IMAGES), want, atol=1e-6)
    assert not torch.allclose(model(IMAGES), model.generic(IMAGES), atol=1e-3)
    # a plain head on a plain body: the same rule, by hand
    body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    plain = FedRoD().wrap_model(body, model_cfg=None, base_checkpoint=None)
    assert plain.head_name == "2"
    _randomise_personal(plain)
    h = torch.relu(body[0](IMAGES))
    assert torch.allclose(plain(IMAGES), body[2](h) + plain.personal_head(h), atol=1e-6)


def test_every_silo_builds_the_same_network_and_it_pickles() -> None:
    a = build_run_model(task="segmentation-2d", model_config=NET, strategy="fedrod", tables={}, record_level=False,
                        base_checkpoint=None)
    b = build_run_model(task="segmentation-2d", model_config=NET, strategy="fedrod", tables={}, record_level=False,
                        base_checkpoint=None)
    fedavg = build_run_model(task="segmentation-2d", model_config=NET, strategy="fedavg", tables={},
                             record_level=False, base_checkpoint=None)
    assert a.fingerprint == b.fingerprint != fedavg.fingerprint  # the personal head is part of the model
    clone = pickle.loads(pickle.dumps(a.model))  # as a TrainJob carries it to another rank
    assert type(clone) is type(a.model) and torch.equal(clone(IMAGES), a.model(IMAGES))
    # attributes a Task reads off its network are read through the wrapper
    net = build_model(ModelConfig.from_mapping(NET))
    net.sw_batch_size = 3
    assert FedRoD().wrap_model(net, model_cfg=None, base_checkpoint=None).sw_batch_size == 3


def test_personal_head_never_in_an_upload() -> None:
    built = build_run_model(task="segmentation-2d", model_config=NET, strategy="fedrod", tables={},
                            record_level=False, base_checkpoint=None)
    model, strategy = built.model, built.strategy
    personal = [k for k in model.state_dict() if is_personal(k)]
    assert personal == ["personal_head.weight", "personal_head.bias"]
    names = [t.name for t in built.manifest.tensors]
    assert not set(personal) & set(names) and set(names) == set(model.state_dict()) - set(personal)
    layout = strategy.upload_layout(built.manifest, 1, 2)
    assert not set(personal) & {t.name for t in layout.tensors}
    # train a round (the personal head moves), then build the upload and its HE vector
    sd = _sd(model)
    state = AgentState(run_id="r", fingerprint=built.fingerprint, global_shared={k: sd[k] for k in built.shared},
                       model=sd)
    objective = strategy.local_objective(model=model, state=state, train=DATA, rnd=1)
    train_local(model, DATA, SGD, round_index=1, objective=objective)
    trained = _sd(model)
    assert any(trained[k].any() for k in personal)
    update = strategy.upload(trained=trained, state=state, names=list(built.shared), rnd=1, total_rounds=2)
    assert set(update) == set(built.shared)
    flat = strategy.he_vector(update, state=state, names=list(built.shared), scale=1.0, rnd=1, total_rounds=2)
    assert flat.size == built.manifest.numel
    # the silo's class counts stay in its own state
    assert COUNTS_KEY in state.strategy_state and not any(COUNTS_KEY in k for k in update)


# -- the loss --------------------------------------------------------------------------------

def test_balanced_softmax_and_prior_known_answers() -> None:
    counts = torch.tensor([6.0, 2.0, 0.0])
    assert torch.allclose(log_prior(counts), torch.log(torch.tensor([7 / 11, 3 / 11, 1 / 11])))
    logits = torch.zeros(1, 3, 2, 2)
    shifted = balanced_logits(logits, log_prior(counts))
    assert torch.allclose(shifted.softmax(dim=1)[0, :, 0, 0], torch.tensor([7 / 11, 3 / 11, 1 / 11]))
    masks = torch.zeros(2, 1, 4, 4, dtype=torch.int64)
    masks[0, 0, :2, :] = 1
    masks[1, 0, 0, 0] = 2
    assert torch.equal(class_counts(SegmentationDataset(masks.float(), masks), 3), torch.tensor([23.0, 8.0, 1.0],
                                                                                                   dtype=torch.float64))
    assert torch.equal(class_counts(DATA, 2), torch.tensor([float((MASKS == 0).sum()), float((MASKS == 1).sum())],
                                                           dtype=torch.float64))


def test_objective_is_balanced_generic_loss_plus_personal_loss() -> None:
    model = _wrapped()
    _randomise_personal(model)
    counts = class_counts(DATA, 2)
    objective = FedRodObjective(log_prior(counts))
    assert isinstance(objective, LocalObjective)
    with objective.attach(model, device=torch.device("cpu"), forward=lambda m, x: m(x)):
        out = model(IMAGES)
        total = objective.loss(model=model, inputs=IMAGES, targets=MASKS, output=out, task_loss=DICE_CE)
    g = model.generic(IMAGES)
    p = model.personal_head(_head_input(model, IMAGES))
    want = DICE_CE(g + torch.log((counts + 1) / (counts.sum() + 2)).float().view(1, 2, 1, 1), MASKS) \
        + DICE_CE(g + p, MASKS)
    assert torch.allclose(total, want, atol=1e-6)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # a uniform prior shifts every logit alike: the generic term is the plain Task loss
    with torch.no_grad():
        uniform = FedRodObjective(log_prior(torch.tensor([5.0, 5.0])))
        with uniform.attach(model, device=torch.device("cpu"), forward=lambda m, x: m(x)):
            got = uniform.loss(model=model, inputs=IMAGES, targets=MASKS, output=model(IMAGES), task_loss=DICE_CE)
        assert torch.allclose(got, DICE_CE(g, MASKS) + DICE_CE(g + p, MASKS), atol=1e-6)


def test_the_generic_part_gets_no_gradient_from_the_personal_loss() -> None:
    """The whole objective's gradient on the body and generic head is the balanced generic loss's
    alone; the personal head's gradient comes from the personal loss alone."""
    model = _wrapped()
    _randomise_personal(model)
    objective = FedRodObjective(log_prior(class_counts(DATA, 2)))
    with objective.attach(model, device=torch.device("cpu"), forward=lambda m, x: m(x)):
        objective.loss(model=model, inputs=IMAGES, targets=MASKS, output=model(IMAGES), task_loss=DICE_CE).backward()
    full = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    DICE_CE(balanced_logits(model.generic(IMAGES), objective.log_pi), MASKS).backward()
    for k, p in model.net.named_parameters():
        assert torch.allclose(full[f"net.{k}"], p.grad, rtol=0, atol=1e-7), k
    assert all(p.grad is None for p in model.personal_head.parameters())  # the generic loss never reaches it
    model.zero_grad(set_to_none=True)
    h = _head_input(model, IMAGES).detach()
    DICE_CE(model.generic(IMAGES).detach() + model.personal_head(h), MASKS).backward()
    assert all(p.grad is None for p in model.net.parameters())
    for k, p in model.personal_head.named_parameters():
        assert torch.allclose(full[f"personal_head.{k}"], p.grad, atol=1e-7) and p.grad.abs().sum() > 0


# -- the strategy: counts, evaluation, DP ------------------------------------------------------

def test_counts_are_the_silos_own_and_kept(tmp_path: Path) -> None:
    model = _wrapped()
    sd = _sd(model)
    state = AgentState(run_id="r", fingerprint="fp", global_shared={k: v for k, v in sd.items() if not is_personal(k)},
                       model=sd)
    fedrod = strategy_for("fedrod")
    first = fedrod.local_objective(model=model, state=state, train=DATA, rnd=1)
    assert torch.equal(state.strategy_state[COUNTS_KEY], class_counts(DATA, 2))
    state.save(tmp_path)
    loaded = AgentState.load(tmp_path)
    assert loaded is not None
    again = fedrod.local_objective(model=model, state=loaded, train=_Pairs(), rnd=2)
    assert torch.equal(again.log_pi, first.log_pi)
    assert torch.equal(pickle.loads(pickle.dumps(first)).log_pi, first.log_pi)
    with pytest.raises(Exception, match="TwoHeadNet"):
        fedrod.local_objective(model=model.net, state=state, train=DATA, rnd=1)


def test_evaluation_personal_on_own_data_generic_on_the_unseen_domain() -> None:
    model = _wrapped()
    _randomise_personal(model, seed=2)
    sd = _sd(model)
    shared = {k: v for k, v in sd.items() if not is_personal(k)}
    state = AgentState(run_id="r", fingerprint="fp", global_shared=shared, model=sd)
    fedrod = FedRoD()
    own = fedrod.eval_state_dict(state)
    assert all(torch.equal(own[k], sd[k]) for k in sd)  # generic (shared) + this silo's personal head
    unseen = fedrod.unseen_state_dict(state)
    assert all(not unseen[k].any() for k in unseen if is_personal(k))
    assert all(torch.equal(unseen[k], shared[k]) for k in shared)
    model.load_state_dict(unseen)
    assert torch.equal(model(IMAGES), model.generic(IMAGES))  # a zero personal head: exactly the generic model
    generic_only = build_model(ModelConfig.from_mapping(NET))
    generic_only.load_state_dict({k[len("net."):]: v for k, v in shared.items()})
    assert torch.equal(model(IMAGES), generic_only(IMAGES))


def test_a_round_trains_both_heads() -> None:
    model = _wrapped()
    sd = _sd(model)
    state = AgentState(run_id="r", fingerprint="fp", global_shared={k: v for k, v in sd.items() if not is_personal(k)},
                       model=sd)
    objective = FedRoD().local_objective(model=model, state=state, train=DATA, rnd=1)
    result = train_local(model, DATA, SGD, round_index=1, objective=objective)
    assert math.isfinite(result.loss)
    after = _sd(model)
    assert any(not torch.equal(after[k], sd[k]) for k in sd if not is_personal(k))
    assert any(after[k].any() for k in sd if is_personal(k))


VALID = """\
[run]
id = "study-2025"
rounds = 2
min_silos = 2
round_deadline_s = 120.5
quorum_timeout_s = 600
start_grace_s = 0
strategy = "fedrod"
aggregation = "he"

[silos]
enrolled = ["hospital-a", "hospital-b"]

[server]
listen = "127.0.0.1:50099"
state_dir = "state"
ca = "tls/ca.pem"
cert = "tls/coordinator.pem"
key = "tls/coordinator.key"
"""
RECORD_DP = ("\n[privacy]\nrecord_level = true\nsample_rate = 0.25\nsteps_per_round = 12\nmax_grad_norm = 1.0\n"
             "noise_multiplier = 1.0\ndelta = 1e-5\n")
SILO_DP = "\n[privacy]\nsilo_level = true\nupdate_clip_norm = 1.0\nupdate_noise_multiplier = 1.0\ndelta = 1e-5\n"


def test_record_level_dp_is_refused_silo_level_is_not(tmp_path: Path) -> None:
    assert DpLevel.RECORD in get_method("fedrod").refuses and DpLevel.SILO not in get_method("fedrod").refuses
    tls = tmp_path / "tls"
    tls.mkdir()
    for name in ("ca.pem", "coordinator.pem", "coordinator.key"):
        (tls / name).write_text("-----BEGIN PLACEHOLDER-----\n")
    path = tmp_path / "federation.toml"
    path.write_text(VALID + RECORD_DP)
    with pytest.raises(ConfigError, match=r"^privacy\.record_level: not supported with run\.strategy 'fedrod': its "
                                          r"balanced loss"):
        load_federation_config(path)
    path.write_text(VALID + SILO_DP)
    assert load_federation_config(path).strategy == "fedrod"
    bench = get_method("fedrod").bench
    assert bench is not None and bench.privacy is None and "pixel-class" in bench.why_no_dp


def test_contract_helpers() -> None:
    """``is_shared`` names only the personal head as local, on the wrapped and the bare network."""
    model = _wrapped()
    fedrod = FedRoD()
    shared = fedrod.shared_names(model)
    assert shared == [k for k in model.state_dict() if not k.startswith("personal_head.")]
    bare = build_model(ModelConfig.from_mapping(NET))
    assert fedrod.shared_names(bare) == list(bare.state_dict())
    assert copy.deepcopy(model).head_name == model.head_name
