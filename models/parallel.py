"""Data-parallel local training: which share of each batch this process trains, and how the shares' gradients are summed.

A silo with several GPUs (``[agent] gpus``) trains each round in a ``torch.distributed``
group started by ``torchrun``. Every rank draws the same global batch (same seed, same data),
keeps the examples ``batch[rank::world]`` and back-propagates its share of the batch loss;
one all-reduce then sums the gradients, so every rank applies the gradient of the global
batch. That is the arithmetic of ``torch.nn.parallel.DistributedDataParallel`` (and of
Opacus' ``DistributedDPOptimizer``), done explicitly so that a rank whose share of a small
batch is empty still takes part, and so that the global batch is the single-process one: the
same data, seed and config give the single-process weights up to the order of floating-point
sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DataParallel"]


@dataclass(frozen=True, kw_only=True)
class DataParallel:
    """This process's place in the default ``torch.distributed`` process group.

    Attributes:
        rank: this process's rank, in [0, world).
        world: the number of processes (>= 2).
    """

    rank: int
    world: int

    def __post_init__(self) -> None:
        if isinstance(self.world, bool) or not isinstance(self.world, int) or self.world < 2:
            raise ValueError(f"DataParallel.world must be an integer >= 2, got {self.world!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world:
            raise ValueError(f"DataParallel.rank must be an integer in [0, {self.world}), got {self.rank!r}")

    @classmethod
    def current(cls) -> DataParallel | None:
        """The group this process belongs to, or None outside one (or in a group of one)."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
            return None
        return cls(rank=dist.get_rank(), world=dist.get_world_size())

    def share(self, batch: Sequence[int]) -> list[int]:
        """This rank's examples of the global ``batch``: every ``world``-th one from position ``rank``."""
        return list(batch[self.rank :: self.world])

    def sum_gradients(self, params: Sequence[nn.Parameter], device: torch.device) -> None:
        """Sums ``p.grad`` over the group, in one all-reduce; every rank ends with the same gradients.

        A parameter without a gradient on some rank (an empty share, or not reached by the
        forward pass) counts as zero there; one without a gradient on every rank keeps none, as
        in single-process training (optimisers skip it).
        """
        import torch.distributed as dist

        if not params:
            return
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=device)
                 for p in params]
        dtypes = {t.dtype for t in parts}
        if len(dtypes) != 1:
            raise ValueError(f"data-parallel training needs one gradient dtype, got {sorted(map(str, dtypes))}")
        flat = torch.cat([*parts, present.to(parts[0].dtype)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        pos = 0
        for p in params:
            n = p.numel()
            p.grad = flat[pos : pos + n].view_as(p).clone()
            pos += n
        for p, count in zip(params, flat[pos:].tolist(), strict=True):
            if count == 0:
                p.grad = None

    def sum_floats(self, values: Sequence[float], device: torch.device) -> list[float]:
        """``values`` summed element-wise over the group (float64), e.g. loss sums and example counts."""
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.tolist()]

    def broadcast_int(self, value: int, device: torch.device) -> int:
        """Rank 0's ``value`` (an int64) on every rank."""
        import torch.distributed as dist

        t = torch.tensor([value if self.rank == 0 else 0], dtype=torch.int64, device=device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def average_buffers(self, model: nn.Module, device: torch.device) -> None:
        """Replaces every floating-point buffer (e.g. BatchNorm running statistics, which each rank
        computes on its own share) by its mean over the group, so every rank holds the same model."""
        import torch.distributed as dist

        bufs = [b for b in model.buffers() if b.is_floating_point()]
        if not bufs:
            return
        flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in bufs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        pos = 0
        with torch.no_grad():
            for b in bufs:
                b.copy_(flat[pos : pos + b.numel()].view_as(b).to(b.dtype))
                pos += b.numel()

    def check_same(self, what: str, value: int, device: torch.device) -> None:
        """Raises unless every rank passes the same ``value`` (e.g. its training set's size).

        Raises:
            ValueError: naming ``what`` and the smallest and largest values seen.
        """
        import torch.distributed as dist

        t = torch.tensor([value, -value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        hi, lo = int(t[0].item()), -int(t[1].item())
        if hi != lo:
            raise ValueError(f"the training group's ranks disagree on {what}: from {lo} to {hi}; every rank "
                             "must load the same data")
