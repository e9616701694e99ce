"""Tests of fedsilo.models.resfim: empirical Fisher (plain and DP), ResFIM scores and masks."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn

from fedsilo.models import ModelConfig, SyntheticConfig, build_model, silo_splits
from fedsilo.models.registry import local_parameter_names
from fedsilo.models.resfim import (
    FisherDp,
    ResFimConfig,
    ScoreNorm,
    compute_resfim,
    empirical_fisher,
    needs_recompute,
    resfim_scores,
    sensitive_count,
    sensitive_mask,
    shared_fraction,
)
from fedsilo.privacy.accounting import Mechanism, Neighbouring

SMALL_NET = ModelConfig(channels=(4, 8, 16), strides=(2, 2))


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.set_num_threads(1)
    ds = silo_splits(SyntheticConfig(image_size=32, n_train=16, n_val=0, n_test=0), 0).train
    return ds.images.float(), ds.masks.long()


def _loop_fisher(model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean of squared per-example gradients, one ordinary backward pass per example."""
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for i in range(images.shape[0]):
        model.zero_grad(set_to_none=True)
        loss_fn(model(images[i : i + 1]), masks[i : i + 1]).backward()
        for n, p in model.named_parameters():
            sums[n] += p.grad.double() ** 2
    model.zero_grad(set_to_none=True)
    return {n: s / images.shape[0] for n, s in sums.items()}


# ---------------------------------------------------------------------------------------
# (1) Acceptance: a style shift that, by construction, only the first layer's gradients see
# ---------------------------------------------------------------------------------------


def _blind_first_layer_net() -> nn.Module:
    """Small conv net whose first-layer kernels are zero-mean (edge detectors).

    With replicate padding, such a layer maps ``x + b`` and ``x`` to the same output, so a
    global brightness offset b is invisible to everything after it: their activations and
    backprops do not change. The first layer's *weight* gradient ``Σ δ · (x + b)`` does.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, padding_mode="replicate"),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, padding_mode="replicate"),
            nn.ReLU(),
            nn.Conv2d(8, 2, 1),
        )
    with torch.no_grad():
        w = net[0].weight
        w -= w.mean(dim=(1, 2, 3), keepdim=True)
    return net


def test_acceptance_first_layer_is_domain_sensitive(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, masks = data
    net = _blind_first_layer_net()
    # Simulated scanner: brightness offset (seen by the first layer only) plus a 2 % contrast
    # change (seen, mildly, by every layer), same labels.
    simulated = 1.02 * images + 0.5
    cfg = ResFimConfig(rho=0.1, batch_size=8)
    res = compute_resfim(net, images, masks, simulated, cfg)
    assert res.n_examples == images.shape[0] and res.releases == ()
    mean_r = {n: float(r.mean()) for n, r in res.scores.items()}
    first = "0.weight"
    others = [n for n in mean_r if n != first]
    # The first layer's normalised residual dominates every other tensor's by far.
    assert all(mean_r[first] > 5 * mean_r[n] for n in others), mean_r
    # Per tensor, exactly ceil(rho * numel) entries are local, and they are the top ones by R.
    m, r = res.masks[first], res.scores[first]
    assert int(m.sum()) == math.ceil(0.1 * r.numel())
    assert float(r[m].min()) >= float(r[~m].max())
    # The first layer's local entries have larger R, on average, than any other tensor's.
    assert all(float(r[m].mean()) > 5 * float(res.scores[n][res.masks[n]].mean()) for n in others)
    # Ranked globally, the first layer holds far more of the top-rho set than its share of parameters.
    flat = torch.cat([s.flatten() for s in res.scores.values()])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(res.scores.values())])
    k = sensitive_count(flat.numel(), 0.1)
    top = owner[torch.sort(flat, descending=True, stable=True).indices[:k]]
    share_top = float((top == 0).float().mean())
    share_params = r.numel() / flat.numel()
    assert share_top > 3 * share_params, (share_top, share_params)


def test_acceptance_control_without_style_shift(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Same images as "simulated": no residual anywhere; offset only: only the first weight moves."""
    images, masks = data
    net = _blind_first_layer_net()
    cfg = ResFimConfig(batch_size=16)
    same = compute_resfim(net, images, masks, images.clone(), cfg)
    assert all(float(r.abs().max()) == 0.0 for r in same.scores.values())
    offset = compute_resfim(net, images, masks, images + 0.5, cfg)
    assert float(offset.scores["0.weight"].mean()) > 0.1
    for n in ("2.weight", "2.bias", "4.weight", "4.bias"):
        assert float(offset.scores[n].max()) < 1e-3, n


# ---------------------------------------------------------------------------------------
# (2) empirical_fisher == mean of squared per-example gradients
# ---------------------------------------------------------------------------------------


def test_fisher_matches_loop_of_batch_one_backward_passes(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, masks = data[0][:4], data[1][:4]
    model = build_model(SMALL_NET)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    marker = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), marker, strict=True):
        p.grad = g
    model.eval()
    fisher = empirical_fisher(model, images, masks, batch_size=3)  # chunks of 3 and 1
    # Model left as it was: weights, grads, mode, no Opacus leftovers.
    assert not model.training
    assert all(p.grad is g for p, g in zip(model.parameters(), marker, strict=True))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())

    model.train()
    ref = _loop_fisher(model, images, masks)
    assert list(fisher) == [n for n, _ in model.named_parameters()]
    top = max(float(r.max()) for r in ref.values())
    for name, r in ref.items():
        assert fisher[name].shape == r.shape and fisher[name].dtype == torch.float32
        # rtol 1e-5; the tiny atol only covers tensors whose true Fisher is 0 (conv bias before
        # InstanceNorm: round-off of ~1e-17).
        torch.testing.assert_close(fisher[name].double(), r, rtol=1e-5, atol=1e-9 * top)
    # The batch gradient squared is a different thing: it must not pass the same check.
    model.zero_grad(set_to_none=True)
    DiceCELoss(softmax=True, to_onehot_y=True)(model(images), masks).backward()
    name = "model.0.conv.unit0.conv.weight"
    batch_sq = next(p for n, p in model.named_parameters() if n == name).grad.double() ** 2
    assert not torch.allclose(batch_sq, ref[name], rtol=1e-2)


def test_fisher_rejects_bad_arguments(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = build_model(SMALL_NET)
    images, masks = data[0][:2], data[1][:2]
    with pytest.raises(ValueError, match="batch_size"):
        empirical_fisher(model, images, masks, batch_size=0)
    with pytest.raises(ValueError, match="batch size"):
        empirical_fisher(model, images, masks[:1], batch_size=2)
    with pytest.raises(ValueError, match="zero examples"):
        empirical_fisher(model, images[:0], masks[:0], batch_size=2)
    with pytest.raises(ValueError, match="dp"):
        empirical_fisher(model, images, masks, batch_size=2, dp=(1.0, 1.0))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# (3) masks
# ---------------------------------------------------------------------------------------


def _random_scores(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}


@pytest.mark.parametrize("rho", [0.1, 0.25, 0.5, 0.9])
def test_masks_counts_norm_layers_and_shared_fraction(rho: float) -> None:
    model = build_model(SMALL_NET)
    scores = _random_scores(model)
    cfg = ResFimConfig(rho=rho)
    masks = sensitive_mask(scores, model, cfg)
    norm = local_parameter_names(model)
    params = dict(model.named_parameters())
    assert list(masks) == [k for k in model.state_dict() if k in params]
    expected_local = 0
    for name, m in masks.items():
        assert m.dtype == torch.bool and m.shape == params[name].shape
        if name in norm:
            assert bool(m.all()), name
            expected_local += m.numel()
        else:
            k = math.ceil(Fraction(str(rho)) * m.numel())
            assert int(m.sum()) == k, name
            if k < m.numel():
                assert float(scores[name][m].min()) >= float(scores[name][~m].max())
            expected_local += k
    total = sum(m.numel() for m in masks.values())
    assert shared_fraction(masks) == pytest.approx(1 - expected_local / total)
    norm_share = sum(masks[n].numel() for n in norm) / total
    assert shared_fraction(masks) <= (1 - rho) * (1 - norm_share) + 1e-12  # ceil: never more shared
    # Deterministic.
    again = sensitive_mask({n: s.clone() for n, s in scores.items()}, model, cfg)
    assert all(torch.equal(again[n], masks[n]) for n in masks)
    # Norm layers ranked like the rest when not kept local.
    plain = sensitive_mask(scores, model, ResFimConfig(rho=rho, local_norm_layers=False))
    for name in norm:
        assert int(plain[name].sum()) == math.ceil(Fraction(str(rho)) * plain[name].numel())


def test_masks_ties_rounding_frozen_and_missing_scores() -> None:
    assert sensitive_count(30, 0.1) == 3  # not 4 from 0.1 * 30 = 3.0000000000000004
    assert sensitive_count(7, 0.1) == 1 and sensitive_count(1, 0.01) == 1 and sensitive_count(10, 0.99) == 10
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.Conv2d(3, 2, 1))
    net[2].bias.requires_grad_(False)
    scores = {n: torch.ones(p.shape) for n, p in net.named_parameters() if p.requires_grad}
    masks = sensitive_mask(scores, net, ResFimConfig(rho=0.25))
    # All scores tie: the lowest flat indices win.
    flat = masks["0.weight"].flatten()
    assert flat[:7].all() and not flat[7:].any()  # ceil(0.25 * 27) = 7
    # A tensor with no Fisher signal at all (all scores 0) is shared whole, not cut at arbitrary indices.
    zero = sensitive_mask({**scores, "0.weight": torch.zeros(3, 1, 3, 3)}, net, ResFimConfig(rho=0.25))
    assert not zero["0.weight"].any() and zero["2.weight"].flatten()[:2].all()
    assert masks["1.weight"].all() and masks["1.bias"].all()
    assert not masks["2.bias"].any()  # frozen: nothing to keep local
    del scores["2.weight"]
    with pytest.raises(ValueError, match="2.weight"):
        sensitive_mask(scores, net, ResFimConfig())


def test_scores_normalisation() -> None:
    f_loc = {"a": torch.tensor([1.0, 1.0, 2.0, 0.0]), "b": torch.tensor([10.0, 30.0]), "z": torch.zeros(3)}
    f_sim = {"a": torch.tensor([1.0, 3.0, 0.0, 0.0]), "b": torch.tensor([10.0, 10.0]), "z": torch.zeros(3)}
    r = resfim_scores(f_loc, f_sim)
    # mean((F_loc + F_sim) / 2): a -> 1.0, b -> 15.
    torch.testing.assert_close(r["a"], torch.tensor([0.0, 2.0, 2.0, 0.0]))
    torch.testing.assert_close(r["b"], torch.tensor([0.0, 20.0 / 15.0]))
    assert not r["z"].any()
    rmax = resfim_scores(f_loc, f_sim, norm=ScoreNorm.MAX)
    torch.testing.assert_close(rmax["a"], torch.tensor([0.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(rmax["b"], torch.tensor([0.0, 1.0]))
    # Scale-free: multiplying one tensor's Fisher by 1000 leaves its scores unchanged.
    r2 = resfim_scores({**f_loc, "a": f_loc["a"] * 1e3}, {**f_sim, "a": f_sim["a"] * 1e3})
    torch.testing.assert_close(r2["a"], r["a"])
    # Round-off-level tensors score 0.
    tiny = resfim_scores({**f_loc, "z": torch.tensor([1e-17, 0.0, 0.0])}, f_sim)
    assert not tiny["z"].any()
    with pytest.raises(ValueError, match="b"):
        resfim_scores(f_loc, {**f_sim, "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="different tensors"):
        resfim_scores(f_loc, {"a": f_sim["a"]})


# ---------------------------------------------------------------------------------------
# (4) DP Fisher
# ---------------------------------------------------------------------------------------


def test_dp_fisher_without_noise_and_huge_clip_is_exact(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, masks = data[0][:4], data[1][:4]
    model = build_model(SMALL_NET)
    plain = empirical_fisher(model, images, masks, batch_size=4)
    dp = empirical_fisher(model, images, masks, batch_size=2, dp=FisherDp(clip_norm=1e6, noise_multiplier=0.0))
    for name in plain:
        torch.testing.assert_close(dp[name], plain[name], rtol=1e-5, atol=0.0)


def test_dp_fisher_one_example_adds_at_most_c_squared(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, masks = data[0][:5], data[1][:5]
    model = build_model(SMALL_NET)
    clip = 0.05
    dp = FisherDp(clip_norm=clip, noise_multiplier=0.0)
    f4 = empirical_fisher(model, images[:4], masks[:4], batch_size=4, dp=dp)
    f5 = empirical_fisher(model, images, masks, batch_size=4, dp=dp)
    contrib = torch.cat([(5 * f5[n].double() - 4 * f4[n].double()).flatten() for n in f5])
    # The added record's vector of squares: its L1 norm is ||g_clipped||^2 <= C^2, its L2 norm too.
    raw = _loop_fisher(model, images[4:5], masks[4:5])
    raw_sq = sum(float(r.sum()) for r in raw.values())
    assert raw_sq > 4 * clip**2  # the clip is active for this example
    assert float(contrib.sum()) == pytest.approx(clip**2, rel=1e-4)
    assert float(contrib.norm()) <= clip**2 * (1 + 1e-4)
    assert float(contrib.min()) >= -1e-9 * clip**2


def test_dp_fisher_noise_std_and_release() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(4, 1, 8, 8, generator=gen)
    masks = (torch.rand(4, 1, 8, 8, generator=gen) > 0.5).long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Conv2d(1, 2, 1)  # 4 trainable numbers
    n, clip, sigma = 4, 10.0, 2e-5
    exact = empirical_fisher(model, images, masks, batch_size=4, dp=FisherDp(clip_norm=clip, noise_multiplier=0.0))
    exact_flat = torch.cat([f.flatten() for f in exact.values()]).double()
    std = sigma * clip**2 / n
    assert float(exact_flat.min()) > 8 * std  # the clamp at 0 never bites
    dp = FisherDp(clip_norm=clip, noise_multiplier=sigma)
    noise = []
    for seed in range(150):
        f = empirical_fisher(model, images, masks, batch_size=4, dp=dp, generator=torch.Generator().manual_seed(seed))
        noise.append(torch.cat([v.flatten() for v in f.values()]).double() - exact_flat)
    samples = torch.cat(noise)  # 600 draws
    assert float(samples.mean()) == pytest.approx(0.0, abs=4 * std / math.sqrt(samples.numel()))
    assert float(samples.std()) == pytest.approx(std, rel=0.15)
    # Same generator seed: same noise.
    f1 = empirical_fisher(model, images, masks, batch_size=2, dp=dp, generator=torch.Generator().manual_seed(3))
    f2 = empirical_fisher(model, images, masks, batch_size=4, dp=dp, generator=torch.Generator().manual_seed(3))
    assert all(torch.allclose(f1[k], f2[k], rtol=1e-6, atol=0.0) for k in f1)

    rel = dp.release()
    assert rel.mechanism is Mechanism.GAUSSIAN and rel.neighbouring is Neighbouring.RECORD
    assert (rel.noise_multiplier, rel.sample_rate, rel.steps) == (sigma, 1.0, 1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        FisherDp(clip_norm=1.0, noise_multiplier=0.0).release()


def test_compute_resfim_with_dp_ledgers_two_releases(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, masks = data
    model = build_model(SMALL_NET)
    cfg = ResFimConfig(max_examples=6, batch_size=4)
    dp = FisherDp(clip_norm=1.0, noise_multiplier=1.0)
    res = compute_resfim(model, images, masks, images * 1.3, cfg, dp=dp, generator=torch.Generator().manual_seed(0))
    assert res.n_examples == 6
    assert res.releases == (dp.release(), dp.release())
    assert all(bool((f >= 0).all()) for f in (*res.f_loc.values(), *res.f_sim.values()))
    assert res.shared_fraction == pytest.approx(shared_fraction(res.masks))
    quiet = compute_resfim(model, images, masks, images * 1.3, cfg, dp=FisherDp(clip_norm=1.0, noise_multiplier=0.0))
    assert quiet.releases == ()
    with pytest.raises(ValueError, match="simulated_images"):
        compute_resfim(model, images, masks, images[:3], cfg)


# ---------------------------------------------------------------------------------------
# (5) configs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rho": 0.0}, "rho"),
        ({"rho": 1.0}, "rho"),
        ({"rho": -0.1}, "rho"),
        ({"rho": math.nan}, "rho"),
        ({"rho": "0.1"}, "rho"),
        ({"rho": True}, "rho"),
        ({"local_norm_layers": 1}, "local_norm_layers"),
        ({"recompute_every": 0}, "recompute_every"),
        ({"recompute_every": 2.0}, "recompute_every"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_examples": 0}, "max_examples"),
        ({"norm": "max"}, "norm"),
    ],
)
def test_bad_resfim_config_refused_naming_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"ResFimConfig\.{field}\b"):
        ResFimConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"clip_norm": 0.0, "noise_multiplier": 1.0}, "clip_norm"),
        ({"clip_norm": math.inf, "noise_multiplier": 0.0}, "clip_norm"),
        ({"clip_norm": math.nan, "noise_multiplier": 1.0}, "clip_norm"),
        ({"clip_norm": True, "noise_multiplier": 1.0}, "clip_norm"),
        ({"clip_norm": 1.0, "noise_multiplier": -1.0}, "noise_multiplier"),
        ({"clip_norm": 1.0, "noise_multiplier": math.inf}, "noise_multiplier"),
        ({"clip_norm": 1.0, "noise_multiplier": "1"}, "noise_multiplier"),
    ],
)
def test_bad_fisher_dp_refused_naming_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"FisherDp\.{field}\b"):
        FisherDp(**kwargs)  # type: ignore[arg-type]


def test_defaults_and_recompute_schedule() -> None:
    cfg = ResFimConfig()
    assert (cfg.rho, cfg.local_norm_layers, cfg.recompute_every, cfg.norm) == (0.1, True, 5, ScoreNorm.MEAN_FISHER)
    assert [r for r in range(12) if needs_recompute(r, cfg)] == [0, 5, 10]
    assert all(needs_recompute(r, ResFimConfig(recompute_every=1)) for r in range(4))
    with pytest.raises(ValueError, match="round_index"):
        needs_recompute(-1, cfg)
