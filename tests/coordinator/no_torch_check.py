"""Run by tests: starts an HE coordinator with DP planned (σ calibrated, budgets checked) with torch
made unimportable, scrapes its metrics, writes and verifies an audit report; checks no ML library loads."""

import builtins
import sys
import urllib.request
from pathlib import Path

BLOCKED = ("torch", "monai", "opacus", "peft", "torchvision")
real_import = builtins.__import__


def guarded(name, *args, **kwargs):
    if name.split(".")[0] in BLOCKED:
        raise ImportError(f"{name} imported by the coordinator")
    return real_import(name, *args, **kwargs)


builtins.__import__ = guarded

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

import fedsilo.silo_agent.methods  # noqa: E402,F401 - as the CLI: the built-in methods, torch-free
from fedsilo.coordinator.config import AggregationMode, FederationConfig, TlsFiles  # noqa: E402
from fedsilo.coordinator.loading import parse_privacy
from fedsilo.coordinator.server import CoordinatorServer  # noqa: E402
from fedsilo.core.metrics_endpoint import MetricsConfig  # noqa: E402
from fedsilo.privacy.pki import Role, init_ca, issue_certificate  # noqa: E402

state = Path(sys.argv[1])
certs = state.parent / "certs"
init_ca(certs)
issue_certificate(certs, certs, role=Role.COORDINATOR, name="coordinator", hosts=["localhost"])
issue_certificate(certs, certs, role=Role.ADMIN, name="ops")
plan, budgets, _ = parse_privacy({"record_level": True, "sample_rate": 0.1, "steps_per_round": 10, "max_grad_norm": 1.0,
                               "target_epsilon": 4.0, "delta": 1e-5, "budgets": {"hospital-a": 5.0}},
                              rounds=1, min_silos=1, aggregation=AggregationMode.HE)
cfg = FederationConfig(run_id="no-torch", silos=("hospital-a",), rounds=1, min_silos=1, listen="127.0.0.1:0",
                       aggregation=AggregationMode.HE, state_dir=state, privacy=plan, budgets=budgets,
                       metrics=MetricsConfig(listen="127.0.0.1:0"),
                       tls=TlsFiles(ca=certs / "ca.pem", cert=certs / "coordinator.pem", key=certs / "coordinator.key"))
server = CoordinatorServer(cfg)
server.start()
creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(), (certs / "ops.key").read_bytes(),
                                     (certs / "ops.pem").read_bytes())
with grpc.secure_channel(f"localhost:{server.port}", creds) as ch:
    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="fedsilo.v1.Federation"),
                                                timeout=10)
with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics.port}/metrics", timeout=10) as scraped:
    metrics_text = scraped.read().decode()
server.stop(0)
from fedsilo.privacy.audit import build_report, verify_report, write_report  # noqa: E402

report_json, _ = write_report(build_report(state), state.parent / "audit")
verify_report(report_json)

# A silo's ledger with PLD governing, its σ calibrated under PLD: both figures written and recomputed, no torch.
from fedsilo.privacy.accounting import LEDGER_RDP_ORDERS, BudgetAccountant, DpAccountingVerifier  # noqa: E402
from fedsilo.privacy.budget import CA_FILE, LEDGER_FILE  # noqa: E402
from fedsilo.privacy.ledger import Ledger  # noqa: E402
from fedsilo.privacy.plan import ledger_fields  # noqa: E402

two_rounds = {"record_level": True, "sample_rate": 0.1, "steps_per_round": 10, "max_grad_norm": 1.0,
              "target_epsilon": 4.0, "delta": 1e-5}
pld_plan, _, governing = parse_privacy({**two_rounds, "accountant": "pld"}, rounds=2, min_silos=1,
                                       aggregation=AggregationMode.HE)
rdp_plan, _, _ = parse_privacy(two_rounds, rounds=2, min_silos=1, aggregation=AggregationMode.HE)
assert governing is BudgetAccountant.PLD and pld_plan.noise_multiplier < rdp_plan.noise_multiplier
silo = issue_certificate(certs, certs, role=Role.SILO, name="hospital-a")
agent = state.parent / "agent"
agent.mkdir()
(agent / CA_FILE).write_bytes((certs / "ca.pem").read_bytes())
with Ledger.open(agent / LEDGER_FILE, silo="hospital-a", certificate_pem=silo.cert.read_bytes(),
                 private_key_pem=silo.key.read_bytes()) as book:
    for rnd in (1, 2):
        book.append(**ledger_fields(book.entries(), pld_plan.round_releases()[0], delta=1e-5, run_id="no-torch",
                                    round=rnd, accountant=DpAccountingVerifier(orders=LEDGER_RDP_ORDERS),
                                    governing=BudgetAccountant.PLD))
    assert 3.99 <= book.cumulative(pld_plan.round_releases()[0].neighbouring) <= 4.0  # the PLD figure governs
ledger_json, _ = write_report(build_report(agent), state.parent / "agent-audit")
checked = verify_report(ledger_json)
assert checked.pld_figures == 4 and checked.prv_cross_check is None, checked
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert resp.status == health_pb2.HealthCheckResponse.SERVING, resp
assert not loaded, loaded
assert 'fedsilo_coordinator_privacy_epsilon{relation="record",silo="hospital-a"} 0.0' in metrics_text, metrics_text
# the HE context a coordinator can build from the run's parameters holds no key
from fedsilo.privacy.he import PublicContext  # noqa: E402

assert PublicContext(cfg.he_params()).has_secret_key is False
print("HE coordinator with a DP plan served and audited without", ", ".join(BLOCKED))
