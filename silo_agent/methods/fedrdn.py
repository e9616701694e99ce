"""FedRDN (Yan et al., MICCAI 2023): FedAvg's model, trained on images normalised with randomly drawn silos' statistics.

Yan et al., "FedRDN: A Random Dynamic Normalization Approach for Federated Learning on Medical
Imaging", MICCAI 2023. Every floating-point entry of the model is shared and averaged, as in
FedAvg; what changes is the data (``fedsilo.models.rdn``):

- once per run (:meth:`FedRdn.prepare`) each silo computes the channel-wise mean and std of its
  training images, seals them with the run's shared HE secret (purpose ``fedrdn-stats/v1``),
  keeps the sealed copy in its state dir (a restarted agent resends the identical bytes),
  publishes it through the coordinator's sealed relay (purpose ``rdn-stats``: ``PublishSealed`` /
  ``GetSealed``) and collects the other joined silos' statistics into a table, own row first;
- in training, each image is normalised with the statistics of a silo drawn uniformly from the
  table each time it is loaded, ``x' = (x − μ_j) / σ_j`` (:meth:`FedRdn.train_data`);
- in evaluation on its own validation and test data a silo normalises with its own statistics,
  ``x' = (x − μ_own) / σ_own`` (:meth:`FedRdn.eval_data`);
- a domain no silo trained on (the unseen domain) is normalised with statistics computed from
  its own images (:meth:`FedRdn.unseen_data`, the ``Strategy`` hook the daemon uses for the
  unseen domain): the paper's test-time rule is that a site normalises with its own statistics,
  and a new site computes its own.

What is released: each silo discloses ``2·C`` numbers, its training images' channel mean and
std, to the other silos of the run, sealed (AES-GCM under a key only the silos hold) against
the coordinator, which relays but cannot read them. These numbers are a deterministic function
of the training data and are NOT covered by the differential-privacy ledger; fedsilo states
this disclosure in the audit report of a DP run and ``fedsilo bench`` in its summary.

Waiting: a silo waits for the statistics of every silo that has joined (and of at least one
other), polling every 0.5 s, for at most 600 s, then goes on with what arrived. The table is
fixed once made and kept in the checkpoint: a silo that joins later is missing from the tables
of silos that finished waiting before it published.
"""

from __future__ import annotations

import logging
import struct
import zlib

from typing import TYPE_CHECKING, Any

import numpy as np

from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, register_method
from fedsilo.silo_agent.client import Stopped
from fedsilo.silo_agent.presets import DEMO_PRIVACY
from fedsilo.silo_agent.secure import write_private
from fedsilo.silo_agent.strategy import RunContext, Strategy

torch = lazy_module("torch")
rdn = lazy_module("fedsilo.models.rdn")

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from fedsilo.silo_agent.state import AgentState

log = logging.getLogger("fedsilo.agent")

STATS_PURPOSE = "fedrdn-stats/v1"
#: The sealed-relay purpose the statistics are published under.
RELAY_PURPOSE = "rdn-stats"
STATS_FILE = "fedrdn_stats.sealed"
#: ``state.strategy_state`` keys: this silo's ``[2, C]`` (mean; std) and the ``[S, 2, C]`` table, own row first.
OWN_KEY = "rdn/own"
TABLE_KEY = "rdn/table"
STATS_POLL_S = 0.5
STATS_WAIT_S = 600.0
#: The most channels a statistics blob may declare (a bound on what a malformed blob makes us allocate).
MAX_CHANNELS = 4096

_MAGIC = b"FRDNST1\0"
_HEADER = struct.Struct("<8sI")  # magic, C; then 2·C little-endian float64: C means, then C stds


def stats_to_bytes(stats: torch.Tensor) -> bytes:
    """Serialises a silo's ``[2, C]`` statistics (row 0 the means, row 1 the stds) for sealing.

    Raises:
        ValueError: not ``[2, C]`` with ``1 <= C <= MAX_CHANNELS``, non-finite, or a std ``<= 0``.
    """
    s = torch.as_tensor(stats, dtype=torch.float64)
    if s.dim() != 2 or s.shape[0] != 2 or not 1 <= s.shape[1] <= MAX_CHANNELS:
        raise ValueError(f"FedRDN statistics must be [2, C] with 1 <= C <= {MAX_CHANNELS}, got shape {tuple(s.shape)}")
    _check_values(s)
    return _HEADER.pack(_MAGIC, s.shape[1]) + s.numpy().astype("<f8").tobytes()


def stats_from_bytes(data: bytes) -> torch.Tensor:
    """Parses :func:`stats_to_bytes`'s output back into a float64 ``[2, C]`` tensor.

    Raises:
        ValueError: a wrong header or length, non-finite values, or a std ``<= 0``.
    """
    if len(data) < _HEADER.size:
        raise ValueError(f"FedRDN statistics blob of {len(data)} bytes is shorter than its {_HEADER.size}-byte header")
    magic, channels = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError(f"not a FedRDN statistics blob (header {magic!r})")
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"FedRDN statistics blob declares {channels} channels; 1..{MAX_CHANNELS} allowed")
    want = _HEADER.size + 2 * channels * 8
    if len(data) != want:
        raise ValueError(f"FedRDN statistics blob of {len(data)} bytes; {want} expected for {channels} channel(s)")
    values = np.frombuffer(data, dtype="<f8", offset=_HEADER.size).reshape(2, channels)
    s = torch.from_numpy(values.astype(np.float64))
    _check_values(s)
    return s


def _check_values(s: torch.Tensor) -> None:
    if not torch.isfinite(s).all():
        raise ValueError(f"FedRDN statistics must be finite, got {s.tolist()}")
    if not (s[1] > 0).all():
        raise ValueError(f"FedRDN stds must be > 0, got {s[1].tolist()}")


def rdn_seed(run_id: str) -> int:
    """The seed of a run's random draws of statistics (the same in every process: CRC-32 of the run id)."""
    return zlib.crc32(f"fedrdn/{run_id}".encode())


@register_method
class FedRdn(Strategy):
    """Shares every floating-point entry (FedAvg's model) and normalises images FedRDN's way.

    Args:
        poll_s: seconds between polls for the other silos' statistics, > 0.
        wait_s: seconds after which :meth:`prepare` stops waiting and goes on with what arrived, >= 0.

    Raises:
        ValueError: a non-positive ``poll_s`` or negative ``wait_s``.
    """

    name = "fedrdn"
    summary = "FedAvg on images normalised with a random silo's channel mean/std, relayed sealed (Yan et al. 2023)"
    order = 60
    needs_he = ("the silos' normalisation statistics travel sealed under the run's key, which only HE runs have")
    relays = frozenset({RELAY_PURPOSE})
    needs_2d = "its channel statistics read [C, H, W] images"
    bench = BenchDefaults(privacy=DEMO_PRIVACY, note="FedAvg on images normalised with a random silo's channel "
                          "mean/std (Yan et al. 2023); the 2 x C statistics per silo are shared sealed, outside the "
                          "DP ledger")

    def __init__(self, *, poll_s: float = STATS_POLL_S, wait_s: float = STATS_WAIT_S) -> None:
        if not poll_s > 0:
            raise ValueError(f"FedRdn: poll_s must be > 0, got {poll_s!r}")
        if not wait_s >= 0:
            raise ValueError(f"FedRdn: wait_s must be >= 0, got {wait_s!r}")
        self.poll_s = float(poll_s)
        self.wait_s = float(wait_s)

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return True

    # -- once per run ---------------------------------------------------------------------
    def prepare(self, ctx: RunContext) -> None:
        """Computes, seals, keeps and publishes this silo's statistics, then gathers the table.

        Idempotent across restarts: the sealed copy in the state dir is what is (re)published,
        and a table already in ``ctx.state`` is kept (no second wait).

        Raises:
            ValueError: ``ctx.he`` is None (no HE aggregation: nothing to seal with), or the
                training set is empty.
            Stopped: ``ctx.stop`` was set while waiting for the other silos.
        """
        he = ctx.he
        if he is None:
            raise ValueError("fedrdn needs HE aggregation: the statistics travel sealed under the run's key")
        state = ctx.state
        path = ctx.state_dir / STATS_FILE
        own = state.strategy_state.get(OWN_KEY)
        changed = own is None
        if path.is_file():
            sealed = path.read_bytes()
            if own is None:  # sealed before a restart, not yet in the checkpoint: use what was sealed
                own = stats_from_bytes(he.open_sealed(sealed, purpose=STATS_PURPOSE, silo=he.me))
        else:
            if own is None:
                mean, std = rdn.channel_stats(ctx.train)
                own = torch.stack([mean, std])
            sealed = he.seal(stats_to_bytes(own), purpose=STATS_PURPOSE)
            ctx.state_dir.mkdir(parents=True, exist_ok=True)
            write_private(path, sealed)  # durable before it is sent: a restart resends these very bytes
            log.info("FedRDN: channel statistics of %d training image(s) sealed for the other silos (%d channel(s))",
                     len(ctx.train), own.shape[1])  # type: ignore[arg-type]
        if changed:
            state.strategy_state[OWN_KEY] = own
            state.save(ctx.state_dir)
        published = ctx.client.publish_sealed(RELAY_PURPOSE, sealed)
        log.info("FedRDN statistics published (%d silo(s) have published theirs)", published)
        if TABLE_KEY in state.strategy_state:
            log.info("FedRDN: statistics table of %d silo(s) kept from before the restart",
                     state.strategy_state[TABLE_KEY].shape[0])
            return
        others = self._others(ctx, own)
        state.strategy_state[TABLE_KEY] = torch.stack([own] + [others[s] for s in sorted(others)])
        state.save(ctx.state_dir)
        log.info("FedRDN: images will be normalised with the statistics of %d silo(s): this one%s",
                 1 + len(others), "".join(f", {s}" for s in sorted(others)))

    def _others(self, ctx: RunContext, own: torch.Tensor) -> dict[str, torch.Tensor]:
        """The other silos' statistics, opened and checked; waits for every joined silo's (up to ``wait_s``)."""
        he = ctx.he
        waited = 0.0
        while True:
            sealed, joined = ctx.client.sealed(RELAY_PURPOSE)
            sealed = {s: b for s, b in sealed.items() if s != he.me}
            if (sealed and len(sealed) >= joined - 1) or waited >= self.wait_s:
                break
            if ctx.idle is not None:
                ctx.idle()
            if ctx.stop.wait(self.poll_s):
                raise Stopped("waiting for the other silos' FedRDN statistics")
            waited += self.poll_s
        if len(sealed) < joined - 1:
            log.warning("FedRDN: gave up waiting after %g s with the statistics of %d of the %d other joined silo(s)",
                        waited, len(sealed), joined - 1)
        out: dict[str, torch.Tensor] = {}
        for silo, blob in sorted(sealed.items()):
            try:
                stats = stats_from_bytes(he.open_sealed(blob, purpose=STATS_PURPOSE, silo=silo))
                if stats.shape != own.shape:
                    raise ValueError(f"{stats.shape[1]} channel(s), this silo's images have {own.shape[1]}")
            except ValueError as exc:
                log.error("ignoring the FedRDN statistics relayed for %s: %s", silo, exc)
                continue
            out[silo] = stats
        return out

    # -- data ----------------------------------------------------------------------------
    def disclosures(self, *, train: Dataset, plan: Any = None) -> list[dict[str, str]]:
        """The statistics this silo shares outside the ledger (its images' channel count from ``train``)."""
        from fedsilo.privacy.audit import fedrdn_disclosures

        return fedrdn_disclosures(channels=int(train[0][0].shape[0]))

    def train_data(self, train: Dataset, *, state: AgentState, rnd: int) -> Dataset:
        """``train`` with each image normalised by a silo drawn uniformly from the table, afresh every round.

        Raises:
            ValueError: the state holds no table (:meth:`prepare` has not run), or a malformed one.
        """
        table = _entry(state, TABLE_KEY)
        if table.dim() != 3 or table.shape[1] != 2:
            raise ValueError(f"fedrdn: {TABLE_KEY!r} must be [S, 2, C], got shape {tuple(table.shape)}")
        return rdn.RandomNormalized(train, table[:, 0], table[:, 1], seed=rdn_seed(state.run_id), rnd=rnd)

    def eval_data(self, dataset: Dataset, *, state: AgentState) -> Dataset:
        """One of this silo's evaluation sets, normalised with its own statistics.

        Raises:
            ValueError: the state holds no own statistics (:meth:`prepare` has not run).
        """
        own = _entry(state, OWN_KEY)
        if own.dim() != 2 or own.shape[0] != 2:
            raise ValueError(f"fedrdn: {OWN_KEY!r} must be [2, C], got shape {tuple(own.shape)}")
        return rdn.Normalized(dataset, own[0], own[1])

    def unseen_data(self, dataset: Dataset, *, state: AgentState | None = None) -> Dataset:
        """A domain no silo trained on, normalised with the statistics of its own images.

        Raises:
            ValueError: an empty dataset (it has no statistics).
        """
        return rdn.Normalized(dataset, *rdn.channel_stats(dataset))


def _entry(state: AgentState, key: str) -> torch.Tensor:
    value = state.strategy_state.get(key)
    if value is None:
        raise ValueError(f"fedrdn: the agent state holds no {key!r}; FedRdn.prepare must run first")
    return value
