"""Masked sharing (pFL-ResFIM): the upload layout, the per-element shared mean and the consensus, in
plaintext (known answers, Hypothesis) and through real BFV ciphertexts summed by the coordinator's
``HeAggregator`` (which holds no key)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.coordinator.aggregation.he import HeAggregator
from fedsilo.core.phases import MASK_SUFFIXES, masked_manifest
from fedsilo.core.tensors import Manifest
from fedsilo.privacy.he import FixedPoint, HeParams, SecretContext
from fedsilo.silo_agent.masked import (
    MASKED_SETS,
    apply_shared_mean,
    consensus,
    masked_upload,
    split_sums,
)

NAMES = ["conv.weight", "conv.bias"]


def _silo(values: list[np.ndarray], masks: list[np.ndarray]) -> tuple[dict, dict]:
    return dict(zip(NAMES, values)), dict(zip(NAMES, masks))


def test_known_answer_two_silos() -> None:
    """Silo a keeps element 1 of the weight local, silo b keeps element 2; nobody shares the bias's element 0."""
    a_vals, a_mask = _silo([np.array([1.0, 2.0, 3.0], np.float32), np.array([10.0, 20.0], np.float32)],
                           [np.array([False, True, False]), np.array([True, False])])
    b_vals, b_mask = _silo([np.array([5.0, 6.0, 7.0], np.float32), np.array([30.0, 40.0], np.float32)],
                           [np.array([False, False, True]), np.array([True, False])])
    wa, wb = 0.25, 0.75
    total = masked_upload(a_vals, a_mask, NAMES, wa) + masked_upload(b_vals, b_mask, NAMES, wb)
    assert total.size == MASKED_SETS * 5
    sums = split_sums(total, [("conv.weight", 3), ("conv.bias", 2)])
    np.testing.assert_allclose(sums.denominator["conv.weight"], [1.0, 0.75, 0.25])
    np.testing.assert_allclose(sums.denominator["conv.bias"], [0.0, 1.0])
    a_new = apply_shared_mean(a_vals, a_mask, sums)
    b_new = apply_shared_mean(b_vals, b_mask, sums)
    # element 0: both share -> 0.25*1 + 0.75*5 = 4; element 1: only b shares -> b's 6 (a keeps 2);
    # element 2: only a shares -> a's 3 (b keeps 7); bias 0: nobody shares -> each keeps its own
    np.testing.assert_allclose(a_new["conv.weight"], [4.0, 2.0, 3.0])
    np.testing.assert_allclose(b_new["conv.weight"], [4.0, 6.0, 7.0])
    np.testing.assert_allclose(a_new["conv.bias"], [10.0, 0.25 * 20 + 0.75 * 40])
    np.testing.assert_allclose(b_new["conv.bias"], [30.0, 35.0])
    assert a_new["conv.weight"].dtype == np.float32 and a_new["conv.weight"].shape == (3,)
    # consensus = weighted mean of the personalised models after the round
    cons = consensus(sums, wa + wb, a_vals)
    np.testing.assert_allclose(cons["conv.weight"], wa * a_new["conv.weight"] + wb * b_new["conv.weight"])
    np.testing.assert_allclose(cons["conv.bias"], wa * a_new["conv.bias"] + wb * b_new["conv.bias"])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), silos=st.integers(1, 6), n=st.integers(1, 40))
def test_apply_is_the_per_element_masked_mean_and_keeps_local_elements(seed: int, silos: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    vals = rng.normal(size=(silos, n))
    local = rng.random((silos, n)) < 0.4
    local[:, 0] = True  # an element nobody shares
    w = rng.uniform(0.1, 2.0, size=silos)
    total = sum(masked_upload({"t": vals[i]}, {"t": local[i]}, ["t"], float(w[i])) for i in range(silos))
    sums = split_sums(total, [("t", n)])
    share_w = w[:, None] * ~local
    den = share_w.sum(axis=0)
    for i in range(silos):
        got = apply_shared_mean({"t": vals[i]}, {"t": local[i]}, sums)["t"]
        np.testing.assert_array_equal(got[local[i]], vals[i][local[i]])  # local elements untouched, exactly
        take = ~local[i]
        np.testing.assert_allclose(got[take], (share_w * vals).sum(axis=0)[take] / den[take], rtol=1e-12)
    cons = consensus(sums, float(w.sum()), {"t": vals[0]})["t"]
    np.testing.assert_allclose(cons, (w[:, None] * vals).sum(axis=0) / w.sum(), rtol=1e-10, atol=1e-12)


def test_bad_inputs_are_refused() -> None:
    v, m = {"t": np.zeros(4)}, {"t": np.zeros(4, bool)}
    with pytest.raises(ValueError, match="weight"):
        masked_upload(v, m, ["t"], 0.0)
    with pytest.raises(ValueError, match="boolean"):
        masked_upload(v, {"t": np.zeros(4)}, ["t"], 1.0)
    with pytest.raises(ValueError, match="3 elements"):
        masked_upload(v, {"t": np.zeros(3, bool)}, ["t"], 1.0)
    with pytest.raises(ValueError, match="NaN"):
        masked_upload({"t": np.array([0, np.nan, 0, 0])}, m, ["t"], 1.0)
    with pytest.raises(ValueError, match="no mask"):
        masked_upload(v, {}, ["t"], 1.0)
    with pytest.raises(ValueError, match="expected 3 x 4"):
        split_sums(np.zeros(11), [("t", 4)])


def test_masked_manifest_layout() -> None:
    base = Manifest.of_arrays({"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)})
    m = masked_manifest(base)
    assert [t.name for t in m.tensors] == ["a", "b"] + [f"{n}{s}" for s in MASK_SUFFIXES for n in ("a", "b")]
    assert m.numel == MASKED_SETS * base.numel


# -- real BFV ciphertexts, summed by the coordinator's aggregator ---------------------------------------

PARAMS = HeParams(bound=8.0)
CTX = SecretContext.generate(PARAMS)
CODEC = FixedPoint(params=PARAMS)


def _frame(blobs: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


def _unframe(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                               HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_masked_he_aggregation_equals_plaintext_masked_mean(tmp_path: Path, seed: int) -> None:
    """Three silos, parameter values up to ±4, masks with ρ ≈ 0.3 local plus columns nobody shares:
    decrypting the coordinator's sum of ciphertexts and dividing gives the plaintext masked weighted
    mean within the codec's error bound (per silo ≤ 1/scale on each of numerator and denominator)."""
    rng = np.random.default_rng(seed)
    shapes = {"w": (40, 50), "b": (37,)}
    base = Manifest.of_arrays({k: np.zeros(s, np.float32) for k, s in shapes.items()})
    layout = masked_manifest(base)
    examples = rng.integers(10, 500, size=3).astype(float)
    normalizer = examples.sum()
    agg = HeAggregator(layout, PARAMS)
    agg.reset()
    silos = []
    for i in range(3):
        vals = {k: rng.uniform(-4, 4, size=s).astype(np.float32) for k, s in shapes.items()}
        local = {k: rng.random(s) < 0.3 for k, s in shapes.items()}
        local["w"][:, :3] = True  # columns nobody shares
        silos.append((vals, local))
        flat = masked_upload(vals, local, list(shapes), examples[i] / normalizer)
        blobs, clipped = CTX.encrypt(CODEC.encode(flat, rng)[0]), 0
        assert clipped == 0
        path = tmp_path / f"{seed}-{i}.bin"
        path.write_bytes(_frame(blobs))
        agg.validate(path)
        agg.add(path, examples[i])
    out = tmp_path / f"{seed}-sum.bin"
    agg.write_result(out, examples.sum())
    decrypted = CODEC.decode(CTX.decrypt(_unframe(out.read_bytes()), layout.numel))
    sums = split_sums(decrypted, [(t.name, t.numel) for t in base.tensors])
    err_bound = 3 * 2 / CODEC.scale  # three silos' rounding, numerator and denominator
    for i, (vals, local) in enumerate(silos):
        got = apply_shared_mean(vals, local, sums)
        for k in shapes:
            share_w = np.stack([examples[j] * ~silos[j][1][k] for j in range(3)])
            num = (share_w * np.stack([silos[j][0][k].astype(np.float64) for j in range(3)])).sum(axis=0)
            den = share_w.sum(axis=0)
            np.testing.assert_array_equal(got[k][local[k]], vals[k][local[k]])
            take = ~local[k]
            want = num[take] / den[take]
            assert np.all(den[take] > 0)
            # relative error of a ratio whose denominator is at least the smallest weight share
            tol = err_bound * (1 + np.abs(want)) * normalizer / den[take] + 1e-6 * np.abs(want)
            assert np.all(np.abs(got[k][take] - want) <= tol)
        # the columns nobody shares keep every silo's own value exactly
        np.testing.assert_array_equal(got["w"][:, :3], vals["w"][:, :3])


def test_rounds_without_the_local_part() -> None:
    """Rounds that do not make the final consensus upload two sets; their sums give the same shared
    means, and asking them for a consensus is refused."""
    from fedsilo.core.phases import shared_numel
    from fedsilo.core.methods import get_method

    vals, mask = {"t": np.array([1.0, 2.0, 3.0])}, {"t": np.array([False, True, False])}
    full = masked_upload(vals, mask, ["t"], 0.5)
    short = masked_upload(vals, mask, ["t"], 0.5, local_part=False)
    np.testing.assert_array_equal(short, full[:6])
    a = apply_shared_mean(vals, mask, split_sums(full, [("t", 3)]))
    b = apply_shared_mean(vals, mask, split_sums(short, [("t", 3)], local_part=False))
    np.testing.assert_array_equal(a["t"], b["t"])
    with pytest.raises(ValueError, match="no local parts"):
        consensus(split_sums(short, [("t", 3)], local_part=False), 0.5, vals)
    with pytest.raises(ValueError, match="expected 2 x 3"):
        split_sums(full, [("t", 3)], local_part=False)
    assert [r for r in range(1, 6) if get_method("resfim").carries_local_part(r, 5)] == [5]
    assert [r for r in range(1, 7) if get_method("deer+resfim").carries_local_part(r, 6)] == [5, 6]
    base = Manifest.of_arrays({"a": np.zeros((2, 3), np.float32)})
    assert masked_manifest(base, local_part=False).numel == 2 * base.numel
    assert shared_numel(masked_manifest(base)) == shared_numel(masked_manifest(base, local_part=False)) == 6
