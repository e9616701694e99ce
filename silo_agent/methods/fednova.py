"""FedNova (Wang et al., NeurIPS 2020): each silo's update divided by its local work, rescaled by the mean work.

Wang, Liu, Liang, Joshi and Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020. Silo k takes τ_k local optimiser steps from the round's
global model θ_g and ends at θ_k. With the normalising vector a_k of its optimiser (the paper's
‖a_k‖₁; :func:`work`), FedNova's rule is

    d_k = (θ_g − θ_k) / a_k,    τ_eff = Σ_k p_k a_k,    θ_g ← θ_g − τ_eff · Σ_k p_k d_k,

with p_k the upload weights, normalised over the round's contributors (training examples; the
coordinator fixes them). FedAvg instead moves by Σ_k p_k (θ_k − θ_g), which over-weights the silos
that took more steps; FedNova weights every silo's *direction* by p_k and the step length by the
mean work. With equal a_k the two are the same.

How it travels (one upload, additive HE unchanged): a silo uploads u_k = (θ_k − θ_g) / a_k = −d_k for
every shared tensor plus one float64 slot, :data:`WORK_SLOT` = a_k / :data:`WORK_UNIT` (its name holds
``--``, which no state_dict entry can contain). Under HE each value is scaled by p_k before
encryption, as for every method, and the coordinator adds the ciphertexts knowing nothing of them;
the sum decrypts to [Σ p_k u_k ‖ Σ p_k a_k / WORK_UNIT], and after the division by the contributors'
total weight :meth:`FedNova.apply` multiplies by τ_eff. The plaintext path hands :meth:`FedNova.apply`
the same weighted means, so both give the same model (up to the HE codec's rounding). The slot is
divided by WORK_UNIT = 2^16 so that p_k·a_k stays inside the default HE bound of 1 for up to 65,536
"effective steps" a round (with HE's 2^36 quantisation steps per unit, each silo's rounding moves
τ_eff by at most 2^-20 ≈ 1e-6); a silo whose a_k is larger refuses to upload.

τ_k, the silo's steps in the round, is what ``fedsilo.models.training`` takes: local_epochs ×
⌈n / batch_size⌉ over the silo's n training examples (the last batch of an epoch may be smaller),
or, under record-level DP-SGD, the plan's ``steps_per_round`` on Poisson-sampled batches
(``fedsilo.models.dp_training``). The strategy does not see the training call's ``TrainResult``;
it reads the run's training settings (``RunContext.train_cfg``) and DP plan once in :meth:`FedNova.prepare`
and the training set's size in :meth:`FedNova.train_data` (the very dataset trained on). A test
checks the count against ``train_local``'s own.

a_k by optimiser (the choice of a_k under Adam is ours):

- SGD with momentum ρ (our ``optimizer = "sgd"`` is PyTorch SGD with ρ = 0.9, no dampening):
  a = [τ − ρ(1 − ρ^τ)/(1 − ρ)] / (1 − ρ), the total weight of τ gradients in the displacement
  (the paper's momentum case; τ = 1 gives 1).
- Plain SGD (ρ = 0): a = τ.
- Adam (the default optimiser): a = τ. FedNova's normalisation assumes SGD-like steps whose
  displacement grows with the accumulated gradients; Adam's per-coordinate steps do not have that
  form, so under Adam this is a normalisation by the step count only.

Other choices that are ours: the slot's name and unit (above); τ_k derived from the run's settings
rather than reported by the training call; and a round whose τ_eff decrypts to no number > 0 (only
an upload outside the rules can cause one) leaves the shared model unchanged, logged, instead of
stopping the silo.

Privacy. Record-level DP (DP-SGD): every silo takes the plan's steps with the run's optimiser, so
a_k is the same public number on every silo (and FedNova equals FedAvg); the uploaded u_k is a
function of the DP-trained model (post-processing). Nothing leaves the silo beyond the ledger's
release. Without DP a_k depends only on the silo's training-set size, which it declares at join
anyway, and the run's public ``[training]`` settings. Silo-level DP is refused: its mechanism
clips the whole upload jointly and adds noise to every value, so the public slot a_k would share
the clipping budget with the update and its noise would be multiplied into the step size τ_eff.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, DpLevel, register_method
from fedsilo.core.tensors import DType, Manifest, TensorSpec
from fedsilo.silo_agent.presets import DEMO_PRIVACY
from fedsilo.silo_agent.strategy import RunContext, Strategy, StrategyError

torch = lazy_module("torch")

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from fedsilo.silo_agent.state import AgentState

log = logging.getLogger("fedsilo.agent")

#: The extra upload slot: this silo's a_k / WORK_UNIT (shape (1,), float64).
WORK_SLOT = "fednova--work"
#: The public unit of the work slot: a_k up to 2^16 fits the default HE bound of 1.
WORK_UNIT = 2.0**16
#: The momentum of ``optimizer = "sgd"`` (``fedsilo.models.training``'s SGD; a test checks they agree).
SGD_MOMENTUM = 0.9
#: Optimisers a run may name (``[training] optimizer``).
OPTIMIZERS = ("adam", "sgd")


def work(steps: int, momentum: float = 0.0) -> float:
    """FedNova's a = ‖a‖₁ for ``steps`` local steps of SGD with ``momentum`` ρ (0: plain SGD, a = τ).

    With momentum (PyTorch's v ← ρv + g, θ ← θ − ηv), the gradient of step j still moves the weights
    by η(1 − ρ^{τ−j+1})/(1 − ρ) after τ steps; summed over j this is
    a = [τ − ρ(1 − ρ^τ)/(1 − ρ)] / (1 − ρ) (Wang et al. 2020).

    Args:
        steps: τ >= 1.
        momentum: ρ in [0, 1).

    Raises:
        ValueError: naming the bad argument.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"FedNova work: steps must be an integer >= 1, got {steps!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"FedNova work: momentum must be a number in [0, 1), got {momentum!r}")
    if momentum == 0:
        return float(steps)
    rho = float(momentum)
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


@dataclass(frozen=True, kw_only=True)
class LocalWork:
    """How many local steps a silo takes per round, and its a_k (the run's training settings).

    Attributes:
        optimizer: ``"adam"`` (a = τ) or ``"sgd"`` (momentum :data:`SGD_MOMENTUM`).
        batch_size: examples per step, >= 1 (non-private training).
        local_epochs: passes over the training set per round, >= 1 (non-private training).
        dp_steps: DP-SGD's steps per round (``[privacy] steps_per_round``), replacing epochs and
            batches; 0 without record-level DP.
    """

    optimizer: str = "adam"
    batch_size: int = 8
    local_epochs: int = 1
    dp_steps: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"FedNova LocalWork.optimizer: {self.optimizer!r} must be one of {list(OPTIMIZERS)}")
        for field, lo in (("batch_size", 1), ("local_epochs", 1), ("dp_steps", 0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"FedNova LocalWork.{field}: {value!r} must be an integer >= {lo}")

    @classmethod
    def from_run(cls, training: Mapping[str, Any], plan: Any = None) -> LocalWork:
        """The work of a run with ``[training]`` table ``training`` (as ``GetRun`` sends it) and privacy
        ``plan`` (a ``PrivacyPlan`` or None).

        Raises:
            ValueError: a table ``TrainConfig`` refuses.
        """
        from fedsilo.models import TrainConfig

        return cls.of(TrainConfig.from_mapping(dict(training)), plan)

    @classmethod
    def of(cls, cfg: Any, plan: Any = None) -> LocalWork:
        """The work of a run with training settings ``cfg`` (a ``TrainConfig``) and privacy ``plan``."""
        dp_steps = int(plan.steps_per_round) if plan is not None and plan.record_level else 0
        return cls(optimizer=cfg.optimizer.value, batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
                   dp_steps=dp_steps)

    @property
    def momentum(self) -> float:
        """ρ of the optimiser's momentum (0 for Adam: a = τ, a step-count normalisation only)."""
        return SGD_MOMENTUM if self.optimizer == "sgd" else 0.0

    def steps(self, n: int) -> int:
        """τ: the optimiser steps of one round on ``n`` training examples, as the training loops count them.

        Raises:
            ValueError: ``n`` < 1 without DP (training refuses an empty set).
        """
        if self.dp_steps:
            return self.dp_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"FedNova: the training set must hold at least one example, got {n!r}")
        return self.local_epochs * ((n + self.batch_size - 1) // self.batch_size)

    def work(self, n: int) -> float:
        """a_k of one round on ``n`` training examples (:func:`work` of :meth:`steps`)."""
        return work(self.steps(n), self.momentum)


@register_method
class FedNova(Strategy):
    """Shares every floating-point entry, divided by the silo's local work; the mean is rescaled by the mean work.

    Args:
        local: the run's local work (set by :meth:`prepare` from the run; tests give it).
        n_train: the silo's training-set size (set by :meth:`train_data` each round).
    """

    consensus_aggregate = True  # every silo applies the same decrypted aggregate the same way
    name = "fednova"
    summary = ("each silo's update divided by its local work a_k (steps, momentum-corrected); the mean rescaled "
               "by the mean work (Wang et al. 2020)")
    order = 17
    refuses = {DpLevel.SILO: "its public work slot a_k would be clipped together with the update and noised, and "
                             "the noise multiplied into the step size; use record_level DP-SGD"}
    bench = BenchDefaults(privacy=DEMO_PRIVACY, note="FedNova: updates normalised by local steps, rescaled by the "
                          "mean work (Wang et al. 2020); with DP-SGD every silo takes the plan's steps, so it equals "
                          "FedAvg")

    def __init__(self, *, local: LocalWork | None = None, n_train: int | None = None) -> None:
        self.local = local
        self.n_train = n_train

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return True

    # -- the layout: the round's tensors, then the work slot ------------------------------
    @classmethod
    def upload_layout(cls, manifest: Manifest, rnd: int, total_rounds: int) -> Manifest:
        """The round's shared tensors followed by :data:`WORK_SLOT` (one float64 value)."""
        layout = super().upload_layout(manifest, rnd, total_rounds)
        return Manifest(tensors=layout.tensors + (TensorSpec(name=WORK_SLOT, dtype=DType.FLOAT64, shape=(1,)),))

    # -- once per run, and each round's training set ---------------------------------------
    def prepare(self, ctx: RunContext) -> None:
        """Reads the run's training settings and DP plan from ``ctx``: how many steps this silo takes.

        Raises:
            StrategyError: ``ctx`` carries no training settings.
        """
        if ctx.train_cfg is None:
            raise StrategyError("fednova: the run's training settings are unknown (RunContext.train_cfg)")
        self.local = LocalWork.of(ctx.train_cfg, ctx.privacy.plan if ctx.privacy is not None else None)
        self.n_train = len(ctx.train)  # type: ignore[arg-type]
        log.info("FedNova: %d local step(s) a round (%s), a = %.6g", self.local.steps(self.n_train),
                 "DP-SGD" if self.local.dp_steps else self.local.optimizer, self.local.work(self.n_train))

    def train_data(self, train: Dataset, *, state: AgentState, rnd: int) -> Dataset:
        """``train`` unchanged; its size is what this round's step count is computed from."""
        self.n_train = len(train)  # type: ignore[arg-type]
        return train

    def silo_work(self) -> float:
        """This silo's a_k for the round.

        Raises:
            StrategyError: the run's settings or the training set's size are unknown (:meth:`prepare`
                and :meth:`train_data` must run first), or a_k exceeds what the work slot carries.
        """
        if self.local is None or self.n_train is None:
            raise StrategyError("fednova: the run's training settings are unknown; FedNova.prepare must run first")
        a = self.local.work(self.n_train)
        if not 1.0 <= a <= WORK_UNIT:
            raise StrategyError(f"fednova: a local work a = {a:.6g} is outside [1, {WORK_UNIT:g}], what the work "
                                "slot carries within the HE bound; take fewer local steps per round")
        return a

    # -- what travels, and what comes back -------------------------------------------------
    def upload(self, *, trained: Mapping[str, torch.Tensor], state: AgentState, names: Sequence[str], rnd: int,
               total_rounds: int) -> dict[str, np.ndarray]:
        """``(θ_k − θ_g) / a_k`` for each of the round's tensors, then :data:`WORK_SLOT` = a_k / WORK_UNIT."""
        a = self.silo_work()
        out = {k: ((trained[k].detach() - state.global_shared[k]) / a).numpy() for k in names}
        out[WORK_SLOT] = np.array([a / WORK_UNIT], dtype=np.float64)
        return out

    def he_vector(self, update: Mapping[str, np.ndarray], *, state: AgentState, names: Sequence[str], scale: float,
                  rnd: int, total_rounds: int) -> np.ndarray:
        """The round's tensors, then the work slot, flattened in :meth:`upload_layout`'s order, times ``scale``."""
        return super().he_vector(update, state=state, names=[*names, WORK_SLOT], scale=scale, rnd=rnd,
                                 total_rounds=total_rounds)

    def apply(self, *, mean: Mapping[str, np.ndarray], state: AgentState, rnd: int, total_rounds: int) -> None:
        """θ_g ← θ_g + τ_eff · Σ p_k u_k, with τ_eff = Σ p_k a_k = WORK_UNIT × the slot's mean.

        A τ_eff that is not a finite number > 0 (only a silo uploading outside the rules can cause
        one) leaves the shared model as it was, logged, rather than stopping this silo.

        Raises:
            ValueError: ``mean`` has no work slot.
        """
        if WORK_SLOT not in mean:
            raise ValueError(f"fednova: the round's aggregate has no {WORK_SLOT!r} slot")
        tau_eff = float(np.asarray(mean[WORK_SLOT], dtype=np.float64).reshape(-1)[0]) * WORK_UNIT
        if not (math.isfinite(tau_eff) and tau_eff > 0):
            log.error("round %d: FedNova's mean local work is %r, not a number > 0 (an upload broke the rules); "
                      "the shared model is left as it was", rnd, tau_eff)
            return
        for k, arr in mean.items():
            if k == WORK_SLOT:
                continue
            direction = torch.from_numpy(np.ascontiguousarray(arr))
            old = state.global_shared[k]
            state.global_shared[k] = old + (direction.to(torch.float64) * tau_eff).to(old.dtype)
