"""The species-aware 1-D CNN of the sensor Task: SPConv and per-species norms (CKSP, Mao et al., arXiv:2410.16644)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedsilo.core.validators import MappingConfig, check_enum, check_int, check_seed
from fedsilo.models.sensor_data import BEHAVIOURS, BUILTIN_SPECIES, SENSOR_CHANNELS, SensorInputs, check_species_name

__all__ = [
    "SPConv",
    "SensorNet",
    "SensorNetConfig",
    "SensorNorm",
    "SpeciesBlock",
    "build_sensor_net",
    "is_adapter",
    "is_species_norm",
    "species_of_param",
]

_SPECIES_PART = re.compile(r"(?:^|\.)(adapters|norms)\.([^.]+)\.")


def species_of_param(name: str) -> str | None:
    """The species a ``state_dict`` entry belongs to (``...adapters.<s>.`` or ``...norms.<s>.``), else None."""
    m = _SPECIES_PART.search(name)
    return m.group(2) if m else None


def is_adapter(name: str) -> bool:
    """Whether ``name`` is a tensor of a species' low-rank convolution (``...adapters.<s>.down|up...``)."""
    m = _SPECIES_PART.search(name)
    return m is not None and m.group(1) == "adapters"


def is_species_norm(name: str) -> bool:
    """Whether ``name`` is a tensor (weight, bias or statistic) of a species' norm (``...norms.<s>....``)."""
    m = _SPECIES_PART.search(name)
    return m is not None and m.group(1) == "norms"


class SensorNorm(enum.Enum):
    """The per-species normalisation of :class:`SensorNet`."""

    SBN = "sbn"  # Species-specific BatchNorm1d (CKSP's SBN); not DP-SGD compatible
    SGN = "sgn"  # species-specific GroupNorm: per-example statistics, DP-SGD compatible


@dataclass(frozen=True, kw_only=True)
class SensorNetConfig(MappingConfig):
    """The sensor network: SPConv blocks with per-species norms, global average pooling, a shared linear head.

    Attributes:
        species: The run's species, in a fixed order (every silo builds the same network); a
            silo's examples must be of one of them. Names: lower-case letters, digits, ``_``.
        in_channels: Channels of a window (C).
        n_classes: Behaviour classes.
        channels: Output channels of each block (>= 1 block).
        kernel: Odd kernel size of the convolutions.
        rank: Rank r of each species' low-rank convolution (1 <= r <= every block's channels).
        norm: ``"sbn"`` (per-species BatchNorm, default) or ``"sgn"`` (per-species GroupNorm; use
            it under record-level DP, where BatchNorm has no per-example gradients).
        norm_groups: Groups of ``"sgn"``; must divide every entry of ``channels``.
        seed: Seed of the initial weights.
    """

    species: tuple[str, ...] = BUILTIN_SPECIES
    in_channels: int = SENSOR_CHANNELS
    n_classes: int = len(BEHAVIOURS)
    channels: tuple[int, ...] = (32, 64)
    kernel: int = 5
    rank: int = 4
    norm: SensorNorm = SensorNorm.SBN
    norm_groups: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.species, tuple) or not self.species:
            raise ValueError(f"{owner}.species must be a non-empty list of species names, got {self.species!r}")
        for name in self.species:
            check_species_name(f"{owner}.species", name)
        if len(set(self.species)) != len(self.species):
            raise ValueError(f"{owner}.species must be distinct, got {list(self.species)}")
        check_int(owner, "in_channels", self.in_channels, minimum=1)
        check_int(owner, "n_classes", self.n_classes, minimum=2)
        if not isinstance(self.channels, tuple) or not self.channels:
            raise ValueError(f"{owner}.channels must be a non-empty list of widths, got {self.channels!r}")
        for width in self.channels:
            check_int(owner, "channels", width, minimum=1)
        check_int(owner, "kernel", self.kernel, minimum=1)
        if self.kernel % 2 == 0:
            raise ValueError(f"{owner}.kernel must be odd (same-length padding), got {self.kernel}")
        check_int(owner, "rank", self.rank, minimum=1)
        if self.rank > min(self.channels):
            raise ValueError(f"{owner}.rank={self.rank} must be <= every entry of channels {list(self.channels)}")
        check_enum(owner, "norm", self.norm, SensorNorm)
        check_int(owner, "norm_groups", self.norm_groups, minimum=1)
        if self.norm is SensorNorm.SGN and any(w % self.norm_groups for w in self.channels):
            raise ValueError(f"{owner}.norm_groups={self.norm_groups} must divide every entry of channels "
                             f"{list(self.channels)}")
        check_seed(owner, "seed", self.seed)


class _LowRank(nn.Module):
    """One species' low-rank convolution: ``up(down(x))``, ``up`` zero at initialisation."""

    def __init__(self, c_in: int, c_out: int, kernel: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Conv1d(c_in, rank, kernel, padding=kernel // 2, bias=False)
        self.up = nn.Conv1d(rank, c_out, 1, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class SPConv(nn.Module):
    """CKSP's Shared-Preserved Convolution (SPConv): ``shared(x) + adapters[s](x)``.

    ``shared`` is a full-rank ``Conv1d`` every species uses; ``adapters[s]`` is species ``s``'s
    low-rank ``Conv1d`` pair (``down``: C_in -> r, kernel k; ``up``: r -> C_out, kernel 1, zero
    at initialisation, so the module starts as the shared convolution). Every species' adapter
    runs on the whole batch and is masked to its own examples, so each trainable tensor takes
    part in every forward pass (per-example gradients for DP-SGD; zero for the other species).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, rank: int, species: tuple[str, ...]) -> None:
        super().__init__()
        self.shared = nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
        self.adapters = nn.ModuleDict({s: _LowRank(c_in, c_out, kernel, rank) for s in species})

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, C_in, T]``; ``onehot`` ``[N, S]`` float, row i the one-hot species of example i."""
        out = self.shared(x)
        for j, adapter in enumerate(self.adapters.values()):
            out = out + onehot[:, j, None, None] * adapter(x)
        return out


class SpeciesBlock(nn.Module):
    """SPConv, the example's species norm (``norms[s]``), ReLU."""

    def __init__(self, c_in: int, c_out: int, cfg: SensorNetConfig) -> None:
        super().__init__()
        self.conv = SPConv(c_in, c_out, cfg.kernel, cfg.rank, cfg.species)
        if cfg.norm is SensorNorm.SBN:
            self.norms = nn.ModuleDict({s: nn.BatchNorm1d(c_out) for s in cfg.species})
        else:
            self.norms = nn.ModuleDict({s: nn.GroupNorm(cfg.norm_groups, c_out) for s in cfg.species})
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, onehot: torch.Tensor, species_idx: torch.Tensor) -> torch.Tensor:
        h = self.conv(x, onehot)
        out: torch.Tensor | None = None
        for j, norm in enumerate(self.norms.values()):
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                # batch statistics: only the species' own examples may enter (and update its running stats)
                rows = (species_idx == j).nonzero().flatten()
                if rows.numel():
                    part = torch.zeros_like(h).index_copy(0, rows, norm(h.index_select(0, rows)))
                    out = part if out is None else out + part
            else:  # per-example statistics (GroupNorm, also what Opacus' fix makes of BatchNorm): mask
                part = onehot[:, j, None, None] * norm(h)
                out = part if out is None else out + part
        return self.act(out if out is not None else torch.zeros_like(h))


class SensorNet(nn.Module):
    """CKSP's species-aware 1-D CNN (Mao et al., "CKSP: Cross-species Knowledge Sharing and Preserving
    for Universal Animal Activity Recognition", arXiv:2410.16644): SPConv blocks, species norms, max-pooling by 2
    between blocks, global average pooling and a shared linear classifier ``head``.

    ``state_dict`` names: ``blocks.<i>.conv.shared.weight``, ``blocks.<i>.conv.adapters.<s>.down.weight``,
    ``blocks.<i>.conv.adapters.<s>.up.weight``, ``blocks.<i>.norms.<s>.weight|bias|running_mean|...``,
    ``head.weight``, ``head.bias`` (see :func:`species_of_param`).

    Attributes:
        species: The species, in the order ``species_idx`` indexes.
    """

    def __init__(self, cfg: SensorNetConfig) -> None:
        super().__init__()
        self.species = cfg.species
        widths = (cfg.in_channels, *cfg.channels)
        self.blocks = nn.ModuleList(SpeciesBlock(widths[i], widths[i + 1], cfg) for i in range(len(cfg.channels)))
        self.pool = nn.MaxPool1d(2, ceil_mode=True)
        self.head = nn.Linear(cfg.channels[-1], cfg.n_classes)

    def _species_index(self, x: Any, species_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows and each one's index into :attr:`species`, from ``(x, species_idx)`` or a :class:`SensorInputs`."""
        if isinstance(x, SensorInputs):
            if species_idx is not None:
                raise ValueError("pass SensorInputs alone, or a tensor with species_idx")
            missing = [s for s in x.names if s not in self.species]
            if missing:
                raise ValueError(f"species {missing} of the data are not among the network's species "
                                 f"{list(self.species)}; add them to the model's species list")
            lookup = torch.tensor([self.species.index(s) for s in x.names] or [0], dtype=torch.int64,
                                  device=x.x.device)
            return x.x, lookup[x.species_idx]
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a tensor [N, C, T], got {getattr(x, 'shape', type(x).__name__)}")
        if not isinstance(species_idx, torch.Tensor) or species_idx.dtype != torch.int64 \
                or tuple(species_idx.shape) != (x.shape[0],):
            raise ValueError(f"species_idx must be an int64 tensor [N] with N = {x.shape[0]}, "
                             f"got {getattr(species_idx, 'dtype', None)} {tuple(getattr(species_idx, 'shape', ()))}")
        if species_idx.numel() and (int(species_idx.min()) < 0 or int(species_idx.max()) >= len(self.species)):
            raise ValueError(f"species_idx must lie in [0, {len(self.species)}) (species {list(self.species)})")
        return x, species_idx

    def forward(self, x: torch.Tensor | SensorInputs, species_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[N, n_classes]``.

        Args:
            x: Windows ``[N, C, T]``, or the :class:`SensorInputs` of a collated batch (its species
                names are mapped onto :attr:`species`).
            species_idx: With a tensor ``x``: each window's species, int64 ``[N]`` indexing :attr:`species`.

        Raises:
            ValueError: On bad shapes, an index out of range, or a species the network lacks.
        """
        h, idx = self._species_index(x, species_idx)
        onehot = nn.functional.one_hot(idx, len(self.species)).to(h.dtype)
        for i, block in enumerate(self.blocks):
            if i:
                h = self.pool(h)
            h = block(h, onehot, idx)
        return self.head(h.mean(dim=2))


def build_sensor_net(cfg: SensorNetConfig) -> SensorNet:
    """:class:`SensorNet` of ``cfg`` with initial weights from ``cfg.seed``, in training mode."""
    from fedsilo.core.rng import seeded_global_rng

    with seeded_global_rng(cfg.seed):
        model = SensorNet(cfg)
    return model.train()
