"""FedBM (Zhu et al. 2025): a frozen classifier built from language concepts (LKCC) and generator pseudo-samples (CGDE).

Zhu, Yang, Gao, Yuan and Liu, "FedBM: Stealing Knowledge from Pre-trained Language Models for
Heterogeneous Federated Learning", Medical Image Analysis (2025), arXiv:2502.16832. Under label
skew a silo's classifier drifts towards its own classes (classifier bias) and its feature
extractor towards its own inputs (feature bias). FedBM removes the first with a classifier that
no silo trains and the second with pseudo-samples of the global input distribution.

* **LKCC** (:mod:`fedsilo.models.lkcc`): the class concepts (the ``[fedbm] concepts``, default
  the Task's class names from the ``[model]`` table) in every prompt template are embedded by a
  pretrained sentence encoder shipped inside a package (all-MiniLM-L6-v2, the optional extra
  ``fedsilo[fedbm]``); per class a Gaussian (mean, diagonal variance over the templates) in
  embedding space. :meth:`FedBm.wrap_model` replaces the network's ``head`` by
  :class:`~fedsilo.models.lkcc_head.LkccHead`: a trained, shared projection to the embedding space and
  the frozen classifier (buffers, no parameters: no optimiser, no DP-SGD step and no aggregate
  ever changes it). Local training descends the classifier's bound on the expected cross-entropy
  over classifiers drawn from the Gaussians (:meth:`~fedsilo.models.lkcc_head.FrozenConceptClassifier.loss`).
  Every silo builds the same classifier from the same run config; the classifier's buffers are
  part of the model fingerprint every silo's join is checked against (the study's pin, or the
  first silo's model), so a silo whose encoder gives other embeddings (another package version)
  is refused at join.
* **CGDE** (:mod:`fedsilo.models.cgde`): from round 2, before local training, every silo trains
  a fresh conditional generator against the round's global model (the decrypted aggregate)
  with concept embeddings drawn from the Gaussians, seeded by (run seed, round): the same
  generator on every silo, and no record reaches it. Each local step then adds
  ``pseudo_weight`` times the loss on ``pseudo_batch`` generated, class-balanced samples
  (:class:`FedBmObjective`'s ``public_loss``).

Choices that are ours: FedAvg aggregation of everything but the frozen classifier (never
uploaded: it never changes); CGDE from round 2 (round 1's global model is the random
initialisation); the generator from scratch each round (no generator state to keep in step
across silos); the pseudo-sample term added to each step's gradient (after DP-SGD's noise under
record-level DP, as FedProx's term: it reads no record); the ablations ``[fedbm] lkcc = false``
(the Task's own trained linear head and cross-entropy; CGDE still conditions on the concept
Gaussians) and ``cgde = false``.

**Privacy.** The concepts, templates and encoder are public; the generator is a function of the
aggregate, the public Gaussians and a public seed: post-processing, no ε. Record-level DP
(DP-SGD) is supported (the LKCC loss is a per-example loss; the pseudo-sample gradient is added
after the noise). Silo-level DP is supported as for FedAvg (the upload is the model difference).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedsilo.core.configfile import ConfigError, MethodTable
from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, register_method
from fedsilo.silo_agent.methods.fedavg import FedAvg
from fedsilo.silo_agent.presets import DEMO_PRIVACY
from fedsilo.silo_agent.strategy import RunContext, StrategyError

torch = lazy_module("torch")

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn
    from torch.utils.data import Dataset

    from fedsilo.models.lkcc import ConceptGaussians
    from fedsilo.silo_agent.state import AgentState

log = logging.getLogger("fedsilo.agent")

#: The encoders ``[fedbm] encoder`` may name (``fedsilo.models.lkcc.EncoderName`` values).
ENCODERS = ("minilm", "hash")


def _templates() -> tuple[str, ...]:
    from fedsilo.models.lkcc import DEFAULT_TEMPLATES

    return tuple(DEFAULT_TEMPLATES)


def _number(name: str, value: object, *, positive: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > 0 if positive else value >= 0) and value <= 1e6
    if not ok:
        raise ConfigError(f"fedbm.{name}: {value!r} must be a finite number {'> 0' if positive else '>= 0'} "
                          "(at most 1e6)")
    return float(value)


def _count(name: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"fedbm.{name}: {value!r} must be an integer in [{low}, {high}]")
    return value


def _texts(name: str, value: object, *, placeholder: bool) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) \
            or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"fedbm.{name}: {value!r} must be a list of non-empty strings")
    if len(set(value)) != len(value):
        raise ConfigError(f"fedbm.{name}: {list(value)!r} has duplicates")
    if placeholder:
        bad = [v for v in value if v.count("{}") != 1]
        if bad:
            raise ConfigError(f"fedbm.{name}: {bad[0]!r} must contain exactly one '{{}}' (where the concept goes)")
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class FedBmSettings(MethodTable):
    """The ``[fedbm]`` table: FedBM's settings, the same on every silo.

    Attributes:
        lkcc: build the frozen language classifier (False: the Task's trained head; an ablation).
        cgde: train the generator and add its pseudo-samples (False: an ablation).
        encoder: ``"minilm"`` (all-MiniLM-L6-v2 from the ``fedsilo[fedbm]`` extra) or ``"hash"``
            (no language knowledge: hashed words and trigrams; tests and an ablation).
        concepts: one text per class, in label order (empty: the ``[model]`` table's class names).
        templates: prompt templates, each with one ``{}`` (default: ``lkcc.DEFAULT_TEMPLATES``).
        scale: the classifier's logit scale s (default ``lkcc.DEFAULT_SCALE``).
        generator_steps: CGDE's Adam steps per round.
        generator_batch: generated images per generator step.
        pseudo_batch: pseudo-samples added to every local step.
        pseudo_weight: the weight of their loss.
    """

    TABLE = "fedbm"

    lkcc: bool = True
    cgde: bool = True
    encoder: str = "minilm"
    concepts: tuple[str, ...] = ()
    templates: tuple[str, ...] = field(default_factory=_templates)
    scale: float = 0.0
    generator_steps: int = 50
    generator_batch: int = 32
    pseudo_batch: int = 16
    pseudo_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("lkcc", "cgde"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"fedbm.{name}: {getattr(self, name)!r} must be true or false")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"fedbm.encoder: {self.encoder!r} is not one of {list(ENCODERS)}")
        object.__setattr__(self, "concepts", () if self.concepts in ((), []) else
                           _texts("concepts", self.concepts, placeholder=False))
        if self.concepts and len(self.concepts) < 2:
            raise ConfigError(f"fedbm.concepts: {list(self.concepts)!r} must name at least 2 classes")
        object.__setattr__(self, "templates", _texts("templates", self.templates, placeholder=True))
        if self.scale == 0.0:
            from fedsilo.models.lkcc import DEFAULT_SCALE

            object.__setattr__(self, "scale", float(DEFAULT_SCALE))
        object.__setattr__(self, "scale", _number("scale", self.scale, positive=True))
        _count("generator_steps", self.generator_steps, 1, 100_000)
        _count("generator_batch", self.generator_batch, 2, 4096)
        _count("pseudo_batch", self.pseudo_batch, 1, 4096)
        object.__setattr__(self, "pseudo_weight", _number("pseudo_weight", self.pseudo_weight, positive=False))

    def to_mapping(self) -> dict[str, Any]:
        """The plain table (lists for the texts)."""
        out = super().to_mapping()
        out["concepts"], out["templates"] = list(self.concepts), list(self.templates)
        return out


parse_settings = FedBmSettings.parse  #: the ``[fedbm]`` parser the method declares in ``tables``


def class_concepts(settings: FedBmSettings, model_cfg: Any) -> tuple[str, ...]:
    """The class concepts of a run: ``[fedbm] concepts``, else the ``[model]`` table's ``class_names``.

    Raises:
        StrategyError: neither is given, or their counts differ.
    """
    names = getattr(model_cfg, "class_names", None)
    if names is None and isinstance(model_cfg, Mapping):
        names = model_cfg.get("class_names")
    if settings.concepts:
        if names is not None and len(names) != len(settings.concepts):
            raise StrategyError(f"fedbm: [fedbm] concepts names {len(settings.concepts)} classes but the model has "
                                f"{len(names)} ({', '.join(names)})")
        return settings.concepts
    if not names:
        raise StrategyError("fedbm needs a classification Task whose [model] table has class_names (e.g. task = "
                            "\"classification-2d\"), or [fedbm] concepts")
    return tuple(names)


_GAUSSIANS: dict[tuple[Any, ...], Any] = {}


def concept_gaussians(settings: FedBmSettings, concepts: Sequence[str]) -> ConceptGaussians:
    """LKCC's class Gaussians for ``concepts`` under ``settings`` (computed once per process and key).

    Raises:
        StrategyError: the encoder is not installed (the message says what to install).
    """
    from fedsilo.models import lkcc

    key = (settings.encoder, tuple(concepts), settings.templates)
    if key not in _GAUSSIANS:
        try:
            encoder = lkcc.get_encoder(settings.encoder)
            emb = lkcc.concept_embeddings(encoder, list(concepts), list(settings.templates))
        except lkcc.EncoderUnavailable as exc:
            raise StrategyError(f"fedbm: {exc}") from None
        _GAUSSIANS[key] = lkcc.ConceptGaussians.from_embeddings(emb)
    return _GAUSSIANS[key]


def _derived(*parts: int | str) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class FedBmObjective:
    """FedBM's local objective (a ``LocalObjective``): the LKCC loss, and CGDE's pseudo-samples as ``public_loss``.

    Attributes:
        site: the name of the network's frozen classifier module (whose input, the projected
            features, the LKCC loss reads), or None without LKCC (the Task's loss).
        generator: the round's CGDE generator, or None (round 1, or ``cgde = false``).
        gaussians: the class Gaussians the pseudo-samples are conditioned on.
        pseudo_batch: pseudo-samples per step.
        pseudo_weight: the weight of their loss.
        seed: the round's seed of the pseudo-samples (each step ``_derived(seed, step)``).
    """

    def __init__(self, *, site: str | None, generator: nn.Module | None, gaussians: ConceptGaussians,
                 pseudo_batch: int, pseudo_weight: float, seed: int) -> None:
        self.site, self.generator, self.gaussians = site, generator, gaussians
        self.pseudo_batch, self.pseudo_weight, self.seed = pseudo_batch, pseudo_weight, seed
        self._seen: dict[str, Any] = {}
        self._forward: Callable[[nn.Module, Any], Any] | None = None
        self._device: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_seen"], state["_forward"], state["_device"] = {}, None, None
        return state

    @contextlib.contextmanager
    def attach(self, model: nn.Module, *, device: torch.device,
               forward: Callable[[nn.Module, Any], Any]) -> Iterator[None]:
        """Hooks the frozen classifier's input (the features the LKCC loss reads)."""
        handle = None
        if self.site is not None:
            seen = self._seen

            def capture(module: nn.Module, args: Any) -> None:
                seen["f"] = args[0]

            handle = model.get_submodule(self.site).register_forward_pre_hook(capture)
        self._forward, self._device = forward, device
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()
            self._seen.clear()
            self._forward = self._device = None

    def _loss(self, model: nn.Module, output: Any, targets: Any,
              task_loss: Callable[[Any, Any], torch.Tensor]) -> torch.Tensor:
        if self.site is None:
            return task_loss(output, targets)
        return model.get_submodule(self.site).loss(self._seen.pop("f"), targets)

    def loss(self, *, model: nn.Module, inputs: Any, targets: Any, output: Any,
             task_loss: Callable[[Any, Any], torch.Tensor]) -> torch.Tensor:
        """The LKCC bound of the batch (each example's own features), or the Task's loss without LKCC."""
        if self._forward is None:
            raise RuntimeError("FedBmObjective.loss called outside attach()")
        return self._loss(model, output, targets, task_loss)

    def public_loss(self, model: nn.Module, *, step: int) -> torch.Tensor | None:
        """``pseudo_weight`` × the loss on ``pseudo_batch`` class-balanced pseudo-samples (None without a generator)."""
        if self.generator is None or self.pseudo_weight == 0:
            return None
        if self._forward is None:
            raise RuntimeError("FedBmObjective.public_loss called outside attach()")
        from torch.nn import functional

        from fedsilo.models.cgde import pseudo_batch

        gen = torch.Generator().manual_seed(_derived(self.seed, step))
        x, y = pseudo_batch(self.generator, self.gaussians, self.pseudo_batch, gen)
        x, y = x.to(self._device), y.to(self._device)
        output = self._forward(model, x)
        return self.pseudo_weight * self._loss(model, output, y, functional.cross_entropy)


@register_method
class FedBm(FedAvg):
    """FedBM: FedAvg of everything but the frozen language classifier; LKCC loss; CGDE pseudo-samples (module doc)."""

    name = "fedbm"
    summary = ("frozen classifier from class-concept embeddings of a packaged sentence encoder (LKCC) and pseudo-"
               "samples of a generator trained on the global model (CGDE), FedAvg of the rest (Zhu et al. 2025)")
    order = 19
    needs_2d = "its generator produces 2-D images"
    tables = {"fedbm": parse_settings}
    default_tables = frozenset({"fedbm"})
    bench = BenchDefaults(privacy=DEMO_PRIVACY,
                          note="FedBM: frozen MiniLM concept classifier (LKCC) + generator pseudo-samples from the "
                               "global model (CGDE), FedAvg of the rest (Zhu et al. 2025)")

    def __init__(self, *, settings: FedBmSettings | None = None) -> None:
        self.settings = settings if settings is not None else FedBmSettings()
        self.gaussians: ConceptGaussians | None = None
        self.image_shape: tuple[int, ...] | None = None
        self.seed = 0
        self.generator: nn.Module | None = None
        self._generator_round = 0

    @classmethod
    def for_run(cls, tables: Mapping[str, Mapping[str, Any]]) -> FedBm:
        return cls(settings=FedBmSettings.from_mapping(tables.get("fedbm", {})))

    # -- the network ---------------------------------------------------------------------------
    def wrap_model(self, model: nn.Module, *, model_cfg: Any, base_checkpoint: Path | None) -> nn.Module:
        """The Task's network, its ``head`` replaced by an :class:`~fedsilo.models.lkcc_head.LkccHead` (with LKCC).

        Raises:
            StrategyError: the network has no linear ``head`` of the concepts' class count, or the
                encoder is not installed.
        """
        concepts = class_concepts(self.settings, model_cfg)
        self.gaussians = concept_gaussians(self.settings, concepts)
        head = getattr(model, "head", None)
        if not isinstance(head, torch.nn.Linear) or head.out_features != len(concepts):
            raise StrategyError(f"fedbm needs a network whose 'head' is a Linear layer to {len(concepts)} classes (the "
                                f"classification Task's); got {type(head).__name__}")
        if self.settings.lkcc:
            from fedsilo.models.lkcc_head import LkccHead

            seed = int(getattr(model_cfg, "seed", 0) or 0)
            model.head = LkccHead(in_features=head.in_features, gaussians=self.gaussians, scale=self.settings.scale,
                                  seed=_derived("fedbm-projection", seed))
        return model

    def is_shared(self, name: str, model: nn.Module) -> bool:
        """Everything but the frozen classifier's buffers (built identically on every silo, never changed)."""
        return name not in frozen_names(model)

    # -- once per run, each round --------------------------------------------------------------
    def prepare(self, ctx: RunContext) -> None:
        """Notes the inputs' shape (no values) and the run's seed, which CGDE's generator needs."""
        self._note_run(ctx)

    def _note_run(self, ctx: RunContext) -> None:
        if self.image_shape is None and len(ctx.train) > 0:  # type: ignore[arg-type]
            self.image_shape = tuple(int(v) for v in ctx.train[0][0].shape)
        if ctx.train_cfg is not None:
            self.seed = int(ctx.train_cfg.seed)

    def before_training(self, ctx: RunContext, *, model: nn.Module, state: AgentState, rnd: int,
                        trainable: frozenset[str], shared_names: Sequence[str]) -> None:
        """From round 2 (with CGDE): trains the round's generator from ``model``, the round's global model."""
        self._note_run(ctx)
        if not self.settings.cgde or rnd < 2 or self._generator_round == rnd:
            return
        self.generator = self.train_generator(model, rnd)
        self._generator_round = rnd

    def train_generator(self, global_model: nn.Module, rnd: int) -> nn.Module:
        """CGDE's generator of round ``rnd``: a function of ``global_model``, the Gaussians, the shape and the seed only.

        Raises:
            StrategyError: before :meth:`wrap_model` or without the inputs' shape.
        """
        from fedsilo.models.cgde import CgdeSettings, train_generator

        if self.gaussians is None or self.image_shape is None or len(self.image_shape) != 3:
            raise StrategyError("fedbm: CGDE needs the class Gaussians (wrap_model) and the inputs' (C, H, W) shape")
        settings = CgdeSettings(steps=self.settings.generator_steps, batch=self.settings.generator_batch)
        t0 = time.monotonic()
        g = train_generator(global_model, self.gaussians, image_shape=self.image_shape,  # type: ignore[arg-type]
                            settings=settings, seed=_derived("fedbm-cgde", self.seed, rnd))
        log.info("round %d: FedBM: CGDE generator trained on the global model (%d steps, %.1f s)", rnd,
                 settings.steps, time.monotonic() - t0)
        return g

    def local_objective(self, *, model: nn.Module, state: AgentState, train: Dataset,
                        rnd: int) -> FedBmObjective | None:
        """The LKCC loss (with LKCC) and the round's pseudo-samples (with a generator); None without either."""
        site = classifier_site(model) if self.settings.lkcc else None
        generator = self.generator if self.settings.cgde and self._generator_round == rnd else None
        if site is None and generator is None:
            return None
        if self.gaussians is None:
            raise StrategyError("fedbm: the class Gaussians are unknown; wrap_model must run first")
        return FedBmObjective(site=site, generator=generator, gaussians=self.gaussians,
                              pseudo_batch=self.settings.pseudo_batch, pseudo_weight=self.settings.pseudo_weight,
                              seed=_derived("fedbm-pseudo", self.seed, rnd))

    # -- for the privacy officer ---------------------------------------------------------------
    def disclosures(self, *, train: Any, plan: Any = None) -> list[dict[str, str]]:
        """What FedBM adds to the averaged model (:func:`fedbm_disclosures`)."""
        return fedbm_disclosures()

    @classmethod
    def run_disclosures(cls, run: Any) -> list[dict[str, str]]:
        """The silos' statement, for the coordinator's audit reports of a DP run."""
        return [] if getattr(run, "privacy", None) is None else fedbm_disclosures()


def fedbm_disclosures() -> list[dict[str, str]]:
    """FedBM's statement for the audit report: the generator is post-processing, the classifier public."""
    return [{"topic": "FedBM generator (CGDE) and frozen classifier (LKCC): no extra privacy cost",
             "statement": (
                 "Each silo trains, from round 2, a generator of pseudo-images from the round's global model (the "
                 "decrypted aggregate, already covered by the ledger), class-concept Gaussians computed from public "
                 "text (class names and prompt templates embedded by a packaged sentence encoder) and a public "
                 "seed; no record of any silo is read. It is post-processing of the aggregate: no extra epsilon. "
                 "Its pseudo-samples' gradient is added to each local step after DP-SGD's noise, like FedProx's "
                 "term. The frozen classifier is built from public text only and is never uploaded.")}]


def frozen_names(model: nn.Module) -> set[str]:
    """The state_dict names of every frozen concept classifier's buffers in ``model``."""
    from fedsilo.models.lkcc_head import FrozenConceptClassifier

    out: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, FrozenConceptClassifier):
            out.update(f"{prefix}.{b}" if prefix else b for b, _ in module.named_buffers())
    return out


def classifier_site(model: nn.Module) -> str | None:
    """The name of ``model``'s frozen concept classifier module, or None."""
    from fedsilo.models.lkcc_head import FrozenConceptClassifier

    found = [name for name, m in model.named_modules() if isinstance(m, FrozenConceptClassifier)]
    return found[0] if found else None
