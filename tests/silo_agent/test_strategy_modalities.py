"""Missing modalities: a silo without OCT trains and uploads none of the OCT tensors, and they are averaged over
the silos that have OCT (plaintext and real BFV aggregation alike), with nothing changed in the coordinator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.core.errors import InvalidArgument
from fedsilo.core.methods import get_method
from fedsilo.core.phases import (
    COMPANION_MARK,
    SharePhase,
    count_slot,
    modality_groups,
    modality_of,
    modality_slots,
    shared_numel,
)
from fedsilo.core.tensors import DType, Manifest
from fedsilo.models.dp_training import train_local_dp
from fedsilo.models.glaucoma_data import FUNDUS, OCT_GROUP
from fedsilo.models.imo_net import ImoNetConfig, build_imo_net
from fedsilo.models.tasks import DataSpec, get_task
from fedsilo.models.training import TrainConfig
from fedsilo.privacy.dpsgd import DpSgdConfig
from fedsilo.silo_agent.methods import strategy_for
from fedsilo.silo_agent.state import AgentState
from fedsilo.silo_agent.strategy import StrategyError

TINY = ImoNetConfig(widths=(8, 16), norm_groups=4, attention_heads=2, time_dim=8, diffusion_steps=20,
                    inference_steps=2)
SMALL_DATA = {"image_size": 32, "oct_size": [16, 32], "n_train": 6, "n_val": 2, "n_test": 2, "n_unseen": 0}


def _start() -> dict[str, torch.Tensor]:
    model = build_imo_net(TINY)
    names = strategy_for("fedavg").shared_names(model)
    return {k: model.state_dict()[k].clone() for k in names}


def _manifest(start: dict[str, torch.Tensor]) -> Manifest:
    return Manifest.of_arrays({k: v.numpy() for k, v in start.items()})


def _fedavg(held: frozenset[str] | None, manifest: Manifest, name: str = "fedavg"):  # noqa: ANN202
    strategy = strategy_for(name)
    strategy.hold_modalities(held, manifest=manifest)
    return strategy


def _trained(start: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor moved (the OCT ones too: the upload must not carry them even then)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in start.items()}


# -- the naming rule and the layout ------------------------------------------------------------------
def test_the_naming_rule_puts_every_oct_tensor_in_its_group() -> None:
    start = _start()
    assert modality_of("modality_oct.encoder.levels.0.0.conv.weight") == "oct"
    assert modality_of("blocks.modality_ct_scan.w") == "ct_scan"
    for name in ("fundus_encoder.levels.0.0.conv.weight", "modality_.x", "modality_OCT.w", "modality_oct--x",
                 "my_modality_oct.w"):
        assert modality_of(name) is None, name
    groups = {k: modality_of(k) for k in start}
    assert {g for g in groups.values()} == {None, OCT_GROUP}
    assert all(g == OCT_GROUP for k, g in groups.items() if k.startswith("modality_oct."))
    assert all(g is None for k, g in groups.items() if not k.startswith("modality_oct."))


def test_the_layout_adds_one_count_slot_per_group_and_shares_no_more_parameters() -> None:
    manifest = _manifest(_start())
    layout = get_method("fedavg").upload_layout(manifest, 1, 3)
    assert modality_groups(manifest) == (OCT_GROUP,)
    assert layout.tensors[:-1] == manifest.tensors
    slot = layout.tensors[-1]
    assert (slot.name, slot.dtype, slot.shape) == (count_slot(OCT_GROUP), DType.FLOAT64, (1,))
    assert COMPANION_MARK in slot.name and shared_numel(layout) == manifest.numel
    assert modality_slots(Manifest(tensors=manifest.tensors[:1])) == ()  # a network without groups: no slot
    assert get_method("fedavg").upload_layout(Manifest(tensors=manifest.tensors[:1]), 1, 3).tensors == manifest.tensors[:1]


def test_a_method_that_makes_its_own_uploads_is_refused_for_a_network_with_groups() -> None:
    manifest = _manifest(_start())
    declared = {name: get_method(name).modality_counts for name in ("fedavg", "fedprox", "fedbn", "moon", "fednova",
                                                                     "fedawa", "resfim")}
    assert declared == {"fedavg": True, "fedprox": True, "fedbn": True, "moon": True, "fednova": False,
                        "fedawa": False, "resfim": False}
    with pytest.raises(InvalidArgument, match=r"strategy fednova cannot average the network's modality groups \(oct"):
        get_method("fednova").check_manifest(manifest)
    get_method("fednova").check_manifest(Manifest(tensors=manifest.tensors[:1]))  # no groups: fine
    with pytest.raises(StrategyError, match="fednova cannot average"):
        strategy_for("fednova").hold_modalities({FUNDUS}, manifest=manifest)


def test_silo_level_dp_and_malformed_modalities_are_refused() -> None:
    manifest = _manifest(_start())
    with pytest.raises(StrategyError, match="silo-level DP"):
        strategy_for("fedavg").hold_modalities({FUNDUS}, manifest=manifest, silo_level_dp=True)
    with pytest.raises(StrategyError, match="modalities must be a set of names, got 'oct'"):
        strategy_for("fedavg").hold_modalities("oct", manifest=manifest)
    strategy_for("fedavg").hold_modalities({FUNDUS}, manifest=Manifest(tensors=manifest.tensors[:1]),
                                           silo_level_dp=True)  # no groups: silo-level DP is fine


# -- what a silo without OCT uploads ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fedavg", "fedprox", "fedbn"])
def test_a_fundus_only_silo_uploads_zeros_and_a_zero_count_for_every_oct_tensor(method: str) -> None:
    start = _start()
    manifest = _manifest(start)
    names = list(start)
    for held, count in (({FUNDUS}, 0.0), ({FUNDUS, OCT_GROUP}, 1.0), (None, 1.0)):
        strategy = _fedavg(held, manifest, method)
        state = AgentState(run_id="r", fingerprint="f", global_shared={k: v.clone() for k, v in start.items()})
        up = strategy.upload(trained=_trained(start, 1), state=state, names=names, rnd=1, total_rounds=3)
        assert list(up) == [*names, count_slot(OCT_GROUP)]
        assert up[count_slot(OCT_GROUP)].tolist() == [count]
        oct_values = np.concatenate([up[k].ravel() for k in names if modality_of(k) == OCT_GROUP])
        fundus_values = np.concatenate([up[k].ravel() for k in names if modality_of(k) is None])
        assert bool(np.count_nonzero(oct_values) == 0) is (count == 0.0)
        assert np.count_nonzero(fundus_values) == fundus_values.size
        flat = strategy.he_vector(up, state=state, names=names, scale=0.5, rnd=1, total_rounds=3)
        layout = type(strategy).upload_layout(manifest, 1, 3)
        assert flat.shape == (layout.numel,) and flat[-1] == 0.5 * count
        pos = 0
        for spec in layout.tensors:  # every OCT position of the encrypted vector is 0 for a fundus-only silo
            if modality_of(spec.name) == OCT_GROUP and count == 0.0:
                assert not flat[pos:pos + spec.numel].any(), spec.name
            pos += spec.numel


@pytest.mark.parametrize("he", [False, True], ids=["plain", "bfv"])
def test_oct_tensors_average_over_the_silos_with_oct_and_the_rest_over_all(coordinator_sum, he: bool) -> None:
    start = _start()
    manifest = _manifest(start)
    held = [{FUNDUS, OCT_GROUP}, {FUNDUS}, {FUNDUS, OCT_GROUP}]
    sizes = [20.0, 25.0, 30.0]
    trained = [_trained(start, i) for i in range(3)]
    strategies = [_fedavg(h, manifest) for h in held]
    got = coordinator_sum.round(strategies, start, trained, sizes, he=he)
    tol = dict(rtol=0, atol=1e-5) if he else dict(rtol=1e-6, atol=1e-7)
    for k, v in start.items():
        if modality_of(k) == OCT_GROUP:
            want = v + (20 * (trained[0][k] - v) + 30 * (trained[2][k] - v)) / 50
        else:
            want = v + sum(n * (t[k] - v) for n, t in zip(sizes, trained)) / sum(sizes)
        torch.testing.assert_close(got[k], want, **tol, msg=k)
    # every silo, the fundus-only one included, applies the same aggregate
    again = coordinator_sum.round([strategies[1], strategies[0], strategies[2]], start,
                                  [trained[1], trained[0], trained[2]], [sizes[1], sizes[0], sizes[2]], he=he)
    for k in start:
        torch.testing.assert_close(again[k], got[k], **tol)


@pytest.mark.parametrize("he", [False, True], ids=["plain", "bfv"])
def test_a_round_without_any_oct_silo_leaves_the_oct_tensors_as_they_were(coordinator_sum, he: bool) -> None:
    start = _start()
    manifest = _manifest(start)
    trained = [_trained(start, i) for i in range(2)]
    got = coordinator_sum.round([_fedavg({FUNDUS}, manifest) for _ in range(2)], start, trained, [10.0, 30.0], he=he)
    for k, v in start.items():
        if modality_of(k) == OCT_GROUP:
            assert torch.equal(got[k], v), k
        else:
            assert not torch.equal(got[k], v), k


@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=5),
       sizes=st.lists(st.integers(1, 500), min_size=5, max_size=5),
       deltas=st.lists(st.floats(-1, 1), min_size=5, max_size=5))
def test_the_group_mean_is_the_holders_weighted_mean(counts: list[float], sizes: list[int],
                                                    deltas: list[float]) -> None:
    """apply on the plaintext weighted mean of (value·count, count) gives Σ_holders n·Δ / Σ_holders n, or no change."""
    k = len(counts)
    name = "modality_x.w"
    total = float(sum(sizes[:k]))
    mean = {name: np.array([sum(n * d * c for n, d, c in zip(sizes, deltas, counts)) / total], dtype=np.float32),
            count_slot("x"): np.array([sum(n * c for n, c in zip(sizes, counts)) / total])}
    state = AgentState(run_id="r", fingerprint="f", global_shared={name: torch.zeros(1)})
    strategy_for("fedavg").apply(mean=mean, state=state, rnd=1, total_rounds=1)
    holders = [(n, d) for n, d, c in zip(sizes, deltas, counts) if c]
    want = sum(n * d for n, d in holders) / sum(n for n, _ in holders) if holders else 0.0
    assert float(state.global_shared[name][0]) == pytest.approx(want, rel=1e-4, abs=1e-5)


# -- training: a silo without OCT never moves the OCT tensors, not even by DP-SGD's noise ---------------
def test_dp_sgd_noise_never_moves_the_oct_tensors_of_a_fundus_only_silo() -> None:
    task = get_task("glaucoma")
    train = task.load_data(DataSpec(seed=0, domain=2, options=SMALL_DATA)).splits.train
    assert train.modalities == {FUNDUS}
    model = build_imo_net(TINY)
    manifest = Manifest.of_arrays({k: v.numpy() for k, v in model.state_dict().items()})
    strategy = _fedavg(train.modalities, manifest)
    strategy.set_trainable(model, SharePhase.ALL, frozenset(n for n, _ in model.named_parameters()))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if modality_of(n) == OCT_GROUP} and frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = DpSgdConfig(noise_multiplier=2.0, max_grad_norm=1.0, sample_rate=0.5, steps=2)
    train_local_dp(model, train, TrainConfig(batch_size=3), dp, round_index=0, noise_seed=3, task=task)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) is (modality_of(k) == OCT_GROUP), k


def test_the_audit_disclosure_says_what_the_counts_reveal_and_what_this_silo_holds() -> None:
    manifest = _manifest(_start())
    fundus_only = _fedavg({FUNDUS}, manifest).modality_disclosures(manifest)
    assert len(fundus_only) == 1 and fundus_only[0]["topic"] == "Modality groups (oct): which silos hold each modality"
    text = fundus_only[0]["statement"]
    assert "This silo holds no oct" in text and "learns no silo's modalities" in text
    both = _fedavg({FUNDUS, OCT_GROUP}, manifest).modality_disclosures(manifest, he=False)[0]["statement"]
    assert "holds every modality group" in both and "the coordinator sees each silo's counts" in both
    assert _fedavg({FUNDUS}, manifest).modality_disclosures(Manifest(tensors=manifest.tensors[:1])) == []
