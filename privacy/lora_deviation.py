"""Aggregation deviation of federated LoRA: how far averaging both factors is from averaging ΔW."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedsilo.privacy.lora_factors import _check_matrix
from fedsilo.privacy.update_noise import _is_real, _scaled_norm

__all__ = ["aggregation_deviation"]


def _check_silo_factors(field: str, silos: object, count: int | None) -> list[Mapping[str, object]]:
    if isinstance(silos, (str, bytes, Mapping)) or not isinstance(silos, Sequence):
        raise ValueError(f"invalid {field}: must be a sequence (one mapping per silo)")
    items = list(silos)
    if not items:
        raise ValueError(f"invalid {field}: need at least one silo")
    if count is not None and len(items) != count:
        raise ValueError(f"invalid {field}: {len(items)} silos, expected {count}")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"invalid {field}[{i}]: must be a mapping of layer names to arrays")
    return items


def aggregation_deviation(
    bs: Sequence[Mapping[str, np.ndarray]],
    as_: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    *,
    scaling: Mapping[str, float] | float = 1.0,
) -> float:
    """How far averaging both LoRA factors at once is from averaging the silos' ΔW.

    Per layer, D = Σ_i w_i·s·B_i·A_i − s·B̄·Ā with weighted means B̄ = Σ_i w_i·B_i,
    Ā = Σ_i w_i·A_i and weights normalised to sum to 1; returns ‖(D_ℓ)_ℓ‖_F jointly over the
    layers. This is the aggregation deviation of FedAvg-style LoRA (Zhu et al. 2024, DEeR,
    §3); it is zero when all silos share the same A (B phase) or the same B (A phase). It is
    computed as D = s·Σ_i w_i·(B_i − B̄)(A_i − Ā), algebraically equal, which avoids
    cancelling large terms.

    Args:
        bs: Per silo, ``{layer: B_i}`` (d_out × r); never modified.
        as_: Per silo, ``{layer: A_i}`` (r × d_in), the same layers; never modified.
        weights: Per silo, a finite weight >= 0 (e.g. dataset sizes), not all zero.
        scaling: s for every layer, or ``{layer: s}`` for each layer; finite, > 0.

    Returns:
        The joint Frobenius norm of the deviation (``inf`` only beyond the float64 range).

    Raises:
        ValueError: On a bad argument or input, naming it (silo index and layer).
    """
    b_list = _check_silo_factors("bs", bs, None)
    a_list = _check_silo_factors("as_", as_, len(b_list))
    if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence):
        raise ValueError("invalid weights: must be a sequence of numbers, one per silo")
    if len(weights) != len(b_list):
        raise ValueError(f"invalid weights: {len(weights)} weights for {len(b_list)} silos")
    for i, w in enumerate(weights):
        if not _is_real(w) or not math.isfinite(float(w)) or float(w) < 0.0:
            raise ValueError(f"invalid weights[{i}] {w!r}: must be a finite number >= 0")
    w_arr = np.array([float(w) for w in weights], dtype=np.float64)
    total = math.fsum(w_arr.tolist())
    if not total > 0.0:
        raise ValueError("invalid weights: they must not all be zero")
    w_arr = w_arr / total

    names = list(b_list[0].keys())
    for field, silos in (("bs", b_list), ("as_", a_list)):
        for i, silo in enumerate(silos):
            if set(silo.keys()) != set(names):
                raise ValueError(
                    f"invalid {field}[{i}]: layers {sorted(map(str, silo.keys()))} differ from "
                    f"bs[0]'s {sorted(map(str, names))}"
                )
    if isinstance(scaling, Mapping):
        if set(scaling.keys()) != set(names):
            raise ValueError(
                f"invalid scaling: layers {sorted(map(str, scaling.keys()))} differ from "
                f"{sorted(map(str, names))}"
            )
        scales = dict(scaling)
    else:
        scales = {name: scaling for name in names}
    for name, s in scales.items():
        if not _is_real(s) or not math.isfinite(float(s)) or not float(s) > 0.0:
            raise ValueError(f"invalid scaling[{name!r}] {s!r}: must be a finite number > 0")

    deviations: dict[str, np.ndarray] = {}
    for name in names:
        b_mats = [_check_matrix(f"bs[{i}][{name!r}]", silo[name]) for i, silo in enumerate(b_list)]
        a_mats = [_check_matrix(f"as_[{i}][{name!r}]", silo[name]) for i, silo in enumerate(a_list)]
        for i, (b, a) in enumerate(zip(b_mats, a_mats)):
            if b.shape != b_mats[0].shape:
                raise ValueError(f"invalid bs[{i}][{name!r}]: shape {b.shape}, bs[0] has {b_mats[0].shape}")
            if a.shape != a_mats[0].shape:
                raise ValueError(f"invalid as_[{i}][{name!r}]: shape {a.shape}, as_[0] has {a_mats[0].shape}")
            if b.shape[1] != a.shape[0]:
                raise ValueError(
                    f"invalid layer {name!r} of silo {i}: B {b.shape} and A {a.shape} do not multiply "
                    "(need B: d_out × r, A: r × d_in)"
                )
        b64 = [b.astype(np.float64) for b in b_mats]
        a64 = [a.astype(np.float64) for a in a_mats]
        with np.errstate(over="ignore", invalid="ignore"):
            b_bar = sum((w * b for w, b in zip(w_arr, b64)), np.zeros_like(b64[0]))
            a_bar = sum((w * a for w, a in zip(w_arr, a64)), np.zeros_like(a64[0]))
            dev = sum(
                (w * ((b - b_bar) @ (a - a_bar)) for w, b, a in zip(w_arr, b64, a64)),
                np.zeros((b64[0].shape[0], a64[0].shape[1])),
            )
            deviations[name] = float(scales[name]) * dev
    m, r = _scaled_norm(deviations)
    if not (math.isfinite(m) and math.isfinite(r)):
        return math.inf
    return m * r
