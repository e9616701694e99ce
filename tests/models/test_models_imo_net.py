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
    ImoDecoder,
    ImoFusion,
    ImoInputs,
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
# the ablation variants (the default is TINY itself); ids name the switches that differ
VARIANTS = {
    "fundus": replace(TINY, inputs=ImoInputs.FUNDUS),
    "oct": replace(TINY, inputs=ImoInputs.OCT),
    "late": replace(TINY, fusion=ImoFusion.LATE),
    "plain": replace(TINY, decoder=ImoDecoder.PLAIN),
    "oct-late-plain": replace(TINY, inputs=ImoInputs.OCT, fusion=ImoFusion.LATE, decoder=ImoDecoder.PLAIN),
}


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


# -- ablation switches ------------------------------------------------------------------------


def _grad_check(cfg: ImoNetConfig, flags: list[bool], *, inputs_cfg: ImoInputs | None = None) -> ImoNet:
    """A model of ``cfg`` after one backward of a training batch with ``flags``."""
    model = build_imo_net(cfg)
    inputs, targets = _batch(n=3, has_oct=flags)
    torch.manual_seed(0)
    model(inputs).loss(targets).backward()
    return model


def test_ablation_switches_parse_from_mappings_and_validate() -> None:
    assert (TINY.inputs, TINY.fusion, TINY.decoder) == (ImoInputs.BOTH, ImoFusion.CMFA, ImoDecoder.DIFFUSION)
    cfg = ImoNetConfig.from_mapping({"inputs": "oct", "fusion": "late", "decoder": "plain"})
    assert (cfg.inputs, cfg.fusion, cfg.decoder) == (ImoInputs.OCT, ImoFusion.LATE, ImoDecoder.PLAIN)
    assert ImoNetConfig.from_mapping({"inputs": "fundus"}).inputs is ImoInputs.FUNDUS
    assert ImoNetConfig.from_mapping(cfg.to_mapping()) == cfg
    assert cfg.to_mapping()["fusion"] == "late"
    for key, value in (("fusion", "early"), ("inputs", "neither"), ("decoder", "ddim")):
        with pytest.raises(ValueError, match=f"'{key}' must be one of .*got '{value}'"):
            ImoNetConfig.from_mapping({key: value})
    with pytest.raises(ValueError, match=r"ImoNetConfig.fusion must be a ImoFusion \('cmfa', 'late'\), got 'late'"):
        ImoNetConfig(fusion="late")  # type: ignore[arg-type]


def test_default_variant_equals_an_explicit_default_and_variants_keep_the_parameter_count() -> None:
    base = build_imo_net(TINY).state_dict()
    explicit = build_imo_net(ImoNetConfig.from_mapping({**TINY.to_mapping(), "inputs": "both", "fusion": "cmfa",
                                                        "decoder": "diffusion"})).state_dict()
    assert base.keys() == explicit.keys() and all(torch.equal(base[k], explicit[k]) for k in base)
    for name in ("fundus", "oct", "plain"):  # same architecture, same initial state
        state = build_imo_net(VARIANTS[name]).state_dict()
        assert state.keys() == base.keys() and all(torch.equal(base[k], state[k]) for k in base), name


def test_late_fusion_has_no_cmfa_or_alignment_tensors_and_an_oct_grade_head() -> None:
    model = build_imo_net(VARIANTS["late"])
    keys = list(model.state_dict())
    assert not [k for k in keys if "cmfa" in k or "align" in k]
    assert any("cmfa" in k for k in build_imo_net(TINY).state_dict())
    state = model.state_dict()
    oct_head = {k[len("modality_oct.grade_head."):]: v for k, v in state.items()
                if k.startswith("modality_oct.grade_head.")}
    main_head = {k[len("grade_head."):]: v for k, v in state.items() if k.startswith("grade_head.")}
    assert oct_head and {k: v.shape for k, v in oct_head.items()} == {k: v.shape for k, v in main_head.items()}
    assert all(k.startswith(("fundus_encoder.", "modality_oct.", "denoiser.", "grade_head.")) for k in keys)


@pytest.mark.parametrize("mode", [True, False])
def test_late_fusion_outputs_are_fundus_skips_and_gated_logit_sums(mode: bool) -> None:
    model = build_imo_net(VARIANTS["late"]).train(mode)
    inputs, targets = _batch(n=3, has_oct=[True, False, True])
    other = Inputs(inputs.fundus, torch.rand(inputs.oct.shape, generator=torch.Generator().manual_seed(9)),
                   inputs.has_oct)
    with torch.no_grad():
        torch.manual_seed(0)
        out = model(inputs)
        torch.manual_seed(0)
        moved = model(other)
        assert torch.equal(out.align, torch.zeros(3)) and torch.equal(out.loss_terms(targets)["align"], torch.zeros(3))
        assert torch.equal(out.seg_logits, moved.seg_logits)  # the decoder never reads OCT
        assert torch.equal(out.grade_logits[1], moved.grade_logits[1])
        assert not torch.allclose(out.grade_logits[0], moved.grade_logits[0])
        f_pool = _pool_of(model.fundus_encoder(inputs.fundus)[-1])
        o_pool = _pool_of(model.modality_oct.encoder(inputs.oct)[-1])
        expected = model.grade_head(f_pool) + inputs.has_oct.float()[:, None] * model.modality_oct.grade_head(o_pool)
    assert torch.allclose(out.grade_logits, expected, atol=1e-6)
    assert torch.equal(out.grade_logits[1], model.grade_head(f_pool)[1].detach())


def _pool_of(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


@pytest.mark.parametrize("decoder", list(ImoDecoder))
@pytest.mark.parametrize("fusion", list(ImoFusion))
def test_a_batch_without_oct_gives_zero_gradient_to_every_modality_oct_tensor(fusion: ImoFusion,
                                                                             decoder: ImoDecoder) -> None:
    cfg = replace(TINY, fusion=fusion, decoder=decoder)
    for flags, zero in (([False, False, False], True), ([True, False, False], False)):
        model = _grad_check(cfg, flags)
        oct_grads = {k: p.grad for k, p in model.named_parameters() if "modality_oct" in k.split(".")}
        assert len(oct_grads) == len(list(model.modality_oct.parameters())) > 0
        assert all(g is not None for g in oct_grads.values())
        if zero:
            assert all(torch.count_nonzero(g) == 0 for g in oct_grads.values()), \
                [k for k, g in oct_grads.items() if torch.count_nonzero(g)]
        else:
            assert torch.count_nonzero(oct_grads["modality_oct.encoder.levels.0.0.conv.weight"]) > 0
            head = "modality_oct.grade_head" if fusion is ImoFusion.LATE else "modality_oct.cmfa.out"
            assert all(torch.count_nonzero(g) > 0 for k, g in oct_grads.items()
                       if k.startswith(head) and k.endswith("weight"))
        assert torch.count_nonzero(model.fundus_encoder.levels[0][0].conv.weight.grad) > 0


@pytest.mark.parametrize("fusion", list(ImoFusion))
def test_inputs_fundus_gives_zero_gradient_to_every_modality_oct_tensor_even_with_oct(fusion: ImoFusion) -> None:
    cfg = replace(TINY, inputs=ImoInputs.FUNDUS, fusion=fusion)
    model = _grad_check(cfg, [True, True, True])
    grads = [p.grad for p in model.modality_oct.parameters()]
    assert grads and all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    assert torch.count_nonzero(model.fundus_encoder.levels[0][0].conv.weight.grad) > 0
    assert any(torch.count_nonzero(p.grad) for p in _grad_check(replace(cfg, inputs=ImoInputs.BOTH),
                                                                [True, True, True]).modality_oct.parameters())
    model.eval()  # withheld OCT: the same outputs as a batch that has none
    inputs, targets = _batch(n=3, has_oct=[True, True, True])
    with torch.no_grad():
        out, without = model(inputs), model(Inputs(inputs.fundus, None, torch.zeros(3, dtype=torch.bool)))
        assert torch.equal(out.seg_logits, without.seg_logits) and torch.equal(out.grade_logits, without.grade_logits)
        assert torch.equal(out.align, torch.zeros(3))


@pytest.mark.parametrize("cfg", [VARIANTS["oct"], replace(VARIANTS["oct"], fusion=ImoFusion.LATE),
                                 VARIANTS["oct-late-plain"]], ids=["cmfa", "late", "late-plain"])
def test_inputs_oct_ignores_the_fundus_image(cfg: ImoNetConfig) -> None:
    inputs, targets = _batch(n=3, has_oct=[True, False, True])
    other = Inputs(torch.rand(inputs.fundus.shape, generator=torch.Generator().manual_seed(8)), inputs.oct,
                   inputs.has_oct)
    for c, ignored in ((cfg, True), (replace(cfg, inputs=ImoInputs.BOTH), False)):
        model = build_imo_net(c)
        for mode in (True, False):
            model.train(mode)
            with torch.no_grad():
                torch.manual_seed(1)
                a = model(inputs)
                loss_a = a.per_example_loss(targets)
                torch.manual_seed(1)
                b = model(other)
                loss_b = b.per_example_loss(targets)
            same = (torch.equal(a.seg_logits, b.seg_logits) and torch.equal(a.grade_logits, b.grade_logits)
                    and torch.equal(loss_a, loss_b))
            assert same is ignored, (c, mode)
    model = build_imo_net(cfg).eval()  # the OCT still reaches the grade of examples that have it
    moved = Inputs(inputs.fundus, torch.rand(inputs.oct.shape, generator=torch.Generator().manual_seed(9)),
                   inputs.has_oct)
    with torch.no_grad():
        a, b = model(inputs), model(moved)
    assert not torch.allclose(a.grade_logits[0], b.grade_logits[0]) and torch.equal(a.grade_logits[1], b.grade_logits[1])


@pytest.mark.parametrize("fusion", list(ImoFusion))
def test_plain_decoder_is_one_deterministic_call_with_no_diffusion_term(fusion: ImoFusion) -> None:
    cfg = replace(VARIANTS["plain"], fusion=fusion)
    model = build_imo_net(cfg)
    assert sum(p.numel() for p in model.denoiser.parameters()) == sum(
        p.numel() for p in build_imo_net(replace(cfg, decoder=ImoDecoder.DIFFUSION)).denoiser.parameters())
    inputs, targets = _batch(n=3)
    outs = []
    for mode, seed in ((True, 1), (True, 2), (False, 3), (False, 4)):
        model.train(mode)
        with torch.no_grad():
            torch.manual_seed(seed)
            state = torch.random.get_rng_state()
            out = model(inputs)
            terms = out.loss_terms(targets)
            assert torch.equal(torch.random.get_rng_state(), state)  # no global RNG draws at all
        assert torch.equal(terms["diffusion"], torch.zeros(3))
        assert torch.equal(terms["seg"], dice_ce_per_example(out.seg_logits, targets.mask))
        assert torch.equal(out.t, torch.zeros(3, dtype=torch.int64))
        outs.append(out)
    for out in outs[1:]:  # train and eval agree, whatever the global RNG
        assert torch.equal(out.seg_logits, outs[0].seg_logits) and torch.equal(out.grade_logits, outs[0].grade_logits)
    with torch.no_grad():
        skips = outs[0].denoise  # the logits are the UNet's output on a zero map at t = 0, unscaled
        direct = skips(torch.zeros(3, 3, 16, 16), torch.zeros(3, dtype=torch.int64))
        assert torch.equal(outs[0].seg_logits, direct)
        single = model(Inputs(inputs.fundus[1:2], inputs.oct[1:2], inputs.has_oct[1:2]))
    assert torch.allclose(single.seg_logits[0], outs[0].seg_logits[1], atol=1e-5)
    diffusion = build_imo_net(replace(cfg, decoder=ImoDecoder.DIFFUSION))
    torch.manual_seed(1)
    with torch.no_grad():
        assert float(diffusion(inputs).loss_terms(targets)["diffusion"].min()) > 0


@pytest.mark.parametrize("name", ["default", *VARIANTS])
def test_each_example_loss_reads_only_its_own_example_in_every_variant(name: str) -> None:
    model = build_imo_net(VARIANTS.get(name, TINY))
    inputs, targets = _batch(n=3, has_oct=[True, True, False])
    other_inputs, other_targets = _batch(n=3, has_oct=[True, False, True], seed=5)
    changed = Inputs(inputs.fundus.clone(), inputs.oct.clone(), inputs.has_oct.clone())
    changed.fundus[2], changed.oct[2], changed.has_oct[2] = (other_inputs.fundus[2], other_inputs.oct[2],
                                                             other_inputs.has_oct[2])
    changed_targets = Targets(targets.mask.clone(), targets.grade.clone())
    changed_targets.mask[2], changed_targets.grade[2] = other_targets.mask[2], 1
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            torch.manual_seed(3)
            base = model(inputs).per_example_loss(targets)
            torch.manual_seed(3)
            moved = model(changed).per_example_loss(changed_targets)
        assert torch.allclose(base[:2], moved[:2], atol=1e-6, rtol=1e-6), mode
        assert not torch.allclose(base[2], moved[2])


@pytest.mark.parametrize("name", ["default", *VARIANTS])
def test_opacus_per_sample_gradients_are_exact_in_every_variant(name: str) -> None:
    from opacus.grad_sample import GradSampleModule

    from fedsilo.privacy.dpsgd import DpSgdStep, make_private_compatible

    model = build_imo_net(VARIANTS.get(name, TINY))
    assert make_private_compatible(model) is model
    inputs, targets = _batch(n=3, has_oct=[True, False, True])
    inputs.fundus = inputs.fundus.to(memory_format=torch.channels_last)
    names, params = zip(*[(k, p) for k, p in model.named_parameters() if p.requires_grad], strict=True)
    torch.manual_seed(6)
    per = model(inputs).per_example_loss(targets)
    reference = [torch.autograd.grad(per[i], params, retain_graph=True, allow_unused=True) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        try:
            torch.manual_seed(6)
            gsm(inputs).loss(targets).backward()
            for j, p in enumerate(params):
                for i in range(3):
                    ref = reference[i][j] if reference[i][j] is not None else torch.zeros_like(p)
                    assert torch.allclose(p.grad_sample[i], ref, atol=1e-5, rtol=1e-4), (names[j], i)
            for j, k in enumerate(names):  # example 1 has no OCT: nothing under modality_oct from it
                if "modality_oct" in k.split("."):
                    assert torch.count_nonzero(params[j].grad_sample[1]) == 0, k
        finally:
            gsm._close()
    for p in params:
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
    model.zero_grad(set_to_none=True)
    moved = ("denoiser.head.weight", "modality_oct.encoder.levels.0.0.conv.weight")
    before = {k: model.state_dict()[k].clone() for k in moved}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with DpSgdStep(model, torch.optim.SGD(params, lr=0.1), max_grad_norm=1.0, noise_multiplier=0.5,
                       expected_batch_size=3, generator=torch.Generator().manual_seed(0),
                       loss_fn=lambda out, y: out.loss(y)) as step:
            assert math.isfinite(step.step(inputs, targets))
    for k in moved:  # a step moves every trainable tensor (the noise alone moves those without a gradient)
        assert not torch.equal(model.state_dict()[k], before[k]), k
