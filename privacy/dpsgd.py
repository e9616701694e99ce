"""Record-level DP-SGD on one silo (Abadi et al. 2016) with Opacus: Poisson batches, per-sample clipping, noise."""

from __future__ import annotations

import functools
import math
import numbers
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# torch, Opacus and MONAI are imported inside the functions that use them, so that the
# torch-free coordinator can import this module (e.g. for `DpSgdConfig`) without them.
if TYPE_CHECKING:
    import torch
    from torch import nn

from fedsilo.privacy.grad_samplers import (
    _compatibility_problems,
    make_private_compatible,
    register_grad_samplers,
)

__all__ = [
    "DpSgdConfig",
    "DpSgdStep",
    "dp_sgd_gradients",
    "make_private_compatible",
    "register_grad_samplers",
    "HOOK_WARNING",
    "poisson_batches",
    "secure_generator",
    "seeded_generator",
]

TAG_SAMPLE = 0x5A3B
TAG_NOISE = 0x9015
MAX_SEED = 2**63 - 1
HOOK_WARNING = r"Full backward hook is firing when gradients are computed with respect to module outputs"


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_noise_multiplier(owner: str, value: object) -> float:
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) < 0.0:  # type: ignore[arg-type]
        raise ValueError(f"{owner}.noise_multiplier must be a finite number >= 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _check_max_grad_norm(owner: str, value: object) -> float:
    if not _is_real(value) or math.isnan(float(value)) or not float(value) > 0.0:  # type: ignore[arg-type]
        raise ValueError(f"{owner}.max_grad_norm must be a number > 0 (math.inf: clipping off), got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _check_noise_needs_clipping(owner: str, noise_multiplier: float, max_grad_norm: float) -> None:
    if math.isinf(max_grad_norm) and noise_multiplier != 0.0:
        raise ValueError(
            f"{owner}.noise_multiplier must be 0 when max_grad_norm is inf (clipping off), got "
            f"{noise_multiplier!r}: the noise std noise_multiplier * max_grad_norm would be infinite"
        )


def _check_count(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{owner}.{name} must be an int >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class DpSgdConfig:
    """Settings of record-level DP-SGD (Abadi et al. 2016, Algorithm 1) for one call (one round).

    Each of ``steps`` steps draws a Poisson batch (every local example independently with
    probability ``sample_rate``), clips every example's gradient to L2 norm
    ``max_grad_norm``, sums, adds N(0, (noise_multiplier * max_grad_norm)^2) per coordinate
    and divides by the expected batch size. The accountant of
    :mod:`fedsilo.privacy.accounting` charges this as a subsampled Gaussian with q =
    ``sample_rate``, σ = ``noise_multiplier`` and ``steps`` steps.

    Attributes:
        noise_multiplier: σ >= 0, the noise std divided by the clip norm. 0 is accepted here
            for tests (no privacy); production privacy configs are validated elsewhere.
        max_grad_norm: C > 0, the per-example clip norm; ``math.inf`` turns clipping off,
            which is only allowed together with ``noise_multiplier == 0``.
        sample_rate: q in (0, 1], the Poisson sampling rate of each step.
        steps: Optimiser steps per call (>= 1).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        owner = type(self).__name__
        sigma = _check_noise_multiplier(owner, self.noise_multiplier)
        clip = _check_max_grad_norm(owner, self.max_grad_norm)
        _check_noise_needs_clipping(owner, sigma, clip)
        q = self.sample_rate
        if not _is_real(q) or not math.isfinite(float(q)) or not 0.0 < float(q) <= 1.0:  # type: ignore[arg-type]
            raise ValueError(f"{owner}.sample_rate must be a number in (0, 1], got {q!r}")
        _check_count(owner, "steps", self.steps)


# ---------------------------------------------------------------------------------------
# One DP-SGD step
# ---------------------------------------------------------------------------------------


@functools.cache
def _dp_optimizer_class(distributed: bool = False) -> type:
    """Opacus' DPOptimizer, made to accept σ = 0 with C = inf and to draw the noise in one call.

    * σ = 0: the clipped sum is used as is (Opacus would draw std 0 * inf = NaN for C = inf).
    * σ > 0: Opacus' own sampler (``_generate_noise``, with ``secure_mode``: one discarded
      draw, then the sum of four N(0, std²) draws halved per coordinate) is called once for
      one flat vector of all trainable coordinates instead of once per tensor, which is
      then split into the tensors. Each coordinate gets the same distribution from the same
      generator as in Opacus' ``add_noise``; only the per-call overhead (55 tensors in the
      demo UNet) goes away. Tensors of mixed dtype or device fall back to Opacus' loop.

    ``distributed``: Opacus' ``DistributedDPOptimizer`` on top (data-parallel training in the
    default ``torch.distributed`` group): each rank clips and sums its own examples' gradients,
    rank 0 alone adds the noise, and the ranks' scaled sums are averaged over the group in one
    all-reduce (Opacus reduces tensor by tensor); with each rank's divisor set to the global
    expected batch size over the group's size, every rank applies (Σ_i clip_C(g_i) + N(0, σ²C²))
    / expected batch size over the global batch, as a single process does.
    """
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.ddpoptimizer import DistributedDPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

    class _DPOptimizer(DPOptimizer):  # type: ignore[misc]
        def add_noise(self) -> None:
            if self.noise_multiplier == 0.0:
                for p in self.params:
                    p.grad = p.summed_grad.clone().view_as(p)
                return
            sums = [p.summed_grad for p in self.params]
            if len({(s.dtype, s.device) for s in sums}) != 1:
                super().add_noise()
                return
            for s in sums:
                _check_processed_flag(s)
            noise = _generate_noise(
                std=self.noise_multiplier * self.max_grad_norm,
                reference=sums[0].new_empty(sum(s.numel() for s in sums)),
                generator=self.generator,
                secure_mode=self.secure_mode,
            )
            for p, s, chunk in zip(self.params, sums, noise.split([s.numel() for s in sums]), strict=True):
                p.grad = (s + chunk.view_as(s)).view_as(p)
                _mark_as_processed(s)

    if not distributed:
        return _DPOptimizer

    class _DistributedDPOptimizer(DistributedDPOptimizer, _DPOptimizer):  # type: ignore[misc]
        # MRO: Opacus' rank-0-only add_noise, then ours (σ = 0, one flat draw), then Opacus'.
        def add_noise(self) -> None:
            if self.rank == 0:
                super().add_noise()
            else:
                for p in self.params:
                    p.grad = p.summed_grad.clone().view_as(p)
                    _mark_as_processed(p.summed_grad)

        def reduce_gradients(self) -> None:
            import torch
            import torch.distributed as dist

            grads = [p.grad for p in self.params if p.requires_grad]
            if not grads:
                return
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            if self.loss_reduction == "mean":
                flat /= self.world_size
            for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(part.view_as(g))

    return _DistributedDPOptimizer


def secure_generator(device: torch.device) -> torch.Generator:
    """A torch generator on ``device`` seeded with 64 bits from the OS CSPRNG (``secrets``)."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(64))
    return gen


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _trainable(model: nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class DpSgdStep:
    """Opacus' DP-SGD machinery attached to one model and optimiser; use as a context manager.

    Per-sample gradients come from ``opacus.GradSampleModule`` (hooks, ``loss_reduction="mean"``:
    the batch-mean loss's backprops are scaled back up by the actual batch size, so each
    example's gradient is that of its own loss). An ``opacus.optimizers.DPOptimizer`` around
    ``optimizer`` clips each example's gradient over all trainable tensors jointly to L2 norm
    C (factor ``min(1, C / (norm + 1e-6))``, Opacus' form of Abadi et al. 2016's
    ``max(1, norm / C)``), sums, adds N(0, (σC)^2) per coordinate and divides by
    ``expected_batch_size``. Noise is drawn in Opacus' ``secure_mode`` (a sum of four
    Gaussians, against floating-point attacks on the sampler) from ``generator``, in one
    call for all trainable coordinates.

    Per-sample gradients of ``nn.PReLU`` and ``nn.ConvTranspose*d`` come from the exact
    closed-form rules of :func:`register_grad_samplers` (registered on construction)
    instead of Opacus' slower functorch fallback.

    The loss is ``loss_fn`` (a Task's loss), by default MONAI's
    ``DiceCELoss(softmax=True, to_onehot_y=True)`` of 2-D segmentation, as in
    :func:`fedsilo.models.training.train_local`. It must be a batch mean of per-example losses
    (DiceCE is: Dice per image and class; cross-entropy a pixel mean over equal-size images), so
    per-example gradients are well defined. An empty batch gives a noise-only step.

    The model is trained in place and never wrapped for the caller: :meth:`close` (or leaving
    the ``with`` block) removes every hook and Opacus attribute, so ``state_dict`` keys and
    behaviour are those of the plain model. Only parameters with ``requires_grad`` are
    touched; ``optimizer`` must hold exactly those (e.g. only the LoRA tensors of a model with
    a frozen base).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: int,
        generator: torch.Generator | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        distributed: bool = False,
    ) -> None:
        """Attaches the hooks and wraps the optimiser.

        Args:
            model: The network, Opacus-compatible (see :func:`make_private_compatible`); set to
                training mode while attached, its previous mode is restored by :meth:`close`.
            optimizer: Optimiser over the model's trainable parameters (e.g. plain SGD or Adam).
            max_grad_norm: C > 0; ``math.inf`` turns clipping off (then σ must be 0).
            noise_multiplier: σ >= 0.
            expected_batch_size: The divisor of the clipped, noised sum (q times the dataset
                size for Poisson sampling), >= 1.
            generator: Source of the noise; None draws a fresh generator seeded with 64 bits
                from the OS CSPRNG. torch's CPU generator is a Mersenne Twister, not a CSPRNG
                (a CSPRNG needs torchcsprng, which this torch build lacks).
            loss_fn: ``(model output, targets) -> batch mean of per-example losses``; None: DiceCE.
            distributed: data-parallel training in the default ``torch.distributed`` group (every
                rank builds its step with the same arguments and feeds it its own share of each
                batch): rank 0 alone adds the noise, the ranks' gradients are summed before every
                step, and ``expected_batch_size`` is that of the global batch, so the update and its
                privacy accounting are those of one process drawing the global batch.

        Raises:
            ValueError: On bad numbers, an Opacus-incompatible model, or an optimiser whose
                parameters are not exactly the model's trainable ones.
        """
        from opacus.grad_sample import GradSampleModule

        register_grad_samplers()
        owner = type(self).__name__
        self.max_grad_norm = _check_max_grad_norm(owner, max_grad_norm)
        self.noise_multiplier = _check_noise_multiplier(owner, noise_multiplier)
        _check_noise_needs_clipping(owner, self.noise_multiplier, self.max_grad_norm)
        self.expected_batch_size = _check_count(owner, "expected_batch_size", expected_batch_size)
        problems = _compatibility_problems(model)
        if problems:
            raise ValueError(
                "model is not Opacus-compatible (call make_private_compatible first): " + "; ".join(problems)
            )
        trainable = {id(p) for _, p in _trainable(model)}
        in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
        if not in_optimizer or {id(p) for p in in_optimizer} != trainable or len(in_optimizer) != len(trainable):
            raise ValueError("optimizer must hold exactly the model's trainable parameters, each once")
        device = in_optimizer[0].device
        self._model = model
        self._was_training = model.training
        self._optimizer = optimizer
        model.train()
        self._distributed = bool(distributed)
        world = 1
        if self._distributed:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise ValueError("DpSgdStep(distributed=True) needs an initialised torch.distributed process group")
            world = dist.get_world_size()
        self._gsm: Any = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        try:
            self._dp_optimizer: Any = _dp_optimizer_class(self._distributed)(
                optimizer,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                # each rank divides its share by this; their mean over the group is then the
                # global sum over the global expected batch size
                expected_batch_size=self.expected_batch_size / world if world > 1 else self.expected_batch_size,
                loss_reduction="mean",
                generator=generator if generator is not None else secure_generator(device),
                secure_mode=True,
            )
        except BaseException:
            self.close()
            raise
        if loss_fn is None:
            from monai.losses import DiceCELoss

            loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
        self._loss_fn = loss_fn

    def __enter__(self) -> DpSgdStep:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run (the step can no longer be used)."""
        return self._gsm is None

    def _per_sample_gradients(self, images: torch.Tensor, masks: torch.Tensor) -> float:
        """Sets ``p.grad_sample`` of every trainable parameter; returns the batch-mean loss."""
        if self._gsm is None:
            raise ValueError("DpSgdStep is closed")
        if images.shape[0] != masks.shape[0]:
            raise ValueError(f"images ({images.shape[0]}) and masks ({masks.shape[0]}) differ in batch size")
        self._dp_optimizer.zero_grad(set_to_none=True)
        params = self._dp_optimizer.params
        if images.shape[0] == 0:
            # Noise-only step: Opacus clips an empty stack of per-sample gradients to a zero sum.
            for p in params:
                p.grad_sample = p.new_zeros((0, *p.shape))
            return math.nan
        with warnings.catch_warnings():
            # The first layer's input never requires grad; Opacus only needs output grads.
            warnings.filterwarnings("ignore", message=HOOK_WARNING, category=UserWarning)
            loss = self._loss_fn(self._gsm(images), masks)
            loss.backward()
        for name, p in _trainable(self._model):
            if getattr(p, "grad_sample", None) is None:
                raise ValueError(f"parameter {name!r} got no per-sample gradient (unused in forward?)")
        return float(loss.detach())

    def privatize(self, images: torch.Tensor, masks: torch.Tensor) -> float:
        """Sets ``p.grad`` of every trainable parameter to the DP gradient of this batch.

        The DP gradient is (Σ_i clip_C(g_i) + N(0, (σC)^2 I)) / expected_batch_size, where g_i
        is example i's gradient (Abadi et al. 2016, Algorithm 1). The weights are not changed.

        Args:
            images: ``[B, C, H, W]`` float images; ``B`` may be 0 (noise only).
            masks: ``[B, 1, H, W]`` int64 labels.

        Returns:
            The batch-mean loss (NaN for an empty batch). It is computed from private data
            without noise: keep it inside the silo.
        """
        loss = self._per_sample_gradients(images, masks)
        if self._dp_optimizer.pre_step() and self._distributed:
            self._dp_optimizer.reduce_gradients()
        return loss

    def add_public_gradient(self, loss: Callable[[], torch.Tensor | None]) -> bool:
        """Adds the gradient of a loss on no record to ``p.grad`` (after :meth:`privatize`).

        ``loss()`` runs with Opacus' hooks off (it records no activations and no per-sample
        gradient), and its gradient is added as it is: no clipping, no noise. Sound only for a
        loss that reads no record of the private dataset (e.g. pseudo-samples of a generator trained
        on a federation's aggregate): then the update is post-processing of the DP gradient and of
        the earlier DP steps, like FedProx's proximal term.

        Args:
            loss: Computes the scalar loss from the model (or returns None: nothing to add).

        Returns:
            Whether a gradient was added.
        """
        import torch

        if self._gsm is None:
            raise ValueError("DpSgdStep is closed")
        params = list(self._dp_optimizer.params)
        self._gsm.disable_hooks()
        try:
            with warnings.catch_warnings():  # as in _per_sample_gradients: the input never requires grad
                warnings.filterwarnings("ignore", message=HOOK_WARNING, category=UserWarning)
                value = loss()
                if value is None:
                    return False
                grads = torch.autograd.grad(value, params, allow_unused=True)
        finally:
            self._gsm.enable_hooks()
        for p, g in zip(params, grads, strict=True):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g.detach())
        return True

    def step(self, images: torch.Tensor, masks: torch.Tensor) -> float:
        """:meth:`privatize`, then one step of the wrapped optimiser; returns the batch-mean loss."""
        loss = self._per_sample_gradients(images, masks)
        self._dp_optimizer.step()
        return loss

    def close(self) -> None:
        """Detaches Opacus from the model (hooks, per-sample state) and restores its mode.

        ``p.grad`` keeps the last DP gradient. Idempotent.
        """
        gsm = self._gsm
        if gsm is None:
            return
        self._gsm = None
        gsm._close()  # removes hooks and grad_sample/_forward_counter/... attributes
        for p in self._model.parameters():
            for attr in ("summed_grad", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        for module in self._model.modules():
            for attr in ("activations", "max_batch_len", "ft_compute_sample_grad"):
                if attr in module.__dict__:
                    delattr(module, attr)
        self._model.train(self._was_training)


def dp_sgd_gradients(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: int,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Returns the gradient that one DP-SGD step would apply for this batch (see :class:`DpSgdStep`).

    That is (Σ_i clip_C(g_i) + N(0, (σC)^2 I)) / expected_batch_size per trainable tensor
    (Abadi et al. 2016). The model's weights, gradients and mode are left as they were.

    Args:
        model: Opacus-compatible network.
        images: ``[B, C, H, W]`` images (``B`` may be 0).
        masks: ``[B, 1, H, W]`` labels.
        max_grad_norm: C > 0, or ``math.inf`` (then σ must be 0).
        noise_multiplier: σ >= 0.
        expected_batch_size: Divisor of the sum, >= 1.
        generator: Noise source; None for a fresh OS-seeded one.

    Returns:
        ``{parameter name: DP gradient}`` for every trainable parameter, names as in
        ``model.named_parameters()``.
    """
    import torch

    params = _trainable(model)
    if not params:
        raise ValueError("model has no trainable parameters")
    saved = [p.grad for _, p in params]
    scratch = torch.optim.SGD([p for _, p in params], lr=0.0)  # never stepped
    try:
        with DpSgdStep(
            model,
            scratch,
            max_grad_norm=max_grad_norm,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
            generator=generator,
        ) as step:
            step.privatize(images, masks)
            return {name: p.grad.detach().clone() for name, p in params}
    finally:
        for (_, p), g in zip(params, saved, strict=True):
            p.grad = g


# ---------------------------------------------------------------------------------------
# Local training
# ---------------------------------------------------------------------------------------


def poisson_batches(n: int, q: float, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    import torch

    for _ in range(steps):
        yield torch.nonzero(torch.rand(n, generator=generator) < q).flatten().tolist()
