"""PFA's defining rule: each silo keeps its phase exactly and its amplitude outside a centred
low-frequency window; inside, the amplitude is the silos' weighted mean; the window grows from 0.7
to 0.95 of the spectrum over the run."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.models.fourier_agg import as_matrix, combine, window_amplitudes, window_mask, window_ratio


def spectrum(w: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(as_matrix(w).astype(np.float64)))


def test_schedule_and_views() -> None:
    assert window_ratio(1, 10) == pytest.approx(0.7) and window_ratio(10, 10) == pytest.approx(0.95)
    assert window_ratio(4, 7) == pytest.approx(0.7 + 0.25 * 3 / 6)
    assert window_ratio(1, 1) == 0.95
    with pytest.raises(ValueError, match="rnd"):
        window_ratio(0, 5)
    assert as_matrix(np.zeros((8, 4, 3, 3))).shape == (8, 36)
    assert as_matrix(np.zeros(5)).shape == (1, 5)
    # centred, closed under negation: -b..b with b = floor(r N / 2); whole axis once b >= N // 2
    m = window_mask((10, 7), 0.7)
    assert m[:, 3].tolist() == [False, False, True, True, True, True, True, True, True, False]  # b = 3 of 10
    assert m[5].tolist() == [False, True, True, True, True, True, False]  # b = 2 of 7
    assert window_mask((4, 5), 1.0).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 9), cols=st.integers(2, 40), silos=st.integers(1, 4),
       ratio=st.floats(0.05, 1.0))
def test_combine_keeps_phase_and_outer_amplitude_and_means_the_window(seed: int, rows: int, cols: int, silos: int,
                                                                    ratio: float) -> None:
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=(rows, cols)).astype(np.float32) for _ in range(silos)]
    w = rng.uniform(0.1, 3.0, size=silos)
    mean = sum(wi * window_amplitudes(x, ratio) for wi, x in zip(w, weights)) / w.sum()
    win = window_mask((rows, cols), ratio)
    for x in weights:
        new = combine(x, mean, ratio)
        assert new.shape == x.shape and new.dtype == np.float32
        before, after = spectrum(x), spectrum(new)
        # amplitude: the mean inside the window, the silo's own outside
        np.testing.assert_allclose(np.abs(after)[win], mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.abs(after)[~win], np.abs(before)[~win], rtol=1e-4, atol=1e-4)
        # phase: the silo's own, wherever it is defined (non-negligible amplitude on both sides)
        defined = (np.abs(before) > 1e-2) & (np.abs(after) > 1e-2)
        dphi = np.angle(after[defined] * np.conj(before[defined]))
        assert np.abs(dphi).max(initial=0.0) < 1e-3


def test_result_is_real_and_identical_silos_are_unchanged() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 3, 3))
    for ratio in (0.7, 0.95, 1.0):
        np.testing.assert_allclose(combine(x, window_amplitudes(x, ratio), ratio), x, atol=1e-12)
    # the inverse FFT of the blended spectrum is real: the window is closed under negation
    y = rng.normal(size=(6, 3, 3, 3))
    mean = (window_amplitudes(x, 0.7) + window_amplitudes(y, 0.7)) / 2
    m = as_matrix(x)
    blended = np.abs(np.fft.fftshift(np.fft.fft2(m)))
    blended[window_mask(m.shape, 0.7)] = mean
    spec = blended * np.exp(1j * np.angle(np.fft.fftshift(np.fft.fft2(m))))
    assert np.abs(np.fft.ifft2(np.fft.ifftshift(spec)).imag).max() < 1e-12


def test_bad_inputs_are_refused() -> None:
    x = np.ones((4, 4))
    with pytest.raises(ValueError, match="mean window has"):
        combine(x, np.ones(3), 0.7)
    with pytest.raises(ValueError, match=">= 0"):
        combine(x, -window_amplitudes(x, 0.7), 0.7)
    with pytest.raises(ValueError, match="NaN"):
        window_amplitudes(np.array([[np.nan, 1.0]]), 0.7)
    with pytest.raises(ValueError, match="scalar"):
        as_matrix(np.float32(1.0))
