"""One empirical audit end to end: draw the secret, train with canaries, guess, bound ε, compare with the ledger."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsilo.privacy.accounting import LEDGER_RDP_ORDERS, Neighbouring, RdpAccountant, Release, pld_or_none
from fedsilo.privacy.audit.empirical import empirical_audit_record, tightest_claim
from fedsilo.privacy.audit.membership import MembershipResult
from fedsilo.privacy.audit.one_run import OneRunBound, one_run_audit
from fedsilo.privacy.signed import now_text
from fedsilo.silo_agent.empirical.config import EmpiricalAuditConfig
from fedsilo.silo_agent.empirical.fault import injected_noise_scale
from fedsilo.silo_agent.empirical.record import record_level_scores
from fedsilo.silo_agent.empirical.silo import silo_level_scores

__all__ = ["EmpiricalAuditOutcome", "run_empirical_audit"]


@dataclass(frozen=True, kw_only=True)
class EmpiricalAuditOutcome:
    """An audit's result: ε̂ beside the ledger's ε, the attack per silo, and the time it took.

    Attributes:
        config: What was audited.
        bound: ε̂ (``bound.epsilon_lower``) and the guess counts it came from.
        release: The release the ledger is charged for.
        ledger_epsilon: Its ε at ``config.delta`` (RDP on the ledger's orders, as the agent's ledger).
        ledger_epsilon_pld: The same by PLD (the ledger's tighter figure; None beyond its size guard).
        noise_scale_actual: 1.0, or the testing fault switch's scale.
        membership: The loss-threshold attack per silo.
        seconds: Wall time of the whole audit.
    """

    config: EmpiricalAuditConfig
    bound: OneRunBound
    release: Release
    ledger_epsilon: float
    ledger_epsilon_pld: float | None
    noise_scale_actual: float
    membership: dict[str, MembershipResult]
    seconds: float

    @property
    def claimed_epsilon(self) -> float:
        """The tightest ε the ledger states for the release (PLD where stated, else RDP)."""
        return tightest_claim(self.ledger_epsilon, self.ledger_epsilon_pld)

    @property
    def exceeds_ledger(self) -> bool:
        """Whether ε̂ > the ledger's tightest ε: the training leaks more than its ledger claims."""
        return self.bound.epsilon_lower > self.claimed_epsilon

    def record(self) -> dict[str, Any]:
        """The JSON-ready record for ``empirical_audit.json`` (see `append_empirical_audit`)."""
        return empirical_audit_record(
            bound=self.bound, mode=self.config.mode, release=self.release, ledger_epsilon=self.ledger_epsilon,
            ledger_epsilon_pld=self.ledger_epsilon_pld,
            noise_scale_actual=self.noise_scale_actual, membership=self.membership, seconds=self.seconds,
            created_at=now_text(),
        )


def run_empirical_audit(config: EmpiricalAuditConfig) -> EmpiricalAuditOutcome:
    """Runs one audit (Steinke, Nasr & Jagielski 2023, Algorithm 1, with ε̂ by their main theorem).

    Each of the m canaries is included with probability ½ by a secret drawn from the OS
    (``secrets``; from the seed when one is given) and seen only here; the training run gets
    only the resulting data. After training every canary is scored; for each (k+, k−) of
    ``config.guess_sizes`` the top k+ are guessed in and the bottom k− out, and ε̂ is the
    best lower bound, Bonferroni-corrected over the tries (see `one_run_audit`).

    Args:
        config: The audit.

    Returns:
        The outcome.

    Raises:
        FaultSwitchError: If the testing fault switch's variable is set badly.
    """
    start = time.perf_counter()
    noise_scale = injected_noise_scale()
    seed = config.seed if config.seed is not None else secrets.randbits(128)
    secret = np.random.default_rng([seed, 0x5EC2E7])
    included = secret.random(config.canaries) < 0.5
    rng = np.random.default_rng([seed, 0xDA7A])
    run = record_level_scores if config.level is Neighbouring.RECORD else silo_level_scores
    scores = run(config, rng=rng, included=included, noise_scale=noise_scale)
    bound = one_run_audit(scores.scores, included, guess_sizes=config.guess_sizes, delta=config.delta,
                          confidence=config.confidence)
    release = config.release
    ledger = RdpAccountant(orders=LEDGER_RDP_ORDERS).epsilon([release], delta=config.delta).epsilon
    return EmpiricalAuditOutcome(
        config=config, bound=bound, release=release, ledger_epsilon=ledger,
        ledger_epsilon_pld=pld_or_none([release], delta=config.delta), noise_scale_actual=noise_scale,
        membership=scores.membership, seconds=time.perf_counter() - start,
    )
