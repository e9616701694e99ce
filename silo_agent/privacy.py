"""The agent's side of differential privacy: its ledger, budget, update noise and mirror sync."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.core.atomic import atomic_write
from fedsilo.privacy.accounting import LEDGER_RDP_ORDERS, PrvAccountant, RdpAccountant, check_privacy_config
from fedsilo.privacy.budget import BUDGET_FILE, CA_FILE, LEDGER_FILE, save_budget, sign_budget
from fedsilo.privacy.ledger import EntryStatus, GuaranteeScope, Ledger, LedgerError, Neighbouring
from fedsilo.privacy.plan import PlannedRelease, PrivacyPlan, entry_key, ledger_fields, projected_spend
from fedsilo.core.phases import SharePhase
from fedsilo.core.methods import get_method
from fedsilo.silo_agent.config import AgentConfig

log = logging.getLogger("fedsilo.agent")

_BATCH = 64


class PrivacyError(Exception):
    """The agent cannot take part in this DP run as configured; the message says what to fix."""


class PrivacySession:
    """One silo's privacy state for a run: ledger, budget, accountant.

    Use `open`. Every release is reserved in the ledger (durable, signed) before it leaves,
    sent to the coordinator's mirror, and committed once uploaded.
    """

    def __init__(self, *, cfg: AgentConfig, plan: PrivacyPlan, run_id: str, ledger: Ledger,
                 budget_statement: bytes, strategy: str = "fedavg") -> None:
        assert cfg.budget is not None
        self.cfg = cfg
        self.plan = plan
        self.run_id = run_id
        self.ledger = ledger
        self.budget = cfg.budget
        self.budget_statement = budget_statement
        self.strategy = strategy
        self._accountant = RdpAccountant(orders=LEDGER_RDP_ORDERS)
        self._prv = PrvAccountant()

    @classmethod
    def open(cls, *, cfg: AgentConfig, plan: PrivacyPlan, run_id: str, silo: str, n_train: int,
             strategy: str = "fedavg") -> PrivacySession:
        """Checks the config against the plan, opens the ledger and signs the budget statement.

        Raises:
            PrivacyError: no budget configured, no certificate, δ ≥ 1/n for record-level DP, or
                a ledger that cannot be opened.
        """
        if cfg.budget is None:
            raise PrivacyError("this run uses differential privacy: set this hospital's budget in silo.toml, "
                               "[privacy] epsilon = ... and delta = ...")
        if cfg.tls is None:
            raise PrivacyError("this run uses differential privacy, whose ledger is signed with this silo's "
                               "certificate; configure [tls] (insecure mode cannot take part)")
        if plan.record_level:
            try:
                check_privacy_config(epsilon=cfg.budget.epsilon, delta=cfg.budget.delta,
                                     noise_multiplier=plan.noise_multiplier, clip_norm=plan.max_grad_norm,
                                     dataset_size=n_train)
            except ValueError as exc:
                raise PrivacyError(f"privacy.{str(exc).removeprefix('invalid ')} "
                                   f"(this silo has n = {n_train} training records)") from None
        state_dir = Path(cfg.state_dir)
        cert = Path(cfg.tls.cert).read_bytes()
        key = Path(cfg.tls.key).read_bytes()
        try:
            ledger = Ledger.open(state_dir / LEDGER_FILE, silo=silo, certificate_pem=cert, private_key_pem=key)
        except LedgerError as exc:
            raise PrivacyError(f"privacy ledger: {exc}") from None
        atomic_write(state_dir / CA_FILE, Path(cfg.tls.ca).read_bytes())
        statement = sign_budget(silo=silo, epsilon=cfg.budget.epsilon, delta=cfg.budget.delta,
                                certificate_pem=cert, private_key_pem=key)
        save_budget(statement, state_dir / BUDGET_FILE)
        return cls(cfg=cfg, plan=plan, run_id=run_id, ledger=ledger,
                   budget_statement=statement.to_json().encode("ascii"), strategy=strategy)

    def close(self) -> None:
        """Closes the ledger."""
        self.ledger.close()

    def spent(self) -> dict[str, float]:
        """Cumulative ε against one upload so far, per relation (0 where none)."""
        return {n.value: self.ledger.cumulative(n, scope=GuaranteeScope.SINGLE_UPLOAD) for n in Neighbouring}

    def describe(self) -> str:
        """One line for the log: plan, budget, spend so far."""
        parts = []
        if self.plan.record_level:
            parts.append(f"record-level DP-SGD σ={self.plan.noise_multiplier:.4g} C={self.plan.max_grad_norm:g} "
                         f"q={self.plan.sample_rate:g} × {self.plan.steps_per_round} steps/round")
        if self.plan.silo_level:
            parts.append(f"silo-level update noise σ={self.plan.update_noise_multiplier:.4g} "
                         f"C={self.plan.update_clip_norm:g} in {self.plan.noise_shares} share(s)")
        spent = ", ".join(f"{k} ε={v:.4f}" for k, v in self.spent().items())
        return (f"{'; '.join(parts)}; budget ε={self.budget.epsilon:g} at δ={self.budget.delta:g} "
                f"by {self.budget.accountant.value.upper()}; "
                f"spent so far: {spent}")

    def refusal(self, extra: Sequence[PlannedRelease] = ()) -> str | None:
        """Why the next round must be declined (it would exceed the budget), or None.

        Args:
            extra: Releases the round makes besides its upload (a ResFIM mask computation).
        """
        after = projected_spend(self.ledger.entries(), self.plan.round_releases(), delta=self.budget.delta,
                                extra=extra, accountant=self._accountant, governing=self.budget.accountant)
        over = [(n, eps) for n, eps in after.items() if eps > self.budget.epsilon]
        if not over:
            return None
        n, eps = over[0]
        return (f"privacy budget: one more round would bring this silo's {n.value}-level ε to {eps:.4f}, above its "
                f"budget ε = {self.budget.epsilon:g} (δ = {self.budget.delta:g}); spent so far "
                f"{self.spent()[n.value]:.4f}")

    def dpsgd_config(self) -> Any:
        """The record-level DP-SGD settings of this run."""
        from fedsilo.privacy.dpsgd import DpSgdConfig

        return DpSgdConfig(noise_multiplier=self.plan.noise_multiplier, max_grad_norm=self.plan.max_grad_norm,
                           sample_rate=self.plan.sample_rate, steps=self.plan.steps_per_round)

    def noise_update(self, update: Mapping[str, np.ndarray], *, phase: SharePhase = SharePhase.ALL,
                     model: Any = None, frozen: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Silo-level DP: the update clipped and noised (this silo's share); else unchanged.

        DEeR's B and A phases use the noise regulator (clip and noise in the product space,
        mapped to the trained factor; ``model`` gives the LoRA layers and ``frozen`` the
        shared values of the frozen factors); every other case clips the whole update jointly
        in parameter space and adds Gaussian noise (DP-FedAvg; for FedAvg-LoRA and FFA-LoRA
        this is the published baselines' noise on the factors themselves).
        """
        if not self.plan.silo_level:
            return dict(update)
        if get_method(self.strategy).alternates and phase is not SharePhase.ALL:
            from fedsilo.silo_agent.lora_privacy import regulate_lora_update

            assert model is not None and frozen is not None
            deltas, norm, clipped = regulate_lora_update(
                model, update, frozen, phase=phase, clip_norm=self.plan.update_clip_norm,
                noise_multiplier=self.plan.update_noise_multiplier, shares=self.plan.noise_shares)
            if clipped:
                log.info("silo-level DP: product-space update norm %.4g clipped to %g", norm,
                         self.plan.update_clip_norm)
            return deltas
        from fedsilo.privacy.update_noise import privatize_update

        out = privatize_update(update, clip_norm=self.plan.update_clip_norm,
                               noise_multiplier=self.plan.update_noise_multiplier, shares=self.plan.noise_shares)
        if out.clipped:
            log.info("silo-level DP: update norm %.4g clipped to %g", out.original_norm, self.plan.update_clip_norm)
        return dict(out.arrays)

    def _position(self, rnd: int) -> tuple[int, int]:
        return get_method(self.strategy).ledger_position(rnd)

    def _round_entries(self, rnd: int) -> list[Any]:
        pos = self._position(rnd)
        return [e for e in self.ledger.entries() if e.run_id == self.run_id and (e.round, e.upload_index) == pos]

    def account_round(self, rnd: int, extra: Sequence[PlannedRelease] = ()) -> None:
        """Reserves (durably, signed) this round's ledger entries, unless already reserved.

        Args:
            rnd: The coordinator's round.
            extra: Releases the upload depends on besides its own (a ResFIM mask computed for it),
                written at the same ledger position.
        """
        have = {entry_key(e) for e in self._round_entries(rnd)
                if self.ledger.status(e.seq) is not EntryStatus.ABANDONED}
        for planned in [*self.plan.round_releases(), *extra]:
            if planned.key() in have:
                continue
            have.add(planned.key())
            entry = self._reserve(planned, rnd)
            log.info("round %d: ledger entry %d: %s-level ε %s this round, %s cumulative (δ = %g; %s governs)",
                     rnd, entry.seq, entry.neighbouring.value, _both(entry.epsilon_rdp, entry.epsilon_pld),
                     _both(*_cumulative(entry)), entry.delta, entry.governing.value.upper())

    def _reserve(self, planned: PlannedRelease, rnd: int) -> Any:
        """Reserves one planned release at round ``rnd``'s ledger position."""
        ledger_round, upload_index = self._position(rnd)
        return self.ledger.reserve(**ledger_fields(
            self.ledger.entries(), planned, delta=self.budget.delta, run_id=self.run_id, round=ledger_round,
            upload_index=upload_index, accountant=self._accountant, prv_accountant=self._prv,
            governing=self.budget.accountant))

    def account_style_bank(self) -> None:
        """Reserves the ledger entry of this silo's style bank (pFL-ResFIM), unless already reserved.

        Raises:
            PrivacyError: The bank would take this silo over its budget.
        """
        planned = self.plan.style_release()
        if any(e.run_id == self.run_id and entry_key(e) == planned.key()
               and self.ledger.status(e.seq) is not EntryStatus.ABANDONED for e in self.ledger.entries()):
            return
        after = projected_spend(self.ledger.entries(), [], delta=self.budget.delta, extra=[planned],
                                accountant=self._accountant, governing=self.budget.accountant)
        eps = after[planned.neighbouring]
        if eps > self.budget.epsilon:
            raise PrivacyError(f"privacy budget: the style bank would bring this silo's record-level ε to {eps:.4f}, "
                               f"above its budget ε = {self.budget.epsilon:g}")
        entry = self._reserve(planned, 1)
        log.info("style bank: ledger entry %d: record-level ε %s, %s cumulative (δ = %g; %s governs)", entry.seq,
                 _both(entry.epsilon_rdp, entry.epsilon_pld), _both(*_cumulative(entry)), entry.delta,
                 entry.governing.value.upper())

    def commit_style_bank(self) -> None:
        """Marks the style bank's reservation as released (it was published)."""
        key = self.plan.style_release().key()
        for e in self.ledger.pending():
            if e.run_id == self.run_id and entry_key(e) == key:
                self.ledger.commit(e.seq)

    def _pending_of_round(self, rnd: int) -> list[Any]:
        bank = self.plan.style_release().key() if self.plan.resfim_every else None
        return [e for e in self.ledger.pending() if e.run_id == self.run_id
                and (e.round, e.upload_index) == self._position(rnd) and entry_key(e) != bank]

    def commit_round(self, rnd: int) -> None:
        """Marks this round's reservations as released (the upload went out)."""
        for e in self._pending_of_round(rnd):
            self.ledger.commit(e.seq)

    def abandon_round(self, rnd: int) -> None:
        """Marks this round's reservations as not sent; their spend still counts."""
        for e in self._pending_of_round(rnd):
            self.ledger.abandon(e.seq)

    def sync(self, client: Any) -> int:
        """Sends every entry the coordinator's mirror lacks; returns the mirrored seq."""
        mirrored = client.submit_ledger_entries([])
        todo = [e.to_json() for e in self.ledger.entries() if e.seq > mirrored]
        for start in range(0, len(todo), _BATCH):
            mirrored = client.submit_ledger_entries(todo[start:start + _BATCH])
        return mirrored


def _cumulative(entry: Any) -> tuple[float, float | None]:
    """(RDP, PLD) cumulative ε of an entry against one upload."""
    single = entry.guarantee(GuaranteeScope.SINGLE_UPLOAD)
    return single.cumulative_epsilon, single.cumulative_epsilon_pld


def _both(rdp: float, pld: float | None) -> str:
    """"RDP 7.3299 / PLD 6.7688" for the log (PLD "n/a" beyond its size guard)."""
    return f"RDP {rdp:.4f} / PLD " + ("n/a" if pld is None else f"{pld:.4f}")
