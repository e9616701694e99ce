"""Admin API data as ``CoordinatorClient.status/rounds/privacy`` return it, for the dashboard's unit tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: The coordinator's clock in these tests.
NOW_MS = 1_700_000_000_000


def silo_data(name: str, *, joined: bool = True, last_seen_ms: int = NOW_MS - 1000, retired_from_round: int = 0,
              retired_reason: str = "") -> dict[str, Any]:
    return {"name": name, "joined": joined, "last_seen_unix_ms": last_seen_ms, "rounds_contributed": 1,
            "num_train_examples": 48 if joined else 0, "retired_from_round": retired_from_round,
            "retired_reason": retired_reason}


def status_data(*, state: str = "running", message: str = "round 2 open", run_id: str = "study-1",
                silos: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    return {"run_id": run_id, "state": state, "open_round": 2, "last_closed_round": 1, "total_rounds": 5,
            "message": message,
            "silos": list(silos) if silos is not None else [silo_data("hospital-a"), silo_data("hospital-b")]}


def round_data(rnd: int, *, closed: bool = False, failure: str = "", uploads: Sequence[str] = (),
               metrics: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    opened = NOW_MS - 60_000 + rnd * 10_000
    if metrics is None:
        metrics = {"hospital-a": {"dice": 0.5}, "hospital-b": {"dice": 0.6}} if closed else {}
    return {
        "round": rnd, "closed": closed, "contributors": list(uploads), "params_shared": 100, "bytes_up": 2048,
        "bytes_down": 4096, "seconds": 4.0 if closed else 0.0, "total_weight": 96.0, "failure": failure,
        "metrics": {s: {n: {"value": v, "num_examples": 10} for n, v in ms.items()} for s, ms in metrics.items()},
        "opened_at_unix_ms": opened, "deadline_unix_ms": opened + 60_000,
        "closed_at_unix_ms": opened + 4000 if closed else 0, "quorum": 2, "quorum_reached": closed,
        "uploads": [{"silo": s, "accepted_at_unix_ms": opened + 1000 * (i + 1), "payload_bytes": 400}
                    for i, s in enumerate(uploads)],
    }


def privacy_data(spend: Mapping[str, tuple[float, float | None]], *, enabled: bool = True) -> dict[str, Any]:
    """Silo -> (record-level ε, budget ε or None)."""
    return {"enabled": enabled, "plan_delta": 1e-5, "silos": [
        {"silo": silo, "last_seq": 1, "budget_error": "",
         "budget": None if budget is None else {"epsilon": budget, "delta": 1e-5},
         "relations": {"record": {"epsilon": eps, "epsilon_rdp": eps, "epsilon_pld": eps * 0.9, "accountant": "rdp",
                                  "delta": 1e-5, "entries": 1, "last_round": 1}}}
        for silo, (eps, budget) in spend.items()]}
