"""Prometheus metric specifications: one declaration per metric, from which collectors and docs/metrics.md are made."""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LABELS", "MetricKind", "MetricSpec", "family", "histogram_buckets", "instrument", "markdown_labels",
           "markdown_table"]

#: The only label names a fedsilo metric may carry, each with where its values come from. Every source is
#: a closed set fixed before any peer speaks, so a hostile caller cannot grow the label space.
LABELS: dict[str, str] = {
    "silo": "an enrolled silo (the run's config)",
    "relation": "a neighbouring relation of the privacy ledger (record, silo)",
    "method": "an RPC of the service definitions, as Service/Method",
    "code": "a gRPC status code name",
    "reason": "the fedsilo exception class the status code stands for",
    "state": "a run state (waiting, running, finished, failed)",
}

_NAME = re.compile(r"fedsilo_(coordinator|agent)_[a-z][a-z0-9_]*[a-z0-9]")
#: A histogram's name ends in its base unit.
_HISTOGRAM_UNITS = ("_seconds", "_bytes")


class MetricKind(enum.Enum):
    """The Prometheus type of a metric."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, kw_only=True)
class MetricSpec:
    """One metric as exposed and documented.

    Attributes:
        name: the full name, ``fedsilo_coordinator_*`` or ``fedsilo_agent_*``; a counter's ends in ``_total``.
        kind: counter, gauge or histogram.
        help: what it measures (the HELP line and the doc's meaning column).
        labels: label names, each one of :data:`LABELS`.
        panel: an example PromQL query for a Grafana panel.
        buckets: a histogram's bucket upper bounds, ascending (required for histograms only).
    """

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()
    panel: str = ""
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"metric name {self.name!r} must match {_NAME.pattern}")
        if not isinstance(self.kind, MetricKind):
            raise ValueError(f"metric {self.name}: kind {self.kind!r} is not a MetricKind")
        if (self.kind is MetricKind.COUNTER) != self.name.endswith("_total"):
            raise ValueError(f"metric {self.name}: a counter's name ends in _total, and only a counter's")
        if self.kind is MetricKind.HISTOGRAM and not self.name.endswith(_HISTOGRAM_UNITS):
            raise ValueError(f"metric {self.name}: a histogram's name ends in its unit ({', '.join(_HISTOGRAM_UNITS)})")
        for label in self.labels:
            if label not in LABELS:
                raise ValueError(f"metric {self.name}: label {label!r} is not one of {sorted(LABELS)}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"metric {self.name}: duplicate labels {self.labels}")
        if not self.help.strip() or not self.panel.strip():
            raise ValueError(f"metric {self.name}: help and panel must be given")
        if (self.kind is MetricKind.HISTOGRAM) != bool(self.buckets):
            raise ValueError(f"metric {self.name}: buckets are given for histograms, and only for them")
        if list(self.buckets) != sorted(set(self.buckets)) or any(b <= 0 for b in self.buckets):
            raise ValueError(f"metric {self.name}: buckets must be positive and strictly ascending")


def markdown_table(specs: Sequence[MetricSpec]) -> str:
    """The doc page's table of ``specs``: name, type, labels, meaning and an example panel query."""
    rows = ["| metric | type | labels | meaning | example panel (PromQL) |", "|---|---|---|---|---|"]
    for s in specs:
        labels = ", ".join(f"`{label}`" for label in s.labels) or "—"
        cells = [f"`{s.name}`", s.kind.value, labels, s.help.replace("|", "\\|"),
                 f"`{s.panel.replace('|', chr(92) + '|')}`"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def instrument(spec: MetricSpec, registry: Any) -> Any:
    """A prometheus_client Counter, Gauge or Histogram for ``spec``, registered in ``registry`` (never the
    global default registry: each process, and each agent of an in-process federation, keeps its own)."""
    from prometheus_client import Counter, Gauge, Histogram

    common = {"name": spec.name, "documentation": spec.help, "labelnames": spec.labels, "registry": registry}
    if spec.kind is MetricKind.COUNTER:
        return Counter(**common)
    if spec.kind is MetricKind.GAUGE:
        return Gauge(**common)
    return Histogram(**common, buckets=(*spec.buckets, float("inf")))


def family(spec: MetricSpec) -> Any:
    """An empty metric family of ``spec`` for a collector that reads its values at scrape time."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    kinds = {MetricKind.COUNTER: CounterMetricFamily, MetricKind.GAUGE: GaugeMetricFamily,
             MetricKind.HISTOGRAM: HistogramMetricFamily}
    return kinds[spec.kind](spec.name, spec.help, labels=spec.labels)


def histogram_buckets(spec: MetricSpec, values: Sequence[float]) -> list[tuple[str, float]]:
    """Cumulative bucket counts of ``values`` under ``spec``'s bounds, ``+Inf`` last (``HistogramMetricFamily``)."""
    out = [(_le(bound), float(sum(1 for v in values if v <= bound))) for bound in spec.buckets]
    out.append(("+Inf", float(len(values))))
    return out


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it (``1.0``, ``0.25``)."""
    return repr(float(bound))


def markdown_labels() -> str:
    """The doc page's list of label names and where their values come from."""
    return "\n".join(f"- `{name}`: {source}" for name, source in LABELS.items())
