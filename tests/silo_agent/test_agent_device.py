"""``[agent] device``: its validation, the refusal of an unusable device at start, and whole runs on each device."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fedsilo.cli.main import main
from fedsilo.coordinator.config import ConfigError
from fedsilo.coordinator.loading import load_federation_config
from fedsilo.silo_agent.config import AgentConfig, DeviceKind, DeviceSetting, load_agent_config
from fedsilo.silo_agent.demo import make_certs, silo_names, write_configs
from fedsilo.silo_agent.simulation import SimulationResult, simulate

CUDA = torch.cuda.is_available()

AGENT_OK = """
[agent]
coordinator = "localhost:50051"
state_dir = "state"
insecure = true
name = "hospital-a"
[data]
source = "builtin"
domain = 0
"""


def _write(tmp_path: Path, device: str | None) -> Path:
    cfg = tmp_path / "silo.toml"
    line = "" if device is None else f'device = "{device}"\n'
    cfg.write_text(AGENT_OK.replace('name = "hospital-a"\n', f'name = "hospital-a"\n{line}'))
    return cfg


@pytest.mark.parametrize(("text", "kind", "index"), [
    (None, DeviceKind.CPU, None),
    ("auto", DeviceKind.AUTO, None),
    ("cpu", DeviceKind.CPU, None),
    ("cuda", DeviceKind.CUDA, None),
    ("cuda:0", DeviceKind.CUDA, 0),
    ("cuda:7", DeviceKind.CUDA, 7),
])
def test_the_device_setting_loads(tmp_path: Path, text: str | None, kind: DeviceKind, index: int | None) -> None:
    cfg = load_agent_config(_write(tmp_path, text))
    assert cfg.device == DeviceSetting(kind=kind, index=index)
    assert str(cfg.device) == (text or "cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:-1", "cpu:0", "cuda:", "CUDA", "cuda:12345", "auto:0"])
def test_a_bad_device_is_refused_naming_agent_device(tmp_path: Path, bad: str) -> None:
    cfg = _write(tmp_path, bad)
    with pytest.raises(ConfigError, match=rf"agent\.device: {bad!r}"):
        load_agent_config(cfg)
    with pytest.raises(ConfigError, match=r"agent\.device"):
        AgentConfig(coordinator="localhost:1", state_dir=tmp_path, insecure=True, name="hospital-a", device=bad)
    result = CliRunner().invoke(main, ["agent", "--config", str(cfg), "--insecure"])
    assert result.exit_code == 2, result.output
    assert "agent.device" in result.output and bad in result.output
    assert not (tmp_path / "state").exists(), "a bad config must not create state"


def test_a_device_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "silo.toml"
    cfg.write_text(AGENT_OK.replace("insecure = true", "insecure = true\ndevice = 0"))
    with pytest.raises(ConfigError, match=r"agent\.device: 0 must be"):
        load_agent_config(cfg)
    with pytest.raises(ConfigError, match=r"agent\.device: index 1 needs kind 'cuda'"):
        DeviceSetting(kind=DeviceKind.CPU, index=1)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_stops_the_agent_at_start(tmp_path: Path, device: str) -> None:
    """The config is well formed, but this process cannot use CUDA: the agent refuses before it dials
    anyone (nothing listens on localhost:50051), naming the setting, with a non-zero exit."""
    result = CliRunner().invoke(main, ["agent", "--config", str(_write(tmp_path, device)), "--insecure"])
    assert result.exit_code == 1, result.output
    assert f"agent.device = {device!r}" in result.output
    assert "CUDA is not available" in result.output


# -- whole runs ------------------------------------------------------------------------------------


def _run(work: Path, device: str | None) -> SimulationResult:
    """A two-round FedAvg run of one silo (one contributor: the aggregate, too, is bit-reproducible)."""
    names = silo_names(1)
    make_certs(work / "certs", names)
    data = [{"source": "builtin", "domain": i, "seed": 0, "n_train": 8, "n_val": 2, "n_test": 2, "image_size": 32}
            for i in range(len(names))]
    fed, agents = write_configs(work, names=names, rounds=2, strategy="fedavg", seed=0, port=1, insecure=False,
                                privacy=None, min_silos=len(names), budgets=None, data=data)
    configs = [load_agent_config(a) for a in agents]
    if device is not None:
        configs = [dataclasses.replace(c, device=DeviceSetting.parse(device)) for c in configs]
    return simulate(load_federation_config(fed), configs, timeout_s=300)


def _metrics(result: SimulationResult) -> list[dict[str, list[tuple[str, float, int]]]]:
    return [r.metrics for r in result.rounds]


@pytest.mark.parametrize("device", ["cpu", pytest.param("auto", marks=pytest.mark.skipif(CUDA, reason="CUDA here"))])
def test_a_run_on_the_cpu_is_bit_identical_to_the_default(tmp_path: Path, device: str) -> None:
    """The daemon threads agent.device through training and evaluation; on the CPU every silo's final
    model and every reported metric equal those of a run without the setting, bit for bit."""
    default = _run(tmp_path / "default", None)
    chosen = _run(tmp_path / device, device)
    assert _metrics(chosen) == _metrics(default)
    assert any(m for m in _metrics(default)), "the run reports metrics"
    for name, state in default.states.items():
        other = chosen.states[name].model
        assert state.model.keys() == other.keys()
        assert all(torch.equal(v, other[k]) for k, v in state.model.items()), name


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: run this on a GPU machine")
def test_a_run_on_cuda_keeps_the_agent_state_on_the_cpu(tmp_path: Path) -> None:
    """Training and evaluation on CUDA; the state (checkpoint, uploads, strategy tensors) stays on the CPU
    and the run's Dice is close to the CPU run's (CUDA is not bit-identical)."""
    cpu = _run(tmp_path / "cpu", None)
    gpu = _run(tmp_path / "gpu", "cuda")
    for state in gpu.states.values():
        assert {t.device for t in state.model.values()} == {torch.device("cpu")}
        assert {t.device for t in state.global_shared.values()} == {torch.device("cpu")}
    dice = {name: value for name, value, _ in gpu.rounds[-1].metrics["dice"]}
    want = {name: value for name, value, _ in cpu.rounds[-1].metrics["dice"]}
    assert dice.keys() == want.keys()
    assert all(abs(dice[k] - want[k]) < 0.05 for k in want)
