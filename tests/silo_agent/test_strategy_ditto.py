"""Ditto (Li et al., ICML 2021): the personal model, its pull toward the round's global model, its evaluation."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import Dataset

from fedsilo.models import ModelConfig, Optimizer, TrainConfig, build_model, train_local
from fedsilo.silo_agent.state import AgentState
from fedsilo.silo_agent.methods.ditto import Ditto

NET = ModelConfig.from_mapping({"channels": [4, 8], "strides": [2], "num_res_units": 0, "seed": 0})
SGD = TrainConfig(batch_size=8, lr=0.05, optimizer=Optimizer.SGD)  # 6 images: one full-batch step per epoch


class _Pairs(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Six random 16x16 images; the mask marks the pixels above 0.5."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        images = torch.rand(6, 1, 16, 16, generator=gen)
        self.items = [(im, (im > 0.5).long()) for im in images]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i]


DATA = _Pairs()


def _sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _perturbed(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in sd.items()}


def _round(cfg: TrainConfig, *, rnd: int = 1) -> tuple[nn.Module, AgentState, dict[str, torch.Tensor]]:
    """One round as the agent runs it: load w^t, train it, then Ditto's ``after_training``.

    Returns the trained model, the state after the personal step, and w^t.
    """
    model = build_model(NET)
    w_t = _sd(model)
    state = AgentState(run_id="run", fingerprint="fp", global_shared=dict(w_t), model=dict(w_t))
    model.load_state_dict(state.personal_state_dict())
    train_local(model, DATA, cfg, round_index=rnd)
    Ditto().after_training(model=model, state=state, train=DATA, train_cfg=cfg, rnd=rnd)
    return model, state, w_t


def test_ditto_shares_every_floating_point_entry() -> None:
    model = build_model(NET)
    assert Ditto().shared_names(model) == [k for k, v in model.state_dict().items() if v.is_floating_point()]


def test_personal_step_trains_a_copy_and_leaves_the_model_alone() -> None:
    model = build_model(NET)
    w_t = _sd(model)
    state = AgentState(run_id="run", fingerprint="fp", global_shared=dict(w_t), model=dict(w_t))
    cfg = replace(SGD, local_epochs=2)  # from the second step on, λ's pull toward w^t is non-zero
    train_local(model, DATA, cfg, round_index=1)
    trained = _sd(model)
    flags = [p.requires_grad for p in model.parameters()]
    Ditto().after_training(model=model, state=state, train=DATA, train_cfg=cfg, rnd=1)
    assert _same(_sd(model), trained)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert _same(state.global_shared, w_t)  # the global model is the aggregate's business, not Ditto's
    personal = Ditto().eval_state_dict(state)
    assert personal.keys() == w_t.keys()
    assert not _same(personal, w_t)
    assert not _same(personal, trained)  # λ = 0.1 pulls v toward w^t, so v is not the plain trained copy


def test_huge_lambda_pins_the_personal_model_to_the_global_model() -> None:
    """lr·λ = 1 and one full-batch SGD step: v1 = v0 − lr·(∇F(v0) + λ(v0 − w^t)) = w^t − lr·∇F(v0),
    within 1e-6·|∇F| of w^t, even from a stored personal model 0.05·N(0, 1) away from it."""
    cfg = replace(SGD, lr=1e-6, personal_lambda=1e6)
    model, state, w_t = _round(cfg)
    assert all(torch.allclose(v, w_t[k], atol=1e-5) for k, v in Ditto().eval_state_dict(state).items())
    # a later round, from a personal model far from the (new) global model
    w_next = _perturbed(w_t, seed=1)
    far = _perturbed(w_t, seed=2)
    state.global_shared = dict(w_next)
    state.strategy_state.update({f"personal/{k}": v for k, v in far.items()})
    assert max(float((far[k] - w_next[k]).abs().max()) for k in far) > 0.1
    Ditto().after_training(model=model, state=state, train=DATA, train_cfg=cfg, rnd=2)
    assert all(torch.allclose(v, w_next[k], atol=1e-5) for k, v in Ditto().eval_state_dict(state).items())


def test_zero_lambda_is_plain_local_training_from_the_global_model() -> None:
    """λ = 0: v is bit for bit what ``train_local`` gives from w^t with the same seed and round, even
    where the global step itself is FedProx's and ``state.model`` already holds the trained copy."""
    cfg = TrainConfig(batch_size=2, lr=3e-3, local_epochs=2, proximal_mu=0.5, personal_lambda=0.0)
    model = build_model(NET)
    w_t = _sd(model)
    state = AgentState(run_id="run", fingerprint="fp", global_shared=dict(w_t), model=dict(w_t))
    train_local(model, DATA, cfg, round_index=3)
    state.model = _sd(model)  # the trained copy: v must still start from w^t = global_shared
    Ditto().after_training(model=model, state=state, train=DATA, train_cfg=cfg, rnd=3)
    reference = build_model(NET)
    reference.load_state_dict(w_t)
    train_local(reference, DATA, replace(cfg, proximal_mu=0.0), round_index=3)
    assert _same(Ditto().eval_state_dict(state), _sd(reference))
    assert not _same(_sd(reference), state.model)  # FedProx's μ = 0.5 made the global step differ


def test_the_pull_is_toward_the_global_model_of_the_round_start() -> None:
    """state.model (the silo's last trained copy), global_shared (w^t) and the stored v all differ;
    one full-batch SGD step must give v1 = v0 − lr·(∇F(v0) + λ(v0 − global_shared))."""
    lr, lam = 0.05, 2.0
    cfg = replace(SGD, lr=lr, personal_lambda=lam)
    base = _sd(build_model(NET))
    w_t, old, v0 = _perturbed(base, seed=10), _perturbed(base, seed=11), _perturbed(base, seed=12)
    state = AgentState(run_id="run", fingerprint="fp", global_shared=dict(w_t), model=dict(old),
                       strategy_state={f"personal/{k}": v.clone() for k, v in v0.items()})
    state.strategy_state["other/tensor"] = torch.ones(2)
    model = build_model(NET)
    model.load_state_dict(old)
    Ditto().after_training(model=model, state=state, train=DATA, train_cfg=cfg, rnd=1)
    assert _same(_sd(model), old)
    assert torch.equal(state.strategy_state["other/tensor"], torch.ones(2))  # other keys are kept

    reference = build_model(NET)
    reference.load_state_dict(v0)
    reference.train()
    images = torch.stack([im for im, _ in DATA.items])
    masks = torch.stack([m for _, m in DATA.items])
    DiceCELoss(softmax=True, to_onehot_y=True)(reference(images), masks).backward()
    got = Ditto().eval_state_dict(state)
    wrong_anchor = 0.0
    for name, p in reference.named_parameters():
        want = v0[name] - lr * (p.grad + lam * (v0[name] - w_t[name]))
        assert torch.allclose(got[name], want, atol=1e-6), name
        wrong_anchor = max(wrong_anchor, float((lr * lam * (w_t[name] - old[name])).abs().max()))
    assert wrong_anchor > 1e-3  # anchoring at state.model instead would have been caught


def test_evaluation_models() -> None:
    model = build_model(NET)
    w_t = _sd(model)
    state = AgentState(run_id="run", fingerprint="fp", global_shared=dict(w_t), model=dict(w_t))
    ditto = Ditto()
    assert _same(ditto.eval_state_dict(state), w_t)  # before the first personal step: the global model
    assert _same(ditto.unseen_state_dict(state), w_t)
    ditto.after_training(model=model, state=state, train=DATA, train_cfg=SGD, rnd=1)
    personal = ditto.eval_state_dict(state)
    assert not _same(personal, w_t)
    assert _same(ditto.unseen_state_dict(state), w_t)  # the unseen domain gets the global model
    # after an aggregate, eval keeps the personal model and unseen follows the global one
    state.global_shared = _perturbed(w_t, seed=5)
    assert _same(ditto.eval_state_dict(state), personal)
    assert _same(ditto.unseen_state_dict(state), state.global_shared)
    # the returned dicts are copies: changing them does not change the state
    ditto.eval_state_dict(state)[next(iter(w_t))].zero_()
    assert _same(ditto.eval_state_dict(state), personal)
    # the model the agent loads for evaluation accepts the personal state dict
    build_model(NET).load_state_dict(personal)


def test_personal_model_survives_a_restart(tmp_path: Path) -> None:
    _, state, w_t = _round(SGD)
    personal = Ditto().eval_state_dict(state)
    state.save(tmp_path)
    loaded = AgentState.load(tmp_path)
    assert loaded is not None
    assert _same(Ditto().eval_state_dict(loaded), personal)
    assert _same(Ditto().unseen_state_dict(loaded), w_t)
    assert _same(loaded.strategy_state, state.strategy_state)


def test_personal_step_is_deterministic() -> None:
    cfg = replace(SGD, batch_size=2)  # the round decides the order of the batches
    _, a, _ = _round(cfg, rnd=2)
    _, b, _ = _round(cfg, rnd=2)
    _, c, _ = _round(cfg, rnd=3)
    assert _same(Ditto().eval_state_dict(a), Ditto().eval_state_dict(b))
    assert not _same(Ditto().eval_state_dict(a), Ditto().eval_state_dict(c))
