"""Tests of fedsilo.models.style: style banks and spectral (Fourier amplitude) style transfer."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.models.style import (
    StyleBank,
    StyleBankConfig,
    amplitude_window,
    build_style_bank,
    low_freq_window,
)
from fedsilo.models.style import _cluster_sums, _dp_assign
from fedsilo.models.style_transfer import _transfer_spectrum, simulate_styles, spectral_transfer
from fedsilo.models.synthetic import SyntheticConfig, silo_splits
from fedsilo.privacy.accounting import Mechanism, Neighbouring, Release

NO_DP = StyleBankConfig(clip_norm=1e6, noise_multiplier=0.0)


@pytest.fixture(scope="module")
def domains() -> tuple[torch.Tensor, torch.Tensor]:
    cfg = SyntheticConfig(seed=3, n_train=8, n_val=0, n_test=0)
    return silo_splits(cfg, 0).train.images, silo_splits(cfg, 1).train.images


def _random_images(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(n, c, h + 4, w + 4, generator=g), 5, stride=1)
    return (smooth + 0.1 * torch.randn(n, c, h, w, generator=g) + 0.5).to(torch.float32)


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x.to(torch.float64)), dim=(-2, -1))


# --- window -------------------------------------------------------------------------------


def test_window_is_centred_and_closed_under_negation() -> None:
    assert low_freq_window(64, 64, 0.05) == (slice(29, 36), slice(29, 36))  # b = floor(3.2) = 3
    assert low_freq_window(32, 40, 0.01) == (slice(15, 18), slice(19, 22))  # b = max(1, 0) = 1
    for h, w, beta in [(64, 64, 0.5), (33, 32, 0.5), (31, 48, 0.2), (3, 3, 0.5), (64, 16, 0.1)]:
        rows, cols = low_freq_window(h, w, beta)
        assert rows.stop - rows.start == cols.stop - cols.start
        for axis_len, sl in ((h, rows), (w, cols)):
            freqs = np.fft.fftshift(np.fft.fftfreq(axis_len, d=1.0 / axis_len))[sl].round().astype(int)
            assert sorted(freqs.tolist()) == sorted((-freqs).tolist()), (h, w, beta)
            assert freqs[len(freqs) // 2] == 0


@pytest.mark.parametrize(
    ("h", "w", "beta", "name"),
    [(2, 8, 0.1, "height"), (8, 2, 0.1, "width"), (8, 8, 0.0, "beta"), (8, 8, 0.51, "beta"), (8, 8, math.nan, "beta")],
)
def test_window_rejects_bad_arguments(h: int, w: int, beta: float, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        low_freq_window(h, w, beta)


def test_amplitude_window_matches_manual_fft() -> None:
    x = _random_images(3, 2, 32, 24, seed=1)
    win = amplitude_window(x, 0.1)
    rows, cols = low_freq_window(32, 24, 0.1)
    assert win.shape == (3, 2, 5, 5) and win.dtype == torch.float32
    torch.testing.assert_close(win, _spectrum(x)[..., rows, cols].abs().float())


# --- transfer -----------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "beta"), [((2, 32, 40), 0.1), ((1, 33, 31), 0.2), ((3, 16, 16), 0.5)])
def test_acceptance_transfer_keeps_phase_and_changes_only_the_window(shape: tuple[int, int, int], beta: float) -> None:
    c, h, w = shape
    image = _random_images(1, c, h, w, seed=2)[0]
    bank = build_style_bank(
        3.0 * _random_images(5, c, h, w, seed=3) ** 2, StyleBankConfig(clip_norm=1e6, noise_multiplier=0.0, beta=beta)
    )
    lam = 0.6
    raw = _transfer_spectrum(image, bank, lam, 0)
    assert raw.imag.abs().max() <= 1e-9 * raw.real.abs().max()  # Hermitian: real up to float error
    out = spectral_transfer(image, bank, lam=lam, cluster=0)
    assert out.shape == image.shape and out.dtype == torch.float32

    before, after = _spectrum(image), _spectrum(out)
    scale = before.abs().max()
    tol = 1e-5 * scale
    significant = (before.abs() > 1e-3 * scale) & (after.abs() > 1e-3 * scale)
    dphi = torch.angle(after * before.conj())[significant]
    assert dphi.abs().max() < 1e-3
    rows, cols = low_freq_window(h, w, beta)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[rows, cols] = True
    assert (after.abs() - before.abs())[:, ~inside].abs().max() <= tol
    blend = (1 - lam) * before.abs()[:, rows, cols] + lam * bank.amplitudes[0].double()
    assert (after.abs()[:, rows, cols] - blend).abs().max() <= tol
    assert (blend - before.abs()[:, rows, cols]).abs().max() > 100 * tol  # the window really changed


def test_lambda_zero_is_identity_and_lambda_one_puts_the_bank_amplitude(domains) -> None:
    x0, x1 = domains
    bank = build_style_bank(x1, NO_DP)
    image = x0[0]
    torch.testing.assert_close(spectral_transfer(image, bank, lam=0.0, cluster=0), image, atol=1e-5, rtol=0)
    out = spectral_transfer(image, bank, lam=1.0, cluster=0)
    torch.testing.assert_close(amplitude_window(out[None], bank.beta)[0], bank.amplitudes[0], rtol=1e-4, atol=1e-2)
    assert not torch.allclose(amplitude_window(image[None], bank.beta)[0], bank.amplitudes[0], rtol=1e-2)


def test_transfer_rejects_mismatches(domains) -> None:
    x0, x1 = domains
    bank = build_style_bank(x1, NO_DP)
    with pytest.raises(ValueError, match="shape"):
        spectral_transfer(x0[0, :, :32, :32], bank, lam=0.5, cluster=0)
    with pytest.raises(ValueError, match="lam"):
        spectral_transfer(x0[0], bank, lam=1.5, cluster=0)
    with pytest.raises(ValueError, match="cluster"):
        spectral_transfer(x0[0], bank, lam=0.5, cluster=bank.clusters)
    with pytest.raises(ValueError, match="bank"):
        spectral_transfer(x0[0], "bank", lam=0.5, cluster=0)  # type: ignore[arg-type]


def test_simulate_styles_is_reproducible_and_uses_the_given_banks(domains) -> None:
    x0, x1 = domains
    banks = [build_style_bank(x1, NO_DP)]
    a = simulate_styles(x0, banks, generator=torch.Generator().manual_seed(7))
    b = simulate_styles(x0, banks, generator=torch.Generator().manual_seed(7))
    c = simulate_styles(x0, banks, generator=torch.Generator().manual_seed(8))
    assert a.shape == x0.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Reproduce the first image from the documented draw order: bank, cluster, λ.
    g = torch.Generator().manual_seed(7)
    which = int(torch.randint(1, (1,), generator=g))
    cluster = int(torch.randint(banks[which].clusters, (1,), generator=g))
    lam = float(torch.rand((), generator=g, dtype=torch.float64))
    torch.testing.assert_close(a[0], spectral_transfer(x0[0], banks[which], lam=lam, cluster=cluster))
    with pytest.raises(ValueError, match="banks"):
        simulate_styles(x0, [], generator=g)
    with pytest.raises(ValueError, match="image_shape"):
        simulate_styles(x0[:, :, :32, :32], banks, generator=g)


# --- bank contents and privacy ------------------------------------------------------------


def test_bank_holds_no_per_image_data(domains) -> None:
    _, x1 = domains
    for clusters in (1, 3, 4, 20):
        bank = build_style_bank(x1, StyleBankConfig(clip_norm=1e6, noise_multiplier=0.0, clusters=clusters))
        assert bank.amplitudes.shape[1:] == (1, 7, 7)
        assert 1 <= bank.clusters <= min(clusters, x1.shape[0])
        assert bool((bank.amplitudes >= 0).all())
        torch.testing.assert_close(bank.amplitudes, bank.amplitudes.flip(-2, -1))  # symmetric
    # One cluster: exactly the geometric-style mean of the log1p windows, not any single image.
    bank = build_style_bank(x1, StyleBankConfig(clip_norm=1e6, noise_multiplier=0.0, clusters=1))
    mean = torch.expm1(torch.log1p(amplitude_window(x1, 0.05).double()).mean(0)).float()
    torch.testing.assert_close(bank.amplitudes[0], mean, rtol=1e-4, atol=1e-4)
    # Identical images collapse into one cluster whatever k is.
    same = build_style_bank(x1[:1].repeat(5, 1, 1, 1), StyleBankConfig(clip_norm=1e6, noise_multiplier=0.0))
    assert same.clusters == 1
    # k-means with k = 2 on two clearly different styles finds them (the bank means of each).
    groups = [_random_images(4, 1, 64, 64, seed=20), 30.0 * _random_images(5, 1, 64, 64, seed=21)]
    mixed = build_style_bank(torch.cat(groups), StyleBankConfig(clip_norm=1e6, noise_multiplier=0.0, clusters=2))
    assert mixed.clusters == 2
    own = [build_style_bank(x, StyleBankConfig(clip_norm=1e6, noise_multiplier=0.0, clusters=1)).amplitudes[0]
           for x in groups]
    found = sorted(mixed.amplitudes, key=lambda a: float((a - own[0]).norm()))
    for got, want in zip(found, own, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    # k-means is deterministic for a seed.
    a = build_style_bank(x1, StyleBankConfig(clip_norm=1e6, noise_multiplier=0.0, clusters=3, seed=5))
    b = build_style_bank(x1, StyleBankConfig(clip_norm=1e6, noise_multiplier=0.0, clusters=3, seed=5))
    assert torch.equal(a.amplitudes, b.amplitudes)


def test_clipping_bounds_one_images_contribution(domains) -> None:
    x0, x1 = domains
    clip = 20.0
    cfg = StyleBankConfig(clip_norm=clip, noise_multiplier=1.0, clusters=4)
    data = torch.cat([x0, x1])
    outlier = 1000.0 * _random_images(1, 1, 64, 64, seed=9)
    sums, counts = _cluster_sums(data, cfg)
    sums2, counts2 = _cluster_sums(torch.cat([data, outlier]), cfg)
    assert sums.shape == sums2.shape == (4, 49) and counts.shape == (4,)  # every bin, empty or not
    assert counts.sum() == data.shape[0] and counts2.sum() == data.shape[0] + 1
    changed = np.flatnonzero(np.abs(sums2 - sums).sum(1) > 0)
    assert changed.size == 1  # one image, one cluster
    assert np.linalg.norm(sums2 - sums) <= clip * (1 + 1e-9)
    assert np.abs(counts2 - counts).sum() == 1
    full = np.concatenate([sums2 - sums, clip * (counts2 - counts)[:, None]], axis=1)
    bank = build_style_bank(data, cfg, rng=np.random.default_rng(0))
    assert np.linalg.norm(full) <= bank.sensitivity * (1 + 1e-9)
    # The assignment is record-local: adding an image never moves the others (unlike k-means).
    assert np.array_equal(_dp_assign(data, 0.05, 4), _dp_assign(torch.cat([data, outlier]), 0.05, 4)[:-1])


def test_release_parameters_for_the_ledger(domains) -> None:
    _, x1 = domains
    bank = build_style_bank(x1, StyleBankConfig(clip_norm=40.0, noise_multiplier=1.3), rng=np.random.default_rng(1))
    assert bank.release == Release(
        mechanism=Mechanism.GAUSSIAN, neighbouring=Neighbouring.RECORD, noise_multiplier=1.3, sample_rate=1.0, steps=1
    )
    assert bank.sensitivity == pytest.approx(math.sqrt(2) * 40.0)
    assert 1 <= bank.clusters <= 4
    assert build_style_bank(x1, NO_DP).release is None


def test_dp_noise_has_the_documented_scale(domains) -> None:
    _, x1 = domains  # 8 images, all in one octave bin for this domain
    clip, sigma = 50.0, 0.05
    cfg = StyleBankConfig(clip_norm=clip, noise_multiplier=sigma, clusters=1)
    rng = np.random.default_rng(11)
    logs = torch.stack([torch.log1p(build_style_bank(x1, cfg, rng=rng).amplitudes[0, 0].double()) for _ in range(200)])
    off_centre = logs.std(0).flatten()
    off_centre = torch.cat([off_centre[:24], off_centre[25:]])  # drop the self-paired centre bin
    # Sum noise σ·√2·C per coordinate, divided by n = 8, halved in variance by symmetrising.
    expected = sigma * math.sqrt(2) * clip / 8 / math.sqrt(2)
    assert float(off_centre.median()) == pytest.approx(expected, rel=0.2)
    clean = torch.log1p(build_style_bank(x1, StyleBankConfig(clip_norm=clip, noise_multiplier=0.0, clusters=1))
                        .amplitudes[0, 0].double())
    assert float((logs.mean(0) - clean).abs().max()) < 4 * expected  # unbiased up to count noise


# --- serialisation ------------------------------------------------------------------------


def test_serialisation_round_trip_is_canonical(domains) -> None:
    _, x1 = domains
    bank = build_style_bank(x1, StyleBankConfig(clip_norm=40.0, noise_multiplier=0.7), rng=np.random.default_rng(2))
    blob = bank.to_bytes()
    back = StyleBank.from_bytes(blob)
    assert torch.equal(back.amplitudes, bank.amplitudes)
    assert (back.beta, back.image_shape, back.clip_norm, back.noise_multiplier) == (
        bank.beta, bank.image_shape, bank.clip_norm, bank.noise_multiplier)
    assert back.to_bytes() == blob
    assert len(blob) < 8 + 300 + 4 * bank.amplitudes.numel()  # compact


def _blob(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"FSSB" + struct.pack(">I", len(raw)) + raw + data


def test_malformed_blobs_are_refused(domains) -> None:
    _, x1 = domains
    bank = build_style_bank(x1, NO_DP)
    blob = bank.to_bytes()
    (n,) = struct.unpack(">I", blob[4:8])
    header, data = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    bad = [
        b"",
        blob[:-1],
        blob + b"\0",
        b"XXXX" + blob[4:],
        blob[:4] + struct.pack(">I", 10**6) + blob[8:],
        b"FSSB" + struct.pack(">I", n + 1) + blob[8 : 8 + n] + b" " + data,  # non-canonical spacing
        _blob({**header, "extra": 1}, data),
        _blob({k: v for k, v in header.items() if k != "beta"}, data),
        _blob({**header, "version": 2}, data),
        _blob({**header, "clusters": 2}, data),
        _blob({**header, "window": [5, 5]}, data),
        _blob({**header, "image_shape": [1, 64, 64.0]}, data),
        _blob({**header, "image_shape": 64}, data),
        _blob({**header, "window": "7x7"}, data),
        _blob({**header, "beta": 0.9}, data),
        _blob({**header, "noise_multiplier": -1}, data),
        _blob({**header, "beta": True}, data),
        _blob(header, np.full(49, -1.0, dtype="<f4").tobytes()),
        _blob(header, np.full(49, np.nan, dtype="<f4").tobytes()),
    ]
    for b in bad:
        with pytest.raises(ValueError):
            StyleBank.from_bytes(b)
    with pytest.raises(ValueError):
        StyleBank.from_bytes("not bytes")  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(pos=st.integers(min_value=0, max_value=10_000), byte=st.integers(min_value=0, max_value=255),
       cut=st.integers(min_value=0, max_value=10_000))
def test_corrupted_blobs_parse_or_raise_value_error(pos: int, byte: int, cut: int) -> None:
    bank = StyleBank(amplitudes=torch.ones(2, 1, 3, 3), beta=0.05, image_shape=(1, 32, 32), clip_norm=1.0,
                     noise_multiplier=0.0)
    blob = bytearray(bank.to_bytes())
    blob[pos % len(blob)] = byte
    blob = blob[: len(blob) - cut % 4] if cut % 3 == 0 else blob
    try:
        back = StyleBank.from_bytes(bytes(blob))
    except ValueError:
        return
    assert back.to_bytes() == bytes(blob)


def test_bank_and_config_validation() -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        StyleBankConfig(clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        StyleBankConfig(clip_norm=1.0, noise_multiplier=-0.1)
    with pytest.raises(ValueError, match="clusters"):
        StyleBankConfig(clip_norm=1.0, noise_multiplier=0.0, clusters=0)
    with pytest.raises(ValueError, match="beta"):
        StyleBankConfig(clip_norm=1.0, noise_multiplier=0.0, beta=0.6)
    cfg = StyleBankConfig(clip_norm=3.0, noise_multiplier=0.5, clusters=2, seed=4)
    assert StyleBankConfig.from_mapping(cfg.to_mapping()) == cfg
    with pytest.raises(ValueError, match="amplitudes"):
        StyleBank(amplitudes=torch.ones(1, 1, 5, 5), beta=0.05, image_shape=(1, 32, 32), clip_norm=1.0,
                  noise_multiplier=0.0)
    with pytest.raises(ValueError, match="amplitudes"):
        StyleBank(amplitudes=-torch.ones(1, 1, 3, 3), beta=0.05, image_shape=(1, 32, 32), clip_norm=1.0,
                  noise_multiplier=0.0)
    with pytest.raises(ValueError, match="images"):
        build_style_bank(torch.ones(3, 32, 32), cfg)
    with pytest.raises(ValueError, match="rng"):
        build_style_bank(torch.ones(2, 1, 32, 32), cfg, rng=3)  # type: ignore[arg-type]


# --- built-in data ------------------------------------------------------------------------


def test_domain_transfer_moves_low_frequencies_toward_the_other_domain(domains) -> None:
    x0, x1 = domains
    bank = build_style_bank(x1, StyleBankConfig(clip_norm=1e6, noise_multiplier=0.0, clusters=1))
    target = torch.log1p(amplitude_window(x1, 0.05).double()).mean(0)  # domain 1's own images

    def distance(lam: float) -> float:
        out = torch.stack([spectral_transfer(img, bank, lam=lam, cluster=0) for img in x0])
        return float((torch.log1p(amplitude_window(out, 0.05).double()) - target).flatten(1).norm(dim=1).mean())

    d = [distance(lam) for lam in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(a > b for a, b in zip(d, d[1:], strict=False)), d
    assert d[-1] < 0.5 * d[0], d
