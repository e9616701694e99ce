"""Empirical audits with real Opacus DP-SGD and real update noise: ε̂ stays under a true claim, exceeds a false one."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from fedsilo.privacy.accounting import Neighbouring
from fedsilo.privacy.audit.empirical import ScoreMode
from fedsilo.privacy.audit.one_run import epsilon_lower_bound
from fedsilo.silo_agent.empirical import (
    FAULT_ENV,
    EmpiricalAuditConfig,
    FaultSwitchError,
    injected_noise_scale,
    run_empirical_audit,
)

ROOT = Path(__file__).resolve().parents[2]
RECORD = dict(level=Neighbouring.RECORD, sample_rate=1.0, steps=10, records=400, seed=11)
SILO = dict(level=Neighbouring.SILO, sample_rate=1.0, steps=10, records=200, silos=3, seed=12)


def _audit(**kwargs):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Opacus' secure-mode notices
        return run_empirical_audit(EmpiricalAuditConfig(**kwargs))


@pytest.fixture(autouse=True)
def _no_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAULT_ENV, raising=False)


@pytest.mark.parametrize("sigma", [1.5, 3.0, 8.0])
def test_white_box_record_level_stays_under_the_ledger(sigma: float) -> None:
    outcome = _audit(noise_multiplier=sigma, **RECORD)
    assert outcome.noise_scale_actual == 1.0
    assert 0.0 <= outcome.bound.epsilon_lower <= outcome.claimed_epsilon
    assert not outcome.exceeds_ledger
    # ε̂ is what the paper's bound gives for the stored counts
    c = outcome.bound.counts
    assert outcome.bound.epsilon_lower == epsilon_lower_bound(c.canaries, c.guesses, c.correct, delta=1e-5,
                                                              beta=outcome.bound.beta)


def test_white_box_is_not_vacuous_with_little_noise() -> None:
    # σ = 1.5 over 10 full-batch steps: each canary moves its weight by 10 C against noise of std 4.7 C.
    assert _audit(noise_multiplier=1.5, **RECORD).bound.epsilon_lower > 1.0


def test_poisson_subsampled_run_stays_under_the_ledger() -> None:
    outcome = _audit(level=Neighbouring.RECORD, noise_multiplier=1.5, sample_rate=0.1, steps=60, records=400,
                     canaries=400, seed=13)
    assert 0.0 < outcome.bound.epsilon_lower <= outcome.claimed_epsilon


@pytest.mark.parametrize("sigma", [1.5, 8.0])
def test_black_box_stays_under_the_ledger(sigma: float) -> None:
    outcome = _audit(noise_multiplier=sigma, mode=ScoreMode.BLACK_BOX, **RECORD)
    assert outcome.bound.epsilon_lower <= outcome.claimed_epsilon


@pytest.mark.parametrize("sigma", [2.0, 8.0])
def test_silo_level_stays_under_the_ledger(sigma: float) -> None:
    outcome = _audit(noise_multiplier=sigma, **SILO)
    assert outcome.bound.epsilon_lower <= outcome.claimed_epsilon
    assert sorted(outcome.membership) == ["silo-1", "silo-2", "silo-3"]
    assert all(0.0 <= r.auroc <= 1.0 and r.members == 200 for r in outcome.membership.values())


@pytest.mark.parametrize("scale", ["0.01", "0"])
@pytest.mark.parametrize("setting", [RECORD, SILO], ids=["record", "silo"])
def test_reduced_noise_exceeds_the_claim(monkeypatch: pytest.MonkeyPatch, scale: str, setting: dict) -> None:
    monkeypatch.setenv(FAULT_ENV, f"break-dp:{scale}")
    with pytest.warns(RuntimeWarning, match="TESTING FAULT ON"):
        outcome = run_empirical_audit(EmpiricalAuditConfig(noise_multiplier=8.0, **setting))
    assert outcome.noise_scale_actual == float(scale)
    assert outcome.claimed_epsilon <= outcome.ledger_epsilon < 2.0  # the claim: σ = 8, ten releases
    assert outcome.bound.epsilon_lower > outcome.ledger_epsilon + 1.0 > outcome.claimed_epsilon + 1.0
    assert outcome.exceeds_ledger and outcome.record()["exceeds_ledger"] is True


@pytest.mark.parametrize("value", ["", "0.01", "break-dp:", "break-dp:1", "break-dp:-0.5", "break-dp:nan",
                                   "BREAK-DP:0.1"])
def test_fault_switch_refuses_anything_but_its_exact_form(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(FAULT_ENV, value)
    with pytest.raises(FaultSwitchError, match=re.escape(FAULT_ENV)):
        injected_noise_scale()


def test_fault_switch_is_off_by_default() -> None:
    assert injected_noise_scale() == 1.0


def test_only_the_audit_reads_the_fault_switch() -> None:
    readers = sorted(
        str(path.relative_to(ROOT))
        for folder in ("fedsilo", "privacy", "models", "coordinator", "silo_agent", "proto")
        for path in (ROOT / folder).rglob("*.py")
        if FAULT_ENV in path.read_text(encoding="utf-8")
    )
    assert readers == ["silo_agent/empirical/fault.py"]


def test_seeded_audits_repeat_and_secret_is_balanced() -> None:
    a = _audit(noise_multiplier=3.0, **RECORD)
    b = _audit(noise_multiplier=3.0, **RECORD)
    assert a.bound == b.bound
    assert a.membership == b.membership


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(noise_multiplier=0.0), "invalid noise_multiplier 0.0"),
        (dict(canaries=3), "invalid canaries 3"),
        (dict(sample_rate=1.5), "invalid sample_rate 1.5"),
        (dict(delta=1.0), "invalid delta 1.0"),
        (dict(confidence=0.0), "invalid confidence 0.0"),
        (dict(steps=0), "invalid steps 0"),
        (dict(level="record"), "invalid level 'record'"),
        (dict(mode="white_box"), "invalid mode 'white_box'"),
        (dict(level=Neighbouring.SILO, mode=ScoreMode.BLACK_BOX, sample_rate=1.0), "invalid mode 'black_box'"),
        (dict(level=Neighbouring.SILO, sample_rate=0.5), "invalid sample_rate 0.5 at silo level"),
        (dict(silos=2), "invalid silos 2 at record level"),
        (dict(seed=-1), "invalid seed -1"),
    ],
)
def test_bad_config_is_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        EmpiricalAuditConfig(**kwargs)


def test_guess_sizes_scale_with_the_canaries() -> None:
    assert EmpiricalAuditConfig(canaries=1000).guess_sizes == ((25, 25), (50, 50), (100, 100), (250, 250))
    assert all(k >= 1 for k, _ in EmpiricalAuditConfig(canaries=4).guess_sizes)
    assert np.all(np.diff([k for k, _ in EmpiricalAuditConfig(canaries=400).guess_sizes]) > 0)
