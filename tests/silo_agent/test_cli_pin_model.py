"""``fedsilo pin-model``: the pin printed from federation.toml is the model agents build; bad configs fail cleanly.

The agent's side is computed from what it receives: the config through the coordinator's GetRun
conversion and the agent's (``run_info_to_proto`` → ``run_info_from_proto``), then the daemon's
model rule (``model_pin.build_run_model``, with the silo's ``model.base_checkpoint``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.cli.main import main
from fedsilo.coordinator.loading import load_federation_config
from fedsilo.coordinator.wire import run_info_to_proto
from fedsilo.silo_agent.config import load_agent_config
from fedsilo.silo_agent.demo import DEMO_LORA, DEMO_PRIVACY, make_certs, silo_names, write_configs
from fedsilo.silo_agent.model_pin import build_run_model
from fedsilo.silo_agent.wire import run_info_from_proto

PIN_RE = re.compile(r'^model_fingerprint = "([0-9a-f]{64})"\nshared_tensors_sha256 = "([0-9a-f]{64})"$', re.M)


def agent_pin(fed: Path, silo_toml: Path) -> tuple[str, str]:
    """(fingerprint, manifest digest) of the model an agent with ``silo_toml`` builds for the run of ``fed``."""
    info = run_info_from_proto(run_info_to_proto(load_federation_config(fed)))
    agent = load_agent_config(silo_toml)
    built = build_run_model(task=info.task, model_config=info.model_config, strategy=info.strategy,
                            tables=info.tables, record_level=info.privacy is not None and info.privacy.record_level,
                            base_checkpoint=agent.base_checkpoint)
    return built.fingerprint, built.manifest.digest()


def pin_model(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["pin-model", *args])
    return result.exit_code, result.stdout, result.stderr


def printed_pin(stdout: str) -> tuple[str, str]:
    found = PIN_RE.search(stdout)
    assert found is not None, stdout
    return found.group(1), found.group(2)


def without_pin(fed: Path) -> None:
    fed.write_text("\n".join(line for line in fed.read_text().splitlines()
                             if not line.startswith(("model_fingerprint", "shared_tensors_sha256"))))


def test_pin_model_prints_the_pin_an_agent_computes_and_the_demo_writes(tmp_path: Path) -> None:
    names = silo_names(2)
    make_certs(tmp_path / "certs", names)
    fed, agents = write_configs(tmp_path, names=names, rounds=1, strategy="fedbn", seed=3, port=1, insecure=False,
                                privacy=DEMO_PRIVACY)  # record-level DP-SGD: the model is made Opacus-compatible
    written = tomllib.loads(fed.read_text())["run"]
    pin = agent_pin(fed, agents[0])
    assert (written["model_fingerprint"], written["shared_tensors_sha256"]) == pin
    without_pin(fed)  # a study that has not pinned yet
    code, out, err = pin_model("--config", str(fed))
    assert code == 0, err
    assert printed_pin(out) == pin
    # the printed lines are TOML to paste under [run]: the pinned config loads with that pin
    text = fed.read_text().replace("[run]\n", f"[run]\n{PIN_RE.search(out).group(0)}\n", 1)
    fed.write_text(text)
    cfg = load_federation_config(fed)
    assert (cfg.model_fingerprint, cfg.shared_tensors_sha256) == pin
    # a different model setting is a different pin
    fed.write_text(text.replace("seed = 3", "seed = 4"))
    code, out, err = pin_model("--config", str(fed))
    assert code == 0, err
    assert printed_pin(out)[0] != pin[0]
    assert "already pins another model" in err


def test_pin_model_of_a_lora_run_follows_the_base_checkpoint(tmp_path: Path) -> None:
    from fedsilo.models import ModelConfig, TrainConfig
    from fedsilo.models.pretrain import PretrainConfig, pretrain, save_checkpoint
    from fedsilo.silo_agent.demo import DEMO_MODEL, DEMO_TRAINING

    base = tmp_path / "base.pt"
    save_checkpoint(pretrain(PretrainConfig(model=ModelConfig.from_mapping({**DEMO_MODEL, "seed": 0}),
                                            training=TrainConfig.from_mapping(DEMO_TRAINING), epochs=1,
                                            image_size=32, n_train=2, n_test=1)), base)
    names = silo_names(2)
    make_certs(tmp_path / "certs", names)
    fed, agents = write_configs(tmp_path, names=names, rounds=1, strategy="fedavg-lora", seed=0, port=1,
                                insecure=False, lora=DEMO_LORA, base_checkpoint=base)
    written = tomllib.loads(fed.read_text())["run"]
    pin = agent_pin(fed, agents[1])
    assert (written["model_fingerprint"], written["shared_tensors_sha256"]) == pin
    code, out, err = pin_model("--config", str(fed), "--base-checkpoint", str(base))
    assert code == 0, err
    assert printed_pin(out) == pin
    assert "already pins this model" in err
    code, out, err = pin_model("--config", str(fed))  # no base: a freshly initialised base, another model
    assert code == 0, err
    assert printed_pin(out)[0] != pin[0]
    assert "--base-checkpoint" in err


FED = """
[run]
id = "study-1"
rounds = 3
min_silos = 1
aggregation = "plain"
{run}
[silos]
enrolled = ["hospital-a"]
[server]
listen = "127.0.0.1:0"
insecure = true
{tables}
"""


@pytest.mark.parametrize(("run", "tables", "code", "fragments"), [
    ("", "[model]\nno_such_setting = 1\n", 1, ("[model] settings", "segmentation-2d", "no_such_setting")),
    ("", '[model]\nchannels = "many"\n', 1, ("[model] settings", "channels")),
    ('task = "no-such-task"', "", 1, ("no-such-task",)),
    ("rounds = 0", "", 2, ("run.rounds",)),
    ('model_fingerprint = "abc"\nshared_tensors_sha256 = "abc"', "", 2, ("run.model_fingerprint",)),
])
def test_pin_model_refuses_a_bad_config_with_a_clear_message(tmp_path: Path, run: str, tables: str, code: int,
                                                             fragments: tuple[str, ...]) -> None:
    fed = tmp_path / "federation.toml"
    text = FED.format(run=run, tables=tables)
    if run.startswith("rounds"):
        text = text.replace("rounds = 3\n", "")
    fed.write_text(text)
    got, out, err = pin_model("--config", str(fed))
    assert got == code, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    assert "model_fingerprint =" not in out


def test_pin_model_needs_an_existing_base_checkpoint(tmp_path: Path) -> None:
    fed = tmp_path / "federation.toml"
    fed.write_text(FED.format(run="", tables=""))
    got, _, err = pin_model("--config", str(fed), "--base-checkpoint", str(tmp_path / "missing.pt"))
    assert got == 2 and "missing.pt" in err
