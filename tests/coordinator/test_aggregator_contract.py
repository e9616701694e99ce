"""The ``Aggregator`` contract (coordinator/aggregation/base.py), run on every implementation.

Every implementation runs the same tests through a small per-implementation ``Codec``: how
to build the aggregator, how a silo writes its payload for ``(weight, arrays)`` given the
round's public weight normalizer, how to read the result back to float arrays given the
contributors' total weight, which precision the result has, and which payloads the
implementation must refuse in ``validate``. To cover a new aggregator, add a ``Codec`` to
``CODECS``.

* ``PlainAggregator``: the payload is the raw tensors; the coordinator multiplies by the
  weight, so the result is the weighted mean itself (float64 accumulation, then each
  tensor's dtype): within 1e-6.
* ``HeAggregator``: the payload is length-prefixed BFV ciphertexts of ``w_i / N * u_i``
  (``N`` the public normalizer, >= the sum of the weights; the weight is inside the
  ciphertext and ``add`` ignores its argument). The result is the encrypted sum; the reader
  decrypts it with the silos' shared secret key and multiplies by ``N / W``. Its precision
  is the one the HE design states: ``max |error| <= 1e-4 * max |plaintext mean|`` (fixed
  point with about 2^36 steps per clip bound: ~1e-8 relative or better in practice), not
  1e-6 absolute; every value stays within the clip bound (``HE_PARAMS.bound``).

Precision-specific assertions (the plain result keeps each tensor's dtype; NaN/Inf messages
name the tensor) live in the plain-only tests at the end, HE-specific ones (several
ciphertexts per update, no key on the coordinator's side) in the HE-only tests.
"""

from __future__ import annotations

import abc
import functools
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import tenseal.sealapi as seal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.coordinator.aggregation import Aggregator, PlainAggregator
from fedsilo.coordinator.aggregation.he import HeAggregator
from fedsilo.core.errors import InvalidArgument
from fedsilo.core.tensors import Manifest, arrays_from_payload, payload_chunks
from fedsilo.privacy.he import FixedPoint, HeParams, PublicContext, SecretContext

Arrays = dict[str, np.ndarray]
Update = tuple[float, Arrays]

SHAPES = {"enc.weight": (3, 4), "enc.bias": (5,), "head.weight": (2, 2, 2)}
MANIFEST = Manifest.of_arrays({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
VALUE_BOUND = 10.0  # make_update draws |u| <= 10

# The run defaults (N=4096, one 56-bit prime, t ~ 2^43, max_silos 64) with the clip bound
# at the fixtures' value range. Encrypting a 4096-slot chunk takes ~2 ms here.
HE_PARAMS = HeParams(bound=VALUE_BOUND)


def make_update(seed: int, manifest: Manifest = MANIFEST) -> Arrays:
    rng = np.random.default_rng(seed)
    return {t.name: rng.uniform(-VALUE_BOUND, VALUE_BOUND, size=t.shape).astype(t.dtype.numpy)
            for t in manifest.tensors}


def weighted_mean(updates: Sequence[Update]) -> Arrays:
    total = sum(w for w, _ in updates)
    names = list(updates[0][1])
    return {k: sum(w * u[k].astype(np.float64) for w, u in updates) / total for k in names}


def flat(manifest: Manifest, arrays: Arrays) -> np.ndarray:
    """The arrays in manifest order, flattened, float64 (what the HE silo encrypts)."""
    return np.concatenate([np.ravel(arrays[t.name]).astype(np.float64) for t in manifest.tensors])


def unflat(manifest: Manifest, values: np.ndarray) -> Arrays:
    out, pos = {}, 0
    for t in manifest.tensors:
        out[t.name] = values[pos:pos + t.numel].reshape(t.shape)
        pos += t.numel
    assert pos == values.size
    return out


def frame(blobs: Iterable[bytes]) -> bytes:
    """Length-prefixed (little-endian uint32) blobs, written here independently of the coordinator."""
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


def unframe(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    assert pos == len(data)
    return out


# -- codecs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Poison:
    """A payload the implementation must refuse in ``validate`` (for ``MANIFEST``)."""

    id: str
    write: Callable[[Path], None]
    match: str  # regex searched in the InvalidArgument message


class Codec(abc.ABC):
    """How one implementation's payloads are written and its results read."""

    id: str
    min_silos: int  # silo counts the weighted-mean property draws
    max_silos: int
    max_examples: int  # Hypothesis examples of that property
    value_scales: tuple[float, ...]  # magnitudes of the values the property draws
    weights: st.SearchStrategy[float]  # the silos' weights

    @abc.abstractmethod
    def make(self, manifest: Manifest) -> Aggregator:
        """A fresh aggregator for ``manifest``."""

    @abc.abstractmethod
    def write(self, path: Path, manifest: Manifest, arrays: Arrays, weight: float, normalizer: float) -> Path:
        """Writes the payload a silo uploads for ``(weight, arrays)``; ``normalizer`` >= sum of weights."""

    @abc.abstractmethod
    def read(self, manifest: Manifest, path: Path, total_weight: float, normalizer: float) -> Arrays:
        """Reads a ``write_result`` file back to the weighted mean (float arrays)."""

    @abc.abstractmethod
    def assert_close(self, got: Arrays, want: Arrays) -> None:
        """The implementation's stated precision."""

    @abc.abstractmethod
    def poisons(self) -> list[Poison]:
        """Payloads for ``MANIFEST`` that ``validate`` must refuse."""


def _assert_same_layout(got: Arrays, want: Arrays) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape, k


class PlainCodec(Codec):
    id = "plain"
    min_silos, max_silos, max_examples = 1, 50, 50
    value_scales = (1e-3, 1.0, 1e3)
    weights = st.one_of(st.integers(1, 10**9).map(float),
                        st.floats(1e-3, 1e9, allow_nan=False, allow_infinity=False))

    def make(self, manifest: Manifest) -> Aggregator:
        return PlainAggregator(manifest)

    def write(self, path: Path, manifest: Manifest, arrays: Arrays, weight: float, normalizer: float) -> Path:
        del manifest, weight, normalizer  # the coordinator applies the weight
        path.write_bytes(b"".join(payload_chunks(arrays, 1 << 16)))
        return path

    def read(self, manifest: Manifest, path: Path, total_weight: float, normalizer: float) -> Arrays:
        return arrays_from_payload(manifest, path.read_bytes())

    def assert_close(self, got: Arrays, want: Arrays) -> None:
        _assert_same_layout(got, want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)

    def poisons(self) -> list[Poison]:
        def non_finite(value: float) -> Callable[[Path], None]:
            def write(path: Path) -> None:
                arrays = make_update(2)
                arrays["enc.bias"][3] = value
                self.write(path, MANIFEST, arrays, 1.0, 1.0)
            return write

        raw = b"".join(payload_chunks(make_update(2), 1024))
        return [
            Poison("nan", non_finite(np.nan), "contains NaN"),
            Poison("inf", non_finite(np.inf), "contains Inf"),
            Poison("-inf", non_finite(-np.inf), "contains Inf"),
            Poison("short", lambda p: p.write_bytes(raw[:-4]), f"expected {MANIFEST.total_bytes}"),
            Poison("long", lambda p: p.write_bytes(raw + b"\0" * 4), f"expected {MANIFEST.total_bytes}"),
        ]


@functools.cache
def he_secret(params: HeParams = HE_PARAMS) -> SecretContext:
    """The silos' shared secret context (the coordinator never has it)."""
    return SecretContext.generate(params)


def _other_t_params() -> HeParams:
    """Same N and coefficient modulus as HE_PARAMS, another batching plain modulus."""
    return HeParams(plain_modulus=seal.PlainModulus.Batching(4096, 40).value(), bound=VALUE_BOUND)


def _other_n_params() -> HeParams:
    return HeParams(poly_modulus_degree=8192, plain_modulus=seal.PlainModulus.Batching(8192, 43).value(),
                    bound=VALUE_BOUND)


class HeCodec(Codec):
    id = "he"
    min_silos, max_silos, max_examples = 3, 50, 25
    # Fractions of the clip bound. With weights within a factor 1000 of each other and one
    # silo missing, N / W <= 501, so even the worst-case rounding error of 50 silos,
    # 50 * 501 / FixedPoint.scale ~ 4e-6, stays below 1e-4 of the smallest anchor (0.05).
    value_scales = (0.01 * VALUE_BOUND, 0.1 * VALUE_BOUND, VALUE_BOUND)
    weights = st.one_of(st.integers(1, 1000).map(float),
                        st.floats(1.0, 1000.0, allow_nan=False, allow_infinity=False))

    def __init__(self, params: HeParams = HE_PARAMS) -> None:
        self.params = params
        self.q = FixedPoint(params=params)

    def make(self, manifest: Manifest) -> Aggregator:
        return HeAggregator(manifest, self.params)

    def blobs(self, manifest: Manifest, arrays: Arrays, weight: float, normalizer: float,
              secret: SecretContext | None = None) -> list[bytes]:
        assert 0 < weight <= normalizer
        values = flat(manifest, arrays) * (weight / normalizer)
        assert np.all(np.abs(values) <= self.q.bound), "the test must respect the clip bound"
        rng = np.random.default_rng(zlib.crc32(values.tobytes()))  # stochastic rounding, reproducible
        ints, clipped = self.q.encode(values, rng)
        assert clipped == 0
        return (secret or he_secret(self.params)).encrypt(ints)

    def write(self, path: Path, manifest: Manifest, arrays: Arrays, weight: float, normalizer: float) -> Path:
        path.write_bytes(frame(self.blobs(manifest, arrays, weight, normalizer)))
        return path

    def read(self, manifest: Manifest, path: Path, total_weight: float, normalizer: float) -> Arrays:
        ints = he_secret(self.params).decrypt(unframe(path.read_bytes()), manifest.numel)
        return unflat(manifest, self.q.decode(ints) * (normalizer / total_weight))

    def assert_close(self, got: Arrays, want: Arrays) -> None:
        _assert_same_layout(got, want)
        err = max(float(np.max(np.abs(got[k] - want[k]), initial=0.0)) for k in want)
        scale = max(float(np.max(np.abs(want[k]), initial=0.0)) for k in want)
        assert err <= 1e-4 * scale, f"max |error| {err:.3g} > 1e-4 * max |mean| ({scale:.3g})"

    def poisons(self) -> list[Poison]:
        n = self.params.n_chunks(MANIFEST.numel)
        assert n == 1
        valid = self.blobs(MANIFEST, make_update(2), 1.0, 2.0)
        limit = self.params.bytes_estimate(self.params.slots, aggregate=True)
        garbage = np.random.default_rng(7).bytes(len(valid[0]))
        other_t = SecretContext.generate(_other_t_params()).encrypt(np.arange(MANIFEST.numel))
        other_n = SecretContext.generate(_other_n_params()).encrypt(np.arange(MANIFEST.numel))

        def put(data: bytes) -> Callable[[Path], None]:
            return lambda p: p.write_bytes(data)

        return [
            Poison("garbage", put(frame([garbage])), "ciphertext 1: .*does not deserialize"),
            Poison("other-plain-modulus", put(frame(other_t)), "made with other (HE )?parameters"),
            Poison("other-degree", put(frame(other_n)), "made with other (HE )?parameters"),
            Poison("too-few", put(b""), f"0 ciphertexts in the upload; the shared tensors need {n}"),
            Poison("too-many", put(frame(valid * 2)), f"more than the {n} ciphertexts"),
            Poison("truncated", put(frame(valid)[:-4]), "truncated inside a ciphertext"),
            Poison("truncated-prefix", put(frame(valid) + b"\x01\x00"), "truncated inside a length prefix"),
            Poison("empty-blob", put(struct.pack("<I", 0)),
                   rf"ciphertext of 0 bytes in the payload; expected 1\.\.{limit}"),
            Poison("oversized-blob", put(struct.pack("<I", limit + 1) + b"\0" * 8),
                   rf"ciphertext of {limit + 1} bytes in the payload"),
        ]


CODECS: list[Codec] = [PlainCodec(), HeCodec()]
IDS = [c.id for c in CODECS]


@pytest.fixture(params=CODECS, ids=IDS)
def codec(request: pytest.FixtureRequest) -> Codec:
    return request.param


def aggregate(codec: Codec, agg: Aggregator, folder: Path, updates: Sequence[Update],
              normalizer: float | None = None) -> Arrays:
    """Resets, validates and adds every update, writes the result, reads it back.

    ``normalizer`` is the round's public weight normalizer (default: the updates' total weight).
    """
    total = sum(w for w, _ in updates)
    normalizer = total if normalizer is None else normalizer
    agg.reset()
    for i, (w, arrays) in enumerate(updates):
        p = codec.write(folder / f"upload-{i}.bin", agg.manifest, arrays, w, normalizer)
        agg.validate(p)
        agg.add(p, w)
    return result(codec, agg, folder, total, normalizer)


def result(codec: Codec, agg: Aggregator, folder: Path, total_weight: float, normalizer: float,
           name: str = "result.bin") -> Arrays:
    out = folder / name
    manifest = agg.write_result(out, total_weight)
    assert manifest == agg.manifest
    return codec.read(manifest, out, total_weight, normalizer)


# -- weighted mean ----------------------------------------------------------------------------

Case = tuple[Manifest, list[Update], int | None]


@st.composite
def rounds(draw: st.DrawFn, codec: Codec) -> Case:
    """A manifest of 1..3 float tensors, the enrolled silos' updates, and maybe one missing silo.

    Shapes, silo count, weights, value scale and the missing silo come from Hypothesis; the
    values themselves from a drawn seed (drawing up to 50 x 3 arrays element by element is
    too slow). The first value of every update is an anchor in [scale/2, scale], so the
    mean is not degenerate (the HE bound is relative to max |mean|).
    """
    n_tensors = draw(st.integers(1, 3))
    arrays = {}
    for i in range(n_tensors):
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4))
        arrays[f"t{i}"] = np.zeros(shape, dtype)
    manifest = Manifest.of_arrays(arrays)
    n = draw(st.integers(codec.min_silos, codec.max_silos))
    weights = draw(st.lists(codec.weights, min_size=n, max_size=n))
    missing = draw(st.none() | st.integers(0, n - 1)) if n >= 2 else None
    scale = draw(st.sampled_from(codec.value_scales))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    updates = []
    for w in weights:
        u = {t.name: rng.uniform(-scale, scale, size=t.shape).astype(t.dtype.numpy) for t in manifest.tensors}
        first = manifest.tensors[0].name
        u[first].reshape(-1)[0] = rng.uniform(scale / 2, scale)
        updates.append((w, u))
    return manifest, updates, missing


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_result_is_the_weighted_mean_of_the_silos_present(codec: Codec) -> None:
    @settings(max_examples=codec.max_examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=rounds(codec))
    def check(case: Case) -> None:
        manifest, enrolled, missing = case
        normalizer = sum(w for w, _ in enrolled)  # public, over every enrolled silo
        present = [u for i, u in enumerate(enrolled) if i != missing]
        with tempfile.TemporaryDirectory() as d:
            got = aggregate(codec, codec.make(manifest), Path(d), present, normalizer)
        codec.assert_close(got, weighted_mean(present))

    check()


def test_reset_starts_an_empty_sum(codec: Codec, tmp_path: Path) -> None:
    agg = codec.make(MANIFEST)
    aggregate(codec, agg, tmp_path, [(5.0, make_update(1)), (1.0, make_update(2))])
    fresh = [(2.0, make_update(3))]
    codec.assert_close(aggregate(codec, agg, tmp_path, fresh), weighted_mean(fresh))


def test_dropped_silo_is_simply_not_in_the_sum(codec: Codec, tmp_path: Path) -> None:
    everyone = [(10.0, make_update(1)), (30.0, make_update(2)), (60.0, make_update(3))]
    present = [everyone[0], everyone[2]]  # the second silo never uploaded
    # The normalizer was announced for all three; the result is still the mean of the two.
    got = aggregate(codec, codec.make(MANIFEST), tmp_path, present, normalizer=100.0)
    codec.assert_close(got, weighted_mean(present))
    all_three = weighted_mean(everyone)
    assert not np.allclose(got["enc.weight"], all_three["enc.weight"], rtol=1e-3), "the absent silo leaked in"


# -- validate ---------------------------------------------------------------------------------

POISONS = [(c, p) for c in CODECS for p in c.poisons()]


@pytest.mark.parametrize("codec, poison", POISONS, ids=[f"{c.id}-{p.id}" for c, p in POISONS])
def test_validate_refuses_an_unusable_payload_and_changes_nothing(codec: Codec, poison: Poison,
                                                                   tmp_path: Path) -> None:
    agg = codec.make(MANIFEST)
    good = (4.0, make_update(1))
    agg.reset()
    first = codec.write(tmp_path / "good.bin", MANIFEST, good[1], good[0], good[0])
    agg.validate(first)
    agg.add(first, good[0])
    agg.save(tmp_path / "before.sum")

    path = tmp_path / "poisoned.bin"
    poison.write(path)
    with pytest.raises(InvalidArgument, match=poison.match):
        agg.validate(path)

    agg.save(tmp_path / "after.sum")
    assert (tmp_path / "after.sum").read_bytes() == (tmp_path / "before.sum").read_bytes()
    codec.assert_close(result(codec, agg, tmp_path, good[0], good[0]), weighted_mean([good]))


@pytest.mark.parametrize("codec, poison", POISONS, ids=[f"{c.id}-{p.id}" for c, p in POISONS])
def test_add_refusing_a_payload_changes_nothing(codec: Codec, poison: Poison, tmp_path: Path) -> None:
    """``add`` may refuse (``InvalidArgument``) what reaches it unvalidated; the sum is then as before."""
    agg = codec.make(MANIFEST)
    good = (4.0, make_update(1))
    agg.reset()
    agg.add(codec.write(tmp_path / "good.bin", MANIFEST, good[1], good[0], good[0]), good[0])
    agg.save(tmp_path / "before.sum")

    path = tmp_path / "poisoned.bin"
    poison.write(path)
    with pytest.raises(InvalidArgument):
        agg.add(path, good[0])

    agg.save(tmp_path / "after.sum")
    assert (tmp_path / "after.sum").read_bytes() == (tmp_path / "before.sum").read_bytes()
    codec.assert_close(result(codec, agg, tmp_path, good[0], good[0]), weighted_mean([good]))


# -- save / load --------------------------------------------------------------------------------


def test_save_load_round_trips_the_running_sum_exactly(codec: Codec, tmp_path: Path) -> None:
    updates = [(float(w), make_update(i)) for i, w in enumerate([3, 1e9, 0.125, 77], start=1)]
    total = sum(w for w, _ in updates)
    original = codec.make(MANIFEST)
    original.reset()
    for i, (w, arrays) in enumerate(updates[:2]):
        original.add(codec.write(tmp_path / f"u{i}.bin", MANIFEST, arrays, w, total), w)
    original.save(tmp_path / "state.sum")

    restored = codec.make(MANIFEST)
    restored.reset()
    noise = codec.write(tmp_path / "noise.bin", MANIFEST, make_update(99), 5.0, total)
    restored.add(noise, 5.0)  # load must replace, not add
    restored.load(tmp_path / "state.sum")
    restored.save(tmp_path / "again.sum")
    assert (tmp_path / "again.sum").read_bytes() == (tmp_path / "state.sum").read_bytes()
    assert not list(tmp_path.glob("*.tmp")), "save must not leave temporary files behind"

    # Continuing after the restore gives bit-identical results to never having stopped.
    for i, (w, arrays) in enumerate(updates[2:], start=2):
        p = codec.write(tmp_path / f"u{i}.bin", MANIFEST, arrays, w, total)
        original.add(p, w)
        restored.add(p, w)
    original.write_result(tmp_path / "a.bin", total)
    restored.write_result(tmp_path / "b.bin", total)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    codec.assert_close(codec.read(MANIFEST, tmp_path / "b.bin", total, total), weighted_mean(updates))


# -- plain only: dtypes and exact messages --------------------------------------------------------

PLAIN = CODECS[0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=rounds(PLAIN))
def test_plain_result_keeps_each_tensors_dtype(case: Case) -> None:
    manifest, updates, _ = case
    with tempfile.TemporaryDirectory() as d:
        got = aggregate(PLAIN, PlainAggregator(manifest), Path(d), updates)
    for t in manifest.tensors:
        assert got[t.name].dtype == t.dtype.numpy
    PLAIN.assert_close(got, weighted_mean(updates))


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")], ids=["nan", "inf", "-inf"])
def test_plain_validate_names_the_tensor_with_non_finite_values(tmp_path: Path, bad: float, word: str) -> None:
    poisoned = make_update(2)
    poisoned["enc.bias"][3] = bad
    path = PLAIN.write(tmp_path / "poisoned.bin", MANIFEST, poisoned, 1.0, 1.0)
    with pytest.raises(InvalidArgument, match=f"^tensor 'enc.bias' contains {word}$"):
        PlainAggregator(MANIFEST).validate(path)


# float64 tensors: finite uploads whose weighted sum exceeds float64 (max ~1.8e308).
WIDE = Manifest.of_arrays({"enc.weight": np.zeros(4, np.float64), "head.bias": np.zeros(3, np.float64)})


def saved_sum(agg: Aggregator, folder: Path) -> bytes:
    """The running sum as ``save`` writes it (little-endian float64)."""
    agg.save(folder / "probe.sum")
    return (folder / "probe.sum").read_bytes()


def test_plain_add_refuses_an_upload_that_would_overflow_the_sum_naming_the_tensor(tmp_path: Path) -> None:
    agg = PlainAggregator(WIDE)
    agg.reset()
    first = {"enc.weight": np.full(4, 1e299), "head.bias": np.array([1e299, -2.0, 3.0])}
    agg.add(PLAIN.write(tmp_path / "first.bin", WIDE, first, 1.0, 1.0), 1.0)
    before = saved_sum(agg, tmp_path)
    # Every value finite, and enc.weight (read first) would fit: head.bias[0] alone overflows.
    big = {"enc.weight": np.full(4, 1.0), "head.bias": np.array([1e300, 0.0, 0.0])}
    path = PLAIN.write(tmp_path / "big.bin", WIDE, big, 1e9, 1e9)
    agg.validate(path)  # the payload itself is fine
    with pytest.raises(InvalidArgument,
                       match=r"^tensor 'head\.bias': adding this upload with weight 1e\+09 would overflow the "
                             r"running sum$"):
        agg.add(path, 1e9)
    assert saved_sum(agg, tmp_path) == before  # enc.weight was not added either
    # A negative overflow is refused the same way; a fitting upload is still added.
    with pytest.raises(InvalidArgument, match="would overflow the running sum"):
        agg.add(PLAIN.write(tmp_path / "neg.bin", WIDE, {k: -v for k, v in big.items()}, 1e9, 1e9), 1e9)
    assert saved_sum(agg, tmp_path) == before
    agg.add(PLAIN.write(tmp_path / "small.bin", WIDE, big, 1.0, 1.0), 1.0)
    agg.write_result(tmp_path / "r.bin", 2.0)
    got = arrays_from_payload(WIDE, (tmp_path / "r.bin").read_bytes())
    np.testing.assert_array_equal(got["enc.weight"], np.full(4, 5e298))  # (1e299 + 1) / 2 in float64
    np.testing.assert_array_equal(got["head.bias"], np.array([5.5e299, -1.0, 1.5]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(uploads=st.lists(
    st.tuples(st.floats(1e-3, 1e9, allow_nan=False, allow_infinity=False),
              hnp.arrays(np.float64, WIDE.numel, elements=st.floats(allow_nan=False, allow_infinity=False))),
    min_size=1, max_size=6))
def test_plain_add_either_keeps_the_sum_finite_or_changes_nothing(uploads: list[tuple[float, np.ndarray]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        agg = PlainAggregator(WIDE)
        agg.reset()
        for i, (w, values) in enumerate(uploads):
            before = saved_sum(agg, folder)
            path = folder / f"u{i}.bin"
            path.write_bytes(values.astype("<f8").tobytes())
            agg.validate(path)
            with np.errstate(over="ignore", invalid="ignore"):
                want = np.frombuffer(before, "<f8") + w * values
            try:
                agg.add(path, w)
            except InvalidArgument as exc:
                assert "would overflow the running sum" in str(exc)
                assert not np.isfinite(want).all()
                assert saved_sum(agg, folder) == before  # bit for bit
            else:
                after = np.frombuffer(saved_sum(agg, folder), "<f8")
                assert np.isfinite(after).all()
                np.testing.assert_array_equal(after, want)


def test_plain_write_result_refuses_a_mean_that_is_not_finite_in_its_dtype(tmp_path: Path) -> None:
    """Finite float32 uploads summed in float64 fit; divided by less than their weight they would not."""
    agg = PlainAggregator(MANIFEST)
    agg.reset()
    big = {k: np.full(a.shape, 3e38, np.float32) for k, a in make_update(1).items()}
    agg.add(PLAIN.write(tmp_path / "u.bin", MANIFEST, big, 1e9, 1e9), 1e9)
    with pytest.raises(ValueError, match=r"^tensor 'enc\.weight': the weighted mean is not finite in FLOAT32$"):
        agg.write_result(tmp_path / "r.bin", 1.0)
    assert list(tmp_path.iterdir()) == [tmp_path / "u.bin"]  # nothing written, not even a temporary file
    agg.write_result(tmp_path / "r.bin", 1e9)
    got = arrays_from_payload(MANIFEST, (tmp_path / "r.bin").read_bytes())
    assert all(np.array_equal(got[k], big[k]) for k in big)


# -- HE only: several ciphertexts per update, no key on the coordinator's side --------------------

HE = CODECS[1]
assert isinstance(HE, HeCodec)
# 4480 + 5000 + 3 = 9483 values: three ciphertexts, the chunk boundaries fall inside tensors.
BIG = Manifest.of_arrays({"a": np.zeros((70, 64), np.float32), "b": np.zeros(5000, np.float32),
                          "c": np.zeros(3, np.float64)})


def test_he_update_spanning_several_ciphertexts(tmp_path: Path) -> None:
    assert HE.params.n_chunks(BIG.numel) == 3
    updates = [(float(w), make_update(i, BIG)) for i, w in enumerate([7, 1, 12], start=1)]
    agg = HE.make(BIG)
    HE.assert_close(aggregate(HE, agg, tmp_path, updates, normalizer=25.0), weighted_mean(updates))
    blobs = unframe((tmp_path / "result.bin").read_bytes())
    assert len(blobs) == 3

    one = HE.blobs(BIG, make_update(9, BIG), 1.0, 25.0)
    for bad, match in [(one[:2], "2 ciphertexts in the upload; the shared tensors need 3"),
                       (one + one[:1], "more than the 3 ciphertexts"),
                       ([one[0], b"\x00" * 100, one[2]], "ciphertext 2: .*does not deserialize")]:
        p = tmp_path / "bad.bin"
        p.write_bytes(frame(bad))
        with pytest.raises(InvalidArgument, match=match):
            agg.validate(p)


def test_he_add_ignores_the_weight_argument(tmp_path: Path) -> None:
    p = HE.write(tmp_path / "u.bin", MANIFEST, make_update(1), 2.0, 10.0)
    outs = []
    for i, weight in enumerate([2.0, 1e9]):
        agg = HE.make(MANIFEST)
        agg.reset()
        agg.add(p, weight)
        agg.write_result(tmp_path / f"r{i}.bin", weight)
        outs.append((tmp_path / f"r{i}.bin").read_bytes())
    assert outs[0] == outs[1]


def test_he_aggregator_holds_no_key() -> None:
    agg = HE.make(MANIFEST)
    assert isinstance(agg, HeAggregator)
    assert type(agg.context) is PublicContext and agg.context.has_secret_key is False
    assert not hasattr(agg.context, "secret_key_bytes") and not hasattr(agg.context, "decrypt")
