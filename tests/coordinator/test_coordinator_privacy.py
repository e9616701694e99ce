"""The coordinator's side of DP: budgets at join, the verified ledger mirror, accounted uploads,
declined rounds and retired silos, the planned-spend check, and the ``[privacy]`` config.

Plain ``Coordinator`` with a fake clock and real certificates, real signed ledgers; state is
observed only through public methods.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest

from fedsilo.coordinator.config import AggregationMode, ConfigError, FederationConfig, TlsFiles
from fedsilo.coordinator.loading import load_federation_config
from fedsilo.core.errors import FailedPrecondition, InvalidArgument
from fedsilo.coordinator.run import Coordinator
from fedsilo.coordinator.records import RunState, TaskKind, UploadChunk, UploadHeader, UploadTrailer
from fedsilo.core.tensors import Manifest, payload_chunks
from fedsilo.privacy import pki
from fedsilo.privacy.accounting import LEDGER_RDP_ORDERS, RdpAccountant
from fedsilo.privacy.budget import BUDGETS_DIR, sign_budget
from fedsilo.privacy.ledger import Ledger
from fedsilo.privacy.upload_statement import sign_upload_statement
from fedsilo.privacy.pki import Identity, Role
from fedsilo.privacy.plan import PrivacyPlan, ledger_fields

SILOS = ("hospital-a", "hospital-b", "hospital-c")
SHAPES = {"w": (3, 4)}
MANIFEST = Manifest.of_arrays({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
FP = "cd" * 32
PLAN = PrivacyPlan(record_level=True, sample_rate=0.2, steps_per_round=5, max_grad_norm=1.0, noise_multiplier=1.2,
                   delta=1e-5)
RDP = RdpAccountant(orders=LEDGER_RDP_ORDERS)
#: The silos' (certificate, key) PEMs of the module's PKI (filled by the `fed` fixture): `upload` signs with them.
_CERTS: dict[str, tuple[bytes, bytes]] = {}


@dataclasses.dataclass(frozen=True)
class Fed:
    root: Path
    ca: Path
    certs: dict[str, tuple[bytes, bytes]]
    coordinator: pki.IssuedPaths


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Fed:
    root = tmp_path_factory.mktemp("dp-pki")
    ca = pki.init_ca(root / "ca")
    certs = {}
    for name in SILOS:
        p = pki.issue_certificate(root / "ca", root / "certs", role=Role.SILO, name=name)
        certs[name] = (p.cert.read_bytes(), p.key.read_bytes())
    coord = pki.issue_certificate(root / "ca", root / "certs", role=Role.COORDINATOR, name="coordinator",
                                  hosts=["localhost"])
    _CERTS.update(certs)
    return Fed(root=root, ca=ca.cert, certs=certs, coordinator=coord)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def config(fed: Fed, state_dir: Path, **kw: object) -> FederationConfig:
    args: dict[str, object] = dict(
        run_id="dp-run", silos=SILOS, rounds=3, min_silos=2, round_deadline_s=60.0, start_grace_s=0.0,
        aggregation=AggregationMode.PLAIN, state_dir=state_dir, privacy=PLAN,
        tls=TlsFiles(ca=fed.ca, cert=fed.coordinator.cert, key=fed.coordinator.key))
    args.update(kw)
    return FederationConfig(**args)  # type: ignore[arg-type]


def who(name: str) -> Identity:
    return Identity(role=Role.SILO, name=name)


def statement(fed: Fed, name: str, epsilon: float = 10.0) -> bytes:
    cert, key = fed.certs[name]
    return sign_budget(silo=name, epsilon=epsilon, delta=1e-5, certificate_pem=cert,
                       private_key_pem=key).to_json().encode()


def join(coord: Coordinator, fed: Fed, name: str) -> None:
    coord.join(who(name), model_fingerprint=FP, num_train_examples=40, manifest=MANIFEST, agent_version="t",
               budget_statement=statement(fed, name))


def ledger(fed: Fed, tmp: Path, name: str) -> Ledger:
    cert, key = fed.certs[name]
    return Ledger.open(tmp / f"{name}.sqlite", silo=name, certificate_pem=cert, private_key_pem=key)


def account(led: Ledger, rnd: int, plan: PrivacyPlan = PLAN, run_id: str = "dp-run") -> list[str]:
    out = []
    for planned in plan.round_releases():
        e = led.append(**ledger_fields(led.entries(), planned, delta=1e-5, run_id=run_id, round=rnd, accountant=RDP))
        out.append(e.to_json())
    return out


def upload(coord: Coordinator, name: str, rnd: int, weight: float = 40.0) -> None:
    """Uploads as the silo's agent does, the trailer carrying its signed statement."""
    arrays = {k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}
    chunks = list(payload_chunks(arrays, 64))
    coord.submit(who(name), [UploadHeader(round=rnd, weight=weight, manifest=MANIFEST),
                             *(UploadChunk(data=c) for c in chunks),
                             UploadTrailer(num_chunks=len(chunks), sha256=hashlib.sha256(b"".join(chunks)).digest(),
                                           statement=_statement(coord, name, rnd, b"".join(chunks)))])


def _statement(coord: Coordinator, name: str, rnd: int, payload: bytes) -> str:
    cert, key = _CERTS[name]
    return sign_upload_statement(run_id=coord.cfg.run_id, round=rnd, silo=name,
                                 sha256=hashlib.sha256(payload).hexdigest(), payload_bytes=len(payload),
                                 certificate_pem=cert, private_key_pem=key).to_json()


def test_join_needs_a_valid_budget_statement_and_refusals_store_nothing(fed: Fed, tmp_path: Path) -> None:
    coord = Coordinator(config(fed, tmp_path / "c"), clock=Clock())
    kw = dict(model_fingerprint=FP, num_train_examples=40, manifest=MANIFEST, agent_version="t")
    with pytest.raises(InvalidArgument, match="budget_statement .*required"):
        coord.join(who("hospital-a"), **kw)
    with pytest.raises(InvalidArgument, match="caller is 'hospital-a'"):
        coord.join(who("hospital-a"), **kw, budget_statement=statement(fed, "hospital-b"))
    tampered = statement(fed, "hospital-a", 10.0).replace(b'"epsilon":"10.0"', b'"epsilon":"99.0"')
    assert tampered != statement(fed, "hospital-a", 10.0)
    with pytest.raises(InvalidArgument, match="budget_statement refused"):
        coord.join(who("hospital-a"), **kw, budget_statement=tampered)
    with pytest.raises(InvalidArgument, match="budget_statement refused"):
        coord.join(who("hospital-a"), **kw, budget_statement=b"{not json")
    assert not any(s.joined for s in coord.status().silos)
    assert not (tmp_path / "c" / BUDGETS_DIR).exists() or not any((tmp_path / "c" / BUDGETS_DIR).iterdir())
    join(coord, fed, "hospital-a")
    assert (tmp_path / "c" / BUDGETS_DIR / "hospital-a.json").is_file()
    coord.close()


def test_uploads_need_mirrored_entries_that_match_the_plan(fed: Fed, tmp_path: Path) -> None:
    coord = Coordinator(config(fed, tmp_path / "c"), clock=Clock())
    for s in SILOS:
        join(coord, fed, s)
    assert coord.get_task(who("hospital-a"), after_round=0, wait_s=0).kind is TaskKind.TRAIN
    with pytest.raises(FailedPrecondition, match="no record-level privacy-ledger entry"):
        upload(coord, "hospital-a", 1)
    a = ledger(fed, tmp_path, "hospital-a")
    wrong = dataclasses.replace(PLAN, noise_multiplier=0.7)
    assert coord.submit_ledger_entries(who("hospital-a"), account(a, 1, wrong)) == 1
    with pytest.raises(FailedPrecondition, match="no mirrored record-level ledger entry of silo 'hospital-a' matches the run's plan"):
        upload(coord, "hospital-a", 1)
    assert coord.submit_ledger_entries(who("hospital-a"), account(a, 1)) == 2
    upload(coord, "hospital-a", 1)
    assert coord.status().silos[0].rounds_contributed == 0  # round still open
    assert [r.contributors for r in coord.round_summaries()] == [("hospital-a",)]
    coord.close()


def test_the_mirror_refuses_bad_entries_without_changing(fed: Fed, tmp_path: Path) -> None:
    coord = Coordinator(config(fed, tmp_path / "c"), clock=Clock())
    join(coord, fed, "hospital-a")
    join(coord, fed, "hospital-b")
    a, b = ledger(fed, tmp_path, "hospital-a"), ledger(fed, tmp_path, "hospital-b")
    first = account(a, 1)
    assert coord.submit_ledger_entries(who("hospital-a"), first) == 1
    assert coord.submit_ledger_entries(who("hospital-a"), first) == 1  # a resend is a no-op
    second = account(a, 2)[0]
    flipped = second.replace('"round":2', '"round":3')
    with pytest.raises(InvalidArgument, match="seq 2"):
        coord.submit_ledger_entries(who("hospital-a"), [flipped])
    with pytest.raises(InvalidArgument, match="sent by silo 'hospital-a'"):
        coord.submit_ledger_entries(who("hospital-a"), account(b, 1))
    with pytest.raises(InvalidArgument, match="at most 64"):
        coord.submit_ledger_entries(who("hospital-a"), ["{}"] * 65)
    assert coord.submit_ledger_entries(who("hospital-a"), []) == 1
    assert coord.submit_ledger_entries(who("hospital-a"), [second]) == 2
    coord.close()


def test_a_declining_silo_retires_and_the_run_goes_on_then_fails_below_quorum(fed: Fed, tmp_path: Path) -> None:
    clock = Clock()
    state = tmp_path / "c"
    coord = Coordinator(config(fed, state), clock=clock)
    ledgers = {s: ledger(fed, tmp_path, s) for s in SILOS}
    for s in SILOS:
        join(coord, fed, s)
    for s in ("hospital-a", "hospital-b"):
        coord.submit_ledger_entries(who(s), account(ledgers[s], 1))
        upload(coord, s, 1)
    assert coord.status().last_closed_round == 0
    with pytest.raises(InvalidArgument, match="reason"):
        coord.decline(who("hospital-c"), rnd=1, reason="", final=True)
    with pytest.raises(FailedPrecondition, match="already uploaded"):
        coord.decline(who("hospital-a"), rnd=1, reason="budget", final=True)
    state_after, training = coord.decline(who("hospital-c"), rnd=1, reason="privacy budget spent", final=True)
    assert (state_after, training) == (RunState.RUNNING, 2)
    assert coord.status().last_closed_round == 1  # everyone still training had uploaded: closed at once
    task = coord.get_task(who("hospital-c"), after_round=1, wait_s=0)
    assert task.kind is TaskKind.WAIT and "stopped training from round 1" in task.message
    with pytest.raises(FailedPrecondition, match="stopped training"):
        upload(coord, "hospital-c", 2)
    coord.close()
    coord = Coordinator(config(fed, state), clock=clock)  # survives a restart
    status = {s.name: s for s in coord.status().silos}
    assert status["hospital-c"].retired_from_round == 1 and "budget" in status["hospital-c"].retired_reason
    assert coord.get_task(who("hospital-c"), after_round=1, wait_s=0).kind is TaskKind.WAIT
    state_after, training = coord.decline(who("hospital-b"), rnd=2, reason="privacy budget spent", final=True)
    assert (state_after, training) == (RunState.FAILED, 1)
    assert "fewer than min_silos = 2" in coord.status().message
    assert coord.get_task(who("hospital-a"), after_round=1, wait_s=0).kind is TaskKind.STOP
    coord.close()


def test_silo_level_runs_weigh_every_silo_equally(fed: Fed, tmp_path: Path) -> None:
    plan = PrivacyPlan(silo_level=True, update_clip_norm=1.0, update_noise_multiplier=1.0, delta=1e-5)
    coord = Coordinator(config(fed, tmp_path / "c", privacy=plan, start_grace_s=30.0), clock=Clock())
    for s in SILOS:
        join(coord, fed, s)
    a = ledger(fed, tmp_path, "hospital-a")
    coord.submit_ledger_entries(who("hospital-a"), account(a, 1, plan))
    assert coord.get_task(who("hospital-a"), after_round=0, wait_s=0).weight_normalizer == 3.0
    with pytest.raises(InvalidArgument, match="weight 40.0 must be 1"):
        upload(coord, "hospital-a", 1, weight=40.0)
    upload(coord, "hospital-a", 1, weight=1.0)
    coord.close()


def test_refuses_to_start_a_run_whose_plan_exceeds_an_agreed_budget(fed: Fed, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"privacy.budgets.hospital-b: .*record-level ε to [0-9.]+ by RDP after 3 rounds"):
        Coordinator(config(fed, tmp_path / "c", budgets={"hospital-a": 50.0, "hospital-b": 1.0}), clock=Clock())
    Coordinator(config(fed, tmp_path / "c2", budgets={"hospital-a": 50.0, "hospital-b": 50.0}),
                clock=Clock()).close()


def _toml(tmp: Path, privacy: str, extra_run: str = "") -> Path:
    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp / name).write_text("x")
    p = tmp / "federation.toml"
    p.write_text(f"""
[run]
id = "r"
rounds = 4
min_silos = 2
{extra_run}
[silos]
enrolled = ["a", "b", "c"]
[server]
ca = "ca.pem"
cert = "c.pem"
key = "c.key"
[privacy]
{privacy}
""")
    return p


RECORD = 'record_level = true\nsample_rate = 0.1\nsteps_per_round = 5\nmax_grad_norm = 1.0\n'


@pytest.mark.parametrize(("privacy", "field"), [
    (RECORD + "target_epsilon = 0.0", "privacy.target_epsilon"),
    (RECORD + "target_epsilon = -3.0", "privacy.target_epsilon"),
    (RECORD + "noise_multiplier = 0.0", "privacy.noise_multiplier"),
    (RECORD.replace("1.0", "0.0") + "noise_multiplier = 1.0", "privacy.max_grad_norm"),
    (RECORD.replace("1.0", "-1.0") + "noise_multiplier = 1.0", "privacy.max_grad_norm"),
    (RECORD + "noise_multiplier = 1.0\ndelta = 1.0", "privacy.delta"),
    (RECORD + "noise_multiplier = 1.0\ndelta = 0.0", "privacy.delta"),
    ("silo_level = true\nupdate_clip_norm = 1.0\nupdate_noise_multiplier = 1.0\ndelta = 0.4", "privacy.delta"),
    ("silo_level = true\nupdate_clip_norm = 1.0\nupdate_noise_multiplier = 0", "privacy.update_noise_multiplier"),
    ("silo_level = true\nupdate_clip_norm = 0\nupdate_noise_multiplier = 1", "privacy.update_clip_norm"),
    (RECORD, "privacy.noise_multiplier"),
    (RECORD + "noise_multiplier = 1.0\ntarget_epsilon = 3.0", "privacy.target_epsilon"),
    (RECORD + "noise_multiplier = 1.0\nbudgets = { z = 1.0 }", "privacy.budgets.z"),
    (RECORD + "noise_multiplier = 1.0\nbudgets = { a = 0.0 }", "privacy.budgets.a"),
    (RECORD + "noise_multiplier = 1.0\nbogus = 1", "privacy.bogus"),
    (RECORD + 'noise_multiplier = 1.0\naccountant = "prv"', "privacy.accountant"),
    (RECORD + "noise_multiplier = 1.0\naccountant = 1", "privacy.accountant"),
    ("record_level = false", "privacy"),
])
def test_bad_privacy_configs_are_refused_naming_the_field(tmp_path: Path, privacy: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_federation_config(_toml(tmp_path, privacy))
    assert str(err.value).startswith(field), str(err.value)


def test_target_epsilon_is_calibrated_for_the_whole_run(tmp_path: Path) -> None:
    from fedsilo.privacy.accounting import DpAccountingVerifier, Mechanism, Neighbouring, Release

    cfg = load_federation_config(_toml(tmp_path, RECORD + "target_epsilon = 3.0"))
    plan = cfg.privacy
    assert plan is not None and plan.record_level
    total = Release(mechanism=Mechanism.SUBSAMPLED_GAUSSIAN, neighbouring=Neighbouring.RECORD,
                    noise_multiplier=plan.noise_multiplier, sample_rate=0.1, steps=4 * 5)
    eps = DpAccountingVerifier(orders=LEDGER_RDP_ORDERS).epsilon([total], delta=plan.delta).epsilon
    assert 2.99 <= eps <= 3.0
    cfg2 = load_federation_config(_toml(tmp_path, "silo_level = true\nupdate_clip_norm = 1.0\n"
                                                  "update_target_epsilon = 3.0\ndelta = 1e-5",
                                        extra_run='aggregation = "he"'))
    assert cfg2.privacy.noise_shares == 2  # distributed by default under HE: min_silos shares
    # the target holds against one silo's upload (σ/√2), the figure budgets are checked against
    single = cfg2.privacy.update_noise_multiplier / 2**0.5
    per_upload = Release(mechanism=Mechanism.GAUSSIAN, neighbouring=Neighbouring.SILO, noise_multiplier=single,
                         sample_rate=1.0, steps=4)
    assert 2.99 <= DpAccountingVerifier(orders=LEDGER_RDP_ORDERS).epsilon([per_upload], delta=1e-5).epsilon <= 3.0


def test_pld_calibrates_a_smaller_sigma_for_the_same_target(tmp_path: Path) -> None:
    from fedsilo.privacy.accounting import (BudgetAccountant, DpAccountingVerifier, Mechanism, Neighbouring,
                                            PldAccountant, Release)

    rdp = load_federation_config(_toml(tmp_path, RECORD + "target_epsilon = 3.0"))
    pld = load_federation_config(_toml(tmp_path, RECORD + 'target_epsilon = 3.0\naccountant = "pld"'))
    assert (rdp.accountant, pld.accountant) == (BudgetAccountant.RDP, BudgetAccountant.PLD)
    sigma = pld.privacy.noise_multiplier
    assert sigma < rdp.privacy.noise_multiplier

    def run(s: float) -> list[Release]:
        return [Release(mechanism=Mechanism.SUBSAMPLED_GAUSSIAN, neighbouring=Neighbouring.RECORD,
                        noise_multiplier=s, sample_rate=0.1, steps=4 * 5)]

    assert 2.99 <= PldAccountant().epsilon(run(sigma), delta=1e-5).epsilon <= 3.0
    assert DpAccountingVerifier(orders=LEDGER_RDP_ORDERS).epsilon(run(sigma), delta=1e-5).epsilon > 3.0


def test_budgets_are_checked_by_the_coordinators_accountant(fed: Fed, tmp_path: Path) -> None:
    from fedsilo.privacy.accounting import BudgetAccountant, DpAccountingVerifier, PldAccountant
    from fedsilo.privacy.ledger import GuaranteeScope

    whole = [r.release(GuaranteeScope.SINGLE_UPLOAD, steps=r.steps * 3) for r in PLAN.round_releases()]
    by_rdp = DpAccountingVerifier(orders=LEDGER_RDP_ORDERS).epsilon(whole, delta=PLAN.delta).epsilon
    by_pld = PldAccountant().epsilon(whole, delta=PLAN.delta).epsilon
    between = (by_rdp + by_pld) / 2
    budgets = {"hospital-a": 50.0, "hospital-b": between}
    with pytest.raises(ConfigError, match=r"hospital-b.* by RDP after 3 rounds"):
        Coordinator(config(fed, tmp_path / "c", budgets=budgets), clock=Clock())
    Coordinator(config(fed, tmp_path / "c2", budgets=budgets, accountant=BudgetAccountant.PLD), clock=Clock()).close()
    with pytest.raises(ConfigError, match="privacy.accountant: 'pld' is not one of"):
        config(fed, tmp_path / "c3", accountant="pld")


def test_a_missing_setting_names_the_level_that_needs_it(tmp_path: Path) -> None:
    both = RECORD + "noise_multiplier = 1.0\nsilo_level = true\nupdate_noise_multiplier = 1.0"
    with pytest.raises(ConfigError, match=r"^privacy\.update_clip_norm: missing \(required with silo_level = true\)"):
        load_federation_config(_toml(tmp_path, both, extra_run='aggregation = "he"'))
    with pytest.raises(ConfigError, match=r"^privacy\.max_grad_norm: set but record_level is off"):
        load_federation_config(_toml(tmp_path, "max_grad_norm = 1.0\nsilo_level = true\nupdate_clip_norm = 1.0\n"
                                               "update_noise_multiplier = 1.0"))


# -- pFL-ResFIM's own releases: the style bank and the masks' noisy Fisher ---------------------------

RESFIM_PLAN = dataclasses.replace(PLAN, resfim_every=2, fisher_noise_multiplier=5.0, fisher_clip_norm=1.0,
                                  style_noise_multiplier=3.0, style_clip_norm=40.0)


def resfim_config(fed: Fed, state_dir: Path, **kw: object) -> FederationConfig:
    return config(fed, state_dir, strategy="resfim", aggregation=AggregationMode.HE, privacy=RESFIM_PLAN,
                  tables={"resfim": {"recompute_every": 2, "style_clip_norm": 40.0}}, **kw)


def reserve(led: Ledger, planned, rnd: int = 1) -> str:
    return led.append(**ledger_fields(led.entries(), planned, delta=1e-5, run_id="dp-run", round=rnd,
                                      accountant=RDP)).to_json()


def test_resfim_bank_and_masked_uploads_need_their_own_ledger_entries(fed: Fed, tmp_path: Path) -> None:
    """With private masks, a style bank is refused until its Gaussian release is mirrored, and an upload in
    a mask round until the mask's noisy-Fisher release is (beside DP-SGD's); refusals store nothing."""
    from fedsilo.privacy.he import SecretContext
    from fedsilo.privacy.keywrap import KemKeyPair, announce_kem_public, wrap_key
    from fedsilo.privacy.relay_blob import sign_relay_blob

    coord = Coordinator(resfim_config(fed, tmp_path / "c"), clock=Clock())
    kems = {s: KemKeyPair.generate() for s in SILOS}
    params = coord.cfg.he_params()
    secret = SecretContext.generate(params).secret_key_bytes()

    def wrapped_for(recipient: str) -> bytes:  # the key holder's bundle, as the coordinator checks it
        return wrap_key(secret=secret, run_id="dp-run", issuer="hospital-a",
                        issuer_certificate_pem=fed.certs["hospital-a"][0],
                        issuer_private_key_pem=fed.certs["hospital-a"][1], params_fingerprint=params.fingerprint(),
                        recipient=recipient, recipient_public=kems[recipient].public_bytes()).to_bytes()

    for s in SILOS:
        kem = announce_kem_public(run_id="dp-run", silo=s, public=kems[s].public_bytes(),
                                  certificate_pem=fed.certs[s][0], private_key_pem=fed.certs[s][1])
        coord.join(who(s), model_fingerprint=FP, num_train_examples=40, manifest=MANIFEST, agent_version="t",
                   kem_announcement=kem, budget_statement=statement(fed, s))
    bank = sign_relay_blob(run_id="dp-run", purpose="style-bank", silo="hospital-a", payload=b"sealed bank",
                           certificate_pem=fed.certs["hospital-a"][0],
                           private_key_pem=fed.certs["hospital-a"][1]).to_json().encode("ascii")
    a = ledger(fed, tmp_path, "hospital-a")
    with pytest.raises(FailedPrecondition, match="no mirrored privacy-ledger entry accounts its 'style-bank' blob"):
        coord.publish_sealed(who("hospital-a"), "style-bank", bank)
    assert coord.sealed(who("hospital-b"), "style-bank").entries == ()
    wrong = dataclasses.replace(RESFIM_PLAN, style_noise_multiplier=1.0).style_release()
    coord.submit_ledger_entries(who("hospital-a"), [reserve(a, wrong)])
    with pytest.raises(FailedPrecondition, match="accounts its 'style-bank' blob"):
        coord.publish_sealed(who("hospital-a"), "style-bank", bank)
    coord.submit_ledger_entries(who("hospital-a"), [reserve(a, RESFIM_PLAN.style_release())])
    assert coord.publish_sealed(who("hospital-a"), "style-bank", bank) == 1
    coord.publish_wrapped_keys(who("hospital-a"), [(s, wrapped_for(s)) for s in SILOS[1:]])
    assert coord.get_task(who("hospital-a"), after_round=0, wait_s=0).kind is TaskKind.TRAIN
    coord.submit_ledger_entries(who("hospital-a"), [reserve(a, p) for p in RESFIM_PLAN.round_releases()])
    from fedsilo.core.phases import masked_manifest
    from fedsilo.core.tensors import PayloadEncoding

    header = UploadHeader(round=1, weight=40.0, manifest=masked_manifest(MANIFEST, local_part=False),
                          encoding=PayloadEncoding.HE_CIPHERTEXTS, payload_bytes=1000)
    with pytest.raises(FailedPrecondition, match=r"no mirrored record-level scheduled extra release ledger entry"):
        coord.submit(who("hospital-a"), [header])
    [open_round] = coord.round_summaries()
    assert open_round.contributors == () and not open_round.closed
    assert open_round.params_shared == MANIFEST.numel  # the masked layout carries each value two or three times
    coord.submit_ledger_entries(who("hospital-a"), [reserve(a, RESFIM_PLAN.fisher_release())])
    with pytest.raises(InvalidArgument, match="truncated"):  # accounted now: it gets as far as the payload
        coord.submit(who("hospital-a"), [header])
    assert RESFIM_PLAN.extra_releases(2) == [] and RESFIM_PLAN.extra_releases(3) == [RESFIM_PLAN.fisher_release()]


def test_resfim_releases_count_in_the_planned_spend(fed: Fed, tmp_path: Path) -> None:
    """A budget that DP-SGD alone fits but DP-SGD plus the bank and masks does not is refused at start."""
    from fedsilo.privacy.plan import projected_spend
    from fedsilo.privacy.ledger import Neighbouring

    alone = projected_spend([], RESFIM_PLAN.round_releases(), delta=1e-5, repeats=3)[Neighbouring.RECORD]
    total = projected_spend([], RESFIM_PLAN.round_releases(), delta=1e-5, repeats=3,
                            extra=RESFIM_PLAN.run_extras(3))[Neighbouring.RECORD]
    assert alone < total
    budget = (alone + total) / 2
    with pytest.raises(ConfigError, match="privacy.budgets.hospital-a"):
        Coordinator(resfim_config(fed, tmp_path / "c", budgets={"hospital-a": budget}), clock=Clock())
    Coordinator(resfim_config(fed, tmp_path / "d", budgets={"hospital-a": total + 1e-6}), clock=Clock()).close()
