"""DP-SGD local training: the agents' training loop with Opacus's per-sample clipping and noise (``fedsilo.privacy.dpsgd``)."""

from __future__ import annotations

import math
import secrets
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fedsilo.core.rng import seeded_global_rng
from fedsilo.models.parallel import DataParallel
from fedsilo.models.objective import LocalObjective, attached, check_objective, public_loss_of
from fedsilo.models.training import (
    TrainConfig,
    TrainResult,
    stack_batch,
    _dataset_len,
    _derived_seed,
    _make_optimizer,
    _seeded_device_rng,
    on_device,
)
from fedsilo.privacy.dpsgd import (
    MAX_SEED,
    TAG_NOISE,
    TAG_SAMPLE,
    DpSgdConfig,
    DpSgdStep,
    poisson_batches,
    secure_generator,
    seeded_generator,
)

__all__ = ["train_local_dp"]


def train_local_dp(
    model: nn.Module,
    dataset: Dataset[tuple[torch.Tensor, torch.Tensor]],
    train_cfg: TrainConfig,
    dp: DpSgdConfig,
    *,
    round_index: int,
    noise_seed: int | None = None,
    task: Any = None,
    device: torch.device | str | None = None,
    parallel: DataParallel | None = None,
    objective: LocalObjective | None = None,
) -> TrainResult:
    """Trains ``model`` in place with ``dp.steps`` DP-SGD steps on Poisson-sampled batches.

    Each step includes every example independently with probability q =
    ``dp.sample_rate`` and applies :class:`DpSgdStep` with expected batch size
    ``max(1, round(q * n))``; an empty draw still takes a noise-only step, as the
    subsampled-Gaussian accounting assumes. The optimiser is ``train_cfg``'s (Adam, or SGD
    with momentum 0.9), fresh per call, over the trainable parameters only (frozen base
    weights, e.g. under LoRA, stay untouched). ``train_cfg.batch_size`` and
    ``local_epochs`` are not used: q and ``dp.steps`` replace them. ``train_cfg.proximal_mu``
    (FedProx) adds μ(w − w⁰) to every DP gradient, w⁰ the weights at the start of the call.

    Randomness:

    * ``noise_seed=None`` (production): the noise comes from a torch generator seeded with
      64 bits of OS entropy (``secrets``) in Opacus' ``secure_mode``; torch's generator is
      not a CSPRNG (torchcsprng is unavailable). The Poisson draws are seeded from OS
      entropy as well: amplification by subsampling, which the accountant's q relies on,
      requires that nobody learns which records a step used, so a sample drawn from the
      (shared, public) config seed would void it.
    * ``noise_seed`` given (tests, debugging): noise from (``noise_seed``, ``round_index``)
      and Poisson draws from (``train_cfg.seed``, ``round_index``), so the same model, data,
      configs and seeds give bit-identical weights.

    Dropout draws come from a forked global RNG seeded from (``train_cfg.seed``,
    ``round_index``) as in :func:`~fedsilo.models.training.train_local`; the caller's RNG is
    untouched. The model is left in training mode with no Opacus hooks or attributes.

    2-D segmentation only, for now: the loss is fixed inside
    :class:`fedsilo.privacy.dpsgd.DpSgdStep` (DiceCE), so a Task's loss and collation
    (:class:`fedsilo.models.tasks.Task`) reach DP-SGD once ``DpSgdStep`` takes a loss function,
    a change to the privacy layer.

    Args:
        model: Opacus-compatible network (see :func:`make_private_compatible`); trained in place.
        dataset: Map-style dataset of the Task's examples (2-D segmentation: ``(image [C, H, W],
            mask [1, H, W])`` pairs).
        train_cfg: Optimiser kind, learning rate and seed.
        dp: Noise multiplier, clip norm, sampling rate and steps.
        round_index: Federated round number (>= 0).
        noise_seed: None for secure randomness, or an int in [0, 2**63 - 1] for reproducibility.
        task: The run's Task (``fedsilo.models.tasks``): its batches (``collate``) and loss (a mean of
            per-example losses); None: 2-D segmentation's, as before Tasks existed.
        device: Where to train (:func:`fedsilo.models.training.resolve_device`): the model is
            moved there for the call (per-sample gradients, clipping and the Gaussian noise, drawn
            by a generator on that device, all run there) and back to its own device afterwards;
            the Poisson draws stay on the CPU. None trains where the model is (the CPU for every
            agent model), as before devices existed; on the CPU, ``"cpu"``, ``"auto"`` and None
            give bit-identical weights for the same ``noise_seed``. The same seed on CUDA draws
            other noise than on the CPU (another generator), with the same distribution.
        parallel: This process's place in a data-parallel group
            (:class:`~fedsilo.models.parallel.DataParallel`; every rank calls with the same
            arguments). Every rank draws the same global Poisson batch (from rank 0's seed: OS
            entropy, or ``train_cfg.seed`` with ``noise_seed``) and keeps its share; each clips
            and sums its own examples' gradients, rank 0 alone adds the noise (from its
            generator, as a single process would), and the sums are added over the group before
            each step. The release and its accounting are those of one process with the same
            q, σ, C and steps; with ``noise_seed`` the weights are the single-process ones up to
            the order of floating-point sums. None: this process alone.
        objective: A method's local objective (:class:`~fedsilo.models.training.LocalObjective`),
            attached around the call; its ``loss`` is the ``loss_fn`` of :class:`DpSgdStep`, so
            each example's clipped gradient is that of its own objective loss. Sound only where
            that loss is a batch mean of per-example losses that read no other record (reference
            models frozen and outside the trained module, no statistic of the data set); a
            method whose objective is not refuses record-level DP. None: the Task's loss, exactly
            as without this argument.

    Returns:
        ``loss``: example-weighted mean loss over the sampled examples (NaN if no step drew
        any; computed without noise, so keep it inside the silo); ``steps``: ``dp.steps``;
        ``examples``: the number of sampled examples, summed over steps.

    Raises:
        ValueError: On bad configs, round index or seed, an empty dataset, a model that
            Opacus cannot handle, a bad or unusable ``device``, or ranks of ``parallel`` that see
            training sets of different sizes.
    """
    if not isinstance(train_cfg, TrainConfig):
        raise ValueError(f"train_cfg must be a TrainConfig, got {type(train_cfg).__name__}")
    if not isinstance(dp, DpSgdConfig):
        raise ValueError(f"dp must be a DpSgdConfig, got {type(dp).__name__}")
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"train_local_dp.round_index must be an int >= 0, got {round_index!r}")
    if noise_seed is not None and (
        isinstance(noise_seed, bool) or not isinstance(noise_seed, int) or not 0 <= noise_seed <= MAX_SEED
    ):
        raise ValueError(f"train_local_dp.noise_seed must be None or an int in [0, 2**63 - 1], got {noise_seed!r}")
    check_objective("train_local_dp", objective)
    n = _dataset_len(dataset)
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    with on_device(model, device) as where:
        if parallel is not None:
            parallel.check_same("the number of training examples", n, where)
        result = _train_local_dp(model, dataset, train_cfg, dp, round_index=round_index, noise_seed=noise_seed,
                                 task=task, n=n, device=where, parallel=parallel, objective=objective)
        if parallel is not None:
            parallel.average_buffers(model, where)
        return result


def _train_local_dp(model: nn.Module, dataset: Dataset[Any], train_cfg: TrainConfig, dp: DpSgdConfig, *,
                    round_index: int, noise_seed: int | None, task: Any, n: int,
                    device: torch.device, parallel: DataParallel | None = None,
                    objective: LocalObjective | None = None) -> TrainResult:
    """:func:`train_local_dp`'s loop, ``model`` already on ``device``."""
    expected = max(1, round(dp.sample_rate * n))
    if noise_seed is None:
        noise_gen = secure_generator(device)
        sample_gen = secure_generator(torch.device("cpu"))
        if parallel is not None:  # one global draw: every rank samples from rank 0's secret seed
            seed0 = parallel.broadcast_int(secrets.randbits(62), device)
            sample_gen = seeded_generator(seed0)
    else:
        noise_gen = seeded_generator(_derived_seed(noise_seed, round_index, TAG_NOISE), device)
        sample_gen = seeded_generator(_derived_seed(train_cfg.seed, round_index, TAG_SAMPLE))
    optimizer = _make_optimizer(model, train_cfg)
    # FedProx: μ(w − w⁰) is added to each DP gradient; it depends on no record (w⁰ is the round's
    # global model, w the result of earlier private steps), so it costs no privacy
    anchor = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad] \
        if train_cfg.proximal_mu else []
    seed = _derived_seed(train_cfg.seed, round_index)
    collate = task.collate if task is not None else stack_batch
    loss_fn = task.loss if task is not None else None
    bound = None
    if objective is not None:
        if loss_fn is None:
            from monai.losses import DiceCELoss

            loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
        bound = loss_fn = _ObjectiveLoss(objective, model, loss_fn)
    empty = tuple(t[:0] for t in collate(dataset, [0], device))
    total_loss = 0.0
    examples = 0
    model.train()
    forward = task.forward if task is not None else _plain_forward
    with seeded_global_rng(seed ^ 0x5DEECE66D), _seeded_device_rng(device, seed ^ 0x5DEECE66D), \
            attached(objective, model, device, forward):
        with DpSgdStep(
            model,
            optimizer,
            max_grad_norm=dp.max_grad_norm,
            noise_multiplier=dp.noise_multiplier,
            expected_batch_size=expected,
            generator=noise_gen,
            loss_fn=loss_fn,
            distributed=parallel is not None,
        ) as stepper:
            public = getattr(objective, "public_loss", None) is not None
            for step, drawn in enumerate(poisson_batches(n, dp.sample_rate, dp.steps, sample_gen)):
                indices = parallel.share(drawn) if parallel is not None else drawn
                images, masks = collate(dataset, indices, device) if indices else empty
                if bound is not None:
                    bound.inputs = images
                if anchor or public:
                    loss = stepper.privatize(images, masks)
                    if public:  # a loss on no record (FedBM's pseudo-samples): post-processing, no ε
                        stepper.add_public_gradient(lambda: public_loss_of(objective, model, step=step))
                    for p, p0 in anchor:
                        if p.grad is not None:
                            p.grad.add_(p.detach() - p0, alpha=train_cfg.proximal_mu)
                    optimizer.step()
                else:
                    loss = stepper.step(images, masks)
                if indices:
                    total_loss += loss * len(indices)
                    examples += len(indices)
    if parallel is not None:
        total_loss, total = parallel.sum_floats([total_loss, examples], device)
        examples = int(total)
    model.train()
    return TrainResult(loss=total_loss / examples if examples else math.nan, steps=dp.steps, examples=examples)


def _plain_forward(model: nn.Module, inputs: Any) -> Any:
    return model(inputs)


class _ObjectiveLoss:
    """A local objective as :class:`DpSgdStep`'s ``loss_fn(output, targets)``: the batch's inputs,
    which the objective's reference models read, are set before each step (``inputs``)."""

    def __init__(self, objective: LocalObjective, model: nn.Module, task_loss: Any) -> None:
        self.objective, self.model, self.task_loss = objective, model, task_loss
        self.inputs: Any = None

    def __call__(self, output: Any, targets: Any) -> torch.Tensor:
        return self.objective.loss(model=self.model, inputs=self.inputs, targets=targets, output=output,
                                   task_loss=self.task_loss)
