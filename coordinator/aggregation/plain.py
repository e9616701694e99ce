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
        """Adds ``weight * payload`` to the float64 sum, or nothing.

        A first pass computes every block's new sum without writing it, so an upload that would
        overflow the sum is refused with the sum unchanged; the second pass (the payload file is
        in the page cache by then) writes the very same values.

        Raises:
            InvalidArgument: some element of the sum would become Inf or NaN; nothing changes.
        """
        for spec, offset, block in self._blocks(payload):
            with np.errstate(over="ignore", invalid="ignore"):
                new = self._sum[offset : offset + block.size] + weight * block.astype(np.float64)
            if not np.isfinite(new).all():
                raise InvalidArgument(f"tensor {spec.name!r}: adding this upload with weight {weight:g} "
                                      "would overflow the running sum")
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

    def _mean(self, spec: TensorSpec, offset: int, total_weight: float) -> np.ndarray:
        """One tensor's sum / ``total_weight`` in its dtype.

        Raises:
            ValueError: a value is not finite in the tensor's dtype.
        """
        with np.errstate(over="ignore", invalid="ignore"):
            mean = self._sum[offset : offset + spec.numel] / total_weight
            if not spec.dtype.is_float:
                mean = np.rint(mean)
            out = mean.astype(spec.dtype.numpy)
        if not np.isfinite(mean).all() or (spec.dtype.is_float and not np.isfinite(out).all()):
            raise ValueError(f"tensor {spec.name!r}: the weighted mean is not finite in {spec.dtype.name}")
        return out

    def write_result(self, path: Path, total_weight: float) -> Manifest:
        """Writes sum / ``total_weight`` in each tensor's dtype.

        Raises:
            ValueError: ``total_weight`` is not > 0, or a value of the mean is not finite in its
                tensor's dtype; nothing is written then.
        """
        if not total_weight > 0:
            raise ValueError(f"total_weight must be > 0, got {total_weight}")
        offsets = np.cumsum([0, *(spec.numel for spec in self.manifest.tensors)])
        for spec, offset in zip(self.manifest.tensors, offsets):
            self._mean(spec, int(offset), total_weight)  # every value checked before the file is touched
        atomic_write(path, (self._mean(spec, int(offset), total_weight).tobytes()
                            for spec, offset in zip(self.manifest.tensors, offsets)))
        return self.manifest
