"""The agent's privacy session: config checks, budget refusal, reserve/commit/abandon once per round,
and syncing to a (real) ledger mirror."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsilo.coordinator.config import TlsFiles
from fedsilo.privacy import pki
from fedsilo.privacy.budget import BUDGET_FILE, CA_FILE, load_budget
from fedsilo.privacy.ledger import EntryStatus, LedgerMirror, Neighbouring
from fedsilo.privacy.pki import Role
from fedsilo.privacy.plan import PrivacyPlan
from fedsilo.silo_agent.config import AgentConfig, BudgetConfig
from fedsilo.silo_agent.privacy import PrivacyError, PrivacySession

PLAN = PrivacyPlan(record_level=True, sample_rate=0.25, steps_per_round=4, max_grad_norm=1.0, noise_multiplier=1.5,
                   silo_level=True, update_clip_norm=0.1, update_noise_multiplier=1.0, delta=1e-5)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    root = tmp_path_factory.mktemp("session-pki")
    ca = pki.init_ca(root / "ca")
    p = pki.issue_certificate(root / "ca", root / "certs", role=Role.SILO, name="hospital-a")
    return TlsFiles(ca=ca.cert, cert=p.cert, key=p.key)


def agent_cfg(tls: TlsFiles, state: Path, budget: BudgetConfig | None) -> AgentConfig:
    return AgentConfig(coordinator="localhost:1", state_dir=state, tls=tls, budget=budget)


class MirrorClient:
    """Stands in for the gRPC client only; the mirror behind it is the real one."""

    def __init__(self, path: Path, ca: bytes) -> None:
        self.mirror = LedgerMirror.open(path)
        self.ca = ca

    def submit_ledger_entries(self, texts: list[str]) -> int:
        for t in texts:
            self.mirror.accept(t, ca_pem=self.ca, expected_silo="hospital-a")
        last = self.mirror.last("hospital-a")
        return 0 if last is None else last.seq


def test_open_refuses_what_cannot_be_accounted(tls: TlsFiles, tmp_path: Path) -> None:
    with pytest.raises(PrivacyError, match=r"\[privacy\] epsilon"):
        PrivacySession.open(cfg=agent_cfg(tls, tmp_path / "s", None), plan=PLAN, run_id="r", silo="hospital-a",
                            n_train=48)
    with pytest.raises(PrivacyError, match=r"privacy\.delta 0\.05.*n = 48"):
        PrivacySession.open(cfg=agent_cfg(tls, tmp_path / "s", BudgetConfig(epsilon=5.0, delta=0.05)), plan=PLAN,
                            run_id="r", silo="hospital-a", n_train=48)
    assert not (tmp_path / "s").exists()
    insecure = AgentConfig(coordinator="localhost:1", state_dir=tmp_path / "s", insecure=True, name="hospital-a",
                           budget=BudgetConfig(epsilon=5.0))
    with pytest.raises(PrivacyError, match="certificate"):
        PrivacySession.open(cfg=insecure, plan=PLAN, run_id="r", silo="hospital-a", n_train=48)


def test_rounds_are_accounted_once_synced_and_refused_over_budget(tls: TlsFiles, tmp_path: Path) -> None:
    state = tmp_path / "s"
    session = PrivacySession.open(cfg=agent_cfg(tls, state, BudgetConfig(epsilon=6.0)), plan=PLAN, run_id="r",
                                  silo="hospital-a", n_train=48)
    assert load_budget(state / BUDGET_FILE).epsilon == 6.0 and (state / CA_FILE).read_bytes() == tls.ca.read_bytes()
    client = MirrorClient(tmp_path / "mirror.sqlite", tls.ca.read_bytes())
    rounds = 0
    while session.refusal() is None:
        rounds += 1
        session.account_round(rounds)
        session.account_round(rounds)  # a retry after a restart reserves nothing new
        assert session.sync(client) == 2 * rounds
        if rounds % 2:
            session.commit_round(rounds)
        else:
            session.abandon_round(rounds)  # an upload refused: its spend still counts
        assert rounds < 50
    entries = session.ledger.entries()
    assert [e.round for e in entries] == [r for r in range(1, rounds + 1) for _ in range(2)]
    assert all(session.ledger.status(e.seq) is not EntryStatus.PENDING for e in entries)
    assert max(session.spent().values()) <= 6.0
    refusal = session.refusal()
    assert refusal is not None and "above its budget ε = 6" in refusal
    assert session.ledger.cumulative(Neighbouring.SILO) == session.spent()["silo"]
    session.close()
    # a restarted agent sees the same ledger and the same refusal
    again = PrivacySession.open(cfg=agent_cfg(tls, state, BudgetConfig(epsilon=6.0)), plan=PLAN, run_id="r",
                                silo="hospital-a", n_train=48)
    assert [e.seq for e in again.ledger.entries()] == [e.seq for e in entries]
    assert again.refusal() == refusal
    again.close()


def _rounds_until_refused(session: PrivacySession) -> int:
    rounds = 0
    while session.refusal() is None:
        rounds += 1
        session.account_round(rounds)
        session.commit_round(rounds)
        assert rounds < 50
    return rounds


def test_entries_state_both_accountants_and_pld_affords_more_rounds(tls: TlsFiles, tmp_path: Path) -> None:
    from fedsilo.privacy.accounting import BudgetAccountant, PldAccountant
    from fedsilo.privacy.ledger import GuaranteeScope
    from fedsilo.privacy.plan import entry_release

    plan = PrivacyPlan(record_level=True, sample_rate=0.25, steps_per_round=12, max_grad_norm=1.0,
                       noise_multiplier=2.0, delta=1e-5)
    afforded = {}
    for accountant in BudgetAccountant:
        budget = BudgetConfig(epsilon=6.0, accountant=accountant.value)
        session = PrivacySession.open(cfg=agent_cfg(tls, tmp_path / accountant.value, budget), plan=plan,
                                      run_id="r", silo="hospital-a", n_train=48)
        afforded[accountant] = _rounds_until_refused(session)
        entries = session.ledger.entries()
        assert {e.accountant for e in entries} == {accountant}
        last = entries[-1]
        history = [entry_release(e, GuaranteeScope.SINGLE_UPLOAD) for e in entries]
        assert last.cumulative_epsilon_pld == PldAccountant().epsilon(history, delta=1e-5).epsilon
        assert all(e.epsilon_pld < e.epsilon_rdp and e.cumulative_epsilon_pld < e.cumulative_epsilon
                   for e in entries)
        spent = last.cumulative_epsilon_pld if accountant is BudgetAccountant.PLD else last.cumulative_epsilon
        assert session.spent()["record"] == spent <= 6.0
        assert f"by {accountant.value.upper()}" in session.describe()
        session.close()
    assert afforded[BudgetAccountant.PLD] > afforded[BudgetAccountant.RDP]


def test_a_bad_accountant_is_refused_naming_it() -> None:
    from fedsilo.core.configfile import ConfigError

    with pytest.raises(ConfigError, match="privacy.accountant: 'prv' is not one of 'rdp', 'pld'"):
        BudgetConfig(epsilon=6.0, accountant="prv")


def test_noise_update_clips_jointly_and_adds_noise(tls: TlsFiles, tmp_path: Path) -> None:
    session = PrivacySession.open(cfg=agent_cfg(tls, tmp_path / "s", BudgetConfig(epsilon=60.0)), plan=PLAN,
                                  run_id="r", silo="hospital-a", n_train=48)
    update = {"a": np.full((50, 40), 0.5, np.float32), "b": np.ones(30, np.float32)}
    noised = session.noise_update(update)
    assert {k: v.shape for k, v in noised.items()} == {"a": (50, 40), "b": (30,)}
    assert all(v.dtype == np.float32 for v in noised.values())
    flat = np.concatenate([noised[k].ravel() for k in ("a", "b")]).astype(np.float64)
    # clipped to 0.1 (mean element 0.1/sqrt(2030)), noise std 1.0 * 0.1 per element
    assert flat.std() == pytest.approx(0.1, rel=0.1)
    session.close()
