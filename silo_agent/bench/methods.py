"""The methods ``fedsilo bench`` compares: the registered methods that declare bench defaults, plus the reference runs."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fedsilo.core.methods import methods as registered_methods

#: The reference run of each silo training alone: what "vs local" and "beats local" compare against.
LOCAL = "local"
#: The reference run on the pooled data of all silos.
CENTRALISED = "centralised"
#: The reference run of one model per silo group (the Task's ``group_of``), on the pooled data of its silos.
ONE_FOR_ONE = "one-for-one"

#: The reference runs that need no federation, with their one-line notes (they run without DP).
REFERENCES: dict[str, str] = {
    LOCAL: "no federation: each silo trains alone on its own data (0 bytes)",
    CENTRALISED: "pooled data of all silos in one place (the upper reference; the pooling itself is what "
                 "federated learning avoids)",
    ONE_FOR_ONE: "one model per silo group (the Task's group_of, e.g. species), trained on the pooled training "
                 "data of that group's silos (CKSP's one-for-one)",
}
#: The reference runs that need silo groups: a study of a Task without them refuses these.
GROUPED_REFERENCES = frozenset({ONE_FOR_ONE})

#: :func:`scoring`: every silo evaluates one and the same model, the consensus (global) model, on its own
#: test set and on the unseen domain: its personal model is the consensus model.
ONE_MODEL = "one model"
#: :func:`scoring`: a silo's own test set is scored with its personal model, the unseen domain with the
#: consensus (global) model.
PERSONAL_THEN_CONSENSUS = "personal, then consensus"
#: :func:`scoring`: each silo scores both with its own model after the last aggregate (the shared values
#: plus what it keeps or makes locally); the unseen figure is the mean over the silos.
PER_SILO = "per silo"
#: :func:`scoring`: the ``local`` reference: each silo's own model, trained alone, on both.
ALONE = "alone"
#: :func:`scoring`: the ``centralised`` reference: the one model trained on the pooled data, on both.
POOLED = "pooled"
#: :func:`scoring`: the ``one-for-one`` reference: each silo's group model, trained on the pooled data of
#: that group's silos, on both.
GROUP_POOLED = "pooled per group"
#: The scoring of each reference run.
_REFERENCE_SCORING = {LOCAL: ALONE, CENTRALISED: POOLED, ONE_FOR_ONE: GROUP_POOLED}

#: Strategy hooks whose override can make a silo's evaluated model differ from the consensus model.
#: The hooks whose override may make a silo's model its own; the first four shape the aggregate and
#: leave one consensus model where the strategy declares ``consensus_aggregate``.
_PERSONAL_HOOKS = ("upload", "apply", "apply_sum", "he_vector", "eval_state_dict", "unseen_state_dict",
                   "after_final_aggregate")


@dataclass(frozen=True, kw_only=True)
class Method:
    """One method of the study.

    Attributes:
        name: as given on the command line.
        strategy: the run strategy (``run.strategy``), or None for a reference run that needs no
            federation (``local``, ``centralised``).
        note: one line for the summary: what it shares, what it keeps.
        training: entries of the run's ``[training]`` table (e.g. FedProx's μ).
        he_bound: the HE bound its uploads need (None: the default).
        tables: its method tables by name (``{"resfim": {...}}``, ``{"moon": {...}}``): the
            bench defaults' tables, with a variant's entries set; the run config carries each one.
        lora: whether it fine-tunes LoRA adapters on a pretrained base.
        privacy: its ``[privacy]`` plan when the study runs with DP (None: it cannot run with DP;
            ``why_no_dp`` says why).
        why_no_dp: the reason it runs only without DP.
        model: entries of the run's ``[model]`` table a variant sets (``fedavg@model.norm=pn``): each
            replaces the study's entry of that key (see :func:`model_of`); empty for every registered
            method.
    """

    name: str
    strategy: str | None
    note: str
    training: Mapping[str, Any] = field(default_factory=dict)
    he_bound: float | None = None
    tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    lora: bool = False
    privacy: Mapping[str, Any] | None = None
    why_no_dp: str = ""
    model: Mapping[str, Any] = field(default_factory=dict)

    @property
    def resfim(self) -> Mapping[str, Any] | None:
        """Its ``[resfim]`` table, if any (one of :attr:`tables`)."""
        return self.tables.get("resfim")


def has_groups(task: str) -> bool:
    """Whether the silos of ``task`` (a registered name or alias) have groups: its class overrides
    :meth:`~fedsilo.models.tasks.Task.group_of` (e.g. the sensor Task's species).

    Raises:
        ValueError: an unknown Task.
    """
    from fedsilo.models.tasks import Task, get_task

    return type(get_task(task)).group_of is not Task.group_of


def study_method_names(task: str | None = None) -> tuple[str, ...]:
    """Method names in the order of the study's tables: the references, then every registered
    method with bench defaults (by the registry's order).

    Args:
        task: None: every study method of any Task; a Task's name: those a study of it can run with
            the Task's default model and the bench's own LoRA base (the references of
            :data:`GROUPED_REFERENCES` only where :func:`has_groups`; no method :func:`task_refusal`
            refuses).
    """
    grouped = task is None or has_groups(task)
    names = (tuple(r for r in REFERENCES if grouped or r not in GROUPED_REFERENCES)
             + tuple(m.name for m in registered_methods() if m.bench is not None))
    if task is None:
        return names
    table = methods()
    return tuple(n for n in names if task_refusal(table[n], task, model=None, base=False) is None)


def task_refusal(method: Method, task: str, *, model: Mapping[str, Any] | None, base: bool) -> str | None:
    """Why a study of Task ``task`` cannot run ``method``, or None.

    A method refuses a Task its class refuses (``Strategy.task_refusal``: e.g. a method for 2-D
    image tensors); a LoRA method needs a base, which the bench pretrains for the default Task only
    (``base``: one is given); and a method that makes or applies uploads its own way (no
    ``modality_counts``) cannot federate a network with modality groups (the study's network,
    ``model`` the study's ``[model]`` table, None: the Task's default, with the method's entries set).

    Raises:
        ValueError: an unknown Task.
    """
    if method.strategy is None:
        return None
    from fedsilo.coordinator.config import DEFAULT_TASK
    from fedsilo.core.methods import get_method
    from fedsilo.models.tasks import get_task

    the_task = get_task(task)
    cls = get_method(method.strategy)
    why = cls.task_refusal(the_task.name) if hasattr(cls, "task_refusal") else None
    if why is not None:
        return why
    if method.lora and not base and the_task.name != DEFAULT_TASK:
        return (f"{method.name} fine-tunes a pretrained base, which the bench makes for {DEFAULT_TASK} only, "
                f"not for task {the_task.name!r}")
    if not cls.modality_counts:
        groups = _network_groups(the_task.name, json.dumps({**(model or {}), **method.model}, sort_keys=True,
                                                           default=str))
        if groups:
            return (f"{method.name} makes or applies uploads its own way, without per-modality counts, and the "
                    f"study's network has modality groups ({', '.join(groups)})")
    return None


@functools.lru_cache(maxsize=16)
def _network_groups(task: str, entries: str) -> tuple[str, ...]:
    """The modality groups of the network a study of ``task`` builds (seed 0) with ``[model]`` entries ``entries`` (JSON)."""
    from fedsilo.core.phases import modality_of
    from fedsilo.models.tasks import get_task
    from fedsilo.silo_agent.demo import model_table

    the_task = get_task(task)
    net = the_task.build_model(the_task.model_config(model_table(task, 0, json.loads(entries))))
    return tuple(dict.fromkeys(g for k in net.state_dict() if (g := modality_of(k)) is not None))


def variable_tables(method: Method) -> tuple[str, ...]:
    """The tables a variant of ``method`` may vary: ``training``, ``model``, then every table its bench
    defaults give or its registered class lists (``resfim``, ``moon``, ...); none for a reference run."""
    if method.strategy is None:
        return ()
    from fedsilo.core.methods import get_method

    return ("training", "model", *dict.fromkeys([*method.tables, *get_method(method.strategy).tables]))


def methods(*, mu: float | None = None) -> dict[str, Method]:
    """Every method of the study, by name; ``mu`` (if given) replaces any ``proximal_mu`` a method's
    bench defaults set (FedProx's μ)."""
    out = {name: Method(name=name, strategy=None, note=note, why_no_dp="reference run without DP")
           for name, note in REFERENCES.items()}
    for m in registered_methods():
        b = m.bench
        if b is None:
            continue
        training = dict(b.training)
        note = b.note or m.summary
        if mu is not None and "proximal_mu" in training:
            training["proximal_mu"] = mu
            note = note.replace(f"mu = {b.training['proximal_mu']:g}", f"mu = {mu:g}")
        out[m.name] = Method(name=m.name, strategy=b.strategy or m.name, note=note, training=training,
                             he_bound=m.he_bound, tables={k: dict(v) for k, v in b.tables.items()},
                             lora=b.needs_base, privacy=b.privacy, why_no_dp=b.why_no_dp)
    return out


def resolve(name: str, *, mu: float | None = None, task: str | None = None,
            model: Mapping[str, Any] | None = None) -> Method:
    """A study method by name, or a variant of one.

    A variant is ``base@table.key=value[&table.key=value…]``: it runs ``base`` with entries of its
    ``[training]`` table or of one of its own method tables replaced (:func:`variable_tables`:
    ``resfim@resfim.rho=0.2``, ``moon@moon.mu=5``), or with entries of the run's ``[model]`` table
    replaced (``fedavg@model.norm=pn``: a model option aggregated by the base method); values are read
    as JSON where they parse, else as text. Both are checked here: a method table with the variant's
    entries set must parse with the parser the method declares for it (if any), and the study's model
    table with them set must parse with the Task's model config.

    Args:
        name: A method of :func:`study_method_names`, or a variant of one.
        mu: FedProx's μ (see :func:`methods`).
        task: The study's Task, whose model config checks a variant's ``[model]`` entries (None: the
            default Task).
        model: The study's ``[model]`` table (None: the bench's default for the Task).

    Returns:
        The method, named ``name``; a variant's note ends with its entries in brackets.

    Raises:
        ValueError: an unknown base, a reference run that needs silo groups with a Task that has none,
            a malformed variant, a table the base method has not got (named, with those it has), a
            method table its parser refuses, or ``[model]`` entries the Task refuses (the message names
            the variant and the entries).
    """
    base, sep, spec = name.partition("@")
    table = methods(mu=mu)
    if base not in table:
        raise ValueError(f"unknown method {base!r}; choose from {', '.join(study_method_names())}")
    method = table[base]
    if base in GROUPED_REFERENCES:
        from fedsilo.coordinator.config import DEFAULT_TASK

        if not has_groups(task or DEFAULT_TASK):
            raise ValueError(f"{base} trains one model per silo group, but the silos of task "
                             f"{task or DEFAULT_TASK!r} have no groups (its Task does not define group_of)")
    if not sep:
        return method
    if method.strategy is None:
        raise ValueError(f"{name}: {base} is a reference run; it has no settings to vary")
    known = variable_tables(method)
    training = dict(method.training)
    tables = {k: dict(v) for k, v in method.tables.items()}
    entries: dict[str, Any] = {}
    written: list[str] = []  # the model entries as given, for a refusal
    for item in spec.split("&"):
        key, eq, raw = item.partition("=")
        table_name, dot, field = key.partition(".")
        if not (eq and dot and field and raw):
            raise ValueError(f"{name}: a variant is base@table.key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if table_name not in known:
            raise ValueError(f"{name}: {base} has no [{table_name}] table to vary (its tables: "
                             f"{', '.join(known)})")
        if table_name == "training":
            training[field] = value
        elif table_name == "model":
            entries[field] = value
            written.append(item)
        else:
            tables.setdefault(table_name, {})[field] = value
    from fedsilo.core.methods import get_method

    parsers = get_method(method.strategy).tables
    for table_name in dict.fromkeys(item.partition(".")[0] for item in spec.split("&")):
        parse = parsers.get(table_name)
        if parse is not None and table_name in tables:
            try:
                parse(tables[table_name])
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    if entries:
        from fedsilo.silo_agent.demo import model_table

        try:
            model_table(task, 0, entries, base=model)
        except ValueError as exc:
            raise ValueError(f"{name}: {'&'.join(written)} is not a model the study's Task builds: {exc}") from None
    return replace(method, name=name, training=training, tables=tables, model=entries,
                   note=f"{method.note} [{spec}]")


def model_of(method: Method, *, task: str, model: Mapping[str, Any] | None, seed: int) -> dict[str, Any]:
    """The ``[model]`` table ``method``'s runs of ``seed`` build: the study's table with the variant's entries set.

    Args:
        method: A resolved study method or variant.
        task: The study's Task.
        model: The study's ``[model]`` table (None: the demo UNet for ``segmentation-2d``, else the
            Task's default model config, for ``seed``).
        seed: The run's seed.

    Returns:
        A new table.

    Raises:
        ValueError: the Task refuses the table (see :func:`fedsilo.silo_agent.demo.model_table`).
    """
    from fedsilo.silo_agent.demo import model_table

    return model_table(task, seed, method.model, base=model)


def scoring(name: str, *, task: str, model: Mapping[str, Any] | None = None) -> str | None:
    """Which model scores a study method's figures: on each silo's own test set and on the unseen domain.

    Derived from the registered class, never from a list of names: a method whose strategy overrides
    ``unseen_state_dict`` scores the unseen domain with its consensus model (Ditto, FedAvg+FT,
    pFL-ResFIM) and its own data with the personal model; a method whose every entry that training
    changes is shared (probed on the study's network) and that overrides none of the hooks that
    make a silo's model its own (upload, apply, evaluation models, a final personal step) nor masks
    its uploads evaluates one consensus model everywhere; any other evaluates each silo's own model.

    Args:
        name: A study method or variant (``resfim@resfim.rho=0.2``; ``fedavg@model.norm=pn`` is probed
            on its own network, the study's with the variant's model entries set).
        task: The study's Task (its network is the probe).
        model: The study's ``[model]`` table (None: the bench's default for the Task).

    Returns:
        :data:`ONE_MODEL`, :data:`PERSONAL_THEN_CONSENSUS`, :data:`PER_SILO`, :data:`ALONE`,
        :data:`POOLED` or :data:`GROUP_POOLED`; None when it cannot tell (an unknown method or Task, a
        network that does not build).
    """
    try:
        method = resolve(name, task=task, model=model)
    except ValueError:
        return None
    if method.strategy is None:
        return _REFERENCE_SCORING[name]
    from fedsilo.core.methods import get_method
    from fedsilo.silo_agent.strategy import Strategy

    cls = get_method(method.strategy)
    if not issubclass(cls, Strategy):
        return None
    if cls.unseen_state_dict is not Strategy.unseen_state_dict:
        return PERSONAL_THEN_CONSENSUS
    hooks = _PERSONAL_HOOKS[4:] if cls.consensus_aggregate else _PERSONAL_HOOKS
    if cls.masked or any(getattr(cls, hook) is not getattr(Strategy, hook) for hook in hooks):
        return PER_SILO
    try:
        changed, shared = _probe(cls, method, task=task, model=model)
    except Exception:  # noqa: BLE001 - an unregistered Task or a network that does not build: cannot tell
        return None
    return ONE_MODEL if changed <= shared else PER_SILO


def _probe(cls: Any, method: Method, *, task: str, model: Mapping[str, Any] | None) -> tuple[set[str], set[str]]:
    """(the state_dict entries local training can change, those the method shares) on the study's network."""
    from fedsilo.core.phases import SharePhase
    from fedsilo.models.tasks import get_task
    from fedsilo.silo_agent.demo import DEMO_LORA

    t = get_task(task)
    table = model_of(method, task=t.name, model=model, seed=0)
    strategy = cls.for_run({k: dict(v) for k, v in method.tables.items()})
    net = t.build_model(table)
    if cls.uses_lora:
        from fedsilo.models.lora import LoraSettings, add_lora

        net = add_lora(net, LoraSettings.from_mapping(DEMO_LORA), architecture=t.model_config(table).architecture)
        phases = [p for p in SharePhase if cls.alternates or p is SharePhase.ALL]
        changed = {n for n, p in net.named_parameters() if p.requires_grad and any(strategy.trains(n, ph)
                                                                                    for ph in phases)}
    else:
        changed = {k for k, v in net.state_dict().items() if v.is_floating_point()}
    return changed, set(strategy.shared_names(net))


__all__ = ["ALONE", "CENTRALISED", "GROUPED_REFERENCES", "GROUP_POOLED", "LOCAL", "ONE_FOR_ONE", "ONE_MODEL",
           "PERSONAL_THEN_CONSENSUS", "PER_SILO", "POOLED", "REFERENCES", "Method", "has_groups", "methods", "model_of",
           "resolve", "scoring", "study_method_names", "task_refusal", "variable_tables"]
