"""The Task seam: the abstract base class of a kind of work, its data spec, and the registry of Tasks.

A Task owns everything that depends on *what* is learned: loading a silo's data (the built-in
generator and a user folder), the unseen domain, parsing the model config and building the
network, collating a batch, the loss, and the metrics. The federation (rounds, strategies,
privacy, encryption) never looks inside: it trains through :meth:`Task.collate`,
:meth:`Task.forward` and :meth:`Task.loss`, and reports what :meth:`Task.evaluate_split` returns.

Tasks register themselves with the :func:`register_task` class decorator (as Opacus registers
its grad samplers); :func:`get_task`, :func:`canonical_task_name` and :func:`task_names` read the
registry, and nothing else lists Tasks by hand. A Task may declare short aliases (``aliases =
("seg3d",)``) that every lookup accepts; its ``name`` stays the canonical one. Every module of the
``fedsilo.models.tasks`` package is imported with the package, so a new Task is one file in that
folder plus its tests.

This module imports neither torch nor the other model modules: a torch-free install can list
the Tasks and validate a data spec.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from fedsilo.core.validators import check_int, check_seed, excerpt, is_task_name

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from fedsilo.models.data import SiloSplits

__all__ = [
    "EVAL_SPLITS",
    "DataSpec",
    "SiloData",
    "Task",
    "canonical_task_name",
    "get_task",
    "parsed_config",
    "pooled",
    "register_task",
    "task_names",
    "unregister_task",
]

#: The datasets :meth:`Task.evaluate_split` scores, in the order the agent reports them.
EVAL_SPLITS = ("test", "val", "unseen")

_DATA_FIELDS = ("source", "domain", "seed", "path", "options", "unseen_path")
_DETAIL_PREFIX = re.compile(r"[a-z0-9_]{1,48}")


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Where one silo's data comes from, in a Task-independent form.

    The agent's ``[data]`` table maps onto it field by field; :meth:`coerce` accepts that
    config object directly.

    Attributes:
        source: ``"builtin"`` (the Task's deterministic generator) or ``"folder"`` (a folder or
            datalist the Task documents); a Task may support more (:attr:`Task.data_sources`).
        domain: Built-in data: which domain (scanner, site, species, ...) this silo holds, 0-based.
        seed: Seed of the generator and of the train/validation/test split.
        path: Folder data: the folder or datalist of this silo.
        options: Further settings of the Task's loader (e.g. ``image_size``, ``n_train``).
        unseen_path: Folder data: a folder of a domain no silo trains on (None: no unseen data).
    """

    source: str = "builtin"
    domain: int = 0
    seed: int = 0
    path: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    unseen_path: Path | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        source = getattr(self.source, "value", self.source)  # an enum such as the agent's DataSource
        if not isinstance(source, str) or not source:
            raise ValueError(f"{owner}.source must be a non-empty string, got {self.source!r}")
        object.__setattr__(self, "source", source)
        check_int(owner, "domain", self.domain, minimum=0)
        check_seed(owner, "seed", self.seed)
        for name in ("path", "unseen_path"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, Path)) or not str(value):
                    raise ValueError(f"{owner}.{name} must be a path, got {value!r}")
                object.__setattr__(self, name, Path(value))
        if not isinstance(self.options, Mapping) or not all(isinstance(k, str) for k in self.options):
            raise ValueError(f"{owner}.options must be a mapping with string keys, got {self.options!r}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if source == "folder" and self.path is None:
            raise ValueError(f"{owner}.path is required when source = 'folder'")
        if self.unseen_path is not None and source != "folder":
            raise ValueError(f"{owner}.unseen_path is only used with source = 'folder' "
                             "(the built-in data has its own unseen domain)")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> DataSpec:
        """Builds a spec from plain TOML values; raises ValueError naming an unknown key."""
        unknown = sorted(set(d) - set(_DATA_FIELDS))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known: {list(_DATA_FIELDS)}")
        return cls(**dict(d))

    @classmethod
    def coerce(cls, value: DataSpec | Mapping[str, Any] | object) -> DataSpec:
        """A spec from a spec, a mapping, or any object with the spec's attributes.

        Args:
            value: A :class:`DataSpec`; a mapping of its fields; or an object carrying them as
                attributes (e.g. the agent's ``DataConfig``, whose ``source`` enum is read by value).

        Returns:
            The validated spec.

        Raises:
            ValueError: On a bad or unknown field.
        """
        if isinstance(value, DataSpec):
            return value
        if isinstance(value, Mapping):
            return cls.from_mapping(value)
        return cls(**{name: getattr(value, name) for name in _DATA_FIELDS if hasattr(value, name)})


@dataclass(frozen=True, kw_only=True)
class SiloData:
    """One silo's data as a Task loaded it.

    Attributes:
        splits: The silo's train, validation and test sets (validation and test may be empty).
        unseen: Examples of a domain no silo trains on, to measure generalisation; None when
            the data has none (a folder source without ``unseen_path``).
    """

    splits: SiloSplits
    unseen: Dataset[Any] | None


def pooled(splits: SiloSplits) -> Dataset[Any]:
    """Every example of ``splits`` in one dataset (train, then validation, then test): a held-out
    folder read as a whole, e.g. the unseen domain of a folder source."""
    from torch.utils.data import ConcatDataset

    return ConcatDataset([ds for ds in (splits.train, splits.val, splits.test) if len(ds)])


class Task(abc.ABC):
    """A kind of work: data, models, loss and metrics; subclass it and decorate with :func:`register_task`.

    Class attributes every Task sets:

    * ``name``: registry key, lower-case words joined by hyphens (``"segmentation-2d"``); the
      canonical name (``get_task(alias).name``), which entry points record for an alias.
    * ``summary``: one line for CLI help and reports.
    * ``metric_names``: the metrics :meth:`evaluate` returns, headline first by convention.
    * ``headline_metric``: the one metric reports, plots and model selection name (one of
      ``metric_names``).
    * ``lower_is_better``: the metrics where smaller is better (e.g. a distance); all others
      are higher-is-better.
    * ``unseen_domain``: one sentence saying what this Task's unseen domain is.
    * ``data_sources``: the :attr:`DataSpec.source` values :meth:`read_data` accepts.
    * ``spatial_dims``: 1 for series ``[C, T]``, 2 for images ``[C, H, W]``, 3 for volumes
      ``[C, D, H, W]``; a run refuses methods that declare they work on 2-D images only
      (``Method.needs_2d``) for a Task that is not 2-D.
    * ``image_batches`` (optional, default True): whether a batch's inputs are one image tensor
      ``[N, C, *spatial]``; a Task whose inputs are a structure (several modalities, a species
      index) sets it False, and a run refuses the methods that read images directly
      (``Method.needs_2d``) for it.
    * ``aliases`` (optional): further names of the same form that :func:`get_task` and
      :func:`canonical_task_name` accept (``("seg2d",)``); no two Tasks may share a name or alias.
    * ``detail_prefixes`` (optional): prefixes of further metrics :meth:`evaluate` may return
      besides ``metric_names``: finer-grained scores such as per-class F1 (``("f1_class_",)``
      gives ``f1_class_0``, ``f1_class_3``, ...), present only where the evaluated data defines
      them. They are higher-is-better; reports keep them as details (:meth:`is_detail`), and the
      headline and the tables of ``metric_names`` are unchanged. Strings of 1..48 characters of
      ``[a-z0-9_]`` (so ``unseen_<prefix><i>`` stays a valid metric name) that no metric name
      starts with and that do not start with ``val_`` or ``unseen_``.

    Subclasses implement :meth:`read_data`, :meth:`model_config`, :meth:`build_model`,
    :meth:`collate`, :meth:`loss` and :meth:`evaluate`; :meth:`forward` may be overridden for
    models whose input is not a single tensor, and :meth:`group_of` by a Task whose silos come in
    groups (e.g. one animal species per silo). Instances hold no per-silo state, so one
    instance may serve several silos (threads) at once.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    metric_names: ClassVar[tuple[str, ...]]
    headline_metric: ClassVar[str]
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    unseen_domain: ClassVar[str]
    data_sources: ClassVar[tuple[str, ...]] = ("builtin", "folder")
    spatial_dims: ClassVar[int] = 2
    image_batches: ClassVar[bool] = True
    aliases: ClassVar[tuple[str, ...]] = ()
    detail_prefixes: ClassVar[tuple[str, ...]] = ()

    # -- data ---------------------------------------------------------------------------------

    def load_data(self, spec: DataSpec | Mapping[str, Any] | object) -> SiloData:
        """Loads one silo's data: its splits and, where the data has one, the unseen domain.

        Args:
            spec: A :class:`DataSpec`, a mapping of its fields, or an object with them as
                attributes (see :meth:`DataSpec.coerce`).

        Returns:
            The silo's data.

        Raises:
            ValueError: On a bad spec, a source this Task does not support, or bad options.
            FileNotFoundError: If a folder source's path does not exist.
            OSError: If a file cannot be read.
        """
        data = DataSpec.coerce(spec)
        if data.source not in self.data_sources:
            raise ValueError(f"task {self.name!r} reads data.source {list(self.data_sources)}, "
                             f"not {data.source!r}")
        return self.read_data(data)

    @abc.abstractmethod
    def read_data(self, spec: DataSpec) -> SiloData:
        """Loads the data of a validated spec whose source is one of :attr:`data_sources`.

        Called by :meth:`load_data`; callers use that. The same spec must give the same data
        in any process.

        Args:
            spec: The validated spec.

        Returns:
            The silo's data.

        Raises:
            ValueError: On bad options.
            FileNotFoundError: If a folder source's path does not exist.
            OSError: If a file cannot be read.
        """

    def group_of(self, data: SiloData) -> str | None:
        """The group a silo belongs to, read from its data: silos of one group hold data of one kind
        (e.g. one animal species), and a study may train one model per group (``fedsilo bench``'s
        ``one-for-one``) and report its figures per group.

        The default is None: the Task's silos have no groups. A Task with groups overrides this and
        returns a non-empty name for every silo it loads.

        Args:
            data: One silo's data, as :meth:`load_data` returned it.

        Returns:
            The silo's group, or None when the Task has no groups.
        """
        return None

    # -- model --------------------------------------------------------------------------------

    @abc.abstractmethod
    def model_config(self, config: Mapping[str, Any] | Any) -> Any:
        """Parses and validates a model config.

        Args:
            config: The run's plain TOML mapping, or an already parsed config of this Task.

        Returns:
            The Task's config object (it has ``to_mapping()`` for the plain form).

        Raises:
            ValueError: Naming a bad or unknown key.
        """

    def default_model_config(self, seed: int = 0) -> dict[str, Any]:
        """The model table a run uses when nobody wrote one (e.g. ``fedsilo bench`` without ``--model-json``).

        The default is ``{}``: every key at its :meth:`model_config` default. A Task whose model
        config takes a seed puts ``seed`` in, so each seed of a study starts from other weights.

        Args:
            seed: The run's seed.

        Returns:
            A plain TOML mapping :meth:`model_config` accepts.
        """
        return {}

    @abc.abstractmethod
    def build_model(self, config: Mapping[str, Any] | Any) -> nn.Module:
        """Builds the network with deterministic initial weights (the same config gives the same weights).

        Seed torch's global RNG only inside ``fedsilo.core.rng.seeded_global_rng(seed)``: simulated
        silos build their models in threads of one process, and every silo must build the same one.

        Args:
            config: A plain mapping or a parsed config (see :meth:`model_config`).

        Returns:
            The freshly initialised network on the CPU, in training mode.

        Raises:
            ValueError: On a bad config.
        """

    # -- training -----------------------------------------------------------------------------

    @abc.abstractmethod
    def collate(self, dataset: Dataset[Any], indices: Sequence[int], device: torch.device) -> tuple[Any, Any]:
        """Stacks the examples ``indices`` of ``dataset`` into one batch on ``device``.

        Args:
            dataset: A map-style dataset of this Task's examples.
            indices: Which examples, in batch order (may be empty only where the Task supports it).
            device: Where the batch goes.

        Returns:
            ``(inputs, targets)``: what :meth:`forward` and :meth:`loss` take; the batch
            dimension comes first and has ``len(indices)`` entries.
        """

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """Runs ``model`` on a collated batch's inputs; the default is ``model(inputs)``.

        Args:
            model: The network.
            inputs: The first element of :meth:`collate`'s result.

        Returns:
            The model output :meth:`loss` takes.
        """
        return model(inputs)

    @abc.abstractmethod
    def loss(self, output: Any, target: Any) -> torch.Tensor:
        """The training loss of a batch: a scalar tensor, the mean of per-example losses.

        Being a mean of per-example losses makes per-example gradients (DP-SGD) well defined.

        Args:
            output: The model output of a batch (:meth:`forward`).
            target: The batch's targets (:meth:`collate`).

        Returns:
            The scalar loss, differentiable with respect to the model's parameters.
        """

    # -- evaluation ---------------------------------------------------------------------------

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, dataset: Dataset[Any], *, batch_size: int = 16) -> dict[str, tuple[float, int]]:
        """Scores ``model`` on ``dataset`` without changing it (its training mode is restored).

        Args:
            model: The network.
            dataset: A non-empty map-style dataset of this Task's examples.
            batch_size: Examples per forward pass; results do not depend on it beyond float rounding.

        Returns:
            ``{metric: (value, n)}`` for every name of :attr:`metric_names`, ``n`` the number
            of examples the value averages over (the weight of the value when silos are pooled);
            plus any detail metrics (names starting with one of :attr:`detail_prefixes`), each
            with a finite value and the ``n`` its Task documents.

        Raises:
            ValueError: On an empty dataset or a bad batch size.
        """

    def evaluate_split(
        self, model: nn.Module, dataset: Dataset[Any] | None, split: str, *,
        device: torch.device | str | None = None,
    ) -> dict[str, tuple[float, int]]:
        """The metrics the agent reports for one of its datasets, under their report names.

        * ``"test"``: every metric of :meth:`evaluate` under its own name (``dice``, ``hd95``),
          details included (``f1_class_3``);
        * ``"val"``: the headline only, as ``val_<headline>`` (``val_dice``; model selection);
        * ``"unseen"``: every metric as ``unseen_<name>`` (``unseen_dice``, ``unseen_hd95``),
          details included (``unseen_f1_class_3``).

        Args:
            model: The network, with the weights to score already loaded.
            dataset: The dataset; None or an empty one gives no metrics.
            split: One of :data:`EVAL_SPLITS`.
            device: Where to score (:func:`fedsilo.models.training.resolve_device`): the model
                is moved there for :meth:`evaluate` (whose batches go where the model is) and
                back to its own device afterwards; None scores it where it is.

        Returns:
            ``{report name: (value, n)}``; empty for no data.

        Raises:
            ValueError: On an unknown split, or a bad or unusable device.
        """
        if split not in EVAL_SPLITS:
            raise ValueError(f"split must be one of {list(EVAL_SPLITS)}, got {split!r}")
        if dataset is None or len(dataset) == 0:  # type: ignore[arg-type]
            return {}
        from fedsilo.models.training import on_device

        with on_device(model, device):
            scores = self.evaluate(model, dataset)
        if split == "test":
            return scores
        if split == "val":
            return {f"val_{self.headline_metric}": scores[self.headline_metric]}
        return {f"unseen_{k}": v for k, v in scores.items()}

    @classmethod
    def report_names(cls) -> tuple[str, ...]:
        """Every metric name :meth:`evaluate_split` always reports, test first, then val, then unseen.

        Detail metrics (:meth:`is_detail`) depend on the data and are not listed.
        """
        return (*cls.metric_names, f"val_{cls.headline_metric}", *(f"unseen_{m}" for m in cls.metric_names))

    @classmethod
    def is_detail(cls, metric: str) -> bool:
        """Whether ``metric`` (a metric name, or a report name ``unseen_<name>``) is a detail metric:
        not one of :attr:`metric_names`, and starting with one of :attr:`detail_prefixes`."""
        if metric.startswith("unseen_"):
            metric = metric[len("unseen_"):]
        return metric not in cls.metric_names and metric.startswith(cls.detail_prefixes)

    @classmethod
    def trim_report(cls, metrics: Mapping[str, tuple[float, int]], limit: int) -> dict[str, tuple[float, int]]:
        """``metrics`` with detail metrics (:meth:`is_detail`) left out, last first, until at most ``limit``
        names remain (a coordinator takes a bounded number of metrics per report); other names always stay.

        Args:
            metrics: Report name -> (value, n), in report order (test, val, then unseen).
            limit: The most names a report may hold.

        Returns:
            A new mapping in the same order.
        """
        out = dict(metrics)
        for name in reversed(list(out)):
            if len(out) <= limit:
                break
            if cls.is_detail(name):
                del out[name]
        return out

    @classmethod
    def higher_is_better(cls, metric: str) -> bool:
        """Whether larger values of ``metric`` (a metric or report name) are better; true for a detail metric."""
        if cls.is_detail(metric):
            return True
        for prefix in ("val_", "unseen_"):
            if metric.startswith(prefix) and metric[len(prefix):] in cls.metric_names:
                metric = metric[len(prefix):]
                break
        if metric not in cls.metric_names:
            raise ValueError(f"task {cls.name!r} has no metric {metric!r}; it has {list(cls.metric_names)}")
        return metric not in cls.lower_is_better


C = TypeVar("C")


def parsed_config(config: Any, cls: type[C]) -> C:
    """``config`` as a ``cls`` (a ``MappingConfig`` dataclass): returned as is when it is one, else
    parsed from a mapping (a Task's ``model_config``).

    Raises:
        ValueError: Neither a mapping nor a ``cls``, or a bad or unknown key (named).
    """
    if isinstance(config, cls):
        return config
    if not isinstance(config, Mapping):
        raise ValueError(f"model config must be a mapping or a {cls.__name__}, got {type(config).__name__}")
    return cls.from_mapping(config)  # type: ignore[attr-defined,no-any-return]


_TASKS: dict[str, type[Task]] = {}
#: alias -> the canonical name of the Task that declares it (kept in step with ``_TASKS``).
_ALIASES: dict[str, str] = {}

T = TypeVar("T", bound=type[Task])


def _check_task_class(cls: object) -> None:
    """Raises ValueError unless ``cls`` is a complete Task class with consistent attributes."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"register_task needs a Task subclass, got {cls!r}")
    where = f"{cls.__module__}.{cls.__qualname__}"
    if getattr(cls, "__abstractmethods__", None):
        raise ValueError(f"{where} does not implement {sorted(cls.__abstractmethods__)}")
    for attr in ("name", "summary", "headline_metric", "unseen_domain"):
        value = getattr(cls, attr, None)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}.{attr} must be a non-empty string, got {value!r}")
    if not is_task_name(cls.name):
        raise ValueError(f"{where}.name {cls.name!r} must be lower-case words joined by hyphens")
    if "\n" in cls.summary.strip():
        raise ValueError(f"{where}.summary must be one line")
    metrics = getattr(cls, "metric_names", None)
    if not isinstance(metrics, tuple) or not metrics or not all(isinstance(m, str) and m for m in metrics) \
            or len(set(metrics)) != len(metrics):
        raise ValueError(f"{where}.metric_names must be a non-empty tuple of distinct names, got {metrics!r}")
    if cls.headline_metric not in metrics:
        raise ValueError(f"{where}.headline_metric {cls.headline_metric!r} is not one of {list(metrics)}")
    if not set(cls.lower_is_better) <= set(metrics):
        raise ValueError(f"{where}.lower_is_better names unknown metrics {sorted(set(cls.lower_is_better) - set(metrics))}")
    if not isinstance(cls.data_sources, tuple) or not cls.data_sources:
        raise ValueError(f"{where}.data_sources must be a non-empty tuple, got {cls.data_sources!r}")
    if cls.spatial_dims not in (1, 2, 3) or isinstance(cls.spatial_dims, bool):
        raise ValueError(f"{where}.spatial_dims must be 1, 2 or 3, got {cls.spatial_dims!r}")
    if not isinstance(cls.image_batches, bool):
        raise ValueError(f"{where}.image_batches must be True or False, got {cls.image_batches!r}")
    aliases = getattr(cls, "aliases", None)
    if not isinstance(aliases, tuple):
        raise ValueError(f"{where}.aliases must be a tuple of names, got {aliases!r}")
    for alias in aliases:
        if not is_task_name(alias):
            raise ValueError(f"{where}.aliases: {alias!r} must be lower-case words joined by hyphens")
    if cls.name in aliases or len(set(aliases)) != len(aliases):
        raise ValueError(f"{where}.aliases {aliases!r} must be distinct and differ from its name {cls.name!r}")
    prefixes = getattr(cls, "detail_prefixes", None)
    if not isinstance(prefixes, tuple) or not all(isinstance(p, str) and _DETAIL_PREFIX.fullmatch(p) for p in prefixes):
        raise ValueError(f"{where}.detail_prefixes must be a tuple of 1..48-character strings of [a-z0-9_], "
                         f"got {prefixes!r}")
    for prefix in prefixes:
        if prefix.startswith(("val_", "unseen_")) or any(m.startswith(prefix) for m in metrics):
            raise ValueError(f"{where}.detail_prefixes: {prefix!r} must not start with 'val_' or 'unseen_' "
                             f"nor begin a metric of {list(metrics)}")


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _holder(key: str) -> type[Task] | None:
    """The registered Task class whose name or alias is ``key``, or None."""
    return _TASKS.get(key) or _TASKS.get(_ALIASES.get(key, ""))


def register_task(cls: T) -> T:
    """Class decorator: adds a Task to the registry under ``cls.name`` and its ``aliases``.

    Example::

        @register_task
        class Segmentation2D(Task):
            name = "segmentation-2d"
            ...

    Args:
        cls: A concrete Task subclass.

    Returns:
        ``cls`` unchanged.

    Registering the same class again changes nothing (it takes its current aliases).

    Raises:
        ValueError: If ``cls`` is not a concrete Task with valid attributes, or another class
            already holds its name or one of its aliases (as a name or an alias); nothing is
            registered then.
    """
    _check_task_class(cls)
    for key in (cls.name, *cls.aliases):
        existing = _holder(key)
        if existing is not None and existing is not cls:
            what = "name" if key == cls.name else f"alias (of {_where(cls)})"
            role = "" if key in _TASKS else f" as an alias of {existing.name!r}"
            raise ValueError(f"task {what} {key!r} is already registered by {_where(existing)}{role}; "
                             "choose another name")
    _drop(cls)
    _TASKS[cls.name] = cls
    _ALIASES.update((alias, cls.name) for alias in cls.aliases)
    return cls


def _drop(cls: type[Task]) -> None:
    """Removes ``cls`` and every alias that points to it from the registry (if there)."""
    for key in [k for k, v in _TASKS.items() if v is cls]:
        del _TASKS[key]
        for alias in [a for a, name in _ALIASES.items() if name == key]:
            del _ALIASES[alias]


def unregister_task(name: str) -> None:
    """Removes a Task, with its aliases, from the registry (for tests and plugins that unload).

    Args:
        name: The Task's name or one of its aliases.

    Raises:
        ValueError: If no Task has that name or alias.
    """
    _drop(_lookup(name))


def _unknown(name: object) -> str:
    known = ", ".join(f"{n} (alias {', '.join(a)})" if (a := _aliases_of(n)) else n for n in task_names())
    return f"unknown task {excerpt(repr(name))}; known tasks: {known or '(none)'}"


def _aliases_of(name: str) -> list[str]:
    return sorted(a for a, n in _ALIASES.items() if n == name)


def _lookup(name: object) -> type[Task]:
    cls = _holder(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(_unknown(name))
    return cls


def task_names(*, aliases: bool = False) -> tuple[str, ...]:
    """The canonical names of the registered Tasks, sorted; one per Task.

    Args:
        aliases: Also list every alias (all the spellings :func:`get_task` accepts), sorted together.
    """
    return tuple(sorted([*_TASKS, *_ALIASES] if aliases else _TASKS))


def canonical_task_name(name: str) -> str:
    """The canonical name of the Task registered as ``name`` (its name or an alias): what a run records.

    Raises:
        ValueError: If no Task has that name or alias; the message lists the known ones.
    """
    return _lookup(name).name


def get_task(name: str) -> Task:
    """A fresh instance of the Task registered as ``name`` (its name or an alias; ``.name`` is canonical).

    Raises:
        ValueError: If no Task has that name or alias; the message lists the known ones.
    """
    return _lookup(name)()
