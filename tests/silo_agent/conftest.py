"""Fixtures shared by the agent's tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture
def fedsilo_logger() -> Iterator[None]:
    """``run_study`` points the "fedsilo" logger at its bench.log (and stops propagation): put it back."""
    logger = logging.getLogger("fedsilo")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    try:
        yield
    finally:
        for h in logger.handlers:
            if h not in saved[2]:
                h.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]
