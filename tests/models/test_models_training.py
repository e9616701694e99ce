"""Tests of fedsilo.models.training: deterministic local training and evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from fedsilo.models import (
    EvalResult,
    ModelConfig,
    Optimizer,
    SegmentationDataset,
    SyntheticConfig,
    TrainConfig,
    TrainResult,
    build_model,
    evaluate,
    silo_splits,
    train_local,
)

DATA = SyntheticConfig(image_size=32, n_train=12, n_val=0, n_test=8)
SMALL_NET = ModelConfig(channels=(4, 8, 16), strides=(2, 2))


@pytest.fixture(scope="module")
def splits():  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    return silo_splits(DATA, 0)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Oracle(nn.Module):
    """Reads the mask off an image that *is* the mask: logits (1 - x, x), or inverted."""

    def __init__(self, invert: bool = False) -> None:
        super().__init__()
        self.invert = invert
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = 1.0 - x if self.invert else x
        return torch.cat([1.0 - fg, fg], dim=1) + 0.0 * self.dummy


def _mask_dataset() -> SegmentationDataset:
    masks = torch.zeros(3, 1, 16, 16, dtype=torch.int64)
    masks[0, 0, 2:6, 2:6] = 1
    masks[1, 0, 8:15, 1:4] = 1
    masks[2, 0, 5:9, 5:12] = 1
    return SegmentationDataset(masks.float(), masks)


def test_defaults() -> None:
    cfg = TrainConfig()
    assert (cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.optimizer, cfg.seed) == (1, 8, 1e-3, Optimizer.ADAM, 0)
    assert (cfg.proximal_mu, cfg.personal_lambda) == (0.0, 0.1)


def test_training_is_deterministic_and_depends_on_round(splits) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(batch_size=4)
    a, b, c = (build_model(SMALL_NET) for _ in range(3))
    ra = train_local(a, splits.train, cfg, round_index=3)
    rb = train_local(b, splits.train, cfg, round_index=3)
    train_local(c, splits.train, cfg, round_index=4)
    assert ra == rb
    assert _equal(a.state_dict(), b.state_dict())
    assert not _equal(a.state_dict(), c.state_dict())


def test_dropout_is_deterministic_too(splits) -> None:  # type: ignore[no-untyped-def]
    net = ModelConfig(channels=(4, 8, 16), strides=(2, 2), dropout=0.3)
    a, b = build_model(net), build_model(net)
    train_local(a, splits.train, TrainConfig(batch_size=6), round_index=0)
    train_local(b, splits.train, TrainConfig(batch_size=6), round_index=0)
    assert _equal(a.state_dict(), b.state_dict())


def test_training_leaves_global_rng_alone(splits) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(99)
    expected = torch.rand(4)
    torch.manual_seed(99)
    train_local(build_model(SMALL_NET), splits.train, TrainConfig(batch_size=6), round_index=0)
    assert torch.equal(torch.rand(4), expected)


def test_result_counts(splits) -> None:  # type: ignore[no-untyped-def]
    model = build_model(SMALL_NET)
    before = _state(model)
    result = train_local(model, splits.train, TrainConfig(local_epochs=2, batch_size=5), round_index=0)
    assert isinstance(result, TrainResult)
    assert (result.steps, result.examples) == (6, 24)  # 12 images: batches of 5, 5, 2, twice
    assert 0.0 < result.loss < 3.0
    assert not _equal(before, model.state_dict())
    assert model.training


def test_training_improves_dice(splits) -> None:  # type: ignore[no-untyped-def]
    model = build_model(SMALL_NET)
    before = evaluate(model, splits.test)
    cfg = TrainConfig(batch_size=4, lr=3e-3)
    losses = [train_local(model, splits.train, cfg, round_index=r).loss for r in range(6)]
    after = evaluate(model, splits.test)
    assert losses[-1] < losses[0]
    assert before.dice < 0.3  # measured: 0.18 untrained, 0.56 after six epochs
    assert after.dice > before.dice + 0.25
    assert after.dice > 0.45


def test_sgd_optimizer_runs(splits) -> None:  # type: ignore[no-untyped-def]
    model = build_model(SMALL_NET)
    before = _state(model)
    cfg = TrainConfig(optimizer=Optimizer.SGD, lr=0.05, batch_size=6)
    assert train_local(model, splits.train, cfg, round_index=0).steps == 2
    assert not _equal(before, model.state_dict())


class _ListDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, base: SegmentationDataset) -> None:
        self.items = [base[i] for i in range(len(base))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i]


def test_any_map_style_dataset_gives_the_same_result(splits) -> None:  # type: ignore[no-untyped-def]
    a, b = build_model(SMALL_NET), build_model(SMALL_NET)
    cfg = TrainConfig(batch_size=4)
    assert train_local(a, splits.train, cfg, round_index=1) == train_local(
        b, _ListDataset(splits.train), cfg, round_index=1
    )
    assert _equal(a.state_dict(), b.state_dict())
    assert evaluate(a, splits.test) == evaluate(b, _ListDataset(splits.test), batch_size=3)


def test_evaluate_known_answers() -> None:
    data = _mask_dataset()
    perfect = evaluate(_Oracle(), data, batch_size=2)
    assert perfect == EvalResult(dice=1.0, hd95=0.0, n=3)
    inverted = evaluate(_Oracle(invert=True), data)
    assert inverted.dice == 0.0 and inverted.n == 3
    assert inverted.hd95 > 0.0


def test_evaluate_restores_mode_and_needs_no_grad(splits) -> None:  # type: ignore[no-untyped-def]
    model = build_model(SMALL_NET)
    model.train()
    result = evaluate(model, splits.test, batch_size=5)
    assert model.training
    assert result.n == len(splits.test)
    assert 0.0 <= result.dice <= 1.0 and result.hd95 >= 0.0
    model.eval()
    evaluate(model, splits.test)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_errors(splits) -> None:  # type: ignore[no-untyped-def]
    model = build_model(SMALL_NET)
    empty = SegmentationDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        train_local(model, empty, TrainConfig(), round_index=0)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, empty)
    with pytest.raises(ValueError, match="round_index"):
        train_local(model, splits.train, TrainConfig(), round_index=-1)
    with pytest.raises(ValueError, match="TrainConfig"):
        train_local(model, splits.train, {"lr": 0.1}, round_index=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, splits.test, batch_size=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"local_epochs": 0}, "local_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"seed": -1}, "seed"),
        ({"proximal_mu": -1.0}, "proximal_mu"),
        ({"personal_lambda": -0.1}, "personal_lambda"),
        ({"personal_lambda": float("inf")}, "personal_lambda"),
        ({"personal_lambda": float("nan")}, "personal_lambda"),
        ({"personal_lambda": True}, "personal_lambda"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


def test_config_from_mapping() -> None:
    cfg = TrainConfig.from_mapping({"optimizer": "sgd", "lr": 1, "local_epochs": 2})
    assert cfg == TrainConfig(optimizer=Optimizer.SGD, lr=1.0, local_epochs=2)
    assert TrainConfig.from_mapping(cfg.to_mapping()) == cfg
    ditto = TrainConfig.from_mapping({"personal_lambda": 2})
    assert ditto == TrainConfig(personal_lambda=2.0) and isinstance(ditto.personal_lambda, float)
    assert ditto.to_mapping()["personal_lambda"] == 2.0
    assert TrainConfig.from_mapping(ditto.to_mapping()) == ditto
    with pytest.raises(ValueError, match="'personal_lambda'"):
        TrainConfig.from_mapping({"personal_lambda": "big"})
    with pytest.raises(ValueError, match="'optimizer'"):
        TrainConfig.from_mapping({"optimizer": "rmsprop"})
    with pytest.raises(ValueError, match="'epochs'"):
        TrainConfig.from_mapping({"epochs": 2})


def test_fedprox_descends_the_proximal_objective() -> None:
    """FedProx's rule, checked step by step: with SGD (momentum 0.9) on one full batch for two epochs,
    train_local with proximal_mu = μ gives w2 = w1 − lr·(0.9·g1 + ∇L(w1) + μ(w1 − w0)), where
    w1 = w0 − lr·g1 and g1 = ∇L(w0) (the proximal gradient is 0 at w0)."""
    import copy

    from monai.losses import DiceCELoss

    from fedsilo.models import ModelConfig, SyntheticConfig, TrainConfig, build_model, silo_splits, train_local
    from fedsilo.models.training import Optimizer

    data = silo_splits(SyntheticConfig(seed=0, image_size=32, n_train=4, n_val=0, n_test=0), 0).train
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=(4, 8), strides=(2,)))
    mu, lr = 5.0, 0.05
    cfg = TrainConfig(local_epochs=2, batch_size=4, lr=lr, optimizer=Optimizer.SGD, proximal_mu=mu)
    reference = copy.deepcopy(model)
    train_local(model, data, cfg, round_index=0)

    images, masks = torch.stack([data[i][0] for i in range(4)]), torch.stack([data[i][1] for i in range(4)])
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    params = [p for p in reference.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]

    def grad() -> list[torch.Tensor]:
        reference.zero_grad()
        loss_fn(reference(images), masks).backward()
        return [p.grad.detach().clone() for p in params]

    reference.train()
    g1 = grad()
    with torch.no_grad():
        for p, g in zip(params, g1):
            p -= lr * g
    g2 = grad()
    with torch.no_grad():
        for p, a, b, p0 in zip(params, g1, g2, w0):
            p -= lr * (0.9 * a + b + mu * (p - p0))
    for (name, got), want in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), params):
        assert torch.allclose(got, want, atol=1e-5), name
    # and μ = 0 is plain local training, bit for bit
    torch.manual_seed(0)
    a = build_model(ModelConfig(channels=(4, 8), strides=(2,)))
    b = copy.deepcopy(a)
    train_local(a, data, TrainConfig(local_epochs=1, batch_size=2), round_index=1)
    train_local(b, data, TrainConfig(local_epochs=1, batch_size=2, proximal_mu=0.0), round_index=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _one_batch(n: int = 4):  # type: ignore[no-untyped-def]
    data = silo_splits(SyntheticConfig(seed=0, image_size=32, n_train=n, n_val=0, n_test=0), 0).train
    images, masks = torch.stack([data[i][0] for i in range(n)]), torch.stack([data[i][1] for i in range(n)])
    return data, images, masks


def test_proximal_anchor_replaces_the_start_weights() -> None:
    """With ``anchor`` a, one full-batch SGD step is w1 = w0 − lr·(∇L(w0) + μ(w0 − a)) (momentum
    has no history yet); without it the proximal gradient vanishes at w0 and the step is plain."""
    import copy

    from monai.losses import DiceCELoss

    data, images, masks = _one_batch()
    model = build_model(ModelConfig(channels=(4, 8), strides=(2,)))
    gen = torch.Generator().manual_seed(7)
    anchor = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    anchor["not.a.parameter"] = torch.zeros(3)  # extra entries are ignored
    mu, lr = 4.0, 0.05
    cfg = TrainConfig(batch_size=4, lr=lr, optimizer=Optimizer.SGD, proximal_mu=mu)
    reference = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    train_local(model, data, cfg, round_index=0, anchor=anchor)
    train_local(plain, data, cfg, round_index=0)

    reference.train()
    DiceCELoss(softmax=True, to_onehot_y=True)(reference(images), masks).backward()
    trained, untouched = dict(model.named_parameters()), dict(plain.named_parameters())
    for name, p in reference.named_parameters():
        w0, g = p.detach(), p.grad
        assert torch.allclose(trained[name], w0 - lr * (g + mu * (w0 - anchor[name])), atol=1e-6), name
        assert torch.allclose(untouched[name], w0 - lr * g, atol=1e-6), name
    # the anchor's pull is visible: lr·μ·(w0 − a) = 0.2·0.1·N(0, 1), far above the tolerance
    first = "model.0.conv.unit0.conv.weight"
    assert not torch.allclose(trained[first], untouched[first], atol=1e-3)


def test_bad_anchor_is_rejected_by_name() -> None:
    data, _, _ = _one_batch()
    model = build_model(ModelConfig(channels=(4, 8), strides=(2,)))
    before = _state(model)
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(batch_size=4, optimizer=Optimizer.SGD, lr=0.05, proximal_mu=1.0)
    name = next(iter(full))
    missing = {k: v for k, v in full.items() if k != name}
    with pytest.raises(ValueError, match=f"anchor has no value for trainable parameter '{name}'"):
        train_local(model, data, cfg, round_index=0, anchor=missing)
    bad_shape = {**full, name: torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=rf"anchor of parameter '{name}' has shape \(2, 2\)"):
        train_local(model, data, cfg, round_index=0, anchor=bad_shape)
    with pytest.raises(ValueError, match=f"'{name}'"):  # checked even where μ = 0 would not use it
        train_local(model, data, TrainConfig(batch_size=4), round_index=0, anchor=missing)
    assert _equal(before, model.state_dict())  # rejected before any step
    # a frozen parameter needs no anchor
    dict(model.named_parameters())[name].requires_grad_(False)
    train_local(model, data, cfg, round_index=0, anchor=missing)
    assert not _equal(before, model.state_dict())


def test_bf16_autocast_trains_close_to_float32(splits) -> None:  # type: ignore[no-untyped-def]
    """bfloat16 autocast (on the CPU here, the GPU's path otherwise): float32 weights, another but close
    result, and the same descent; float32 stays the default."""
    from fedsilo.models import Precision

    cfg = TrainConfig(local_epochs=2, batch_size=4, seed=1)
    fp32, bf16, default = (build_model(SMALL_NET) for _ in range(3))
    r32 = train_local(fp32, splits.train, cfg, round_index=0, precision=Precision.FP32)
    r16 = train_local(bf16, splits.train, cfg, round_index=0, precision=Precision.BF16)
    train_local(default, splits.train, cfg, round_index=0)
    assert _equal(_state(default), _state(fp32))
    assert all(v.dtype == torch.float32 for v in bf16.state_dict().values())
    assert not _equal(_state(bf16), _state(fp32))
    assert r16.loss == pytest.approx(r32.loss, rel=0.05)
    with pytest.raises(ValueError, match=r"train_local\.precision must be a Precision \('fp32', 'bf16'\), got 'bf16'"):
        train_local(fp32, splits.train, cfg, round_index=0, precision="bf16")  # type: ignore[arg-type]


class _AddTerm:
    """A local objective (``LocalObjective``): the Task's loss plus ``weight`` times the mean squared
    output, with a forward hook that counts the batches it saw."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.attached = 0
        self.batches = 0

    def attach(self, model: nn.Module, *, device: torch.device, forward):  # type: ignore[no-untyped-def]
        import contextlib

        @contextlib.contextmanager
        def attached():  # type: ignore[no-untyped-def]
            self.attached += 1
            handle = model.register_forward_hook(lambda *_: setattr(self, "batches", self.batches + 1))
            try:
                yield
            finally:
                handle.remove()

        return attached()

    def loss(self, *, model, inputs, targets, output, task_loss):  # type: ignore[no-untyped-def]
        return task_loss(output, targets) + self.weight * output.pow(2).mean()


def test_local_objective_seam(splits) -> None:  # type: ignore[no-untyped-def]
    """An objective whose term is zero trains bit for bit as without one; a non-zero term changes the
    weights and the reported loss; attach wraps the whole call once and its hooks go with it."""
    from fedsilo.models.objective import LocalObjective

    cfg = TrainConfig(batch_size=4)
    plain, zero, term = (build_model(SMALL_NET) for _ in range(3))
    base = train_local(plain, splits.train, cfg, round_index=1)
    nothing = _AddTerm(0.0)
    assert isinstance(nothing, LocalObjective)
    same = train_local(zero, splits.train, cfg, round_index=1, objective=nothing)
    assert _equal(plain.state_dict(), zero.state_dict()) and same == base
    assert nothing.attached == 1 and nothing.batches == 3  # 12 images, batches of 4
    assert not zero._forward_hooks
    other = train_local(term, splits.train, cfg, round_index=1, objective=_AddTerm(1.0))
    assert not _equal(plain.state_dict(), term.state_dict()) and other.loss > base.loss
    with pytest.raises(ValueError, match="objective must be None or a LocalObjective"):
        train_local(build_model(SMALL_NET), splits.train, cfg, round_index=1,
                    objective=object())  # type: ignore[arg-type]


def test_local_objective_seam_under_dp_sgd(splits) -> None:  # type: ignore[no-untyped-def]
    """train_local_dp: a zero term gives the DP-SGD weights bit for bit (same noise seed); a term changes them."""
    from fedsilo.models.dp_training import train_local_dp
    from fedsilo.privacy.dpsgd import DpSgdConfig

    dp = DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=2)
    cfg = TrainConfig()
    plain, zero, term = (build_model(SMALL_NET) for _ in range(3))
    train_local_dp(plain, splits.train, cfg, dp, round_index=1, noise_seed=5)
    nothing = _AddTerm(0.0)
    train_local_dp(zero, splits.train, cfg, dp, round_index=1, noise_seed=5, objective=nothing)
    assert _equal(plain.state_dict(), zero.state_dict())
    assert nothing.attached == 1 and not zero._forward_hooks
    train_local_dp(term, splits.train, cfg, dp, round_index=1, noise_seed=5, objective=_AddTerm(1.0))
    assert not _equal(plain.state_dict(), term.state_dict())
    with pytest.raises(ValueError, match="objective must be None or a LocalObjective"):
        train_local_dp(build_model(SMALL_NET), splits.train, cfg, dp, round_index=1,
                       objective=3)  # type: ignore[arg-type]


class _PublicTerm(_AddTerm):
    """``_AddTerm`` plus a loss on no record: ``weight`` × the sum of squared trainable weights,
    in ``public_loss`` (or, ``inline``, inside every batch's loss instead)."""

    def __init__(self, weight: float, *, inline: bool = False) -> None:
        super().__init__(0.0)
        self.public_weight, self.inline, self.steps_seen = weight, inline, []

    def _term(self, model: nn.Module) -> torch.Tensor:
        return self.public_weight * sum(p.pow(2).sum() for p in model.parameters() if p.requires_grad)

    def loss(self, *, model, inputs, targets, output, task_loss):  # type: ignore[no-untyped-def]
        base = task_loss(output, targets)
        return base + self._term(model) if self.inline else base

    def public_loss(self, model: nn.Module, *, step: int) -> torch.Tensor | None:
        if self.inline:
            return None
        self.steps_seen.append(step)
        return self._term(model)


def test_a_public_loss_adds_its_gradient_to_every_step(splits) -> None:  # type: ignore[no-untyped-def]
    """train_local: a loss on no record given as ``public_loss`` trains as the same term inside each
    batch's loss (up to float summation order), once per step, numbered from 0."""
    cfg = TrainConfig(batch_size=4)
    inline, public = build_model(SMALL_NET), build_model(SMALL_NET)
    train_local(inline, splits.train, cfg, round_index=1, objective=_PublicTerm(1e-3, inline=True))
    term = _PublicTerm(1e-3)
    train_local(public, splits.train, cfg, round_index=1, objective=term)
    assert term.steps_seen == [0, 1, 2]
    for k, v in inline.state_dict().items():
        torch.testing.assert_close(public.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    plain = build_model(SMALL_NET)
    train_local(plain, splits.train, cfg, round_index=1)
    assert not _equal(plain.state_dict(), public.state_dict())


def test_a_public_loss_under_dp_sgd_is_added_after_the_noise(splits) -> None:  # type: ignore[no-untyped-def]
    """train_local_dp: a public term with zero gradient leaves the DP-SGD weights bit for bit; a real one
    changes them, once per step; DpSgdStep adds exactly its autograd gradient to the private one."""
    from fedsilo.models.dp_training import train_local_dp
    from fedsilo.privacy.dpsgd import DpSgdConfig, DpSgdStep, make_private_compatible

    dp = DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=3)
    cfg = TrainConfig()
    plain, zero, term_net = (build_model(SMALL_NET) for _ in range(3))
    train_local_dp(plain, splits.train, cfg, dp, round_index=1, noise_seed=5)
    nothing = _PublicTerm(0.0)
    train_local_dp(zero, splits.train, cfg, dp, round_index=1, noise_seed=5, objective=nothing)
    assert _equal(plain.state_dict(), zero.state_dict()) and nothing.steps_seen == [0, 1, 2]
    train_local_dp(term_net, splits.train, cfg, dp, round_index=1, noise_seed=5, objective=_PublicTerm(1e-2))
    assert not _equal(plain.state_dict(), term_net.state_dict())

    model = make_private_compatible(build_model(SMALL_NET))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    images = torch.stack([splits.train[i][0] for i in range(3)])
    masks = torch.stack([splits.train[i][1] for i in range(3)])
    with DpSgdStep(model, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=3,
                   generator=torch.Generator().manual_seed(0)) as step:
        step.privatize(images, masks)
        private = {n: p.grad.clone() for n, p in model.named_parameters()}
        public = _PublicTerm(0.5)
        assert step.add_public_gradient(lambda: public._term(model))
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, private[n] + 2 * 0.5 * p.detach(), rtol=0, atol=1e-6)
        assert not step.add_public_gradient(lambda: None)
        step.privatize(images, masks)  # Opacus' per-sample state is intact after a public pass
        for n, p in model.named_parameters():
            assert p.grad.shape == p.shape
