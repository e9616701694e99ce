"""Progressive Fourier Aggregation (PFA, from PRR-FL): average weight amplitudes in a growing low-frequency window.

Our reading of PRR-FL (DESIGN §5; the formulas below are **our choices**, stated as such):

1. *2-D view.* A weight of shape ``(d0, d1, …)`` is viewed as the matrix ``(d0, d1·d2·…)`` (a
   convolution's output channels by its flattened input kernels); a 1-D tensor (a bias) as
   ``(1, n)``. Scalars are not Fourier-aggregated.
2. *Spectrum.* ``X = fftshift(fft2(W))`` in float64. For a real W, ``|X|`` is symmetric and the
   phase antisymmetric under point reflection of the frequencies.
3. *Window.* Along an axis of length N the window holds the frequencies ``|f| <= b`` with
   ``b = floor(r · N / 2)``, the whole axis once ``b >= N // 2``; ``r`` is the round's side
   ratio. Frequencies ``-b..b`` are closed under negation, so a blended spectrum stays
   Hermitian and the inverse FFT real (up to float error).
4. *Schedule.* ``r`` grows linearly from 0.7 in the first round to 0.95 in the last
   (:func:`window_ratio`).
5. *Aggregation.* Inside the window every silo's amplitude is replaced by the weighted mean of
   the silos' amplitudes (``Σ w_i |X_i| / Σ w_i``); outside it each silo keeps its own amplitude,
   and everywhere its own phase: ``W_i' = real(ifft2(ifftshift(A' · exp(i·angle(X_i)))))``.
   Normalisation layers stay local (their parameters are not aggregated at all).

What travels: only the window amplitudes ``w_i · |X_i|`` (:func:`window_amplitudes`), which the
federation sums like any update (under HE, as ciphertexts); phases never leave the silo. For the
run strategy, :func:`window_amplitude_array` lays them out as an array of the weight's own shape
(zeros outside the window), so the coordinator's weighted mean of these arrays is the weighted mean
of the window amplitudes, and :func:`combine_array` applies that mean.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["as_matrix", "combine", "combine_array", "window_amplitude_array", "window_amplitudes", "window_mask",
           "window_ratio"]

START_RATIO = 0.7
END_RATIO = 0.95


def window_ratio(rnd: int, total_rounds: int, *, start: float = START_RATIO, end: float = END_RATIO) -> float:
    """The window's side ratio in round ``rnd`` (1-based): linear from ``start`` (round 1) to ``end``
    (the last round); a one-round run uses ``end``.

    Raises:
        ValueError: ``rnd`` not in 1..total_rounds, or ratios outside (0, 1] / decreasing.
    """
    if isinstance(total_rounds, bool) or not isinstance(total_rounds, int) or total_rounds < 1:
        raise ValueError(f"invalid total_rounds {total_rounds!r}: must be an integer >= 1")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not 1 <= rnd <= total_rounds:
        raise ValueError(f"invalid rnd {rnd!r}: must be an integer in [1, {total_rounds}]")
    if not (0 < start <= end <= 1):
        raise ValueError(f"invalid start/end {start!r}/{end!r}: need 0 < start <= end <= 1")
    if total_rounds == 1:
        return float(end)
    return float(start + (end - start) * (rnd - 1) / (total_rounds - 1))


def as_matrix(weight: np.ndarray) -> np.ndarray:
    """The 2-D view of a weight (choice 1): ``(d0, d1·d2·…)``, or ``(1, n)`` for a 1-D tensor."""
    w = np.asarray(weight)
    if w.ndim == 0:
        raise ValueError("a scalar has no 2-D Fourier view")
    if w.ndim == 1:
        return w.reshape(1, -1)
    return w.reshape(w.shape[0], -1)


def _axis_window(n: int, ratio: float) -> np.ndarray:
    half = math.floor(ratio * n / 2)
    if half >= n // 2:
        return np.ones(n, dtype=bool)
    freqs = np.arange(n) - n // 2  # fftshift order
    return np.abs(freqs) <= half


def window_mask(shape: tuple[int, int], ratio: float) -> np.ndarray:
    """The centred low-frequency window (choice 3) of a ``shape`` spectrum in fftshift order."""
    if not 0 < ratio <= 1:
        raise ValueError(f"invalid ratio {ratio!r}: must be in (0, 1]")
    rows, cols = shape
    return _axis_window(rows, ratio)[:, None] & _axis_window(cols, ratio)[None, :]


def _spectrum(weight: np.ndarray) -> np.ndarray:
    m = as_matrix(np.asarray(weight, dtype=np.float64))
    if not np.isfinite(m).all():
        raise ValueError("weight contains NaN or Inf")
    return np.fft.fftshift(np.fft.fft2(m))


def window_amplitudes(weight: np.ndarray, ratio: float) -> np.ndarray:
    """The amplitudes inside the window (flat, row-major), what a silo shares (times its weight)."""
    x = _spectrum(weight)
    return np.abs(x)[window_mask(x.shape, ratio)]


def combine(weight: np.ndarray, mean_window: np.ndarray, ratio: float) -> np.ndarray:
    """This silo's weight after a PFA round (choice 5): the window amplitudes replaced by the
    federation's mean, its own amplitude outside, its own phase everywhere.

    Args:
        weight: The silo's weight (any shape, at least 1-D).
        mean_window: ``Σ w_i |X_i| / Σ w_i`` over the window, as :func:`window_amplitudes` lays it out.
        ratio: The round's window ratio.

    Returns:
        The new weight, same shape and dtype.

    Raises:
        ValueError: A mis-sized, negative or non-finite mean, or a bad weight.
    """
    src = np.asarray(weight)
    x = _spectrum(src)
    win = window_mask(x.shape, ratio)
    mean = np.asarray(mean_window, dtype=np.float64).ravel()
    if mean.size != int(win.sum()):
        raise ValueError(f"mean window has {mean.size} values, the window {int(win.sum())}")
    if not np.isfinite(mean).all() or (mean < 0).any():
        raise ValueError("mean window amplitudes must be finite and >= 0")
    amplitude = np.abs(x)
    amplitude[win] = mean
    out = np.fft.ifft2(np.fft.ifftshift(amplitude * np.exp(1j * np.angle(x))))
    return out.real.reshape(src.shape).astype(src.dtype, copy=False)


def window_amplitude_array(weight: np.ndarray, ratio: float) -> np.ndarray:
    """The window amplitudes laid out as an array of the weight's own shape (what the PFA strategy uploads).

    Layout: the float64 matrix ``A`` of :func:`as_matrix`'s shape, in fftshift order, holds
    ``|X|`` (choice 2) where :func:`window_mask` is True and exactly 0 elsewhere; the result is
    ``A.reshape(weight.shape)``. Nothing outside the window is disclosed, and a weighted mean of
    such arrays is, element for element, the weighted mean of the window amplitudes (choice 5).

    Args:
        weight: The silo's weight (any shape, at least 1-D, finite).
        ratio: The round's window ratio.

    Returns:
        A float64 array of ``weight.shape``.

    Raises:
        ValueError: A scalar or non-finite weight, or a ratio outside (0, 1].
    """
    src = np.asarray(weight)
    view = as_matrix(src)
    win = window_mask(view.shape, ratio)
    out = np.zeros(view.shape, dtype=np.float64)
    out[win] = window_amplitudes(src, ratio)
    return out.reshape(src.shape)


def combine_array(weight: np.ndarray, mean_amplitude_array: np.ndarray, ratio: float) -> np.ndarray:
    """:func:`combine` with the mean in :func:`window_amplitude_array`'s layout.

    Only the window's entries of ``mean_amplitude_array`` are read: whatever lies outside (zeros,
    or the noise differential privacy adds there) is ignored. A negative window entry, which only
    noise (DP, or an approximate HE scheme) can produce since every silo uploads amplitudes
    ``>= 0``, is projected to 0, the nearest valid amplitude.

    Args:
        weight: The silo's weight (any shape, at least 1-D).
        mean_amplitude_array: ``Σ w_i A_i / Σ w_i`` over the silos' :func:`window_amplitude_array`
            outputs, same shape as ``weight``.
        ratio: The round's window ratio (the one the uploads used).

    Returns:
        The silo's new weight (own phase everywhere, own amplitude outside the window, the mean
        amplitude inside), same shape and dtype as ``weight``.

    Raises:
        ValueError: A mean of another shape or with NaN/Inf, or a bad weight or ratio.
    """
    src = np.asarray(weight)
    mean = np.asarray(mean_amplitude_array, dtype=np.float64)
    if mean.shape != src.shape:
        raise ValueError(f"mean amplitude array has shape {mean.shape}, the weight {src.shape}")
    if not np.isfinite(mean).all():
        raise ValueError("mean amplitude array contains NaN or Inf")
    view = as_matrix(mean)
    window = np.maximum(view[window_mask(view.shape, ratio)], 0.0)
    return combine(src, window, ratio)
