"""MOON (Li, He & Song, "Model-Contrastive Federated Learning", CVPR 2021): FedAvg, model-contrastive local loss."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsilo.core.configfile import ConfigError, MethodTable
from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, register_method
from fedsilo.silo_agent.methods.fedavg import FedAvg
from fedsilo.silo_agent.presets import DEMO_PRIVACY

torch = lazy_module("torch")

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

    from fedsilo.models import TrainConfig
    from fedsilo.silo_agent.state import AgentState

#: Prefix of the previous local model's entries in ``AgentState.strategy_state`` (then the state_dict name).
PREVIOUS_PREFIX = "moon/previous/"


@dataclass(frozen=True, kw_only=True)
class MoonSettings(MethodTable):
    """The ``[moon]`` table: MOON's settings, the same on every silo.

    Attributes:
        mu: μ >= 0, the weight of the model-contrastive term in the local loss ``ℓ_task + μ·ℓ_con``.
            The default 1 is the paper's value for CIFAR-100 and Tiny-ImageNet (it used 5 for
            CIFAR-10); our segmentation task loss (DiceCE) is of the same order as their
            cross-entropy. μ = 0 is FedAvg.
        temperature: τ > 0 of the similarities ``sim / τ``; 0.5 as in the paper.
    """

    TABLE = "moon"

    mu: float = 1.0
    temperature: float = 0.5

    def __post_init__(self) -> None:
        for name, low_open in (("mu", False), ("temperature", True)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and (value > 0 if low_open else value >= 0) and value <= 1e6
            if not ok:
                bound = "> 0" if low_open else ">= 0"
                raise ConfigError(f"moon.{name}: {value!r} must be a finite number {bound} (at most 1e6)")
            object.__setattr__(self, name, float(value))



parse_settings = MoonSettings.parse  #: the ``[moon]`` parser the method declares in ``tables``


# -- the representation and the contrastive term (torch, imported on first use) ---------------

def representation_site(model: nn.Module) -> tuple[str, bool]:
    """Where MOON reads a network's representation z: ``(module name, whether it is the module's input)``.

    Our choice (MOON's networks are classifiers whose z is a projection head's output; a
    segmentation UNet has none): z is the UNet's **bottleneck**, the output of the innermost
    MONAI ``SkipConnection``'s submodule (the deepest, lowest-resolution features, the
    encoder's summary of the image: the analogue of the classifier's feature vector), globally
    average-pooled to one vector per image (:func:`pooled`). It is found by structure, not by
    name, so any MONAI ``UNet`` (2-D or 3-D, any depth) qualifies. A network without one
    (UNETR, SwinUNETR) uses the input of its output head (``fedper.head_prefix``): the last
    features before the logits. We add no projection head: every trainable tensor stays shared
    and the network (its fingerprint) is the Task's own.

    Raises:
        ValueError: the network has neither (no parameters).
    """
    from monai.networks.layers import SkipConnection

    skips = [name for name, m in model.named_modules() if isinstance(m, SkipConnection)]
    innermost = [s for s in skips if not any(o != s and o.startswith(s + ".") for o in skips)]
    if innermost:
        return f"{max(innermost, key=len)}.submodule", False
    from fedsilo.silo_agent.methods.fedper import head_prefix

    return head_prefix(model), True


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Global average pooling of ``[N, C, *spatial]`` features to ``[N, C]`` (float32); ``[N, C]`` is kept."""
    z = features.float()
    return z.flatten(2).mean(dim=2) if z.dim() > 2 else z


def contrastive_loss(z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, temperature: float) -> torch.Tensor:
    """MOON's model-contrastive loss of each example (Li, He & Song 2021, Eq. 3), shape ``[N]``.

        ℓ_con = −log( exp(sim(z, z_glob)/τ) / (exp(sim(z, z_glob)/τ) + exp(sim(z, z_prev)/τ)) )

    with sim the cosine similarity (``torch.nn.functional.cosine_similarity``, eps 1e-8): the
    cross-entropy of the logits ``[sim(z, z_glob), sim(z, z_prev)] / τ`` with the global model's
    as the positive, computed stably as ``logsumexp − positive`` (as the authors' code does).

    Args:
        z: the trained model's representations ``[N, D]``.
        z_glob: the round's global model's ``[N, D]`` (the positive pair).
        z_prev: this silo's previous local model's ``[N, D]`` (the negative pair).
        temperature: τ > 0.
    """
    import torch.nn.functional as F

    pos = F.cosine_similarity(z, z_glob, dim=1) / temperature
    neg = F.cosine_similarity(z, z_prev, dim=1) / temperature
    return torch.logsumexp(torch.stack([pos, neg], dim=1), dim=1) - pos


class MoonObjective:
    """MOON's local objective (a ``fedsilo.models.training.LocalObjective``): ``ℓ_task + μ · mean_i ℓ_con,i``.

    z is read by a forward hook on the trained network at :func:`representation_site`; z_glob
    and z_prev by running frozen copies of the round's global model and of this silo's
    previous local model (eval mode, ``torch.no_grad``) on the same batch. Each ℓ_con,i reads
    example i and two fixed models only, so the term is a per-example loss and DP-SGD's
    per-sample gradients (Opacus' hooks on the trained network alone) stay exact.

    Attributes:
        global_model: the round's global model w^t (frozen copy).
        previous_model: this silo's model after its previous local training (frozen copy).
        mu: μ.
        temperature: τ.
        site: :func:`representation_site` of the network.
    """

    def __init__(self, *, global_model: nn.Module, previous_model: nn.Module, mu: float, temperature: float,
                 site: tuple[str, bool]) -> None:
        self.global_model = _frozen(global_model)
        self.previous_model = _frozen(previous_model)
        self.mu, self.temperature, self.site = float(mu), float(temperature), site
        self._seen: dict[str, Any] = {}
        self._forward: Callable[[nn.Module, Any], Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_seen"], state["_forward"] = {}, None  # per call: hooks' captures and the Task's forward
        return state

    @contextlib.contextmanager
    def attach(self, model: nn.Module, *, device: torch.device,
               forward: Callable[[nn.Module, Any], Any]) -> Iterator[None]:
        """Moves the reference models to ``device`` and hooks the representation site of all three."""
        name, is_input = self.site
        handles = []
        for key, net in (("z", model), ("z_glob", self.global_model), ("z_prev", self.previous_model)):
            module = net.get_submodule(name)
            if is_input:
                handles.append(module.register_forward_pre_hook(_capture(self._seen, key, is_input=True)))
            else:
                handles.append(module.register_forward_hook(_capture(self._seen, key, is_input=False)))
        home = [next(m.parameters()).device for m in (self.global_model, self.previous_model)]
        self._forward = forward
        try:
            self.global_model.to(device)
            self.previous_model.to(device)
            yield
        finally:
            for h in handles:
                h.remove()
            self._seen.clear()
            self._forward = None
            self.global_model.to(home[0])
            self.previous_model.to(home[1])

    def loss(self, *, model: nn.Module, inputs: Any, targets: Any, output: Any,
             task_loss: Callable[[Any, Any], torch.Tensor]) -> torch.Tensor:
        """``task_loss(output, targets) + μ · mean over the batch of ℓ_con`` (:func:`contrastive_loss`)."""
        if self._forward is None:
            raise RuntimeError("MoonObjective.loss called outside attach()")
        z = self._seen.pop("z")
        with torch.no_grad():
            self._forward(self.global_model, inputs)
            self._forward(self.previous_model, inputs)
        z_glob, z_prev = self._seen.pop("z_glob"), self._seen.pop("z_prev")
        con = contrastive_loss(pooled(z), pooled(z_glob), pooled(z_prev), self.temperature).mean()
        return task_loss(output, targets) + self.mu * con


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


class _capture:  # noqa: N801 - a hook, named for what it does
    """A forward (pre-)hook that stores a module's output (or first input) under ``key``."""

    def __init__(self, seen: dict[str, Any], key: str, *, is_input: bool) -> None:
        self.seen, self.key, self.is_input = seen, key, is_input

    def __call__(self, module: nn.Module, args: Any, output: Any = None) -> None:
        self.seen[self.key] = args[0] if self.is_input else output


# -- the method -----------------------------------------------------------------------------

@register_method
class Moon(FedAvg):
    """MOON: shares and averages every entry like FedAvg (unchanged under HE); local training
    descends ``ℓ_task + μ·ℓ_con`` (:class:`MoonObjective`).

    Choices that are ours:

    * z is the pooled UNet bottleneck (:func:`representation_site`), without a projection head.
    * First round (no previous local model yet): no contrastive term. With MOON's own start
      (the authors' code begins with z_prev from the global model) z_prev = z_glob makes
      ℓ_con = log 2 for every z, a constant with zero gradient, so the first round is FedAvg
      either way; we skip the two extra forward passes.
    * The previous local model is the silo's model right after its last local training (before
      any silo-level noise, which is added to the upload only), kept in
      ``state.strategy_state`` under ``"moon/previous/<state_dict name>"`` and saved with the
      checkpoint. A silo that missed rounds contrasts with the last model it trained.
    * μ = 0 trains exactly as FedAvg (no objective, no previous model kept).
    * Record-level DP is supported: ℓ_con,i reads example i and two frozen models outside the
      trained module, so it is example i's loss (see :class:`MoonObjective`); the previous model
      is a result of earlier DP-SGD steps (post-processing).
    """

    name = "moon"
    summary = ("FedAvg; local loss adds mu * l_con, contrasting each image's representation with the global "
               "model's and the silo's previous model's (Li, He & Song 2021)")
    order = 17
    tables = {"moon": parse_settings}
    default_tables = frozenset({"moon"})
    bench = BenchDefaults(privacy=DEMO_PRIVACY,
                          note="FedAvg with MOON's model-contrastive term on the representation (the pooled UNet "
                               "bottleneck; a classifier's head input), mu = 1, tau = 0.5 (Li, He & Song 2021)")

    def __init__(self, *, settings: MoonSettings | None = None) -> None:
        self.settings = settings if settings is not None else MoonSettings()

    @classmethod
    def for_run(cls, tables: Mapping[str, Mapping[str, Any]]) -> Moon:
        return cls(settings=MoonSettings.from_mapping(tables.get("moon", {})))

    def local_objective(self, *, model: nn.Module, state: AgentState, train: Dataset,
                        rnd: int) -> MoonObjective | None:
        """MOON's objective with frozen copies of ``model`` (the round's global model w^t) and of
        the stored previous local model; None with μ = 0 or before the silo's first local model."""
        previous = previous_model(state)
        if self.settings.mu == 0 or not previous:
            return None
        prev = copy.deepcopy(model)
        prev.load_state_dict({**model.state_dict(), **previous})
        return MoonObjective(global_model=copy.deepcopy(model), previous_model=prev, mu=self.settings.mu,
                             temperature=self.settings.temperature, site=representation_site(model))

    def after_training(self, *, model: nn.Module, state: AgentState, train: Dataset, train_cfg: TrainConfig,
                       rnd: int) -> None:
        """Keeps the trained local model as next round's previous model (not with μ = 0)."""
        if self.settings.mu == 0:
            return
        for k, v in model.state_dict().items():
            state.strategy_state[PREVIOUS_PREFIX + k] = v.detach().to("cpu").clone()


def previous_model(state: AgentState) -> dict[str, torch.Tensor]:
    """The silo's previous local model kept in ``state.strategy_state`` (copies), or {} before its first."""
    n = len(PREVIOUS_PREFIX)
    return {k[n:]: v.clone() for k, v in state.strategy_state.items() if k.startswith(PREVIOUS_PREFIX)}
