"""FedLWS as a run strategy: FedAvg's model, each layer shrunk by γ_l = ‖w‖ / (‖w‖ + τ_l‖g‖), τ_l from the update spread."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedsilo.core.configfile import ConfigError
from fedsilo.core.methods import DpLevel, get_method
from fedsilo.core.phases import shared_numel
from fedsilo.core.tensors import Manifest
from fedsilo.silo_agent.methods.fedavg import FedAvg
from fedsilo.silo_agent.methods.fedlws import (
    NORM_SLOT,
    FedLws,
    FedLwsSettings,
    layers,
    parse_settings,
    shrink_factor,
    spread,
)
from fedsilo.silo_agent.state import AgentState


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 3))


def start_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_like(start: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in start.items()}


def lws(beta: float = 0.03, tau_min: float = 0.01, tau_max: float = 0.2) -> FedLws:
    return FedLws(settings=FedLwsSettings(beta=beta, tau_min=tau_min, tau_max=tau_max))


def by_definition(start, trained, sizes, s: FedLwsSettings) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The rule computed directly from the individual updates, in float64: no identity, no HE."""
    p = np.asarray(sizes, dtype=np.float64) / sum(sizes)
    out = {}
    for layer in layers(list(start)):
        w = np.concatenate([start[k].double().numpy().ravel() for k in layer])
        deltas = [np.concatenate([(t[k].double() - start[k].double()).numpy().ravel() for k in layer]) for t in trained]
        g = sum(pk * d for pk, d in zip(p, deltas))
        s_l = math.sqrt(sum(pk * float(np.sum((d - g) ** 2)) for pk, d in zip(p, deltas)))
        tau = min(max(s.beta * s_l, s.tau_min), s.tau_max)
        gamma = np.linalg.norm(w) / (np.linalg.norm(w) + tau * np.linalg.norm(g))
        for k in layer:
            out[k] = (gamma * (start[k].double() + sum(pk * (t[k].double() - start[k].double())
                                                       for pk, t in zip(p, trained)))).to(start[k].dtype)
    return out


# -- settings --------------------------------------------------------------------------------------
def test_settings_table_is_validated_naming_the_key() -> None:
    from fedsilo.coordinator.config import parse_tables

    assert parse_settings({}) == {"beta": 0.03, "tau_min": 0.01, "tau_max": 0.2}
    assert parse_settings({"beta": 0, "tau_min": 0}) == {"beta": 0, "tau_min": 0, "tau_max": 0.2}
    assert parse_tables(FedLws, {}) == {"fedlws": {"beta": 0.03, "tau_min": 0.01, "tau_max": 0.2}}  # defaults
    for table, message in (({"beta": -0.1}, "fedlws.beta: -0.1 must be a finite number >= 0"),
                           ({"beta": True}, "fedlws.beta: True"),
                           ({"tau_min": float("nan")}, "fedlws.tau_min: nan"),
                           ({"tau_max": "0.3"}, "fedlws.tau_max: '0.3'"),
                           ({"tau_max": 0.001}, "fedlws.tau_max: 0.001 must be >= fedlws.tau_min (0.01)"),
                           ({"gamma": 1}, "fedlws.gamma: unknown key")):
        with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
            parse_settings(table)
        with pytest.raises(ConfigError, match=message.split(":")[0]):
            parse_tables(FedLws, {"fedlws": table})
    with pytest.raises(ConfigError, match=r"fedlws: set, but run.strategy 'fedavg' does not read a \[fedlws\] table"):
        parse_tables(get_method("fedavg"), {"fedlws": {}})
    s = FedLws.for_run({"fedlws": {"beta": 0.5, "tau_max": 1.0}}).settings
    assert (s.beta, s.tau_min, s.tau_max) == (0.5, 0.01, 1.0)


# -- layers and the layout -------------------------------------------------------------------------
def test_a_layer_is_a_module() -> None:
    names = ["0.weight", "0.bias", "1.weight", "1.bias", "2.block.weight", "2.block.running_mean", "scale"]
    assert layers(names) == [["0.weight", "0.bias"], ["1.weight", "1.bias"], ["2.block.weight", "2.block.running_mean"],
                             ["scale"]]
    model = net(0)
    start = start_of(model)
    manifest = Manifest.of_arrays({k: v.numpy() for k, v in start.items()})
    layout = get_method("fedlws").upload_layout(manifest, 1, 3)
    assert [t.name for t in layout.tensors] == [*start, NORM_SLOT] and layout.tensors[-1].shape == (3,)
    assert shared_numel(layout) == manifest.numel
    s = lws()
    state = AgentState(run_id="r", fingerprint="f", global_shared=start_of(model))
    trained = trained_like(start, 1, 0.01)
    up = s.upload(trained=trained, state=state, names=list(start), rnd=1, total_rounds=3)
    assert Manifest.of_arrays(up).difference(layout) is None  # what plaintext admission checks
    for value, layer in zip(up[NORM_SLOT], layers(list(start))):
        d = np.concatenate([(trained[k] - start[k]).double().numpy().ravel() for k in layer])
        assert value == pytest.approx(float(np.mean(d**2)), rel=1e-6)
    flat = s.he_vector(up, state=state, names=list(start), scale=0.5, rnd=1, total_rounds=3)
    assert flat.shape == (layout.numel,)
    np.testing.assert_array_equal(flat[-3:], 0.5 * up[NORM_SLOT])


# -- the defining rules ----------------------------------------------------------------------------
def test_tau_zero_is_fedavg_bit_for_bit(coordinator_sum) -> None:  # type: ignore[no-untyped-def]
    start = start_of(net(0))
    sizes = (20, 45, 70)
    trained = [trained_like(start, seed, 0.01) for seed in (1, 2, 3)]
    for he in (False, True):
        got = coordinator_sum.round([lws(beta=0.0, tau_min=0.0) for _ in sizes], start, trained, sizes, he=he)
        want = coordinator_sum.round([FedAvg() for _ in sizes], start, trained, sizes, he=he)
        assert set(got) == set(want) == set(start)  # the slot is not a model entry
        for k in want:
            assert torch.equal(got[k], want[k]), (he, k)


def test_known_answer_two_silos() -> None:
    """One layer w_g = (3, 4), ‖w_g‖ = 5; silo 1 (weight 1) moves by (4, 0), silo 2 (weight 3) stays.
    g = (1, 0); Σp‖Δ‖² = 4, ‖g‖² = 1: spread √3. β = 0.1: τ = 0.1732… clamped to τ_max = 0.15,
    γ = 5 / 5.15; β = 0.05: τ = 0.0866…, γ = 5 / 5.0866…; the new layer is γ·(w_g + g) = γ·(4, 4)."""
    start = {"0.weight": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    uploads = [{"0.weight": np.array([4.0, 0.0])}, {"0.weight": np.array([0.0, 0.0])}]
    p = np.array([0.25, 0.75])
    for beta, gamma in ((0.1, 0.9708737864077669), (0.05, 0.982974384239583)):
        s = lws(beta=beta, tau_min=0.0, tau_max=0.15)
        state = AgentState(run_id="r", fingerprint="f", global_shared=dict(start))
        ups = [s.upload(trained={"0.weight": start["0.weight"] + torch.from_numpy(u["0.weight"])}, state=state,
                        names=["0.weight"], rnd=1, total_rounds=1) for u in uploads]
        assert [float(u[NORM_SLOT][0]) for u in ups] == [8.0, 0.0]  # ‖Δ‖² / n_l, n_l = 2
        mean = {k: sum(pk * u[k] for pk, u in zip(p, ups)) for k in ups[0]}
        s.apply(mean=mean, state=state, rnd=1, total_rounds=1)
        np.testing.assert_allclose(state.global_shared["0.weight"].numpy(), [4 * gamma, 4 * gamma], rtol=1e-14)
    assert shrink_factor(weight_norm=0.0, update_norm=3.0, tau=0.2) == 1.0  # nothing to shrink: learns freely


def test_the_model_is_the_rule_on_the_individual_updates(coordinator_sum) -> None:  # type: ignore[no-untyped-def]
    """Through the coordinator's plaintext mean, the model equals the rule computed from every silo's own
    update (the RMS spread taken directly, not by the variance identity), with β·s_l inside the clamp for
    the first layer (0.143), below τ_min for the second (0.048) and above τ_max for the third (0.183); and
    it is not FedAvg's."""
    start = {k: v.double() for k, v in start_of(net(0)).items()}
    sizes = (20, 45, 70)
    trained = [trained_like(start, seed, 0.02 * (i + 1)) for i, seed in enumerate((4, 5, 6))]
    s = lws(beta=0.5, tau_min=0.05, tau_max=0.15)
    got = coordinator_sum.round([s, s, s], start, trained, sizes)
    want = by_definition(start, trained, sizes, s.settings)
    fedavg = coordinator_sum.round([FedAvg()] * 3, start, trained, sizes)
    for k in start:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
    assert all(not torch.allclose(got[k], fedavg[k], rtol=0, atol=1e-6) for k in start)


def test_he_gives_the_plaintext_model(coordinator_sum) -> None:  # type: ignore[no-untyped-def]
    start = start_of(net(1))
    sizes = (20, 45, 70)
    trained = [trained_like(start, seed, 0.01 * (i + 1)) for i, seed in enumerate((7, 8, 9))]
    plain = coordinator_sum.round([lws(beta=0.5) for _ in sizes], start, trained, sizes)
    he = coordinator_sum.round([lws(beta=0.5) for _ in sizes], start, trained, sizes, he=True)
    for k in plain:
        torch.testing.assert_close(he[k], plain[k], rtol=0, atol=2e-7)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 5), n=st.integers(1, 12), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-4, 1e-2, 1.0]))
def test_the_weighted_variance_identity(k: int, n: int, seed: int, scale: float) -> None:
    """Σ p_k ‖Δ_k‖² − ‖Σ p_k Δ_k‖² ≥ 0 and equals Σ p_k ‖Δ_k − Δ̄‖² (p normalised): what the slots give."""
    rng = np.random.default_rng(seed)
    deltas = rng.normal(0, scale, size=(k, n))
    p = rng.integers(1, 100, size=k).astype(np.float64)
    p /= p.sum()
    mean = p @ deltas
    sum_sq = float(p @ np.sum(deltas**2, axis=1))
    direct = float(p @ np.sum((deltas - mean) ** 2, axis=1))
    assert sum_sq - float(mean @ mean) >= -1e-12 * max(sum_sq, 1e-300)
    assert sum_sq - float(mean @ mean) == pytest.approx(direct, rel=1e-9, abs=1e-12 * sum_sq)
    assert spread(sum_sq, mean) == pytest.approx(math.sqrt(direct), rel=1e-6, abs=1e-6 * math.sqrt(sum_sq))
    assert spread(sum_sq, mean) >= 0.0


def test_spread_is_zero_for_equal_updates_and_garbage() -> None:
    assert spread(2.0, np.array([1.0, 1.0])) == 0.0  # Σp‖Δ‖² = ‖Δ̄‖²: every silo made the same update
    assert spread(1.0, np.array([1.0, 1.0])) == 0.0  # below 0 (rounding, or an upload outside the rules)
    assert spread(float("nan"), np.array([1.0])) == 0.0


def test_apply_needs_the_slot() -> None:
    state = AgentState(run_id="r", fingerprint="f", global_shared={"0.w": torch.ones(2)})
    with pytest.raises(ValueError, match=NORM_SLOT):
        lws().apply(mean={"0.w": np.ones(2, np.float32)}, state=state, rnd=1, total_rounds=1)
    with pytest.raises(ValueError, match="1 layer"):
        lws().apply(mean={"0.w": np.ones(2, np.float32), NORM_SLOT: np.ones(2)}, state=state, rnd=1, total_rounds=1)


def test_declarations_and_disclosures() -> None:
    from types import SimpleNamespace

    from fedsilo.silo_agent.bench.methods import study_method_names

    method = get_method("fedlws")
    assert method is FedLws and DpLevel.SILO in method.refuses and DpLevel.RECORD not in method.refuses
    assert "fedlws" in study_method_names() and method.bench is not None and method.bench.privacy is not None
    record = SimpleNamespace(record_level=True)
    assert lws().disclosures(train=None, plan=None) == []
    stated = lws().disclosures(train=None, plan=record)
    assert len(stated) == 1 and "post-processing" in stated[0]["statement"]
    assert FedLws.run_disclosures(SimpleNamespace(privacy=record)) == stated
    assert FedLws.run_disclosures(SimpleNamespace(privacy=None)) == []
