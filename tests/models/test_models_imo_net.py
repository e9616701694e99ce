"""Tests of the IMO network: config, CMFA alignment, DDPM helpers, shapes, determinism, per-example losses, DP-SGD."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from fedsilo.models.imo_diffusion import ddim_sample, ddim_timesteps, predict_x0, timestep_embedding
from fedsilo.models.imo_net import (
    ImoNet,
    ImoNetConfig,
    ImoNorm,
    ImoOutput,
    alignment_loss,
    build_imo_net,
    ddpm_loss,
    ddpm_schedule,
    dice_ce_per_example,
    q_sample,
)

TINY = ImoNetConfig(widths=(8, 16), norm_groups=4, attention_heads=2, time_dim=8, diffusion_steps=20,
                    inference_steps=3)


@dataclass
class Inputs:
    """Stand-in of the glaucoma Task's collated inputs (the attribute names the network reads)."""

    fundus: torch.Tensor
    oct: torch.Tensor | None
    has_oct: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.fundus.shape


@dataclass
class Targets:
    """Stand-in of the glaucoma Task's targets."""

    mask: torch.Tensor
    grade: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.mask.shape


def _batch(n: int = 4, size: int = 16, oct_size: int = 12, has_oct: list[bool] | None = None,
           seed: int = 0) -> tuple[Inputs, Targets]:
    g = torch.Generator().manual_seed(seed)
    flags = torch.tensor(has_oct if has_oct is not None else [i % 2 == 0 for i in range(n)])
    mask = torch.zeros(n, size, size, dtype=torch.int64)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):  # a disc with a cup, centred per example
        cy, cx = (size // 2 + int(torch.randint(-2, 3, (2,), generator=g)[j]) for j in range(2))
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        mask[i][r2 <= (size // 4) ** 2] = 1
        mask[i][r2 <= (size // 8) ** 2] = 2
    fundus = mask[:, None].float() * 0.3 + 0.1 * torch.rand(n, 3, size, size, generator=g)
    oct_img = torch.rand(n, 1, oct_size, oct_size, generator=g)
    return Inputs(fundus, oct_img, flags), Targets(mask, torch.arange(n) % 3)


# -- config -----------------------------------------------------------------------------------


def test_config_validates_and_round_trips() -> None:
    cfg = ImoNetConfig.from_mapping({"widths": [8, 16], "norm": "layer", "inference_steps": 2})
    assert cfg.widths == (8, 16) and cfg.norm is ImoNorm.LAYER
    assert ImoNetConfig.from_mapping(cfg.to_mapping()) == cfg
    with pytest.raises(ValueError, match="unknown key.*'depth'"):
        ImoNetConfig.from_mapping({"depth": 3})
    bad = [({"widths": (8,)}, r"widths must be a list of at least 2 widths, got \(8,\)"),
           ({"norm_groups": 3}, "norm_groups=3 must divide every entry of widths"),
           ({"attention_heads": 5}, "attention_heads=5 must divide the fusion width widths"),
           ({"inference_steps": 101}, "inference_steps=101 must be <= diffusion_steps=100"),
           ({"beta_end": 1e-5}, r"beta_end must be in \[0.0001, 1.0\), got 1e-05"),
           ({"align_weight": -1.0}, "align_weight must be in .*got -1.0"),
           ({"n_grades": 1}, "n_grades must be >= 2, got 1")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            ImoNetConfig(**kwargs)
    with pytest.raises(ValueError, match="cfg must be an ImoNetConfig"):
        build_imo_net({"seed": 0})  # type: ignore[arg-type]


# -- CMFA alignment ---------------------------------------------------------------------------


def test_alignment_loss_is_zero_for_identical_features_positive_otherwise_and_zero_without_oct() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    every = torch.ones(5, dtype=torch.bool)
    assert torch.equal(alignment_loss(a, a.clone(), every), torch.zeros(5))
    assert torch.allclose(alignment_loss(a, 3.0 * a, every), torch.zeros(5), atol=1e-6)  # scale-free
    value = alignment_loss(a, b, every)
    assert (value > 0).all()
    assert torch.allclose(value, 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1), atol=1e-6)
    flags = torch.tensor([True, False, True, False, False])
    masked = alignment_loss(a, b, flags)
    assert torch.equal(masked[~flags], torch.zeros(3)) and torch.equal(masked[flags], value[flags])
    with pytest.raises(ValueError, match="alignment_loss needs"):
        alignment_loss(a, b[:, :3], every)


def test_the_network_alignment_term_follows_has_oct() -> None:
    model = build_imo_net(TINY)
    inputs, _ = _batch(has_oct=[True, False, True, False])
    out = model(inputs)
    assert torch.equal(out.align[1::2], torch.zeros(2)) and (out.align[0::2] > 0).all()


# -- DDPM -------------------------------------------------------------------------------------


def test_ddpm_schedule_matches_an_independent_numpy_computation() -> None:
    sched = ddpm_schedule(100, 1e-4, 0.02)
    betas = np.linspace(1e-4, 0.02, 100)
    assert sched.steps == 100 and sched.betas.dtype == torch.float64
    assert np.allclose(sched.betas.numpy(), betas, rtol=0, atol=1e-15)
    assert np.allclose(sched.alphas.numpy(), 1.0 - betas, rtol=0, atol=1e-15)
    expected = 1.0
    for beta in betas:
        expected *= 1.0 - beta
    assert math.isclose(float(sched.alpha_bars[-1]), expected, rel_tol=1e-12)
    assert math.isclose(expected, 0.3636, abs_tol=1e-4)  # ᾱ_T: x_T still holds ~0.6 x_0 at T = 100
    with pytest.raises(ValueError, match="beta_start must be in"):
        ddpm_schedule(10, 0.0, 0.02)


def test_q_sample_and_ddpm_loss_have_the_closed_form_values() -> None:
    sched = ddpm_schedule(100, 1e-4, 0.02)
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([0, 99])
    x_t = q_sample(x0, t, noise, sched)
    for i, step in enumerate((0, 99)):
        ab = float(np.prod(1.0 - np.linspace(1e-4, 0.02, 100)[: step + 1]))
        by_hand = math.sqrt(ab) * x0[i].double() + math.sqrt(1.0 - ab) * noise[i].double()
        assert torch.allclose(x_t[i].double(), by_hand, atol=1e-6)
    assert torch.allclose(predict_x0(x_t, t, noise, sched), x0, atol=1e-5)  # the true ε recovers x_0

    def model_eps(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + steps[:, None, None, None].float() / 100.0

    per = ddpm_loss(model_eps, x0, t, noise, schedule=sched, reduction="none")
    expected = (model_eps(x_t, t) - noise).square().flatten(1).mean(1)
    assert per.shape == (2,) and torch.allclose(per, expected)
    assert torch.allclose(ddpm_loss(model_eps, x0, t, noise, schedule=sched), expected.mean())
    assert torch.allclose(ddpm_loss(lambda x, s: noise, x0, t, noise, schedule=sched), torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 100\)"):
        q_sample(x0, torch.tensor([0, 100]), noise, sched)


def test_strided_sampler_steps_and_embedding() -> None:
    assert ddim_timesteps(100, 4) == [99, 66, 33, 0] and ddim_timesteps(20, 1) == [19]
    with pytest.raises(ValueError, match="sampling_steps=5 must be <= steps=4"):
        ddim_timesteps(4, 5)
    sched = ddpm_schedule(100)
    x0 = torch.tensor([[[[1.0, -1.0]]]])
    # an oracle predictor that knows x_0 returns it from any start
    oracle = lambda x, t: (x - sched.alpha_bars[t].float().sqrt() * x0) / (1 - sched.alpha_bars[t].float()).sqrt()  # noqa: E731
    out = ddim_sample(oracle, torch.randn(1, 1, 1, 2), ddim_timesteps(100, 4), sched)
    assert torch.allclose(out, x0, atol=1e-5)
    emb = timestep_embedding(torch.tensor([0, 5]), 7)
    assert emb.shape == (2, 7) and torch.equal(emb[0, :3], torch.ones(3)) and torch.equal(emb[:, 6], torch.zeros(2))


# -- shapes and the network -------------------------------------------------------------------


@pytest.mark.parametrize("flags", [[True, True, False], [False, False, False]])
def test_shapes_for_both_modalities_and_fundus_only_batches(flags: list[bool]) -> None:
    model = build_imo_net(TINY)
    inputs, targets = _batch(n=3, size=18, oct_size=10, has_oct=flags)
    for mode in (True, False):
        model.train(mode)
        out = model(inputs)
        assert isinstance(out, ImoOutput)
        assert out.seg_logits.shape == (3, 3, 18, 18) and out.grade_logits.shape == (3, 3)
        assert out.per_example_loss(targets).shape == (3,) and out.loss(targets).dim() == 0
    if not any(flags):
        model.eval()
        with torch.no_grad():
            alone = model(Inputs(inputs.fundus, None, inputs.has_oct))
            assert torch.equal(alone.seg_logits, model(inputs).seg_logits)
    with pytest.raises(ValueError, match=r"inputs.fundus must be a tensor \[N, 3, H, W\]"):
        model(Inputs(inputs.fundus[:, :1], inputs.oct, inputs.has_oct))
    with pytest.raises(ValueError, match=r"inputs.has_oct must be a bool tensor \[3\]"):
        model(Inputs(inputs.fundus, inputs.oct, inputs.has_oct.long()))
    with pytest.raises(ValueError, match=r"targets.mask must be an int64 tensor \[3, 18, 18\]"):
        model(inputs).loss(Targets(targets.mask[:, :4], targets.grade))


def test_weights_follow_the_seed_and_the_state_has_no_buffers() -> None:
    a, b = build_imo_net(TINY).state_dict(), build_imo_net(TINY).state_dict()
    c = build_imo_net(replace(TINY, seed=1)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["modality_oct.cmfa.q.weight"], c["modality_oct.cmfa.q.weight"])
    model = build_imo_net(TINY)
    assert isinstance(model, ImoNet) and model.training and not list(model.buffers())
    state = torch.random.get_rng_state()
    build_imo_net(TINY)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_fundus_only_batch_gives_zero_gradient_to_the_oct_encoder() -> None:
    model = build_imo_net(TINY)
    for flags, zero in (([False, False, False], True), ([True, False, False], False)):
        model.zero_grad(set_to_none=True)
        inputs, targets = _batch(n=3, has_oct=flags)
        model(inputs).loss(targets).backward()
        oct_grads = [p.grad for p in model.modality_oct.encoder.parameters()]
        assert all(g is not None for g in oct_grads)
        assert all(torch.count_nonzero(g) == 0 for g in oct_grads) is zero
        assert torch.count_nonzero(model.fundus_encoder.levels[0][0].conv.weight.grad) > 0


def test_eval_output_is_deterministic_and_independent_of_the_global_rng_and_the_batch() -> None:
    model = build_imo_net(TINY).eval()
    inputs, targets = _batch(n=3)
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(inputs)
        state = torch.random.get_rng_state()
        loss = first.loss(targets)
        assert torch.equal(torch.random.get_rng_state(), state)  # eval draws nothing from the global RNG
        torch.manual_seed(2)
        second = model(inputs)
        assert torch.equal(first.seg_logits, second.seg_logits) and torch.equal(loss, second.loss(targets))
        assert torch.equal(first.grade_logits, second.grade_logits)
        single = model(Inputs(inputs.fundus[1:2], inputs.oct[1:2], inputs.has_oct[1:2]))
    assert torch.allclose(single.seg_logits[0], first.seg_logits[1], atol=1e-5)


def test_each_example_loss_reads_only_its_own_example() -> None:
    model = build_imo_net(TINY)
    inputs, targets = _batch(n=3, has_oct=[True, True, False])
    other_inputs, other_targets = _batch(n=3, has_oct=[True, False, True], seed=5)
    changed = Inputs(inputs.fundus.clone(), inputs.oct.clone(), inputs.has_oct.clone())
    changed.fundus[2], changed.oct[2], changed.has_oct[2] = (other_inputs.fundus[2], other_inputs.oct[2],
                                                             other_inputs.has_oct[2])
    changed_targets = Targets(targets.mask.clone(), targets.grade.clone())
    changed_targets.mask[2], changed_targets.grade[2] = other_targets.mask[2], 1
    for mode in (True, False):
        model.train(mode)
        torch.manual_seed(3)
        base = model(inputs).per_example_loss(targets)
        torch.manual_seed(3)
        moved = model(changed).per_example_loss(changed_targets)
        assert torch.allclose(base[:2], moved[:2], atol=1e-6, rtol=1e-6), mode
        assert not torch.allclose(base[2], moved[2])


def test_training_draws_follow_the_global_rng() -> None:
    model = build_imo_net(TINY)
    inputs, targets = _batch()
    losses = []
    for seed in (4, 4, 5):
        torch.manual_seed(seed)
        losses.append(model(inputs).loss(targets))
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])


def test_dice_ce_is_small_for_confident_correct_logits() -> None:
    _, targets = _batch(n=2)
    onehot = torch.nn.functional.one_hot(targets.mask, 3).permute(0, 3, 1, 2).float()
    good = dice_ce_per_example(20.0 * (2 * onehot - 1), targets.mask)
    bad = dice_ce_per_example(20.0 * (1 - 2 * onehot), targets.mask)
    assert good.shape == (2,) and (good < 1e-4).all() and (bad > 1.0).all()


# -- DP-SGD and training ----------------------------------------------------------------------


def test_opacus_per_sample_gradients_are_exact_and_a_dp_sgd_step_runs() -> None:
    from opacus.grad_sample import GradSampleModule

    from fedsilo.privacy.dpsgd import DpSgdStep, make_private_compatible

    model = build_imo_net(TINY)
    assert make_private_compatible(model) is model
    inputs, targets = _batch(n=3, has_oct=[True, False, True])
    # channels-last input: Opacus' Conv2d rule misreads it, the network makes its inputs contiguous
    inputs.fundus = inputs.fundus.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(6)
    per = model(inputs).per_example_loss(targets)
    reference = [torch.autograd.grad(per[i], params, retain_graph=True) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        try:
            torch.manual_seed(6)
            gsm(inputs).loss(targets).backward()
            for j, p in enumerate(params):
                for i in range(3):
                    assert torch.allclose(p.grad_sample[i], reference[i][j], atol=1e-5, rtol=1e-4)
        finally:
            gsm._close()
    for p in params:
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(params, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with DpSgdStep(model, opt, max_grad_norm=1.0, noise_multiplier=0.5, expected_batch_size=3,
                       generator=torch.Generator().manual_seed(0), loss_fn=lambda out, y: out.loss(y)) as step:
            loss = step.step(inputs, targets)
    assert math.isfinite(loss)
    after = model.state_dict()
    assert not torch.equal(after["denoiser.head.weight"], before["denoiser.head.weight"])
    assert not torch.equal(after["modality_oct.encoder.levels.0.0.conv.weight"], before["modality_oct.encoder.levels.0.0.conv.weight"])


def test_a_few_adam_steps_reduce_the_loss() -> None:
    model = build_imo_net(TINY)
    inputs, targets = _batch(n=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        torch.manual_seed(0)  # the same t and ε every step: a fixed objective
        loss = model(inputs).loss(targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
