"""FedRDN strategy: silos exchange sealed channel statistics once, restart idempotently, refuse tampered blobs.

The coordinator here is a small in-memory relay (the real gRPC relay, purpose ``rdn-stats`` included, is tested
in tests/coordinator/test_coordinator_sealed_relay.py); the sealing is the real AES-GCM sealing of ``fedsilo.silo_agent.secure``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.models import Normalized, RandomNormalized, SegmentationDataset, channel_stats
from fedsilo.silo_agent.client import Stopped
from fedsilo.silo_agent.secure import open_sealed, seal
from fedsilo.silo_agent.state import AgentState
from fedsilo.silo_agent.strategy import RunContext
from fedsilo.silo_agent.methods.fedavg import FedAvg
from fedsilo.silo_agent.methods.fedrdn import (
    OWN_KEY,
    STATS_FILE,
    STATS_PURPOSE,
    TABLE_KEY,
    FedRdn,
    rdn_seed,
    stats_from_bytes,
    stats_to_bytes,
)

RUN = "fedrdn-run"
SECRET = bytes(range(32))
FAST = dict(poll_s=0.02, wait_s=5.0)


class Keys:
    """The parts of HeSession FedRdn uses: the run's shared secret and this silo's name."""

    def __init__(self, me: str) -> None:
        self.run_id, self.me = RUN, me

    def seal(self, data: bytes, *, purpose: str) -> bytes:
        return seal(SECRET, data, run_id=RUN, purpose=purpose, silo=self.me)

    def open_sealed(self, blob: bytes, *, purpose: str, silo: str) -> bytes:
        return open_sealed(SECRET, blob, run_id=RUN, purpose=purpose, silo=silo)


class Relay:
    """What the coordinator keeps: one sealed blob per silo, relayed as opaque bytes."""

    def __init__(self, joined: int) -> None:
        self.joined = joined
        self.blobs: dict[str, bytes] = {}
        self.published: dict[str, list[bytes]] = {}
        self.lock = threading.Lock()


class Client:
    """One silo's view of the relay (publish_sealed / sealed, as CoordinatorClient)."""

    def __init__(self, relay: Relay, me: str) -> None:
        self.relay, self.me = relay, me
        self.polls = 0

    def publish_sealed(self, purpose: str, sealed: bytes) -> int:
        assert purpose == "rdn-stats" and purpose in FedRdn.relays  # what FedRDN's method declares
        with self.relay.lock:
            self.relay.published.setdefault(self.me, []).append(sealed)
            self.relay.blobs.setdefault(self.me, sealed)
            return len(self.relay.blobs)

    def sealed(self, purpose: str) -> tuple[dict[str, bytes], int]:
        assert purpose == "rdn-stats"
        with self.relay.lock:
            self.polls += 1
            return {s: b for s, b in self.relay.blobs.items() if s != self.me}, self.relay.joined


def _images(n: int, c: int, shift: float, scale: float, seed: int) -> SegmentationDataset:
    g = torch.Generator().manual_seed(seed)
    images = (torch.randn(n, c, 6, 6, generator=g) * scale + shift).to(torch.float32)
    return SegmentationDataset(images, (images[:, :1] > shift).to(torch.int64))


DATA = {"hospital-a": _images(5, 2, 0.0, 1.0, 0), "hospital-b": _images(4, 2, 3.0, 0.5, 1),
        "hospital-c": _images(3, 2, -1.0, 2.0, 2)}


def _ctx(tmp_path: Path, relay: Relay, me: str, *, state: AgentState | None = None, he: object = "keys",
         stop: threading.Event | None = None, idle=None) -> RunContext:
    state_dir = tmp_path / me
    if state is None:
        state = AgentState.load(state_dir) or AgentState(run_id=RUN, fingerprint="f" * 64)
    return RunContext(client=Client(relay, me), he=Keys(me) if he == "keys" else he, train=DATA[me], state=state,
                      state_dir=state_dir, stop=stop or threading.Event(), idle=idle)


def _prepare_together(tmp_path: Path, relay: Relay, names: list[str]) -> dict[str, RunContext]:
    ctxs = {n: _ctx(tmp_path, relay, n) for n in names}
    errors: list[BaseException] = []

    def run(n: str) -> None:
        try:
            FedRdn(**FAST).prepare(ctxs[n])
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    assert not errors and not any(t.is_alive() for t in threads)
    return ctxs


def _own(name: str) -> torch.Tensor:
    return torch.stack(channel_stats(DATA[name]))


def test_two_silos_end_with_the_same_table_own_row_first(tmp_path: Path) -> None:
    relay = Relay(joined=2)
    ctxs = _prepare_together(tmp_path, relay, ["hospital-a", "hospital-b"])
    a = ctxs["hospital-a"].state.strategy_state[TABLE_KEY]
    b = ctxs["hospital-b"].state.strategy_state[TABLE_KEY]
    assert a.shape == b.shape == (2, 2, 2) and a.dtype == torch.float64
    assert torch.equal(a[0], _own("hospital-a")) and torch.equal(a[1], _own("hospital-b"))
    assert torch.equal(b[0], _own("hospital-b")) and torch.equal(b[1], _own("hospital-a"))
    assert torch.equal(ctxs["hospital-a"].state.strategy_state[OWN_KEY], _own("hospital-a"))
    saved = AgentState.load(tmp_path / "hospital-a")  # the table is in the checkpoint
    assert saved is not None and torch.equal(saved.strategy_state[TABLE_KEY], a)
    # what travels is sealed: the relay cannot read it, a silo with the run's secret can
    blob = relay.blobs["hospital-a"]
    assert stats_to_bytes(_own("hospital-a")) not in blob
    opened = open_sealed(SECRET, blob, run_id=RUN, purpose=STATS_PURPOSE, silo="hospital-a")
    assert torch.equal(stats_from_bytes(opened), _own("hospital-a"))
    assert (tmp_path / "hospital-a" / STATS_FILE).read_bytes() == blob


def test_rows_are_ordered_own_first_then_by_silo_name(tmp_path: Path) -> None:
    relay = Relay(joined=3)
    ctxs = _prepare_together(tmp_path, relay, ["hospital-c", "hospital-a", "hospital-b"])
    table = ctxs["hospital-b"].state.strategy_state[TABLE_KEY]
    assert [torch.equal(table[k], _own(n)) for k, n in enumerate(["hospital-b", "hospital-a", "hospital-c"])] \
        == [True, True, True]


def test_a_restart_republishes_the_identical_bytes_without_waiting(tmp_path: Path) -> None:
    relay = Relay(joined=2)
    ctxs = _prepare_together(tmp_path, relay, ["hospital-a", "hospital-b"])
    table = ctxs["hospital-a"].state.strategy_state[TABLE_KEY]
    lonely = Relay(joined=5)  # nobody else there: a restart that waited would wait for wait_s and find no one
    lonely.published = relay.published
    again = _ctx(tmp_path, lonely, "hospital-a")  # a new process: state from the checkpoint
    FedRdn(poll_s=0.02, wait_s=60).prepare(again)
    first, second = relay.published["hospital-a"]
    assert first == second
    assert torch.equal(again.state.strategy_state[TABLE_KEY], table)
    assert again.client.polls == 0


def test_a_crash_after_sealing_resends_the_sealed_bytes_and_uses_their_numbers(tmp_path: Path) -> None:
    relay = Relay(joined=2)
    _prepare_together(tmp_path, relay, ["hospital-a", "hospital-b"])
    fresh = AgentState(run_id=RUN, fingerprint="f" * 64)  # the checkpoint was lost, the sealed file kept
    ctx = _ctx(tmp_path, relay, "hospital-a", state=fresh)
    FedRdn(**FAST).prepare(ctx)
    first, second = relay.published["hospital-a"]
    assert first == second
    assert torch.equal(fresh.strategy_state[OWN_KEY], _own("hospital-a"))
    assert fresh.strategy_state[TABLE_KEY].shape == (2, 2, 2)


def test_tampered_relabelled_or_malformed_blobs_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    relay = Relay(joined=4)
    good_b = seal(SECRET, stats_to_bytes(_own("hospital-b")), run_id=RUN, purpose=STATS_PURPOSE, silo="hospital-b")
    good_c = seal(SECRET, stats_to_bytes(_own("hospital-c")), run_id=RUN, purpose=STATS_PURPOSE, silo="hospital-c")
    relay.blobs["hospital-b"] = good_b[:-1] + bytes([good_b[-1] ^ 1])  # one bit flipped in transit
    relay.blobs["hospital-c"] = good_c
    relay.blobs["hospital-d"] = good_c  # c's intact blob passed off as d's
    relay.blobs["hospital-e"] = seal(SECRET, b"junk" * 4, run_id=RUN, purpose=STATS_PURPOSE, silo="hospital-e")
    relay.joined = 5
    ctx = _ctx(tmp_path, relay, "hospital-a")
    with caplog.at_level(logging.ERROR, logger="fedsilo.agent"):
        FedRdn(**FAST).prepare(ctx)
    table = ctx.state.strategy_state[TABLE_KEY]
    assert table.shape == (2, 2, 2)
    assert torch.equal(table[0], _own("hospital-a")) and torch.equal(table[1], _own("hospital-c"))
    errors = {r.getMessage() for r in caplog.records if r.levelno == logging.ERROR}
    assert len(errors) == 3
    assert any("hospital-b" in e and "fails authentication" in e for e in errors)
    assert any("hospital-d" in e and "fails authentication" in e for e in errors)
    assert any("hospital-e" in e and "not a FedRDN statistics blob" in e for e in errors)


def test_statistics_with_another_channel_count_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    relay = Relay(joined=2)
    relay.blobs["hospital-b"] = seal(SECRET, stats_to_bytes(torch.ones(2, 3)), run_id=RUN, purpose=STATS_PURPOSE,
                                     silo="hospital-b")
    ctx = _ctx(tmp_path, relay, "hospital-a")
    with caplog.at_level(logging.ERROR, logger="fedsilo.agent"):
        FedRdn(**FAST).prepare(ctx)
    assert ctx.state.strategy_state[TABLE_KEY].shape == (1, 2, 2)
    assert "hospital-b" in caplog.text and "3 channel(s), this silo's images have 2" in caplog.text


def test_waiting_gives_up_after_wait_s_with_what_arrived(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    relay = Relay(joined=3)
    relay.blobs["hospital-b"] = seal(SECRET, stats_to_bytes(_own("hospital-b")), run_id=RUN, purpose=STATS_PURPOSE,
                                     silo="hospital-b")
    idles: list[int] = []
    ctx = _ctx(tmp_path, relay, "hospital-a", idle=lambda: idles.append(1))
    with caplog.at_level(logging.WARNING, logger="fedsilo.agent"):
        FedRdn(poll_s=0.02, wait_s=0.1).prepare(ctx)
    assert ctx.state.strategy_state[TABLE_KEY].shape == (2, 2, 2)
    assert len(idles) >= 3 and "gave up waiting" in caplog.text and "1 of the 2 other" in caplog.text


def test_a_stop_while_waiting_raises_stopped(tmp_path: Path) -> None:
    stop = threading.Event()
    ctx = _ctx(tmp_path, Relay(joined=2), "hospital-a", stop=stop, idle=stop.set)
    with pytest.raises(Stopped, match="FedRDN statistics"):
        FedRdn(poll_s=0.02, wait_s=60).prepare(ctx)
    assert TABLE_KEY not in ctx.state.strategy_state


def test_without_he_it_refuses_to_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fedrdn needs HE aggregation: the statistics travel sealed under the run's key"):
        FedRdn().prepare(_ctx(tmp_path, Relay(joined=2), "hospital-a", he=None))
    assert not (tmp_path / "hospital-a" / STATS_FILE).exists()


def test_data_hooks(tmp_path: Path) -> None:
    relay = Relay(joined=2)
    state = _prepare_together(tmp_path, relay, ["hospital-a", "hospital-b"])["hospital-a"].state
    strategy = FedRdn()
    train = strategy.train_data(DATA["hospital-a"], state=state, rnd=2)
    table = state.strategy_state[TABLE_KEY]
    assert isinstance(train, RandomNormalized) and len(train) == 5
    assert train.seed == rdn_seed(RUN) and train.rnd == 2
    for i in range(len(train)):
        x, m = DATA["hospital-a"][i]
        j = train.silo_of(i)
        out, mask = train[i]
        assert torch.allclose(out.double(), (x.double() - table[j, 0, :, None, None]) / table[j, 1, :, None, None],
                              atol=1e-5)
        assert torch.equal(mask, m)
    # evaluation on the silo's own data: its own statistics, whatever the round
    own = state.strategy_state[OWN_KEY]
    x, _ = DATA["hospital-b"][0]
    out, _ = strategy.eval_data(DATA["hospital-b"], state=state)[0]
    assert torch.allclose(out.double(), (x.double() - own[0, :, None, None]) / own[1, :, None, None], atol=1e-5)
    # the unseen domain: statistics of its own images
    unseen = strategy.unseen_data(DATA["hospital-c"])
    assert isinstance(unseen, Normalized)
    pooled = torch.stack([unseen[i][0] for i in range(len(unseen))]).double()
    assert torch.allclose(pooled.mean(dim=(0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(pooled.std(dim=(0, 2, 3), unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-5)


def test_data_hooks_before_prepare_refuse(tmp_path: Path) -> None:
    state = AgentState(run_id=RUN, fingerprint="f" * 64)
    with pytest.raises(ValueError, match="no 'rdn/table'"):
        FedRdn().train_data(DATA["hospital-a"], state=state, rnd=1)
    with pytest.raises(ValueError, match="no 'rdn/own'"):
        FedRdn().eval_data(DATA["hospital-a"], state=state)
    with pytest.raises(ValueError, match="poll_s must be > 0, got 0"):
        FedRdn(poll_s=0)
    with pytest.raises(ValueError, match="wait_s must be >= 0, got -1"):
        FedRdn(wait_s=-1)


def test_it_shares_what_fedavg_shares() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    assert FedRdn().shared_names(model) == FedAvg().shared_names(model)
    assert FedRdn().shared_names(model) == [k for k, v in model.state_dict().items() if v.is_floating_point()]
    assert "1.num_batches_tracked" not in FedRdn().shared_names(model) and "1.running_mean" in FedRdn().shared_names(model)


def test_rdn_seed_is_stable_across_processes() -> None:
    assert rdn_seed(RUN) == 712717123 and rdn_seed("other") != rdn_seed(RUN)


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_statistics_survive_serialisation(c: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    stats = torch.stack([torch.randn(c, generator=g, dtype=torch.float64),
                         torch.rand(c, generator=g, dtype=torch.float64) + 1e-3])
    data = stats_to_bytes(stats)
    assert len(data) == 12 + 16 * c
    assert torch.equal(stats_from_bytes(data), stats)


def test_malformed_statistics_blobs_are_refused() -> None:
    good = stats_to_bytes(torch.tensor([[0.0, 1.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="5 bytes is shorter"):
        stats_from_bytes(b"FRDNS")
    with pytest.raises(ValueError, match="not a FedRDN statistics blob"):
        stats_from_bytes(b"X" + good[1:])
    with pytest.raises(ValueError, match="of 43 bytes; 44 expected for 2 channel"):
        stats_from_bytes(good[:-1])
    with pytest.raises(ValueError, match="declares 0 channels"):
        stats_from_bytes(good[:8] + bytes(4))
    with pytest.raises(ValueError, match=r"stds must be > 0, got \[0\.0, 2\.0\]"):
        stats_from_bytes(stats_to_bytes(torch.tensor([[0.0, 1.0], [1.0, 2.0]]))[:-16] + bytes(8) + good[-8:])
    with pytest.raises(ValueError, match=r"must be \[2, C\].*\(3, 2\)"):
        stats_to_bytes(torch.zeros(3, 2))
