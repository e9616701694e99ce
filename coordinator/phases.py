"""Which share phase each round of a strategy carries, and where its release sits in a privacy ledger."""

from __future__ import annotations

from fedsilo.coordinator.config import Strategy
from fedsilo.core.phases import SharePhase

__all__ = ["carries_local_part", "ledger_position", "phase_for"]


def phase_for(strategy: Strategy, rnd: int) -> SharePhase:
    """The phase of round ``rnd`` (1-based).

    DEeR (Zhu, Mao, Liu, Yuan 2024, arXiv:2410.12926) alternates: odd rounds share only B with A frozen, even rounds
    only A with B frozen, so every round's mean of products equals the product of means.
    Every other strategy shares its whole manifest every round.
    """
    if strategy.alternates_factors:
        return SharePhase.LORA_B if rnd % 2 == 1 else SharePhase.LORA_A
    return SharePhase.ALL


def carries_local_part(strategy: Strategy, rnd: int, total_rounds: int) -> bool:
    """Whether masked round ``rnd`` uploads the local parts too: only the rounds whose sums make the
    final consensus model (the last round; with alternating LoRA factors, the last two, one per
    factor). The other rounds upload two sets instead of three."""
    return rnd > total_rounds - (2 if strategy.alternates_factors else 1)


def ledger_position(strategy: Strategy, rnd: int) -> tuple[int, int]:
    """(round, upload index) under which round ``rnd``'s release is written in a privacy ledger.

    A DEeR round is two uploads, B then A: coordinator rounds 2k−1 and 2k are DEeR round k,
    uploads 0 and 1. Other strategies upload once per round.
    """
    if strategy.alternates_factors:
        return (rnd + 1) // 2, (rnd + 1) % 2
    return rnd, 0
