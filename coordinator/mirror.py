"""The privacy-ledger mirror: silos' signed budget statements and ledger entries, verified, the run's planned
spend, and each silo's spend against its budget for the study lead."""

from __future__ import annotations

import threading
from typing import Any

from fedsilo.coordinator.config import ConfigError
from fedsilo.coordinator.context import RunContext
from fedsilo.coordinator.records import (
    MAX_BUDGET_STATEMENT_BYTES,
    MAX_LEDGER_BATCH,
    MAX_LEDGER_ENTRY_CHARS,
    PrivacyView,
    RelationSpend,
    SiloPrivacy,
)
from fedsilo.core.atomic import atomic_write
from fedsilo.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from fedsilo.privacy.accounting import Neighbouring
from fedsilo.privacy.ledger import DuplicateEntryError, GuaranteeScope, LedgerError, MirrorQuotaError
from fedsilo.privacy.pki import Identity


class Mirror:
    """The coordinator's verified copy of each silo's privacy ledger, and the budgets agreed with them.

    Args:
        ctx: the run's shared state (its ``mirror`` is None in a run without DP).
    """

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()
        #: silo -> (budget file's (inode, mtime, size), its verified (ε, δ) or None, why it does not verify)
        self._budgets: dict[str, tuple[tuple[int, int, int], tuple[float, float] | None, str]] = {}
        #: silo -> (its newest mirrored seq, its spend per relation then)
        self._spend: dict[str, tuple[int, tuple[RelationSpend, ...]]] = {}

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

    # -- the study lead's view ------------------------------------------------------------
    def view(self) -> PrivacyView:
        """Each enrolled silo's verified budget and mirrored spend (silos with neither are left out).

        ε is the newest mirrored entry's cumulative figure against a single upload by the silo's
        governing accountant (`LedgerEntry.budget_epsilon`, what ``LedgerMirror.cumulative``
        returns), the one budgets are enforced on; nothing here recomputes it. Figures are cached until the
        silo's newest mirrored entry (or its budget file) changes.
        """
        cfg, mirror = self.ctx.cfg, self.ctx.mirror
        if cfg.privacy is None or mirror is None:
            return PrivacyView(enabled=False, plan_delta=0.0, silos=())
        silos = []
        for silo in cfg.silos:
            budget, error = self._verified_budget(silo)
            last = mirror.last(silo)
            if budget is None and not error and last is None:
                continue
            seq = 0 if last is None else last.seq
            silos.append(SiloPrivacy(silo=silo, budget=budget, budget_error=error, last_seq=seq,
                                     relations=self._relations(silo, seq)))
        return PrivacyView(enabled=True, plan_delta=cfg.privacy.delta, silos=tuple(silos))

    def _relations(self, silo: str, seq: int) -> tuple[RelationSpend, ...]:
        """A silo's spend per relation present in its mirrored entries, recomputed when ``seq`` moved."""
        with self._lock:
            cached = self._spend.get(silo)
        if cached is not None and cached[0] == seq:
            return cached[1]
        mirror = self.ctx.mirror
        assert mirror is not None
        entries = mirror.entries(silo) if seq else []
        out = []
        for relation in Neighbouring:
            mine = [e for e in entries if e.neighbouring is relation]
            if not mine:
                continue
            this_run = [e for e in mine if e.run_id == self.ctx.cfg.run_id]
            newest = mine[-1].guarantee(GuaranteeScope.SINGLE_UPLOAD)
            out.append(RelationSpend(
                relation=relation, epsilon=mine[-1].budget_epsilon(GuaranteeScope.SINGLE_UPLOAD),
                epsilon_rdp=newest.cumulative_epsilon, epsilon_pld=newest.cumulative_epsilon_pld,
                accountant=mine[-1].governing, delta=mine[-1].delta, entries=len(this_run),
                last_round=this_run[-1].round if this_run else 0))
        spend = tuple(out)
        with self._lock:
            self._spend[silo] = (seq, spend)
        return spend

    def _verified_budget(self, silo: str) -> tuple[tuple[float, float] | None, str]:
        """The (ε, δ) of the budget statement kept for ``silo`` (:meth:`save_budget`), verified against the
        federation CA again whenever the file changes; (None, why) if it no longer verifies."""
        from fedsilo.privacy.budget import BUDGETS_DIR, BudgetError, load_budget

        path = self.ctx.state_dir / BUDGETS_DIR / f"{silo}.json"
        try:
            st = path.stat()
        except FileNotFoundError:
            return None, ""
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._budgets.get(silo)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        budget: tuple[float, float] | None = None
        error = ""
        try:
            statement = load_budget(path)
            if statement is not None:
                assert self.ctx.ca_pem is not None
                statement.verify(ca_pem=self.ctx.ca_pem)
                if statement.silo != silo:
                    raise BudgetError(f"it is silo {statement.silo!r}'s statement")
                budget = (statement.epsilon, statement.delta)
        except BudgetError as exc:
            error = f"the kept budget statement of {silo!r} does not verify: {exc}"
        with self._lock:
            self._budgets[silo] = (key, budget, error)
        return budget, error
