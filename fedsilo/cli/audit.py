"""``fedsilo audit``: the privacy officer's commands (build, verify; no torch needed)."""

from __future__ import annotations

from pathlib import Path

import click

from fedsilo.cli.common import fail as _fail

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
