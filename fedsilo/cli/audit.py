"""``fedsilo audit``: the privacy officer's commands (build, verify: no torch; empirical: trains, needs torch)."""

from __future__ import annotations

from pathlib import Path

import click

from fedsilo.cli.common import fail as _fail
from fedsilo.privacy.accounting import Neighbouring
from fedsilo.privacy.audit.empirical import ScoreMode

__all__ = ["audit"]


@click.group()
def audit() -> None:
    """Privacy audit reports for a privacy officer: build them, verify them (no torch needed)."""


@audit.command("report")
@click.option("--state", "state_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              required=True, help="An agent's state_dir (its ledger) or the coordinator's (the mirror).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder for report.json and report.html (created).")
def audit_report(state_dir: Path, out: Path) -> None:
    """Verify every ledger and budget in a state directory, then write the audit report."""
    from fedsilo.privacy.audit import AuditError, build_report, report_summary, write_report

    try:
        report = build_report(state_dir)
        json_path, html_path = write_report(report, out)
    except AuditError as exc:
        _fail(str(exc), 1)
    except OSError as exc:
        _fail(f"cannot write the report to {out}: {exc}", 1)
    click.echo(f"report: {json_path}")
    click.echo(f"report: {html_path}")
    for line in report_summary(report):
        click.echo(line)


@audit.command("verify")
@click.argument("report", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--ca", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="The federation CA certificate to trust (else the CA inside the report).")
def audit_verify(report: Path, ca: Path | None) -> None:
    """Check a report.json: signatures, hash chains, budgets, and every ε recomputed with dp_accounting."""
    from fedsilo.privacy.audit import AuditError, verify_report

    try:
        result = verify_report(report, ca_pem=None if ca is None else ca.read_bytes())
    except AuditError as exc:
        _fail(str(exc), 1)
    except OSError as exc:
        _fail(f"cannot read {ca}: {exc}", 1)
    click.echo(f"verified: {len(result.silos)} silos, {result.entries} entries; every ε recomputed with dp_accounting: "
               f"RDP largest difference {result.max_epsilon_difference:.3g}, PLD ({result.pld_figures} figures) "
               f"largest difference {result.max_pld_difference:.3g}")
    if result.prv_cross_check is None:
        click.echo("PLD not cross-checked against Opacus' PRV accountant (torch is not installed here)")
    else:
        compared, largest = result.prv_cross_check
        click.echo(f"PLD cross-checked against Opacus' PRV accountant: {compared} cumulative figures agree within "
                   f"{largest:.3g}")
    if result.ca_from_report:
        click.echo(f"CA SHA-256: {result.ca_sha256} (taken from the report itself: compare it with the "
                   "federation CA fingerprint you got from the operator, or pass --ca)")
    else:
        click.echo(f"CA SHA-256: {result.ca_sha256} (the CA given with --ca)")


def _mode_name(mode: ScoreMode) -> str:
    """A score mode as the command line spells it (``white-box``)."""
    return mode.value.replace("_", "-")


@audit.command("empirical")
@click.option("--level", type=click.Choice([n.value for n in Neighbouring]), default=Neighbouring.RECORD.value,
              show_default=True,
              help="Neighbouring relation: record-level DP-SGD, or silo-level update noise with canary silos.")
@click.option("--mode", type=click.Choice([_mode_name(m) for m in ScoreMode]), default=_mode_name(ScoreMode.WHITE_BOX),
              show_default=True,
              help="white-box: model change . canary gradient (Dirac canaries); black-box: canary loss change.")
@click.option("--noise-multiplier", "sigma", type=float, required=True, help="σ the ledger is charged for.")
@click.option("--steps", type=int, default=100, show_default=True, help="DP-SGD steps (record) or rounds (silo).")
@click.option("--sample-rate", type=float, default=None,
              help="Poisson rate q of each DP-SGD step (default 0.1 at record level; 1 at silo level).")
@click.option("--canaries", type=int, default=1000, show_default=True, help="m canaries, each in with probability 1/2.")
@click.option("--clip-norm", type=float, default=1.0, show_default=True, help="C, per example or per update.")
@click.option("--delta", type=float, default=1e-5, show_default=True, help="δ of the claim audited.")
@click.option("--confidence", type=float, default=0.95, show_default=True, help="Confidence of the lower bound.")
@click.option("--records", type=int, default=1000, show_default=True, help="Real records per silo.")
@click.option("--silos", type=int, default=None, help="Real silos at silo level (default 3).")
@click.option("--seed", type=int, default=None,
              help="Reproducible run (tests); without it the secret and the noise come from the OS.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="State directory to append the result to (empirical_audit.json; `audit report` shows it).")
def audit_empirical(level: str, mode: str, sigma: float, steps: int, sample_rate: float | None, canaries: int,
                    clip_norm: float, delta: float, confidence: float, records: int, silos: int | None,
                    seed: int | None, out: Path | None) -> None:
    """Train with secret canaries and report a lower bound ε̂ on the ε achieved, beside the ledger's ε.

    One-run audit of Steinke, Nasr & Jagielski 2023 ("Privacy Auditing with One (1) Training
    Run"). Exits 1 when ε̂ exceeds the ledger's ε (the training leaks more than it claims).
    """
    from fedsilo.privacy.audit import AuditError
    from fedsilo.privacy.audit.empirical import append_empirical_audit
    from fedsilo.silo_agent.empirical import EmpiricalAuditConfig, FaultSwitchError, run_empirical_audit

    relation = Neighbouring(level)
    try:
        config = EmpiricalAuditConfig(
            level=relation, mode=next(m for m in ScoreMode if _mode_name(m) == mode), canaries=canaries,
            noise_multiplier=sigma,
            steps=steps, sample_rate=(0.1 if relation is Neighbouring.RECORD else 1.0) if sample_rate is None
            else sample_rate, clip_norm=clip_norm, delta=delta, confidence=confidence, records=records,
            silos=(1 if relation is Neighbouring.RECORD else 3) if silos is None else silos, seed=seed)
    except ValueError as exc:
        _fail(str(exc), 2)
    try:
        outcome = run_empirical_audit(config)
    except FaultSwitchError as exc:
        _fail(str(exc), 2)
    bound = outcome.bound
    click.echo(f"empirical audit, {level}-level, {mode}: {bound.counts.canaries} canaries, σ {sigma:g}, "
               f"q {config.sample_rate:g}, {steps} {'steps' if relation is Neighbouring.RECORD else 'rounds'}, "
               f"C {clip_norm:g}, δ {delta:g}")
    if outcome.noise_scale_actual != 1.0:
        click.echo(f"TESTING FAULT: the training added {outcome.noise_scale_actual:g} x the claimed noise")
    pld = "n/a" if outcome.ledger_epsilon_pld is None else f"{outcome.ledger_epsilon_pld:.4f}"
    click.echo(f"{'guesses':>10} {'correct':>8} {'k+':>5} {'k-':>5} {'ε̂ (lower)':>11} {'ledger ε RDP':>13} "
               f"{'ledger ε PLD':>13} {'seconds':>8}")
    click.echo(f"{bound.counts.guesses:>10} {bound.counts.correct:>8} {bound.k_plus:>5} {bound.k_minus:>5} "
               f"{bound.epsilon_lower:>11.4f} {outcome.ledger_epsilon:>13.4f} {pld:>13} {outcome.seconds:>8.2f}")
    click.echo(f"confidence {confidence:g} over {bound.tries} guess sizes (each at β {bound.beta:.3g})")
    for name, result in sorted(outcome.membership.items()):
        click.echo(f"membership inference, {name}: AUROC {result.auroc:.4f}, TPR {result.tpr_at_1pct_fpr:.4f} at "
                   f"1% FPR, {result.tpr_at_0_1pct_fpr:.4f} at 0.1% FPR")
    if out is not None:
        try:
            path = append_empirical_audit(out, outcome.record())
        except AuditError as exc:
            _fail(str(exc), 1)
        except OSError as exc:
            _fail(f"cannot write to {out}: {exc}", 1)
        click.echo(f"recorded: {path}")
    if outcome.exceeds_ledger:
        _fail(f"the empirical lower bound ε̂ = {bound.epsilon_lower:.4f} exceeds the ledger's ε = "
              f"{outcome.claimed_epsilon:.4f} ({level}-level, σ {sigma:g}, δ {delta:g}; its tightest figure): the "
              "training leaks more than its ledger claims", 1)
    click.echo(f"ε̂ {bound.epsilon_lower:.4f} <= ledger ε {outcome.claimed_epsilon:.4f} (its tightest figure): "
               "consistent with the claim")
