"""Spectral style transfer: re-style a silo's images toward another silo's style bank, keeping their phase (pFL-ResFIM).

The blending rule and its choices are ours; see :mod:`fedsilo.models.style` for the window, the
bank and the citations (FDA, Yang & Soatto 2020; FedDG, Liu et al. 2021).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsilo.core.validators import check_float, check_int
from fedsilo.models.style import StyleBank, _check_images, _shifted_spectrum, _symmetrise, low_freq_window

__all__ = ["simulate_styles", "spectral_transfer"]


def _transfer_spectrum(image: torch.Tensor, bank: StyleBank, lam: float, cluster: int) -> torch.Tensor:
    """Complex128 blended spectrum, already inverse-shifted and inverse-FFT'd (not yet ``.real``)."""
    spec = _shifted_spectrum(image)
    rows, cols = low_freq_window(image.shape[-2], image.shape[-1], bank.beta)
    amp = spec.abs()
    target = _symmetrise(bank.amplitudes[cluster].to(torch.float64))
    blended = amp.clone()
    blended[..., rows, cols] = (1.0 - lam) * amp[..., rows, cols] + lam * target
    out = torch.polar(blended, torch.angle(spec))
    return torch.fft.ifft2(torch.fft.ifftshift(out, dim=(-2, -1)))


def _check_transfer(image: object, bank: object, lam: object, cluster: object) -> tuple[torch.Tensor, float, int]:
    if not isinstance(bank, StyleBank):
        raise ValueError(f"bank must be a StyleBank, got {type(bank).__name__}")
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor [C, H, W], got {image!r:.80}")
    if tuple(image.shape) != bank.image_shape:
        raise ValueError(f"image shape {tuple(image.shape)} differs from the bank's {bank.image_shape}")
    check_float("spectral_transfer", "lam", lam, low=0.0, high=1.0)
    check_int("spectral_transfer", "cluster", cluster, minimum=0)
    assert isinstance(cluster, int)
    if cluster >= bank.clusters:
        raise ValueError(f"spectral_transfer.cluster must be < {bank.clusters}, got {cluster}")
    return image, float(lam), cluster  # type: ignore[arg-type]


def spectral_transfer(image: torch.Tensor, bank: StyleBank, *, lam: float, cluster: int) -> torch.Tensor:
    """Renders ``image`` in the bank's style: blends its low-frequency amplitude, keeps its phase.

    FFT (float64), ``fftshift``; inside :func:`low_freq_window` the amplitude becomes
    ``(1 - lam) * own + lam * bank.amplitudes[cluster]``; outside it is untouched; the phase is
    kept everywhere; ``ifftshift``, inverse FFT, real part. The bank window is symmetric under
    point reflection, so the blended spectrum stays Hermitian and the imaginary part dropped
    is float error only.

    Args:
        image: Float tensor ``[C, H, W]`` with the bank's ``image_shape``.
        bank: Another silo's style bank.
        lam: λ in [0, 1]: 0 returns the image (up to float error), 1 puts the bank's amplitude
            in the window.
        cluster: Index of the bank's style, ``0 <= cluster < bank.clusters``.

    Returns:
        float32 tensor ``[C, H, W]``.

    Raises:
        ValueError: On a bad image, bank, λ or cluster.
    """
    image, lam, cluster = _check_transfer(image, bank, lam, cluster)
    return _transfer_spectrum(image, bank, lam, cluster).real.to(torch.float32)


def simulate_styles(
    images: torch.Tensor, banks: Sequence[StyleBank], *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Renders each image in a random style from ``banks`` (pass the *other* silos' banks).

    Per image, in order: a bank uniformly among ``banks``, a cluster uniformly among its K,
    and λ ~ U(0, 1), all drawn from ``generator``.

    Args:
        images: Float tensor ``[N, C, H, W]``; every bank must have ``image_shape == (C, H, W)``.
        banks: One or more style banks (the caller leaves out its own).
        generator: A torch CPU generator for reproducible draws (None: torch's global one).

    Returns:
        float32 tensor ``[N, C, H, W]``.

    Raises:
        ValueError: On bad images or banks.
    """
    images = _check_images(images)
    banks = list(banks) if isinstance(banks, Sequence) else banks
    if not isinstance(banks, list) or not banks or not all(isinstance(b, StyleBank) for b in banks):
        raise ValueError("banks must be a non-empty sequence of StyleBank")
    for i, b in enumerate(banks):
        if b.image_shape != tuple(images.shape[1:]):
            raise ValueError(f"banks[{i}].image_shape {b.image_shape} differs from images {tuple(images.shape[1:])}")
    out = torch.empty(images.shape, dtype=torch.float32)
    for i in range(images.shape[0]):
        which = int(torch.randint(len(banks), (1,), generator=generator))
        bank = banks[which]
        cluster = int(torch.randint(bank.clusters, (1,), generator=generator))
        lam = float(torch.rand((), generator=generator, dtype=torch.float64))
        out[i] = spectral_transfer(images[i], bank, lam=lam, cluster=cluster)
    return out
