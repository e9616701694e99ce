"""The coordinator's Prometheus metrics: their specs, a collector that reads the run's state at scrape time, the endpoint.

Nothing here changes a round: run totals come from the database (``Coordinator.counters``,
``Coordinator.status``) and ε from the ledger mirror's ``LedgerMirror.cumulative`` when Prometheus
scrapes; RPC latencies and refusals come from a server interceptor (``coordinator.rpc_metrics``).
Every label value is drawn from a closed set: enrolled silo names, the ledger's relations, run
states, RPCs of the service definitions, status codes and the exception table (``fedsilo.core.metricspec``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from fedsilo.coordinator.records import RunState
from fedsilo.coordinator.rpc_metrics import RPC_METRICS, RpcMetrics
from fedsilo.coordinator.run import Coordinator
from fedsilo.core.metrics_endpoint import MetricsConfig, MetricsServer
from fedsilo.core.metricspec import MetricKind, MetricSpec, family, histogram_buckets
from fedsilo.privacy.ledger import GuaranteeScope, Neighbouring

__all__ = ["CONNECTED_WITHIN_S", "COORDINATOR_METRICS", "CoordinatorCollector", "CoordinatorMetrics", "RUN_METRICS"]

log = logging.getLogger("fedsilo.coordinator")

#: A joined silo still training counts as connected while the coordinator heard from it this recently
#: (agents heartbeat every few seconds and long-poll for tasks).
CONNECTED_WITHIN_S = 60.0

#: Bounds of the round-duration histogram, in seconds (rounds last from seconds to hours).
ROUND_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)

C, G, H = MetricKind.COUNTER, MetricKind.GAUGE, MetricKind.HISTOGRAM

#: The metrics read from the run's state at each scrape, in the order of the doc page.
RUN_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(name="fedsilo_coordinator_planned_rounds", kind=G, help="Rounds the run plans (`run.rounds`).",
               panel="fedsilo_coordinator_rounds_closed_total / fedsilo_coordinator_planned_rounds"),
    MetricSpec(name="fedsilo_coordinator_rounds_opened_total", kind=C, help="Rounds opened so far.",
               panel="fedsilo_coordinator_rounds_opened_total"),
    MetricSpec(name="fedsilo_coordinator_rounds_closed_total", kind=C,
               help="Rounds closed with an aggregate (failed ones included).",
               panel="increase(fedsilo_coordinator_rounds_closed_total[1h])"),
    MetricSpec(name="fedsilo_coordinator_rounds_failed_total", kind=C,
               help="Closed rounds marked failed by the silos' reports (nobody applies their aggregate).",
               panel="fedsilo_coordinator_rounds_failed_total"),
    MetricSpec(name="fedsilo_coordinator_open_round", kind=G, help="The round accepting uploads; 0 when none.",
               panel="fedsilo_coordinator_open_round"),
    MetricSpec(name="fedsilo_coordinator_run_state", kind=G, labels=("state",),
               help="1 for the run's current state, 0 for the others.",
               panel="fedsilo_coordinator_run_state == 1"),
    MetricSpec(name="fedsilo_coordinator_round_duration_seconds", kind=H, buckets=ROUND_BUCKETS,
               help="How long each closed round was open, from opening to its aggregate.",
               panel="histogram_quantile(0.9, sum by (le) (rate(fedsilo_coordinator_round_duration_seconds_bucket[6h])))"),
    MetricSpec(name="fedsilo_coordinator_uploads_total", kind=C, labels=("silo",),
               help="Uploads accepted from each enrolled silo, over all rounds.",
               panel="sum by (silo) (increase(fedsilo_coordinator_uploads_total[1h]))"),
    MetricSpec(name="fedsilo_coordinator_received_bytes_total", kind=C,
               help="Wire bytes received from silos (uploads, metrics reports): the Admin API's `bytes_up`, summed "
                    "over rounds.",
               panel="rate(fedsilo_coordinator_received_bytes_total[5m])"),
    MetricSpec(name="fedsilo_coordinator_sent_bytes_total", kind=C,
               help="Wire bytes sent to silos (tasks, aggregates): the Admin API's `bytes_down`, summed over rounds.",
               panel="rate(fedsilo_coordinator_sent_bytes_total[5m])"),
    MetricSpec(name="fedsilo_coordinator_enrolled_silos", kind=G, help="Silos the run enrols (`silos.enrolled`).",
               panel="fedsilo_coordinator_enrolled_silos"),
    MetricSpec(name="fedsilo_coordinator_joined_silos", kind=G, help="Enrolled silos that have joined the run.",
               panel="fedsilo_coordinator_joined_silos"),
    MetricSpec(name="fedsilo_coordinator_connected_silos", kind=G,
               help=f"Joined silos still training that the coordinator heard from in the last "
                    f"{CONNECTED_WITHIN_S:g} s.",
               panel="fedsilo_coordinator_connected_silos < fedsilo_coordinator_joined_silos"),
    MetricSpec(name="fedsilo_coordinator_silo_last_seen_timestamp_seconds", kind=G, labels=("silo",),
               help="When each joined silo was last heard from (Unix time).",
               panel="time() - fedsilo_coordinator_silo_last_seen_timestamp_seconds"),
    MetricSpec(name="fedsilo_coordinator_privacy_epsilon", kind=G, labels=("silo", "relation"),
               help="Each silo's cumulative ε per neighbouring relation in the coordinator's verified ledger mirror, "
                    "against anyone who sees one upload, at the silo's δ, by the accountant the silo enforces its budget on "
                    "(RDP or PLD; runs with DP only).",
               panel="max by (silo, relation) (fedsilo_coordinator_privacy_epsilon)"),
    MetricSpec(name="fedsilo_coordinator_privacy_budget_epsilon", kind=G, labels=("silo",),
               help="The ε budget agreed with each silo (`privacy.budgets`; silos without one are absent).",
               panel="max by (silo) (fedsilo_coordinator_privacy_epsilon) / on (silo) "
                     "fedsilo_coordinator_privacy_budget_epsilon"),
)

#: Every coordinator metric, as docs/metrics.md lists them.
COORDINATOR_METRICS: tuple[MetricSpec, ...] = RUN_METRICS + RPC_METRICS

_SPECS = {s.name: s for s in RUN_METRICS}


class CoordinatorCollector(Collector):
    """Reads the run's totals, silos and privacy spend from the coordinator when Prometheus scrapes.

    Args:
        coordinator: the run (its database and ledger mirror are read, never written, but for the
            batched traffic counters that reading flushes first).
        clock: seconds since the epoch (for which silos count as connected).
    """

    def __init__(self, coordinator: Coordinator, *, clock: Callable[[], float] = time.time) -> None:
        self._c = coordinator
        self._clock = clock

    def describe(self) -> list[Any]:
        """The metric families, without values (what the registry checks names against)."""
        return [family(s) for s in RUN_METRICS]

    def collect(self) -> Iterator[Any]:
        """One family per spec of :data:`RUN_METRICS`, filled from the run's current state."""
        cfg = self._c.cfg
        totals = self._c.counters()
        status = self._c.status()
        out = {s.name: family(s) for s in RUN_METRICS}

        def put(name: str, value: float, labels: tuple[str, ...] = ()) -> None:
            out[name].add_metric(list(labels), float(value))

        put("fedsilo_coordinator_planned_rounds", cfg.rounds)
        put("fedsilo_coordinator_rounds_opened_total", totals.rounds_opened)
        put("fedsilo_coordinator_rounds_closed_total", totals.rounds_closed)
        put("fedsilo_coordinator_rounds_failed_total", totals.rounds_failed)
        put("fedsilo_coordinator_open_round", status.open_round)
        for state in RunState:
            put("fedsilo_coordinator_run_state", 1.0 if state is status.state else 0.0, (state.value,))
        seconds = totals.round_seconds
        spec = _SPECS["fedsilo_coordinator_round_duration_seconds"]
        out[spec.name].add_metric([], buckets=histogram_buckets(spec, seconds), sum_value=float(sum(seconds)))
        enrolled = cfg.silos  # the only silo label values: names from the config, never from a caller
        for silo in enrolled:
            put("fedsilo_coordinator_uploads_total", totals.uploads.get(silo, 0), (silo,))
        put("fedsilo_coordinator_received_bytes_total", totals.bytes_up)
        put("fedsilo_coordinator_sent_bytes_total", totals.bytes_down)
        now_ms = self._clock() * 1000.0
        joined = [s for s in status.silos if s.joined and s.name in enrolled]
        put("fedsilo_coordinator_enrolled_silos", len(enrolled))
        put("fedsilo_coordinator_joined_silos", len(joined))
        put("fedsilo_coordinator_connected_silos", sum(
            1 for s in joined if not s.retired_from_round and now_ms - s.last_seen_ms <= CONNECTED_WITHIN_S * 1000))
        for s in joined:
            put("fedsilo_coordinator_silo_last_seen_timestamp_seconds", s.last_seen_ms / 1000.0, (s.name,))
        mirror = self._c.ledger_mirror
        if mirror is not None:
            for silo in enrolled:
                for relation in Neighbouring:
                    eps = mirror.cumulative(silo, relation, scope=GuaranteeScope.SINGLE_UPLOAD)
                    put("fedsilo_coordinator_privacy_epsilon", eps, (silo, relation.value))
        for silo, budget in cfg.budgets.items():
            if silo in enrolled:
                put("fedsilo_coordinator_privacy_budget_epsilon", budget, (silo,))
        yield from out.values()


class CoordinatorMetrics:
    """The coordinator's own registry (never the global one): the run collector and the RPC interceptor,
    served at ``[metrics] listen`` between :meth:`start` and :meth:`stop`.

    Args:
        coordinator: the run.
        config: where to serve.
    """

    def __init__(self, coordinator: Coordinator, config: MetricsConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.registry.register(CoordinatorCollector(coordinator))
        #: The server interceptor that times calls and counts refusals (first in the server's list).
        self.interceptor = RpcMetrics(self.registry)
        self._server: MetricsServer | None = None

    def start(self) -> None:
        """Serves the registry.

        Raises:
            OSError: ``metrics.listen`` cannot be bound.
        """
        self._server = MetricsServer.start(self.config, self.registry, log=log, what="coordinator")

    @property
    def port(self) -> int:
        """The bound port (0 before :meth:`start`)."""
        return self._server.port if self._server is not None else 0

    def stop(self) -> None:
        """Stops serving (before the run's database closes)."""
        if self._server is not None:
            self._server.stop()
            self._server = None
