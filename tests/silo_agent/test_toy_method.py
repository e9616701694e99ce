"""A method defined outside the product (issue 13): a toy registered here alone goes through config
validation, ``simulate()``, ``fedsilo bench`` and a real-process ``fedsilo demo`` (which imports this
very file as a plugin through ``FEDSILO_PLUGINS``), with no other file naming it.

The toy, ``toy-localbias``, keeps every bias (state_dict entries named ``*.bias``) local and averages
everything else; it refuses silo-level DP with a reason of its own.

This module is imported twice over: by pytest, and by every ``fedsilo`` process of the demo test as
a plugin (under another module name). Its top level therefore imports without torch and without a
running pytest, and nothing here imports ``fedsilo.cli.main`` at import time (the CLI loads plugins
while it is being imported itself).
"""

from __future__ import annotations

import sys

# Decided before pytest is imported below: a `fedsilo` process importing this file as a plugin has no
# pytest loaded yet, a pytest process has.
_IMPORTED_BY_PYTEST = "_pytest" in sys.modules

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402

from fedsilo.core.methods import (  # noqa: E402
    BenchDefaults,
    DpLevel,
    get_method,
    method_names,
    register_method,
    unregister_method,
)
from fedsilo.silo_agent.strategy import Strategy  # noqa: E402

if TYPE_CHECKING:
    import torch

TOY = "toy-localbias"
TOY_DP_REASON = "toy method: its local biases would leak through the unclipped rest"
TOY_NOTE = "toy (test plugin): every bias local, the rest averaged"


@register_method
class ToyLocalBias(Strategy):
    """Shares every floating-point entry except biases (``*.bias``), which stay on the silo.

    It shares every convolution weight, so it also satisfies the Strategy contract test.
    """

    name = TOY
    summary = "toy test plugin: every bias kept local, everything else averaged (fedsilo tests)"
    refuses = {DpLevel.SILO: TOY_DP_REASON}
    order = 10_000
    bench = BenchDefaults(note=TOY_NOTE)

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return not is_bias(name)


def is_bias(name: str) -> bool:
    """Whether state_dict entry ``name`` is a bias (the toy keeps it local)."""
    return name.rsplit(".", 1)[-1] == "bias"


if _IMPORTED_BY_PYTEST:
    # Under pytest (every xdist worker imports this module while collecting) the toy is registered only
    # while this module's tests run (`toy_method` below): other tests, e.g. the contract test that
    # parametrises over method_names() at collection, see the built-in methods only. Imported as a
    # plugin by a `fedsilo` process, it stays registered for that process's life.
    unregister_method(TOY)

# -- pytest from here on: nothing below runs at import --------------------------------------------
SMALL = {"n_train": 16, "n_val": 4, "n_test": 4, "image_size": 32}


@pytest.fixture(autouse=True, scope="module")
def toy_method() -> Iterator[type[ToyLocalBias]]:
    """The toy is a registered method while this module's tests run, and not after (the registry is
    process-global)."""
    register_method(ToyLocalBias)
    try:
        yield ToyLocalBias
    finally:
        unregister_method(TOY)


def _configs(work: Path, *, silos: int, rounds: int, strategy: str = TOY, privacy: dict | None = None,
             aggregation: str = "plain", data: bool = True) -> tuple[Path, list[Path]]:
    from fedsilo.silo_agent.demo import DEMO_BUDGET, make_certs, silo_names, write_configs

    names = silo_names(silos)
    if not (work / "certs" / "ca.pem").exists():
        make_certs(work / "certs", names)
    return write_configs(work, names=names, rounds=rounds, strategy=strategy, seed=0, port=1, insecure=False,
                         aggregation=aggregation, privacy=privacy, min_silos=silos,
                         budgets={n: DEMO_BUDGET for n in names} if privacy else None,
                         data=[{"source": "builtin", "domain": i, "seed": 0, **SMALL} for i in range(silos)]
                         if data else None)


def _demo_shared_numel() -> tuple[int, int]:
    """(elements the toy shares, elements FedAvg shares) of the demo's model."""
    from fedsilo.models import ModelConfig, build_model
    from fedsilo.silo_agent.methods import strategy_for
    from fedsilo.silo_agent.presets import DEMO_MODEL

    model = build_model(ModelConfig.from_mapping({**DEMO_MODEL, "seed": 0}))
    sd = model.state_dict()
    toy = sum(sd[k].numel() for k in ToyLocalBias().shared_names(model))
    fedavg = sum(sd[k].numel() for k in strategy_for("fedavg").shared_names(model))
    return toy, fedavg


# -- (1) config validation ------------------------------------------------------------------------
def test_config_accepts_the_toy_and_refuses_what_it_declares(tmp_path: Path) -> None:
    from fedsilo.coordinator.config import ConfigError
    from fedsilo.coordinator.loading import load_federation_config
    from fedsilo.silo_agent.demo import DEMO_LORA_PRIVACY, DEMO_PRIVACY
    from fedsilo.silo_agent.methods import strategy_for

    assert TOY in method_names() and get_method(TOY) is ToyLocalBias
    assert isinstance(strategy_for(TOY), ToyLocalBias)

    # without DP and with the record-level DP it does not refuse: accepted, and the run's method is the toy
    for privacy in (None, DEMO_PRIVACY):
        fed, _ = _configs(tmp_path, silos=2, rounds=1, privacy=privacy, data=False)
        cfg = load_federation_config(fed)
        assert cfg.strategy == TOY and cfg.method is ToyLocalBias
        assert (cfg.privacy is None) is (privacy is None)

    # silo-level DP, which the toy refuses: the field and the toy's own reason
    fed, _ = _configs(tmp_path, silos=2, rounds=1, privacy=DEMO_LORA_PRIVACY, data=False)
    with pytest.raises(ConfigError) as err:
        load_federation_config(fed)
    message = str(err.value)
    assert message.startswith("privacy.silo_level:"), message
    assert TOY in message and TOY_DP_REASON in message, message

    # an unknown name is refused naming run.strategy and the registered methods (the toy among them)
    fed, _ = _configs(tmp_path, silos=2, rounds=1, strategy="toy-nope", data=False)
    with pytest.raises(ConfigError, match=r"^run\.strategy: 'toy-nope' is not one of the registered methods") as err:
        load_federation_config(fed)
    assert TOY in str(err.value)

    # the registry is what config validation reads: unregistered, the toy is an unknown name too
    fed, _ = _configs(tmp_path, silos=2, rounds=1, data=False)
    unregister_method(TOY)
    try:
        with pytest.raises(ConfigError, match=rf"^run\.strategy: '{TOY}' is not one of the registered methods"):
            load_federation_config(fed)
    finally:
        register_method(ToyLocalBias)
    assert load_federation_config(fed).method is ToyLocalBias


# -- (2) simulate() ---------------------------------------------------------------------------------
@pytest.mark.xdist_group("e2e")
def test_simulated_run_keeps_biases_local_and_averages_the_rest(tmp_path: Path) -> None:
    """Two rounds, three silos on different domains: every non-bias entry is one federation value
    (bit-equal on every silo, and what each silo evaluates), every bias is the silo's own (some
    differ between silos, none is in the shared set); each round shares exactly the toy's elements."""
    from fedsilo.coordinator.loading import load_federation_config
    from fedsilo.models import ModelConfig, build_model
    from fedsilo.silo_agent.config import load_agent_config
    from fedsilo.silo_agent.simulation import simulate

    fed, agents = _configs(tmp_path, silos=3, rounds=2)
    result = simulate(load_federation_config(fed), [load_agent_config(a) for a in agents], timeout_s=300)
    assert [r.round for r in result.rounds] == [1, 2]
    assert len(result.states) == 3

    states = list(result.states.values())
    model = build_model(ModelConfig.from_mapping(states[0].model_config))
    sd = model.state_dict()
    floats = [k for k, v in sd.items() if v.is_floating_point()]
    shared = ToyLocalBias().shared_names(model)
    biases = [k for k in floats if is_bias(k)]
    assert biases and shared == [k for k in floats if not is_bias(k)]
    conv_weights = [f"{k}.weight" for k, m in model.named_modules() if type(m).__name__ == "Conv2d"]
    assert conv_weights and set(conv_weights) <= set(shared)  # what the Strategy contract asks of it
    numel = sum(sd[k].numel() for k in shared)
    assert all(r.params_shared == numel for r in result.rounds)
    assert all(set(r.contributors) == set(result.states) for r in result.rounds)

    import torch

    first = states[0]
    for state in states:
        assert state.applied_round == 2
        assert set(state.global_shared) == set(shared), "the federation's values are exactly the non-biases"
        personal = state.personal_state_dict()
        for k in shared:
            assert torch.equal(state.global_shared[k], first.global_shared[k]), k
            assert torch.equal(personal[k], first.global_shared[k]), k
        for k in biases:
            assert torch.equal(personal[k], state.model[k]), k  # each silo evaluates its own biases
    differing = [k for k in biases if any(not torch.equal(s.model[k], first.model[k]) for s in states[1:])]
    assert differing, "local biases trained on different domains must differ between silos"
    # and the shared values moved: they are the federation's mean, not the initial model's
    assert any(not torch.equal(first.global_shared[k], sd[k]) for k in shared)


# -- (3) fedsilo bench -------------------------------------------------------------------------------
@pytest.mark.xdist_group("e2e")
def test_bench_runs_the_toy_as_a_study_method(tmp_path: Path, fedsilo_logger: None) -> None:
    from click.testing import CliRunner

    from fedsilo.cli.main import main
    from fedsilo.silo_agent.bench.methods import methods as study_methods
    from fedsilo.silo_agent.bench.methods import study_method_names
    from fedsilo.silo_agent.bench.runner import cell_id

    assert TOY in study_method_names()
    assert study_methods()[TOY].strategy == TOY and study_methods()[TOY].note == TOY_NOTE

    out = tmp_path / "study"
    result = CliRunner().invoke(main, ["bench", "--methods", TOY, "--rounds", "1", "--seeds", "1", "--sweep", "none",
                                       "--silos", "2", "--aggregation", "plain", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "fedsilo bench: 1 method(s) x 1 seed(s) x 1 schedule(s)" in result.output, result.output
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert set(cells) == {cell_id(TOY, 0, 1, 1)}
    cell = cells[cell_id(TOY, 0, 1, 1)]
    assert (cell["method"], cell["rounds"], cell["note"]) == (TOY, 1, TOY_NOTE)
    assert cell["silos"] == ["hospital-a", "hospital-b"]
    [rec] = cell["rounds_log"]
    assert set(rec["metrics"]["dice"]) == {"hospital-a", "hospital-b"} and rec["bytes_up"] > 0
    summary = (out / "summary.md").read_text()
    assert re.search(rf"^\| {re.escape(TOY)} \|", summary, re.MULTILINE), summary
    assert TOY_NOTE in summary, summary


# -- (4) fedsilo demo, real processes, the toy known through FEDSILO_PLUGINS ------------------------
@pytest.mark.e2e
@pytest.mark.xdist_group("e2e")
def test_demo_runs_the_toy_from_a_plugin_file(tmp_path: Path) -> None:
    """The demo's coordinator and agents are separate processes: each learns the toy only by importing
    this file (FEDSILO_PLUGINS). Each round carries exactly the toy's share of the demo model."""
    out = tmp_path / "demo"
    env = dict(os.environ, FEDSILO_PLUGINS=str(Path(__file__).resolve()), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fedsilo", "demo", "--strategy", TOY, "--rounds", "1",
                           "--silos", "2", "--aggregation", "plain", "--no-dp", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["strategy"] == TOY
    assert (results["run"]["aggregation"], results["run"]["dp"]) == ("plain", False)
    [rnd] = results["rounds"]
    assert rnd["round"] == 1 and set(rnd["silos"]) == {"hospital-a", "hospital-b"}
    toy_numel, fedavg_numel = _demo_shared_numel()
    assert rnd["params_shared"] == toy_numel < fedavg_numel, (rnd["params_shared"], toy_numel, fedavg_numel)
    # without the plugin the same command does not know the toy
    bare = {k: v for k, v in env.items() if k != "FEDSILO_PLUGINS"}
    refused = subprocess.run([sys.executable, "-m", "fedsilo", "demo", "--strategy", TOY, "--rounds", "1",
                              "--no-dp", "--out", str(tmp_path / "bare")], capture_output=True, text=True,
                             timeout=120, env=bare)
    assert refused.returncode != 0 and TOY in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "bare" / "results.json").exists()
