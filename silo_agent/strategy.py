"""The ``Strategy`` seam: a method's agent side (what a silo shares, uploads, applies and evaluates), on top of its torch-free declaration."""

from __future__ import annotations

import abc
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedsilo.core.lazy import lazy_module
from fedsilo.core.errors import InvalidArgument
from fedsilo.core.methods import Method
from fedsilo.core.phases import COUNT_PRESENT, MODALITY_SLOT, SharePhase, count_slot, modality_groups, modality_of

torch = lazy_module("torch")

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from fedsilo.core.tensors import Manifest
    from fedsilo.models import TrainConfig
    from fedsilo.models.objective import LocalObjective
    from fedsilo.models.tasks import SiloData, Task
    from fedsilo.silo_agent.state import AgentState


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """What a strategy's once-per-run preparation (:meth:`Strategy.prepare`) may use.

    Attributes:
        client: the coordinator client (``CoordinatorClient``: its RPCs, e.g. the sealed
            statistics relay ``publish_style_bank`` / ``style_banks``).
        he: the silo's ``HeSession`` (run id, silo name, the run's shared secret for sealing),
            or None without HE aggregation.
        train: the silo's training set.
        state: the agent's persistent state (save it through ``state_dir`` after changing it).
        state_dir: where the agent keeps its state.
        stop: set when the agent must stop (raise ``Stopped`` from long waits).
        idle: called while waiting (the key holder keeps serving late joiners), or None.
        privacy: the silo's ``PrivacySession`` (its plan and ledger), or None without DP.
        train_cfg: the run's training settings (``fedsilo.models.TrainConfig``), as the agent
            validated them from ``GetRun``.
    """

    client: Any
    he: Any
    train: Dataset
    state: AgentState
    state_dir: Path
    stop: threading.Event
    idle: Any = None
    privacy: Any = None
    train_cfg: Any = None


class StrategyError(Exception):
    """A method cannot go on (e.g. no usable relayed data); the message says why. The agent stops with it."""


class Strategy(Method, abc.ABC):
    """A method's agent side: decides which of a model's state_dict entries are shared with the federation.

    A method module subclasses it once, sets the :class:`~fedsilo.core.methods.Method`
    declarations and registers the class with :func:`~fedsilo.core.methods.register_method`;
    the agent instantiates it with :meth:`for_run`. torch is imported on first use only, so the
    coordinator can import every method module without it.

    Shared entries are averaged across silos each round; the rest stay local (personalised).
    Only floating-point entries can be shared. The contract test in
    tests/silo_agent/test_strategy_contract.py runs on every implementation.
    """

    #: The hooks that make or apply uploads: a subclass that overrides one of them has no
    #: ``modality_counts`` unless its class body sets it (it then fills and reads the count slots itself).
    UPLOAD_HOOKS: ClassVar[tuple[str, ...]] = ("upload", "he_vector", "apply", "apply_sum", "upload_layout")

    #: The modality groups this silo's data holds (:meth:`hold_modalities`); None: every group.
    held_modalities: frozenset[str] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "modality_counts" not in cls.__dict__ and (cls.masked or any(h in cls.__dict__ for h in cls.UPLOAD_HOOKS)):
            cls.modality_counts = False

    #: Whether :meth:`upload`, :meth:`he_vector`, :meth:`apply` and :meth:`apply_sum`, where overridden,
    #: still leave every silo with the same shared values (a function of the aggregate alone, as
    #: FedNova's rescaling or FedLWS's shrinking): the study then scores one consensus model.
    consensus_aggregate: ClassVar[bool] = False

    @classmethod
    def task_refusal(cls, task: str) -> str | None:
        """Why this method cannot run Task ``task`` (a registered name or alias), or None: a method that
        declares ``needs_2d`` refuses a Task that is not 2-D or whose batches are not plain image tensors
        (``Task.image_batches``). A name no module registered is left to the agents (None)."""
        if not cls.needs_2d:
            return None
        from fedsilo.models.tasks import get_task, task_names

        if task not in task_names(aliases=True):
            return None
        the_task = get_task(task)
        if the_task.spatial_dims != 2:
            return (f"{cls.name!r} works on 2-D images only ({cls.needs_2d}); run.task = {task!r} is a "
                    f"{the_task.spatial_dims}-D Task")
        if not the_task.image_batches:
            return (f"{cls.name!r} works on 2-D image tensors only ({cls.needs_2d}); run.task = {task!r} feeds its "
                    "network structured inputs, not one image tensor")
        return None

    @classmethod
    def check_run(cls, run: Any) -> None:
        """Refuses a run whose Task this method cannot run (:meth:`task_refusal`). Overrides call
        ``super().check_run(run)``.

        Raises:
            ValueError: naming ``run.strategy`` and ``run.task``.
        """
        task = getattr(run, "task", None)
        why = cls.task_refusal(task) if isinstance(task, str) else None
        if why is not None:
            raise ValueError(f"run.strategy: {why}")

    @classmethod
    def for_run(cls, tables: Mapping[str, Mapping[str, Any]]) -> Strategy:
        """The strategy for a run whose method tables (e.g. ``{"resfim": {...}}``) are ``tables``
        (default: no settings)."""
        return cls()

    def wrap_model(self, model: torch.nn.Module, *, model_cfg: Any, base_checkpoint: Path | None) -> torch.nn.Module:
        """The network the silo trains, built from the Task's ``model`` (e.g. a frozen base with
        adapters); every silo must build the same one. Default: ``model`` itself."""
        return model

    @abc.abstractmethod
    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        """Whether state_dict entry ``name`` of ``model`` is shared."""

    def shared_names(self, model: torch.nn.Module) -> list[str]:
        """Shared state_dict entries in state_dict order (floating-point only)."""
        return [k for k, v in model.state_dict().items() if v.is_floating_point() and self.is_shared(k, model)]

    def trains(self, name: str, phase: SharePhase) -> bool:
        """Whether trainable parameter ``name`` is trained in a round of ``phase``.

        By default every parameter the model leaves trainable is; LoRA strategies train only
        the factor(s) they share that round.
        """
        return True

    def set_trainable(self, model: torch.nn.Module, phase: SharePhase, trainable: frozenset[str]) -> None:
        """Sets ``requires_grad`` for a round: among ``trainable`` (the parameters the model
        may train at all, e.g. only LoRA factors over a frozen base), those `trains` selects and
        this silo's data can train (:meth:`lacks`: none of a modality it does not hold, so not
        even DP-SGD's noise moves them)."""
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable and self.trains(name, phase) and not self.lacks(name))

    # -- modality groups (fedsilo.core.phases.modality_of) ------------------------------------------
    def hold_modalities(self, held: Any, *, manifest: Manifest, silo_level_dp: bool = False) -> None:
        """Records which modality groups this silo's data holds, before its first round.

        Args:
            held: the training set's ``modalities`` (a set of group names; groups the network
                has not got are ignored), or None: every group (a Task without modalities).
            manifest: the run's shared tensors.
            silo_level_dp: whether the run's DP is silo-level.

        Raises:
            StrategyError: the network has modality groups and the method has no ``modality_counts``,
                or the run's DP is silo-level (it would clip and noise the count slots, and it
                protects whether a silo holds a modality at all); ``held`` is not a set of names.
        """
        groups = modality_groups(manifest)
        if groups:
            try:
                type(self).check_manifest(manifest)
            except InvalidArgument as exc:
                raise StrategyError(str(exc)) from None
            if silo_level_dp:
                raise StrategyError(f"the network has modality groups ({', '.join(groups)}), which silo-level DP "
                                    "cannot protect: it would noise the per-modality counts, and whether a silo "
                                    "holds a modality is part of what it protects; use record-level DP")
        if held is None:
            self.held_modalities = None
            return
        if isinstance(held, (str, bytes)) or not all(isinstance(g, str) for g in held):
            raise StrategyError(f"the training set's modalities must be a set of names, got {held!r}")
        self.held_modalities = frozenset(held)

    def modality_disclosures(self, manifest: Manifest, *, he: bool = True) -> list[dict[str, str]]:
        """What the count slots of a network with modality groups disclose, for this silo's audit reports
        (``{"topic", "statement"}`` items; none without groups); ``he``: whether the run aggregates under HE."""
        groups = modality_groups(manifest)
        if not groups or not self.modality_counts:
            return []
        names = ", ".join(groups)
        lacking = self.lacking_modalities(manifest)
        seen = ("Every silo decrypts the sums: it learns, each round, the share of the round's training examples "
                "held by the silos with each modality (with two silos, whether the other holds it); the coordinator "
                "adds ciphertexts and learns no silo's modalities.") if he else (
                "The run aggregates in the clear: the coordinator sees each silo's counts, i.e. which modalities it "
                "holds.")
        own = (f"This silo holds no {', '.join(lacking)}: it never trains those tensors and uploads zeros for them."
               if lacking else "This silo holds every modality group and trains and uploads all of them.")
        return [{"topic": f"Modality groups ({names}): which silos hold each modality",
                 "statement": (f"The network has tensors that only examples of a modality train ({names}). Each upload "
                               "carries one count per modality group: 1 where the silo holds the modality, 0 where it "
                               f"does not. {seen} {own} The counts depend on no training record; under record-level "
                               "DP the tensors themselves are the DP-SGD-trained model, covered by the ledger.")}]

    def holds(self, group: str) -> bool:
        """Whether this silo's data holds modality group ``group`` (every group when it says nothing)."""
        return self.held_modalities is None or group in self.held_modalities

    def lacking_modalities(self, manifest: Manifest) -> list[str]:
        """The modality groups of ``manifest`` this silo's data does not hold, in group order."""
        return [g for g in modality_groups(manifest) if not self.holds(g)]

    def lacks(self, name: str) -> bool:
        """Whether state_dict entry ``name`` is in a modality group this silo's data does not hold."""
        group = modality_of(name)
        return group is not None and not self.holds(group)

    def modality_counts_of(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The count slots of an upload of ``names``: per modality group, 1 where this silo holds it, else 0
        (empty for a method without ``modality_counts``)."""
        if not self.modality_counts:
            return {}
        groups = dict.fromkeys(g for k in names if (g := modality_of(k)) is not None)
        return {count_slot(g): np.array([1.0 if self.holds(g) else 0.0]) for g in groups}

    # -- what travels, and what comes back. The defaults are FedAvg's: differences to the
    # -- federation's shared values go up, their weighted mean is added on return.
    def upload(self, *, trained: Mapping[str, torch.Tensor], state: AgentState, names: Sequence[str], rnd: int,
               total_rounds: int) -> dict[str, np.ndarray]:
        """The arrays this silo uploads for the round's shared tensors ``names`` (before any DP
        noise or encryption); the coordinator averages them, weighted by training examples.

        Args:
            trained: the model's state_dict after this round's local training.
            state: the agent's state; ``state.global_shared`` still holds the values before the round.
            names: the round's shared tensors, in manifest order.
            rnd: the round (1-based).
            total_rounds: the run's number of rounds.

        The default uploads the differences, zeros for the tensors of a modality group this silo
        does not hold (:meth:`lacks`), and the count slots (:meth:`modality_counts_of`).
        """
        out = {}
        for k in names:
            if self.lacks(k):
                g = state.global_shared[k]
                out[k] = np.zeros(tuple(g.shape), dtype=g.numpy().dtype)
            else:
                out[k] = (trained[k].detach() - state.global_shared[k]).numpy()
        out.update(self.modality_counts_of(names))
        return out

    def apply(self, *, mean: Mapping[str, np.ndarray], state: AgentState, rnd: int, total_rounds: int) -> None:
        """Applies the round's weighted mean of the silos' uploads to ``state`` (in place).

        The default adds the mean difference to ``state.global_shared``. A modality group's tensors
        are divided by its count slot's mean first (the mean over the silos that hold it), and left
        as they are when no silo of the round holds it (count mean <= ``COUNT_PRESENT``).
        """
        counts = {k: float(np.asarray(v, dtype=np.float64).reshape(-1)[0]) for k, v in mean.items()
                  if k.startswith(MODALITY_SLOT)}
        for k, arr in mean.items():
            if k in counts:
                continue
            group = modality_of(k)
            if group is not None and count_slot(group) in counts:
                count = counts[count_slot(group)]
                if not count > COUNT_PRESENT:
                    continue
                arr = np.asarray(arr, dtype=np.float64) / count
            delta = torch.from_numpy(np.ascontiguousarray(arr))
            state.global_shared[k] = state.global_shared[k] + delta.to(state.global_shared[k].dtype)

    # -- once per run, training data, evaluation -----------------------------------------
    def prepare(self, ctx: RunContext) -> None:
        """Called once per run after joining (and the HE key ceremony), before the first round.

        The default does nothing; FedRDN exchanges its normalisation statistics here.
        """

    def disclosures(self, *, train: Dataset, plan: Any = None) -> list[dict[str, str]]:
        """What the strategy shares outside the privacy ledger, as ``{"topic", "statement"}`` items
        for the audit report of a DP run with privacy ``plan`` (default: nothing)."""
        return []

    def extra_releases(self, state: AgentState, rnd: int, *, ahead: bool = False) -> list[Any]:
        """Ledger releases of round ``rnd`` besides its upload (e.g. masks computed from the data);
        ``ahead``: those about to be made (for the budget check before training). Default: none."""
        return []

    def before_training(self, ctx: RunContext, *, model: torch.nn.Module, state: AgentState, rnd: int,
                        trainable: frozenset[str], shared_names: Sequence[str]) -> None:
        """Called before round ``rnd``'s local training (e.g. to compute masks); may update ``state``
        (it saves it). Default: nothing."""

    def he_vector(self, update: Mapping[str, np.ndarray], *, state: AgentState, names: Sequence[str], scale: float,
                  rnd: int, total_rounds: int) -> np.ndarray:
        """The flat vector an HE upload encrypts, laid out as :meth:`upload_layout` says: by default
        the round's tensors ``names`` flattened in order, then the count slots ``update`` holds (in
        group order), times ``scale`` (the normalised weight)."""
        names = [*names, *(k for k in self.modality_counts_of(names) if k in update)]
        flat = np.concatenate([np.asarray(update[k]).astype(np.float64).ravel() for k in names])
        return flat * scale

    def apply_sum(self, flat_sum: np.ndarray, *, layout: Any, total_weight: float, weight_normalizer: float,
                  state: AgentState, rnd: int, total_rounds: int) -> None:
        """Applies a decrypted HE aggregate (the sum of the uploads' :meth:`he_vector`, laid out as
        ``layout``). The default divides by the total weight and hands the mean to :meth:`apply`."""
        mean = flat_sum * (weight_normalizer / total_weight)
        out, pos = {}, 0
        for spec in layout.tensors:
            out[spec.name] = mean[pos : pos + spec.numel].astype(spec.dtype.numpy).reshape(spec.shape)
            pos += spec.numel
        self.apply(mean=out, state=state, rnd=rnd, total_rounds=total_rounds)

    def train_data(self, train: Dataset, *, state: AgentState, rnd: int) -> Dataset:
        """The training set of round ``rnd`` as the model sees it (default: unchanged)."""
        return train

    def eval_data(self, dataset: Dataset, *, state: AgentState) -> Dataset:
        """An evaluation set (validation, test, or the unseen domain) as the model sees it (default: unchanged)."""
        return dataset

    def unseen_data(self, dataset: Dataset, *, state: AgentState) -> Dataset:
        """A domain no silo trains on, as the model sees it (default: as :meth:`eval_data`)."""
        return self.eval_data(dataset, state=state)

    def local_objective(self, *, model: torch.nn.Module, state: AgentState, train: Dataset,
                        rnd: int) -> LocalObjective | None:
        """The change of the local training loss for round ``rnd`` (e.g. MOON's contrastive term,
        FedRoD's balanced loss and personal head), or None: the Task's loss (the default).

        Called before the round's training, after :meth:`before_training` and :meth:`set_trainable`,
        with ``model`` holding the round's starting weights (the global model plus this silo's
        local entries) and ``train`` the round's :meth:`train_data`. The objective travels in the
        round's ``TrainJob`` (it must pickle) to ``train_local`` or, under record-level DP,
        ``train_local_dp``; see :class:`fedsilo.models.training.LocalObjective` for its rules. A
        method whose objective is not a mean of per-example losses that read no other record
        must refuse record-level DP (``refuses``). ``model`` must be left as it is (copy it).
        """
        return None

    def after_training(self, *, model: torch.nn.Module, state: AgentState, train: Dataset, train_cfg: TrainConfig,
                       rnd: int) -> None:
        """Called after the round's local training and its upload's values are fixed; may update
        ``state`` (it is saved afterwards). The default does nothing; Ditto trains its personal
        model here. ``model`` must be left as it is."""

    def after_final_aggregate(self, *, model: torch.nn.Module, state: AgentState, data: SiloData, task: Task,
                              train_cfg: TrainConfig, rnd: int, device: torch.device | None = None) -> None:
        """Called when the run's last aggregate (round ``rnd``, the run's last) is applied, right before
        the silo's final evaluation (again after a restart that came before that evaluation was
        reported); may update ``state`` (saved with the report). The default does nothing; FedAvg+FT
        fine-tunes its personal model here. ``model`` (the final global model) must be left as it is;
        ``device`` is where the agent trains and evaluates."""

    def eval_state_dict(self, state: AgentState) -> dict[str, torch.Tensor]:
        """The model this silo evaluates on its own validation and test data (default: shared
        values plus its local ones)."""
        return state.personal_state_dict()

    def unseen_state_dict(self, state: AgentState) -> dict[str, torch.Tensor]:
        """The model this silo evaluates on a domain no silo trains on (default: as :meth:`eval_state_dict`)."""
        return self.eval_state_dict(state)
