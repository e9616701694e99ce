"""docs/metrics.md lists the metrics the code exposes: its tables are made from the specs the collectors are built from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedsilo.coordinator.metrics import COORDINATOR_METRICS
from fedsilo.core.metricspec import MetricKind, MetricSpec, markdown_labels, markdown_table
from fedsilo.silo_agent.metrics import AGENT_METRICS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "metrics.md"

BLOCKS = {
    "coordinator-metrics": lambda: markdown_table(COORDINATOR_METRICS),
    "agent-metrics": lambda: markdown_table(AGENT_METRICS),
    "metric-labels": markdown_labels,
}


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_the_doc_page_is_made_from_the_specs(block: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    found = re.search(rf"<!-- {block}:begin -->\n(.*?)<!-- {block}:end -->", text, re.S)
    assert found, f"docs/metrics.md has no <!-- {block}:begin --> ... <!-- {block}:end --> block"
    want = BLOCKS[block]()
    assert found.group(1).strip() == want, f"docs/metrics.md's {block} block differs from the code; replace it with:\n{want}"


def test_names_are_unique_and_each_side_keeps_its_prefix() -> None:
    names = [s.name for s in COORDINATOR_METRICS + AGENT_METRICS]
    assert len(names) == len(set(names))
    assert all(s.name.startswith("fedsilo_coordinator_") for s in COORDINATOR_METRICS)
    assert all(s.name.startswith("fedsilo_agent_") for s in AGENT_METRICS)


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": "coordinator_rounds_total"}, "must match"),
    ({"name": "fedsilo_coordinator_rounds"}, "a counter's name ends in _total"),
    ({"name": "fedsilo_coordinator_rounds_total", "kind": MetricKind.GAUGE}, "a counter's name ends in _total"),
    ({"labels": ("round",)}, "label 'round' is not one of"),
    ({"labels": ("silo", "silo")}, "duplicate labels"),
    ({"panel": " "}, "help and panel must be given"),
    ({"buckets": (1.0,)}, "buckets are given for histograms"),
    ({"name": "fedsilo_agent_wait", "kind": MetricKind.HISTOGRAM, "buckets": (1.0,)}, "ends in its unit"),
    ({"name": "fedsilo_agent_wait_seconds", "kind": MetricKind.HISTOGRAM, "buckets": (2.0, 1.0)}, "ascending"),
])
def test_a_spec_that_breaks_the_conventions_is_refused(fields: dict, message: str) -> None:
    spec = {"name": "fedsilo_coordinator_rounds_total", "kind": MetricKind.COUNTER, "help": "h", "panel": "p", **fields}
    with pytest.raises(ValueError, match=message):
        MetricSpec(**spec)


def test_the_readme_points_to_the_doc_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Metrics for operations"):]
    section = section[:section.index("\n## ", 1)]
    assert "docs/metrics.md" in section and "[metrics]" in section and 'listen = "127.0.0.1:9464"' in section
