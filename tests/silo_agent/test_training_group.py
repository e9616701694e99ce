"""``[agent] gpus``/``nodes``/``master`` and the training group's plumbing (the group itself runs in
tests/models/test_models_parallel.py and tests/e2e/test_training_group.py)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fedsilo.cli.main import main
from fedsilo.coordinator.config import ConfigError
from fedsilo.models import ModelConfig, SyntheticConfig, TrainConfig, build_model, silo_splits
from fedsilo.models.tasks import get_task
from fedsilo.silo_agent.config import AgentConfig, load_agent_config
from fedsilo.silo_agent.training_group import (
    GroupError,
    TrainingGroup,
    TrainJob,
    check_devices,
    decode_job,
    encode_job,
    torchrun_command,
)

AGENT = """
[agent]
coordinator = "localhost:50051"
state_dir = "state"
insecure = true
name = "hospital-a"
{extra}
[data]
source = "builtin"
domain = 0
"""


def _write(tmp_path: Path, extra: str) -> Path:
    cfg = tmp_path / "silo.toml"
    cfg.write_text(AGENT.format(extra=extra))
    return cfg


def _cfg(**kwargs: object) -> AgentConfig:
    return AgentConfig(coordinator="localhost:1", state_dir=Path("s"), insecure=True, name="hospital-a",
                       **kwargs)  # type: ignore[arg-type]


def test_the_group_settings_load(tmp_path: Path) -> None:
    cfg = load_agent_config(_write(tmp_path, 'gpus = 4\nnodes = 2\nmaster = "node0.hospital.lan:29400"\ndevice = "cuda"'))
    assert (cfg.gpus, cfg.nodes, cfg.master, cfg.group_size) == (4, 2, "node0.hospital.lan:29400", 8)
    plain = load_agent_config(_write(tmp_path, ""))
    assert (plain.gpus, plain.nodes, plain.master, plain.group_size) == (1, 1, None, 1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"gpus": 0}, r"agent\.gpus: 0 must be an integer in \[1, 64\]"),
    ({"gpus": 65}, r"agent\.gpus: 65"),
    ({"gpus": True}, r"agent\.gpus: True"),
    ({"gpus": "2"}, r"agent\.gpus: '2'"),
    ({"nodes": 0}, r"agent\.nodes: 0"),
    ({"gpus": 2, "device": "cuda:1"}, r"agent\.device: 'cuda:1' names one GPU, but agent\.gpus = 2"),
    ({"nodes": 2}, r"agent\.master: None must be host:port of node 0 when agent\.nodes = 2"),
    ({"nodes": 2, "master": "node0"}, r"agent\.master: 'node0'"),
    ({"nodes": 2, "master": "node0:0"}, r"agent\.master: 'node0:0'"),
    ({"nodes": 2, "master": 29400}, r"agent\.master: 29400"),
    ({"master": "node0:29400"}, r"agent\.master: 'node0:29400' is only used with agent\.nodes > 1"),
])
def test_bad_group_settings_are_refused_by_name(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _cfg(**kwargs)


def test_an_unknown_agent_key_is_still_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gpu"):
        load_agent_config(_write(tmp_path, "gpu = 2"))


def test_torchrun_commands() -> None:
    one = torchrun_command(config_path=Path("/etc/silo.toml"), gpus=2, nodes=1, master=None, node_rank=0,
                           insecure=False)
    assert one == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1", "--standalone",
                   "-m", "fedsilo", "agent", "--config", "/etc/silo.toml"]
    two = torchrun_command(config_path=Path("silo.toml"), gpus=4, nodes=2, master="node0:29400", node_rank=1,
                           insecure=True)
    assert two[3:7] == ["--nproc-per-node=4", "--nnodes=2", "--node-rank=1", "--master-addr=node0"]
    assert two[7] == "--master-port=29400" and two[-1] == "--insecure"


def test_a_node_rank_beyond_the_nodes_is_refused(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "gpus = 2")
    result = CliRunner().invoke(main, ["agent", "--config", str(cfg), "--insecure", "--node-rank", "1"])
    assert result.exit_code == 2 and "--node-rank 1: agent.nodes = 1" in result.output
    assert not (tmp_path / "state").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpus_without_gpus_are_refused_before_any_process_starts(tmp_path: Path) -> None:
    cfg = _write(tmp_path, 'gpus = 2\ndevice = "cuda"')
    result = CliRunner().invoke(main, ["agent", "--config", str(cfg), "--insecure"])
    assert result.exit_code == 1, result.output
    assert "agent.gpus = 2 with agent.device = 'cuda'" in result.output and "0 GPU(s)" in result.output
    assert not (tmp_path / "state").exists()
    check_devices("cpu", 8)  # CPU ranks need no GPU


def test_joining_outside_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSILO_TRAINING_GROUP", raising=False)
    with pytest.raises(GroupError, match="not started by torchrun"):
        TrainingGroup.join("cpu")


def test_a_job_carries_the_training_set_as_a_reference() -> None:
    train = silo_splits(SyntheticConfig(image_size=32, n_train=64, n_val=0, n_test=0), 0).train
    model = build_model(ModelConfig(channels=(4, 8, 16), strides=(2, 2)))
    job = TrainJob(model=model, train=train, train_cfg=TrainConfig(), dp=None, round_index=3,
                   task=get_task("segmentation-2d"))
    data = encode_job(job, train)
    assert len(data) < train.images.numel() * 4 / 4  # far smaller than the images it does not carry
    mine = silo_splits(SyntheticConfig(image_size=32, n_train=64, n_val=0, n_test=0), 0).train
    got = decode_job(data, mine)
    assert got.train is mine and got.round_index == 3 and got.task.name == "segmentation-2d"
    assert all(torch.equal(a, b) for a, b in zip(got.model.state_dict().values(), model.state_dict().values()))
    with_copy = encode_job(job, object())  # without the reference the images travel
    assert len(with_copy) > len(data) + train.images.numel() * 4 // 2
    with pytest.raises(pickle.UnpicklingError, match="expected a TrainJob"):
        decode_job(pickle.dumps([1, 2]), mine)


def test_the_precision_setting_loads_and_is_checked(tmp_path: Path) -> None:
    from fedsilo.models import Precision

    assert load_agent_config(_write(tmp_path, 'precision = "bf16"')).precision is Precision.BF16
    assert load_agent_config(_write(tmp_path, "")).precision is Precision.FP32
    with pytest.raises(ConfigError, match=r"agent\.precision: 'fp16' is not one of 'fp32', 'bf16'"):
        load_agent_config(_write(tmp_path, 'precision = "fp16"'))
