"""Style banks by spectral transfer: low-frequency Fourier amplitudes shared between silos (pFL-ResFIM).

The pFL-ResFIM paper's exact formulas are not public: every choice below (window
definition, log-amplitude summary, clustering, clipping, noise, blending) is **ours**, made
for this project, and should be cited as such. The underlying idea, that a scanner's
"style" lives mostly in the low-frequency Fourier *amplitude* while the *phase* carries the
anatomy, comes from Yang & Soatto 2020, "FDA: Fourier Domain Adaptation for Semantic
Segmentation" (CVPR), and Liu et al. 2021, "FedDG: Federated Domain Generalization on
Medical Image Segmentation via Episodic Learning in Continuous Frequency Space" (CVPR).

How it is used (DESIGN §5):

1. Each silo calls :func:`build_style_bank` on its training images and shares the resulting
   :class:`StyleBank` once per run (``to_bytes``, encrypted for the other silos by the caller).
2. A silo makes simulated images "in another silo's style" with
   :func:`fedsilo.models.style_transfer.spectral_transfer` / ``simulate_styles``: FFT its own image, blend the low-frequency amplitude toward the
   bank's, keep its own phase exactly, inverse FFT.

Window (:func:`low_freq_window`): in the ``fftshift``-ed spectrum of an ``H x W`` image the
zero frequency sits at ``(H // 2, W // 2)``. The window is the square of half-size
``b = min(max(1, floor(min(H, W) * beta)), (min(H, W) - 1) // 2)`` around it, i.e. the
frequencies ``-b..b`` along each axis, ``(2b + 1) x (2b + 1)`` bins. The cap keeps the set
of frequencies closed under negation (it never includes an unpaired Nyquist bin), so a
blend that is symmetric under point reflection keeps the spectrum Hermitian and the
inverse FFT real (up to float error).

Summary: per image, the window of ``log1p(|FFT|)`` per channel (log for dynamic range: the
DC and the first few bins are orders of magnitude larger than the rest). Each image's
log-window, all channels together, is clipped to L2 norm ``clip_norm`` (C). A cluster's
summary is the mean of its members' clipped log-windows; the bank stores
``expm1(mean)`` (amplitude units, clamped at 0), symmetrised under point reflection.
Never per-image spectra, never phases, never pixels.

**What the exchange reveals, and the DP design.** The bank is a release of private data.

* ``noise_multiplier == 0`` (no DP): clusters come from seeded k-means on the clipped
  log-windows and the bank **reveals the exact cluster means** of the silo's training
  spectra (and, through K, roughly how many distinct styles it holds). Nothing protects a
  patient whose image dominates a small cluster. Use it only for tests and for data that
  may be shared anyway; it has no ledger entry (``StyleBank.release`` is None), so say so.
* ``noise_multiplier = σ > 0`` (DP, record = one image): k-means is **not** used, because
  its centres depend on every record: adding or removing one image can move the centres and
  reassign *other* images, so the per-cluster sums would not have sensitivity C. Instead
  each image goes to a cluster by a **record-local, data-independent rule**: its own
  energy fraction outside the window ``e = Σ_outside |X|² / Σ_all |X|²`` in ``[0, 1]`` (a
  function of that image alone; it grows with noise, texture and sharpness), binned in
  fixed octaves: cluster ``j < K - 1`` holds ``e ∈ (2^-(j+1), 2^-j]``, cluster ``K - 1``
  everything at or below ``2^-(K-1)``. Each image then contributes the vector ``(w_i, C)`` to exactly one cluster, with
  ``w_i`` its clipped log-window (``‖w_i‖ ≤ C``) and ``C`` in a count coordinate. The
  concatenation of all cluster sums and scaled counts therefore has L2 sensitivity
  ``Δ = √2 · C`` under adding/removing one image, and **every** bin (empty or not: the set
  released must not depend on the data) gets iid ``N(0, (σΔ)²)`` on each coordinate: one
  Gaussian mechanism with noise multiplier σ, sample rate 1, one step. Everything after
  (dropping bins whose noisy count is below ``1 + 3·√2·σ``, about three noise stds above
  an empty bin, always keeping the bin with the largest noisy count; noisy mean = noisy sum
  / max(1, noisy count); projecting each coordinate onto ``[0, min(C, 80)]``, where every
  true mean lies since each clipped coordinate does; ``expm1``; symmetrising) is
  post-processing of the noisy values. ``StyleBank.release`` gives the accountant's
  :class:`~fedsilo.privacy.accounting.Release` for the silo's ledger. Noise is drawn from
  the OS CSPRNG unless a numpy Generator is passed (tests), via
  :func:`fedsilo.privacy.update_noise.add_gaussian_noise`.
  Caveats: the protected unit is one *image*; if a patient contributes several images,
  the guarantee per patient is weaker (group privacy) unless images are grouped per
  patient first. ``clip_norm`` biases the summary toward 0 when it is below typical window
  norms (about 35 for 64 x 64 built-in images at β = 0.05); choose it from public
  knowledge of the modality, not from the private data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from fedsilo.core.validators import (
    MappingConfig,
    check_float,
    check_int,
    check_seed,
)
from fedsilo.privacy.accounting import Mechanism, Neighbouring, Release
from fedsilo.privacy.update_noise import add_gaussian_noise

__all__ = [
    "StyleBank",
    "StyleBankConfig",
    "amplitude_window",
    "build_style_bank",
    "low_freq_window",
]

_MAGIC = b"FSSB"
_FORMAT = "fedsilo.style_bank"
_VERSION = 1
_MAX_HEADER = 4096
_KMEANS_ITERS = 50
_MAX_LOG_AMPLITUDE = 80.0
_TAG_KMEANS = 0x57B1E
_HEADER_KEYS = frozenset(
    {"format", "version", "beta", "image_shape", "window", "clusters", "clip_norm", "noise_multiplier", "dtype"}
)


def low_freq_window(height: int, width: int, beta: float) -> tuple[slice, slice]:
    """Returns the centred low-frequency window of an ``fftshift``-ed ``height x width`` spectrum.

    The zero frequency of the shifted spectrum sits at ``(height // 2, width // 2)``; the window
    covers the frequencies ``-b..b`` along both axes with
    ``b = min(max(1, floor(min(height, width) * beta)), (min(height, width) - 1) // 2)``, so it is
    ``(2b + 1) x (2b + 1)`` bins and closed under negation (see the module docstring).

    Args:
        height: Image height, >= 3.
        width: Image width, >= 3.
        beta: Window ratio in (0, 0.5].

    Returns:
        ``(rows, cols)`` slices into the shifted spectrum.

    Raises:
        ValueError: On a bad size or ratio, naming it.
    """
    check_int("low_freq_window", "height", height, minimum=3)
    check_int("low_freq_window", "width", width, minimum=3)
    check_float("low_freq_window", "beta", beta, low=0.0, high=0.5, low_inclusive=False)
    m = min(height, width)
    b = min(max(1, math.floor(m * float(beta))), (m - 1) // 2)
    ch, cw = height // 2, width // 2
    return slice(ch - b, ch + b + 1), slice(cw - b, cw + b + 1)


def _window_size(height: int, width: int, beta: float) -> int:
    rows, _ = low_freq_window(height, width, beta)
    return rows.stop - rows.start


def _check_images(images: object, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or min(images.shape) < 1:
        raise ValueError(f"{name} must have shape [N, C, H, W] with N, C >= 1, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating-point, got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return images


def _shifted_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Complex128 ``fftshift(fft2(x))`` over the last two dims (float64 for phase accuracy)."""
    return torch.fft.fftshift(torch.fft.fft2(x.detach().to(torch.float64)), dim=(-2, -1))


def amplitude_window(images: torch.Tensor, beta: float) -> torch.Tensor:
    """Returns the low-frequency window of each image's shifted amplitude spectrum, per channel.

    Args:
        images: Float tensor ``[N, C, H, W]`` (H, W >= 3).
        beta: Window ratio in (0, 0.5].

    Returns:
        float32 tensor ``[N, C, h, w]``, ``h = w = 2b + 1`` (see :func:`low_freq_window`), of
        ``|fftshift(fft2(image))|`` inside the window (unnormalised FFT).

    Raises:
        ValueError: On a bad tensor or ratio.
    """
    images = _check_images(images)
    rows, cols = low_freq_window(images.shape[-2], images.shape[-1], beta)
    return _shifted_spectrum(images)[..., rows, cols].abs().to(torch.float32)


def _symmetrise(window: torch.Tensor) -> torch.Tensor:
    """Averages a centred odd-sized window with its point reflection (frequency k with -k)."""
    return 0.5 * (window + window.flip(-2, -1))


@dataclass(frozen=True, kw_only=True)
class StyleBankConfig(MappingConfig):
    """How a silo summarises its style (see the module docstring for the privacy design).

    Attributes:
        clip_norm: C > 0: each image's log1p-amplitude window (all channels jointly) is clipped
            to this L2 norm before it is summed; the L2 sensitivity of the DP release is √2·C.
        noise_multiplier: σ >= 0. **0 means no DP: the bank reveals the exact (clipped) cluster
            means of the silo's training spectra**, with k-means clusters. σ > 0 releases a
            Gaussian mechanism (record = one image) with data-independent cluster assignment.
        beta: Window ratio in (0, 0.5] (default 0.05, as in FedDG's small centred window).
        clusters: Most clusters K >= 1 in the bank (fewer if there are fewer images, or
            clusters come out empty / below a noisy count of 1).
        seed: Seed of the deterministic k-means initialisation (σ = 0 only).
    """

    clip_norm: float
    noise_multiplier: float
    beta: float = 0.05
    clusters: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_float(owner, "clip_norm", self.clip_norm, low=0.0, high=math.inf, low_inclusive=False,
                    high_inclusive=False)
        check_float(owner, "noise_multiplier", self.noise_multiplier, low=0.0, high=math.inf,
                    high_inclusive=False)
        check_float(owner, "beta", self.beta, low=0.0, high=0.5, low_inclusive=False)
        check_int(owner, "clusters", self.clusters, minimum=1)
        check_seed(owner, "seed", self.seed)



@dataclass(frozen=True, kw_only=True, eq=False)
class StyleBank:
    """One silo's shared style summary: K low-frequency amplitude windows, no per-image data.

    Attributes:
        amplitudes: float32 tensor ``[K, C, h, w]`` of non-negative amplitudes (unnormalised-FFT
            units, the same as :func:`amplitude_window`), symmetric under point reflection.
        beta: The window ratio it was built with.
        image_shape: ``(C, H, W)`` of the images it summarises (transfer needs the same shape).
        clip_norm: C used when building it.
        noise_multiplier: σ used when building it (0: no DP, the bank reveals cluster means).
    """

    amplitudes: torch.Tensor
    beta: float
    image_shape: tuple[int, int, int]
    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_float(owner, "beta", self.beta, low=0.0, high=0.5, low_inclusive=False)
        check_float(owner, "clip_norm", self.clip_norm, low=0.0, high=math.inf, low_inclusive=False,
                    high_inclusive=False)
        check_float(owner, "noise_multiplier", self.noise_multiplier, low=0.0, high=math.inf,
                    high_inclusive=False)
        shape = self.image_shape
        if not isinstance(shape, tuple) or len(shape) != 3:
            raise ValueError(f"{owner}.image_shape must be a tuple (C, H, W), got {shape!r}")
        check_int(owner, "image_shape[0]", shape[0], minimum=1)
        check_int(owner, "image_shape[1]", shape[1], minimum=3)
        check_int(owner, "image_shape[2]", shape[2], minimum=3)
        amp = self.amplitudes
        if not isinstance(amp, torch.Tensor) or amp.dtype != torch.float32 or amp.ndim != 4:
            raise ValueError(f"{owner}.amplitudes must be a float32 tensor [K, C, h, w], got {amp!r:.80}")
        size = _window_size(shape[1], shape[2], self.beta)
        if amp.shape[0] < 1 or tuple(amp.shape[1:]) != (shape[0], size, size):
            raise ValueError(
                f"{owner}.amplitudes must have shape [K>=1, {shape[0]}, {size}, {size}], got {tuple(amp.shape)}"
            )
        if not bool(torch.isfinite(amp).all()) or bool((amp < 0).any()):
            raise ValueError(f"{owner}.amplitudes must be finite and non-negative")
        object.__setattr__(self, "amplitudes", amp.detach().to("cpu").clone().contiguous())
        object.__setattr__(self, "beta", float(self.beta))
        object.__setattr__(self, "clip_norm", float(self.clip_norm))
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))

    @property
    def clusters(self) -> int:
        """K, the number of styles in the bank."""
        return int(self.amplitudes.shape[0])

    @property
    def release(self) -> Release | None:
        """The accountant's view of building this bank, for the silo's ledger; None without DP.

        One Gaussian mechanism (sample rate 1, one step) on record-level neighbours (one image
        added or removed), noise multiplier σ relative to the L2 sensitivity √2·C.
        """
        if self.noise_multiplier == 0.0:
            return None
        return Release(mechanism=Mechanism.GAUSSIAN, neighbouring=Neighbouring.RECORD,
                       noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=1)

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the released vector (window sums and scaled counts): √2·C."""
        return math.sqrt(2.0) * self.clip_norm

    def _header(self) -> bytes:
        k, c, h, w = self.amplitudes.shape
        header = {
            "format": _FORMAT,
            "version": _VERSION,
            "beta": self.beta,
            "image_shape": list(self.image_shape),
            "window": [h, w],
            "clusters": k,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "dtype": "float32-le",
        }
        return json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")

    def to_bytes(self) -> bytes:
        """Canonical serialisation: ``b"FSSB"``, header length (uint32 BE), JSON header, float32 LE data.

        The header is ASCII JSON with sorted keys and no spaces; the same bank always gives the
        same bytes, and :meth:`from_bytes` accepts only this exact form.
        """
        header = self._header()
        data = self.amplitudes.numpy().astype("<f4", copy=False).tobytes(order="C")
        return _MAGIC + struct.pack(">I", len(header)) + header + data

    @classmethod
    def from_bytes(cls, blob: bytes) -> StyleBank:
        """Parses :meth:`to_bytes` output; raises ValueError on anything malformed or non-canonical."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise ValueError(f"style bank blob must be bytes, got {type(blob).__name__}")
        blob = bytes(blob)
        if len(blob) < 8 or blob[:4] != _MAGIC:
            raise ValueError("style bank blob: bad magic or too short")
        (n,) = struct.unpack(">I", blob[4:8])
        if n > _MAX_HEADER or 8 + n > len(blob):
            raise ValueError(f"style bank blob: bad header length {n}")
        raw = blob[8 : 8 + n]
        try:
            header = json.loads(raw.decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"style bank blob: header is not ASCII JSON ({exc})") from None
        if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
            raise ValueError(f"style bank blob: header keys must be {sorted(_HEADER_KEYS)}")
        if header["format"] != _FORMAT or header["version"] != _VERSION or header["dtype"] != "float32-le":
            raise ValueError("style bank blob: unknown format, version or dtype")
        shape, window, k = header["image_shape"], header["window"], header["clusters"]
        if not (isinstance(shape, list) and len(shape) == 3 and isinstance(window, list) and len(window) == 2):
            raise ValueError("style bank blob: image_shape must be 3 integers and window 2")
        ints = [*shape, *window, k]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in ints):
            raise ValueError("style bank blob: image_shape, window and clusters must be integers")
        if min(ints) < 1 or k > 1_000_000 or shape[0] > 1_000_000:
            raise ValueError("style bank blob: sizes must be positive")
        count = k * shape[0] * window[0] * window[1]
        data = blob[8 + n :]
        if len(data) != 4 * count:
            raise ValueError(f"style bank blob: expected {4 * count} data bytes, got {len(data)}")
        arr = np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(k, shape[0], window[0], window[1])
        for key in ("beta", "clip_norm", "noise_multiplier"):
            if isinstance(header[key], bool) or not isinstance(header[key], (int, float)):
                raise ValueError(f"style bank blob: {key} must be a number")
        bank = cls(
            amplitudes=torch.from_numpy(arr.copy()),
            beta=header["beta"],
            image_shape=(shape[0], shape[1], shape[2]),
            clip_norm=header["clip_norm"],
            noise_multiplier=header["noise_multiplier"],
        )
        if bank._header() != raw:
            raise ValueError("style bank blob: header is not in canonical form")
        return bank


def _clipped_log_windows(images: torch.Tensor, beta: float, clip_norm: float) -> np.ndarray:
    """``[N, C*h*w]`` float64 log1p-amplitude windows, each row clipped to L2 norm ``clip_norm``."""
    rows, cols = low_freq_window(images.shape[-2], images.shape[-1], beta)
    amp = _shifted_spectrum(images)[..., rows, cols].abs()
    x = torch.log1p(amp).reshape(images.shape[0], -1).numpy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    scale = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-300))
    # Scale a hair below C so float rounding can never leave a row above it.
    return x * scale * np.where(norms > clip_norm, 1.0 - 1e-12, 1.0)


def _dp_assign(images: torch.Tensor, beta: float, clusters: int) -> np.ndarray:
    """Record-local cluster index: fixed octave bins of the image's own out-of-window energy fraction."""
    rows, cols = low_freq_window(images.shape[-2], images.shape[-1], beta)
    power = _shifted_spectrum(images).abs().square()
    total = power.sum(dim=(1, 2, 3))
    outside = torch.clamp(total - power[..., rows, cols].sum(dim=(1, 2, 3)), min=0.0)
    frac = torch.where(total > 0, outside / torch.clamp(total, min=1e-300), torch.zeros_like(total)).numpy()
    with np.errstate(divide="ignore"):
        octave = np.floor(-np.log2(np.minimum(frac, 1.0)))
    return np.minimum(octave, clusters - 1).astype(np.int64)


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Deterministic Lloyd k-means with seeded k-means++ init; returns each row's cluster index."""
    n = x.shape[0]
    k = min(k, n)
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_KMEANS, seed]))
    centres = [x[int(rng.integers(n))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.stack(centres)[None]) ** 2).sum(-1), axis=1)
        if d2.sum() <= 0:
            break  # fewer distinct points than clusters
        centres.append(x[int(rng.choice(n, p=d2 / d2.sum()))])
    c = np.stack(centres)
    assign = np.full(n, -1, dtype=np.int64)
    for _ in range(_KMEANS_ITERS):
        new = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        for j in range(c.shape[0]):
            if (assign == j).any():
                c[j] = x[assign == j].mean(axis=0)
    return assign


def _cluster_sums(images: torch.Tensor, cfg: StyleBankConfig) -> tuple[np.ndarray, np.ndarray]:
    """Exact (pre-noise) per-cluster sums ``[K, C*h*w]`` of clipped log-windows and counts ``[K]``.

    With σ > 0, K == cfg.clusters always (empty bins included) and the assignment is
    record-local; with σ = 0, K <= cfg.clusters from k-means (empty clusters dropped).
    """
    x = _clipped_log_windows(images, cfg.beta, cfg.clip_norm)
    if cfg.noise_multiplier > 0.0:
        k = cfg.clusters
        assign = _dp_assign(images, cfg.beta, k)
    else:
        assign = _kmeans(x, cfg.clusters, cfg.seed)
        k = int(assign.max()) + 1
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, assign, x)
    counts = np.bincount(assign, minlength=k).astype(np.float64)
    if cfg.noise_multiplier == 0.0:
        keep = counts > 0
        sums, counts = sums[keep], counts[keep]
    return sums, counts


def build_style_bank(
    images: torch.Tensor, cfg: StyleBankConfig, *, rng: np.random.Generator | None = None
) -> StyleBank:
    """Summarises a silo's training images into a :class:`StyleBank` (see the module docstring).

    Args:
        images: Float tensor ``[N, C, H, W]``, the silo's training images (H, W >= 3).
        cfg: Window ratio, clusters, clipping and noise.
        rng: Noise source when σ > 0: None (production) draws from the OS CSPRNG; a numpy
            Generator makes it reproducible (tests only: PCG64 is not a CSPRNG).

    Returns:
        The bank, ``K <= cfg.clusters`` windows. With σ > 0 its ``release`` is the ledger entry
        to record before sharing it.

    Raises:
        ValueError: On bad images, config or rng.
    """
    if not isinstance(cfg, StyleBankConfig):
        raise ValueError(f"cfg must be a StyleBankConfig, got {type(cfg).__name__}")
    images = _check_images(images)
    _, c, h, w = images.shape
    low_freq_window(h, w, cfg.beta)  # validates H, W
    sums, counts = _cluster_sums(images, cfg)
    if cfg.noise_multiplier > 0.0:
        c_norm = cfg.clip_norm
        sensitivity = math.sqrt(2.0) * c_norm
        noisy = add_gaussian_noise(
            {"release": np.concatenate([sums, c_norm * counts[:, None]], axis=1)},
            clip_norm=sensitivity,
            noise_multiplier=cfg.noise_multiplier,
            rng=rng,
        )["release"]
        sums, counts = noisy[:, :-1], noisy[:, -1] / c_norm
        keep = counts >= 1.0 + 3.0 * math.sqrt(2.0) * cfg.noise_multiplier
        keep[int(np.argmax(counts))] = True
        sums, counts = sums[keep], counts[keep]
    elif rng is not None and not isinstance(rng, np.random.Generator):
        raise ValueError(f"invalid rng {rng!r}: must be a numpy.random.Generator or None")
    # Every true mean coordinate lies in [0, C] (each clipped coordinate does); the cap of 80
    # keeps expm1 inside float32.
    means = np.clip(sums / np.maximum(counts, 1.0)[:, None], 0.0, min(cfg.clip_norm, _MAX_LOG_AMPLITUDE))
    size = _window_size(h, w, cfg.beta)
    log_amp = torch.from_numpy(means).reshape(-1, c, size, size)
    amp = _symmetrise(torch.clamp(torch.expm1(log_amp), min=0.0)).to(torch.float32)
    return StyleBank(amplitudes=amp, beta=cfg.beta, image_shape=(c, h, w), clip_norm=cfg.clip_norm,
                     noise_multiplier=cfg.noise_multiplier)
