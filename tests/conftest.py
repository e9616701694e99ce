"""Test-session settings shared by every test package."""

from __future__ import annotations

import os

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
