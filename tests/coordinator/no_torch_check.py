"""Run by tests: starts the coordinator with torch made unimportable and checks no ML library loads."""

import builtins
import sys

BLOCKED = ("torch", "monai", "opacus", "peft", "tenseal")
real_import = builtins.__import__


def guarded(name, *args, **kwargs):
    if name.split(".")[0] in BLOCKED:
        raise ImportError(f"{name} imported by the coordinator")
    return real_import(name, *args, **kwargs)


builtins.__import__ = guarded

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from fedsilo.coordinator.config import AggregationMode, FederationConfig  # noqa: E402
from fedsilo.coordinator.server import CoordinatorServer  # noqa: E402

cfg = FederationConfig(run_id="no-torch", silos=("hospital-a",), rounds=1, min_silos=1, listen="127.0.0.1:0",
                       aggregation=AggregationMode.PLAIN,
                       state_dir=sys.argv[1], insecure=True)
server = CoordinatorServer(cfg)
server.start()
with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="fedsilo.v1.Federation"),
                                                timeout=10)
server.stop(0)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert resp.status == health_pb2.HealthCheckResponse.SERVING, resp
assert not loaded, loaded
print("coordinator served without", ", ".join(BLOCKED))
