"""Torch-free payloads: chunking round-trips for any chunk size; manifests and their differences."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.core.errors import InvalidArgument
from fedsilo.core.tensors import DType, Manifest, TensorSpec, arrays_from_payload, payload_chunks

DTYPES = ["<f4", ">f4", "<f8", ">f8", "<i8", ">i8"]


@st.composite
def named_arrays(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """1..5 arrays of float32/float64/int64 (either byte order, maybe non-contiguous), any values."""
    n = draw(st.integers(1, 5))
    out: dict[str, np.ndarray] = {}
    for i in range(n):
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7))
        arr = draw(hnp.arrays(dtype, shape))
        if arr.ndim >= 2 and draw(st.booleans()):
            arr = arr.T  # a non-contiguous view
        out[f"layer{i}.{draw(st.sampled_from(['weight', 'bias', 'running_mean']))}"] = arr
    return out


def spec(name: str, dtype: DType = DType.FLOAT32, shape: tuple[int, ...] = (2, 3)) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape)


@settings(max_examples=100, deadline=None)
@given(arrays=named_arrays(), chunk_bytes=st.integers(1, 300))
def test_payload_round_trips_for_any_chunk_size(arrays: dict[str, np.ndarray], chunk_bytes: int) -> None:
    manifest = Manifest.of_arrays(arrays)
    chunks = list(payload_chunks(arrays, chunk_bytes))
    payload = b"".join(chunks)

    # The payload is each tensor's little-endian C-order bytes, concatenated in order.
    expected = b"".join(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes() for a in arrays.values())
    assert payload == expected
    assert len(payload) == manifest.total_bytes
    # Chunks are never empty, never above chunk_bytes, and all but the last are full.
    assert all(0 < len(c) <= chunk_bytes for c in chunks)
    assert all(len(c) == chunk_bytes for c in chunks[:-1])
    assert len(chunks) == math.ceil(len(payload) / chunk_bytes)

    back = arrays_from_payload(manifest, payload)
    assert list(back) == list(arrays)
    for name, arr in arrays.items():
        got = back[name]
        assert got.shape == arr.shape
        assert got.dtype == arr.dtype.newbyteorder("=")
        assert got.flags.writeable and got.flags.c_contiguous
        # Bit-exact, NaN payloads and signed zeros included.
        assert got.astype(got.dtype.newbyteorder("<")).tobytes() == (
            np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())


def test_payload_chunks_refuses_a_chunk_size_below_one() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        list(payload_chunks({"a": np.zeros(3, np.float32)}, 0))


def test_arrays_from_payload_refuses_a_wrong_size() -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    manifest = Manifest.of_arrays(arrays)
    payload = b"".join(payload_chunks(arrays, 1024))
    for bad in (payload[:-1], payload + b"\0"):
        with pytest.raises(InvalidArgument, match=f"manifest says {manifest.total_bytes}"):
            arrays_from_payload(manifest, bad)


def test_dtype_mapping_covers_the_wire_types() -> None:
    assert DType.from_numpy(np.dtype(">f4")) is DType.FLOAT32
    assert DType.from_numpy(np.dtype("int64")) is DType.INT64
    assert DType.FLOAT16.itemsize == 2 and DType.INT32.itemsize == 4
    assert DType.FLOAT16.is_float and not DType.INT64.is_float
    with pytest.raises(InvalidArgument, match="cannot travel"):
        DType.from_numpy(np.dtype(np.uint8))


# -- Manifest -------------------------------------------------------------------------------

RUN = Manifest(tensors=(spec("conv.weight", shape=(3, 4)), spec("conv.bias", shape=(5,))))


def test_manifest_sizes_and_json_round_trip() -> None:
    m = Manifest(tensors=(spec("a", DType.FLOAT64, (2, 3)), spec("b", DType.INT32, ()), spec("c", shape=(0, 4))))
    assert m.numel == 6 + 1 + 0
    assert m.total_bytes == 48 + 4 + 0
    assert Manifest.from_json(m.to_json()) == m


def test_manifest_difference_is_none_for_an_equal_manifest() -> None:
    same = Manifest(tensors=(spec("conv.weight", shape=(3, 4)), spec("conv.bias", shape=(5,))))
    assert RUN.difference(same) is None
    assert same.difference(RUN) is None


@pytest.mark.parametrize(
    "tensors, fragment",
    [
        ((spec("conv.weight", shape=(4, 3)), spec("conv.bias", shape=(5,))),
         "tensor 'conv.weight' has shape [4, 3], expected [3, 4]"),
        ((spec("conv.weight", shape=(3, 4)), spec("conv.bias", shape=(5, 1))),
         "tensor 'conv.bias' has shape [5, 1], expected [5]"),
        ((spec("conv.weight", DType.FLOAT64, (3, 4)), spec("conv.bias", shape=(5,))),
         "tensor 'conv.weight' has dtype FLOAT64, expected FLOAT32"),
        ((spec("conv.weight", shape=(3, 4)),), "tensor 'conv.bias' is missing"),
        ((spec("conv.weight", shape=(3, 4)), spec("conv.bias", shape=(5,)), spec("extra", shape=(1,))),
         "tensor 'extra' is not part of the run's shared tensors"),
        ((spec("conv.bias", shape=(5,)), spec("conv.weight", shape=(3, 4))),
         "tensor 'conv.bias' is out of order (expected 'conv.weight' at this position)"),
        ((spec("conv.weight", shape=(3, 4)), spec("conv.beta", shape=(5,))),
         "tensor 'conv.beta' is not part of the run's shared tensors"),
    ],
    ids=["shape", "shape-rank", "dtype", "missing", "extra", "order", "renamed"],
)
def test_manifest_difference_names_the_first_difference(tensors: tuple[TensorSpec, ...], fragment: str) -> None:
    diff = Manifest(tensors=tensors).difference(RUN)
    assert diff is not None and fragment in diff, diff


def test_manifest_refuses_duplicates_and_empty() -> None:
    with pytest.raises(InvalidArgument, match="'a' appears twice"):
        Manifest(tensors=(spec("a"), spec("b"), spec("a")))
    with pytest.raises(InvalidArgument, match="1..100000 tensors"):
        Manifest(tensors=())


@pytest.mark.parametrize(
    "name, shape, fragment",
    [("", (1,), "tensor name"), ("a b", (1,), "tensor name"), ("x" * 257, (1,), "tensor name"),
     ("ok", (-1,), "invalid shape"), ("ok", (2**31,), "invalid shape")],
)
def test_tensor_spec_refuses_bad_names_and_shapes(name: str, shape: tuple[int, ...], fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        TensorSpec(name=name, dtype=DType.FLOAT32, shape=shape)
