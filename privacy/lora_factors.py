"""LoRA factor types for the DEeR regulator: phases, public factors, their validation and conv reshaping."""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedsilo.privacy.update_noise import _is_real

__all__ = ["LoraFactors", "LoraPhase", "from_matrix", "to_matrix"]


class LoraPhase(enum.Enum):
    """Which LoRA factor an upload trains and shares (the other one is frozen)."""

    A = "a"
    """A is trained and shared; B is frozen."""
    B = "b"
    """B is trained and shared; A is frozen."""


@dataclass(frozen=True, kw_only=True)
class LoraFactors:
    """The current (public, identical on every silo) LoRA factors of one adapted layer.

    The arrays are stored as read-only copies, validated once here.

    Attributes:
        a: A as an r × d_in floating-point matrix (a convolution's A flattened, see
            :func:`to_matrix`).
        b: B as a d_out × r floating-point matrix.
        scaling: s = alpha / r (or alpha / √r with rsLoRA), a finite number > 0.
    """

    a: np.ndarray
    b: np.ndarray
    scaling: float = 1.0

    def __post_init__(self) -> None:
        a = _check_matrix("LoraFactors.a", self.a)
        b = _check_matrix("LoraFactors.b", self.b)
        if a.shape[0] != b.shape[1]:
            raise ValueError(
                f"invalid LoraFactors: a has rank {a.shape[0]} (shape {a.shape}) but b has "
                f"rank {b.shape[1]} (shape {b.shape}); need a: r × d_in and b: d_out × r"
            )
        s = self.scaling
        if not _is_real(s) or not math.isfinite(float(s)) or not float(s) > 0.0:
            raise ValueError(f"invalid LoraFactors.scaling {s!r}: must be a finite number > 0")
        a = np.array(a, copy=True)
        b = np.array(b, copy=True)
        a.setflags(write=False)
        b.setflags(write=False)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "scaling", float(s))

    @property
    def rank(self) -> int:
        """r, the LoRA rank."""
        return int(self.a.shape[0])


# ----------------------------------------------------------------------------- validation


def _check_matrix(field: str, value: object) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise ValueError(f"invalid {field}: must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"invalid {field}: must be a 2-D matrix, got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"invalid {field}: must have no empty dimension, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"invalid {field}: contains NaN or inf values")
    return arr


def _check_phase(phase: object) -> LoraPhase:
    if not isinstance(phase, LoraPhase):
        raise ValueError(f"invalid phase {phase!r}: must be a LoraPhase (LoraPhase.A or LoraPhase.B)")
    return phase


def _check_kind(kind: object) -> LoraPhase:
    if isinstance(kind, LoraPhase):
        return kind
    if kind in ("a", "b"):
        return LoraPhase(kind)
    raise ValueError(f"invalid kind {kind!r}: must be 'a', 'b' or a LoraPhase")


def _check_ridge(value: object) -> float:
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) < 0.0:  # type: ignore[arg-type]
        raise ValueError(f"invalid ridge {value!r}: must be a finite number >= 0")
    return float(value)  # type: ignore[arg-type]


def _check_layers(layers: object) -> dict[str, LoraFactors]:
    if not isinstance(layers, Mapping):
        raise ValueError(f"invalid layers: must be a mapping of names to LoraFactors, got {type(layers).__name__}")
    out: dict[str, LoraFactors] = {}
    for name, factors in layers.items():
        if not isinstance(name, str):
            raise ValueError(f"invalid layers key {name!r}: must be a string")
        if not isinstance(factors, LoraFactors):
            raise ValueError(f"invalid layers[{name!r}]: must be LoraFactors, got {type(factors).__name__}")
        out[name] = factors
    return out


def _check_delta(layers: Mapping[str, LoraFactors], delta: object, phase: LoraPhase) -> dict[str, np.ndarray]:
    """``{name: delta matrix}`` (views, never modified), one per layer, of the trained factor's shape."""
    if not isinstance(delta, Mapping):
        raise ValueError(f"invalid delta: must be a mapping of layer names to arrays, got {type(delta).__name__}")
    for name in delta:
        if name not in layers:
            raise ValueError(f"invalid delta[{name!r}]: no such layer in layers")
    out: dict[str, np.ndarray] = {}
    for name, factors in layers.items():
        if name not in delta:
            raise ValueError(f"invalid delta: missing layer {name!r}")
        arr = _check_matrix(f"delta[{name!r}]", delta[name])
        trained = factors.b if phase is LoraPhase.B else factors.a
        if arr.shape != trained.shape:
            raise ValueError(
                f"invalid delta[{name!r}]: shape {arr.shape} does not match the trained factor "
                f"{phase.name} of shape {trained.shape}"
            )
        out[name] = arr
    return out


# ------------------------------------------------------------------------- conv LoRA shapes


def to_matrix(array: np.ndarray, kind: LoraPhase | str) -> np.ndarray:
    """A peft LoRA weight as the 2-D matrix this module works on (a new array).

    ``kind`` "a" (or ``LoraPhase.A``): ``lora_A`` weight (r, d_in) for a linear layer or
    (r, c_in, k, …) for a convolution → r × (c_in·k·…). ``kind`` "b": ``lora_B`` weight
    (d_out, r) or (c_out, r, 1, …) for a convolution (peft's 1×…×1 conv) → c_out × r. Then
    ΔW = s·B·A reshaped to (c_out, c_in, k, …) is the convolution's weight update (grouped
    convolutions are not covered).

    Raises:
        ValueError: On a bad kind or shape.
    """
    which = _check_kind(kind)
    arr = np.asarray(array)
    if arr.ndim < 2:
        raise ValueError(f"invalid array: a LoRA {which.name} weight needs >= 2 dimensions, got shape {arr.shape}")
    if which is LoraPhase.A:
        return np.array(arr, copy=True).reshape(arr.shape[0], -1)
    if any(d != 1 for d in arr.shape[2:]):
        raise ValueError(f"invalid array: a conv LoRA B weight must be (c_out, r, 1, …), got shape {arr.shape}")
    return np.array(arr, copy=True).reshape(arr.shape[0], arr.shape[1])


def from_matrix(matrix: np.ndarray, kind: LoraPhase | str, shape: Sequence[int]) -> np.ndarray:
    """The inverse of :func:`to_matrix`: a 2-D factor matrix reshaped to peft's weight ``shape`` (a new array).

    Raises:
        ValueError: On a bad kind, or a shape that does not fit the matrix (naming both).
    """
    which = _check_kind(kind)
    mat = np.asarray(matrix)
    if mat.ndim != 2:
        raise ValueError(f"invalid matrix: must be 2-D, got shape {mat.shape}")
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) < 2:
        raise ValueError(f"invalid shape {shape!r}: must be a sequence of >= 2 dimensions")
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and int(d) >= 1 for d in shape):
        raise ValueError(f"invalid shape {tuple(shape)!r}: dimensions must be integers >= 1")
    dims = tuple(int(d) for d in shape)
    if which is LoraPhase.A:
        fits = dims[0] == mat.shape[0] and math.prod(dims[1:]) == mat.shape[1]
    else:
        fits = dims[:2] == mat.shape and all(d == 1 for d in dims[2:])
    if not fits:
        raise ValueError(f"invalid shape {dims}: does not fit a LoRA {which.name} matrix of shape {mat.shape}")
    return np.array(mat, copy=True).reshape(dims)
