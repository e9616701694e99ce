"""FedAWA: its weights (known answers, symmetry, order, alignment), HE equals plaintext, the relay exchange, a run.

The relay exchange tests use a small in-memory relay with the real AES-GCM sealing of
``fedsilo.silo_agent.secure`` (as tests/silo_agent/test_strategy_fedrdn.py does); the HE test uses real
BFV ciphertexts summed by the coordinator's ``HeAggregator``; the last test runs a whole federation
through ``simulate()`` (the deployed coordinator servicers, the real sealed relay, HE and DP-SGD).
"""

from __future__ import annotations

import json
import logging
import math
import struct
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.coordinator.aggregation.he import HeAggregator
from fedsilo.core.configfile import ConfigError
from fedsilo.core.methods import DpLevel, get_method
from fedsilo.core.tensors import Manifest
from fedsilo.privacy.he import FixedPoint, HeParams, SecretContext
from fedsilo.silo_agent.client import Stopped
from fedsilo.silo_agent.methods.fedawa import (
    REFERENCE_KEY,
    WEIGHT_KEY,
    WEIGHT_SLOT,
    FedAwa,
    FedAwaSettings,
    fedawa_disclosures,
    parse_settings,
    relay_purpose,
    scalars_file,
    sealing_purpose,
)
from fedsilo.silo_agent.fedawa_weights import (
    aggregation_weights,
    client_scalars,
    objective,
    objective_gradient,
    scalars_from_bytes,
    scalars_to_bytes,
    upload_factor,
)
from fedsilo.silo_agent.secure import open_sealed, seal
from fedsilo.silo_agent.state import AgentState
from fedsilo.silo_agent.strategy import RunContext, StrategyError

RUN = "fedawa-run"
SECRET = bytes(range(32))
DEFAULT = FedAwaSettings()
FAST = FedAwaSettings(wait_s=5.0)
SILOS = ["hospital-a", "hospital-b", "hospital-c"]
SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "head.weight": (2, 4)}
NAMES = list(SHAPES)


def _weights(scalars: dict[str, tuple[float, float]], s: FedAwaSettings = DEFAULT) -> dict[str, float]:
    return aggregation_weights(scalars, steps=s.steps, step_size=s.step_size, max_logit=s.max_logit)


# -- the weights: known answers, symmetry, order, alignment ---------------------------------------------


def test_known_answer_three_silos() -> None:
    """a, b along the last global update g, c orthogonal to it, all of norm 1: a = (1, 1, 0), q = (0, 0, 1).

    At λ = 1/3: D = (√2/3, √2/3, 2√2/3), L̃ = 4√2/9, and ∂L̃/∂λ = (1, 1, 5)/(3√2); one mirror step of
    η = 1 gives T = (4, 4, −8)/(9√2), so λ_c/λ_a = exp(−2√2/3)."""
    c, n = np.array([1.0, 1.0, 0.0]), np.ones(3)
    third = np.full(3, 1 / 3)
    assert objective(third, c, n) == pytest.approx(4 * math.sqrt(2) / 9, rel=1e-12)
    np.testing.assert_allclose(objective_gradient(third, c, n), np.array([1, 1, 5]) / (3 * math.sqrt(2)), rtol=1e-12)
    w = aggregation_weights({"a": (1.0, 1.0), "b": (1.0, 1.0), "c": (0.0, 1.0)}, steps=1, step_size=1.0,
                            max_logit=10.0)
    r = math.exp(-2 * math.sqrt(2) / 3)
    assert w["a"] == pytest.approx(1 / (2 + r), rel=1e-12) and w["b"] == w["a"]
    assert w["c"] == pytest.approx(r / (2 + r), rel=1e-12)
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-15)
    # the defaults take 10 steps of 0.1 along the changing gradient: further than that one step, within e^{2M}
    d = _weights({"a": (1.0, 1.0), "b": (1.0, 1.0), "c": (0.0, 1.0)})
    assert d["a"] == d["b"] > 0.4 and math.exp(-2) < d["c"] / d["a"] < r


def test_the_model_objective_is_the_papers_distance_term_when_the_residuals_are_orthogonal() -> None:
    """With the parts of the client vectors orthogonal to g mutually orthogonal, L̃ is exactly the
    paper's Σ_k λ_k ‖τ_k − Σ_j λ_j τ_j‖ (in units of the mean norm), for any λ; the gradient is the
    objective's (central differences)."""
    rng = np.random.default_rng(7)
    k, dim = 4, 12
    g = rng.normal(size=dim)
    g_hat = g / np.linalg.norm(g)
    basis = np.linalg.qr(np.column_stack([g_hat, rng.normal(size=(dim, k))]))[0][:, 1:]  # ⊥ g and each other
    taus = [rng.normal() * g_hat + rng.uniform(0, 2) * basis[:, i] for i in range(k)]
    scal = [client_scalars(t, g) for t in taus]
    c, n = np.array([s[0] for s in scal]), np.array([s[1] for s in scal])
    for _ in range(5):
        lam = rng.dirichlet(np.ones(k))
        mean = sum(lam[j] * taus[j] for j in range(k))
        paper = sum(lam[i] * np.linalg.norm(taus[i] - mean) for i in range(k)) / n.mean()
        assert objective(lam, c, n) == pytest.approx(paper, rel=1e-9)
        h, grad = 1e-6, objective_gradient(lam, c, n)
        for i in range(k):
            e = np.zeros(k)
            e[i] = h
            fd = (objective(lam + e, c, n) - objective(lam - e, c, n)) / (2 * h)
            assert grad[i] == pytest.approx(fd, rel=1e-5, abs=1e-7)


_COS = st.floats(-1.0, 1.0, allow_nan=False)
_NORM = st.floats(0.0, 1e3, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 8), c=_COS, n=_NORM)
def test_identical_scalars_give_uniform_weights(k: int, c: float, n: float) -> None:
    w = _weights({f"silo-{i}": (c, n) for i in range(k)})
    assert len(set(w.values())) == 1 and sum(w.values()) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(items=st.lists(st.tuples(_COS, _NORM), min_size=1, max_size=8), data=st.data())
def test_the_weights_depend_on_the_set_not_on_the_order_of_arrival(items: list[tuple[float, float]],
                                                                    data: st.DataObject) -> None:
    named = {f"hospital-{i}": v for i, v in enumerate(items)}
    order = data.draw(st.permutations(list(named)))
    again = _weights({s: named[s] for s in order})
    w = _weights(named)
    assert again == w  # bitwise: every silo computes the same weights
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-12) and all(v > 0 for v in w.values())
    m = DEFAULT.max_logit
    assert max(w.values()) / min(w.values()) <= math.exp(2 * m) * (1 + 1e-12)  # no silo dominates past e^{2M}


def test_an_anti_aligned_silo_gets_a_smaller_weight() -> None:
    """Three updates computed from vectors: two along the last global step, one against it."""
    rng = np.random.default_rng(1)
    g = rng.normal(size=200)
    noise = lambda: 0.3 * rng.normal(size=200)  # noqa: E731
    taus = {"hospital-a": g + noise(), "hospital-b": 0.8 * g + noise(), "hospital-c": -0.9 * g + noise()}
    scalars = {s: client_scalars(t, g) for s, t in taus.items()}
    assert scalars["hospital-c"][0] < 0 < scalars["hospital-b"][0]
    w = _weights(scalars)
    assert w["hospital-c"] < 1 / 3 < min(w["hospital-a"], w["hospital-b"])
    # by the scalars alone (equal norms): the silo that moved against the last global step weighs least.
    # (The criterion is the paper's distance to this round's weighted mean, not the cosine itself: a silo
    # more aligned with g than the others may still weigh less than one closer to the mean.)
    w = _weights({"a": (0.9, 1.0), "b": (0.6, 1.0), "c": (-0.5, 1.0)})
    assert w["c"] < 1 / 3 < min(w["a"], w["b"])


def test_edge_cases_are_uniform() -> None:
    assert _weights({"a": (0.3, 2.0)}) == {"a": 1.0}
    assert _weights({"a": (0.3, 0.0), "b": (-1.0, 0.0)}) == {"a": 0.5, "b": 0.5}  # nobody moved
    assert aggregation_weights({"a": (1.0, 1.0), "b": (-1.0, 3.0)}, steps=0, step_size=0.1, max_logit=1.0) \
        == {"a": 0.5, "b": 0.5}
    with pytest.raises(ValueError, match="cosine must be in"):
        _weights({"a": (1.5, 1.0)})
    with pytest.raises(ValueError, match="norm must be a finite number"):
        _weights({"a": (0.5, float("inf"))})
    with pytest.raises(ValueError, match="no scalars"):
        _weights({})


def test_client_scalars_and_their_blob() -> None:
    c, n = client_scalars(np.array([3.0, 4.0]), np.array([1.0, 0.0]))
    assert (c, n) == (pytest.approx(0.6), pytest.approx(5.0))
    assert client_scalars(np.zeros(2), np.array([1.0, 0.0])) == (0.0, 0.0)
    with pytest.raises(ValueError, match="reference global update is zero"):
        client_scalars(np.ones(2), np.zeros(2))
    blob = scalars_to_bytes(3, -0.25, 1.5)
    assert scalars_from_bytes(blob, rnd=3) == (-0.25, 1.5)
    with pytest.raises(ValueError, match="round 3, expected round 4"):
        scalars_from_bytes(blob, rnd=4)
    with pytest.raises(ValueError, match="not a FedAWA scalars blob"):
        scalars_from_bytes(b"X" * len(blob), rnd=3)
    with pytest.raises(ValueError, match="cosine must be in"):
        scalars_from_bytes(struct.pack("<8sIdd", b"FAWASC1\0", 3, 2.0, 1.0), rnd=3)


# -- the relay exchange (an in-memory relay; sealing is the real AES-GCM) --------------------------------


class Keys:
    """The parts of HeSession FedAwa uses: sealing under the run's shared secret, the silo's name, the HE bound."""

    def __init__(self, me: str) -> None:
        self.run_id, self.me = RUN, me
        self.codec = FixedPoint(params=HeParams())

    def seal(self, data: bytes, *, purpose: str) -> bytes:
        return seal(SECRET, data, run_id=RUN, purpose=purpose, silo=self.me)

    def open_sealed(self, blob: bytes, *, purpose: str, silo: str) -> bytes:
        return open_sealed(SECRET, blob, run_id=RUN, purpose=purpose, silo=silo)


class Relay:
    """What the coordinator keeps: one sealed blob per (purpose, silo), relayed as opaque bytes."""

    def __init__(self, joined: int) -> None:
        self.joined = joined
        self.blobs: dict[str, dict[str, bytes]] = {}
        self.published: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()


class Client:
    """One silo's view of the relay (publish_sealed / sealed, as CoordinatorClient)."""

    def __init__(self, relay: Relay, me: str) -> None:
        self.relay, self.me = relay, me
        self.polls = 0

    def publish_sealed(self, purpose: str, sealed: bytes) -> int:
        assert FedAwa.relay_round(purpose) is not None  # a per-round purpose FedAWA declares (the coordinator asks the same)
        with self.relay.lock:
            self.relay.published.append((purpose, self.me, sealed))
            known = self.relay.blobs.setdefault(purpose, {})
            assert known.setdefault(self.me, sealed) == sealed, "one blob per purpose and silo"
            return len(known)

    def sealed(self, purpose: str) -> tuple[dict[str, bytes], int]:
        assert FedAwa.relay_round(purpose) is not None
        with self.relay.lock:
            self.polls += 1
            return {s: b for s, b in self.relay.blobs.get(purpose, {}).items() if s != self.me}, self.relay.joined


def _update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(scale=0.05, size=s).astype(np.float32) for k, s in SHAPES.items()}


def _flat(update: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([update[k].astype(np.float64).ravel() for k in NAMES])


REFERENCE = _flat(_update(99)).astype(np.float32)


def _state(tmp_path: Path, me: str, *, reference: bool = True) -> AgentState:
    state = AgentState.load(tmp_path / me) or AgentState(
        run_id=RUN, fingerprint="f" * 64, global_shared={k: torch.zeros(s) for k, s in SHAPES.items()})
    if reference:
        state.strategy_state[REFERENCE_KEY] = torch.from_numpy(REFERENCE.copy())
    return state


def _ctx(tmp_path: Path, relay: Relay, me: str, *, stop: threading.Event | None = None, idle=None,
         he: object = "keys") -> RunContext:
    return RunContext(client=Client(relay, me), he=Keys(me) if he == "keys" else he, train=[], state=None,
                      state_dir=tmp_path / me, stop=stop or threading.Event(), idle=idle)


def _strategy(ctx: RunContext, s: FedAwaSettings = FAST) -> FedAwa:
    strategy = FedAwa(settings=s, poll_s=0.02)
    strategy.prepare(ctx)
    return strategy


def _vectors_together(tmp_path: Path, relay: Relay, updates: dict[str, dict[str, np.ndarray]], rnd: int = 2,
                      s: FedAwaSettings = FAST) -> tuple[dict[str, np.ndarray], dict[str, FedAwa],
                                                         dict[str, AgentState]]:
    """Each silo's he_vector of round ``rnd``, computed in threads of their own (they wait for each other)."""
    strategies = {n: _strategy(_ctx(tmp_path, relay, n), s) for n in updates}
    states = {n: _state(tmp_path, n) for n in updates}
    out: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(n: str) -> None:
        try:
            out[n] = strategies[n].he_vector(updates[n], state=states[n], names=NAMES, scale=0.123, rnd=rnd,
                                             total_rounds=5)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in updates]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    assert not errors and not any(t.is_alive() for t in threads), errors
    return out, strategies, states


def test_silos_exchange_sealed_scalars_and_agree_on_the_weights(tmp_path: Path) -> None:
    ref = _update(99)  # the last global step: a and b move along it (plus their own noise), c exactly against it
    updates = {n: {k: ref[k] + 0.3 * v for k, v in _update(i).items()} for i, n in enumerate(SILOS[:2])}
    updates["hospital-c"] = {k: -v for k, v in ref.items()}
    relay = Relay(joined=3)
    vectors, strategies, states = _vectors_together(tmp_path, relay, updates)
    scalars = {n: client_scalars(_flat(u), REFERENCE) for n, u in updates.items()}
    want = _weights(scalars, FAST)
    assert scalars["hospital-c"][0] == pytest.approx(-1.0)
    for n in SILOS:
        assert strategies[n].last_weights == want  # every silo computed the same weights from the same set
        f = upload_factor(want, n, 1.0)
        np.testing.assert_allclose(vectors[n], np.concatenate([_flat(updates[n]) * f, [f]]), rtol=1e-15)
        np.testing.assert_allclose(states[n].strategy_state[WEIGHT_KEY].numpy(), [2, want[n], f, 3])
    assert want["hospital-c"] < min(want["hospital-a"], want["hospital-b"])
    assert max(upload_factor(want, n, 1.0) for n in SILOS) == 1.0
    # one blob per silo under round 2's purpose; sealed: the relay cannot read it, a silo can
    assert sorted(relay.blobs) == [relay_purpose(2)] == ["fedawa-r2"]
    blob = relay.blobs["fedawa-r2"]["hospital-a"]
    assert scalars_to_bytes(2, *scalars["hospital-a"]) not in blob
    opened = open_sealed(SECRET, blob, run_id=RUN, purpose=sealing_purpose(2), silo="hospital-a")
    assert scalars_from_bytes(opened, rnd=2) == pytest.approx(scalars["hospital-a"])
    assert (tmp_path / "hospital-a" / scalars_file(2)).read_bytes() == blob
    # the next round publishes under its own purpose and drops the previous round's file
    vectors3, _, _ = _vectors_together(tmp_path, relay, updates, rnd=3)
    assert sorted(relay.blobs) == ["fedawa-r2", "fedawa-r3"]
    assert sorted(p.name for p in (tmp_path / "hospital-a").glob("fedawa_r*")) == ["fedawa_r3.sealed"]


def test_round_one_has_no_reference_releases_nothing_and_weighs_everyone_alike(tmp_path: Path) -> None:
    relay = Relay(joined=3)
    ctx = _ctx(tmp_path, relay, "hospital-a")
    strategy = _strategy(ctx)
    update = _update(0)
    vec = strategy.he_vector(update, state=_state(tmp_path, "hospital-a", reference=False), names=NAMES, scale=0.2,
                             rnd=1, total_rounds=3)
    np.testing.assert_array_equal(vec, np.concatenate([_flat(update), [1.0]]))
    assert relay.published == [] and ctx.client.polls == 0


def test_a_restart_republishes_the_identical_bytes_and_uses_their_scalars(tmp_path: Path) -> None:
    updates = {n: _update(i) for i, n in enumerate(SILOS[:2])}
    relay = Relay(joined=2)
    _, first, _ = _vectors_together(tmp_path, relay, updates)
    retrained = {k: v * 3 for k, v in updates["hospital-a"].items()}  # trained the round again after a restart
    again = _strategy(_ctx(tmp_path, relay, "hospital-a"))
    vec = again.he_vector(retrained, state=_state(tmp_path, "hospital-a"), names=NAMES, scale=1.0, rnd=2,
                          total_rounds=3)
    sent = [b for p, s, b in relay.published if s == "hospital-a"]
    assert len(sent) == 2 and sent[0] == sent[1]
    assert again.last_weights == first["hospital-a"].last_weights  # the published scalars count
    f = upload_factor(again.last_weights, "hospital-a", 1.0)
    np.testing.assert_allclose(vec, np.concatenate([_flat(retrained) * f, [f]]), rtol=1e-15)


class _Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_a_relay_holding_other_bytes_is_survived_other_refusals_are_not(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The state dir (and its sealed copy) was lost after publishing: the relay refuses new bytes
    (ALREADY_EXISTS) and the silo goes on with its fresh scalars; any other refusal propagates."""
    relay = Relay(joined=1)
    ctx = _ctx(tmp_path, relay, "hospital-a")

    def refuse(purpose: str, sealed: bytes) -> int:
        raise _Refused(code)

    ctx.client.publish_sealed = refuse
    code = grpc.StatusCode.ALREADY_EXISTS
    strategy = _strategy(ctx)
    with caplog.at_level(logging.WARNING, logger="fedsilo.agent"):
        strategy.he_vector(_update(0), state=_state(tmp_path, "hospital-a"), names=NAMES, scale=1.0, rnd=2,
                           total_rounds=3)
    assert "already holds other FedAWA scalars" in caplog.text and list(strategy.last_weights) == ["hospital-a"]
    code = grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError):
        strategy.he_vector(_update(0), state=_state(tmp_path, "hospital-a"), names=NAMES, scale=1.0, rnd=3,
                           total_rounds=3)


def test_tampered_relabelled_replayed_or_malformed_scalars_are_ignored(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    def sealed(silo: str, rnd: int, payload: bytes, as_round: int | None = None) -> bytes:
        return seal(SECRET, payload, run_id=RUN, purpose=sealing_purpose(as_round or rnd), silo=silo)

    good_b = sealed("hospital-b", 2, scalars_to_bytes(2, 0.5, 1.0))
    relay = Relay(joined=6)
    relay.blobs["fedawa-r2"] = {
        "hospital-b": good_b[:-1] + bytes([good_b[-1] ^ 1]),  # one bit flipped in transit
        "hospital-c": sealed("hospital-c", 2, scalars_to_bytes(2, 0.4, 1.0)),
        "hospital-d": sealed("hospital-c", 2, scalars_to_bytes(2, 0.4, 1.0)),  # c's blob passed off as d's
        "hospital-e": sealed("hospital-e", 1, scalars_to_bytes(1, 0.9, 1.0)),  # round 1's blob replayed for round 2
        "hospital-f": sealed("hospital-f", 2, b"junk" * 4),
    }
    strategy = _strategy(_ctx(tmp_path, relay, "hospital-a"))
    with caplog.at_level(logging.ERROR, logger="fedsilo.agent"):
        strategy.he_vector(_update(0), state=_state(tmp_path, "hospital-a"), names=NAMES, scale=1.0, rnd=2,
                           total_rounds=3)
    assert sorted(strategy.last_weights) == ["hospital-a", "hospital-c"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4
    for silo, why in (("hospital-b", "fails authentication"), ("hospital-d", "fails authentication"),
                      ("hospital-e", "fails authentication"), ("hospital-f", "FedAWA scalars blob of 16 bytes")):
        assert any(silo in e and why in e for e in errors), (silo, errors)


def test_waiting_gives_up_after_wait_s_with_what_arrived(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    relay = Relay(joined=3)
    relay.blobs["fedawa-r2"] = {"hospital-b": seal(SECRET, scalars_to_bytes(2, 0.5, 1.0), run_id=RUN,
                                                   purpose=sealing_purpose(2), silo="hospital-b")}
    idles: list[int] = []
    strategy = _strategy(_ctx(tmp_path, relay, "hospital-a", idle=lambda: idles.append(1)),
                         FedAwaSettings(wait_s=0.1))
    with caplog.at_level(logging.WARNING, logger="fedsilo.agent"):
        strategy.he_vector(_update(0), state=_state(tmp_path, "hospital-a"), names=NAMES, scale=1.0, rnd=2,
                           total_rounds=3)
    assert sorted(strategy.last_weights) == ["hospital-a", "hospital-b"]
    assert len(idles) >= 3 and "gave up waiting" in caplog.text and "1 of the 2 other" in caplog.text


def test_a_stop_while_waiting_raises_stopped_and_no_he_is_refused(tmp_path: Path) -> None:
    stop = threading.Event()
    strategy = _strategy(_ctx(tmp_path, Relay(joined=2), "hospital-a", stop=stop, idle=stop.set),
                         FedAwaSettings(wait_s=60))
    with pytest.raises(Stopped, match="FedAWA scalars of round 2"):
        strategy.he_vector(_update(0), state=_state(tmp_path, "hospital-a"), names=NAMES, scale=1.0, rnd=2,
                           total_rounds=3)
    with pytest.raises(StrategyError, match="fedawa needs HE aggregation"):
        FedAwa().prepare(_ctx(tmp_path, Relay(joined=2), "hospital-a", he=None))
    with pytest.raises(StrategyError, match="FedAwa.prepare must run first"):
        FedAwa().he_vector(_update(0), state=_state(tmp_path, "hospital-a"), names=NAMES, scale=1.0, rnd=2,
                           total_rounds=3)


# -- the aggregate: real BFV ciphertexts equal the plaintext weighted mean --------------------------------

PARAMS = HeParams()
CTX = SecretContext.generate(PARAMS)
CODEC = FixedPoint(params=PARAMS)
MANIFEST = Manifest.of_arrays({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})


def _frame(blobs: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


def _unframe(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def _he_sum(tmp_path: Path, vectors: list[np.ndarray], layout: Manifest) -> np.ndarray:
    """The coordinator's sum of the silos' encrypted vectors (it holds no key), decrypted by a silo."""
    agg = HeAggregator(layout, PARAMS)
    agg.reset()
    rng = np.random.default_rng(0)
    for i, vec in enumerate(vectors):
        ints, clipped = CODEC.encode(vec, rng)
        assert clipped == 0
        path = tmp_path / f"upload-{i}.bin"
        path.write_bytes(_frame(CTX.encrypt(ints)))
        agg.validate(path)
        agg.add(path, 100.0 + i)  # the coordinator's data-size weights play no part
    out = tmp_path / "sum.bin"
    agg.write_result(out, 303.0)
    return CODEC.decode(CTX.decrypt(_unframe(out.read_bytes()), layout.numel))


def test_the_he_aggregate_equals_the_plaintext_weighted_mean(tmp_path: Path) -> None:
    """Three silos exchange scalars, encrypt their weighted vectors; the coordinator's HeAggregator adds
    them; apply_sum gives every silo Σ λ_k τ_k (the plaintext FedAWA mean) up to the codec's rounding, and
    keeps it as the next round's reference."""
    updates = {n: _update(10 + i) for i, n in enumerate(SILOS)}
    updates["hospital-b"] = {k: -2 * v for k, v in _update(99).items()}
    vectors, strategies, states = _vectors_together(tmp_path / "silos", Relay(joined=3), updates)
    layout = FedAwa.upload_layout(MANIFEST, 2, 5)
    assert [t.name for t in layout.tensors] == [*NAMES, WEIGHT_SLOT] and layout.numel == MANIFEST.numel + 1
    total = _he_sum(tmp_path, [vectors[n] for n in SILOS], layout)
    lam = strategies["hospital-a"].last_weights
    want = sum(lam[n] * _flat(updates[n]) for n in SILOS)  # λ sums to 1: the plaintext FedAWA mean
    assert total[-1] == pytest.approx(sum(upload_factor(lam, n, 1.0) for n in SILOS), abs=1e-9)
    for n in SILOS:
        state = states[n]
        FedAwa(settings=FAST).apply_sum(total, layout=layout, total_weight=303.0, weight_normalizer=500.0,
                                        state=state, rnd=2, total_rounds=5)
        got = np.concatenate([state.global_shared[k].numpy().astype(np.float64).ravel() for k in NAMES])
        np.testing.assert_allclose(got, want, atol=1e-7)  # float32 model, codec error ~1e-11
        np.testing.assert_allclose(state.strategy_state[REFERENCE_KEY].numpy(), want, atol=1e-7)
        assert state.global_shared["conv.weight"].dtype == torch.float32


def test_identical_silos_average_uniformly_through_he(tmp_path: Path) -> None:
    """Every silo with the same scalars (here: the same update direction and norm, up to a sign of
    orthogonal noise that keeps c and n equal) weighs the same: the aggregate is the plain mean."""
    base = _flat(_update(99))
    ortho = np.random.default_rng(3).normal(size=base.size)
    ortho -= ortho @ base / (base @ base) * base
    ortho *= 0.5 * np.linalg.norm(base) / np.linalg.norm(ortho)
    flats = {"hospital-a": base + ortho, "hospital-b": base - ortho, "hospital-c": base + ortho}
    pos = np.cumsum([0] + [int(np.prod(s)) for s in SHAPES.values()])
    updates = {n: {k: f[pos[i]:pos[i + 1]].reshape(SHAPES[k]).astype(np.float64) for i, k in enumerate(NAMES)}
               for n, f in flats.items()}
    vectors, strategies, states = _vectors_together(tmp_path / "silos", Relay(joined=3), updates)
    lam = strategies["hospital-a"].last_weights
    assert max(lam.values()) - min(lam.values()) < 1e-12
    layout = FedAwa.upload_layout(MANIFEST, 2, 5)
    total = _he_sum(tmp_path, [vectors[n] for n in SILOS], layout)
    state = states["hospital-a"]
    FedAwa().apply_sum(total, layout=layout, total_weight=1.0, weight_normalizer=1.0, state=state, rnd=2,
                       total_rounds=5)
    got = np.concatenate([state.global_shared[k].numpy().astype(np.float64).ravel() for k in NAMES])
    np.testing.assert_allclose(got, sum(flats.values()) / 3, atol=1e-7)


def test_a_slot_sum_that_is_not_positive_leaves_the_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = FedAwa.upload_layout(MANIFEST, 2, 5)
    state = _state(tmp_path, "hospital-a")
    before = {k: v.clone() for k, v in state.global_shared.items()}
    flat = np.concatenate([np.ones(MANIFEST.numel), [0.0]])
    with caplog.at_level(logging.ERROR, logger="fedsilo.agent"):
        FedAwa().apply_sum(flat, layout=layout, total_weight=1.0, weight_normalizer=1.0, state=state, rnd=2,
                           total_rounds=5)
    assert all(torch.equal(before[k], state.global_shared[k]) for k in before)
    assert "sum to 0.0" in caplog.text
    with pytest.raises(ValueError, match="does not end with the 'fedawa--weight' slot"):
        FedAwa().apply_sum(np.ones(MANIFEST.numel), layout=MANIFEST, total_weight=1.0, weight_normalizer=1.0,
                           state=state, rnd=2, total_rounds=5)


# -- declarations: relays, DP levels, the [fedawa] table, disclosures ----------------------------------


def test_declarations() -> None:
    method = get_method("fedawa")
    assert method is FedAwa and method.needs_he and method.bench is not None
    assert DpLevel.SILO in method.refuses and DpLevel.RECORD not in method.refuses
    assert method.relays == frozenset() and method.round_relays == frozenset({"fedawa-r"})
    assert (method.relay_round("fedawa-r1"), method.relay_round("fedawa-r100000")) == (1, 100000)
    assert all(method.relay_round(p) is None
               for p in ("fedawa-r0", "fedawa-r01", "fedawa-r1000000", "fedawa-rx", "fedawa-r", "rdn-stats"))
    assert parse_settings({}) == {"steps": 10, "step_size": 0.1, "max_logit": 1.0, "wait_s": 60.0}
    assert parse_settings({"steps": 0})["steps"] == 0
    for bad, key in (({"steps": -1}, "fedawa.steps"), ({"step_size": 0}, "fedawa.step_size"),
                     ({"max_logit": -1.0}, "fedawa.max_logit"), ({"wait_s": -1}, "fedawa.wait_s"),
                     ({"lr": 0.1}, "fedawa.lr")):
        with pytest.raises(ConfigError, match=rf"^{key}"):
            parse_settings(bad)
    assert FedAwa.for_run({"fedawa": {"steps": 3}}).settings.steps == 3


def test_run_config_checks_and_disclosures(tmp_path: Path) -> None:
    """Through the coordinator's config loader: the table's defaults fill in; wait_s must stay below the
    round deadline; silo-level DP and plain aggregation are refused; DP runs carry the disclosure."""
    from fedsilo.coordinator.loading import load_federation_config
    from fedsilo.silo_agent.demo import DEMO_PRIVACY, make_certs, silo_names, write_configs
    from fedsilo.silo_agent.presets import DEMO_LORA_PRIVACY

    names = silo_names(2)
    make_certs(tmp_path / "certs", names)
    fed, _ = write_configs(tmp_path, names=names, rounds=2, strategy="fedawa", seed=0, port=1, insecure=False,
                           privacy=DEMO_PRIVACY, min_silos=2, pin_model=False)
    cfg = load_federation_config(fed)
    assert cfg.tables["fedawa"] == parse_settings({})
    [item] = FedAwa.run_disclosures(cfg)
    assert "post-processing" in item["topic"] and "no extra epsilon" in item["statement"]
    text = fed.read_text()
    with pytest.raises(ConfigError, match=r"^fedawa\.wait_s: 500 s must be below run\.round_deadline_s"):
        fed.write_text(text + "\n[fedawa]\nwait_s = 500\n")
        load_federation_config(fed)
    with pytest.raises(ConfigError, match=r"needs run\.aggregation = 'he'"):
        fed.write_text(text.replace('aggregation = "he"', 'aggregation = "plain"'))
        load_federation_config(fed)
    silo_dp, _ = write_configs(tmp_path, names=names, rounds=2, strategy="fedawa", seed=0, port=1, insecure=False,
                               privacy=DEMO_LORA_PRIVACY, min_silos=2, pin_model=False)
    with pytest.raises(ConfigError, match=r"^privacy\.silo_level: not supported with run\.strategy 'fedawa': its "
                                          r"adaptive weights would scale each silo's share of the noise"):
        load_federation_config(silo_dp)
    [plain] = fedawa_disclosures(plan=None)
    assert "not differentially private" in plain["topic"] and "2 numbers per round" in plain["statement"]


# -- a whole run: the deployed coordinator servicers and their sealed relay, HE, DP-SGD -------------------


def test_a_simulated_dp_run_relays_the_scalars_and_every_silo_agrees(tmp_path: Path) -> None:
    """Two silos, two rounds, HE and record-level DP-SGD through ``simulate()``: round 2's scalars travel
    through the real relay (PublishSealed / GetSealed, purpose fedawa-r2), both silos weight with both
    silos' scalars and end with the same shared model; each silo's state dir states the disclosure."""
    from fedsilo.coordinator.loading import load_federation_config
    from fedsilo.privacy.audit import DISCLOSURES_FILE
    from fedsilo.silo_agent.config import load_agent_config
    from fedsilo.silo_agent.demo import DEMO_BUDGET, DEMO_PRIVACY, make_certs, silo_names, write_configs
    from fedsilo.silo_agent.simulation import simulate

    names = silo_names(2)
    make_certs(tmp_path / "certs", names)
    small = {"n_train": 16, "n_val": 4, "n_test": 4, "image_size": 32}
    data = [{"source": "builtin", "domain": i, "seed": 0, **small} for i in range(len(names))]
    plan = {**DEMO_PRIVACY, "sample_rate": 0.5, "steps_per_round": 2}
    fed, agents = write_configs(tmp_path, names=names, rounds=2, strategy="fedawa", seed=0, port=1, insecure=False,
                                privacy=plan, min_silos=2, budgets={n: DEMO_BUDGET for n in names}, data=data)
    result = simulate(load_federation_config(fed), [load_agent_config(a) for a in agents], timeout_s=300)
    assert [r.round for r in result.rounds] == [1, 2]
    assert all(set(r.contributors) == set(names) for r in result.rounds)
    weights = {n: result.states[n].strategy_state[WEIGHT_KEY].tolist() for n in names}
    for n in names:
        rnd, lam, factor, silos = weights[n]
        assert (rnd, silos) == (2.0, 2.0) and 0 < lam < 1 and 0 < factor <= 1.0
        assert (tmp_path / n / scalars_file(2)).is_file()
        disclosures = json.loads((tmp_path / n / DISCLOSURES_FILE).read_text())
        assert [d["topic"] for d in disclosures] == [fedawa_disclosures(plan=_Record())[0]["topic"]]
    assert sum(w[1] for w in weights.values()) == pytest.approx(1.0, abs=1e-12)  # both computed one λ
    a, b = (result.states[n].global_shared for n in names)
    assert all(torch.equal(a[k], b[k]) for k in a)  # one shared model
    assert all(0 < eps <= 8.0 + 1e-9 for eps in result.epsilon.values())  # DP-SGD only: no extra ε


class _Record:
    record_level = True


def test_upload_factor_is_within_the_bound() -> None:
    w = {"a": 0.2, "b": 0.5, "c": 0.3}
    assert upload_factor(w, "b", 8.0) == 1.0 and upload_factor(w, "a", 8.0) == pytest.approx(0.4)
    assert upload_factor(w, "b", 0.5) == 0.5
