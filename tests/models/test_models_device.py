"""Tests of the ``device`` of local training and evaluation: resolution, CPU bit-identity, and the GPU path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fedsilo.models import ModelConfig, SyntheticConfig, TrainConfig, build_model, evaluate, silo_splits, train_local
from fedsilo.models.data import SiloSplits
from fedsilo.models.dp_training import train_local_dp
from fedsilo.models.tasks import get_task
from fedsilo.models.training import resolve_device
from fedsilo.privacy.dpsgd import DpSgdConfig, make_private_compatible

DATA = SyntheticConfig(image_size=32, n_train=10, n_val=0, n_test=6)
SMALL_NET = ModelConfig(channels=(4, 8, 16), strides=(2, 2))
DP_NET = ModelConfig(channels=(4, 8), strides=(2,), num_res_units=0)
DP = DpSgdConfig(noise_multiplier=0.8, max_grad_norm=1.0, sample_rate=0.5, steps=3)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device: the GPU path is checked on a GPU machine")

#: Every way of asking for the CPU; "auto" is the CPU only where CUDA is unavailable.
CPU_SPELLINGS = ["cpu", torch.device("cpu"),
                 pytest.param("auto", marks=pytest.mark.skipif(CUDA, reason="'auto' is CUDA here"))]


@pytest.fixture(scope="module")
def splits() -> SiloSplits:
    torch.set_num_threads(1)
    return silo_splits(DATA, 0)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- resolution -------------------------------------------------------------------------------------


def test_none_and_cpu_resolve_to_the_cpu() -> None:
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:-1", "CUDA", "cpu:0", "cuda:", "", "meta", " cpu"])
def test_a_bad_device_string_is_refused_by_name(bad: str) -> None:
    with pytest.raises(ValueError, match=f"device {bad!r} is not one of"):
        resolve_device(bad)


def test_a_device_of_another_type_is_refused() -> None:
    with pytest.raises(ValueError, match="device 'meta' is not one of"):
        resolve_device(torch.device("meta"))
    with pytest.raises(ValueError, match="got int"):
        resolve_device(0)  # type: ignore[arg-type]


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_clear_error(spec: str, splits: SiloSplits) -> None:
    with pytest.raises(ValueError, match=f"device {spec!r}: CUDA is not available"):
        resolve_device(spec)
    model = build_model(SMALL_NET)
    before = _state(model)
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_local(model, splits.train, TrainConfig(batch_size=4), round_index=0, device=spec)
    with pytest.raises(ValueError, match="CUDA is not available"):
        evaluate(model, splits.test, device=spec)
    assert _identical(_state(model), before), "a refused device must leave the model untouched"


# -- CPU: every spelling gives the weights of no device, bit for bit ---------------------------------


@pytest.mark.parametrize("device", CPU_SPELLINGS)
def test_train_local_on_the_cpu_is_bit_identical_to_no_device(device: torch.device | str, splits: SiloSplits) -> None:
    cfg = TrainConfig(local_epochs=2, batch_size=4, seed=3)
    a = build_model(SMALL_NET)
    b = copy.deepcopy(a)
    start = _state(a)
    ra = train_local(a, splits.train, cfg, round_index=2)
    rb = train_local(b, splits.train, cfg, round_index=2, device=device)
    assert not _identical(_state(a), start), "training must move the weights"
    assert _identical(_state(a), _state(b))
    assert ra == rb
    assert {p.device for p in b.parameters()} == {torch.device("cpu")}


@pytest.mark.parametrize("device", CPU_SPELLINGS)
def test_a_task_and_anchor_on_the_cpu_are_bit_identical(device: torch.device | str, splits: SiloSplits) -> None:
    """FedProx's anchor and the Task's batches and loss take the device path too."""
    task = get_task("segmentation-2d")
    cfg = TrainConfig(batch_size=5, proximal_mu=0.5)
    a = build_model(SMALL_NET)
    anchor = {k: v * 0.5 for k, v in _state(a).items()}
    b = copy.deepcopy(a)
    train_local(a, splits.train, cfg, round_index=1, anchor=anchor, task=task)
    train_local(b, splits.train, cfg, round_index=1, anchor=anchor, task=task, device=device)
    assert _identical(_state(a), _state(b))


@pytest.mark.parametrize("device", CPU_SPELLINGS)
def test_train_local_dp_on_the_cpu_is_bit_identical(device: torch.device | str, splits: SiloSplits) -> None:
    a = make_private_compatible(build_model(DP_NET))
    b = copy.deepcopy(a)
    start = _state(a)
    ra = train_local_dp(a, splits.train, TrainConfig(seed=1), DP, round_index=4, noise_seed=11)
    rb = train_local_dp(b, splits.train, TrainConfig(seed=1), DP, round_index=4, noise_seed=11, device=device)
    assert not _identical(_state(a), start)
    assert _identical(_state(a), _state(b))
    assert ra.steps == rb.steps and ra.examples == rb.examples
    assert ra.loss == rb.loss or (math.isnan(ra.loss) and math.isnan(rb.loss))
    assert {p.device for p in b.parameters()} == {torch.device("cpu")}


@pytest.mark.parametrize("device", CPU_SPELLINGS)
def test_evaluation_on_the_cpu_is_identical_to_no_device(device: torch.device | str, splits: SiloSplits) -> None:
    model = build_model(SMALL_NET)
    train_local(model, splits.train, TrainConfig(batch_size=4), round_index=0)
    model.eval()
    task = get_task("segmentation-2d")
    assert evaluate(model, splits.test, device=device) == evaluate(model, splits.test)
    assert task.evaluate_split(model, splits.test, "test", device=device) == task.evaluate_split(
        model, splits.test, "test")
    assert not model.training, "evaluation restores the model's mode"


# -- the GPU path (skipped without CUDA; run these on a GPU machine) ---------------------------------


@needs_cuda
def test_train_local_on_cuda_returns_the_model_to_the_cpu(splits: SiloSplits) -> None:
    cfg = TrainConfig(local_epochs=2, batch_size=4)
    cpu = build_model(SMALL_NET)
    gpu = copy.deepcopy(cpu)
    start = _state(cpu)
    rc = train_local(cpu, splits.train, cfg, round_index=1)
    rg = train_local(gpu, splits.train, cfg, round_index=1, device="cuda")
    assert {p.device for p in gpu.parameters()} == {torch.device("cpu")}
    assert {t.device for t in gpu.state_dict().values()} == {torch.device("cpu")}
    assert not _identical(_state(gpu), start)
    # same data order and seed: CUDA kernels round differently, but the run is the same run
    assert rg.steps == rc.steps and rg.examples == rc.examples
    assert rg.loss == pytest.approx(rc.loss, rel=0.05)
    for k, v in _state(cpu).items():
        assert torch.allclose(v.float(), _state(gpu)[k].float(), atol=1e-2), k


@needs_cuda
def test_train_local_dp_on_cuda_returns_the_model_to_the_cpu(splits: SiloSplits) -> None:
    model = make_private_compatible(build_model(DP_NET))
    start = _state(model)
    result = train_local_dp(model, splits.train, TrainConfig(), DP, round_index=0, noise_seed=3, device="cuda:0")
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert not _identical(_state(model), start)
    assert all(torch.isfinite(v).all() for v in _state(model).values() if v.is_floating_point())
    assert result.steps == DP.steps


@needs_cuda
def test_evaluation_on_cuda_matches_the_cpu(splits: SiloSplits) -> None:
    model = build_model(SMALL_NET)
    train_local(model, splits.train, TrainConfig(batch_size=4, local_epochs=3), round_index=0)
    on_cpu = evaluate(model, splits.test)
    on_gpu = evaluate(model, splits.test, device="auto")
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert on_gpu.n == on_cpu.n
    assert on_gpu.dice == pytest.approx(on_cpu.dice, abs=0.02)
