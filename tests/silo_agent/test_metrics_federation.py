"""Both Prometheus endpoints after a short real federation: a coordinator serving gRPC with mutual TLS and two
agents dialling it over loopback, each endpoint scraped over HTTP and checked against the Admin API and the ledgers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fedsilo.coordinator.loading import load_federation_config
from fedsilo.coordinator.metrics import COORDINATOR_METRICS
from fedsilo.coordinator.server import CoordinatorServer
from fedsilo.privacy.budget import LEDGER_FILE
from fedsilo.privacy.ledger import GuaranteeScope, Ledger, Neighbouring
from fedsilo.silo_agent.client import CoordinatorClient, Credentials
from fedsilo.silo_agent.config import load_agent_config
from fedsilo.silo_agent.daemon import EXIT_OK, Agent
from fedsilo.silo_agent.demo import ADMIN_NAME, DEMO_BUDGET, DEMO_PRIVACY, free_port, make_certs, silo_names, write_configs
from fedsilo.silo_agent.metrics import AGENT_METRICS, AgentMetrics, serve

ROUNDS = 2
SMALL = {"n_train": 16, "n_val": 4, "n_test": 4, "image_size": 32}
METRICS_TABLE = '\n[metrics]\nlisten = "127.0.0.1:0"\n'


def test_both_endpoints_after_a_federation_match_the_admin_api_and_the_ledgers(tmp_path: Path, scrape) -> None:
    names = silo_names(2)
    certs = tmp_path / "certs"
    make_certs(certs, names)
    plan = {**DEMO_PRIVACY, "sample_rate": 0.5, "steps_per_round": 2}
    fed_path, agent_paths = write_configs(
        tmp_path, names=names, rounds=ROUNDS, strategy="fedavg", seed=0, port=free_port(), insecure=False,
        aggregation="he", privacy=plan, min_silos=2, budgets={n: DEMO_BUDGET for n in names},
        data=[{"source": "builtin", "domain": i, "seed": 0, **SMALL} for i in range(2)])
    fed_path.write_text(fed_path.read_text() + "\n[privacy.budgets]\nhospital-a = 9.5\n")
    for path in (fed_path, *agent_paths):  # off by default; port 0: any free port
        path.write_text(path.read_text() + METRICS_TABLE)
    server = CoordinatorServer(load_federation_config(fed_path))
    server.start()
    agents = {n: load_agent_config(p) for n, p in zip(names, agent_paths)}
    recorders = {n: AgentMetrics() for n in names}
    endpoints = {n: serve(recorders[n], agents[n].metrics) for n in names}
    codes: dict[str, int | BaseException] = {}

    def run(name: str) -> None:
        try:
            codes[name] = Agent(agents[name], metrics=recorders[name]).run()
        except BaseException as exc:  # reported below
            codes[name] = exc

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in names]
    admin = CoordinatorClient(f"localhost:{server.port}", Credentials(
        ca=certs / "ca.pem", cert=certs / f"{ADMIN_NAME}.pem", key=certs / f"{ADMIN_NAME}.key"), quiet=True)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert codes == {n: EXIT_OK for n in names}, codes
        status, rounds = admin.status(), admin.rounds()
        coord = scrape(server.metrics.port)
        per_agent = {n: scrape(endpoints[n].port) for n in names}
        Path("/tmp/wt3_scrape.txt").write_text(coord.text + per_agent[names[0]].text)
    finally:
        admin.close()
        for e in endpoints.values():
            e.stop()
        server.stop(0)

    # each endpoint exposes exactly the metrics docs/metrics.md lists (a counter's family drops ``_total``)
    assert coord.families == {s.name.removesuffix("_total") for s in COORDINATOR_METRICS}
    for a in per_agent.values():
        assert a.families == {s.name.removesuffix("_total") for s in AGENT_METRICS}

    # the run, as the Admin API tells it
    assert status["state"] == "finished" and len(rounds) == ROUNDS and all(r["closed"] for r in rounds)
    assert coord.value("fedsilo_coordinator_planned_rounds") == ROUNDS
    assert coord.value("fedsilo_coordinator_rounds_opened_total") == ROUNDS
    assert coord.value("fedsilo_coordinator_rounds_closed_total") == ROUNDS
    assert coord.value("fedsilo_coordinator_rounds_failed_total") == 0
    assert coord.value("fedsilo_coordinator_open_round") == 0
    assert coord.series("fedsilo_coordinator_run_state") == {
        (("state", s),): float(s == "finished") for s in ("waiting", "running", "finished", "failed")}
    for n in names:
        assert coord.value("fedsilo_coordinator_uploads_total", silo=n) == ROUNDS
    up, down = sum(r["bytes_up"] for r in rounds), sum(r["bytes_down"] for r in rounds)
    assert up > 0 and down > 0
    assert coord.value("fedsilo_coordinator_received_bytes_total") == up
    assert coord.value("fedsilo_coordinator_sent_bytes_total") == down
    assert coord.value("fedsilo_coordinator_enrolled_silos") == 2
    assert coord.value("fedsilo_coordinator_joined_silos") == 2
    assert coord.value("fedsilo_coordinator_connected_silos") == 2
    for s in status["silos"]:
        assert coord.value("fedsilo_coordinator_silo_last_seen_timestamp_seconds", silo=s["name"]) == pytest.approx(
            s["last_seen_unix_ms"] / 1000.0)
    # histograms: one round-duration observation per closed round, one OK upload call per upload
    assert coord.value("fedsilo_coordinator_round_duration_seconds_count") == ROUNDS
    assert coord.value("fedsilo_coordinator_round_duration_seconds_sum") == pytest.approx(
        sum(r["seconds"] for r in rounds), abs=1e-6)
    assert coord.value("fedsilo_coordinator_round_duration_seconds_bucket", le="+Inf") == ROUNDS
    assert coord.value("fedsilo_coordinator_rpc_duration_seconds_count", method="Federation/SubmitUpdate",
                       code="OK") == 2 * ROUNDS
    assert coord.value("fedsilo_coordinator_rpc_duration_seconds_count", method="Federation/Join", code="OK") == 2
    assert coord.value("fedsilo_coordinator_rpc_duration_seconds_count", method="Admin/GetStatus", code="OK") == 1
    joins = coord.series("fedsilo_coordinator_rpc_duration_seconds_bucket")
    inf = {dict(k)["method"]: v for k, v in joins.items() if dict(k)["le"] == "+Inf" and dict(k)["code"] == "OK"}
    for method, n in inf.items():  # every call's +Inf bucket is its count
        assert n == coord.value("fedsilo_coordinator_rpc_duration_seconds_count", method=method, code="OK")
    assert not coord.series("fedsilo_coordinator_refusals_total"), "an honest run refuses nothing"

    # ε: the coordinator's mirror and each agent's recorder both equal the silo's own ledger
    for n in names:
        ledger = Ledger.open(tmp_path / n / LEDGER_FILE, silo=n, certificate_pem=(certs / f"{n}.pem").read_bytes(),
                             private_key_pem=(certs / f"{n}.key").read_bytes())
        try:
            own = {r.value: ledger.cumulative(r, scope=GuaranteeScope.SINGLE_UPLOAD) for r in Neighbouring}
        finally:
            ledger.close()
        assert own["record"] > 0 and own["silo"] == 0
        agent = per_agent[n]
        for relation, eps in own.items():
            assert coord.value("fedsilo_coordinator_privacy_epsilon", silo=n, relation=relation) == eps
            assert agent.value("fedsilo_agent_privacy_epsilon", relation=relation) == eps
        assert agent.value("fedsilo_agent_privacy_budget_epsilon") == DEMO_BUDGET["epsilon"]
        assert agent.value("fedsilo_agent_last_round") == ROUNDS
        assert agent.value("fedsilo_agent_last_applied_round") == ROUNDS
        assert agent.value("fedsilo_agent_uploads_total") == ROUNDS
        assert agent.value("fedsilo_agent_training_duration_seconds_count") == ROUNDS
        assert agent.value("fedsilo_agent_training_duration_seconds_sum") > 0
    assert coord.series("fedsilo_coordinator_privacy_budget_epsilon") == {(("silo", "hospital-a"),): 9.5}
    payload = sum(a.value("fedsilo_agent_upload_payload_bytes_total") for a in per_agent.values())
    assert 0 < payload < up  # uploads carry the payload plus framing; bytes_up also counts metrics reports
