"""The silo agent's Prometheus metrics: their specs and the recorder the daemon reports its rounds to.

Each ``AgentMetrics`` keeps its own registry (never the global one), so that the several agents of an
in-process federation never share a series. ``fedsilo agent`` serves it at ``[metrics] listen``
(:func:`serve`); the daemon records into it as rounds happen. The only label values are the ledger's
neighbouring relations, so the label space is fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from fedsilo.core.metrics_endpoint import MetricsConfig, MetricsServer
from fedsilo.core.metricspec import MetricKind, MetricSpec, instrument
from fedsilo.privacy.ledger import Neighbouring

__all__ = ["AGENT_METRICS", "AgentMetrics", "TRAINING_BUCKETS", "serve"]

log = logging.getLogger("fedsilo.agent")

#: Bounds of the local-training histogram, in seconds (a round's training: seconds on a GPU to hours on a CPU).
TRAINING_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)

C, G, H = MetricKind.COUNTER, MetricKind.GAUGE, MetricKind.HISTOGRAM

#: Every agent metric, as docs/metrics.md lists them.
AGENT_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(name="fedsilo_agent_training_duration_seconds", kind=H, buckets=TRAINING_BUCKETS,
               help="Local training time of each round this agent trained (DP-SGD included, upload building not).",
               panel="rate(fedsilo_agent_training_duration_seconds_sum[1h]) / "
                     "rate(fedsilo_agent_training_duration_seconds_count[1h])"),
    MetricSpec(name="fedsilo_agent_last_round", kind=G,
               help="The last round this agent completed (trained and uploaded, or found its upload refused).",
               panel="fedsilo_agent_last_round"),
    MetricSpec(name="fedsilo_agent_last_applied_round", kind=G,
               help="The last round whose aggregate this agent applied (or skipped as failed).",
               panel="fedsilo_agent_last_round - fedsilo_agent_last_applied_round"),
    MetricSpec(name="fedsilo_agent_uploads_total", kind=C, help="Uploads the coordinator accepted from this agent.",
               panel="increase(fedsilo_agent_uploads_total[1h])"),
    MetricSpec(name="fedsilo_agent_upload_payload_bytes_total", kind=C,
               help="Payload bytes of this agent's accepted uploads (ciphertexts or raw tensors, before gRPC framing).",
               panel="rate(fedsilo_agent_upload_payload_bytes_total[5m])"),
    MetricSpec(name="fedsilo_agent_privacy_epsilon", kind=G, labels=("relation",),
               help="This silo's cumulative ε per neighbouring relation in its own ledger, pending reservations "
                    "included, against anyone who sees one upload, by the accountant its budget is enforced on "
                    "(silo.toml `[privacy] accountant`; runs with DP only).",
               panel="max by (relation) (fedsilo_agent_privacy_epsilon)"),
    MetricSpec(name="fedsilo_agent_privacy_budget_epsilon", kind=G,
               help="This silo's ε budget (silo.toml `[privacy] epsilon`; runs with DP only).",
               panel="max(fedsilo_agent_privacy_epsilon) / fedsilo_agent_privacy_budget_epsilon"),
)


class AgentMetrics:
    """The agent's own registry and the instruments the daemon records into."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        made = {s.name: instrument(s, self.registry) for s in AGENT_METRICS}
        self._training = made["fedsilo_agent_training_duration_seconds"]
        self._last_round = made["fedsilo_agent_last_round"]
        self._last_applied = made["fedsilo_agent_last_applied_round"]
        self._uploads = made["fedsilo_agent_uploads_total"]
        self._payload = made["fedsilo_agent_upload_payload_bytes_total"]
        self._epsilon = made["fedsilo_agent_privacy_epsilon"]
        self._budget = made["fedsilo_agent_privacy_budget_epsilon"]

    def trained(self, seconds: float) -> None:
        """One round's local training took ``seconds``."""
        self._training.observe(seconds)

    def uploaded(self, payload_bytes: int) -> None:
        """The coordinator accepted an upload of ``payload_bytes``."""
        self._uploads.inc()
        self._payload.inc(payload_bytes)

    def round_done(self, rnd: int) -> None:
        """Round ``rnd`` is this agent's last completed round."""
        self._last_round.set(rnd)

    def applied(self, rnd: int) -> None:
        """Round ``rnd``'s aggregate is the last one this agent applied (or skipped)."""
        self._last_applied.set(rnd)

    def privacy(self, spent: Mapping[str, float], budget: float) -> None:
        """The ledger's cumulative ε by relation value (``PrivacySession.spent()``) and the budget."""
        for relation in Neighbouring:  # the label values: the ledger's relations, whatever ``spent`` holds
            self._epsilon.labels(relation.value).set(float(spent.get(relation.value, 0.0)))
        self._budget.set(budget)


def serve(metrics: AgentMetrics, config: MetricsConfig) -> MetricsServer:
    """Serves ``metrics`` at ``config.listen`` until the returned server's ``stop()``.

    Raises:
        OSError: the address cannot be bound (the message names ``metrics.listen``).
    """
    return MetricsServer.start(config, metrics.registry, log=log, what="agent")
