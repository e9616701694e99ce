"""CKSP (Mao et al. 2025), federated: shared layers averaged, each species' adapter among its silos only, SBN local.

Mao, Zhu, Guo, He, Norton and Liu, "CKSP: Cross-species Knowledge Sharing and Preserving for
Universal Animal Activity Recognition", Biosystems Engineering (2025), doi:10.1016/j.biosystemseng.2025.104303
(arXiv:2410.16644). The paper trains one "one-for-many" network on the pooled sensor data of several
animal species: every Shared-Preserved Convolution (SPConv) adds a full-rank convolution shared by
all species (generic features) to a low-rank convolution of the sample's species (species-specific
features), and Species-specific Batch Normalisation (SBN) keeps one BatchNorm per species. The paper
is centralised; the federated split below (which part is averaged among which silos, and how that
travels under additive HE) is ours.

**The network (contract with the Task).** State_dict names follow the sensor network's layout: an
SPConv module has children ``shared`` (the full-rank Conv1d) and ``adapters`` (an
``nn.ModuleDict`` keyed by species name, each with ``down`` and ``up`` Conv1d); the species
normalisation layers live in an ``nn.ModuleDict`` named ``norms`` keyed by species; the classifier
is ``head``. An entry is an *adapter entry of species s* when one of its dotted path segments is
``adapters`` and the next one is ``s`` (e.g. ``blocks.0.conv.adapters.horse.down.weight``). Every
silo builds the same network with all of the run's species.

**Which species a silo holds** (our rule, for the Task): the silo's training set (``RunContext.train``
and the ``train`` :meth:`Cksp.train_data` receives) has an attribute ``species``, the name of its
data's species as it appears in the adapter keys. One silo, one species.

**What is shared.** Every floating-point entry except normalisation layers (FedBN's
``local_parameter_names``) and anything under a ``norms`` segment: SBN stays local and never
leaves the silo. The shared convolutions and the head travel as FedAvg's differences (trained minus
the round's global values) and are averaged over all contributors, weighted by training examples.
All species' adapter entries are in the manifest (so every silo has the same upload layout and
the coordinator learns no species assignment), but each species' adapter is averaged only among
the silos of that species:

**The upload layout** (:meth:`Cksp.upload_layout`): the run's manifest in order, then

- :data:`WEIGHT_SLOT` ``cksp--species-weight``, shape (S,), float64: onehot(s_k) while silo k
  shares its adapter, zeros otherwise;
- round 1 only, :data:`TAG_SLOT` ``cksp--species-tag``, shape (S, :data:`TAG_SIZE`), float64:
  onehot(s_k) ⊗ t_k, where t_k are this silo's random tags in [0.5, 1) (drawn once, kept in the
  state; they carry no data).

S is the number of species with adapter entries, in order of their first adapter entry in the
manifest (the run's species list, as the network's ModuleDict holds it). In its own species'
adapter slots a sharing silo puts its trained adapter's *values* (not a difference: after round 1
the silos of one species start from different local adapters, see below); every other species'
slots are zeros. Under HE every value is multiplied by the silo's usual weight n_k / normaliser
before encryption, so the ciphertexts add up to
[Σ n_k Δθ_k ‖ Σ_{k∈s} n_k A_k (each s) ‖ Σ_{k∈s} n_k (each s)]:
the paper's [n·θ_shared ‖ onehot(s)⊗n·A ‖ onehot(s)·n]. After decryption the default
``apply_sum`` divides everything by the total weight and hands the means to :meth:`Cksp.apply`,
which adds the shared differences (FedAvg) and sets each species' adapter to its slot mean divided
by its count mean: Σ_{k∈s} n_k A_k / Σ_{k∈s} n_k. With plaintext aggregation the coordinator's
weighted mean gives the very same two means, (Σ_{k∈s} n_k A_k)/Σ n and (Σ_{k∈s} n_k)/Σ n, so the
same :meth:`Cksp.apply` serves both paths and the total weight cancels. Every silo applies every
species mean whose count is present (> :data:`PRESENT`), so all silos hold the same adapters for
every shared species; only its own species' adapter matters for a silo's predictions. A species
whose count is absent keeps its adapter as it was.

**Round 1 is a census; a single-silo species keeps its adapter local** (our rule). In round 1 no
silo uploads adapter values: every adapter slot is zero, the count slot carries onehot(s_k), and the
tag slot onehot(s_k) ⊗ t_k. After decryption silo k compares the tag mean of its species divided by
its count mean, Σ_{j∈s} n_j t_j / Σ_{j∈s} n_j, with its own tags: equal (within
:data:`TAG_TOLERANCE`, all :data:`TAG_SIZE` of them) means it was the only contributor of its
species (*alone*); otherwise it *shares*. (Weights alone cannot tell: the plaintext mean is the same
if every silo is duplicated, and a silo's ``apply`` does not learn the total weight; independent
random tags decide it in both paths alike, wrongly only with a probability of about (1e-6)^TAG_SIZE.)
A silo that made no round-1 upload (a late joiner: the strategy notes the census upload in the
state) is alone too, whatever the others' counts say (otherwise it could be the only sharer of a
species whose census silo found itself alone), as is one whose own count is absent, and one that
never applied a round-1 aggregate (a failed round 1).
The decision is taken once and kept in the state:

- a *sharing* silo uploads its adapter values and onehot(s_k) in every round from round 2;
- an *alone* silo uploads zeros in every adapter slot and in the count slot, so its adapter never
  leaves the silo and the other silos never touch their copy of that species' adapter;
- in round 1, and in every round of an alone silo, the silo sets its own species' adapter to the
  value it trained (``state.model``, the silo's full model after its last local training) instead
  of any mean: it is not overwritten.

So an adapter first leaves a silo only in a sum with at least one other silo of its species. What
the census cannot foresee is stated, not handled: if all but one silo of a shared species miss a
later round, that round's decrypted species mean is the remaining silo's adapter; likewise if a
silo's round-1 upload was made but refused by the coordinator while another silo of its species
was counted (the refused silo shares, the counted one found itself alone). A silo that joins
after round 1 never shares its adapter.

**Consensus.** SBN is local and single-silo adapters differ per silo: every silo evaluates its own
model (``consensus_aggregate`` is False).

**Privacy.** Under HE the coordinator sees only ciphertexts of the species-indexed layout, the same
for every silo: it learns no species assignment. Every silo decrypts the per-species sums, so it
learns, for each round, the training-example weight of each species' contributors (the count
mean Σ_{k∈s} n_k / Σ n, the fraction of the round's examples per species), hence which species are
held by silos and, from round 1, whether its own species has another silo; and, for each species
shared by ≥ 2 silos, that species' mean adapter. These are disclosures to the other silos, not to
the coordinator (:meth:`Cksp.disclosures`). With plaintext aggregation the coordinator sees every
upload, hence every silo's species. Record-level DP (DP-SGD): the adapter values and the shared
differences are the DP-trained model (post-processing of the round's release); the count and tag
slots do not depend on any record (a silo's species and its training-set size n_k, which it
declares at join, and random tags), so they add no ε. Silo-level DP is refused: its mechanism clips
and noises the whole upload jointly, so the count slot (the divisor of each species' mean) and the
tags would be clipped with the update and noised.

**HE bound.** Adapter slots carry weights, not differences: a silo's |A| · n_k / normaliser must stay
within the run's HE bound (default 1), which holds for the usual Conv1d initialisations; a larger
bound is the run's ``[he]`` setting.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, DpLevel, register_method
from fedsilo.core.phases import COUNT_PRESENT, SharePhase
from fedsilo.core.tensors import DType, Manifest, TensorSpec
from fedsilo.silo_agent.presets import DEMO_PRIVACY
from fedsilo.silo_agent.strategy import RunContext, Strategy, StrategyError

torch = lazy_module("torch")
models = lazy_module("fedsilo.models")

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from fedsilo.silo_agent.state import AgentState

log = logging.getLogger("fedsilo.agent")

#: The per-species count slot: onehot(s_k) while silo k shares its adapter (shape (S,), float64).
WEIGHT_SLOT = "cksp--species-weight"
#: Round 1's census slot: onehot(s_k) ⊗ this silo's random tags (shape (S, TAG_SIZE), float64).
TAG_SLOT = "cksp--species-tag"
#: Independent tags per silo: a false "alone" needs all of them to collide.
TAG_SIZE = 4
#: |tag mean / count mean − own tag| below which a tag matches (HE rounding is ~1e-8 at worst).
TAG_TOLERANCE = 1e-6
#: A species' count mean above which it counts as present in a round: the rule of every count slot
#: (:data:`fedsilo.core.phases.COUNT_PRESENT`, a fraction of the round's training examples; HE rounding
#: of an absent species stays many orders below).
PRESENT = COUNT_PRESENT
#: The path segments of the network's contract.
ADAPTERS = "adapters"
NORMS = "norms"
#: ``state.strategy_state`` keys: this silo's tags (float64, (TAG_SIZE,)) and its census decision
#: (int64, (1,): :data:`SHARING` or :data:`ALONE`; absent before round 1's aggregate).
TAGS_KEY = "cksp/tags"
STATUS_KEY = "cksp/status"
#: ``state.strategy_state`` key set (int64, (1,)) when this silo made its round-1 (census) upload.
CENSUS_KEY = "cksp/census-sent"
SHARING, ALONE = 1, 2


def adapter_species(name: str) -> str | None:
    """The species whose adapter entry ``name`` is (the path segment after ``adapters``), or None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == ADAPTERS:
            return parts[i + 1]
    return None


def is_species_norm(name: str) -> bool:
    """Whether ``name`` lies under a ``norms`` segment (SBN: species normalisation, always local)."""
    return NORMS in name.split(".")[:-1]


def species_order(names: Sequence[str]) -> list[str]:
    """The species with adapter entries among ``names``, in order of their first entry."""
    out: list[str] = []
    for name in names:
        s = adapter_species(name)
        if s is not None and s not in out:
            out.append(s)
    return out


def dataset_species(dataset: Any) -> str:
    """The ``species`` attribute of a silo's training set (our rule for the Task).

    Raises:
        StrategyError: it has none, or not a non-empty string.
    """
    species = getattr(dataset, "species", None)
    if not isinstance(species, str) or not species:
        raise StrategyError("cksp: the silo's training set names no species (CKSP needs a 'species' attribute on "
                            f"the dataset, the name of its data's species); got {species!r}")
    return species


def cksp_disclosures() -> list[dict[str, str]]:
    """What a CKSP run shares besides the averaged model, in words for the privacy officer."""
    return [{"topic": "CKSP species membership and per-species weights (to the other silos, not to the coordinator)",
             "statement": (
                 "Each upload carries, inside the encrypted sum, one count per species (1 in the slot of the silo's "
                 "species, 0 elsewhere) and, in round 1 only, random tags in that slot. Every silo decrypts the sums: "
                 "it learns, each round, the share of the round's training examples held by each species' "
                 "contributors, hence which species the federation's silos hold, and from round 1 whether its own "
                 "species has another silo. It also learns the mean species-specific adapter of every species "
                 "shared by at least two silos (with two, each can subtract its own and obtain the other's). A "
                 "species held by one silo only keeps its adapter on that silo. The coordinator adds ciphertexts "
                 "and learns no species assignment. The counts depend on no training record (the silo's species and "
                 "its training-set size, declared at join); under record-level DP the adapters and the shared "
                 "layers are the DP-SGD-trained model, covered by the ledger.")}]


@register_method
class Cksp(Strategy):
    """Shared layers averaged; each species' adapter averaged among its silos (species-indexed upload); SBN local.

    Args:
        species: this silo's species (tests; the agent reads it from the training set in
            :meth:`prepare` and :meth:`train_data`).
    """

    name = "cksp"
    summary = ("shared convolutions and head averaged, each species' low-rank adapter averaged only among its "
               "silos inside one species-indexed encrypted upload, species BN local (CKSP, Mao et al. 2025)")
    order = 25
    refuses = {DpLevel.SILO: "its per-species count slot, the divisor of every species' adapter mean, would be "
                             "clipped together with the update and noised; use record_level DP-SGD"}
    bench = BenchDefaults(privacy=DEMO_PRIVACY, note="CKSP: shared convolutions and head averaged, species adapters "
                          "averaged among the silos of each species (species-indexed HE upload), species BN local "
                          "(Mao et al. 2025); on a network without adapters it is FedBN")

    def __init__(self, *, species: str | None = None) -> None:
        self.species = species

    # -- what is shared and trained ---------------------------------------------------------------
    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return not is_species_norm(name) and name not in models.local_parameter_names(model)

    def trains(self, name: str, phase: SharePhase) -> bool:
        """Every parameter but the adapters and species norms of other species (once the species is known)."""
        if self.species is None:
            return True
        other = adapter_species(name)
        if other is not None:
            return other == self.species
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part == NORMS:
                return parts[i + 1] == self.species
        return True

    # -- the layout -------------------------------------------------------------------------------
    @classmethod
    def upload_layout(cls, manifest: Manifest, rnd: int, total_rounds: int) -> Manifest:
        """The manifest, then :data:`WEIGHT_SLOT` (S,), then in round 1 :data:`TAG_SLOT` (S, TAG_SIZE);
        the manifest alone when it has no adapter entries (S = 0: FedBN)."""
        layout = super().upload_layout(manifest, rnd, total_rounds)
        n = len(species_order([t.name for t in manifest.tensors]))
        if n == 0:
            return layout
        extra = [TensorSpec(name=WEIGHT_SLOT, dtype=DType.FLOAT64, shape=(n,))]
        if rnd == 1:
            extra.append(TensorSpec(name=TAG_SLOT, dtype=DType.FLOAT64, shape=(n, TAG_SIZE)))
        return Manifest(tensors=layout.tensors + tuple(extra))

    # -- once per run, and each round's training set ---------------------------------------------
    def prepare(self, ctx: RunContext) -> None:
        """Reads this silo's species from its training set and draws its census tags once (saved)."""
        self.species = dataset_species(ctx.train)
        if ctx.state is not None and TAGS_KEY not in ctx.state.strategy_state:
            self._tags(ctx.state)
            ctx.state.save(ctx.state_dir)
        log.info("CKSP: this silo holds species %r", self.species)

    def train_data(self, train: Dataset, *, state: AgentState, rnd: int) -> Dataset:
        """``train`` unchanged; its ``species`` attribute is this silo's species."""
        self.species = dataset_species(train)
        return train

    def disclosures(self, *, train: Any, plan: Any = None) -> list[dict[str, str]]:
        """The per-species counts every silo decrypts (:func:`cksp_disclosures`)."""
        return cksp_disclosures()

    @classmethod
    def run_disclosures(cls, run: Any) -> list[dict[str, str]]:
        """The silos' statement, for the coordinator's audit reports of a DP run."""
        return [] if getattr(run, "privacy", None) is None else cksp_disclosures()

    # -- what travels ------------------------------------------------------------------------------
    def own_index(self, order: Sequence[str]) -> int:
        """This silo's species' index among the run's species ``order``.

        Raises:
            StrategyError: the species is unknown or not one of the network's.
        """
        if self.species is None:
            raise StrategyError("cksp: this silo's species is unknown; Cksp.prepare or train_data must run first")
        if self.species not in order:
            raise StrategyError(f"cksp: this silo's species {self.species!r} has no adapter in the network (its "
                                f"species: {', '.join(order)})")
        return order.index(self.species)

    @staticmethod
    def _tags(state: AgentState) -> np.ndarray:
        tags = state.strategy_state.get(TAGS_KEY)
        if tags is None:
            tags = torch.from_numpy(0.5 + 0.5 * np.random.default_rng().random(TAG_SIZE))
            state.strategy_state[TAGS_KEY] = tags
        return tags.numpy().astype(np.float64)

    @staticmethod
    def status(state: AgentState) -> int | None:
        """The census decision kept in ``state`` (:data:`SHARING`, :data:`ALONE`), or None before it."""
        got = state.strategy_state.get(STATUS_KEY)
        return None if got is None else int(got.reshape(-1)[0])

    def upload(self, *, trained: Mapping[str, torch.Tensor], state: AgentState, names: Sequence[str], rnd: int,
               total_rounds: int) -> dict[str, np.ndarray]:
        """FedAvg's differences for the shared layers; the species-indexed adapter values and slots.

        Round 1: zeros in every adapter slot, onehot in the count slot, onehot ⊗ tags in the tag slot.
        Later rounds: a sharing silo's own adapter values and onehot; an alone silo (or one without
        a census decision) zeros in both.
        """
        order = species_order(names)
        if not order:
            return super().upload(trained=trained, state=state, names=names, rnd=rnd, total_rounds=total_rounds)
        own = self.own_index(order)
        sharing = rnd > 1 and self.status(state) == SHARING
        out: dict[str, np.ndarray] = {}
        for k in names:
            s = adapter_species(k)
            if s is None:
                out[k] = (trained[k].detach() - state.global_shared[k]).numpy()
            elif sharing and s == self.species:
                out[k] = trained[k].detach().clone().numpy()
            else:
                out[k] = np.zeros(tuple(state.global_shared[k].shape), dtype=state.global_shared[k].numpy().dtype)
        onehot = np.zeros(len(order), dtype=np.float64)
        if rnd == 1 or sharing:
            onehot[own] = 1.0
        out[WEIGHT_SLOT] = onehot
        if rnd == 1:
            out[TAG_SLOT] = np.outer(onehot, self._tags(state))
            state.strategy_state[CENSUS_KEY] = torch.ones(1, dtype=torch.int64)
        return out

    def he_vector(self, update: Mapping[str, np.ndarray], *, state: AgentState, names: Sequence[str], scale: float,
                  rnd: int, total_rounds: int) -> np.ndarray:
        """The round's tensors, then the upload's slots, flattened in :meth:`upload_layout`'s order, times ``scale``."""
        slots = [k for k in (WEIGHT_SLOT, TAG_SLOT) if k in update]
        return super().he_vector(update, state=state, names=[*names, *slots], scale=scale, rnd=rnd,
                                 total_rounds=total_rounds)

    # -- what comes back ---------------------------------------------------------------------------
    def apply(self, *, mean: Mapping[str, np.ndarray], state: AgentState, rnd: int, total_rounds: int) -> None:
        """Adds the shared layers' mean difference; sets each present species' adapter to slot mean / count mean.

        In the census round (the aggregate holds :data:`TAG_SLOT`) this silo decides whether it
        shares its species and keeps its trained adapter; an alone silo keeps its trained adapter
        in every round. Both paths (the plaintext mean, and ``apply_sum``'s decrypted sum divided by
        the total weight) come here with the same means.
        """
        if WEIGHT_SLOT not in mean:  # a network without adapters: FedBN's aggregation
            super().apply(mean=mean, state=state, rnd=rnd, total_rounds=total_rounds)
            return
        names = [k for k in mean if k not in (WEIGHT_SLOT, TAG_SLOT)]
        order = species_order(names)
        own = self.own_index(order)
        counts = np.asarray(mean[WEIGHT_SLOT], dtype=np.float64).reshape(-1)
        if counts.shape != (len(order),):
            raise ValueError(f"cksp: the {WEIGHT_SLOT!r} slot holds {counts.size} values for {len(order)} species")
        census = TAG_SLOT in mean
        if census:
            self._decide(np.asarray(mean[TAG_SLOT], dtype=np.float64), counts[own], own, state, rnd)
        shared = {k: v for k, v in mean.items() if k in names and adapter_species(k) is None}
        super().apply(mean=shared, state=state, rnd=rnd, total_rounds=total_rounds)
        keep_own = census or self.status(state) != SHARING
        for k in names:
            s = adapter_species(k)
            if s is None:
                continue
            old = state.global_shared[k]
            if s == self.species and keep_own:
                if k in state.model:
                    state.global_shared[k] = state.model[k].detach().clone().to(old.dtype)
                continue
            c = counts[order.index(s)]
            if census or not c > PRESENT:
                continue
            value = torch.from_numpy(np.asarray(mean[k], dtype=np.float64) / c)
            state.global_shared[k] = value.reshape(old.shape).to(old.dtype)

    def _decide(self, tag_mean: np.ndarray, own_count: float, own: int, state: AgentState, rnd: int) -> None:
        """Round 1's census: alone when its own count (species ``own``) is absent or its species' tag mean
        divided by that count is its own tags."""
        if CENSUS_KEY not in state.strategy_state or not own_count > PRESENT:
            alone = True
        else:
            ratio = tag_mean.reshape(-1, TAG_SIZE)[own] / own_count
            alone = bool(np.all(np.abs(ratio - self._tags(state)) <= TAG_TOLERANCE))
        state.strategy_state[STATUS_KEY] = torch.tensor([ALONE if alone else SHARING], dtype=torch.int64)
        log.info("round %d: CKSP census: %s", rnd, f"this silo is the only one of species {self.species!r}; its "
                 "adapter stays local" if alone else f"species {self.species!r} has other silos; its adapter is "
                 "averaged among them from round 2")
