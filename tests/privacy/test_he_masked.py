"""Masked HE aggregation: decrypt(Σ Enc(w·m⊙u)) ÷ decrypt(Σ Enc(w·m)) is the per-element weighted mean."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.privacy.he import (
    FixedPoint,
    HeParams,
    PublicContext,
    SecretContext,
    decrypt_masked_mean,
    encrypt_masked_update,
)

PARAMS = HeParams()
CTX = SecretContext.generate(PARAMS)
CODEC = FixedPoint(params=PARAMS)
COORD = PublicContext(PARAMS)


def coordinator_sum(uploads: list[list[bytes]]) -> list[bytes]:
    """What the coordinator does: add ciphertexts position by position, holding no key."""
    return [COORD.dump(COORD.sum(parts)) for parts in zip(*uploads, strict=True)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 6000), silos=st.integers(3, 50), seed=st.integers(0, 2**32 - 1),
       missing=st.integers(0, 2))
def test_masked_mean_matches_plaintext(n: int, silos: int, seed: int, missing: int) -> None:
    rng = np.random.default_rng(seed)
    examples = rng.integers(1, 1000, size=silos).astype(float)
    normalizer = examples.sum()
    updates = rng.normal(0, 0.05, size=(silos, n))
    masks = (rng.random((silos, n)) < 0.7).astype(float)
    masks[:, : max(1, n // 10)] = 0.0  # all-zero columns: nobody shares these elements
    present = list(range(silos - missing))  # the last `missing` silos dropped out
    nums, dens = [], []
    for i in present:
        w = examples[i] / normalizer
        num, den, clipped = encrypt_masked_update(CTX, CODEC, w * updates[i], w * masks[i], rng)
        assert clipped == 0
        nums.append(num)
        dens.append(den)
    mean, shared = decrypt_masked_mean(CTX, CODEC, coordinator_sum(nums), coordinator_sum(dens), n)
    w = examples[present, None] * masks[present]
    den = w.sum(axis=0)
    want_shared = den > 0
    np.testing.assert_array_equal(shared, want_shared)
    assert np.isnan(mean[~shared]).all()
    want = (w * updates[present]).sum(axis=0)[want_shared] / den[want_shared]
    if want.size:
        err = np.abs(mean[shared] - want).max()
        assert err <= 1e-4 * np.abs(want).max() + 1e-12


def test_mask_stays_encrypted_and_shapes_are_checked() -> None:
    rng = np.random.default_rng(0)
    num, den, _ = encrypt_masked_update(CTX, CODEC, np.ones(10) * 0.1, np.array([0.5] * 5 + [0.0] * 5), rng)
    assert len(num) == len(den) == 1 and all(isinstance(b, bytes) for b in num + den)
    with pytest.raises(ValueError, match="weight mask"):
        encrypt_masked_update(CTX, CODEC, np.ones(3), np.ones(4), rng)
    with pytest.raises(ValueError, match=">= 0"):
        encrypt_masked_update(CTX, CODEC, np.ones(3), -np.ones(3), rng)
