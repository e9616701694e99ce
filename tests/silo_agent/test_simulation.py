"""``simulate()``: whole runs in one process through the deployed coordinator and agents (DP, sealed exchanges, failures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsilo.coordinator.loading import load_federation_config
from fedsilo.privacy.audit import DISCLOSURES_FILE
from fedsilo.silo_agent.config import load_agent_config
from fedsilo.silo_agent.demo import DEMO_BUDGET, DEMO_PRIVACY, make_certs, silo_names, write_configs
from fedsilo.silo_agent.simulation import SimulationError, simulate

SMALL = {"n_train": 16, "n_val": 4, "n_test": 4, "image_size": 32}


def _configs(work: Path, *, strategy: str, privacy: dict | None):
    names = silo_names(2)
    make_certs(work / "certs", names)
    data = [{"source": "builtin", "domain": i, "seed": 0, **SMALL} for i in range(len(names))]
    return write_configs(work, names=names, rounds=1, strategy=strategy, seed=0, port=1, insecure=False,
                         privacy=privacy, min_silos=len(names),
                         budgets={n: DEMO_BUDGET for n in names} if privacy else None, data=data)


def test_fedrdn_under_dp_states_its_statistics_and_accounts_dp_sgd(tmp_path: Path) -> None:
    """A DP FedRDN run: every silo's ε comes from the coordinator's ledger mirror (DP-SGD only, at most the
    plan's 8), the sealed statistics reached every silo (a table of all silos), and each silo's state dir
    carries the disclosure its audit reports print: the statistics are outside the ledger."""
    plan = {**DEMO_PRIVACY, "sample_rate": 0.5, "steps_per_round": 2}
    fed, agents = _configs(tmp_path, strategy="fedrdn", privacy=plan)
    result = simulate(load_federation_config(fed), [load_agent_config(a) for a in agents])
    assert sorted(result.epsilon) == silo_names(2)
    assert all(0 < eps <= 8.0 + 1e-9 for eps in result.epsilon.values())
    for name, state in result.states.items():
        table = state.strategy_state["rdn/table"]
        assert table.shape[0] == 2, f"{name} holds the statistics of both silos"
        disclosures = json.loads((tmp_path / name / DISCLOSURES_FILE).read_text())
        assert [d["topic"] for d in disclosures] == ["FedRDN normalisation statistics (not differentially private)"]
        assert "2 x 1 numbers" in disclosures[0]["statement"]
    assert [r.round for r in result.rounds] == [1]
    assert set(result.rounds[0].contributors) == set(silo_names(2))


def test_a_silo_the_run_does_not_enrol_fails_the_simulation_by_name(tmp_path: Path) -> None:
    """hospital-b holds a valid certificate of the federation CA but is not enrolled: the coordinator refuses
    it (PERMISSION_DENIED) and simulate() says which silo failed and why."""
    fed, agents = _configs(tmp_path, strategy="fedavg", privacy=None)
    text = fed.read_text()
    fed.write_text(text.replace('enrolled = ["hospital-a", "hospital-b"]', 'enrolled = ["hospital-a"]')
                   .replace("min_silos = 2", "min_silos = 1"))
    assert fed.read_text() != text
    with pytest.raises(SimulationError, match=r"agent hospital-b failed: .*PERMISSION_DENIED"):
        simulate(load_federation_config(fed), [load_agent_config(a) for a in agents], timeout_s=120)
