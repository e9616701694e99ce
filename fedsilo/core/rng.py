"""One process-wide lock around code that reseeds torch's global RNG (silos share a process in ``fedsilo bench``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

#: Held while a forked, reseeded global RNG is in use. torch's default generator is process-wide:
#: two threads forking and reseeding it at once (silo agents simulated in one process) would draw
#: from each other's streams. Re-entrant, so a locked section may call another.
GLOBAL_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded_global_rng(seed: int | None) -> Iterator[None]:
    """Forks torch's global CPU RNG, seeds it with ``seed`` (None: leaves the fork's state), and
    holds :data:`GLOBAL_RNG_LOCK` for the duration; the caller's RNG state is restored on exit."""
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        yield
