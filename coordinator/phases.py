"""Which shared tensors each round carries (DEeR alternates LoRA factors), and ledger positions."""

from __future__ import annotations

import enum
from dataclasses import replace

from fedsilo.coordinator.config import Strategy
from fedsilo.coordinator.tensors import Manifest

__all__ = ["MASK_SUFFIXES", "SharePhase", "carries_local_part", "ledger_position", "masked_manifest", "phase_for",
           "phase_manifest", "shared_numel"]

LORA_A_MARK = ".lora_A."
LORA_B_MARK = ".lora_B."
#: Masked uploads (pFL-ResFIM) carry, after the shared tensors' w·s⊙θ, one companion set per
#: suffix: the weight mask w·s and the local part w·(1−s)⊙θ (see fedsilo.silo_agent.masked).
MASK_SUFFIXES = ("--share-weight", "--local-part")


class SharePhase(enum.Enum):
    """The subset of the run's shared tensors a round uploads and aggregates."""

    ALL = "all"
    LORA_B = "lora_b"
    LORA_A = "lora_a"


def phase_for(strategy: Strategy, rnd: int) -> SharePhase:
    """The phase of round ``rnd`` (1-based).

    DEeR (Zhu, Mao, Liu, Yuan 2024, arXiv:2410.12926) alternates: odd rounds share only B with A frozen, even rounds
    only A with B frozen, so every round's mean of products equals the product of means.
    Every other strategy shares its whole manifest every round.
    """
    if strategy.alternates_factors:
        return SharePhase.LORA_B if rnd % 2 == 1 else SharePhase.LORA_A
    return SharePhase.ALL


def phase_manifest(manifest: Manifest, phase: SharePhase) -> Manifest:
    """The run's manifest restricted to one phase (the tensor order is kept)."""
    if phase is SharePhase.ALL:
        return manifest
    mark = LORA_B_MARK if phase is SharePhase.LORA_B else LORA_A_MARK
    return Manifest(tensors=tuple(t for t in manifest.tensors if mark in t.name))


def masked_manifest(manifest: Manifest, *, local_part: bool = True) -> Manifest:
    """The layout of a masked upload: the round's tensors, then each companion set in order.

    Every companion tensor has its tensor's shape and dtype; the coordinator adds all of them as
    ciphertexts like any other and never sees a mask (they are inside the encryption). The
    local-part set only serves the consensus model, so rounds that do not need it leave it out
    (see `carries_local_part`).
    """
    suffixes = MASK_SUFFIXES if local_part else MASK_SUFFIXES[:1]
    extra = tuple(replace(t, name=t.name + suffix) for suffix in suffixes for t in manifest.tensors)
    return Manifest(tensors=manifest.tensors + extra)


def carries_local_part(strategy: Strategy, rnd: int, total_rounds: int) -> bool:
    """Whether masked round ``rnd`` uploads the local parts too: only the rounds whose sums make the
    final consensus model (the last round; with alternating LoRA factors, the last two, one per
    factor). The other rounds upload two sets instead of three."""
    return rnd > total_rounds - (2 if strategy.alternates_factors else 1)


def shared_numel(layout: Manifest) -> int:
    """Parameters a (possibly masked) upload layout shares: its tensors without the companion sets."""
    return sum(t.numel for t in layout.tensors if not t.name.endswith(MASK_SUFFIXES))


def ledger_position(strategy: Strategy, rnd: int) -> tuple[int, int]:
    """(round, upload index) under which round ``rnd``'s release is written in a privacy ledger.

    A DEeR round is two uploads, B then A: coordinator rounds 2k−1 and 2k are DEeR round k,
    uploads 0 and 1. Other strategies upload once per round.
    """
    if strategy.alternates_factors:
        return (rnd + 1) // 2, (rnd + 1) % 2
    return rnd, 0
