"""ε̂ of one-run audits (Steinke, Nasr & Jagielski 2023) beside the ledger's ε, at several σ, with and without the fault.

Runs ``run_empirical_audit`` (the code behind ``fedsilo audit empirical``) in this process on one
torch thread, m = 1000 canaries, δ = 1e-5, 95% confidence, for:

* record level, white-box (Dirac gradient canaries) and black-box (input canaries, loss change):
  DP-SGD with Opacus, full batches (q = 1, 10 steps) and Poisson batches (q = 0.1, 100 steps);
* silo level, white-box: 3 real silos with 1000 records each, 1000 canary silos, 10 rounds;
* the testing fault switch (``FEDSILO_TESTING_UNSAFE_NOISE_SCALE=break-dp:<scale>``) at a claim
  of ledger ε below 2, scales 0.01 and 0: the ledger still records σ.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/empirical_audit.py [--seed N] [--canaries M]``.
Without ``--seed`` every secret and every noise draw comes from the OS, so numbers vary run to run.
"""

from __future__ import annotations

import argparse
import os
import warnings

from fedsilo.privacy.accounting import Neighbouring
from fedsilo.privacy.audit.empirical import ScoreMode
from fedsilo.silo_agent.empirical import FAULT_ENV, EmpiricalAuditConfig, run_empirical_audit


def _rows(canaries: int) -> list[tuple[dict, str | None]]:
    rows: list[tuple[dict, str | None]] = []
    full = dict(level=Neighbouring.RECORD, sample_rate=1.0, steps=10)
    poisson = dict(level=Neighbouring.RECORD, sample_rate=0.1, steps=100)
    silo = dict(level=Neighbouring.SILO, sample_rate=1.0, steps=10, silos=3)
    for mode in (ScoreMode.WHITE_BOX, ScoreMode.BLACK_BOX):
        for sigma in (1.5, 3.0, 6.0, 12.0):
            rows.append((dict(full, mode=mode, noise_multiplier=sigma), None))
        for sigma in (0.8, 1.5, 3.0):
            rows.append((dict(poisson, mode=mode, noise_multiplier=sigma), None))
    for sigma in (1.5, 3.0, 6.0, 12.0):
        rows.append((dict(silo, noise_multiplier=sigma), None))
    for setting in (dict(full, noise_multiplier=8.0), dict(poisson, noise_multiplier=3.0),
                    dict(silo, noise_multiplier=8.0)):
        for scale in ("0.01", "0"):
            rows.append((setting, scale))
    for row, _ in rows:
        row["canaries"] = canaries
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--canaries", type=int, default=1000)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    header = (f"{'level':6} {'scores':9} {'q':>4} {'T':>4} {'sigma':>6} {'noise x':>7} {'v/r':>9} "
              f"{'eps_hat':>8} {'RDP eps':>8} {'PLD eps':>8} {'verdict':>8} {'MIA AUROC':>9} {'seconds':>7}")
    print(header)
    print("-" * len(header))
    for i, (setting, scale) in enumerate(_rows(args.canaries)):
        if scale is None:
            os.environ.pop(FAULT_ENV, None)
        else:
            os.environ[FAULT_ENV] = f"break-dp:{scale}"
        seed = None if args.seed is None else args.seed + i
        outcome = run_empirical_audit(EmpiricalAuditConfig(seed=seed, **setting))
        os.environ.pop(FAULT_ENV, None)
        c = outcome.config
        b = outcome.bound
        auroc = max(r.auroc for r in outcome.membership.values())
        print(f"{c.level.value:6} {c.mode.value.replace('_', '-'):9} {c.sample_rate:>4g} {c.steps:>4} "
              f"{c.noise_multiplier:>6g} {outcome.noise_scale_actual:>7g} "
              f"{f'{b.counts.correct}/{b.counts.guesses}':>9} {b.epsilon_lower:>8.3f} {outcome.ledger_epsilon:>8.3f} "
              f"{outcome.ledger_epsilon_pld or float('nan'):>8.3f} "
              f"{'EXCEEDS' if outcome.exceeds_ledger else 'within':>8} {auroc:>9.3f} {outcome.seconds:>7.2f}",
              flush=True)


if __name__ == "__main__":
    main()
