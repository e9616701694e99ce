"""The method registry: one class per method declares what it shares, its layout, DP levels, HE needs and relays.

A method is one module (``silo_agent/methods/<name>.py``) with one class registered by
:func:`register_method`, the way Opacus registers grad samplers. The class's torch-free part —
everything on :class:`Method` — is all the coordinator, config validation, the CLI and the bench
ever read; the agent instantiates the same class and calls its training-side hooks (defined by
``fedsilo.silo_agent.strategy.Strategy``, which imports torch only inside its methods).
Nothing else lists methods by hand: every choice list and rule derives from :func:`method_names`
and :func:`get_method`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar

from fedsilo.core.errors import InvalidArgument
from fedsilo.core.phases import (
    LORA_A_MARK,
    LORA_B_MARK,
    MASK_SUFFIXES,
    SharePhase,
    modality_groups,
    modality_slots,
    phase_manifest,
)
from fedsilo.core.tensors import Manifest

__all__ = ["DEFAULT_METHOD", "BenchDefaults", "DpLevel", "Method", "UnknownMethod", "get_method", "method_names", "methods",
           "register_method", "unregister_method"]


_ROUND_DIGITS = re.compile(r"[1-9][0-9]{0,5}")

#: The method of a run that names none (``run.strategy`` left out): FedAvg.
DEFAULT_METHOD = "fedavg"


class DpLevel(enum.Enum):
    """A differential-privacy level a run may plan (the ``[privacy]`` flag of that name)."""

    #: DP-SGD: one patient's record.
    RECORD = "record_level"
    #: Clip + noise of the whole update: one silo's whole dataset.
    SILO = "silo_level"


class UnknownMethod(ValueError):
    """A method name no module registered; the message lists the registered ones."""


@dataclass(frozen=True, kw_only=True)
class BenchDefaults:
    """How ``fedsilo bench`` and ``fedsilo demo`` run a method.

    Attributes:
        strategy: the ``run.strategy`` a bench cell runs (a registered name; default: the method itself).
        training: entries added to the run's ``[training]`` table (e.g. FedProx's μ).
        tables: other run tables it needs (e.g. ``{"resfim": {...}}``).
        privacy: its ``[privacy]`` plan when a study runs with DP; None: it cannot (``why_no_dp``).
        why_no_dp: the reason it runs only without DP.
        needs_base: it fine-tunes adapters on a base pretrained on a domain no silo holds.
        note: one line for the study's summary: what it shares, what it keeps.
    """

    note: str = ""
    strategy: str = ""
    training: Mapping[str, Any] = field(default_factory=dict)
    tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    privacy: Mapping[str, Any] | None = None
    why_no_dp: str = ""
    needs_base: bool = False


class Method:
    """Everything about one method that is not training code: the coordinator's and the config's view.

    Subclasses set the class attributes and override the layout hooks where they differ from
    FedAvg's (the whole manifest every round, one ledger release per round).

    Attributes:
        name: the registered name: in config files (``run.strategy``), on the wire, on the command line.
        summary: one line: what it does, with its citation.
        refuses: DP levels it cannot run under, each with the reason the config refusal states.
        needs_he: why it needs HE aggregation ("" when it does not).
        min_silos: the fewest enrolled silos it works with, and why ("" when 1).
        he_bound: the HE bound its uploads need (None: the run's default).
        relays: purposes of the sealed relay it exchanges blobs under before training.
        round_relays: prefixes of per-round relay purposes: ``<prefix><r>`` carries round r's
            blobs, published only while round r is open and read only once it has opened (so a
            silo can store at most one blob per prefix and round).
        tables: config tables it reads besides the common ones, each with its parser (a callable
            that takes the table and returns its complete, validated settings as a plain mapping,
            raising ValueError naming the key), or None for a table its agents validate.
        default_tables: those of ``tables`` it needs even when the config leaves them out (the
            parser's defaults are used).
        privacy_keys: ``[privacy]`` keys it adds to the common ones (its own releases' settings).
        alternates: whether its rounds alternate LoRA factors (DEeR's share phases).
        masked: whether uploads carry ResFIM's companion sets (mask weights, local parts).
        uses_lora: whether silos train LoRA adapters on a frozen base.
        needs_2d: why it works on 2-D images only ("" when it takes any Task); a run of a Task
            whose ``spatial_dims`` is not 2 (e.g. ``segmentation-3d``) refuses it.
        modality_counts: whether its uploads carry a count slot per modality group
            (:func:`fedsilo.core.phases.modality_slots`), so a network with ``modality_<g>`` tensors
            (trained only where a silo holds modality g) is averaged over the silos that hold g. The
            agent-side defaults implement it; a method that overrides how uploads are made or applied
            does not, unless it says so (see ``Strategy``), and a run of such a network refuses it.
        bench: how ``fedsilo bench`` runs it; None: not one of the study's methods.
        order: where it stands in choice lists and the study's tables (then by name).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    refuses: ClassVar[Mapping[DpLevel, str]] = {}
    needs_he: ClassVar[str] = ""
    min_silos: ClassVar[tuple[int, str]] = (1, "")
    he_bound: ClassVar[float | None] = None
    relays: ClassVar[frozenset[str]] = frozenset()
    round_relays: ClassVar[frozenset[str]] = frozenset()
    tables: ClassVar[Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]] | None]] = {}
    default_tables: ClassVar[frozenset[str]] = frozenset()
    privacy_keys: ClassVar[frozenset[str]] = frozenset()
    alternates: ClassVar[bool] = False
    masked: ClassVar[bool] = False
    uses_lora: ClassVar[bool] = False
    needs_2d: ClassVar[str] = ""
    modality_counts: ClassVar[bool] = True
    bench: ClassVar[BenchDefaults | None] = None
    order: ClassVar[int] = 1000

    # -- layout: torch-free, the same on the coordinator and the agents -------------------
    @classmethod
    def phase(cls, rnd: int) -> SharePhase:
        """The share phase of round ``rnd`` (1-based).

        DEeR (Zhu, Mao, Liu, Yuan 2024, arXiv:2410.12926) alternates: odd rounds share only B
        with A frozen, even rounds only A with B frozen, so every round's mean of products equals
        the product of means. Every other method shares its whole manifest every round.
        """
        if cls.alternates:
            return SharePhase.LORA_B if rnd % 2 == 1 else SharePhase.LORA_A
        return SharePhase.ALL

    @classmethod
    def carries_local_part(cls, rnd: int, total_rounds: int) -> bool:
        """Whether masked round ``rnd`` uploads the local parts too: only the rounds whose sums make
        the final consensus model (the last round; with alternating LoRA factors, the last two, one
        per factor). Other rounds upload two sets instead of three."""
        return cls.masked and rnd > total_rounds - (2 if cls.alternates else 1)

    @classmethod
    def upload_layout(cls, manifest: Manifest, rnd: int, total_rounds: int) -> Manifest:
        """What an upload of round ``rnd`` carries: the run's manifest restricted to the round's
        phase, plus the companion sets of a masked method (every companion tensor has its
        tensor's shape and dtype; the coordinator adds them as ciphertexts like any other and
        never sees a mask), then one count slot per modality group of the round's tensors (a
        method with :attr:`modality_counts`)."""
        layout = phase_manifest(manifest, cls.phase(rnd))
        extra: tuple = ()
        if cls.masked:
            suffixes = MASK_SUFFIXES if cls.carries_local_part(rnd, total_rounds) else MASK_SUFFIXES[:1]
            extra = tuple(replace(t, name=t.name + suffix) for suffix in suffixes for t in layout.tensors)
        if cls.modality_counts:
            extra += modality_slots(layout)
        return Manifest(tensors=layout.tensors + extra) if extra else layout

    @classmethod
    def relay_round(cls, purpose: str) -> int | None:
        """The round a per-round relay purpose (``<prefix><r>``, a prefix of :attr:`round_relays`)
        names, or None for any other purpose (r is a decimal without leading zeros, at most 6 digits)."""
        for prefix in cls.round_relays:
            tail = purpose[len(prefix):] if purpose.startswith(prefix) else ""
            if _ROUND_DIGITS.fullmatch(tail):
                return int(tail)
        return None

    @classmethod
    def check_manifest(cls, manifest: Manifest) -> None:
        """Checks a joining silo's shared tensors suit the method.

        Raises:
            InvalidArgument: e.g. an alternating method without LoRA factors of both kinds, or a
                network with modality groups for a method without :attr:`modality_counts`.
        """
        groups = modality_groups(manifest)
        if groups and not cls.modality_counts:
            raise InvalidArgument(f"strategy {cls.name} cannot average the network's modality groups "
                                  f"({', '.join(groups)}: tensors only silos with that modality train); it makes "
                                  f"or applies uploads its own way, without per-modality counts")
        if not cls.alternates:
            return
        for phase, mark in ((SharePhase.LORA_B, LORA_B_MARK), (SharePhase.LORA_A, LORA_A_MARK)):
            if not any(mark in t.name for t in manifest.tensors):
                kind = phase.value.replace("_", " ").replace("lora", "LoRA")
                raise InvalidArgument(f"strategy {cls.name} needs LoRA factors to share, but no shared tensor is a "
                                      f"{kind} factor")

    @classmethod
    def ledger_position(cls, rnd: int) -> tuple[int, int]:
        """(round, upload index) under which round ``rnd``'s release is written in a privacy ledger.

        A DEeR round is two uploads, B then A: coordinator rounds 2k−1 and 2k are DEeR round k,
        uploads 0 and 1. Other methods upload once per round.
        """
        if cls.alternates:
            return (rnd + 1) // 2, (rnd + 1) % 2
        return rnd, 0

    @classmethod
    def check_run(cls, run: Any) -> None:
        """Method-specific rules on a whole run config beyond the declared ones (default: none).

        Args:
            run: the ``FederationConfig`` being validated (its other fields are already valid).

        Raises:
            ValueError: naming the config field at fault.
        """

    @classmethod
    def plan_privacy(cls, table: dict[str, Any], tables: Mapping[str, Mapping[str, Any]], *, record: bool,
                     rounds: int) -> list[Any]:
        """Completes a run's ``[privacy]`` table (in place) with the plan fields of this method's own
        releases and returns those releases that are fixed in advance (DP-SGD's σ is calibrated on
        what they leave of a target ε). Default: no releases of its own.

        Args:
            table: the ``[privacy]`` table being parsed (its ``privacy_keys`` included).
            tables: the run's method tables (parsed).
            record: whether the plan is record-level.
            rounds: the run's rounds.

        Raises:
            ValueError: naming the ``[privacy]`` key at fault.
        """
        return []

    @classmethod
    def check_privacy(cls, plan: Any, run: Any) -> None:
        """Rules between the run's privacy plan and this method's tables (default: none).

        Raises:
            ValueError: naming the config field at fault.
        """

    @classmethod
    def run_disclosures(cls, run: Any) -> list[dict[str, str]]:
        """What a run of this method shares outside the privacy ledger, as ``{"topic", "statement"}``
        items for DP audit reports written by the coordinator (default: nothing)."""
        return []


M = TypeVar("M", bound=type[Method])

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: M) -> M:
    """Class decorator: registers a :class:`Method` subclass under its ``name``.

    Raises:
        ValueError: no name, no summary, or a name another class already registered.
    """
    name = cls.name
    if not name or not isinstance(name, str) or name != name.strip().lower() or " " in name:
        raise ValueError(f"method {cls.__qualname__}: name must be a non-empty lowercase word, got {name!r}")
    if not cls.summary:
        raise ValueError(f"method {name!r}: a one-line summary (with its citation) is required")
    known = _REGISTRY.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"method {name!r} is already registered by {known.__module__}.{known.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Removes a registered method (tests that register a toy method clean up with it)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> type[Method]:
    """The method registered as ``name``.

    Raises:
        UnknownMethod: naming the registered methods.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownMethod(f"{name!r} is not one of the registered methods ({', '.join(method_names()) or 'none'})") from None


def methods() -> tuple[type[Method], ...]:
    """Registered method classes, by their ``order`` and then name."""
    return tuple(sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name)))


def method_names() -> tuple[str, ...]:
    """Registered method names, by their ``order`` and then name."""
    return tuple(m.name for m in methods())
