"""Tests of fedsilo.privacy.plan: the run's DP plan and the ledger arithmetic of its releases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.privacy import pki
from fedsilo.privacy.accounting import LEDGER_RDP_ORDERS, DpAccountingVerifier, Release, RdpAccountant, pld_or_none
from fedsilo.privacy.accounting import Mechanism as AMechanism
from fedsilo.privacy.accounting import Neighbouring as ANeighbouring
from fedsilo.privacy.ledger import GuaranteeScope, Ledger, Neighbouring, check_cumulative
from fedsilo.privacy.plan import PrivacyPlan, entry_release, ledger_fields, plan_from_mapping, projected_spend
from fedsilo.privacy.pki import Role

RUN = "plan-test"
DELTA = 1e-5
RDP = RdpAccountant(orders=LEDGER_RDP_ORDERS)


@pytest.fixture(scope="module")
def silo(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, bytes]:
    root = tmp_path_factory.mktemp("plan-pki")
    ca = pki.init_ca(root / "ca")
    paths = pki.issue_certificate(root / "ca", root / "certs", role=Role.SILO, name="hospital-a")
    return ca.cert.read_bytes(), paths.cert.read_bytes(), paths.key.read_bytes()


def _ledger(path: Path, silo: tuple[bytes, bytes, bytes]) -> Ledger:
    return Ledger.open(path, silo="hospital-a", certificate_pem=silo[1], private_key_pem=silo[2])


def _recompute(history, scope):  # noqa: ANN001, ANN202 - check_cumulative's callback
    return RDP.epsilon([entry_release(e, scope) for e in history], delta=history[-1].delta).epsilon


def test_plan_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="noise_multiplier 0"):
        PrivacyPlan(record_level=True, sample_rate=0.1, steps_per_round=5, max_grad_norm=1.0, noise_multiplier=0)
    with pytest.raises(ValueError, match="max_grad_norm -1"):
        PrivacyPlan(record_level=True, sample_rate=0.1, steps_per_round=5, max_grad_norm=-1, noise_multiplier=1)
    with pytest.raises(ValueError, match="sample_rate 1.5"):
        PrivacyPlan(record_level=True, sample_rate=1.5, steps_per_round=5, max_grad_norm=1, noise_multiplier=1)
    with pytest.raises(ValueError, match="update_clip_norm 0"):
        PrivacyPlan(silo_level=True, update_clip_norm=0, update_noise_multiplier=1)
    with pytest.raises(ValueError, match="delta 1.0"):
        PrivacyPlan(silo_level=True, update_clip_norm=1, update_noise_multiplier=1, delta=1.0)
    with pytest.raises(ValueError, match="noise_shares 3"):
        PrivacyPlan(record_level=True, sample_rate=0.1, steps_per_round=5, max_grad_norm=1, noise_multiplier=1,
                    noise_shares=3)
    with pytest.raises(ValueError, match="invalid bogus"):
        plan_from_mapping({"bogus": 1})
    assert not PrivacyPlan().enabled


def test_round_releases_split_the_noise_into_shares() -> None:
    plan = PrivacyPlan(record_level=True, sample_rate=0.2, steps_per_round=7, max_grad_norm=1.5,
                       noise_multiplier=1.1, silo_level=True, update_clip_norm=0.5, update_noise_multiplier=2.0,
                       noise_shares=4)
    record, silo_ = plan.round_releases()
    assert (record.neighbouring, record.mechanism, record.steps, record.sample_rate) == (
        ANeighbouring.RECORD, AMechanism.SUBSAMPLED_GAUSSIAN, 7, 0.2)
    assert not record.distributed
    assert silo_.neighbouring is ANeighbouring.SILO and silo_.mechanism is AMechanism.GAUSSIAN
    assert silo_.noise_multiplier == 2.0 and silo_.single_upload_noise_multiplier == pytest.approx(1.0)
    assert silo_.distributed


def test_ledger_fields_known_answer(silo: tuple[bytes, bytes, bytes], tmp_path: Path) -> None:
    """One Gaussian release σ=1 at δ=1e-5 on the ledger's integer orders, checked by dp_accounting."""
    plan = PrivacyPlan(silo_level=True, update_clip_norm=1.0, update_noise_multiplier=1.0)
    with _ledger(tmp_path / "l.sqlite", silo) as ledger:
        entry = ledger.append(**ledger_fields([], plan.round_releases()[0], delta=DELTA, run_id=RUN, round=1,
                                              accountant=RDP))
    verifier = DpAccountingVerifier(orders=LEDGER_RDP_ORDERS)
    want = verifier.epsilon([Release(mechanism=AMechanism.GAUSSIAN, neighbouring=ANeighbouring.SILO,
                                     noise_multiplier=1.0, sample_rate=1.0, steps=1)], delta=DELTA).epsilon
    assert entry.epsilon_rdp == pytest.approx(want, abs=1e-9)
    assert entry.cumulative_epsilon == pytest.approx(want, abs=1e-9)
    # integer orders cost at most a little against the finer default grid (4.7285 there)
    assert 4.7285 <= entry.epsilon_rdp <= 4.80
    assert entry.single_upload is None and entry.guarantee_scope is GuaranteeScope.SINGLE_UPLOAD


plans = st.builds(
    PrivacyPlan,
    record_level=st.just(True),
    sample_rate=st.sampled_from([0.05, 0.2, 1.0]),
    steps_per_round=st.sampled_from([1, 5, 30]),
    max_grad_norm=st.sampled_from([0.5, 1.0]),
    # a few σ values, so that the PLD of each mechanism is built once across examples (it is cached)
    noise_multiplier=st.sampled_from([1.0, 3.0]),
    silo_level=st.just(True),
    update_clip_norm=st.just(1.0),
    update_noise_multiplier=st.sampled_from([2.0, 5.0]),  # small σ/√K: large Gaussian PLDs, seconds each
    noise_shares=st.integers(1, 4),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rounds=st.lists(plans, min_size=1, max_size=4))
def test_ledger_cumulative_is_monotone_and_equals_a_fresh_recomputation(
    silo: tuple[bytes, bytes, bytes], tmp_path_factory: pytest.TempPathFactory, rounds: list[PrivacyPlan]
) -> None:
    """Plans may change between runs (and shares come and go): the ledger stays exact."""
    path = tmp_path_factory.mktemp("ledger") / "l.sqlite"
    with _ledger(path, silo) as ledger:
        for rnd, plan in enumerate(rounds, start=1):
            for planned in plan.round_releases():
                ledger.append(**ledger_fields(ledger.entries(), planned, delta=DELTA, run_id=RUN, round=rnd,
                                              accountant=RDP))
        entries = ledger.entries()
        ledger.verify(ca_pem=silo[0])
    check_cumulative(entries, _recompute, tolerance=1e-9)
    for relation in Neighbouring:
        mine = [e for e in entries if e.neighbouring is relation]
        for scope in GuaranteeScope:
            values = [e.guarantee(scope).cumulative_epsilon for e in mine]
            assert values == sorted(values)
        single = [e.guarantee(GuaranteeScope.SINGLE_UPLOAD).cumulative_epsilon for e in mine]
        aggregate = [e.guarantee(GuaranteeScope.AGGREGATE).cumulative_epsilon for e in mine]
        assert all(s >= a - 1e-12 for s, a in zip(single, aggregate))
        # PLD beside it: never decreasing, never above RDP, and the newest entry's figure exact against
        # a fresh recomputation of the whole history
        for scope in GuaranteeScope:
            stated = [e.guarantee(scope) for e in mine]
            pld = [g.cumulative_epsilon_pld for g in stated if g.cumulative_epsilon_pld is not None]
            assert all(b >= a - 1e-9 for a, b in zip(pld, pld[1:]))
            assert all(g.cumulative_epsilon_pld <= g.cumulative_epsilon for g in stated
                       if g.cumulative_epsilon_pld is not None)
            if mine:
                history = [entry_release(e, scope) for e in mine]
                assert stated[-1].cumulative_epsilon_pld == pld_or_none(history, delta=DELTA)


def test_projected_spend_equals_what_the_ledger_then_says(silo: tuple[bytes, bytes, bytes], tmp_path: Path) -> None:
    plan = PrivacyPlan(record_level=True, sample_rate=0.25, steps_per_round=12, max_grad_norm=1.0,
                       noise_multiplier=1.3, silo_level=True, update_clip_norm=1.0, update_noise_multiplier=3.0,
                       noise_shares=2)
    with _ledger(tmp_path / "l.sqlite", silo) as ledger:
        for rnd in (1, 2):
            for planned in plan.round_releases():
                ledger.append(**ledger_fields(ledger.entries(), planned, delta=DELTA, run_id=RUN, round=rnd,
                                              accountant=RDP))
        ahead = projected_spend(ledger.entries(), plan.round_releases(), delta=DELTA, accountant=RDP)
        three_ahead = projected_spend(ledger.entries(), plan.round_releases(), delta=DELTA, repeats=3)
        for planned in plan.round_releases():
            ledger.append(**ledger_fields(ledger.entries(), planned, delta=DELTA, run_id=RUN, round=3,
                                          accountant=RDP))
        for relation, eps in ahead.items():
            assert ledger.cumulative(Neighbouring(relation.value)) == pytest.approx(eps, abs=1e-12)
            assert three_ahead[relation] > eps
    assert all(math.isfinite(v) for v in ahead.values())


# -- pFL-ResFIM's releases ----------------------------------------------------------------------

def _resfim_plan(**kw):
    from fedsilo.privacy.plan import PrivacyPlan

    args = dict(record_level=True, sample_rate=0.25, steps_per_round=12, max_grad_norm=1.0, noise_multiplier=2.0,
                delta=1e-5, resfim_every=5, fisher_noise_multiplier=5.0, fisher_clip_norm=0.5,
                style_noise_multiplier=3.0, style_clip_norm=40.0)
    args.update(kw)
    return PrivacyPlan(**args)


def test_resfim_releases_and_schedule() -> None:
    import math

    plan = _resfim_plan()
    f, s = plan.fisher_release(), plan.style_release()
    assert (f.mechanism.value, f.noise_multiplier, f.sample_rate, f.steps, f.clip_norm) == ("gaussian", 5.0, 1.0, 2, 0.25)
    assert (s.steps, s.clip_norm) == (1, math.sqrt(2) * 40.0)
    assert [r for r in range(1, 13) if plan.mask_round(r)] == [1, 6, 11]
    assert plan.run_extras(12) == [s, f, f, f]
    assert plan.extra_releases(6) == [f] and plan.extra_releases(7) == []
    assert "resfim_every" in plan.to_mapping()
    assert "resfim_every" not in _resfim_plan(resfim_every=0, fisher_noise_multiplier=0, fisher_clip_norm=0,
                                              style_noise_multiplier=0, style_clip_norm=0).to_mapping()


@pytest.mark.parametrize("kw, message", [
    (dict(record_level=False, silo_level=True, update_clip_norm=1.0, update_noise_multiplier=1.0),
     "need record_level"),
    (dict(fisher_clip_norm=0.0), "invalid fisher_clip_norm 0.0"),
    (dict(style_noise_multiplier=-1.0), "invalid style_noise_multiplier -1.0"),
    (dict(resfim_every=0), "invalid fisher_noise_multiplier 5.0: set only for pFL-ResFIM runs"),
    (dict(resfim_every=True), "invalid resfim_every True"),
    (dict(sample_rate=1.0, steps_per_round=2, noise_multiplier=5.0, max_grad_norm=0.25, fisher_clip_norm=0.5),
     "indistinguishable"),
])
def test_bad_resfim_plans_name_the_field(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _resfim_plan(**kw)


def test_projected_spend_composes_the_extras_once_and_calibration_leaves_room_for_them() -> None:
    from fedsilo.privacy.accounting import LEDGER_RDP_ORDERS, DpAccountingVerifier, calibrate_noise
    from fedsilo.privacy.ledger import Neighbouring
    from fedsilo.privacy.plan import projected_spend

    plan = _resfim_plan()
    acc = DpAccountingVerifier(orders=LEDGER_RDP_ORDERS)
    scope = GuaranteeScope.SINGLE_UPLOAD
    got = projected_spend([], plan.round_releases(), delta=1e-5, repeats=10, extra=plan.run_extras(10),
                          accountant=acc)[Neighbouring.RECORD]
    direct = acc.epsilon([plan.round_releases()[0].release(scope, steps=120)]
                         + [p.release(scope) for p in plan.run_extras(10)], delta=1e-5).epsilon
    assert got == pytest.approx(direct, rel=1e-12)
    fixed = [p.release(scope) for p in plan.run_extras(10)]
    plain = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.25, steps=120, accountant=acc)
    sigma = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.25, steps=120, accountant=acc,
                            fixed=fixed)
    assert sigma > plain
    tuned = _resfim_plan(noise_multiplier=sigma)
    total = projected_spend([], tuned.round_releases(), delta=1e-5, repeats=10, extra=tuned.run_extras(10),
                            accountant=acc)[Neighbouring.RECORD]
    assert total <= 8.0
