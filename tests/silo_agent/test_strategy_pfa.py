"""PFA as a run strategy: silos upload window amplitudes (zeros outside), keep phase, outer amplitude and norm layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedsilo.models import local_parameter_names
from fedsilo.models.fourier_agg import as_matrix, combine_array, window_amplitude_array, window_mask
from fedsilo.silo_agent.state import AgentState
from fedsilo.silo_agent.methods.pfa import Pfa

SIZES = (10.0, 30.0, 60.0)  # the silos' training sizes, the coordinator's weights
NORM = {"1.weight", "1.bias"}


def spectrum(w: np.ndarray) -> np.ndarray:
    """fftshift(fft2) of the 2-D view, computed here independently of the library's helpers."""
    return np.fft.fftshift(np.fft.fft2(as_matrix(np.asarray(w, dtype=np.float64))))


def assert_own_phase(before: np.ndarray, after: np.ndarray, tol: float) -> None:
    x, y = spectrum(before), spectrum(after)
    defined = (np.abs(x) > 1e-9) & (np.abs(y) > 1e-9)
    assert defined.any()
    dphi = np.angle(y[defined] * np.conj(x[defined]))  # wrap-safe difference of angles
    assert np.abs(dphi).max() < tol


def net(seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.Conv2d(4, 3, 3))
    with torch.no_grad():  # norm affine parameters that differ per silo (defaults are all 1 / all 0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.to(dtype)


def silo_states(models: list[nn.Module], initial: nn.Module) -> list[AgentState]:
    """Each silo after local training: ``model`` = its trained weights, ``global_shared`` = the round's start."""
    start = initial.state_dict()
    return [AgentState(run_id="r", fingerprint="f", model={k: v.clone() for k, v in m.state_dict().items()},
                       global_shared={k: start[k].clone() for k in Pfa().shared_names(initial)}) for m in models]


def federate(models: list[nn.Module], rnd: int, total: int, sizes: tuple[float, ...] = SIZES,
             ) -> tuple[list[AgentState], list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """One PFA round as the agent and the coordinator run it: upload, weighted mean, apply."""
    strategy = Pfa()
    names = strategy.shared_names(models[0])
    states = silo_states(models, net(99, next(iter(models[0].parameters())).dtype))
    uploads = [strategy.upload(trained=m.state_dict(), state=s, names=names, rnd=rnd, total_rounds=total)
               for m, s in zip(models, states)]
    w = np.asarray(sizes[:len(models)])
    mean = {k: sum(wi * u[k].astype(np.float64) for wi, u in zip(w, uploads)) / w.sum() for k in names}
    for s in states:
        strategy.apply(mean=mean, state=s, rnd=rnd, total_rounds=total)
    return states, uploads, mean


def test_norm_layers_stay_local_and_everything_else_is_shared() -> None:
    model = net(0)
    assert local_parameter_names(model) == NORM
    assert Pfa().shared_names(model) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # a scalar parameter has no 2-D spectrum: it stays local rather than breaking the upload
    model.register_parameter("scale", nn.Parameter(torch.tensor(2.0)))
    assert "scale" not in Pfa().shared_names(model)


def test_round_keeps_own_phase_and_outer_amplitude_and_means_the_window() -> None:
    models = [net(s) for s in (1, 2, 3)]
    total, rnd = 4, 2
    ratio = 0.7 + 0.25 * (rnd - 1) / (total - 1)
    states, uploads, _ = federate(models, rnd, total)
    w = np.asarray(SIZES)
    for name in Pfa().shared_names(models[0]):
        own = [m.state_dict()[name].numpy() for m in models]
        win = window_mask(as_matrix(own[0]).shape, ratio)
        want_window = sum(wi * np.abs(spectrum(x))[win] for wi, x in zip(w, own)) / w.sum()
        for x, state, up in zip(own, states, uploads):
            new = state.global_shared[name]
            assert new.dtype == torch.float64 and tuple(new.shape) == x.shape
            after = np.abs(spectrum(new.numpy()))
            np.testing.assert_allclose(after[win], want_window, rtol=1e-9, atol=1e-9)  # (c)
            np.testing.assert_allclose(after[~win], np.abs(spectrum(x))[~win], rtol=1e-9, atol=1e-9)  # (b)
            assert_own_phase(x, new.numpy(), 1e-9)  # (b)
            # (d) the upload: the tensor's shape, the window's amplitudes, exactly 0 outside
            assert up[name].shape == x.shape and up[name].dtype == np.float64
            view = as_matrix(up[name])
            assert (view[~win] == 0).all()
            np.testing.assert_allclose(view[win], np.abs(spectrum(x))[win], rtol=1e-12, atol=1e-12)
        # silos that differ end up different (each keeps its own phase): not a FedAvg in disguise
        assert not torch.allclose(states[0].global_shared[name], states[1].global_shared[name])
    for state, m in zip(states, models):  # (a) norm layers: neither uploaded nor changed
        assert not NORM & set(state.global_shared)
        personal = state.personal_state_dict()
        for k in NORM:
            assert torch.equal(personal[k], m.state_dict()[k])


def test_identical_silos_keep_their_weights() -> None:
    models = [net(5, torch.float32) for _ in range(3)]  # (e), in the dtype a real run uses
    states, uploads, _ = federate(models, 1, 3)
    fedavg_bytes = sum(v.numel() * v.element_size() for k, v in models[0].state_dict().items() if k not in NORM)
    assert sum(u.nbytes for u in uploads[0].values()) == fedavg_bytes  # same byte count as FedAvg's upload
    assert all(u.dtype == np.float32 for u in uploads[0].values())
    for state in states:
        for k, v in state.global_shared.items():
            assert v.dtype == torch.float32
            torch.testing.assert_close(v, models[0].state_dict()[k], rtol=0, atol=1e-6)


def test_window_grows_from_0_7_to_0_95() -> None:
    model = net(7)
    sd = model.state_dict()
    weight = sd["0.weight"]  # (4, 2, 3, 3): the 2-D view is (4, 18)
    counts = {}
    for rnd, ratio in ((1, 0.7), (5, 0.95)):
        up = Pfa().upload(trained=sd, state=AgentState(run_id="r", fingerprint="f"), names=["0.weight"], rnd=rnd,
                          total_rounds=5)["0.weight"]
        np.testing.assert_array_equal(up, window_amplitude_array(weight.numpy(), ratio))
        counts[rnd] = int(np.count_nonzero(up))
    # rows: b = floor(r * 2) = 1 -> 3 of 4 either way; columns: b = floor(0.7 * 9) = 6 -> 13 of 18,
    # b = floor(0.95 * 9) = 8 -> 17 of 18
    assert counts == {1: 3 * 13, 5: 3 * 17}


def test_known_answer_of_a_delta() -> None:
    # [1, 0, 0, 0] has amplitude 1 at every frequency; at 0.7 the window of 4 holds frequencies -1..1
    # (fftshift positions 1..3). Mean amplitude 2 there, phase 0: x = ifft([2, 2, 1, 2]) = [7, 1, -1, 1] / 4
    delta = np.array([1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(window_amplitude_array(delta, 0.7), [0.0, 1.0, 1.0, 1.0], atol=1e-15)
    got = combine_array(delta, np.array([5.0, 2.0, 2.0, 2.0]), 0.7)  # the entry outside the window is ignored
    np.testing.assert_allclose(got, [1.75, 0.25, -0.25, 0.25], atol=1e-15)
    # noise can push a mean amplitude below 0: it is projected to 0, the nearest valid amplitude
    np.testing.assert_allclose(combine_array(delta, np.array([0.0, -3.0, 2.0, 2.0]), 0.7),
                               combine_array(delta, np.array([0.0, 0.0, 2.0, 2.0]), 0.7), atol=1e-15)


def test_bad_means_are_refused() -> None:
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        combine_array(x, np.ones(12), 0.7)
    with pytest.raises(ValueError, match="NaN"):
        combine_array(x, np.full((3, 4), np.nan), 0.7)
    with pytest.raises(ValueError, match="scalar"):
        window_amplitude_array(np.float64(1.0), 0.7)


SHAPES = st.one_of(
    st.tuples(st.integers(1, 40)),  # a bias
    st.tuples(st.integers(1, 9), st.integers(2, 30)),  # a linear weight
    st.tuples(st.integers(1, 8), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),  # a convolution
)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=SHAPES, silos=st.integers(1, 4), ratio=st.floats(0.05, 1.0))
def test_arrays_keep_phase_and_outer_amplitude_and_mean_the_window(seed: int, shape: tuple[int, ...], silos: int,
                                                                  ratio: float) -> None:
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=shape) for _ in range(silos)]
    w = rng.uniform(0.1, 3.0, size=silos)
    uploads = [window_amplitude_array(x, ratio) for x in weights]
    mean = sum(wi * u for wi, u in zip(w, uploads)) / w.sum()
    win = window_mask(as_matrix(weights[0]).shape, ratio)
    want_window = sum(wi * np.abs(spectrum(x))[win] for wi, x in zip(w, weights)) / w.sum()
    for x, up in zip(weights, uploads):
        assert up.shape == x.shape and (as_matrix(up)[~win] == 0).all()
        new = combine_array(x, mean, ratio)
        assert new.shape == x.shape and new.dtype == x.dtype
        after = np.abs(spectrum(new))
        np.testing.assert_allclose(after[win], want_window, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(after[~win], np.abs(spectrum(x))[~win], rtol=1e-9, atol=1e-9)
        assert_own_phase(x, new, 1e-9)
