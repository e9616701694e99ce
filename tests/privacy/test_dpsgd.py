"""Tests for record-level DP-SGD (privacy/dpsgd.py): SGD equivalence, clipping, noise, training, fixes."""

from __future__ import annotations

import copy
import math
import warnings

import peft
import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn

from fedsilo.models import (
    ModelConfig,
    Optimizer,
    SyntheticConfig,
    TrainConfig,
    build_model,
    model_fingerprint,
    silo_splits,
)
from fedsilo.privacy.dpsgd import (
    DpSgdConfig,
    DpSgdStep,
    dp_sgd_gradients,
    make_private_compatible,
)
from fedsilo.models.dp_training import train_local_dp

DATA = SyntheticConfig(image_size=32, n_train=8, n_val=0, n_test=0)
SMALL_NET = ModelConfig(channels=(4, 8, 16), strides=(2, 2))
B = 4
RTOL = 1e-5  # the tolerance: max |difference| <= 1e-5 * max |update|, per tensor
LR = 1.0  # large enough that float32 weight rounding (~1e-8) is far below 1e-5 of the update
OPACUS_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample")


def _loss(model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return DiceCELoss(softmax=True, to_onehot_y=True)(model(images), masks)


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    return silo_splits(DATA, 0).train


@pytest.fixture(scope="module")
def batch(data):  # type: ignore[no-untyped-def]
    return data.images[:B], data.masks[:B]


def _unet() -> nn.Module:
    return make_private_compatible(build_model(SMALL_NET))


def _lora_unet() -> nn.Module:
    """Small UNet with LoRA on every Conv2d; base frozen, B matrices made nonzero."""
    model = build_model(SMALL_NET)
    targets = [name for name, m in model.named_modules() if type(m) is nn.Conv2d]
    assert len(targets) >= 4
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    return make_private_compatible(model)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _plain_sgd_update(model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    before = _trainable(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    opt.zero_grad(set_to_none=True)
    _loss(model, images, masks).backward()
    opt.step()
    return {n: v - before[n] for n, v in _trainable(model).items()}


def _dp_sgd_update(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    max_grad_norm: float = math.inf,
    expected_batch_size: int = B,
) -> dict[str, torch.Tensor]:
    before = _trainable(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    with DpSgdStep(
        model, opt, max_grad_norm=max_grad_norm, noise_multiplier=0.0, expected_batch_size=expected_batch_size
    ) as step:
        step.step(images, masks)
    return {n: v - before[n] for n, v in _trainable(model).items()}


def _mismatches(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> tuple[dict[str, float], set[str]]:
    """Tensors where max |got - ref| > RTOL * max |ref|, as {name: ratio}; and the exempt names.

    A tensor whose reference update is zero to float tolerance (at most RTOL times the
    model's largest update) has no meaningful relative scale: the conv bias right before an
    InstanceNorm, which the norm cancels exactly, gets a rounding-noise gradient. Such
    tensors are exempt from the relative test but must still agree to RTOL * (largest update).
    """
    assert ref.keys() == got.keys()
    top = max(float(v.abs().max()) for v in ref.values())
    assert top > 0.0
    bad: dict[str, float] = {}
    exempt: set[str] = set()
    for name, r in ref.items():
        scale = float(r.abs().max())
        diff = float((got[name] - r).abs().max())
        if scale <= RTOL * top:
            exempt.add(name)
            if diff > RTOL * top:
                bad[name] = diff / (RTOL * top)
        elif diff > RTOL * scale:
            bad[name] = diff / scale
    return bad, exempt


def _assert_clean(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        for attr in OPACUS_ATTRS:
            assert not hasattr(p, attr), f"{name}.{attr} left behind"
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks, name
        assert "activations" not in m.__dict__ and "autograd_grad_sample_hooks" not in m.__dict__, name


# --- 1. the guard: σ = 0, C = inf gives exactly the ordinary SGD update ----------------------


@pytest.mark.parametrize("make", [_unet, _lora_unet], ids=["unet", "lora"])
def test_no_noise_no_clipping_equals_plain_sgd(make, batch) -> None:  # type: ignore[no-untyped-def]
    images, masks = batch
    plain = make()
    dp = copy.deepcopy(plain)
    ref = _plain_sgd_update(plain, images, masks)
    got = _dp_sgd_update(dp, images, masks)
    bad, exempt = _mismatches(ref, got)
    assert not bad, f"DP-SGD update differs from SGD: {bad}"
    # Only norm-cancelled conv biases may be exempt, and every other tensor really moved.
    assert all(name.endswith("conv.bias") for name in exempt), exempt
    assert len(exempt) < len(ref) // 4
    if make is _lora_unet:
        assert not exempt
    _assert_clean(dp)


@pytest.mark.parametrize("make", [_unet, _lora_unet], ids=["unet", "lora"])
@pytest.mark.parametrize("change", ["clipping", "divisor"])
def test_equivalence_check_can_fail(make, change, batch) -> None:  # type: ignore[no-untyped-def]
    images, masks = batch
    plain = make()
    dp = copy.deepcopy(plain)
    ref = _plain_sgd_update(plain, images, masks)
    if change == "clipping":
        got = _dp_sgd_update(dp, images, masks, max_grad_norm=1e-3)
    else:  # a wrong mean divisor (e.g. a loss-reduction mix-up) by a mere factor 4/5
        got = _dp_sgd_update(dp, images, masks, expected_batch_size=B + 1)
    bad, _ = _mismatches(ref, got)
    assert bad
    assert max(bad.values()) > 100 * RTOL


# --- 2. clipping --------------------------------------------------------------------------


def _per_example_grads(
    model: nn.Module, images: torch.Tensor, masks: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    """Each example's gradient from its own ordinary backward pass (independent of Opacus)."""
    out = []
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for i in range(images.shape[0]):
        model.zero_grad(set_to_none=True)
        _loss(model, images[i : i + 1], masks[i : i + 1]).backward()
        out.append({n: p.grad.detach().clone() for n, p in params})
    model.zero_grad(set_to_none=True)
    return out


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))


@pytest.mark.parametrize("make", [_unet, _lora_unet], ids=["unet", "lora"])
def test_clipping_matches_per_example_reference(make, batch) -> None:  # type: ignore[no-untyped-def]
    images, masks = batch
    model = make()
    per_example = _per_example_grads(model, images, masks)
    norms = sorted(_norm(g) for g in per_example)
    clip = 0.5 * (norms[1] + norms[2])  # two examples clipped, two not
    expected_bs = 6
    got = dp_sgd_gradients(
        model, images, masks, max_grad_norm=clip, noise_multiplier=0.0, expected_batch_size=expected_bs
    )
    want = {n: torch.zeros_like(t) for n, t in per_example[0].items()}
    for g in per_example:
        factor = min(1.0, clip / _norm(g))  # Abadi et al. 2016: g / max(1, |g| / C)
        for n in want:
            want[n] += factor * g[n] / expected_bs
    diff = {n: got[n] - want[n] for n in want}
    assert _norm(diff) <= 1e-4 * _norm(want)


def test_clipped_sum_is_bounded(batch) -> None:  # type: ignore[no-untyped-def]
    images, masks = batch
    model = _unet()
    clip, expected_bs = 1e-3, 3
    got = dp_sgd_gradients(
        model, images, masks, max_grad_norm=clip, noise_multiplier=0.0, expected_batch_size=expected_bs
    )
    assert _norm(got) <= clip * B / expected_bs * (1 + 1e-6)
    # One example at a time: each contribution is clipped to (just under) C, never above.
    for i in range(B):
        one = dp_sgd_gradients(
            model,
            images[i : i + 1],
            masks[i : i + 1],
            max_grad_norm=clip,
            noise_multiplier=0.0,
            expected_batch_size=1,
        )
        assert clip * (1 - 1e-3) <= _norm(one) <= clip * (1 + 1e-6)


def test_gradients_leave_model_untouched(batch) -> None:  # type: ignore[no-untyped-def]
    images, masks = batch
    model = _unet()
    model.eval()
    before = model_fingerprint(model)
    dp_sgd_gradients(model, images, masks, max_grad_norm=0.1, noise_multiplier=1.0, expected_batch_size=B)
    assert model_fingerprint(model) == before
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    _assert_clean(model)


# --- 3. noise -----------------------------------------------------------------------------


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.double().reshape(-1) for g in grads.values()])


@pytest.mark.parametrize("situation", ["empty_batch", "noise_minus_signal"])
def test_noise_std_is_sigma_c_over_expected_batch(situation, batch) -> None:  # type: ignore[no-untyped-def]
    images, masks = batch
    model = _unet()
    sigma, clip, expected_bs = 1.3, 0.7, 5
    kw = dict(max_grad_norm=clip, expected_batch_size=expected_bs)
    if situation == "empty_batch":
        images, masks = images[:0], masks[:0]
    clean = _flat(dp_sgd_gradients(model, images, masks, noise_multiplier=0.0, **kw))
    if situation == "empty_batch":
        assert torch.count_nonzero(clean) == 0
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    draws = [dp_sgd_gradients(model, images, masks, noise_multiplier=sigma, generator=g, **kw) for g in gens]
    noise = torch.cat([_flat(d) - clean for d in draws])
    n = noise.numel()
    assert n > 10_000
    want = sigma * clip / expected_bs
    assert abs(float(noise.std()) / want - 1.0) < 0.05
    assert abs(float(noise.mean())) < 5 * want / math.sqrt(n)


def test_noise_is_reproducible_with_a_generator_and_fresh_without(batch) -> None:  # type: ignore[no-untyped-def]
    images, masks = batch
    model = _unet()
    kwargs = dict(max_grad_norm=0.5, noise_multiplier=1.0, expected_batch_size=B)

    def run(gen: torch.Generator | None) -> torch.Tensor:
        return _flat(dp_sgd_gradients(model, images, masks, generator=gen, **kwargs))

    assert torch.equal(run(torch.Generator().manual_seed(3)), run(torch.Generator().manual_seed(3)))
    assert not torch.equal(run(torch.Generator().manual_seed(3)), run(torch.Generator().manual_seed(4)))
    assert not torch.equal(run(None), run(None))


# --- 4. train_local_dp --------------------------------------------------------------------


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_train_runs_the_requested_steps_in_place(data) -> None:  # type: ignore[no-untyped-def]
    model = _unet()
    keys = list(model.state_dict())
    before = _state(model)
    forwards: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: forwards.append(int(args[0].shape[0])))
    dp = DpSgdConfig(noise_multiplier=0.8, max_grad_norm=1.0, sample_rate=1.0, steps=3)
    result = train_local_dp(model, data, TrainConfig(), dp, round_index=0, noise_seed=11)
    handle.remove()
    assert forwards == [len(data)] * 3
    assert (result.steps, result.examples) == (3, 3 * len(data))
    assert math.isfinite(result.loss) and result.loss > 0
    assert list(model.state_dict()) == keys  # no "_module." prefix
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training
    _assert_clean(model)
    # The model trains normally afterwards (no per-sample machinery left attached).
    _loss(model, data.images[:2], data.masks[:2]).backward()
    assert all(p.grad is not None and not hasattr(p, "grad_sample") for p in model.parameters())


@pytest.mark.parametrize("optimizer", [Optimizer.ADAM, Optimizer.SGD])
def test_train_is_reproducible_with_a_noise_seed(data, optimizer) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(optimizer=optimizer, lr=0.01, seed=5)
    dp = DpSgdConfig(noise_multiplier=1.0, max_grad_norm=0.5, sample_rate=0.5, steps=3)
    a, b, c, d, e = (_unet() for _ in range(5))
    ra = train_local_dp(a, data, cfg, dp, round_index=2, noise_seed=9)
    rb = train_local_dp(b, data, cfg, dp, round_index=2, noise_seed=9)
    train_local_dp(c, data, cfg, dp, round_index=2, noise_seed=10)
    train_local_dp(d, data, cfg, dp, round_index=2)
    train_local_dp(e, data, cfg, dp, round_index=2)
    assert ra == rb
    assert 0 <= ra.examples <= 3 * len(data)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for other in (c, d):
        assert any(not torch.equal(sa[k], v) for k, v in other.state_dict().items())
    sd, se = d.state_dict(), e.state_dict()
    assert any(not torch.equal(sd[k], se[k]) for k in sd)


def test_train_lora_changes_only_adapters(data) -> None:  # type: ignore[no-untyped-def]
    model = _lora_unet()
    before = _state(model)
    dp = DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=2)
    train_local_dp(model, data, TrainConfig(), dp, round_index=0, noise_seed=1)
    after = model.state_dict()
    assert list(after) == list(before)
    for name, value in after.items():
        if "lora_" in name:
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name
    _assert_clean(model)


def test_empty_poisson_batches_take_noise_only_steps(data) -> None:  # type: ignore[no-untyped-def]
    model = _unet()
    before = _state(model)
    dp = DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1e-9, steps=2)
    result = train_local_dp(model, data, TrainConfig(), dp, round_index=0, noise_seed=1)
    assert (result.steps, result.examples) == (2, 0)
    assert math.isnan(result.loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_rejects_bad_arguments(data) -> None:  # type: ignore[no-untyped-def]
    dp = DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=1)
    with pytest.raises(ValueError, match="round_index"):
        train_local_dp(_unet(), data, TrainConfig(), dp, round_index=-1)
    with pytest.raises(ValueError, match="noise_seed"):
        train_local_dp(_unet(), data, TrainConfig(), dp, round_index=0, noise_seed=-1)
    with pytest.raises(ValueError, match="DpSgdConfig"):
        train_local_dp(_unet(), data, TrainConfig(), {"steps": 1}, round_index=0)  # type: ignore[arg-type]
    bn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="make_private_compatible"):
        train_local_dp(bn, data, TrainConfig(), dp, round_index=0)
    _assert_clean(bn)


def test_step_rejects_an_optimizer_over_other_parameters() -> None:
    model = _lora_unet()
    everything = torch.optim.SGD(model.parameters(), lr=0.1)  # includes the frozen base
    with pytest.raises(ValueError, match="trainable"):
        DpSgdStep(model, everything, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=1)
    _assert_clean(model)


# --- 5. make_private_compatible and config validation ------------------------------------


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))


def test_batchnorm_is_replaced_deterministically(batch) -> None:  # type: ignore[no-untyped-def]
    original = _bn_net()
    fixed = make_private_compatible(original)
    assert fixed is not original
    assert any(isinstance(m, nn.BatchNorm2d) for m in original.modules())  # input untouched
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    assert model_fingerprint(make_private_compatible(_bn_net())) == model_fingerprint(fixed)
    images, masks = batch
    grads = dp_sgd_gradients(fixed, images, masks, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=B)
    assert set(grads) == {n for n, _ in fixed.named_parameters()}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_default_unet_passes_unchanged(mode) -> None:  # type: ignore[no-untyped-def]
    model = build_model(ModelConfig())
    model.train(mode == "train")
    fingerprint = model_fingerprint(model)
    assert make_private_compatible(model) is model
    assert model_fingerprint(model) == fingerprint
    assert model.training is (mode == "train")


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, 2, 1, 1))
        self.register_buffer("stat", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.stat


def test_unfixable_model_is_rejected() -> None:
    with pytest.raises(ValueError, match="buffers"):
        make_private_compatible(nn.Sequential(_WithBuffer()))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noise_multiplier", -0.1),
        ("noise_multiplier", math.nan),
        ("noise_multiplier", math.inf),
        ("noise_multiplier", True),
        ("noise_multiplier", "1"),
        ("max_grad_norm", 0.0),
        ("max_grad_norm", -1.0),
        ("max_grad_norm", math.nan),
        ("max_grad_norm", None),
        ("sample_rate", 0.0),
        ("sample_rate", 1.5),
        ("sample_rate", math.nan),
        ("steps", 0),
        ("steps", 1.0),
        ("steps", True),
    ],
)
def test_config_rejects_bad_values(field, value) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=1)
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"DpSgdConfig.{field}"):
        DpSgdConfig(**kwargs)


def test_config_clipping_off_needs_zero_noise() -> None:
    DpSgdConfig(noise_multiplier=0.0, max_grad_norm=math.inf, sample_rate=1.0, steps=1)
    with pytest.raises(ValueError, match="noise_multiplier.*max_grad_norm is inf"):
        DpSgdConfig(noise_multiplier=0.5, max_grad_norm=math.inf, sample_rate=1.0, steps=1)


def test_config_is_frozen() -> None:
    cfg = DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=1)
    with pytest.raises(AttributeError):
        cfg.steps = 2  # type: ignore[misc]


def test_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import builtins; real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('torch', 'opacus', 'monai', 'peft'): raise ImportError(name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "from fedsilo.privacy.dpsgd import DpSgdConfig\n"
        "DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=2)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- 6. per-sample gradient rules for PReLU and transposed convolutions --------------------

RULE_RTOL = 1e-6


def _rule_cases() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(id, layer, input shape [N, C, *spatial]) covering the rules' branches."""
    ct2 = nn.ConvTranspose2d
    return [
        ("prelu-shared", nn.PReLU(), (3, 4, 5, 6)),
        ("prelu-per-channel", nn.PReLU(4, init=0.3), (3, 4, 5, 6)),
        ("prelu-per-channel-flat", nn.PReLU(4), (3, 4)),
        ("ct2-plain", ct2(4, 6, 3), (3, 4, 5, 6)),
        ("ct2-unet-upsample", ct2(4, 6, 3, stride=2, padding=1, output_padding=1), (3, 4, 5, 6)),
        ("ct2-nobias-groups", ct2(4, 6, (3, 2), stride=(3, 2), padding=(2, 1), output_padding=(2, 1),
                                  dilation=(2, 1), groups=2, bias=False), (3, 4, 5, 6)),
        # output_padding >= stride (allowed with dilation > stride): more unfold windows than inputs
        ("ct2-outpad-over-stride", ct2(4, 6, 3, stride=1, padding=1, output_padding=1, dilation=2), (3, 4, 5, 6)),
        ("ct2-depthwise", ct2(4, 8, 2, stride=2, padding=0, output_padding=1, dilation=3, groups=4), (3, 4, 5, 6)),
        ("ct1", nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (3, 4, 7)),
        ("ct3", nn.ConvTranspose3d(2, 4, (2, 3, 2), stride=(2, 1, 2), padding=(0, 1, 1), output_padding=(1, 0, 1)),
         (2, 2, 3, 4, 3)),
    ]


@pytest.mark.parametrize(("layer", "shape"), [c[1:] for c in _rule_cases()], ids=[c[0] for c in _rule_cases()])
def test_rules_match_per_example_backward(layer, shape, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """GradSampleModule's per-sample gradients (our rules) equal one backward pass per example."""
    import opacus.grad_sample.grad_sample_module as gsm_mod
    from opacus.grad_sample import GradSampleModule

    from fedsilo.privacy.dpsgd import register_grad_samplers

    register_grad_samplers()
    assert type(layer) in GradSampleModule.GRAD_SAMPLERS
    fallback_calls: list[str] = []
    real_fallback = gsm_mod.ft_compute_per_sample_gradient

    def spy(module, *args):  # type: ignore[no-untyped-def]
        fallback_calls.append(type(module).__name__)
        return real_fallback(module, *args)

    monkeypatch.setattr(gsm_mod, "ft_compute_per_sample_gradient", spy)
    gen = torch.Generator().manual_seed(0)
    layer = layer.double()
    with torch.no_grad():  # random weights, including PReLU slopes of both signs
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        weights = torch.randn(layer(x).shape, generator=gen, dtype=torch.float64)

    def per_example_losses(out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (out * w).flatten(1).sum(1)

    gsm = GradSampleModule(nn.Sequential(layer), batch_first=True, loss_reduction="mean", strict=True)
    try:
        with warnings.catch_warnings():  # the input needs no gradient; Opacus only uses output grads
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            per_example_losses(gsm(x), weights).mean().backward()
        samples = {n: p.grad_sample.detach().clone() for n, p in layer.named_parameters()}
    finally:
        gsm._close()
    assert not fallback_calls  # the registered rule ran, not functorch
    names = {n for n, _ in layer.named_parameters()}
    assert samples.keys() == names and names == ({"weight", "bias"} if getattr(layer, "bias", None) is not None
                                                  else {"weight"})
    for i in range(shape[0]):
        layer.zero_grad(set_to_none=True)
        per_example_losses(layer(x[i : i + 1]), weights[i : i + 1]).mean().backward()
        for n, p in layer.named_parameters():
            ref, got = p.grad, samples[n][i]
            assert got.shape == ref.shape
            scale = float(ref.abs().max())
            assert scale > 0.0
            assert float((got - ref).abs().max()) <= RULE_RTOL * scale, (n, i)


def test_grad_sampler_registration_is_idempotent(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Registering twice changes nothing, and a rule registered earlier by other code is kept."""
    from opacus.grad_sample import GradSampleModule

    from fedsilo.privacy.dpsgd import register_grad_samplers

    mapping = GradSampleModule.GRAD_SAMPLERS

    def other_rule(layer, activations, backprops):  # type: ignore[no-untyped-def]
        raise AssertionError("not called")

    monkeypatch.delitem(mapping, nn.ConvTranspose1d, raising=False)
    monkeypatch.setitem(mapping, nn.ConvTranspose1d, other_rule)  # someone else's rule, registered first
    register_grad_samplers()
    first = dict(mapping)
    register_grad_samplers()
    assert dict(mapping) == first
    assert mapping[nn.ConvTranspose1d] is other_rule
    for cls in (nn.PReLU, nn.ConvTranspose2d, nn.ConvTranspose3d):
        assert mapping[cls].__module__ == "fedsilo.privacy.grad_samplers"
    assert mapping[nn.Linear].__module__.startswith("opacus.")  # Opacus' own rules are untouched, but for
    assert getattr(mapping[nn.Conv2d], "fedsilo_contiguous", False)  # its convolutions, fed contiguous tensors


@pytest.mark.parametrize("make", [_unet, _lora_unet], ids=["unet", "lora"])
def test_unet_needs_no_functorch_fallback(make, batch, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every trainable layer type of the UNet (PReLU, ConvTranspose2d included) has a registered rule."""
    import opacus.grad_sample.grad_sample_module as gsm_mod
    from opacus.grad_sample import GradSampleModule

    def fail(module, *args):  # type: ignore[no-untyped-def]
        raise AssertionError(f"functorch fallback used for {type(module).__name__}")

    monkeypatch.setattr(gsm_mod, "ft_compute_per_sample_gradient", fail)
    model = make()
    images, masks = batch
    grads = dp_sgd_gradients(model, images, masks, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=B)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    hooked = {type(m) for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    if make is _unet:
        assert {nn.PReLU, nn.ConvTranspose2d} <= hooked
    assert hooked <= GradSampleModule.GRAD_SAMPLERS.keys()


def test_noise_is_opacus_secure_sampler_over_all_coordinates(batch) -> None:  # type: ignore[no-untyped-def]
    """One secure_mode draw (Opacus' sampler) for the flat vector of all coordinates, in parameter order."""
    from opacus.optimizers.optimizer import _generate_noise

    images, masks = batch
    model = _unet()
    sigma, clip, expected_bs = 1.3, 0.7, 5
    got = dp_sgd_gradients(model, images[:0], masks[:0], max_grad_norm=clip, noise_multiplier=sigma,
                           expected_batch_size=expected_bs, generator=torch.Generator().manual_seed(21))
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    want = _generate_noise(sigma * clip, torch.zeros(total), torch.Generator().manual_seed(21), secure_mode=True)
    assert torch.allclose(_flat(got), want.double() / expected_bs, rtol=1e-6, atol=0.0)


def test_fedprox_under_dp_sgd_matches_ordinary_fedprox_without_noise_or_clipping(data) -> None:  # type: ignore[no-untyped-def]
    """With σ = 0, no clipping and q = 1, DP-SGD with FedProx's μ is ordinary full-batch FedProx: the
    proximal gradient is added to the DP gradient, never through the per-sample machinery."""
    import dataclasses

    from fedsilo.models import train_local

    model = _unet()
    twin = copy.deepcopy(model)
    cfg = TrainConfig(optimizer=Optimizer.SGD, lr=0.05, batch_size=len(data), local_epochs=3, proximal_mu=3.0)
    dp = DpSgdConfig(noise_multiplier=0.0, max_grad_norm=math.inf, sample_rate=1.0, steps=3)
    train_local_dp(model, data, cfg, dp, round_index=0, noise_seed=1)
    train_local(twin, data, cfg, round_index=0)
    without = copy.deepcopy(_unet())
    train_local_dp(without, data, dataclasses.replace(cfg, proximal_mu=0.0), dp, round_index=0, noise_seed=1)
    worst = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    moved = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(), without.state_dict().values()))
    assert worst < 1e-5 < moved
