"""Homomorphic aggregation: the coordinator adds BFV ciphertexts it cannot read (no key of any kind)."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedsilo.coordinator.aggregation.base import Aggregator
from fedsilo.core.atomic import atomic_write
from fedsilo.core.errors import InvalidArgument
from fedsilo.core.tensors import Manifest
from fedsilo.privacy.he import HeError, HeParams, PublicContext


_VALIDATED_CACHE = 4


def read_framed(path: Path, limit: int) -> Iterator[bytes]:
    """Yields the length-prefixed (little-endian uint32) blobs of a payload file.

    Raises:
        InvalidArgument: a truncated file, an empty or oversized blob.
    """
    with open(path, "rb") as f:
        while head := f.read(4):
            if len(head) < 4:
                raise InvalidArgument("ciphertext payload truncated inside a length prefix")
            (n,) = struct.unpack("<I", head)
            if not 0 < n <= limit:
                raise InvalidArgument(f"ciphertext of {n} bytes in the payload; expected 1..{limit}")
            blob = f.read(n)
            if len(blob) < n:
                raise InvalidArgument("ciphertext payload truncated inside a ciphertext")
            yield blob


def framed(blobs: Iterator[bytes]) -> Iterator[bytes]:
    """Length-prefixes blobs (the inverse of :func:`read_framed`)."""
    for b in blobs:
        yield struct.pack("<I", len(b))
        yield b


class HeAggregator(Aggregator):
    """Keeps the running sum of Enc(w_i * u_i) as one ciphertext per slot-sized chunk.

    Silos scale their own updates by their weight before encrypting (the weights are inside
    the ciphertexts), so ``add`` ignores its ``weight`` argument; the silos divide the
    decrypted sum by the contributors' total weight. The coordinator holds only the public
    parameters (``PublicContext``): it never has a secret, public, Galois or relinearisation
    key, and it never decrypts.
    """

    @classmethod
    def for_run(cls, manifest: Manifest, config: Any) -> HeAggregator:
        """The aggregator of an HE run: the run's public HE parameters, no key."""
        return cls(manifest, config.he_params())

    def __init__(self, manifest: Manifest, params: HeParams) -> None:
        super().__init__(manifest)
        self.context = PublicContext(params)
        self.num_ciphertexts = params.n_chunks(manifest.numel)
        self._blob_limit = params.bytes_estimate(params.slots, aggregate=True)
        self._sum: list | None = None
        # ciphertexts loaded by validate(), reused by add() for the same file (loading dominates)
        self._validated: dict[tuple[str, int, int], list] = {}
        self._validated_lock = threading.Lock()

    def payload_bytes_bound(self) -> int:
        params = self.context.params
        return params.bytes_estimate(self.manifest.numel) + 4 * self.num_ciphertexts

    def reset(self) -> None:
        self._sum = None

    def _load_all(self, payload: Path) -> list:
        cts = []
        try:
            for blob in read_framed(payload, self._blob_limit):
                if len(cts) == self.num_ciphertexts:
                    raise InvalidArgument(f"more than the {self.num_ciphertexts} ciphertexts this update needs")
                cts.append(self.context.load(blob))
        except HeError as exc:
            raise InvalidArgument(f"ciphertext {len(cts) + 1}: {exc}") from None
        if len(cts) != self.num_ciphertexts:
            raise InvalidArgument(f"{len(cts)} ciphertexts in the upload; the shared tensors need "
                                  f"{self.num_ciphertexts}")
        return cts

    @staticmethod
    def _key(payload: Path) -> tuple[str, int, int]:
        st = payload.stat()
        return str(payload), st.st_size, st.st_mtime_ns

    def validate(self, payload: Path) -> None:
        cts = self._load_all(payload)
        with self._validated_lock:
            while len(self._validated) >= _VALIDATED_CACHE:
                self._validated.pop(next(iter(self._validated)))
            self._validated[self._key(payload)] = cts

    def add(self, payload: Path, weight: float) -> None:
        del weight  # already inside the ciphertexts
        with self._validated_lock:
            cts = self._validated.pop(self._key(payload), None)
        if cts is None:
            cts = self._load_all(payload)
        if self._sum is None:
            self._sum = cts
        else:
            for acc, ct in zip(self._sum, cts, strict=True):
                self.context.add(acc, ct)

    def save(self, path: Path) -> None:
        if self._sum is None:
            raise ValueError("nothing to save: no upload has been added")
        atomic_write(path, framed(self.context.dump(ct) for ct in self._sum))

    def load(self, path: Path) -> None:
        self._sum = self._load_all(path)

    def write_result(self, path: Path, total_weight: float) -> Manifest:
        del total_weight  # silos divide after decrypting
        if self._sum is None:
            raise ValueError("no upload was added to this round")
        atomic_write(path, framed(self.context.dump(ct) for ct in self._sum))
        return self.manifest
