"""MOON (Li, He & Song, CVPR 2021): the contrastive term, its seam in local training (plain, DP-SGD), its state."""

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

from fedsilo.coordinator.config import parse_tables
from fedsilo.core.configfile import ConfigError
from fedsilo.core.methods import DpLevel, get_method
from fedsilo.models import ModelConfig, Optimizer, TrainConfig, build_model, train_local
from fedsilo.models.dp_training import train_local_dp
from fedsilo.models.objective import LocalObjective
from fedsilo.privacy.dpsgd import DpSgdConfig
from fedsilo.silo_agent.methods import strategy_for
from fedsilo.silo_agent.methods.moon import (
    Moon,
    MoonObjective,
    MoonSettings,
    contrastive_loss,
    pooled,
    previous_model,
    representation_site,
)
from fedsilo.silo_agent.state import AgentState

NET = ModelConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, seed=0)
SGD = TrainConfig(batch_size=3, lr=0.05, optimizer=Optimizer.SGD)


class _Pairs(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Six random 16x16 images; the mask marks the pixels above 0.5."""

    def __init__(self, n: int = 6) -> None:
        gen = torch.Generator().manual_seed(3)
        images = torch.rand(n, 1, 16, 16, generator=gen)
        self.items = [(im, (im > 0.5).long()) for im in images]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i]


DATA = _Pairs()


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _perturbed(model: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


def _objective(model: nn.Module, *, mu: float = 1.0, temperature: float = 0.5, seed: int = 7) -> MoonObjective:
    return MoonObjective(global_model=copy.deepcopy(model), previous_model=_perturbed(model, seed), mu=mu,
                         temperature=temperature, site=representation_site(model))


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- the term --------------------------------------------------------------------------------

def test_contrastive_loss_known_answers() -> None:
    """−log(e^{s_g/τ} / (e^{s_g/τ} + e^{s_p/τ})) on hand-made vectors; cosine, so scale-free."""
    z = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    z_glob = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    z_prev = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [-6.0, -8.0]])
    got = contrastive_loss(z, z_glob, z_prev, 0.5)
    want = torch.tensor([
        math.log(1 + math.exp(-2.0)),                 # s_g = 1, s_p = 0: −log(e² / (e² + 1))
        math.log(1 + math.exp(-2 * math.sqrt(2))),    # s_g = 1/√2, s_p = −1/√2
        math.log(1 + math.exp(-4.0)),                 # s_g = 1, s_p = −1
    ])
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(contrastive_loss(5 * z, z_glob, 0.1 * z_prev, 0.5), want, atol=1e-6)
    # τ = 1: s_g = 1, s_p = 0 gives log(1 + e^{-1})
    assert math.isclose(float(contrastive_loss(z[:1], z_glob[:1], z_prev[:1], 1.0)[0]), math.log(1 + math.exp(-1)),
                        rel_tol=1e-6)
    # z_prev = z_glob (MOON's first round): log 2 whatever z is, a constant
    rand = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    g = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(contrastive_loss(rand, g, g, 0.5), torch.full((4,), math.log(2.0)), atol=1e-6)


def test_representation_is_the_pooled_unet_bottleneck() -> None:
    model = build_model(NET)
    name, is_input = representation_site(model)
    assert (name, is_input) == ("model.1.submodule.1.submodule", False)
    seen = []
    model.get_submodule(name).register_forward_hook(lambda _m, _a, out: seen.append(out))
    model(torch.zeros(2, 1, 16, 16))
    assert seen[0].shape == (2, 16, 4, 4)  # the deepest level: channels[-1] at 1/4 of the side
    assert pooled(seen[0]).shape == (2, 16)
    assert torch.equal(pooled(torch.arange(8.0).view(1, 2, 2, 2)), torch.tensor([[1.5, 5.5]]))
    # a network without a UNet bottleneck: the input of its output head
    plain = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    assert representation_site(plain) == ("2", True)


# -- the settings ----------------------------------------------------------------------------

def test_settings_table() -> None:
    method = get_method("moon")
    assert method is Moon and not method.refuses and not method.needs_he
    assert parse_tables(method, {}) == {"moon": {"mu": 1.0, "temperature": 0.5}}
    assert parse_tables(method, {"moon": {"mu": 5, "temperature": 0.2}}) == {"moon": {"mu": 5.0, "temperature": 0.2}}
    for table, field in (({"mu": -1}, "moon.mu"), ({"mu": True}, "moon.mu"), ({"mu": float("nan")}, "moon.mu"),
                         ({"temperature": 0}, "moon.temperature"), ({"temperature": "1"}, "moon.temperature"),
                         ({"tau": 1}, "moon.tau")):
        with pytest.raises(ConfigError, match=rf"^{field}: "):
            parse_tables(method, {"moon": table})
    strategy = strategy_for("moon", {"moon": {"mu": 2.0, "temperature": 0.1}})
    assert isinstance(strategy, Moon) and strategy.settings == MoonSettings(mu=2.0, temperature=0.1)
    assert method.bench is not None and method.bench.privacy is not None  # in the study, with record-level DP


# -- the seam in local training --------------------------------------------------------------

def test_mu_zero_equals_fedavg_bit_for_bit() -> None:
    """μ = 0 with a previous model that differs from the global one: the same weights as plain
    local training (FedAvg's round); and the strategy then hands out no objective at all."""
    start = build_model(NET)
    plain, moon = copy.deepcopy(start), copy.deepcopy(start)
    train_local(plain, DATA, SGD, round_index=2)
    result = train_local(moon, DATA, SGD, round_index=2, objective=_objective(start, mu=0.0))
    assert _same(_sd(plain), _sd(moon))
    assert math.isfinite(result.loss)
    state = AgentState(run_id="r", fingerprint="fp", global_shared=_sd(start), model=_sd(start))
    zero = Moon(settings=MoonSettings(mu=0.0))
    zero.after_training(model=moon, state=state, train=DATA, train_cfg=SGD, rnd=1)
    assert not state.strategy_state
    assert zero.local_objective(model=start, state=state, train=DATA, rnd=2) is None


def test_mu_changes_training_and_the_model_is_left_clean() -> None:
    start = build_model(NET)
    objective = _objective(start, mu=1.0)
    assert isinstance(objective, LocalObjective)
    plain, moon = copy.deepcopy(start), copy.deepcopy(start)
    train_local(plain, DATA, SGD, round_index=2)
    train_local(moon, DATA, SGD, round_index=2, objective=objective)
    assert not _same(_sd(plain), _sd(moon))
    assert _no_hooks(moon) and _no_hooks(objective.global_model) and _no_hooks(objective.previous_model)
    # the reference models stayed frozen and unchanged
    assert _same(_sd(objective.global_model), _sd(start))
    assert not any(p.requires_grad for p in objective.global_model.parameters())
    # the same objective again (and after a pickle round trip, as to another rank) gives the same weights
    again = copy.deepcopy(start)
    train_local(again, DATA, SGD, round_index=2, objective=pickle.loads(pickle.dumps(objective)))
    assert _same(_sd(again), _sd(moon))


def test_the_term_pulls_z_toward_the_global_model() -> None:
    """One SGD step on μ·ℓ_con alone lowers ℓ_con and raises the cosine between z and z_glob."""
    start = build_model(NET)
    objective = _objective(start, mu=1.0, seed=11)
    model = _perturbed(start, seed=12, scale=0.05)  # z starts away from both references
    images = torch.stack([im for im, _ in DATA.items])
    masks = torch.stack([m for _, m in DATA.items])

    def measure() -> tuple[float, float, float]:
        with torch.no_grad():
            z = [pooled(_site_output(m, objective.site, images)) for m in (model, objective.global_model,
                                                                           objective.previous_model)]
        cos = nn.functional.cosine_similarity
        return (float(contrastive_loss(*z, 0.5).mean()), float(cos(z[0], z[1]).mean()),
                float(cos(z[0], z[2]).mean()))

    before, glob_before, prev_before = measure()
    with objective.attach(model, device=torch.device("cpu"), forward=lambda m, x: m(x)):
        out = model(images)
        total = objective.loss(model=model, inputs=images, targets=masks, output=out,
                               task_loss=lambda o, t: 0.0 * o.sum())
    assert math.isclose(float(total.detach()), before, rel_tol=1e-5)
    total.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.02 * p.grad)
    after, glob_after, prev_after = measure()
    assert after < before
    assert glob_after > glob_before and prev_after < prev_before  # toward z_glob, away from z_prev


def _site_output(model: nn.Module, site: tuple[str, bool], x: torch.Tensor) -> torch.Tensor:
    name, is_input = site
    seen: list[torch.Tensor] = []
    module = model.get_submodule(name)
    h = (module.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) if is_input
         else module.register_forward_hook(lambda _m, _a, o: seen.append(o)))
    try:
        model.eval()
        model(x)
    finally:
        h.remove()
    return seen[0]


def test_loss_is_task_loss_plus_mu_times_the_mean_term() -> None:
    start = build_model(NET)
    objective = _objective(start, mu=3.0)
    model = _perturbed(start, seed=5, scale=0.05)
    images = torch.stack([im for im, _ in DATA.items])
    masks = torch.stack([m for _, m in DATA.items])
    dice_ce = DiceCELoss(softmax=True, to_onehot_y=True)
    with objective.attach(model, device=torch.device("cpu"), forward=lambda m, x: m(x)):
        out = model(images)
        total = objective.loss(model=model, inputs=images, targets=masks, output=out, task_loss=dice_ce)
    z = [pooled(_site_output(m, objective.site, images)) for m in (model, objective.global_model,
                                                                     objective.previous_model)]
    want = dice_ce(out, masks) + 3.0 * contrastive_loss(*z, 0.5).mean()
    assert torch.allclose(total, want, atol=1e-6)


def test_dp_sgd_per_sample_gradients_include_the_term() -> None:
    """Under DP-SGD (σ = 0, every example clipped to C): one SGD step equals the mean of each example's own
    clipped gradient of ``DiceCE + μ ℓ_con``, computed example by example: Opacus' hooks on the trained
    network see the term, and the frozen reference models add no per-sample state of their own."""
    start = build_model(NET)
    objective = _objective(start, mu=2.0)
    model = _perturbed(start, seed=9, scale=0.05)
    reference = copy.deepcopy(model)
    clip, lr, n = 1e-3, 0.1, len(DATA)
    dp = DpSgdConfig(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=1.0, steps=1)
    cfg = TrainConfig(lr=lr, optimizer=Optimizer.SGD)
    train_local_dp(model, DATA, cfg, dp, round_index=1, noise_seed=0, objective=objective)
    assert _no_hooks(model) and _no_hooks(objective.global_model)

    dice_ce = DiceCELoss(softmax=True, to_onehot_y=True)
    params = dict(reference.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(n):
        image, mask = DATA[i]
        reference.zero_grad(set_to_none=True)
        with objective.attach(reference, device=torch.device("cpu"), forward=lambda m, x: m(x)):
            out = reference(image[None])
            objective.loss(model=reference, inputs=image[None], targets=mask[None], output=out,
                           task_loss=dice_ce).backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params.values()))
        assert float(norm) > 10 * clip  # every example is clipped: the test sees each one's own gradient
        for k, p in params.items():
            total[k] += p.grad * (clip / (norm + 1e-6))
    got = dict(model.named_parameters())
    for k, p in params.items():
        want = p.detach() - lr * total[k] / n
        assert torch.allclose(got[k].detach(), want, atol=1e-7, rtol=1e-5), k


def test_dp_sgd_without_the_term_is_unchanged() -> None:
    """μ = 0 under DP-SGD: bit for bit the DP-SGD weights without an objective (same noise seed)."""
    start = build_model(NET)
    dp = DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=2)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    train_local_dp(a, DATA, SGD, dp, round_index=1, noise_seed=3)
    train_local_dp(b, DATA, SGD, dp, round_index=1, noise_seed=3, objective=_objective(start, mu=0.0))
    assert _same(_sd(a), _sd(b))


# -- the strategy: the round's objective and the previous model --------------------------------

def test_first_round_has_no_term_then_the_previous_model_is_kept(tmp_path: Path) -> None:
    model = build_model(NET)
    w_t = _sd(model)
    state = AgentState(run_id="r", fingerprint="fp", global_shared=dict(w_t), model=dict(w_t))
    moon = strategy_for("moon")
    assert moon.local_objective(model=model, state=state, train=DATA, rnd=1) is None  # no previous model yet
    train_local(model, DATA, SGD, round_index=1)
    trained = _sd(model)
    moon.after_training(model=model, state=state, train=DATA, train_cfg=SGD, rnd=1)
    assert _same(_sd(model), trained)
    assert _same(previous_model(state), trained)
    # round 2 starts from a new global model; the objective contrasts with it and with round 1's model
    w_next = _sd(_perturbed(model, seed=4))
    model.load_state_dict(w_next)
    objective = moon.local_objective(model=model, state=state, train=DATA, rnd=2)
    assert isinstance(objective, MoonObjective)
    assert _same(_sd(objective.global_model), w_next)
    assert _same(_sd(objective.previous_model), trained)
    assert _same(_sd(model), w_next) and all(p.requires_grad for p in model.parameters())
    # kept with the checkpoint
    state.save(tmp_path)
    loaded = AgentState.load(tmp_path)
    assert loaded is not None and _same(previous_model(loaded), trained)
    # it is plain data a training group can carry
    clone = pickle.loads(pickle.dumps(objective))
    assert _same(_sd(clone.previous_model), trained) and clone.mu == 1.0


def test_the_objective_travels_in_a_training_job() -> None:
    """A ``TrainJob`` with MOON's objective survives the training group's pickling (the training set
    as a reference), and ``train_job`` trains with it: the weights of ``train_local`` with the objective."""
    from fedsilo.silo_agent.training_group import TrainJob, decode_job, encode_job, train_job

    start = build_model(NET)
    objective = _objective(start)
    job = TrainJob(model=copy.deepcopy(start), train=DATA, train_cfg=SGD, dp=None, round_index=2, task=None,
                   objective=objective)
    received = decode_job(encode_job(job, DATA), DATA)
    assert received.train is DATA and isinstance(received.objective, MoonObjective)
    train_job(received, parallel=None, device=torch.device("cpu"))
    direct = copy.deepcopy(start)
    train_local(direct, DATA, SGD, round_index=2, objective=objective)
    assert _same(_sd(received.model), _sd(direct))


def test_moon_shares_everything_like_fedavg() -> None:
    model = build_model(NET)
    assert strategy_for("moon").shared_names(model) == [k for k, v in model.state_dict().items()
                                                        if v.is_floating_point()]
    assert DpLevel.RECORD not in Moon.refuses and DpLevel.SILO not in Moon.refuses
