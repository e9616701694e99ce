"""Sanity checks of a DP configuration: refuse settings that give no meaningful guarantee."""

from __future__ import annotations

from fedsilo.privacy.accounting.releases import _check_count, _check_positive, _is_real


def check_privacy_config(
    *,
    epsilon: float,
    delta: float,
    noise_multiplier: float,
    clip_norm: float,
    dataset_size: int,
) -> None:
    """Refuse a DP configuration that cannot give a meaningful guarantee, naming the field.

    δ must be below 1/n: a mechanism that publishes one random record outright is
    (0, 1/n)-DP, so δ ≥ 1/n permits exactly that.

    Args:
        epsilon: The ε budget, > 0 and finite.
        delta: δ, in (0, 1/dataset_size).
        noise_multiplier: σ with DP on, > 0.
        clip_norm: C, the L2 clip norm, > 0.
        dataset_size: n, the number of records (≥ 1).

    Raises:
        ValueError: The first bad field, by name, with its value.
    """
    _check_positive("epsilon", epsilon)
    n = _check_count("dataset_size", dataset_size)
    if not _is_real(delta) or not 0.0 < float(delta) < 1.0 / n:
        raise ValueError(
            f"invalid delta {delta!r}: must be in (0, 1/dataset_size) = (0, {1.0 / n:.6g})"
        )
    _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("clip_norm", clip_norm)
