"""End to end: a silo whose local training runs in a training group (``[agent] gpus = 2``: torchrun, 2 gloo
CPU processes) against a real coordinator, with HE and record-level DP-SGD, beside a one-process silo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

PRIVACY = {"record_level": True, "sample_rate": 0.25, "steps_per_round": 4, "max_grad_norm": 1.0,
           "noise_multiplier": 1.5, "delta": 1e-5}
BUDGET = {"epsilon": 20.0, "delta": 1e-5}


def test_a_silo_training_on_two_processes_takes_part_in_a_dp_run(federation_factory) -> None:
    fed = federation_factory(silos=2, rounds=2, deadline_s=240.0, privacy=PRIVACY,
                             budgets={"hospital-a": BUDGET, "hospital-b": BUDGET})
    cfg = fed.agent_cfgs["hospital-a"]
    cfg.write_text(cfg.read_text().replace("[agent]\n", '[agent]\ngpus = 2\ndevice = "cpu"\n', 1))
    fed.start("coordinator")
    for n in fed.names:
        fed.start(n)
    status, rounds = fed.wait_for(lambda s, r: s["state"] == "finished", 400, "the run to finish")
    fed.wait_agents(120)
    assert [sorted(r["contributors"]) for r in rounds] == [fed.names, fed.names]
    out = (fed.work / "hospital-a.out").read_text()
    assert "starting the training group (2 process(es) on this node, 1 node(s))" in out
    a_dir = fed.work / "hospital-a"
    assert "training group: rank 0 of 2 on cpu (gloo)" in (a_dir / "agent.log").read_text()
    trainer = (a_dir / "trainer-rank1.log").read_text()
    assert "rank 1 trained round 1" in trainer and "rank 1 trained round 2" in trainer
    assert "rank 1 stops after 2 round(s)" in trainer
    assert not (a_dir / "trainer-rank1").exists()  # rank 1 keeps no state of its own
    dice = [r["metrics"][n]["dice"]["value"] for r in rounds for n in r["metrics"]]
    assert len(dice) >= 2 and all(0.0 <= d <= 1.0 for d in dice), rounds
    assert any("hospital-a" in r["metrics"] for r in rounds), rounds
    # the accounting is that of the global batch: the same ε as the one-process silo, in a report that verifies
    out = fed.work / "audit"
    made = _cli("audit", "report", "--state", str(fed.work / "coordinator"), "--out", str(out))
    assert made.returncode == 0, made.stdout + made.stderr
    report = json.loads((out / "report.json").read_text())
    by_silo = {s["silo"]: s for s in report["silos"]}
    assert [len(by_silo[n]["entries"]) for n in fed.names] == [2, 2]
    spent = [by_silo[n]["cumulative"]["record"]["single_upload"] for n in fed.names]
    assert spent[0] == spent[1] > 0
    verified = _cli("audit", "verify", str(out / "report.json"), "--ca", str(fed.work / "certs" / "ca.pem"))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedsilo", *args], capture_output=True, text=True, timeout=300)
