"""A silo's pFL-ResFIM session: its sealed style bank survives a restart byte for byte, banks the
coordinator tampered with are refused, and masks are computed once per scheduled round and kept.

The coordinator side here is a small in-memory stand-in (these tests are about the silo's state);
the real exchange over gRPC with mTLS is in tests/coordinator/test_coordinator_sealed_relay.py and
the e2e tests. Sealing is the real AES-GCM sealing of ``fedsilo.silo_agent.secure``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from fedsilo.silo_agent.methods.resfim import ResFimSettings
from fedsilo.models import ModelConfig, SyntheticConfig, build_model, silo_splits
from fedsilo.silo_agent.resfim import BANK_PURPOSE, ResFimError, ResFimSession
from fedsilo.silo_agent.secure import open_sealed, seal
from fedsilo.silo_agent.state import AgentState
from fedsilo.silo_agent.methods import strategy_for

RUN = "resfim-run"
SECRET = os.urandom(32)
DATA = SyntheticConfig(seed=0, image_size=32, n_train=8, n_val=0, n_test=2)
SETTINGS = ResFimSettings(rho=0.25, recompute_every=2, clusters=2, max_examples=8)


class Keys:
    """The parts of HeSession a ResFimSession uses: the run's shared secret, this silo's name."""

    def __init__(self, me: str) -> None:
        self.run_id, self.me = RUN, me

    def seal(self, data: bytes, *, purpose: str) -> bytes:
        return seal(SECRET, data, run_id=RUN, purpose=purpose, silo=self.me)

    def open_sealed(self, blob: bytes, *, purpose: str, silo: str) -> bytes:
        return open_sealed(SECRET, blob, run_id=RUN, purpose=purpose, silo=silo)


class Relay:
    """What the coordinator keeps: one sealed bank per silo, relayed as opaque bytes."""

    def __init__(self) -> None:
        self.banks: dict[str, bytes] = {}
        self.published: list[bytes] = []
        self.caller = ""

    def publish_sealed(self, purpose: str, sealed: bytes) -> int:
        assert purpose == "style-bank"  # the purpose ResFIM's method declares (Method.relays)
        self.published.append(sealed)
        self.banks.setdefault(self.caller, sealed)
        return len(self.banks)

    def sealed(self, purpose: str) -> tuple[dict[str, bytes], int]:
        assert purpose == "style-bank"
        return {s: b for s, b in self.banks.items() if s != self.caller}, len(self.banks)


def session(tmp_path: Path, me: str) -> ResFimSession:
    return ResFimSession(settings=SETTINGS, he=Keys(me), state_dir=tmp_path / me)  # type: ignore[arg-type]


def publish(relay: Relay, tmp_path: Path, me: str, domain: int) -> None:
    relay.caller = me
    (tmp_path / me).mkdir(exist_ok=True)
    session(tmp_path, me).publish_bank(relay, silo_splits(DATA, domain).train)  # type: ignore[arg-type]


def test_a_restarted_silo_publishes_the_same_sealed_bank(tmp_path: Path) -> None:
    relay = Relay()
    publish(relay, tmp_path, "hospital-a", 0)
    publish(relay, tmp_path, "hospital-a", 0)  # a new process, same state dir
    first, again = relay.published
    assert first == again  # the coordinator accepts exactly this resend
    assert len(first) > 100


def test_tampered_or_relabelled_banks_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    relay = Relay()
    publish(relay, tmp_path, "hospital-b", 1)
    publish(relay, tmp_path, "hospital-c", 2)
    relay.caller = "hospital-a"
    a = session(tmp_path, "hospital-a")
    good = relay.banks["hospital-c"]
    relay.banks["hospital-c"] = good[:-1] + bytes([good[-1] ^ 1])  # one bit flipped in transit
    with caplog.at_level(logging.ERROR, logger="fedsilo.agent"):
        banks = a.other_banks(relay, threading.Event())  # type: ignore[arg-type]
    assert len(banks) == 1 and "hospital-c" in caplog.text and "fails authentication" in caplog.text
    relay.banks = {"hospital-b": good}  # c's intact bank passed off as b's
    with pytest.raises(ResFimError, match="no usable style bank"):
        a.other_banks(relay, threading.Event())  # type: ignore[arg-type]
    assert open_sealed(SECRET, good, run_id=RUN, purpose=BANK_PURPOSE, silo="hospital-c")


def test_masks_are_computed_on_schedule_and_kept(tmp_path: Path) -> None:
    relay = Relay()
    publish(relay, tmp_path, "hospital-b", 1)
    relay.caller = "hospital-a"
    (tmp_path / "hospital-a").mkdir()
    a = session(tmp_path, "hospital-a")
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=(4, 8, 16), strides=(2, 2)))
    strategy = strategy_for("resfim")
    shared = strategy.shared_names(model)
    sd = model.state_dict()
    state = AgentState(run_id=RUN, fingerprint="f" * 64, global_shared={k: sd[k].clone() for k in shared},
                       model={k: v.clone() for k, v in sd.items()})
    trainable = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    kw = dict(model=model, state=state, train=silo_splits(DATA, 0).train, trainable=trainable, strategy=strategy,
              shared_names=shared)
    assert a.masks_due(state, 1)
    a.ensure_masks(relay, threading.Event(), rnd=1, **kw)  # type: ignore[arg-type]
    first = {k: v.clone() for k, v in state.sensitive.items()}
    assert state.masks_round == 1 and 0.7 <= state.shared_fraction <= 0.76  # ρ = 0.25, rounded up per tensor
    saved = AgentState.load(tmp_path / "hospital-a")
    assert saved is not None and saved.masks_round == 1 and saved.sensitive.keys() == first.keys()
    assert not a.masks_due(state, 1) and not a.masks_due(state, 2) and a.masks_due(state, 3)
    a.ensure_masks(relay, threading.Event(), rnd=2, **kw)  # type: ignore[arg-type]
    assert state.masks_round == 1 and all(torch.equal(first[k], state.sensitive[k]) for k in first)
