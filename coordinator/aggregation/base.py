"""The ``Aggregator`` seam: a running weighted sum whose memory does not grow with the silos."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

from fedsilo.core.tensors import Manifest


class Aggregator(abc.ABC):
    """Accumulates one round's uploads as they arrive.

    The running state is O(model size), independent of the number of silos: each upload is
    validated, added, and forgotten. The coordinator persists the running state after every
    accepted upload (``save``) so a killed coordinator resumes without losing or re-adding one.

    Contract (tests/coordinator/test_aggregator_contract.py runs it on every implementation):
    after ``reset``, adding payloads ``u_i`` with weights ``w_i`` and calling ``write_result``
    with ``W = sum(w_i)`` yields ``sum(w_i * u_i) / W`` per element; a payload that fails
    ``validate``, or that ``add`` refuses with ``InvalidArgument`` (e.g. one that would overflow
    the running sum), changes nothing; ``save``/``load`` round-trips the running state exactly.
    """

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    @classmethod
    def for_run(cls, manifest: Manifest, config: Any) -> Aggregator:
        """The aggregator of a run with ``config`` (a ``FederationConfig``) for uploads laid out as ``manifest``."""
        return cls(manifest)

    @abc.abstractmethod
    def payload_bytes_bound(self) -> int:
        """Upper bound on the size of one silo's upload payload for this manifest."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Starts an empty sum."""

    @abc.abstractmethod
    def validate(self, payload: Path) -> None:
        """Checks a complete payload file before it is added.

        Raises:
            InvalidArgument: the payload is unusable (e.g. NaN/Inf values); nothing changes.
        """

    @abc.abstractmethod
    def add(self, payload: Path, weight: float) -> None:
        """Adds ``weight * payload`` to the running sum (payload already validated).

        Raises:
            InvalidArgument: the payload cannot be added (e.g. the sum would overflow); nothing changes.
        """

    @abc.abstractmethod
    def save(self, path: Path) -> None:
        """Writes the running sum to ``path`` atomically (write, fsync, rename)."""

    @abc.abstractmethod
    def load(self, path: Path) -> None:
        """Replaces the running sum by the one saved at ``path``."""

    @abc.abstractmethod
    def write_result(self, path: Path, total_weight: float) -> Manifest:
        """Writes the round's aggregate payload atomically and returns its manifest.

        Raises:
            ValueError: nothing was added, or the aggregate would not be finite; nothing is written.
        """
