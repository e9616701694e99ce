"""Test-session settings shared by every test package."""

from __future__ import annotations

import os

import pytest

# Every test process knows the built-in methods (the CLI registers them the same way); the method
# modules import without torch, so coordinator-only tests can load them too.
import fedsilo.silo_agent.methods  # noqa: F401


def pytest_configure(config) -> None:  # noqa: ANN001 - pytest's hook signature
    """Under pytest-xdist each worker computes with one thread: the two workers then share this 2-core
    machine's cores instead of both claiming both, which would starve the end-to-end worker's agent
    processes (their rounds have deadlines)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        try:
            import torch
        except ImportError:  # the coordinator-only install has no torch
            return
        torch.set_num_threads(1)


class Scrape:
    """One scrape of a Prometheus endpoint over HTTP: its text and its samples."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        #: Names of the metric families in the scrape (a counter's without ``_total``; the ``_created`` gauges
        #: prometheus_client adds beside counters and histograms left out).
        self.families: set[str] = set()
        for fam in text_string_to_metric_families(text):
            self.families.add(fam.name)
            for s in fam.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        self.families -= {f for f in self.families if f.endswith("_created") and f.removesuffix("_created") in
                          self.families}

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name`` with exactly ``labels`` (KeyError naming it when absent)."""
        key = (name, tuple(sorted(labels.items())))
        if key not in self.samples:
            raise KeyError(f"no sample {name}{labels} in the scrape")
        return self.samples[key]

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every sample named ``name``, by its labels."""
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def label_values(self) -> dict[str, set[str]]:
        """Label name -> every value it takes in the scrape (bucket bounds ``le`` included)."""
        out: dict[str, set[str]] = {}
        for _, labels in self.samples:
            for k, v in labels:
                out.setdefault(k, set()).add(v)
        return out


@pytest.fixture
def scrape():
    """Reads ``http://127.0.0.1:PORT/metrics`` as a :class:`Scrape`."""
    import urllib.request

    def read(port: int) -> Scrape:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            return Scrape(resp.read().decode("utf-8"))

    return read
