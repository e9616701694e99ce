"""End to end: real processes (coordinator + agents via the CLI) on loopback with mutual TLS."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedsilo.silo_agent.demo import ADMIN_NAME, make_certs, silo_names, write_configs

# one worker runs these in turn (pytest-xdist --dist loadgroup): they time rounds and kill processes
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]


def _demo(out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "fedsilo", "demo", "--rounds", "2", "--out", str(out),
                           *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedsilo", *args], capture_output=True, text=True,
                          timeout=300)


def test_demo_normal_run(tmp_path: Path) -> None:
    """`fedsilo demo` as a user runs it: 3 silos, mTLS, HE aggregation, DP-SGD, the documented results.json
    and an audit report that verifies; and without DP. (HE against plaintext aggregation of the same run:
    ``test_simulated_run_equals_the_deployed_run``.)"""
    results = _demo(tmp_path / "demo")
    assert results["run"]["aggregation"] == "he" and results["run"]["dp"] is True
    audit = tmp_path / "demo" / "audit"
    report = json.loads((audit / "report.json").read_text())
    assert {s["silo"] for s in report["silos"]} == {"hospital-a", "hospital-b", "hospital-c"}
    for s in report["silos"]:
        assert len(s["entries"]) == 2  # one record-level release per round
        assert 0 < s["cumulative"]["record"]["single_upload"] <= 8.0 + 1e-9  # the demo's whole-run target
        assert results["privacy"][s["silo"]]["record"] == s["cumulative"]["record"]["single_upload"]
    assert "<svg" in (audit / "report.html").read_text()
    verify = _cli("audit", "verify", str(audit / "report.json"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert results["rounds"][-1]["mean_dice"] > results["rounds"][0]["mean_dice"]
    results = _demo(tmp_path / "he", "--no-dp")
    assert results["run"]["aggregation"] == "he" and results["run"]["dp"] is False
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert set(r["silos"]) == {"hospital-a", "hospital-b", "hospital-c"}
        assert sorted(r["contributors"]) == ["hospital-a", "hospital-b", "hospital-c"]
        for silo in r["silos"].values():
            assert 0.0 <= silo["dice"] <= 1.0 and silo["n_test"] > 0
        assert r["params_shared"] > 0
        # ciphertexts: at least 4 bytes per parameter each way, and at most 8 up (the HE target)
        assert 3 * 4 * r["params_shared"] <= r["bytes_up"] <= 3 * 8 * r["params_shared"]
        assert r["bytes_down"] >= 3 * 4 * r["params_shared"]
        assert r["seconds"] > 0
    assert rounds[-1]["mean_dice"] > rounds[0]["mean_dice"]
    assert 0.0 <= results["unseen_domain"]["dice"] <= 1.0
    assert results["run"]["transport"] == "mtls"


def test_agent_killed_mid_round_rejoins_later(federation_factory) -> None:
    """A silo dies in round 2: the round closes at quorum after its deadline; the silo rejoins in round 3.

    The deadline leaves the restarted agent time to start (import torch, open its state), catch up on
    round 2's aggregate and train round 3 while the other test worker keeps the CPU busy."""
    fed = federation_factory(silos=3, rounds=3, deadline_s=45.0)
    # hospital-c has more data, so it is still training when round 2 opens and we kill it
    cfg_c = fed.agent_cfgs["hospital-c"]
    cfg_c.write_text(cfg_c.read_text() + "n_train = 960\n")
    fed.start("coordinator")
    for n in fed.names:
        fed.start(n)
    fed.wait_for(lambda s, r: s["open_round"] == 2, 180, "round 2 to open")
    fed.kill("hospital-c")
    _, rounds = fed.wait_for(lambda s, r: len(r) >= 2 and r[1]["closed"], 120, "round 2 to close at quorum")
    r2 = rounds[1]
    assert sorted(r2["contributors"]) == ["hospital-a", "hospital-b"]
    assert r2["seconds"] >= 45.0 - 0.5, "closed before its deadline without all silos"
    # The restarted agent keeps its 960 examples: the size a silo declared is frozen once round 1 opened
    # (a re-join with another size is refused; tests/e2e/test_hostile_silo.py, weight lies).
    fed.start("hospital-c")
    status, rounds = fed.wait_for(lambda s, r: s["state"] == "finished", 240, "the run to finish")
    assert sorted(rounds[2]["contributors"]) == ["hospital-a", "hospital-b", "hospital-c"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    fed.wait_agents(120)
    c = {s["name"]: s for s in status["silos"]}["hospital-c"]
    assert c["rounds_contributed"] == 2


def test_coordinator_killed_and_restarted_resumes(federation_factory) -> None:
    """SIGKILL the coordinator mid-round: on restart no round is counted twice, no update lost or doubled."""
    fed = federation_factory(silos=3, rounds=3, deadline_s=120.0)
    fed.start("coordinator")
    for n in fed.names:
        fed.start(n)
    fed.wait_for(lambda s, r: len(r) >= 2 and len(r[1]["contributors"]) >= 1, 240,
                 "round 2 to have its first upload")
    fed.kill("coordinator")
    time.sleep(1.0)
    fed.start("coordinator")
    status, rounds = fed.wait_for(lambda s, r: s["state"] == "finished", 300, "the run to finish after restart")
    fed.wait_agents(120)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    n_train = {s["name"]: s["num_train_examples"] for s in status["silos"]}
    for r in rounds:
        assert r["closed"]
        assert sorted(r["contributors"]) == sorted(fed.names), r
        # each upload's weight counted exactly once
        assert r["total_weight"] == pytest.approx(sum(n_train.values())), r
    assert all(s["rounds_contributed"] == 3 for s in status["silos"])
    # the coordinator never held the run's secret HE key: no file of its state dir contains it
    secret = next((fed.work / "hospital-a").glob("he-secret-*.key")).read_bytes()
    probe = secret[len(secret) // 2 : len(secret) // 2 + 64]
    for f in (fed.work / "coordinator").rglob("*"):
        if f.is_file():
            assert probe not in f.read_bytes(), f"secret key material in {f}"
    # the federated model leaves through a silo: `fedsilo export`, then rebuild it
    out = fed.work / "export" / "model.pt"
    exp = subprocess.run([sys.executable, "-m", "fedsilo", "export", "--config",
                          str(fed.agent_cfgs["hospital-a"]), "--out", str(out)], capture_output=True, text=True,
                         timeout=120)
    assert exp.returncode == 0, exp.stderr
    import torch

    from fedsilo.models import ModelConfig, build_model

    saved = torch.load(out, weights_only=True)
    assert saved["round"] == 3 and saved["run_id"] == "demo-0"
    build_model(ModelConfig.from_mapping(saved["model_config"])).load_state_dict(saved["state_dict"])


def test_daemons_shut_down_cleanly_on_sigterm(federation_factory) -> None:
    """SIGTERM: both daemons exit 0 and leave a log file in their state dir."""
    fed = federation_factory(silos=1, rounds=100, deadline_s=60.0)
    coord = fed.start("coordinator")
    agent = fed.start("hospital-a")
    fed.wait_for(lambda s, r: len(r) >= 1 and r[0]["closed"], 120, "round 1 to close")
    # the study lead's view: `fedsilo status` with an admin certificate
    c = fed.work / "certs"
    cli = subprocess.run([sys.executable, "-m", "fedsilo", "status", "--coordinator", f"localhost:{fed.port}",
                          "--ca", str(c / "ca.pem"), "--cert", str(c / f"{ADMIN_NAME}.pem"),
                          "--key", str(c / f"{ADMIN_NAME}.key")], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    report = json.loads(cli.stdout)
    assert report["status"]["state"] == "running" and report["rounds"][0]["contributors"] == ["hospital-a"]
    # a silo certificate is not an admin one
    denied = subprocess.run([sys.executable, "-m", "fedsilo", "status", "--coordinator",
                             f"localhost:{fed.port}", "--ca", str(c / "ca.pem"), "--cert", str(c / "hospital-a.pem"),
                             "--key", str(c / "hospital-a.key")], capture_output=True, text=True, timeout=60)
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0, fed.log("hospital-a")
    coord.send_signal(signal.SIGTERM)
    assert coord.wait(timeout=30) == 0, fed.log("coordinator")
    assert "coordinator stopped" in (fed.work / "coordinator" / "coordinator.log").read_text()
    agent_log = (fed.work / "hospital-a" / "agent.log").read_text()
    assert "joined run" in agent_log and "stopped" in agent_log
    # the agent's progress survived: its checkpoint records the round it finished
    import torch

    state = torch.load(fed.work / "hospital-a" / "checkpoint.pt", weights_only=True)
    assert state["done_round"] >= 1


#: Record-level DP-SGD for the privacy e2e test: each round costs a fixed ε (2.51 after one round,
#: 3.25 after two, 3.79 after three at δ = 1e-5), so a silo with budget 3.5 must stop after two.
E2E_PRIVACY = {"record_level": True, "sample_rate": 0.25, "steps_per_round": 4, "max_grad_norm": 1.0,
               "noise_multiplier": 1.5, "delta": 1e-5}


def test_small_budget_silo_declines_and_a_killed_agent_counts_its_spend_once(federation_factory) -> None:
    """DP on: hospital-c (budget 3.5) declines round 3 and the run goes on with the others; hospital-a is
    SIGKILLed mid-run and restarted: its ledger stays intact and every round is accounted exactly once.
    The audit report from the coordinator's mirror verifies and shows every silo within its budget."""
    budgets = {"hospital-a": {"epsilon": 10.0, "delta": 1e-5}, "hospital-b": {"epsilon": 10.0, "delta": 1e-5},
               "hospital-c": {"epsilon": 3.5, "delta": 1e-5}}
    fed = federation_factory(silos=3, rounds=4, deadline_s=60.0, privacy=E2E_PRIVACY, budgets=budgets)
    fed.start("coordinator")
    for n in fed.names:
        fed.start(n)
    # SIGKILL hospital-a right after it has written (reserved) its round-2 ledger entry, i.e. while it
    # syncs and uploads: the restarted agent must resend exactly that release, not account a new one
    import sqlite3

    ledger_path = fed.work / "hospital-a" / "ledger.sqlite"

    def reserved_round_2() -> str | None:
        if not ledger_path.exists():
            return None
        try:
            con = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=1)
            try:
                row = con.execute("SELECT status FROM entries WHERE round = 2").fetchone()
            finally:
                con.close()
        except sqlite3.Error:
            return None
        return None if row is None else row[0]

    end = time.monotonic() + 240
    while (seen := reserved_round_2()) is None:
        assert time.monotonic() < end, fed.log("hospital-a")
        time.sleep(0.02)
    fed.kill("hospital-a")
    print(f"hospital-a killed with its round-2 entry {seen}")
    fed.start("hospital-a")
    status, rounds = fed.wait_for(lambda s, r: s["state"] == "finished", 300, "the run to finish")
    fed.wait_agents(120)
    silos = {s["name"]: s for s in status["silos"]}
    assert silos["hospital-c"]["retired_from_round"] == 3 and "budget" in silos["hospital-c"]["retired_reason"]
    assert [sorted(r["contributors"]) for r in rounds] == [fed.names, fed.names, fed.names[:2], fed.names[:2]]
    assert silos["hospital-a"]["rounds_contributed"] == 4
    # the agent's own ledger: one record-level entry per round, committed, cumulative ε recomputable
    con = sqlite3.connect(f"file:{fed.work / 'hospital-a' / 'ledger.sqlite'}?mode=ro", uri=True)
    rows = con.execute("SELECT round, status FROM entries ORDER BY seq").fetchall()
    con.close()
    assert [r for r, _ in rows] == [1, 2, 3, 4], rows
    assert all(st == "released" for _, st in rows), rows
    if seen == "pending":  # killed between reserving and committing: the saved release was resent
        assert "round 2: resending the update saved before the restart" in (fed.work / "hospital-a.out").read_text()
    out = fed.work / "audit"
    made = _cli("audit", "report", "--state", str(fed.work / "coordinator"), "--out", str(out))
    assert made.returncode == 0, made.stdout + made.stderr
    report = json.loads((out / "report.json").read_text())
    by_silo = {s["silo"]: s for s in report["silos"]}
    assert [len(by_silo[n]["entries"]) for n in fed.names] == [4, 4, 2]
    c = by_silo["hospital-c"]
    assert c["cumulative"]["record"]["single_upload"] <= 3.5
    assert c["within_budget"]["record"] is True and c["budget_left"]["record"] >= 0
    verified = _cli("audit", "verify", str(out / "report.json"), "--ca", str(fed.work / "certs" / "ca.pem"))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # one changed byte in a signed entry, and verification fails naming it
    text = (out / "report.json").read_text()
    bad = out / "tampered.json"
    bad.write_text(text.replace('"noise_multiplier": "1.5"', '"noise_multiplier": "1.6"', 1))
    assert bad.read_text() != text
    refused = _cli("audit", "verify", str(bad))
    assert refused.returncode != 0 and "seq" in (refused.stdout + refused.stderr)


def test_silo_level_distributed_noise_under_he_states_both_guarantees(federation_factory) -> None:
    """Silo-level DP with HE: each silo clips its whole update and adds only its share of the noise
    (σC/√K, K = min_silos = 2); every ledger entry states the guarantee against the aggregate (σ) and the
    weaker one against a single upload (σ/√2), and the coordinator's audit report verifies."""
    privacy = {"silo_level": True, "update_clip_norm": 0.05, "update_noise_multiplier": 2.0, "delta": 1e-5}
    budgets = {n: {"epsilon": 20.0, "delta": 1e-5} for n in silo_names(3)}
    fed = federation_factory(silos=3, rounds=2, deadline_s=60.0, privacy=privacy, budgets=budgets)
    fed.start("coordinator")
    for n in fed.names:
        fed.start(n)
    status, rounds = fed.wait_for(lambda s, r: s["state"] == "finished", 300, "the run to finish")
    fed.wait_agents(120)
    for r in rounds:
        assert sorted(r["contributors"]) == fed.names
        assert r["total_weight"] == 3.0  # silo-level DP: every silo weighs 1
    out = fed.work / "audit"
    made = _cli("audit", "report", "--state", str(fed.work / "coordinator"), "--out", str(out))
    assert made.returncode == 0, made.stdout + made.stderr
    report = json.loads((out / "report.json").read_text())
    for s in report["silos"]:
        assert [e["round"] for e in s["entries"]] == [1, 2]
        for e in s["entries"]:
            assert e["neighbouring"] == "silo" and e["guarantee_scope"] == "aggregate"
            assert float(e["noise_multiplier"]) == 2.0
            assert float(e["single_upload"]["noise_multiplier"]) == pytest.approx(2.0 / 2**0.5)
        cum = s["cumulative"]["silo"]
        assert 0 < cum["aggregate"] < cum["single_upload"] <= 20.0
    verified = _cli("audit", "verify", str(out / "report.json"))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # the silo's own state dir gives the same figures for that silo
    own = fed.work / "audit-a"
    assert _cli("audit", "report", "--state", str(fed.work / "hospital-a"), "--out", str(own)).returncode == 0
    mine = json.loads((own / "report.json").read_text())["silos"][0]
    assert mine["cumulative"] == {s["silo"]: s for s in report["silos"]}["hospital-a"]["cumulative"]


def test_demo_deer_with_he_and_dp(tmp_path: Path) -> None:
    """`fedsilo demo --strategy deer`: a base pretrained on another domain, LoRA adapters, HE, silo-level
    DP through the noise regulator with the noise split into shares. One DEeR round is two uploads (B,
    then A), each one ledger entry; the audit report verifies (every ε recomputed by dp-accounting)."""
    out = tmp_path / "deer"
    proc = subprocess.run([sys.executable, "-m", "fedsilo", "demo", "--strategy", "deer", "--rounds", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    b_round, a_round = results["rounds"]
    assert 0 < b_round["params_shared"] < a_round["params_shared"] < 52117 // 4  # B, then A: a few % of the model
    for r in results["rounds"]:
        assert sorted(r["contributors"]) == ["hospital-a", "hospital-b", "hospital-c"]
        assert 0.0 <= r["mean_dice"] <= 1.0
    report = json.loads((out / "audit" / "report.json").read_text())
    for s in report["silos"]:
        assert [(e["round"], e["upload_index"]) for e in s["entries"]] == [(1, 0), (1, 1)]
        assert all(e["neighbouring"] == "silo" and e["guarantee_scope"] == "aggregate" for e in s["entries"])
        assert s["cumulative"]["silo"]["single_upload"] <= 8.0 + 1e-9
    verify = _cli("audit", "verify", str(out / "audit" / "report.json"))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_demo_of_the_3d_task_with_he_and_dp(tmp_path: Path) -> None:
    """`fedsilo demo --task segmentation-3d`: three silos with scanner styles and voxel spacings of their
    own, HE and record-level DP-SGD on a 3-D UNet; Dice and HD95 (mm) per silo and round; the audit report
    verifies. An unknown Task is refused before anything starts."""
    results = _demo(tmp_path / "seg3d", "--task", "seg3d")
    assert len(results["rounds"]) == 2
    for r in results["rounds"]:
        assert sorted(r["contributors"]) == ["hospital-a", "hospital-b", "hospital-c"]
        assert 0.0 <= r["mean_dice"] <= 1.0
        assert all(e["hd95"] >= 0.0 for e in r["silos"].values())
    assert all(eps["record"] <= 8.0 + 1e-9 for eps in results["privacy"].values())
    verify = _cli("audit", "verify", str(tmp_path / "seg3d" / "audit" / "report.json"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    unknown = _cli("demo", "--task", "segmentation-4d", "--out", str(tmp_path / "x"))
    assert unknown.returncode == 2 and "--task:" in unknown.stderr and not (tmp_path / "x").exists()


def _encodings(mask: np.ndarray) -> list[bytes]:
    """Ways a coordinator could store a run of a boolean mask (or its complement): bits, bytes, floats."""
    out = []
    for m in (mask, ~mask):
        out += [np.packbits(m).tobytes(), m.astype(np.uint8).tobytes(), m.astype(np.float32).tobytes(),
                m.astype(np.float64).tobytes()]
    return out


def test_resfim_masks_never_reach_the_coordinator(federation_factory) -> None:
    """pFL-ResFIM with real processes, mTLS and BFV: style banks exchanged sealed, masks computed every round
    (ρ = 0.2), masked uploads summed as ciphertexts. Each silo's personalised model agrees with the others on
    the elements both share and keeps its own local ones; the unseen domain is evaluated with the consensus;
    and no file the coordinator stored (database, WAL, sums, aggregates) contains any silo's mask in any of
    the usual encodings. With record-level DP the style bank and every mask computation (noisy Fisher) are
    ledger entries beside DP-SGD's, all within ε ≤ 8; the audit report verifies and says how to find them."""
    import torch

    from fedsilo.silo_agent.demo import DEMO_BUDGET, DEMO_RESFIM_PRIVACY

    fed = federation_factory(silos=3, rounds=2, deadline_s=120.0, strategy="resfim",
                             resfim={"rho": 0.2, "recompute_every": 1, "max_examples": 16},
                             privacy=DEMO_RESFIM_PRIVACY, budgets={n: DEMO_BUDGET for n in silo_names(3)})
    fed.start("coordinator")
    for n in fed.names:
        fed.start(n)
    status, rounds = fed.wait_for(lambda s, r: s["state"] == "finished", 300, "the run to finish")
    fed.wait_agents(120)
    rounds = fed.admin.rounds()  # the last round's metrics arrive after the run finished
    for r in rounds:
        assert sorted(r["contributors"]) == fed.names
    # round 1 uploads two encrypted sets per value, the last round (the consensus) three
    assert 1.3 < rounds[1]["bytes_up"] / rounds[0]["bytes_up"] < 1.7
    assert rounds[0]["params_shared"] == rounds[1]["params_shared"] > 50_000
    last = {n: {k: v["value"] for k, v in m.items()} for n, m in rounds[-1]["metrics"].items()}
    for n in fed.names:
        assert 0.0 <= last[n]["dice"] <= 1.0 and 0.0 <= last[n]["unseen_dice"] <= 1.0
        assert 0.75 <= last[n]["shared_fraction"] <= 0.8  # ρ = 0.2 local per tensor, rounded up
    states = {n: torch.load(fed.work / n / "checkpoint.pt", weights_only=True) for n in fed.names}
    for n, st in states.items():
        assert st["masks_round"] == 2 and st["sensitive"] and st["consensus"]
    a, b = states["hospital-a"], states["hospital-b"]
    checked = differing = 0
    for k, ma in a["sensitive"].items():
        if k not in a["consensus"]:
            continue
        mb = b["sensitive"][k]
        both = ~ma & ~mb
        checked += int(both.sum())
        assert torch.allclose(a["model"][k][both], b["model"][k][both], atol=1e-5), k
        differing += int((a["model"][k][ma & ~mb] != b["model"][k][ma & ~mb]).sum())
    assert checked > 1000 and differing > 0
    stored = [p.read_bytes() for p in (fed.work / "coordinator").rglob("*") if p.is_file()]
    assert stored
    probes = 0
    for st in states.values():
        for k, m in st["sensitive"].items():
            run = m.numpy().astype(bool).ravel()[:256]  # 256 elements: far too many bits to match by chance
            if run.size < 256 or min(run.sum(), (~run).sum()) < 16:
                continue
            for enc in _encodings(run):
                probes += 1
                assert not any(enc in data for data in stored), f"a mask of {k} is in the coordinator's state"
    assert probes >= 8 * 3 * 5
    out = fed.work / "audit"
    made = _cli("audit", "report", "--state", str(fed.work / "coordinator"), "--out", str(out))
    assert made.returncode == 0, made.stdout + made.stderr
    report = json.loads((out / "report.json").read_text())
    assert [d["topic"] for d in report["disclosures"]][:2] == [
        "ResFIM masks (differentially private, in the ledger)",
        "ResFIM style banks (differentially private, in the ledger)"]
    for s in report["silos"]:
        got = [(e["round"], e["mechanism"], e["steps"], float(e["clip_norm"])) for e in s["entries"]]
        bank = (1, "gaussian", 1, pytest.approx(2**0.5 * 40.0))
        fisher = [(r, "gaussian", 2, 1.0) for r in (1, 2)]
        dpsgd = [(r, "subsampled_gaussian", 12, 1.0) for r in (1, 2)]
        assert got == [bank, dpsgd[0], fisher[0], dpsgd[1], fisher[1]]
        assert s["cumulative"]["record"]["single_upload"] <= 8.0
    verified = _cli("audit", "verify", str(out / "report.json"))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_simulated_run_equals_the_deployed_run(tmp_path: Path, federation_factory) -> None:
    """`fedsilo bench`'s simulation against real processes: the same configs (FedAvg, BFV aggregation, 3
    silos, 2 rounds, seed 0) run once as OS processes over mTLS gRPC and once in one process
    (``simulate``: the same servicers, agents and HE code, called in-process) give every silo the same
    global model, to float tolerance, and the same Dice.

    Local training is SGD here: the aggregates of two runs differ in the last bits (the order in which
    uploads arrive, the HE codec's rounding), and Adam turns such differences into steps of size lr on
    parameters whose gradient is zero but for rounding (conv biases before InstanceNorm), so two
    deployed runs under Adam differ by up to about 1e-3 as well."""
    import torch

    sgd = {"optimizer": "sgd", "lr": 0.01}
    small = [{"source": "builtin", "domain": i, "seed": 0, "n_train": 24, "n_val": 8, "n_test": 8} for i in range(3)]

    from fedsilo.coordinator.loading import load_federation_config
    from fedsilo.silo_agent.config import load_agent_config
    from fedsilo.silo_agent.simulation import simulate
    from fedsilo.silo_agent.state import AgentState

    fed = federation_factory(silos=3, rounds=2, deadline_s=120.0, data=small, training=sgd)
    fed.start("coordinator")
    for n in fed.names:
        fed.start(n)
    fed.wait_for(lambda s, r: s["state"] == "finished", 300, "the deployed run to finish")
    fed.wait_agents(120)  # every agent has fetched the last aggregate (bytes down) and reported its metrics
    real_rounds = fed.admin.rounds()
    real = {n: AgentState.load(fed.work / n) for n in fed.names}

    work = tmp_path / "simulated"
    work.mkdir()
    make_certs(work / "certs", fed.names)
    fed_cfg, agent_cfgs = write_configs(work, names=fed.names, rounds=2, strategy="fedavg", seed=0, port=1,
                                        insecure=False, round_deadline_s=120.0, data=small, training=sgd)
    assert 'optimizer = "sgd"' in fed_cfg.read_text()
    sim = simulate(load_federation_config(fed_cfg), [load_agent_config(p) for p in agent_cfgs])
    assert sorted(sim.states) == fed.names
    # plaintext aggregation of the same run: the same models (BFV's sums are exact up to its 2^-20 codec)
    plain_work = tmp_path / "plain"
    plain_work.mkdir()
    plain_cfg, plain_agents = write_configs(plain_work, names=fed.names, rounds=2, strategy="fedavg", seed=0, port=1,
                                            insecure=False, round_deadline_s=120.0, data=small, training=sgd,
                                            aggregation="plain", min_silos=3)
    make_certs(plain_work / "certs", fed.names)
    plain = simulate(load_federation_config(plain_cfg), [load_agent_config(p) for p in plain_agents])
    for n in fed.names:
        a, b = real[n], sim.states[n]
        assert a is not None and a.applied_round == b.applied_round == 2
        assert sorted(a.global_shared) == sorted(b.global_shared) and len(a.global_shared) > 10
        for k, v in a.global_shared.items():
            # BFV codec: 2^-20 resolution per silo's value; the sums differ only by encryption rounding
            torch.testing.assert_close(b.global_shared[k], v, rtol=0, atol=1e-5, msg=lambda m: f"{n} {k}: {m}")
            torch.testing.assert_close(plain.states[n].global_shared[k], v, rtol=0, atol=1e-5,
                                       msg=lambda m: f"plain {n} {k}: {m}")
    for real_round, sim_round in zip(real_rounds, sim.rounds, strict=True):
        sim_metrics = {silo: {k: v for k, v, _ in values} for silo, values in sim_round.metrics.items()}
        for silo, metrics in real_round["metrics"].items():
            assert sim_metrics[silo]["dice"] == pytest.approx(metrics["dice"]["value"], abs=1e-3)
            assert sim_metrics[silo]["val_dice"] == pytest.approx(metrics["val_dice"]["value"], abs=1e-3)
        # the same messages: ciphertext sizes differ by a few bytes (compressed random polynomials)
        assert sim_round.bytes_up == pytest.approx(real_round["bytes_up"], rel=0.01)
        assert sim_round.bytes_down == pytest.approx(real_round["bytes_down"], rel=0.01)
    for he_round, plain_round in zip(sim.rounds, plain.rounds, strict=True):
        # plaintext float32 is 4 bytes per parameter per silo up; BFV ciphertexts 7.6
        assert 3 * 4 * he_round.params_shared <= plain_round.bytes_up < he_round.bytes_up


def test_demo_of_cksp_on_the_sensor_task_with_he_and_dp(tmp_path: Path) -> None:
    """`fedsilo demo --task sensor --strategy cksp`: animal activity windows, one species per silo (horse,
    horse, sheep), species-indexed adapters averaged under HE, record-level DP-SGD; accuracy and macro-F1
    per silo and round; the audit report verifies."""
    results = _demo(tmp_path / "cksp", "--task", "sensor", "--strategy", "cksp")
    assert len(results["rounds"]) == 2
    for r in results["rounds"]:
        assert sorted(r["contributors"]) == ["hospital-a", "hospital-b", "hospital-c"]
        assert 0.0 <= r["mean_accuracy"] <= 1.0
        assert all(0.0 <= e["macro_f1"] <= 1.0 for e in r["silos"].values())
    assert all(eps["record"] <= 8.0 + 1e-9 for eps in results["privacy"].values())
    verify = _cli("audit", "verify", str(tmp_path / "cksp" / "audit" / "report.json"))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_demo_of_fedbm_on_the_classification_task_with_he_and_dp(tmp_path: Path) -> None:
    """`fedsilo demo --task classify --strategy fedbm`: label-skewed lesion images, the frozen MiniLM concept
    classifier (the real packaged encoder, offline), CGDE's generator trained on every silo from round 2's
    global model, HE and record-level DP-SGD; the audit report says the generator costs no ε and verifies."""
    out = tmp_path / "fedbm"
    results = _demo(out, "--task", "classify", "--strategy", "fedbm")
    assert len(results["rounds"]) == 2
    for r in results["rounds"]:
        assert sorted(r["contributors"]) == ["hospital-a", "hospital-b", "hospital-c"]
        assert all(0.0 <= e["accuracy"] <= 1.0 and 0.0 <= e["macro_f1"] <= 1.0 for e in r["silos"].values())
    assert all(eps["record"] <= 8.0 + 1e-9 for eps in results["privacy"].values())
    for silo in ("hospital-a", "hospital-b", "hospital-c"):
        log = (out / "logs" / f"{silo}.log").read_text()
        assert "round 2: FedBM: CGDE generator trained on the global model" in log
        assert "round 1: FedBM: CGDE" not in log
    report = (out / "audit" / "report.json").read_text()
    assert "FedBM generator (CGDE)" in report and "no extra epsilon" in report
    verify = _cli("audit", "verify", str(out / "audit" / "report.json"))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_demo_of_the_glaucoma_task_with_a_fundus_only_clinic_he_and_dp(tmp_path: Path) -> None:
    """`fedsilo demo --task glaucoma`: three eye clinics, the third with a fundus camera only; IMO under FedAvg,
    HE and record-level DP-SGD. The fundus-only clinic trains and uploads none of the OCT tensors (their
    count slot says so inside the ciphertexts), every clinic scores segmentation and grading, the audit verifies."""
    out = tmp_path / "glaucoma"
    results = _demo(out, "--task", "glaucoma")
    assert len(results["rounds"]) == 2
    for r in results["rounds"]:
        assert sorted(r["contributors"]) == ["hospital-a", "hospital-b", "hospital-c"]
        for scores in r["silos"].values():
            assert 0.0 <= scores["cup_dice"] <= 1.0 and 0.0 <= scores["disc_dice"] <= 1.0
            assert 0.0 <= scores["grade_accuracy"] <= 1.0 and -1.0 <= scores["grade_kappa"] <= 1.0
    logs = {s: (out / "logs" / f"{s}.log").read_text() for s in ("hospital-a", "hospital-b", "hospital-c")}
    lacking = "this silo's data has no oct: it neither trains nor uploads those tensors"
    assert [s for s, text in logs.items() if lacking in text] == ["hospital-c"]
    assert all(eps["record"] <= 8.0 + 1e-9 for eps in results["privacy"].values())
    verify = _cli("audit", "verify", str(out / "audit" / "report.json"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
