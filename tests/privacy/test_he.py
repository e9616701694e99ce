"""Tests for BFV aggregation (privacy/he.py): exact sums, codec error, parameters, key hygiene."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tenseal.sealapi as seal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.privacy import he
from fedsilo.privacy.he import FixedPoint, HeError, HeParams, HeScheme, PublicContext, SecretContext

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _secret(params: HeParams = HeParams()) -> SecretContext:
    return SecretContext.generate(params)


@functools.cache
def _public(params: HeParams = HeParams()) -> PublicContext:
    return PublicContext(params)


def _other_params() -> HeParams:
    """Same N and coefficient modulus, another batching plain modulus (40 bits)."""
    return HeParams(plain_modulus=seal.PlainModulus.Batching(4096, 40).value())


def _aggregate(public: PublicContext, uploads: list[list[bytes]]) -> list[bytes]:
    """The coordinator's side: add chunk i of every upload, serialize the sums."""
    sums: list = [None] * len(uploads[0])
    for blobs in uploads:
        assert len(blobs) == len(sums)
        for i, blob in enumerate(blobs):
            sums[i] = public.add(sums[i], public.load(blob))
    return [public.dump(s) for s in sums]


# ---------------------------------------------------------------------------------------
# The whole path: weighted mean through encryption


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 45), min_size=1, max_size=3).filter(
        lambda s: 16 <= math.prod(s) <= 9000
    ),
    n_silos=st.integers(3, 50),
    seed=st.integers(0, 2**32 - 1),
    spread=st.sampled_from([1e-3, 1e-2, 1e-1]),
    drop=st.integers(0, 2),
)
def test_decrypted_weighted_mean_matches_float64(
    shape: list[int], n_silos: int, seed: int, spread: float, drop: int
) -> None:
    rng = np.random.default_rng(seed)
    secret, public = _secret(), _public()
    q = FixedPoint(params=secret.params)
    n = math.prod(shape)
    raw = rng.random(n_silos) + 0.05  # e.g. dataset sizes
    weights = raw / raw.sum()  # normalized over all enrolled silos: sum <= 1 per round
    updates = [np.clip(rng.normal(0.0, spread, shape), -1, 1) for _ in range(n_silos)]
    in_round = sorted(rng.choice(n_silos, size=n_silos - drop, replace=False))

    uploads = []
    for i in in_round:
        blobs, clipped = he.encrypt_update(secret, q, weights[i] * updates[i], rng)
        assert clipped == 0
        uploads.append(blobs)
    total = float(weights[in_round].sum())
    mean = he.decrypt_mean(secret, q, _aggregate(public, uploads), n, total)

    exact = sum(weights[i] * updates[i] for i in in_round).ravel() / total
    err = float(np.max(np.abs(mean - exact)))
    # Deterministic: each contributor's stochastic rounding is off by < 1/scale.
    assert err <= len(in_round) / q.scale / total
    # The target: max |error| <= 1e-4 * max |plaintext mean|.
    assert err <= 1e-4 * float(np.max(np.abs(exact)))


def test_a_silo_missing_from_the_sum_is_divided_out() -> None:
    rng = np.random.default_rng(7)
    secret, public = _secret(), _public()
    q = FixedPoint(params=secret.params)
    n = 5000
    weights = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    updates = [rng.normal(0.0, 0.01, n) for _ in weights]
    present = [0, 1, 3, 4]  # silo 2 dropped out of the round
    uploads = [he.encrypt_update(secret, q, weights[i] * updates[i], rng)[0] for i in present]
    aggregate = _aggregate(public, uploads)
    total = float(weights[present].sum())
    mean = he.decrypt_mean(secret, q, aggregate, n, total)
    exact = sum(weights[i] * updates[i] for i in present) / total
    assert np.max(np.abs(mean - exact)) <= 1e-6 * np.max(np.abs(exact))
    # Dividing by every enrolled silo's weight instead would be visibly wrong.
    wrong = he.decrypt_mean(secret, q, aggregate, n, float(weights.sum()))
    assert np.max(np.abs(wrong - exact)) > 0.1 * np.max(np.abs(exact))


# ---------------------------------------------------------------------------------------
# Fixed point: headroom and rounding


def test_max_silos_values_at_the_bound_do_not_wrap() -> None:
    params = HeParams(max_silos=64, bound=0.5)
    secret, public = _secret(params), _public(params)
    q = FixedPoint(params=params)
    values = np.array([0.5, -0.5, 0.5, -0.5, 3.0, -7.0, 0.25, 0.0])  # 3.0, -7.0 get clipped
    expected = np.clip(values, -0.5, 0.5) * params.max_silos
    rng = np.random.default_rng(0)
    uploads = []
    for _ in range(params.max_silos):
        ints, clipped = q.encode(values, rng)
        assert clipped == 2
        assert np.max(np.abs(ints)) <= q.cap
        uploads.append(secret.encrypt(ints))
    aggregate = _aggregate(public, uploads)
    assert secret.noise_budget(aggregate[0]) > 0
    total = q.decode(secret.decrypt(aggregate, values.size))
    np.testing.assert_allclose(total, expected, rtol=0, atol=params.max_silos / q.scale)
    # The scale uses all the headroom: one contribution more at +bound does wrap.
    h = (params.plain_modulus - 1) // 2
    one = int(q.encode(np.array([0.5]), rng)[0][0])
    assert params.max_silos * q.cap <= h < (params.max_silos + 1) * one


def test_sum_of_max_silos_fresh_ciphertexts_decrypts_exactly_at_full_range() -> None:
    secret, public = _secret(), _public()
    h = (secret.params.plain_modulus - 1) // 2
    rng = np.random.default_rng(1)
    n = 4096 + 100
    k = secret.params.max_silos
    cap = h // k
    parts = [rng.integers(-cap, cap + 1, n) for _ in range(k)]
    parts[0][:2] = cap  # exercise the extremes
    parts[1][:2] = cap
    aggregate = _aggregate(public, [secret.encrypt(p) for p in parts])
    assert min(secret.noise_budget(b) for b in aggregate) >= 3
    np.testing.assert_array_equal(secret.decrypt(aggregate, n), np.sum(parts, axis=0))


def test_spent_noise_budget_is_refused_not_decrypted_to_garbage() -> None:
    secret, public = _secret(), _public()
    ct = public.load(secret.encrypt(np.arange(10))[0])
    for _ in range(16):  # doubling: one bit of noise budget per step
        ct = public.add(ct, public.load(public.dump(ct)))
    blob = public.dump(ct)
    assert secret.noise_budget(blob) == 0
    with pytest.raises(HeError, match="noise budget"):
        secret.decrypt([blob], 10)


@SETTINGS
@given(v=st.floats(-1.0, 1.0, allow_nan=False), seed=st.integers(0, 2**32 - 1))
def test_stochastic_rounding_is_unbiased(v: float, seed: int) -> None:
    # A coarse scale makes a rounding bias visible; t and max_silos set the scale.
    params = HeParams(max_silos=64, bound=2.0**20)  # scale = (cap - 1) / 2^20, about 2^16
    q = FixedPoint(params=params)
    n = 200_000
    ints, clipped = q.encode(np.full(n, v), np.random.default_rng(seed))
    assert clipped == 0
    y = v * q.scale
    assert set(np.unique(ints)) <= {math.floor(y), math.ceil(y)}
    # Mean of n draws of {floor, floor + 1}: std <= 0.5 / sqrt(n); 5 sigma.
    assert abs(ints.mean() - y) <= 5 * 0.5 / math.sqrt(n)


def test_round_to_nearest_would_fail_the_unbiasedness_check() -> None:
    q = FixedPoint(params=HeParams(bound=2.0**20))
    y = 0.3 + math.floor(0.01 * q.scale)
    assert abs(np.round(np.full(1000, y)).mean() - y) > 5 * 0.5 / math.sqrt(200_000)


def test_fixed_point_refuses_nan_and_bad_bounds() -> None:
    q = FixedPoint(params=HeParams())
    with pytest.raises(ValueError, match="NaN or infinite"):
        q.encode(np.array([0.0, np.nan, np.inf]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="bound"):
        FixedPoint(params=HeParams(), bound=0.0)
    with pytest.raises(ValueError, match="params"):
        FixedPoint(params=HeParams.flare_default())
    mask = FixedPoint(params=HeParams(bound=0.01), bound=1.0)
    assert mask.bound == 1.0 and mask.scale < FixedPoint(params=HeParams(bound=0.01)).scale


# ---------------------------------------------------------------------------------------
# Ciphertexts the coordinator must refuse, leaving its sum untouched


def test_bad_blobs_are_refused_and_the_sum_is_untouched() -> None:
    secret, public = _secret(), _public()
    good = secret.encrypt(np.arange(50))[0]
    acc = public.load(good)
    before = public.dump(acc)
    other = SecretContext.generate(_other_params()).encrypt(np.arange(50))[0]
    t_8192 = seal.PlainModulus.Batching(8192, 40).value()
    big_n = SecretContext.generate(HeParams(poly_modulus_degree=8192, plain_modulus=t_8192))
    bad = {
        "other parameters": other,
        "other degree": big_n.encrypt(np.arange(50))[0],
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "random": os.urandom(len(good)),
        "too large": good + os.urandom(public.params.bytes_estimate(4096, aggregate=True)),
    }
    for name, blob in bad.items():
        with pytest.raises(HeError):
            public.add(acc, public.load(blob))
        assert public.dump(acc) == before, name
    with pytest.raises(HeError, match="not a ciphertext of these"):
        public.add(acc, _foreign_ct())
    assert public.dump(acc) == before


def _foreign_ct() -> he.Ciphertext:
    """A ciphertext object loaded under other parameters (never passed through our load)."""
    other = PublicContext(_other_params())
    return other.load(SecretContext.generate(_other_params()).encrypt([1])[0])


@SETTINGS
@given(blob=st.binary(max_size=2000))
def test_random_bytes_are_a_clear_error(blob: bytes) -> None:
    with pytest.raises(HeError, match="does not deserialize|larger than"):
        _public().load(blob)


def test_decrypt_checks_the_number_of_chunks() -> None:
    secret = _secret()
    blobs = secret.encrypt(np.arange(5000))
    assert len(blobs) == 2 == secret.params.n_chunks(5000)
    np.testing.assert_array_equal(secret.decrypt(blobs, 5000), np.arange(5000))
    with pytest.raises(HeError, match="need 1 ciphertexts, got 2"):
        secret.decrypt(blobs, 4000)
    with pytest.raises(HeError, match="need 2 ciphertexts, got 1"):
        secret.decrypt(blobs[:1], 5000)


def test_encrypt_refuses_out_of_range_and_floats() -> None:
    secret = _secret()
    h = (secret.params.plain_modulus - 1) // 2
    np.testing.assert_array_equal(secret.decrypt(secret.encrypt([h, -h, 0]), 3), [h, -h, 0])
    with pytest.raises(ValueError, match="outside"):
        secret.encrypt([h + 1])
    with pytest.raises(ValueError, match="outside"):
        secret.encrypt(np.array([2**64 - 1], dtype=np.uint64))
    with pytest.raises(ValueError, match="integer"):
        secret.encrypt(np.array([0.5]))
    with pytest.raises(ValueError, match="1-D"):
        secret.encrypt(np.zeros((2, 2), dtype=np.int64))


def test_decrypt_mean_checks_its_inputs() -> None:
    secret = _secret()
    blobs = secret.encrypt([1, 2])
    with pytest.raises(ValueError, match="total_weight"):
        he.decrypt_mean(secret, FixedPoint(params=secret.params), blobs, 2, 0.0)
    with pytest.raises(ValueError, match="differ"):
        he.decrypt_mean(secret, FixedPoint(params=HeParams(max_silos=8)), blobs, 2, 1.0)


# ---------------------------------------------------------------------------------------
# Key hygiene: what the coordinator holds


def test_public_context_holds_no_secret_material() -> None:
    public = PublicContext(HeParams())
    assert public.has_secret_key is False
    assert _secret().has_secret_key is True
    held = list(vars(public).values())
    secret_types = (seal.SecretKey, seal.Decryptor, seal.Encryptor, seal.KeyGenerator)
    assert not any(isinstance(v, secret_types) for v in held)
    assert not hasattr(public, "encrypt") and not hasattr(public, "decrypt")
    # The same scan does see the key in a silo's context.
    assert any(isinstance(v, seal.SecretKey) for v in vars(_secret()).values())


def test_aggregates_and_params_contain_no_secret_key_bytes() -> None:
    secret, public = _secret(), _public()
    key = secret.secret_key_bytes()
    uploads = [secret.encrypt(np.arange(4096) - 2048) for _ in range(3)]
    wire = [*_aggregate(public, uploads), *uploads[0], public.params.to_bytes()]
    body = key[100:]  # past the SEAL header and parms_id, which ciphertexts share
    windows = [body[i : i + 32] for i in range(0, len(body) - 32, 997)]
    for blob in wire:
        assert key not in blob
        assert not any(w in blob for w in windows)


def test_secret_key_round_trip_and_refusals() -> None:
    secret = _secret()
    clone = SecretContext.from_secret_key(secret.params, secret.secret_key_bytes())
    blobs = secret.encrypt([5, -6, 7])
    np.testing.assert_array_equal(clone.decrypt(blobs, 3), [5, -6, 7])
    with pytest.raises(HeError, match="secret key"):
        SecretContext.from_secret_key(secret.params, os.urandom(500))
    foreign = SecretContext.generate(_other_params()).secret_key_bytes()
    with pytest.raises(HeError, match="secret key"):
        SecretContext.from_secret_key(secret.params, foreign)


def test_he_module_imports_no_torch() -> None:
    code = "import sys, fedsilo.privacy.he; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"coeff_modulus_bits": (60, 50)}, "insecure coeff_modulus_bits"),
        ({"poly_modulus_degree": 2048, "coeff_modulus_bits": (55,)}, "insecure coeff_modulus_bits"),
        ({"coeff_modulus_bits": ()}, "coeff_modulus_bits"),
        ({"coeff_modulus_bits": (61,)}, "coeff_modulus_bits"),
        ({"poly_modulus_degree": 3000}, "poly_modulus_degree"),
        ({"poly_modulus_degree": 512}, "poly_modulus_degree"),
        ({"plain_modulus": 8796092858369 + 8192}, "plain_modulus"),  # 1 mod 2N, not prime
        ({"plain_modulus": 786431}, "plain_modulus"),  # prime, not 1 mod 8192
        ({"plain_modulus": None}, "plain_modulus"),
        ({"plain_modulus": seal.PlainModulus.Batching(4096, 50).value()}, "plain_modulus"),
        ({"max_silos": 4096}, "plain_modulus"),  # q/t too small for that many additions
        ({"max_silos": 0}, "max_silos"),
        ({"max_silos": True}, "max_silos"),
        ({"bound": 0.0}, "bound"),
        ({"bound": -1.0}, "bound"),
        ({"bound": float("nan")}, "bound"),
        ({"bound": float("inf")}, "bound"),
        ({"scale_bits": 40}, "scale_bits"),
        ({"scheme": "bfv"}, "scheme"),
    ],
)
def test_params_refuse_invalid_values_naming_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(HeParams(), **changes)


def test_ckks_params_are_checked_too() -> None:
    flare = HeParams.flare_default()
    assert flare.slots == 4096 and flare.scheme is HeScheme.CKKS
    with pytest.raises(ValueError, match="plain_modulus"):
        dataclasses.replace(flare, plain_modulus=65537)
    with pytest.raises(ValueError, match="scale_bits"):
        dataclasses.replace(flare, scale_bits=None)
    with pytest.raises(ValueError, match="insecure"):
        dataclasses.replace(flare, coeff_modulus_bits=(60, 60, 60, 60))
    with pytest.raises(HeError, match="baseline"):
        PublicContext(flare)


@SETTINGS
@given(
    bound=st.floats(1e-6, 1e6),
    max_silos=st.integers(1, 128),
    degree=st.sampled_from([4096, 8192]),
)
def test_params_wire_round_trip_and_fingerprint(bound: float, max_silos: int, degree: int) -> None:
    t = seal.PlainModulus.Batching(degree, 40).value()
    p = HeParams(poly_modulus_degree=degree, plain_modulus=t, bound=bound, max_silos=max_silos)
    assert HeParams.from_bytes(p.to_bytes()) == p
    assert HeParams.from_bytes(p.to_bytes()).fingerprint() == p.fingerprint()
    assert dataclasses.replace(p, bound=bound * 2).fingerprint() != p.fingerprint()
    assert HeParams.from_bytes(HeParams.flare_default().to_bytes()) == HeParams.flare_default()


@pytest.mark.parametrize(
    "blob",
    [
        b"not json",
        b"[]",
        b"\xff\xfe",
        HeParams().to_bytes().replace(b'"scheme":"bfv"', b'"scheme":"rsa"'),
        HeParams().to_bytes().replace(b"[56]", b"[60,60]"),
        HeParams().to_bytes().replace(b'"bound":1.0', b'"bound":1.0,"extra":1'),
        HeParams().to_bytes().replace(b"params/1", b"params/9"),
    ],
)
def test_params_from_bytes_refuses_bad_input(blob: bytes) -> None:
    with pytest.raises(HeError):
        HeParams.from_bytes(blob)


# ---------------------------------------------------------------------------------------
# Known answers for the defaults


def test_default_parameters_known_answers() -> None:
    p = HeParams()
    assert (p.scheme, p.poly_modulus_degree, p.coeff_modulus_bits) == (HeScheme.BFV, 4096, (56,))
    assert p.plain_modulus == 8796092858369 == seal.PlainModulus.Batching(4096, 43).value()
    assert p.plain_modulus % 8192 == 1
    max_bits = seal.CoeffModulus.MaxBitCount(4096, seal.SEC_LEVEL_TYPE.TC128)
    assert sum(p.coeff_modulus_bits) <= max_bits == 109
    assert p.slots == 4096
    q = FixedPoint(params=p)
    assert q.scale >= 2.0**35.99


def test_default_seeded_upload_is_at_most_8_bytes_per_value() -> None:
    secret, public = _secret(), _public()
    p = secret.params
    h = (p.plain_modulus - 1) // 2 // p.max_silos
    ints = np.random.default_rng(3).integers(-h, h + 1, 3 * p.slots)
    blobs = secret.encrypt(ints)
    per_value = sum(map(len, blobs)) / ints.size
    assert per_value <= 8.0  # measured 7.60
    assert sum(map(len, blobs)) <= p.bytes_estimate(ints.size)
    full = public.dump(public.load(blobs[0]))
    assert len(full) <= p.bytes_estimate(p.slots, aggregate=True)
    assert len(blobs[0]) < 0.55 * len(full)  # the seed really replaces half the ciphertext


def test_ckks_flare_baseline_row() -> None:
    rng = np.random.default_rng(4)
    n, k = 5000, 3
    updates = [rng.normal(0.0, 0.01, n) for _ in range(k)]
    weights = [0.2, 0.3, 0.5]
    r = he.ckks_flare_roundtrip(updates, weights)
    assert (r.n_values, r.n_silos) == (n, k)
    assert r.upload_bytes_per_value > 50  # the 14x-plaintext cost the BFV codec avoids
    assert r.max_rel_error < 1e-4
    with pytest.raises(ValueError, match="weights"):
        he.ckks_flare_roundtrip(updates, [1.0, 0.0, 1.0])
