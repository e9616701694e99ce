"""Disclosures: releases the ledger does not account, stated in every report built from a state dir."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsilo.core.atomic import atomic_write
from fedsilo.privacy.audit.report import AuditError


#: Statements about releases the ledger does not account (e.g. ResFIM masks protected by
#: encryption only), written into a state directory by whoever makes them; every report built
#: from that directory carries them.
DISCLOSURES_FILE = "privacy_disclosures.json"
_DISCLOSURE_KEYS = frozenset({"topic", "statement"})


def resfim_disclosures(*, rho: float, recompute_every: int, beta: float, clusters: int,
                       plan: Any = None) -> list[dict[str, str]]:
    """What a pFL-ResFIM run shares, in words for the privacy officer.

    Args:
        rho, recompute_every, beta, clusters: the run's ResFIM settings.
        plan: The run's `PrivacyPlan` when its masks and style banks are differentially private
            (``plan.resfim_every > 0``): the statements then say how to find their ledger
            entries. None: they are protected by encryption only, and the statements say so.
    """
    if plan is not None and plan.resfim_every:
        c_f, c_s = float(plan.fisher_clip_norm), float(plan.style_clip_norm)
        return [
            {"topic": "ResFIM masks (differentially private, in the ledger)", "statement": (
                f"Each silo keeps local the top {rho:g} of every tensor by Residual Fisher Information, "
                f"recomputed every {recompute_every} round(s). The Fisher information is computed with DP: every "
                f"example's gradient is clipped to L2 norm {c_f:g}, and Gaussian noise of std "
                f"{plan.fisher_noise_multiplier:g} x {c_f:g}^2 is added to the sums of squared gradients, once on "
                "the silo's images and once on their re-styled twins. Each mask computation is one ledger entry: "
                f"mechanism gaussian, record-level, sigma = {plan.fisher_noise_multiplier:g}, q = 1, steps = 2, "
                f"C = {c_f ** 2:g}. The masks are post-processing of these releases. The coordinator sees "
                "only ciphertexts and never a mask; the other silos decrypt, per element, the total weight of "
                "the silos that share it.")},
            {"topic": "ResFIM style banks (differentially private, in the ledger)", "statement": (
                f"Once per run each silo shares a style bank: the low-frequency window (beta = {beta:g}) of the "
                "Fourier log-amplitude spectra of its training images, each clipped to L2 norm "
                f"{c_s:g}, summed in up to {clusters} bins chosen by a data-independent rule, with the counts, "
                f"in one Gaussian release: ledger entry gaussian, record-level, sigma = "
                f"{plan.style_noise_multiplier:g}, q = 1, steps = 1, C = {2 ** 0.5 * c_s:.6g} (sqrt(2) x "
                f"{c_s:g}). The bank is sealed (AES-256-GCM under a key derived from the run's shared secret "
                "key, which the coordinator does not hold), so only the other silos can read it.")},
            _CONSENSUS_DISCLOSURE,
        ]
    return [
        {"topic": "ResFIM masks (protected by encryption only)", "statement": (
            f"Each silo decides which parameter elements it keeps local: the top {rho:g} of every tensor by "
            "Residual Fisher Information, computed from its own training images and those images re-styled "
            f"toward the other silos' style banks, recomputed every {recompute_every} round(s). These masks are "
            "computed WITHOUT differential-privacy noise and have no ledger entry: they are protected by "
            "encryption only. The coordinator sees only ciphertexts of w*m*theta, w*m and w*(1-m)*theta "
            "(m = 1 where the element is shared) and never a mask. Every silo decrypts, per element, the sum "
            "of the weights of the silos that share it: with two silos each learns the other's mask, with "
            "more silos how many share each element.")},
        {"topic": "ResFIM style banks (not differentially private)", "statement": (
            f"Once per run each silo shares a style bank: up to {clusters} cluster means (k-means) of the "
            f"low-frequency window (beta = {beta:g}) of the Fourier log-amplitude spectra of its training "
            "images. No per-image spectra, no phases and no pixels leave the silo. The bank is sealed "
            "(AES-256-GCM under a key derived from the run's shared secret key, which the coordinator does not "
            "hold), so only the other silos can read it. It has no noise and no ledger entry: it reveals the "
            "average scanner appearance (brightness, contrast, blur) of groups of the silo's images, and a "
            "cluster of few images comes close to those images' own low-frequency amplitudes.")},
        _CONSENSUS_DISCLOSURE,
    ]


def fedrdn_disclosures(*, channels: int | None = None) -> list[dict[str, str]]:
    """What a FedRDN run shares besides its model updates, in words for the privacy officer.

    Args:
        channels: the images' channel count C, when known.
    """
    c = f"{channels}" if channels is not None else "C"
    return [{"topic": "FedRDN normalisation statistics (not differentially private)", "statement": (
        f"Once per run each silo shares 2 x {c} numbers: the mean and standard deviation, per image channel, of all "
        "pixels of its training images (FedRDN normalises each training image with a randomly drawn silo's "
        "statistics). They are computed without noise and have no ledger entry: they are a deterministic "
        "function of the training data and reveal the silo's average image brightness and contrast. They are "
        "sealed (AES-256-GCM under a key derived from the run's shared secret key, which the coordinator does "
        "not hold), so only the other silos can read them.")}]


_CONSENSUS_DISCLOSURE = {"topic": "ResFIM consensus model", "statement": (
    "For the consensus model (used on unseen domains) each silo also uploads, encrypted, its weighted "
    "values of the elements it keeps local; the silos decrypt only their sum over all silos. These "
    "values come from the same DP-SGD training as the shared ones (record-level runs), so they are "
    "covered by the ledger's record-level entries.")}


def write_disclosures(state_dir: Path | str, disclosures: Sequence[Mapping[str, str]]) -> Path:
    """Writes the disclosures of a run into a state directory (atomically); reports built there carry them."""
    items = [_checked_disclosure(d, f"disclosures[{i}]") for i, d in enumerate(disclosures)]
    path = Path(state_dir) / DISCLOSURES_FILE
    atomic_write(path, (json.dumps(items, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def _checked_disclosure(item: object, where: str) -> dict[str, str]:
    if not isinstance(item, Mapping) or set(item) != _DISCLOSURE_KEYS:
        raise AuditError(f"{where}: a disclosure is an object with exactly the fields topic and statement")
    if not all(isinstance(item[k], str) and item[k] for k in _DISCLOSURE_KEYS):
        raise AuditError(f"{where}: topic and statement must be non-empty text")
    return {"topic": item["topic"], "statement": item["statement"]}


def _read_disclosures(state_dir: Path) -> list[dict[str, str]]:
    path = state_dir / DISCLOSURES_FILE
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(data, list):
        raise AuditError(f"{str(path)!r} must hold a list of disclosures")
    return [_checked_disclosure(d, f"{path.name}[{i}]") for i, d in enumerate(data)]
