"""The fixed-point codec and the encrypt/decrypt helpers for plain and masked updates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsilo.privacy.he.contexts import PublicContext, SecretContext
from fedsilo.privacy.he.params import HeParams, HeScheme, finite_positive


# Fixed-point codec


@dataclass(frozen=True, kw_only=True)
class FixedPoint:
    """Fixed-point quantizer between float updates and BFV plaintext integers.

    Each silo clips its weighted values to ``[-bound, bound]`` and maps them to integers
    ``|x| <= cap`` with ``cap = floor((t - 1) / 2 / max_silos)`` by scaling with
    ``scale = (cap - 1) / bound`` and unbiased stochastic rounding. Every silo's encoding
    is bounded on its own, so any sum of at most ``max_silos`` encodings stays within
    ``(t - 1) / 2`` and never wraps modulo t, whatever the weights. With the defaults
    (bound 1) the scale is about 2^36: a per-silo rounding error below 1.5e-11.

    Attributes:
        params: BFV parameters (t and max_silos).
        bound: The clip bound; defaults to ``params.bound``. A separate codec with its own
            bound may share the same ciphertext parameters (e.g. bound 1 for a weight mask).
    """

    params: HeParams
    bound: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.params, HeParams) or self.params.scheme is not HeScheme.BFV:
            raise ValueError(f"invalid params {self.params!r}: FixedPoint needs BFV HeParams")
        bound = self.params.bound if self.bound is None else self.bound
        object.__setattr__(self, "bound", finite_positive("bound", bound))

    @property
    def cap(self) -> int:
        """The largest |integer| one silo's encoding can take."""
        return (self.params.plain_modulus - 1) // 2 // self.params.max_silos

    @property
    def scale(self) -> float:
        """Integers per unit: ``encode`` maps v to about ``v * scale``."""
        return (self.cap - 1) / self.bound

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Clips to ``[-bound, bound]`` and quantizes with unbiased stochastic rounding.

        Args:
            values: Finite real values, any shape.
            rng: Randomness for the rounding (E[decode(encode(v))] = clip(v)).

        Returns:
            The int64 encoding (same shape) and how many values were clipped.

        Raises:
            ValueError: If a value is NaN or infinite.
        """
        v = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(v)
        if not finite.all():
            raise ValueError(f"invalid values: {int(v.size - finite.sum())} are NaN or infinite")
        n_clipped = int(np.count_nonzero(np.abs(v) > self.bound))
        y = np.clip(v, -self.bound, self.bound)
        y *= self.scale
        floor = np.floor(y)
        y -= floor  # the fractional part, in [0, 1)
        floor += rng.random(v.shape) < y
        np.clip(floor, -self.cap, self.cap, out=floor)
        return floor.astype(np.int64), n_clipped

    def decode(self, ints: np.ndarray) -> np.ndarray:
        """Maps integers (an encoding or a sum of encodings) back to float64."""
        return np.asarray(ints, dtype=np.int64).astype(np.float64) / self.scale


def encrypt_update(
    ctx: SecretContext, q: FixedPoint, weighted: np.ndarray, rng: np.random.Generator
) -> tuple[list[bytes], int]:
    """A silo's upload: quantizes ``w_i * u_i`` (flattened) and encrypts it.

    Args:
        ctx: The silo's secret context.
        q: The codec (same parameters as ``ctx``).
        weighted: The weighted update ``w_i * u_i``, any shape (flattened in C order).
        rng: Randomness for the stochastic rounding.

    Returns:
        The seeded ciphertext blobs and how many values were clipped to ``q.bound``.

    Raises:
        ValueError: If ``q`` and ``ctx`` disagree on parameters or a value is not finite.
    """
    _same_params(ctx, q)
    ints, n_clipped = q.encode(np.ravel(weighted), rng)
    return ctx.encrypt(ints), n_clipped


def decrypt_mean(
    ctx: SecretContext, q: FixedPoint, blobs: Sequence[bytes], n: int, total_weight: float
) -> np.ndarray:
    """Decrypts an aggregate and divides by the contributors' total weight.

    Args:
        ctx: A silo's secret context.
        q: The codec the contributions were encoded with.
        blobs: The aggregate's chunks.
        n: Number of values.
        total_weight: Sum of the weights of the silos that are in the sum (> 0).

    Returns:
        The weighted mean, float64, ``n`` values.

    Raises:
        ValueError: If ``total_weight`` is not finite and > 0, or parameters disagree.
        HeError: If the aggregate does not decrypt (see `SecretContext.decrypt`).
    """
    _same_params(ctx, q)
    weight = finite_positive("total_weight", total_weight)
    return q.decode(ctx.decrypt(blobs, n)) / weight


def _same_params(ctx: PublicContext, q: FixedPoint) -> None:
    a, b = ctx.params, q.params
    same = (a.poly_modulus_degree, a.coeff_modulus_bits, a.plain_modulus, a.max_silos) == (
        b.poly_modulus_degree,
        b.coeff_modulus_bits,
        b.plain_modulus,
        b.max_silos,
    )
    if not same:
        raise ValueError(
            f"FixedPoint parameters ({b.fingerprint()[:16]}) differ from the context's "
            f"({a.fingerprint()[:16]})"
        )


def encrypt_masked_update(
    ctx: SecretContext, q: FixedPoint, weighted: np.ndarray, weight_mask: np.ndarray, rng: np.random.Generator
) -> tuple[list[bytes], list[bytes], int]:
    """A silo's masked upload: Enc(w·m⊙u) and Enc(w·m), so the mask itself stays encrypted.

    Used when only some elements are shared (a personalisation mask m ∈ {0, 1} per element):
    the weighted mean is then per element, Σ_i w_i m_i u_i / Σ_i w_i m_i.

    Args:
        ctx: The silo's secret context.
        q: The codec.
        weighted: ``w_i * u_i`` (any shape; the mask is applied here).
        weight_mask: ``w_i * m_i``, same shape, values in [0, bound].
        rng: Randomness for the stochastic rounding.

    Returns:
        (numerator blobs, denominator blobs, values clipped).

    Raises:
        ValueError: Shapes differ, or a weight-mask value is negative.
    """
    values = np.ravel(np.asarray(weighted, dtype=np.float64))
    wm = np.ravel(np.asarray(weight_mask, dtype=np.float64))
    if values.shape != wm.shape:
        raise ValueError(f"weighted update has {values.size} values, weight mask {wm.size}")
    if (wm < 0).any():
        raise ValueError("invalid weight mask: values must be >= 0 (a weight times a 0/1 mask)")
    num, clipped = encrypt_update(ctx, q, np.where(wm > 0, values, 0.0), rng)
    den, clipped_den = encrypt_update(ctx, q, wm, rng)
    return num, den, clipped + clipped_den


def decrypt_masked_mean(
    ctx: SecretContext, q: FixedPoint, num_blobs: Sequence[bytes], den_blobs: Sequence[bytes], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decrypts the sums of a masked round and divides element by element.

    Returns:
        (mean, shared): ``mean`` is Σ w m u / Σ w m where ``shared`` is True; where no
        contributor shared the element (Σ w m decrypts to exactly 0, e.g. an all-zero mask
        column) ``shared`` is False and ``mean`` is NaN: the caller keeps its local value.
    """
    _same_params(ctx, q)
    num = q.decode(ctx.decrypt(num_blobs, n))
    den_ints = ctx.decrypt(den_blobs, n)
    shared = den_ints != 0
    mean = np.full(n, np.nan)
    mean[shared] = num[shared] / q.decode(den_ints[shared])
    return mean, shared
