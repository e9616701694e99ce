"""The privacy-ledger mirror: silos' signed budget statements and ledger entries, verified, and the run's planned spend."""

from __future__ import annotations

from typing import Any

from fedsilo.coordinator.config import ConfigError
from fedsilo.coordinator.context import RunContext
from fedsilo.coordinator.records import MAX_BUDGET_STATEMENT_BYTES, MAX_LEDGER_BATCH, MAX_LEDGER_ENTRY_CHARS
from fedsilo.core.atomic import atomic_write
from fedsilo.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from fedsilo.privacy.ledger import DuplicateEntryError, LedgerError, MirrorQuotaError
from fedsilo.privacy.pki import Identity


class Mirror:
    """The coordinator's verified copy of each silo's privacy ledger, and the budgets agreed with them.

    Args:
        ctx: the run's shared state (its ``mirror`` is None in a run without DP).
    """

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def check_planned_spend(self) -> None:
        """Refuses to start a run whose planned spend exceeds a budget agreed with a silo.

        Checked while no round has opened yet: the mirrored history of each silo with a
        budget in ``[privacy.budgets]``, composed with every round of this run's plan, must
        stay within that budget for every neighbouring relation (single-upload scope).

        Raises:
            ConfigError: naming the silo, the relation and both figures.
        """
        cfg = self.ctx.cfg
        plan = cfg.privacy
        if plan is None or not cfg.budgets or self.ctx.store.rounds():
            return
        from fedsilo.privacy.plan import projected_spend

        assert self.ctx.mirror is not None
        for silo, budget in cfg.budgets.items():
            spend = projected_spend(self.ctx.mirror.entries(silo), plan.round_releases(), delta=plan.delta,
                                    repeats=cfg.rounds, extra=plan.run_extras(cfg.rounds), governing=cfg.accountant)
            for relation, eps in spend.items():
                if eps > budget:
                    raise ConfigError(
                        f"privacy.budgets.{silo}: the run's plan would bring silo {silo!r}'s {relation.value}-level "
                        f"ε to {eps:.4f} by {cfg.accountant.value.upper()} after {cfg.rounds} rounds (δ = "
                        f"{plan.delta:g}, its history included), "
                        f"above its budget {budget:g}; lower run.rounds or raise the noise"
                    )

    def check_budget_statement(self, name: str, raw: bytes) -> Any:  # -> BudgetStatement | None
        """Verifies a joining silo's signed budget (DP runs need one; others must send none).

        Raises:
            InvalidArgument: missing, oversized, not verifying, or another silo's statement.
        """
        if self.ctx.cfg.privacy is None:
            if raw:
                raise InvalidArgument("budget_statement given, but this run has no differential privacy")
            return None
        if not 1 <= len(raw) <= MAX_BUDGET_STATEMENT_BYTES:
            raise InvalidArgument("budget_statement (the silo's signed privacy budget) is required in a run with "
                                  f"differential privacy, 1..{MAX_BUDGET_STATEMENT_BYTES} bytes")
        from fedsilo.privacy.budget import BudgetError, BudgetStatement

        assert self.ctx.ca_pem is not None
        try:
            statement = BudgetStatement.from_json(bytes(raw))
            statement.verify(ca_pem=self.ctx.ca_pem)
        except BudgetError as exc:
            raise InvalidArgument(f"budget_statement refused: {exc}") from None
        if statement.silo != name:
            raise InvalidArgument(f"budget_statement is silo {statement.silo!r}'s, but the caller is {name!r}")
        return statement

    def save_budget(self, name: str, statement: Any) -> None:
        """Keeps a verified budget statement in the state dir (audit reports read it there)."""
        from fedsilo.privacy.budget import BUDGETS_DIR

        (self.ctx.state_dir / BUDGETS_DIR).mkdir(exist_ok=True)
        atomic_write(self.ctx.state_dir / BUDGETS_DIR / f"{name}.json", statement.to_json().encode("ascii"))

    def submit(self, caller: Identity, entries_json: list[str]) -> tuple[str, int]:
        """Verifies a silo's ledger entries and appends them to the mirror, in order.

        Entries already mirrored verbatim are skipped (a resend). Each entry is stored only
        if it verifies and extends the chain; at the first bad one the call fails and the
        mirror keeps the entries before it, so it always holds a verified prefix.

        Returns:
            (the caller's silo name, the highest mirrored seq of its ledger, 0 if none).

        Raises:
            InvalidArgument: too many or too large entries, or one that does not verify
                (chain, signature, certificate, another silo's, not canonical); the message
                names its seq.
            ResourceExhausted: an entry beyond what the mirror keeps of the caller (see
                `LedgerMirror.open`: entries of other runs, or of one round of this run).
            FailedPrecondition: the run has no differential privacy.
        """
        ctx = self.ctx
        name = ctx.require_joined(caller)
        if ctx.mirror is None:
            raise FailedPrecondition(f"run {ctx.cfg.run_id!r} has no differential privacy; there is no ledger mirror")
        if len(entries_json) > MAX_LEDGER_BATCH:
            raise InvalidArgument(f"{len(entries_json)} ledger entries in one call; at most {MAX_LEDGER_BATCH}")
        for i, text in enumerate(entries_json):
            if not 1 <= len(text) <= MAX_LEDGER_ENTRY_CHARS:
                raise InvalidArgument(f"ledger entry {i} is {len(text)} characters; 1..{MAX_LEDGER_ENTRY_CHARS}")
        assert ctx.ca_pem is not None
        for text in entries_json:
            try:
                ctx.mirror.accept(text, ca_pem=ctx.ca_pem, expected_silo=name)
            except DuplicateEntryError:
                continue
            except MirrorQuotaError as exc:
                raise ResourceExhausted(str(exc)) from None
            except LedgerError as exc:
                raise InvalidArgument(str(exc)) from None
        last = ctx.mirror.last(name)
        return name, 0 if last is None else last.seq
