"""FedNova as a run strategy: updates divided by the silo's local work a_k, their mean rescaled by τ_eff = Σ p_k a_k."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.core.methods import DpLevel, get_method
from fedsilo.core.phases import shared_numel
from fedsilo.core.tensors import Manifest
from fedsilo.models import Optimizer, SegmentationDataset, TrainConfig, train_local
from fedsilo.silo_agent.methods.fedavg import FedAvg
from fedsilo.silo_agent.methods.fednova import (
    SGD_MOMENTUM,
    WORK_SLOT,
    WORK_UNIT,
    FedNova,
    LocalWork,
    work,
)
from fedsilo.silo_agent.state import AgentState
from fedsilo.silo_agent.strategy import RunContext, StrategyError

BATCH = 8


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 3))


def trained_like(model: nn.Module, seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """``model``'s state_dict moved by a random update (a silo's local training, as far as FedNova cares)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def nova(n: int, optimizer: str = "adam", dp_steps: int = 0) -> FedNova:
    """A silo's FedNova after ``prepare`` and ``train_data``: batch 8, one local epoch, ``n`` examples."""
    s = FedNova(local=LocalWork(optimizer=optimizer, batch_size=BATCH, local_epochs=1, dp_steps=dp_steps))
    s.train_data(list(range(n)), state=None, rnd=1)  # type: ignore[arg-type]
    return s


def silo_round(strategies, initial: nn.Module, trained: list[dict[str, torch.Tensor]], sizes, coordinator_sum, *,
               he: bool = False) -> dict[str, torch.Tensor]:
    """One round from ``initial`` (every entry shared): uploads, the coordinator's aggregation, apply."""
    start = {k: v.clone() for k, v in initial.state_dict().items()}
    return coordinator_sum.round(strategies, start, trained, sizes, he=he)


# -- a_k -------------------------------------------------------------------------------------------
def test_work_known_answers() -> None:
    assert work(6) == 6.0 and work(6, 0.0) == 6.0  # plain SGD and Adam: a = τ
    assert work(1, 0.9) == pytest.approx(1.0, abs=1e-15)
    # τ = 6, ρ = 0.9: [6 − 0.9(1 − 0.9^6)/0.1] / 0.1 = (6 − 4.217031) / 0.1
    assert work(6, 0.9) == pytest.approx(17.82969, rel=1e-12)
    assert work(2, 0.5) == pytest.approx(2.5, rel=1e-12)  # g1 counts 1 + 0.5, g2 counts 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="steps"):
            work(bad)  # type: ignore[arg-type]
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="momentum"):
            work(3, bad)


@pytest.mark.parametrize("steps", [1, 2, 6, 17])
def test_work_is_the_displacement_of_torch_sgd_with_momentum_under_a_constant_gradient(steps: int) -> None:
    """PyTorch's SGD with momentum 0.9 (our ``optimizer = "sgd"``) moves a weight whose gradient is always
    1 by lr × a after τ steps."""
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.01, momentum=SGD_MOMENTUM)
    for _ in range(steps):
        opt.zero_grad()
        w.sum().backward()
        opt.step()
    assert -float(w.detach()) / 0.01 == pytest.approx(work(steps, SGD_MOMENTUM), rel=1e-12)


def test_the_training_optimisers_are_the_ones_a_k_assumes() -> None:
    from fedsilo.models.training import _make_optimizer

    sgd = _make_optimizer(net(0), TrainConfig(optimizer=Optimizer.SGD)).param_groups[0]
    assert (sgd["momentum"], sgd["dampening"], sgd["nesterov"]) == (SGD_MOMENTUM, 0, False)
    assert isinstance(_make_optimizer(net(0), TrainConfig()), torch.optim.Adam)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([1.0 - x, x], dim=1) * (1.0 + self.w)


@pytest.mark.parametrize(("n", "batch", "epochs"), [(5, 2, 2), (8, 8, 1), (9, 4, 3)])
def test_steps_are_counted_as_train_local_takes_them(n: int, batch: int, epochs: int) -> None:
    masks = (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(n)) > 0.5).long()
    result = train_local(_Tiny(), SegmentationDataset(masks.float(), masks),
                         TrainConfig(batch_size=batch, local_epochs=epochs, optimizer=Optimizer.SGD), round_index=1)
    assert LocalWork(optimizer="sgd", batch_size=batch, local_epochs=epochs).steps(n) == result.steps


def test_local_work_from_the_run_and_dp_sgd() -> None:
    local = LocalWork.from_run({"optimizer": "sgd", "batch_size": 4, "local_epochs": 3, "lr": 0.01})
    assert (local.steps(10), local.momentum) == (9, SGD_MOMENTUM)
    assert local.work(10) == work(9, SGD_MOMENTUM)
    assert LocalWork.from_run({}).work(48) == 6.0  # the defaults: Adam, batch 8, one epoch
    # record-level DP: the plan's steps on every silo, whatever its size: equal a_k, FedNova = FedAvg
    plan = SimpleNamespace(record_level=True, steps_per_round=12)
    dp = LocalWork.from_run({"optimizer": "sgd"}, plan)
    assert dp.steps(10) == dp.steps(1000) == 12 and dp.work(10) == work(12, SGD_MOMENTUM)
    assert LocalWork.from_run({}, SimpleNamespace(record_level=False, steps_per_round=12)).steps(16) == 2
    with pytest.raises(ValueError, match="batch_size"):
        LocalWork.from_run({"batch_size": 0})
    with pytest.raises(ValueError, match="optimizer"):
        LocalWork(optimizer="rmsprop")
    with pytest.raises(ValueError, match="dp_steps"):
        LocalWork(dp_steps=-1)


def test_prepare_reads_the_run_and_train_data_the_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedsilo.models import TrainConfig

    ctx = RunContext(client=None, he=None, train=list(range(10)), state=None,  # type: ignore[arg-type]
                     state_dir=tmp_path, stop=None, train_cfg=TrainConfig(batch_size=4, local_epochs=2))  # type: ignore[arg-type]
    s = FedNova()
    with pytest.raises(StrategyError, match="prepare must run first"):
        s.silo_work()
    s.prepare(ctx)
    assert s.silo_work() == 2 * 3
    assert s.train_data(list(range(13)), state=None, rnd=2) == list(range(13))  # type: ignore[arg-type]
    assert s.silo_work() == 2 * 4
    bare = RunContext(client=None, he=None, train=[1], state=None, state_dir=tmp_path, stop=None)  # type: ignore[arg-type]
    with pytest.raises(StrategyError, match="training settings are unknown"):
        FedNova().prepare(bare)
    huge = FedNova(local=LocalWork(batch_size=1), n_train=int(WORK_UNIT) + 1)
    with pytest.raises(StrategyError, match="fewer local steps"):
        huge.silo_work()


# -- the layout ------------------------------------------------------------------------------------
def test_upload_matches_the_coordinators_layout_and_the_he_vector() -> None:
    model = net(0)
    s = nova(40, "sgd")  # 5 steps
    names = s.shared_names(model)
    assert names == list(model.state_dict())
    start = model.state_dict()
    manifest = Manifest.of_arrays({k: v.numpy() for k, v in start.items()})
    layout = get_method("fednova").upload_layout(manifest, 3, 5)
    assert [t.name for t in layout.tensors] == [*names, WORK_SLOT]
    assert shared_numel(layout) == manifest.numel  # the slot is not a shared parameter
    state = AgentState(run_id="r", fingerprint="f", global_shared={k: v.clone() for k, v in start.items()})
    trained = trained_like(model, 1)
    up = s.upload(trained=trained, state=state, names=names, rnd=3, total_rounds=5)
    assert Manifest.of_arrays(up).difference(layout) is None  # what plaintext admission checks
    a = work(5, SGD_MOMENTUM)
    np.testing.assert_array_equal(up[WORK_SLOT], [a / WORK_UNIT])
    for k in names:
        np.testing.assert_allclose(up[k], ((trained[k] - start[k]) / a).numpy(), rtol=1e-6)
    flat = s.he_vector(up, state=state, names=names, scale=0.25, rnd=3, total_rounds=5)
    assert flat.shape == (layout.numel,) and flat[-1] == 0.25 * a / WORK_UNIT


# -- the defining rules ----------------------------------------------------------------------------
def test_equal_work_gives_fedavgs_model_bit_for_bit(coordinator_sum) -> None:  # type: ignore[no-untyped-def]
    """Silos of 25, 30 and 32 examples all take 4 steps of batch 8 (a_k = 4), with unequal weights p_k:
    τ_eff Σ p_k Δ_k / 4 with τ_eff = 4 is FedAvg's Σ p_k Δ_k, to the bit (scaling by 4 is exact)."""
    initial = net(0)
    sizes = (25, 30, 32)
    trained = [trained_like(initial, seed) for seed in (1, 2, 3)]
    got = silo_round([nova(n) for n in sizes], initial, trained, sizes, coordinator_sum)
    want = silo_round([FedAvg() for _ in sizes], initial, trained, sizes, coordinator_sum)
    assert set(got) == set(want) == set(initial.state_dict())  # the slot is not a model entry
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_he_gives_the_plaintext_model(coordinator_sum) -> None:  # type: ignore[no-untyped-def]
    """Three silos of 20, 45 and 70 examples under SGD with momentum (3, 6 and 9 steps): the model from the
    decrypted BFV sum (apply_sum) is the plaintext one (apply on the coordinator's mean)."""
    initial = net(0)
    sizes = (20, 45, 70)
    trained = [trained_like(initial, seed, scale=0.003 * (i + 1)) for i, seed in enumerate((4, 5, 6))]
    plain = silo_round([nova(n, "sgd") for n in sizes], initial, trained, sizes, coordinator_sum)
    he = silo_round([nova(n, "sgd") for n in sizes], initial, trained, sizes, coordinator_sum, he=True)
    fedavg = silo_round([FedAvg() for _ in sizes], initial, trained, sizes, coordinator_sum)
    for k in plain:
        torch.testing.assert_close(he[k], plain[k], rtol=0, atol=2e-7)
    assert any(not torch.allclose(plain[k], fedavg[k], rtol=0, atol=1e-5) for k in plain)  # unequal a_k: not FedAvg


def test_more_local_steps_do_not_weigh_more(coordinator_sum) -> None:  # type: ignore[no-untyped-def]
    """Silo A (64 examples, 8 steps) moves along e1, silo B (32 examples, 4 steps) along e2, each by lr per
    step (Adam-like). FedAvg weighs the directions p_k·τ_k (4 : 1), FedNova p_k (2 : 1, the data's weights)
    and moves τ_eff = Σ p_k τ_k steps in all."""
    lr = 1e-3
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    e = torch.eye(2)
    trained = [{"weight": (-lr * 8 * e[0]).reshape(1, 2)}, {"weight": (-lr * 4 * e[1]).reshape(1, 2)}]
    sizes = (64, 32)
    step = {}
    for name, strategies in (("fednova", [nova(64), nova(32)]), ("fedavg", [FedAvg(), FedAvg()])):
        step[name] = -silo_round(strategies, model, trained, sizes, coordinator_sum)["weight"].reshape(2).double()
    assert float(step["fedavg"][0] / step["fedavg"][1]) == pytest.approx(4.0, rel=1e-6)
    assert float(step["fednova"][0] / step["fednova"][1]) == pytest.approx(2.0, rel=1e-6)
    tau_eff = (64 * 8 + 32 * 4) / 96
    assert float(step["fednova"].sum()) == pytest.approx(lr * tau_eff, rel=1e-6)


# -- robustness and declarations -------------------------------------------------------------------
def test_apply_without_a_usable_slot(caplog: pytest.LogCaptureFixture) -> None:
    start = {"w": torch.ones(3)}
    state = AgentState(run_id="r", fingerprint="f", global_shared=dict(start))
    with pytest.raises(ValueError, match=WORK_SLOT):
        FedNova().apply(mean={"w": np.ones(3, np.float32)}, state=state, rnd=1, total_rounds=1)
    for bad in (0.0, -1.0, float("nan")):
        with caplog.at_level(logging.ERROR, logger="fedsilo.agent"):
            FedNova().apply(mean={"w": np.ones(3, np.float32), WORK_SLOT: np.array([bad])}, state=state, rnd=1,
                            total_rounds=1)
        assert torch.equal(state.global_shared["w"], start["w"])
    assert "left as it was" in caplog.text


def test_declarations() -> None:
    from fedsilo.silo_agent.bench.methods import study_method_names

    method = get_method("fednova")
    assert method is FedNova and DpLevel.SILO in method.refuses and DpLevel.RECORD not in method.refuses
    assert "fednova" in study_method_names() and method.bench is not None and method.bench.privacy is not None
    assert not method.needs_he and FedNova().disclosures(train=None, plan=None) == []
