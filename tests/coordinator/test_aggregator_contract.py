"""The ``Aggregator`` contract (coordinator/aggregation/base.py), run on every implementation.

To cover a new aggregator, add a factory ``Manifest -> Aggregator`` to ``AGGREGATORS``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.coordinator.aggregation import Aggregator, PlainAggregator
from fedsilo.coordinator.errors import InvalidArgument
from fedsilo.coordinator.tensors import Manifest, arrays_from_payload, payload_chunks

AggregatorFactory = Callable[[Manifest], Aggregator]

AGGREGATORS: list[AggregatorFactory] = [PlainAggregator]
IDS = [getattr(f, "__name__", repr(f)) for f in AGGREGATORS]

SHAPES = {"enc.weight": (3, 4), "enc.bias": (5,), "head.weight": (2, 2, 2)}
MANIFEST = Manifest.of_arrays({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})

Update = tuple[float, dict[str, np.ndarray]]


def write_payload(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path.write_bytes(b"".join(payload_chunks(arrays, 1 << 16)))
    return path


def make_update(seed: int, manifest: Manifest = MANIFEST) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.uniform(-10, 10, size=t.shape).astype(t.dtype.numpy) for t in manifest.tensors}


def weighted_mean(updates: Sequence[Update]) -> dict[str, np.ndarray]:
    total = sum(w for w, _ in updates)
    names = list(updates[0][1])
    return {k: sum(w * u[k].astype(np.float64) for w, u in updates) / total for k in names}


def aggregate(agg: Aggregator, folder: Path, updates: Sequence[Update]) -> dict[str, np.ndarray]:
    """Resets, validates and adds every update, writes the result, reads it back."""
    agg.reset()
    for i, (w, arrays) in enumerate(updates):
        p = write_payload(folder / f"upload-{i}.bin", arrays)
        agg.validate(p)
        agg.add(p, w)
    return result(agg, folder, sum(w for w, _ in updates))


def result(agg: Aggregator, folder: Path, total_weight: float, name: str = "result.bin") -> dict[str, np.ndarray]:
    out = folder / name
    manifest = agg.write_result(out, total_weight)
    assert manifest == agg.manifest
    return arrays_from_payload(manifest, out.read_bytes())


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.fixture(params=AGGREGATORS, ids=IDS)
def factory(request: pytest.FixtureRequest) -> AggregatorFactory:
    return request.param


# -- weighted mean ----------------------------------------------------------------------------


@st.composite
def rounds(draw: st.DrawFn) -> tuple[Manifest, list[Update]]:
    """A manifest of 1..3 float tensors and 1..50 silo updates with positive weights.

    Shapes, silo count, weights and value scale come from Hypothesis; the values themselves
    from a drawn seed (drawing up to 50 x 3 arrays element by element is too slow).
    """
    n_tensors = draw(st.integers(1, 3))
    arrays = {}
    for i in range(n_tensors):
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4))
        arrays[f"t{i}"] = np.zeros(shape, dtype)
    manifest = Manifest.of_arrays(arrays)
    weights = draw(st.lists(st.one_of(st.integers(1, 10**9).map(float),
                                      st.floats(1e-3, 1e9, allow_nan=False, allow_infinity=False)),
                            min_size=1, max_size=50))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    updates = [(w, {t.name: (rng.uniform(-scale, scale, size=t.shape)).astype(t.dtype.numpy)
                    for t in manifest.tensors}) for w in weights]
    return manifest, updates


@pytest.mark.parametrize("make", AGGREGATORS, ids=IDS)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=rounds())
def test_result_is_the_weighted_mean(make: AggregatorFactory, case: tuple[Manifest, list[Update]]) -> None:
    manifest, updates = case
    with tempfile.TemporaryDirectory() as d:
        got = aggregate(make(manifest), Path(d), updates)
    want = weighted_mean(updates)
    for t in manifest.tensors:
        assert got[t.name].dtype == t.dtype.numpy
    assert_close(got, want)


def test_reset_starts_an_empty_sum(factory: AggregatorFactory, tmp_path: Path) -> None:
    agg = factory(MANIFEST)
    aggregate(agg, tmp_path, [(5.0, make_update(1)), (1.0, make_update(2))])
    fresh = [(2.0, make_update(3))]
    assert_close(aggregate(agg, tmp_path, fresh), weighted_mean(fresh))


def test_dropped_silo_is_simply_not_in_the_sum(factory: AggregatorFactory, tmp_path: Path) -> None:
    everyone = [(10.0, make_update(1)), (30.0, make_update(2)), (60.0, make_update(3))]
    present = [everyone[0], everyone[2]]  # the second silo never uploaded
    got = aggregate(factory(MANIFEST), tmp_path, present)
    assert_close(got, weighted_mean(present))
    all_three = weighted_mean(everyone)
    assert not np.allclose(got["enc.weight"], all_three["enc.weight"], rtol=1e-3), "the absent silo leaked in"


# -- validate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")], ids=["nan", "inf", "-inf"])
def test_validate_refuses_non_finite_values_and_changes_nothing(factory: AggregatorFactory, tmp_path: Path,
                                                                bad: float, word: str) -> None:
    agg = factory(MANIFEST)
    good = (4.0, make_update(1))
    agg.reset()
    first = write_payload(tmp_path / "good.bin", good[1])
    agg.validate(first)
    agg.add(first, good[0])
    agg.save(tmp_path / "before.sum")

    poisoned = make_update(2)
    poisoned["enc.bias"][3] = bad
    path = write_payload(tmp_path / "poisoned.bin", poisoned)
    with pytest.raises(InvalidArgument, match=f"'enc.bias' contains {word}"):
        agg.validate(path)

    agg.save(tmp_path / "after.sum")
    assert (tmp_path / "after.sum").read_bytes() == (tmp_path / "before.sum").read_bytes()
    assert_close(result(agg, tmp_path, good[0]), weighted_mean([good]))


def test_validate_refuses_a_payload_of_the_wrong_size(factory: AggregatorFactory, tmp_path: Path) -> None:
    agg = factory(MANIFEST)
    agg.reset()
    path = tmp_path / "short.bin"
    path.write_bytes(b"".join(payload_chunks(make_update(1), 1024))[:-4])
    with pytest.raises(InvalidArgument, match=f"expected {MANIFEST.total_bytes}"):
        agg.validate(path)


# -- save / load --------------------------------------------------------------------------------


def test_save_load_round_trips_the_running_sum_exactly(factory: AggregatorFactory, tmp_path: Path) -> None:
    updates = [(float(w), make_update(i)) for i, w in enumerate([3, 1e9, 0.125, 77], start=1)]
    original = factory(MANIFEST)
    original.reset()
    for i, (w, arrays) in enumerate(updates[:2]):
        original.add(write_payload(tmp_path / f"u{i}.bin", arrays), w)
    original.save(tmp_path / "state.sum")

    restored = factory(MANIFEST)
    restored.reset()
    restored.add(write_payload(tmp_path / "noise.bin", make_update(99)), 5.0)  # load must replace, not add
    restored.load(tmp_path / "state.sum")
    restored.save(tmp_path / "again.sum")
    assert (tmp_path / "again.sum").read_bytes() == (tmp_path / "state.sum").read_bytes()
    assert not list(tmp_path.glob("*.tmp")), "save must not leave temporary files behind"

    # Continuing after the restore gives bit-identical results to never having stopped.
    for i, (w, arrays) in enumerate(updates[2:], start=2):
        p = write_payload(tmp_path / f"u{i}.bin", arrays)
        original.add(p, w)
        restored.add(p, w)
    total = sum(w for w, _ in updates)
    original.write_result(tmp_path / "a.bin", total)
    restored.write_result(tmp_path / "b.bin", total)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert_close(arrays_from_payload(MANIFEST, (tmp_path / "b.bin").read_bytes()), weighted_mean(updates))
