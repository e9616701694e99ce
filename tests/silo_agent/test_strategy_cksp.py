"""CKSP as a run strategy: shared layers averaged, species adapters among their silos (species-indexed), SBN local."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.core.methods import DpLevel, get_method
from fedsilo.core.phases import SharePhase, shared_numel
from fedsilo.core.tensors import Manifest
from fedsilo.silo_agent.methods.cksp import (
    ALONE,
    SHARING,
    STATUS_KEY,
    TAG_SIZE,
    TAG_SLOT,
    TAGS_KEY,
    WEIGHT_SLOT,
    Cksp,
    adapter_species,
    species_order,
)
from fedsilo.silo_agent.methods.fedbn import FedBN
from fedsilo.silo_agent.state import AgentState
from fedsilo.silo_agent.strategy import RunContext, StrategyError

SPECIES = ("horse", "sheep", "cattle")
ROUNDS = 3


class SPConv(nn.Module):
    """The contract's SPConv: a full-rank ``shared`` Conv1d plus one low-rank ``adapters[species]`` (down, up)."""

    def __init__(self, cin: int, cout: int, rank: int = 2) -> None:
        super().__init__()
        self.shared = nn.Conv1d(cin, cout, 3, padding=1)
        self.adapters = nn.ModuleDict({s: nn.ModuleDict({"down": nn.Conv1d(cin, rank, 3, padding=1, bias=False),
                                                         "up": nn.Conv1d(rank, cout, 1, bias=False)})
                                       for s in SPECIES})

    def forward(self, x: torch.Tensor, species: str) -> torch.Tensor:
        a = self.adapters[species]
        return self.shared(x) + a["up"](a["down"](x))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = SPConv(cin, cout)
        self.norms = nn.ModuleDict({s: nn.BatchNorm1d(cout) for s in SPECIES})

    def forward(self, x: torch.Tensor, species: str) -> torch.Tensor:
        return torch.relu(self.norms[species](self.conv(x, species)))


class SensorNet(nn.Module):
    """A small hand-made network with the sensor network's state_dict names."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(3, 4), Block(4, 4)])
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor, species: str) -> torch.Tensor:
        for b in self.blocks:
            x = b(x, species)
        return self.head(x.mean(-1))


def net() -> SensorNet:
    torch.manual_seed(0)
    return SensorNet()


def shared_start(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: model.state_dict()[k].clone() for k in Cksp().shared_names(model)}


def manifest_of(start: dict[str, torch.Tensor]) -> Manifest:
    return Manifest.of_arrays({k: v.numpy() for k, v in start.items()})


class Silo:
    """One silo as the agent drives the strategy: its own state, its species, its training-set size."""

    def __init__(self, model: nn.Module, species: str, n: int) -> None:
        sd = model.state_dict()
        self.strategy = Cksp(species=species)
        self.n = n
        self.state = AgentState(run_id="r", fingerprint="f",
                                global_shared={k: sd[k].clone() for k in self.strategy.shared_names(model)},
                                model={k: v.clone() for k, v in sd.items()})

    def train(self, seed: int) -> dict[str, torch.Tensor]:
        """Local training as far as CKSP cares: every entry it trains moves, other species' entries do not."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for k, v in self.state.personal_state_dict().items():
            moved = v.is_floating_point() and self.strategy.trains(k, SharePhase.ALL)
            out[k] = v + 0.05 * torch.randn(v.shape, generator=g) if moved else v.clone()
        return out


def run_round(silos: list[Silo], rnd: int, coordinator_sum, *, he: bool, seed: int = 0,
              skip: frozenset[int] = frozenset()) -> list[dict[str, np.ndarray]]:
    """One round as the daemon runs it: train, upload, state.model = trained, aggregate (plain or BFV), every
    silo applies. ``skip``: silos that do not take part. Returns the uploads."""
    names = list(silos[0].state.global_shared)
    layout = Cksp.upload_layout(manifest_of(silos[0].state.global_shared), rnd, ROUNDS)
    active = [i for i in range(len(silos)) if i not in skip]
    uploads, weights = [], []
    for i in active:
        silo = silos[i]
        trained = silo.train(seed * 100 + rnd * 10 + i)
        uploads.append(silo.strategy.upload(trained=trained, state=silo.state, names=names, rnd=rnd,
                                            total_rounds=ROUNDS))
        silo.state.model = {k: v.clone() for k, v in trained.items()}
        weights.append(float(silo.n))
    total = float(sum(weights))
    if he:
        vectors = [silos[i].strategy.he_vector(u, state=silos[i].state, names=names, scale=w / total, rnd=rnd,
                                               total_rounds=ROUNDS) for i, u, w in zip(active, uploads, weights)]
        flat = coordinator_sum.he_sum(layout, vectors)
        for silo in silos:
            silo.strategy.apply_sum(flat, layout=layout, total_weight=total, weight_normalizer=total, state=silo.state,
                                    rnd=rnd, total_rounds=ROUNDS)
    else:
        mean = coordinator_sum.plain_mean(layout, uploads, weights)
        for silo in silos:
            silo.strategy.apply(mean=dict(mean), state=silo.state, rnd=rnd, total_rounds=ROUNDS)
    return uploads


def adapter_names(names, species: str) -> list[str]:
    return [k for k in names if adapter_species(k) == species]


def federation() -> list[Silo]:
    """Three horse silos (20, 30, 45 examples), one sheep silo (25); no silo holds cattle."""
    model = net()
    return [Silo(model, "horse", 20), Silo(model, "horse", 30), Silo(model, "sheep", 25), Silo(model, "horse", 45)]


# -- naming, layout, what travels -----------------------------------------------------------------
def test_sbn_stays_local_and_the_layout_is_species_indexed() -> None:
    model = net()
    sd = model.state_dict()
    names = Cksp().shared_names(model)
    assert not [k for k in names if ".norms." in k]  # SBN: weights, biases and running statistics all local
    assert {k for k in sd if ".norms." in k and sd[k].is_floating_point()} == \
        {k for k in sd if sd[k].is_floating_point()} - set(names)
    assert "head.weight" in names and "blocks.0.conv.shared.weight" in names
    for s in SPECIES:  # every species' adapter is in every silo's manifest
        assert f"blocks.1.conv.adapters.{s}.down.weight" in names and f"blocks.1.conv.adapters.{s}.up.weight" in names
    assert species_order(names) == list(SPECIES)
    manifest = manifest_of(shared_start(model))
    first, later = Cksp.upload_layout(manifest, 1, ROUNDS), Cksp.upload_layout(manifest, 2, ROUNDS)
    assert [t.name for t in first.tensors] == [*names, WEIGHT_SLOT, TAG_SLOT]
    assert [t.name for t in later.tensors] == [*names, WEIGHT_SLOT]
    assert first.tensors[-1].shape == (3, TAG_SIZE) and later.tensors[-1].shape == (3,)
    # the slots are not parameters shared
    assert shared_numel(first) == shared_numel(later) == manifest.numel
    silo = Silo(model, "sheep", 10)
    for rnd, layout in ((1, first), (2, later)):
        up = silo.strategy.upload(trained=silo.train(rnd), state=silo.state, names=names, rnd=rnd, total_rounds=ROUNDS)
        assert Manifest.of_arrays(up).difference(layout) is None  # what plaintext admission checks
        assert not [k for k in up if ".norms." in k]
        flat = silo.strategy.he_vector(up, state=silo.state, names=names, scale=0.5, rnd=rnd, total_rounds=ROUNDS)
        assert flat.shape == (layout.numel,)
    up1 = silo.strategy.upload(trained=silo.train(1), state=silo.state, names=names, rnd=1, total_rounds=ROUNDS)
    np.testing.assert_array_equal(up1[WEIGHT_SLOT], [0, 1, 0])
    tags = silo.state.strategy_state[TAGS_KEY].numpy()
    assert tags.shape == (TAG_SIZE,) and np.all((tags >= 0.5) & (tags < 1))
    np.testing.assert_array_equal(up1[TAG_SLOT], np.outer([0, 1, 0], tags))
    assert all(not np.any(up1[k]) for k in names if adapter_species(k) is not None)  # the census sends no adapter


# -- the defining rules ----------------------------------------------------------------------------
@pytest.mark.parametrize("he", [False, True], ids=["plain", "bfv"])
def test_species_means_shared_fedavg_and_a_single_silo_species_kept_local(coordinator_sum, he: bool) -> None:
    """Three horse silos and one sheep silo, three rounds through the real aggregator (plain or BFV):

    - the shared layers are FedAvg's (weighted mean of the differences, all four silos);
    - round 1 is the census: no adapter travels, every silo keeps its trained adapter, the horse
      silos learn they share, the sheep silo that it is alone;
    - from round 2 the horse adapter on every silo is the example-weighted mean of the horse silos'
      trained adapters (the per-species plaintext average), the sheep adapter never leaves its silo
      (zeros and no count in every upload) and the others' copies of it, like cattle's, never change.
    """
    silos = federation()
    init = {k: v.clone() for k, v in silos[0].state.global_shared.items()}
    names = list(init)
    horse, sheep, cattle = (adapter_names(names, s) for s in SPECIES)
    common = [k for k in names if adapter_species(k) is None]
    horses = [0, 1, 3]
    tol = {"rtol": 0, "atol": 2e-6}
    for rnd in range(1, ROUNDS + 1):
        before = [{k: v.clone() for k, v in s.state.global_shared.items()} for s in silos]
        uploads = run_round(silos, rnd, coordinator_sum, he=he)
        trained = [s.state.model for s in silos]
        # FedAvg on the shared layers (every silo holds the same values)
        total = sum(s.n for s in silos)
        for k in common:
            want = before[0][k] + sum(s.n * (t[k] - before[0][k]) for s, t in zip(silos, trained)) / total
            for s in silos:
                torch.testing.assert_close(s.state.global_shared[k], want, **tol)
        # the sheep adapter never travels; no count for it after the census
        for up in uploads:
            assert all(not np.any(up[k]) for k in sheep + cattle)
        assert uploads[2][WEIGHT_SLOT].tolist() == ([0.0, 1.0, 0.0] if rnd == 1 else [0.0, 0.0, 0.0])
        if rnd == 1:
            assert [Cksp.status(s.state) for s in silos] == [SHARING, SHARING, ALONE, SHARING]
            for i, s in enumerate(silos):  # each keeps its own trained adapter, no mean applied
                own = horse if i in horses else sheep
                for k in names:
                    if adapter_species(k) is not None:
                        want = trained[i][k] if k in own else init[k]
                        assert torch.equal(s.state.global_shared[k], want), (i, k)
            continue
        n_horse = sum(silos[i].n for i in horses)
        for k in horse:
            want = sum(silos[i].n * trained[i][k] for i in horses) / n_horse
            for s in silos:
                torch.testing.assert_close(s.state.global_shared[k], want, **tol)
        for i, s in enumerate(silos):
            for k in sheep:  # the sheep silo: its own trained adapter exactly; the others: untouched
                assert torch.equal(s.state.global_shared[k], trained[2][k] if i == 2 else init[k]), (i, k)
            for k in cattle:
                assert torch.equal(s.state.global_shared[k], init[k])
        # SBN is each silo's own: the personal model carries the norms it trained
        for i, s in enumerate(silos):
            personal = s.state.personal_state_dict()
            assert all(torch.equal(personal[k], trained[i][k]) for k in personal if ".norms." in k)


def test_plain_and_bfv_give_the_same_models(coordinator_sum) -> None:
    """The same training through the plaintext mean and through BFV ends with the same model on every silo."""
    ends = []
    for he in (False, True):
        silos = federation()
        for rnd in range(1, ROUNDS + 1):
            run_round(silos, rnd, coordinator_sum, he=he, seed=7)
        ends.append([s.state.personal_state_dict() for s in silos])
    for plain, bfv in zip(*ends):
        assert set(plain) == set(bfv)
        for k in plain:
            torch.testing.assert_close(bfv[k], plain[k], rtol=0, atol=2e-6)


@pytest.mark.parametrize("he", [False, True], ids=["plain", "bfv"])
def test_a_silo_that_misses_the_census_alone_keeps_its_adapter(coordinator_sum, he: bool) -> None:
    """A silo that made no round-1 upload is alone, whatever the counts say: otherwise a horse silo that missed
    the census would share its adapter with nobody (the counted horse silo found itself alone)."""
    model = net()
    for skip, want in (({1, 2}, [ALONE, ALONE, ALONE]), ({1}, [ALONE, ALONE, ALONE]),
                       ({2}, [SHARING, SHARING, ALONE]), (set(), [SHARING, SHARING, ALONE])):
        silos = [Silo(model, "horse", 20), Silo(model, "horse", 30), Silo(model, "sheep", 25)]
        run_round(silos, 1, coordinator_sum, he=he, skip=frozenset(skip))
        assert [Cksp.status(s.state) for s in silos] == want, skip
    run_round(silos, 2, coordinator_sum, he=he)  # no upload carries the sheep adapter
    assert torch.equal(silos[0].state.global_shared[adapter_names(list(silos[0].state.global_shared), "sheep")[0]],
                       model.state_dict()[adapter_names(list(silos[0].state.global_shared), "sheep")[0]])


def test_without_a_census_decision_a_silo_keeps_its_adapter() -> None:
    """A silo that never applied round 1 (a failed round) uploads no adapter and no count afterwards."""
    model = net()
    silo = Silo(model, "horse", 10)
    names = list(silo.state.global_shared)
    up = silo.strategy.upload(trained=silo.train(1), state=silo.state, names=names, rnd=2, total_rounds=ROUNDS)
    assert not np.any(up[WEIGHT_SLOT]) and all(not np.any(up[k]) for k in names if adapter_species(k))
    silo.state.strategy_state[STATUS_KEY] = torch.tensor([SHARING])
    up = silo.strategy.upload(trained=silo.train(1), state=silo.state, names=names, rnd=2, total_rounds=ROUNDS)
    assert up[WEIGHT_SLOT].tolist() == [1.0, 0.0, 0.0]
    assert all(np.any(up[k]) for k in adapter_names(names, "horse"))


# -- a network without adapters: FedBN ---------------------------------------------------------------
def test_a_network_without_adapters_is_fedbn() -> None:
    from fedsilo.models import ModelConfig, Norm, build_model

    model = build_model(ModelConfig(channels=(4, 8, 16), strides=(2, 2), norm=Norm.GROUP))
    strategy = Cksp()  # no species needed
    names = strategy.shared_names(model)
    assert names == FedBN().shared_names(model)
    start = {k: model.state_dict()[k].clone() for k in names}
    manifest = manifest_of(start)
    assert Cksp.upload_layout(manifest, 1, 2) == manifest
    state = AgentState(run_id="r", fingerprint="f", global_shared={k: v.clone() for k, v in start.items()})
    trained = {k: v + 0.01 for k, v in start.items()}
    up = strategy.upload(trained=trained, state=state, names=names, rnd=1, total_rounds=2)
    assert set(up) == set(names)
    strategy.apply(mean=up, state=state, rnd=1, total_rounds=2)
    for k in names:
        torch.testing.assert_close(state.global_shared[k], trained[k])


# -- the species rule, training, declarations --------------------------------------------------------
def test_species_from_the_training_set_and_census_tags_kept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    train = SimpleNamespace(species="sheep")
    state = AgentState(run_id="r", fingerprint="f")
    ctx = RunContext(client=None, he=None, train=train, state=state, state_dir=tmp_path,  # type: ignore[arg-type]
                     stop=None)  # type: ignore[arg-type]
    strategy = Cksp()
    strategy.prepare(ctx)
    assert strategy.species == "sheep"
    tags = state.strategy_state[TAGS_KEY].clone()
    assert torch.equal(AgentState.load(tmp_path).strategy_state[TAGS_KEY], tags)  # saved before any upload
    strategy.prepare(ctx)
    assert torch.equal(state.strategy_state[TAGS_KEY], tags)  # drawn once per run
    assert strategy.train_data(SimpleNamespace(species="horse"), state=state, rnd=2).species == "horse"
    for bad in (SimpleNamespace(), SimpleNamespace(species=""), SimpleNamespace(species=3)):
        with pytest.raises(StrategyError, match="species"):
            Cksp().train_data(bad, state=state, rnd=1)  # type: ignore[arg-type]
    silo = Silo(net(), "goat", 10)
    with pytest.raises(StrategyError, match="goat"):
        silo.strategy.upload(trained=silo.train(1), state=silo.state, names=list(silo.state.global_shared), rnd=1,
                             total_rounds=ROUNDS)
    silo.strategy.species = None
    with pytest.raises(StrategyError, match="prepare"):
        silo.strategy.upload(trained=silo.train(1), state=silo.state, names=list(silo.state.global_shared), rnd=1,
                             total_rounds=ROUNDS)


def test_only_its_own_species_adapter_and_norms_train() -> None:
    model = net()
    trainable = frozenset(n for n, _ in model.named_parameters())
    strategy = Cksp(species="sheep")
    strategy.set_trainable(model, SharePhase.ALL, trainable)
    on = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in on if ".adapters." in n or ".norms." in n} == \
        {n for n in trainable if ".adapters.sheep." in n or ".norms.sheep." in n}
    assert {n for n in trainable if ".adapters." not in n and ".norms." not in n} <= on
    model(torch.randn(2, 3, 8), "sheep").sum().backward()  # the contract network trains on its species
    Cksp().set_trainable(model, SharePhase.ALL, trainable)  # species unknown: everything
    assert all(p.requires_grad for p in model.parameters())


def test_declarations() -> None:
    from fedsilo.silo_agent.bench.methods import study_method_names

    method = get_method("cksp")
    assert method is Cksp and DpLevel.SILO in method.refuses and DpLevel.RECORD not in method.refuses
    assert not method.needs_he and not Cksp.consensus_aggregate
    assert "cksp" in study_method_names() and method.bench is not None and method.bench.privacy is not None
    said = Cksp().disclosures(train=None, plan=None)
    assert said and "coordinator" in said[0]["statement"]
    assert Cksp.run_disclosures(SimpleNamespace(privacy=None)) == []
    assert Cksp.run_disclosures(SimpleNamespace(privacy=SimpleNamespace(record_level=True))) == said
    assert "Mao" in method.summary
