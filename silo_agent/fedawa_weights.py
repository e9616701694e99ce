"""FedAWA's weights: each silo's two scalars about its update and the aggregation weights computed from them (pure, torch-free).

Every silo runs these functions on the same set of scalars and gets the same weights; the rule
and its distance from the paper are stated in ``fedsilo.silo_agent.methods.fedawa``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping

import numpy as np

from fedsilo.core import validators

#: The most rounds a run may have (``run.rounds``), hence the highest round a scalars blob names.
MAX_ROUNDS = 100_000
#: A floor under every D_k (in units of the mean norm), so L̃ stays differentiable where D_k = 0.
_EPS = 1e-9
_MAGIC = b"FAWASC1\0"
_PAYLOAD = struct.Struct("<8sIdd")  # magic, round, c, n (little-endian float64)


def client_scalars(update: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(c_k, n_k) = (cos(τ_k, g), ‖τ_k‖₂) of a flat update τ_k against the last global update g.

    Raises:
        ValueError: shapes differ, values are not finite, or g is zero.
    """
    u = np.asarray(update, dtype=np.float64).ravel()
    g = np.asarray(reference, dtype=np.float64).ravel()
    if u.shape != g.shape:
        raise ValueError(f"fedawa: the update has {u.size} values, the reference {g.size}")
    if not (np.isfinite(u).all() and np.isfinite(g).all()):
        raise ValueError("fedawa: the update and the reference must be finite")
    n, gn = float(np.linalg.norm(u)), float(np.linalg.norm(g))
    if not gn > 0:
        raise ValueError("fedawa: the reference global update is zero")
    c = 0.0 if n == 0 else float(np.dot(u, g)) / (n * gn)
    return min(1.0, max(-1.0, c)), n


def check_scalars(c: float, n: float) -> tuple[float, float]:
    """(c, n) as floats if c is in [−1, 1] and n a finite number >= 0.

    Raises:
        ValueError: otherwise.
    """
    c, n = float(c), float(n)
    if not (math.isfinite(c) and -1.0 <= c <= 1.0):
        raise ValueError(f"fedawa: a cosine must be in [-1, 1], got {c!r}")
    if not (math.isfinite(n) and n >= 0.0):
        raise ValueError(f"fedawa: a norm must be a finite number >= 0, got {n!r}")
    return c, n


def _parts(c: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, q) in units of the mean norm, or None when every norm is 0."""
    s = float(n.mean())
    if not s > 0:
        return None
    r = n / s
    return r * c, r * r * np.clip(1.0 - c * c, 0.0, None)


def _distances(lam: np.ndarray, a: np.ndarray, q: np.ndarray) -> np.ndarray:
    """D_k(λ): each client vector's distance to the λ-weighted mean under the model Gram a aᵀ + diag(q)."""
    mean_a = float(lam @ a)
    cross = float((lam * lam) @ q)
    d2 = (a - mean_a) ** 2 + q * (1.0 - lam) ** 2 + np.maximum(cross - lam * lam * q, 0.0)
    return np.sqrt(d2 + _EPS * _EPS)


def objective(lam: np.ndarray, c: np.ndarray, n: np.ndarray) -> float:
    """L̃(λ) = Σ_k λ_k D_k(λ) for scalars c, n (see the module docstring); 0 when every norm is 0."""
    parts = _parts(np.asarray(c, np.float64), np.asarray(n, np.float64))
    if parts is None:
        return 0.0
    lam = np.asarray(lam, np.float64)
    return float(lam @ _distances(lam, *parts))


def objective_gradient(lam: np.ndarray, c: np.ndarray, n: np.ndarray) -> np.ndarray:
    """h = ∂L̃/∂λ, λ taken as free coordinates: h_k = D_k − a_k A − λ_k q_k / D_k + λ_k q_k B with
    A = Σ_i λ_i (a_i − ā) / D_i, B = Σ_i λ_i / D_i and ā = Σ_i λ_i a_i."""
    parts = _parts(np.asarray(c, np.float64), np.asarray(n, np.float64))
    lam = np.asarray(lam, np.float64)
    if parts is None:
        return np.zeros_like(lam)
    a, q = parts
    d = _distances(lam, a, q)
    mean_a = float(lam @ a)
    big_a = float(lam @ ((a - mean_a) / d))
    big_b = float(lam @ (1.0 / d))
    return d - a * big_a - lam * q / d + lam * q * big_b


def _softmax(t: np.ndarray) -> np.ndarray:
    e = np.exp(t - t.max())
    return e / e.sum()


def aggregation_weights(scalars: Mapping[str, tuple[float, float]], *, steps: int, step_size: float,
                        max_logit: float) -> dict[str, float]:
    """FedAWA's weights λ (summing to 1) for the silos whose (c, n) are in ``scalars``.

    A deterministic function of the set: silos are taken in name order. λ = softmax(T), T = 0
    then ``steps`` mirror-descent steps T ← clip(T − η (h − mean(h)), −M, M) on L̃ (the module
    docstring), η = ``step_size``, M = ``max_logit``. Uniform when there is one silo, when every
    norm is 0, or with ``steps = 0``.

    Raises:
        ValueError: no silos, or a (c, n) outside [−1, 1] × [0, ∞).
    """
    if not scalars:
        raise ValueError("fedawa: no scalars to weight")
    names = sorted(scalars)
    checked = [check_scalars(*scalars[s]) for s in names]
    c = np.array([x[0] for x in checked], np.float64)
    n = np.array([x[1] for x in checked], np.float64)
    t = np.zeros(len(names))
    if len(names) > 1 and _parts(c, n) is not None:
        for _ in range(steps):
            h = objective_gradient(_softmax(t), c, n)
            t = np.clip(t - step_size * (h - h.mean()), -max_logit, max_logit)
    lam = _softmax(t)
    return {s: float(v) for s, v in zip(names, lam)}


def upload_factor(weights: Mapping[str, float], me: str, bound: float) -> float:
    """f = min(1, bound) · λ_me / max_j λ_j: this silo's multiplier of its upload and its weight slot."""
    return min(1.0, float(bound)) * weights[me] / max(weights.values())


def scalars_to_bytes(rnd: int, c: float, n: float) -> bytes:
    """Serialises round ``rnd``'s (c, n) for sealing.

    Raises:
        ValueError: a round outside 1..MAX_ROUNDS or scalars :func:`check_scalars` refuses.
    """
    validators.int_in("round", rnd, 1, MAX_ROUNDS)
    c, n = check_scalars(c, n)
    return _PAYLOAD.pack(_MAGIC, rnd, c, n)


def scalars_from_bytes(data: bytes, *, rnd: int) -> tuple[float, float]:
    """Parses :func:`scalars_to_bytes`'s output of round ``rnd``.

    Raises:
        ValueError: a wrong header, length or round, or scalars :func:`check_scalars` refuses.
    """
    if len(data) != _PAYLOAD.size:
        raise ValueError(f"FedAWA scalars blob of {len(data)} bytes; {_PAYLOAD.size} expected")
    magic, got, c, n = _PAYLOAD.unpack(data)
    if magic != _MAGIC:
        raise ValueError(f"not a FedAWA scalars blob (header {magic!r})")
    if got != rnd:
        raise ValueError(f"FedAWA scalars of round {got}, expected round {rnd}")
    return check_scalars(c, n)
