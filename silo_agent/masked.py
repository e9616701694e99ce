"""Masked sharing (pFL-ResFIM): what a silo uploads when only some elements are shared, and how it
applies the encrypted sums.

Per element j of the round's shared tensors, silo i uploads three values (all inside the ciphertexts,
the coordinator only adds them):

* ``w_i · s_ij · θ_ij``   (numerator of the shared mean),
* ``w_i · s_ij``          (its denominator),
* ``w_i · (1 − s_ij) · θ_ij`` (this silo's local part, for the consensus model),

with ``s_ij = 1`` where the element is shared (domain-invariant) and 0 where it is domain-sensitive
(its ResFIM mask says "stays local"), and ``θ`` the silo's trained *values* (not differences: the
silos' personal values of an element differ, so differences against one common base do not exist).

After decryption a silo sets each element it shares to ``Σ w s θ / Σ w s`` (never 0 there: its own
term is in the sum) and keeps every element it holds local. Where no silo shares an element the
denominator is exactly 0 (every encoding of 0 is 0) and every silo keeps its value.

Consensus model (for an unseen domain; our choice, the paper's is not public): the mean of the
silos' personalised models, ``Σ_i w_i θ'_i / Σ_i w_i``, where ``θ'_i`` is silo i's model after the
round. For shared elements the sharers' values are all the shared mean, so the consensus is
"invariant part + mean of the local parts"; it equals ``(Σ w s θ + Σ w (1 − s) θ) / Σ w`` of the
uploaded values, which is why the third set is uploaded.

What the masks reveal: the coordinator sees only ciphertexts. Every silo decrypts ``Σ_i w_i s_i``,
i.e. per element the total weight of the silos that share it; with two silos that is the other
silo's mask. This module is torch-free (numpy only) so that the agent and the benchmarks share it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["MASKED_SETS", "MaskedSums", "apply_shared_mean", "consensus", "masked_upload", "split_sums"]

#: Values uploaded per shared element: numerator, denominator, local part.
MASKED_SETS = 3


def _weight(weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"invalid weight {weight!r}: must be a finite number > 0")
    return float(weight)


def _checked(values: Mapping[str, np.ndarray], sensitive: Mapping[str, np.ndarray],
             names: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for name in names:
        if name not in values:
            raise ValueError(f"no values for shared tensor {name!r}")
        if name not in sensitive:
            raise ValueError(f"no mask for shared tensor {name!r}")
        v = np.asarray(values[name], dtype=np.float64).ravel()
        m = np.asarray(sensitive[name]).ravel()
        if m.dtype != np.bool_:
            raise ValueError(f"mask of {name!r} must be boolean (True = stays local), got {m.dtype}")
        if v.size != m.size:
            raise ValueError(f"mask of {name!r} has {m.size} elements, the tensor {v.size}")
        if not np.isfinite(v).all():
            raise ValueError(f"values of {name!r} contain NaN or Inf")
        out.append((v, m))
    return out


def masked_upload(values: Mapping[str, np.ndarray], sensitive: Mapping[str, np.ndarray], names: Sequence[str],
                  weight: float, *, local_part: bool = True) -> np.ndarray:
    """The flat float64 vector a silo encrypts: ``[w·s⊙θ | w·s | w·(1−s)⊙θ]`` over ``names`` in order
    (without the last set when ``local_part`` is False: rounds that do not make the consensus).

    Args:
        values: The silo's trained values of (at least) the tensors in ``names``.
        sensitive: Boolean masks, same shapes; True = domain-sensitive, stays local.
        names: The round's shared tensors, in manifest order.
        weight: w > 0 (already divided by any normaliser).

    Raises:
        ValueError: A missing tensor or mask, a shape mismatch, a non-boolean mask, NaN/Inf.
    """
    w = _weight(weight)
    pairs = _checked(values, sensitive, names)
    num = [np.where(m, 0.0, w * v) for v, m in pairs]
    den = [np.where(m, 0.0, w) for _, m in pairs]
    loc = [np.where(m, w * v, 0.0) for v, m in pairs] if local_part else []
    return np.concatenate(num + den + loc) if pairs else np.zeros(0)


@dataclass(frozen=True, kw_only=True)
class MaskedSums:
    """The decrypted sums of one masked round, per tensor (flat float64).

    Attributes:
        numerator: ``Σ_i w_i s_i θ_i``.
        denominator: ``Σ_i w_i s_i`` (0 exactly where no silo shares the element).
        local: ``Σ_i w_i (1 − s_i) θ_i``, or None when the round did not carry it.
    """

    numerator: dict[str, np.ndarray]
    denominator: dict[str, np.ndarray]
    local: dict[str, np.ndarray] | None


def split_sums(flat: np.ndarray, sizes: Sequence[tuple[str, int]], *, local_part: bool = True) -> MaskedSums:
    """Splits a decrypted flat sum (layout of :func:`masked_upload`) into its sets.

    Args:
        flat: The decrypted sum, ``3 * Σ size`` values (``2 *`` without the local part).
        sizes: ``(name, number of elements)`` of the round's shared tensors, in manifest order.
        local_part: Whether the round carried the local-part set.

    Raises:
        ValueError: If the length does not match.
    """
    flat = np.asarray(flat, dtype=np.float64).ravel()
    n = sum(s for _, s in sizes)
    count = MASKED_SETS if local_part else MASKED_SETS - 1
    if flat.size != count * n:
        raise ValueError(f"masked sum has {flat.size} values, expected {count} x {n}")
    sets: list[dict[str, np.ndarray]] = []
    pos = 0
    for _ in range(count):
        part = {}
        for name, size in sizes:
            part[name] = flat[pos : pos + size]
            pos += size
        sets.append(part)
    return MaskedSums(numerator=sets[0], denominator=sets[1], local=sets[2] if local_part else None)


def apply_shared_mean(values: Mapping[str, np.ndarray], sensitive: Mapping[str, np.ndarray],
                      sums: MaskedSums) -> dict[str, np.ndarray]:
    """This silo's personalised values after the round.

    Shared elements (mask False) become ``Σ w s θ / Σ w s``; local elements, and any element whose
    denominator is 0, keep this silo's value. Shapes and dtypes of ``values`` are kept.

    Raises:
        ValueError: A missing or mis-sized tensor.
    """
    out = {}
    names = list(sums.numerator)
    for (v, m), name in zip(_checked(values, sensitive, names), names, strict=True):
        num, den = sums.numerator[name], sums.denominator[name]
        if num.size != v.size or den.size != v.size:
            raise ValueError(f"sums of {name!r} have {num.size} elements, the tensor {v.size}")
        take = ~m & (den != 0)
        new = v.copy()
        new[take] = num[take] / den[take]
        src = np.asarray(values[name])
        out[name] = new.reshape(src.shape).astype(src.dtype, copy=False)
    return out


def consensus(sums: MaskedSums, total_weight: float, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The consensus model's values: ``(Σ w s θ + Σ w (1 − s) θ) / Σ w`` per element.

    Args:
        sums: The decrypted sums (of a round that carried the local parts).
        total_weight: ``Σ_i w_i`` of the contributors (in the same units as the uploaded weights).
        like: Arrays giving each tensor's shape and dtype.

    Raises:
        ValueError: The round did not carry the local parts.
    """
    if sums.local is None:
        raise ValueError("these sums carry no local parts: the consensus needs a round that uploaded them")
    w = _weight(total_weight)
    out = {}
    for name, num in sums.numerator.items():
        src = np.asarray(like[name])
        mean = (num + sums.local[name]) / w
        out[name] = mean.reshape(src.shape).astype(src.dtype, copy=False)
    return out
