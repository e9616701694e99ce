"""RDP against PLD on the demo's privacy plan: σ for the same ε target, and the rounds a budget affords (issue 19).

For the demo's record-level plan (``fedsilo.silo_agent.presets.DEMO_PRIVACY``: q = 0.25, 12 DP-SGD
steps per round, δ = 1e-5) this prints, for each accountant the ledger states (RDP on integer orders
through dp_accounting, as the coordinator calibrates; PLD through dp_accounting, pessimistic, grid
1e-4):

- the σ that `calibrate_noise` finds for the target ε over ``--rounds`` rounds (what
  ``[privacy] target_epsilon`` gives with ``[privacy] accountant``), and the seconds it took;
- with one fixed σ (the RDP-calibrated one, so both columns describe the same training), how many
  rounds a budget of ``--budget`` affords before the next round would exceed it (what the agent's
  refusal checks, `fedsilo.privacy.plan.projected_spend`), and the ε after that many rounds by both.

Everything is computed here (no table is stored); the demo's Dice under each accountant comes from
``fedsilo demo --accountant rdp|pld`` (see the README).

Usage::

    .venv/bin/python benchmarks/accountants.py [--target 8] [--rounds 5] [--budget 8]
"""

from __future__ import annotations

import argparse
import time

from fedsilo.privacy.accounting import (
    LEDGER_RDP_ORDERS,
    DpAccountingVerifier,
    Mechanism,
    Neighbouring,
    PldAccountant,
    Release,
    calibrate_noise,
)
from fedsilo.silo_agent.presets import DEMO_PRIVACY


def _run(sigma: float, rounds: int) -> list[Release]:
    return [Release(mechanism=Mechanism.SUBSAMPLED_GAUSSIAN, neighbouring=Neighbouring.RECORD, noise_multiplier=sigma,
                    sample_rate=DEMO_PRIVACY["sample_rate"], steps=DEMO_PRIVACY["steps_per_round"] * rounds)]


def _afforded(accountant, sigma: float, budget: float, delta: float, most: int = 10_000) -> int:
    """The largest number of rounds whose ε stays within the budget (bisection; ε grows with rounds)."""
    if accountant.epsilon(_run(sigma, 1), delta=delta).epsilon > budget:
        return 0
    lo, hi = 1, 2
    while hi < most and accountant.epsilon(_run(sigma, hi), delta=delta).epsilon <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if accountant.epsilon(_run(sigma, mid), delta=delta).epsilon <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=DEMO_PRIVACY["target_epsilon"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=8.0)
    args = parser.parse_args()
    delta = DEMO_PRIVACY["delta"]
    accountants = {"RDP": DpAccountingVerifier(orders=LEDGER_RDP_ORDERS), "PLD": PldAccountant()}
    print(f"demo plan: q = {DEMO_PRIVACY['sample_rate']}, {DEMO_PRIVACY['steps_per_round']} steps/round, "
          f"δ = {delta:g}")
    print(f"\nσ for ε ≤ {args.target:g} over {args.rounds} rounds")
    print("| accountant | σ | ε by RDP | ε by PLD | seconds |")
    print("|---|---|---|---|---|")
    sigmas = {}
    for name, accountant in accountants.items():
        started = time.perf_counter()
        sigma = calibrate_noise(target_epsilon=args.target, delta=delta, sample_rate=DEMO_PRIVACY["sample_rate"],
                                steps=DEMO_PRIVACY["steps_per_round"] * args.rounds, accountant=accountant,
                                # as the coordinator does for PLD: below RDP's σ, on a 10x coarser grid first
                                upper=sigmas.get("RDP"),
                                coarse=PldAccountant(value_discretization_interval=1e-3) if sigmas else None)
        seconds = time.perf_counter() - started
        sigmas[name] = sigma
        eps = {n: a.epsilon(_run(sigma, args.rounds), delta=delta).epsilon for n, a in accountants.items()}
        print(f"| {name} | {sigma:.4f} | {eps['RDP']:.4f} | {eps['PLD']:.4f} | {seconds:.1f} |")
    sigma = sigmas["RDP"]
    print(f"\nrounds a budget of ε = {args.budget:g} affords at σ = {sigma:.4f} (the RDP-calibrated one)")
    print("| budget enforced by | rounds | ε by RDP then | ε by PLD then |")
    print("|---|---|---|---|")
    for name, accountant in accountants.items():
        rounds = _afforded(accountant, sigma, args.budget, delta)
        eps = {n: a.epsilon(_run(sigma, rounds), delta=delta).epsilon for n, a in accountants.items()}
        print(f"| {name} | {rounds} | {eps['RDP']:.4f} | {eps['PLD']:.4f} |")


if __name__ == "__main__":
    main()
