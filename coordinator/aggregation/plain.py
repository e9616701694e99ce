"""Plaintext weighted averaging of the uploads: the coordinator sees every upload."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedsilo.coordinator.aggregation.base import Aggregator
from fedsilo.core.atomic import atomic_write
from fedsilo.core.errors import InvalidArgument
from fedsilo.core.tensors import Manifest, TensorSpec

_BLOCK_ELEMS = 1 << 18


class PlainAggregator(Aggregator):
    """Keeps sum_i w_i * u_i in float64, one slot per shared element."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        self._sum = np.zeros(manifest.numel, dtype=np.float64)

    def payload_bytes_bound(self) -> int:
        return self.manifest.total_bytes

    def reset(self) -> None:
        self._sum[:] = 0.0

    def _blocks(self, payload: Path) -> Iterator[tuple[TensorSpec, int, np.ndarray]]:
        """Yields (spec, flat element offset, block of values) reading the payload file."""
        size = payload.stat().st_size
        if size != self.manifest.total_bytes:
            raise InvalidArgument(f"payload has {size} bytes, expected {self.manifest.total_bytes}")
        offset = 0
        with open(payload, "rb") as f:
            for spec in self.manifest.tensors:
                left = spec.numel
                while left:
                    n = min(left, _BLOCK_ELEMS)
                    raw = f.read(n * spec.dtype.itemsize)
                    yield spec, offset, np.frombuffer(raw, dtype=spec.dtype.numpy)
                    offset += n
                    left -= n

    def validate(self, payload: Path) -> None:
        for spec, _, block in self._blocks(payload):
            if spec.dtype.is_float and not np.isfinite(block).all():
                bad = "NaN" if np.isnan(block).any() else "Inf"
                raise InvalidArgument(f"tensor {spec.name!r} contains {bad}")

    def add(self, payload: Path, weight: float) -> None:
        for _, offset, block in self._blocks(payload):
            self._sum[offset : offset + block.size] += weight * block.astype(np.float64)

    def save(self, path: Path) -> None:
        # little-endian float64 on disk; no temporary copy of the sum on little-endian hosts
        data = self._sum if sys.byteorder == "little" else self._sum.astype("<f8")
        atomic_write(path, [memoryview(data).cast("B")])

    def load(self, path: Path) -> None:
        data = np.fromfile(path, dtype="<f8")
        if data.size != self._sum.size:
            raise ValueError(f"{path}: holds {data.size} values, expected {self._sum.size}")
        self._sum[:] = data

    def write_result(self, path: Path, total_weight: float) -> Manifest:
        if not total_weight > 0:
            raise ValueError(f"total_weight must be > 0, got {total_weight}")

        def chunks() -> Iterator[bytes]:
            offset = 0
            for spec in self.manifest.tensors:
                mean = self._sum[offset : offset + spec.numel] / total_weight
                if not spec.dtype.is_float:
                    mean = np.rint(mean)
                yield mean.astype(spec.dtype.numpy).tobytes()
                offset += spec.numel

        atomic_write(path, chunks())
        return self.manifest
