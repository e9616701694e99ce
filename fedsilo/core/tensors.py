"""Torch-free tensor payloads: manifests, raw little-endian bytes, chunking and validation."""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedsilo.core.errors import InvalidArgument

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,256}$")
MAX_TENSORS = 100_000
MAX_DIM = 2**31


class PayloadEncoding(enum.Enum):
    """Layout of an upload or aggregate payload (values match ``fedsilo.v1.PayloadEncoding``)."""

    RAW_TENSORS = 1
    HE_CIPHERTEXTS = 2


class DType(enum.Enum):
    """Element types allowed on the wire (values match ``fedsilo.v1.DType``)."""

    FLOAT32 = 1
    FLOAT64 = 2
    FLOAT16 = 3
    INT64 = 4
    INT32 = 5

    @property
    def numpy(self) -> np.dtype:
        """The little-endian numpy dtype."""
        return np.dtype(_NUMPY[self])

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.numpy.itemsize

    @property
    def is_float(self) -> bool:
        """Whether the type is a floating-point type."""
        return self in (DType.FLOAT16, DType.FLOAT32, DType.FLOAT64)

    @classmethod
    def from_numpy(cls, dtype: np.dtype) -> DType:
        """Maps a numpy dtype to a wire dtype.

        Raises:
            InvalidArgument: for a dtype the wire does not carry.
        """
        key = np.dtype(dtype).newbyteorder("<").str
        for member, value in _NUMPY.items():
            if np.dtype(value).str == key:
                return member
        raise InvalidArgument(f"dtype {np.dtype(dtype)} cannot travel on the wire")


_NUMPY = {
    DType.FLOAT32: "<f4",
    DType.FLOAT64: "<f8",
    DType.FLOAT16: "<f2",
    DType.INT64: "<i8",
    DType.INT32: "<i4",
}


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """Name, element type and shape of one tensor in a payload."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise InvalidArgument(f"tensor name {self.name!r} is not 1..256 chars of [A-Za-z0-9_.-]")
        if not isinstance(self.dtype, DType):
            raise InvalidArgument(f"tensor {self.name!r} has invalid dtype {self.dtype!r}")
        for d in self.shape:
            if not isinstance(d, int) or d < 0 or d >= MAX_DIM:
                raise InvalidArgument(f"tensor {self.name!r} has invalid shape {self.shape!r}")

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's raw bytes."""
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Ordered tensor layout of a payload: the concatenation of each tensor's raw bytes."""

    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.tensors) <= MAX_TENSORS:
            raise InvalidArgument(f"a payload holds 1..{MAX_TENSORS} tensors, got {len(self.tensors)}")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise InvalidArgument(f"tensor {dup!r} appears twice in the manifest")

    @property
    def total_bytes(self) -> int:
        """Payload size in bytes."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def numel(self) -> int:
        """Number of elements over all tensors."""
        return sum(t.numel for t in self.tensors)

    def difference(self, other: Manifest) -> str | None:
        """Describes the first difference to ``other``, or returns None when equal."""
        mine = {t.name: t for t in self.tensors}
        theirs = {t.name: t for t in other.tensors}
        for name in mine.keys() - theirs.keys():
            return f"tensor {name!r} is not part of the run's shared tensors"
        for name in theirs.keys() - mine.keys():
            return f"tensor {name!r} is missing"
        for a, b in zip(self.tensors, other.tensors, strict=True):
            if a.name != b.name:
                return f"tensor {a.name!r} is out of order (expected {b.name!r} at this position)"
            if a.dtype != b.dtype:
                return f"tensor {a.name!r} has dtype {a.dtype.name}, expected {b.dtype.name}"
            if a.shape != b.shape:
                return f"tensor {a.name!r} has shape {list(a.shape)}, expected {list(b.shape)}"
        return None

    def to_json(self) -> list[dict]:
        """Plain-data form for storage."""
        return [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape)} for t in self.tensors]

    def digest(self) -> str:
        """SHA-256 (64 lowercase hex characters) of the canonical JSON of :meth:`to_json` (sorted keys,
        no spaces): the ``run.shared_tensors_sha256`` a study pins, computed the same way by agent and
        coordinator."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    @classmethod
    def from_json(cls, data: Sequence[Mapping]) -> Manifest:
        """Inverse of :meth:`to_json`."""
        return cls(
            tensors=tuple(
                TensorSpec(name=d["name"], dtype=DType[d["dtype"]], shape=tuple(int(x) for x in d["shape"]))
                for d in data
            )
        )

    @classmethod
    def of_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Manifest:
        """The manifest describing ``arrays`` in their iteration order."""
        return cls(
            tensors=tuple(
                TensorSpec(name=k, dtype=DType.from_numpy(v.dtype), shape=tuple(int(d) for d in v.shape))
                for k, v in arrays.items()
            )
        )


def payload_chunks(arrays: Mapping[str, np.ndarray], chunk_bytes: int) -> Iterator[bytes]:
    """Yields the payload of ``arrays`` (raw little-endian bytes in order) in chunks.

    Args:
        arrays: tensors in manifest order.
        chunk_bytes: maximum chunk size in bytes (>= 1).
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    buf = bytearray()
    for arr in arrays.values():
        le = np.ascontiguousarray(arr, dtype=np.dtype(arr.dtype).newbyteorder("<"))
        view = memoryview(le.reshape(-1).view(np.uint8))
        pos = 0
        while pos < len(view):
            take = min(chunk_bytes - len(buf), len(view) - pos)
            if not buf and take == chunk_bytes:
                yield bytes(view[pos : pos + take])
            else:
                buf += view[pos : pos + take]
                if len(buf) == chunk_bytes:
                    yield bytes(buf)
                    buf.clear()
            pos += take
    if buf:
        yield bytes(buf)


def sha256_of(chunks: Iterable[bytes]) -> bytes:
    """SHA-256 digest of the concatenated chunks."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.digest()


def arrays_from_payload(manifest: Manifest, payload: bytes | memoryview) -> dict[str, np.ndarray]:
    """Splits a complete payload into arrays (copies, native byte order).

    Raises:
        InvalidArgument: if the payload size does not match the manifest.
    """
    if len(payload) != manifest.total_bytes:
        raise InvalidArgument(f"payload has {len(payload)} bytes, manifest says {manifest.total_bytes}")
    out: dict[str, np.ndarray] = {}
    pos = 0
    for t in manifest.tensors:
        arr = np.frombuffer(payload, dtype=t.dtype.numpy, count=t.numel, offset=pos)
        out[t.name] = arr.astype(t.dtype.numpy.newbyteorder("="), copy=True).reshape(t.shape)
        pos += t.nbytes
    return out
