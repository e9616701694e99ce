"""Release builders the accountant tests share: DP-SGD steps and full-batch Gaussian releases."""

from __future__ import annotations

from fedsilo.privacy.accounting import Mechanism, Neighbouring, Release


def dpsgd(*, q: float, sigma: float, steps: int, relation: Neighbouring = Neighbouring.RECORD) -> Release:
    """``steps`` DP-SGD steps: Poisson rate ``q``, noise multiplier ``sigma``."""
    return Release(mechanism=Mechanism.SUBSAMPLED_GAUSSIAN, neighbouring=relation, noise_multiplier=sigma,
                   sample_rate=q, steps=steps)


def gaussian(*, sigma: float, steps: int = 1, relation: Neighbouring = Neighbouring.RECORD) -> Release:
    """``steps`` full-batch Gaussian releases of noise multiplier ``sigma``."""
    return Release(mechanism=Mechanism.GAUSSIAN, neighbouring=relation, noise_multiplier=sigma, sample_rate=1.0,
                   steps=steps)
