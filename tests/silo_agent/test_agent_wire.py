"""The agent's conversions: upload streams and aggregate streams round-trip, corruption is caught."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsilo.coordinator import wire as coord_wire
from fedsilo.core.errors import InvalidArgument
from fedsilo.coordinator.records import UploadChunk, UploadHeader, UploadTrailer
from fedsilo.silo_agent import wire
from fedsilo.v1 import federation_pb2, tensor_pb2

arrays = st.dictionaries(
    st.sampled_from(["a.weight", "b.bias", "c"]),
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=7),
               elements=st.floats(-1e3, 1e3, width=32)),
    min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(arrays, st.integers(1, 64))
def test_upload_stream_is_parsed_back_by_the_coordinator(data, chunk) -> None:
    reqs = list(wire.upload_requests(7, 12.0, data, chunk))
    parts = list(coord_wire.upload_parts(reqs))
    assert isinstance(parts[0], UploadHeader) and parts[0].round == 7 and parts[0].weight == 12.0
    assert isinstance(parts[-1], UploadTrailer)
    chunks = [p for p in parts if isinstance(p, UploadChunk)]
    assert all(0 < len(c.data) <= chunk for c in chunks)
    assert parts[-1].num_chunks == len(chunks)
    assert sum(p.wire_bytes for p in parts) == sum(r.ByteSize() for r in reqs)
    payload = b"".join(c.data for c in chunks)
    assert len(payload) == parts[0].manifest.total_bytes


def _aggregate_stream(data, chunk):
    reqs = list(wire.upload_requests(1, 1.0, data, chunk))
    header = reqs[0].header
    out = [federation_pb2.FetchAggregateResponse(header=federation_pb2.AggregateHeader(
        round=3, num_contributors=2, total_weight=5.0, manifest=header.manifest,
        encoding=federation_pb2.PAYLOAD_ENCODING_RAW_TENSORS, payload_bytes=header.payload_bytes))]
    out += [federation_pb2.FetchAggregateResponse(chunk=r.chunk) for r in reqs[1:-1]]
    out.append(federation_pb2.FetchAggregateResponse(trailer=reqs[-1].trailer))
    return out


@settings(max_examples=40, deadline=None)
@given(arrays, st.integers(1, 64))
def test_aggregate_stream_round_trip(data, chunk) -> None:
    agg = wire.aggregate_from_stream(_aggregate_stream(data, chunk))
    assert agg.round == 3 and agg.num_contributors == 2
    assert set(agg.arrays) == set(data)
    for k, v in data.items():
        np.testing.assert_array_equal(agg.arrays[k], v)


def test_corrupted_or_truncated_aggregate_is_refused() -> None:
    data = {"w": np.arange(40, dtype=np.float32)}
    stream = _aggregate_stream(data, 16)
    bad = list(stream)
    bad[1] = federation_pb2.FetchAggregateResponse(chunk=b"\x00" * len(stream[1].chunk))
    with pytest.raises(InvalidArgument, match="corrupted"):
        wire.aggregate_from_stream(bad)
    with pytest.raises(InvalidArgument, match="truncated"):
        wire.aggregate_from_stream(stream[:-1])
    with pytest.raises(InvalidArgument, match="unexpected"):
        wire.aggregate_from_stream([stream[1], *stream])
    assert isinstance(stream[-1].trailer, tensor_pb2.PayloadTrailer)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=6), st.integers(1, 64))
def test_ciphertext_framing_round_trip(blobs, chunk) -> None:
    chunks = list(wire.rechunk(wire.frame_blobs(blobs), chunk))
    assert all(0 < len(c) <= chunk for c in chunks)
    assert wire.unframe_blobs(b"".join(chunks)) == blobs


def test_truncated_ciphertext_framing_is_refused() -> None:
    payload = b"".join(wire.frame_blobs([b"abc", b"defg"]))
    first_frame = 4 + 3  # a cut right after the first blob is a valid one-blob payload
    assert wire.unframe_blobs(payload[:first_frame]) == [b"abc"]
    for cut in set(range(1, len(payload))) - {first_frame}:
        with pytest.raises(InvalidArgument):
            wire.unframe_blobs(payload[:cut])


def test_agent_code_knows_the_built_in_methods_outside_the_cli() -> None:
    """A fresh process that uses the agent's client library (as benchmarks/round_overhead.py's silos
    do, without the CLI or this suite's conftest) reads a run of a built-in method."""
    import subprocess
    import sys

    code = ("from fedsilo.silo_agent.wire import run_info_from_proto\n"
            "from fedsilo.v1 import federation_pb2\n"
            "info = run_info_from_proto(federation_pb2.GetRunResponse(run_id='r', total_rounds=1, method='fedavg',\n"
            "    aggregation=federation_pb2.AGGREGATION_PLAIN))\n"
            "print(info.strategy, info.method.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fedavg", "FedAvg"]
