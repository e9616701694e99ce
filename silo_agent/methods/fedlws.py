"""FedLWS (Shi et al., ICLR 2025): FedAvg's model, each layer shrunk by a factor from the spread of the silos' updates.

Shi, Li, Zhao, Guo and Chang, "FedLWS: Federated Learning with Adaptive Layer-wise Weight
Shrinking", ICLR 2025 (arXiv:2503.15111). The global weight shrinking effect: a global model whose
aggregation weights sum to γ < 1 generalises better; FedLWS sets γ per layer, without a proxy
dataset, from the layer's weights, its aggregated update and the silos' disagreement.

The rule we implement, for every layer l (see "layer" below), with w_g the round's global model
before aggregation, Δ_k = θ_k − w_g silo k's update, p_k the upload weights normalised over the
round's contributors (training examples), and g = Σ_k p_k Δ_k the aggregated update (FedAvg's):

    s_l = sqrt(max(0, Σ_k p_k ‖Δ_k,l‖² − ‖g_l‖²))          the spread of the silos' updates
    τ_l = clamp(β · s_l, τ_min, τ_max)
    γ_l = ‖w_g,l‖ / (‖w_g,l‖ + τ_l ‖g_l‖)                   (γ_l = 1 when ‖w_g,l‖ = 0)
    w_l ← γ_l · (w_g,l + g_l)

i.e. FedAvg's aggregated layer shrunk by γ_l; β = 0.03, τ_min = 0.01, τ_max = 0.2 by default
(``[fedlws] beta``, ``tau_min``, ``tau_max``), the values of the authors' code. The paper writes
γ = ‖w_g‖ / (β τ ‖η_g g‖ + ‖w_g‖) with η_g = 1 (our g is already the aggregated update), and its
code computes τ as β times the mean over clients of ‖Δ_k,l − Δ̄_l‖, clamped.

**Choices that are ours.**

- *Spread.* Under HE nobody sees an individual update, so the spread cannot be a mean of norms.
  We use the weighted variance identity Σ_k p_k ‖Δ_k,l − g_l‖² = Σ_k p_k ‖Δ_k,l‖² − ‖g_l‖²: s_l is
  the weighted root-mean-square deviation of the silos' layer updates from their weighted mean,
  not the paper's (unweighted) mean of norms. By Jensen's inequality RMS ≥ mean of norms, so for
  the same β our τ_l is at least theirs before clamping. Rounding (or an upload outside the
  rules) can make the difference slightly negative: it is clamped at 0.
- *Layer.* One module: the shared floating-point state_dict entries with the same module path
  (the name up to its last ``.``), e.g. a convolution's ``weight`` and ``bias`` together, in
  manifest order. Buffers of a module (BatchNorm's running statistics), when shared, are part of
  its layer and shrink with it, as in the authors' code. The authors group a state_dict by ending
  each layer at a ``bias`` entry; grouping by module is the same for conv/linear + bias layers and
  well defined for every model.
- *Empty layers.* A layer whose global weights are all 0 (nothing to shrink) keeps γ = 1, so it
  can still learn.
- *Extra slot.* Each silo uploads, besides Δ_k, one float64 value per layer in
  :data:`NORM_SLOT`: the mean square ‖Δ_k,l‖² / n_l (n_l the layer's element count), so that
  p_k times it stays within the HE bound whenever the update's elements do. The coordinator adds
  it like any other ciphertext; after decryption and the division by the total weight,
  :meth:`FedLws.apply` multiplies by n_l back.

Privacy. The per-layer mean squares are data-dependent. Record-level DP (DP-SGD): they are
computed from the DP-trained model, so they are post-processing of the ledger's release and cost
no extra ε; the audit report says so. Silo-level DP is refused: its noise would have to cover
these values too (a release of their own), and the noise added to every element of the update
enters ‖g_l‖² and swamps the spread estimate, so τ_l would be set by noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsilo.core import validators
from fedsilo.core.configfile import ConfigError, MethodTable
from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, DpLevel, register_method
from fedsilo.core.tensors import DType, Manifest, TensorSpec
from fedsilo.silo_agent.presets import DEMO_PRIVACY
from fedsilo.silo_agent.strategy import Strategy

torch = lazy_module("torch")

if TYPE_CHECKING:
    from fedsilo.silo_agent.state import AgentState

log = logging.getLogger("fedsilo.agent")

#: The extra upload slot: one float64 value per layer, the silo's mean square update of that layer.
NORM_SLOT = "fedlws--update-ms"


@dataclass(frozen=True, kw_only=True)
class FedLwsSettings(MethodTable):
    """The ``[fedlws]`` table: FedLWS's settings, the same on every silo.

    Attributes:
        beta: β >= 0: τ_l = β × the layer's update spread before clamping (0 with tau_min = 0: FedAvg).
        tau_min: the smallest τ_l, >= 0.
        tau_max: the largest τ_l, >= tau_min.
    """

    TABLE = "fedlws"

    beta: float = 0.03
    tau_min: float = 0.01
    tau_max: float = 0.2

    def __post_init__(self) -> None:
        validators.non_negative("fedlws.beta", self.beta, error=ConfigError)
        validators.non_negative("fedlws.tau_min", self.tau_min, error=ConfigError)
        validators.non_negative("fedlws.tau_max", self.tau_max, error=ConfigError)
        if self.tau_max < self.tau_min:
            raise ConfigError(f"fedlws.tau_max: {self.tau_max!r} must be >= fedlws.tau_min ({self.tau_min!r})")



parse_settings = FedLwsSettings.parse  #: the ``[fedlws]`` parser the method declares in ``tables``


def layers(names: Sequence[str]) -> list[list[str]]:
    """The layers of the shared tensors ``names``: those with the same module path (the name up to its
    last ``.``; a name without one is its own module), in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return list(groups.values())


def spread(mean_sq_norm: float, mean_update: np.ndarray) -> float:
    """s = sqrt(max(0, Σ p_k ‖Δ_k‖² − ‖Σ p_k Δ_k‖²)): the weighted RMS deviation of the updates from
    their weighted mean (p normalised), from the two sums HE gives. A non-finite input gives 0."""
    g = np.asarray(mean_update, dtype=np.float64)
    var = float(mean_sq_norm) - float(np.dot(g.ravel(), g.ravel()))
    return math.sqrt(var) if math.isfinite(var) and var > 0 else 0.0


def shrink_factor(*, weight_norm: float, update_norm: float, tau: float) -> float:
    """γ = ‖w_g‖ / (‖w_g‖ + τ‖g‖); 1 for a layer whose weights are all 0 (nothing to shrink)."""
    if not weight_norm > 0:
        return 1.0
    return weight_norm / (weight_norm + tau * update_norm)


@register_method
class FedLws(Strategy):
    """Shares every floating-point entry as FedAvg does, plus one mean-square slot per layer; each layer
    of the aggregated model is shrunk by its γ_l.

    Args:
        settings: the run's ``[fedlws]`` settings.
    """

    consensus_aggregate = True  # every silo applies the same decrypted aggregate the same way
    name = "fedlws"
    summary = ("FedAvg's model with each layer shrunk by gamma_l = |w| / (|w| + tau_l |g|), tau_l from the spread "
               "of the silos' updates (Shi et al. 2025)")
    order = 18
    refuses = {DpLevel.SILO: "its per-layer update norms are data-dependent releases the update noise does not "
                             "cover, and that noise would swamp the spread it estimates; use record_level DP-SGD"}
    tables = {"fedlws": parse_settings}
    default_tables = frozenset({"fedlws"})
    bench = BenchDefaults(privacy=DEMO_PRIVACY, note="FedLWS: FedAvg's model with each layer shrunk by a factor from "
                          "the spread of the silos' updates (Shi et al. 2025); one extra encrypted value per layer")

    def __init__(self, *, settings: FedLwsSettings | None = None) -> None:
        self.settings = settings if settings is not None else FedLwsSettings()

    @classmethod
    def for_run(cls, tables: Mapping[str, Mapping[str, Any]]) -> FedLws:
        return cls(settings=FedLwsSettings.from_mapping(tables.get("fedlws", {})))

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return True

    # -- the layout: the round's tensors, then one slot per layer ------------------------
    @classmethod
    def upload_layout(cls, manifest: Manifest, rnd: int, total_rounds: int) -> Manifest:
        """The round's shared tensors followed by :data:`NORM_SLOT` (one float64 value per layer)."""
        layout = super().upload_layout(manifest, rnd, total_rounds)
        count = len(layers([t.name for t in layout.tensors]))
        return Manifest(tensors=layout.tensors + (TensorSpec(name=NORM_SLOT, dtype=DType.FLOAT64, shape=(count,)),))

    # -- what travels, and what comes back ----------------------------------------------------
    def upload(self, *, trained: Mapping[str, torch.Tensor], state: AgentState, names: Sequence[str], rnd: int,
               total_rounds: int) -> dict[str, np.ndarray]:
        """Δ_k for each of the round's tensors (FedAvg's upload), then :data:`NORM_SLOT`: ‖Δ_k,l‖² / n_l per layer."""
        out = super().upload(trained=trained, state=state, names=names, rnd=rnd, total_rounds=total_rounds)
        out[NORM_SLOT] = np.array([_sq_norm(out, layer) / _numel(out, layer) for layer in layers(names)],
                                  dtype=np.float64)
        return out

    def he_vector(self, update: Mapping[str, np.ndarray], *, state: AgentState, names: Sequence[str], scale: float,
                  rnd: int, total_rounds: int) -> np.ndarray:
        """The round's tensors, then the slot, flattened in :meth:`upload_layout`'s order, times ``scale``."""
        return super().he_vector(update, state=state, names=[*names, NORM_SLOT], scale=scale, rnd=rnd,
                                 total_rounds=total_rounds)

    def apply(self, *, mean: Mapping[str, np.ndarray], state: AgentState, rnd: int, total_rounds: int) -> None:
        """Adds the mean update g (FedAvg) and shrinks each layer by γ_l.

        Raises:
            ValueError: ``mean`` has no slot, or one of another length than its layers.
        """
        if NORM_SLOT not in mean:
            raise ValueError(f"fedlws: the round's aggregate has no {NORM_SLOT!r} slot")
        names = [k for k in mean if k != NORM_SLOT]
        groups = layers(names)
        ms = np.asarray(mean[NORM_SLOT], dtype=np.float64).reshape(-1)
        if ms.size != len(groups):
            raise ValueError(f"fedlws: {NORM_SLOT!r} holds {ms.size} value(s) for {len(groups)} layer(s)")
        s = self.settings
        gammas = []
        for layer, layer_ms in zip(groups, ms):
            g = np.concatenate([np.asarray(mean[k], dtype=np.float64).ravel() for k in layer])
            w_norm = math.sqrt(sum(float(torch.sum(state.global_shared[k].to(torch.float64) ** 2)) for k in layer))
            tau = min(max(s.beta * spread(layer_ms * g.size, g), s.tau_min), s.tau_max)
            gamma = shrink_factor(weight_norm=w_norm, update_norm=float(np.linalg.norm(g)), tau=tau)
            gammas.append(gamma)
            for k in layer:
                old = state.global_shared[k]
                new = old + torch.from_numpy(np.ascontiguousarray(mean[k])).to(old.dtype)  # FedAvg's step
                if gamma != 1.0:
                    new = (new.to(torch.float64) * gamma).to(old.dtype)
                state.global_shared[k] = new
        if gammas:
            log.info("round %d: FedLWS shrink factors over %d layer(s): min %.6f, mean %.6f", rnd, len(gammas),
                     min(gammas), sum(gammas) / len(gammas))

    # -- what DP audit reports say about the slot -------------------------------------------
    def disclosures(self, *, train: Any, plan: Any = None) -> list[dict[str, str]]:
        """The per-layer mean squares this silo uploads (how a record-level DP run covers them)."""
        return fedlws_disclosures() if plan is not None and plan.record_level else []

    @classmethod
    def run_disclosures(cls, run: Any) -> list[dict[str, str]]:
        """The statements each silo's own reports carry (:meth:`disclosures`), for the coordinator's reports."""
        plan = run.privacy
        return fedlws_disclosures() if plan is not None and plan.record_level else []


def fedlws_disclosures() -> list[dict[str, str]]:
    """What a FedLWS run with record-level DP shares besides the model update, in words for the privacy officer."""
    topic = "FedLWS per-layer update norms (post-processing, covered by the ledger)"
    return [{"topic": topic, "statement": (
        "Besides its model update, each silo uploads one number per layer of the model: the mean square of its "
        "update of that layer. After decrypting the round's sum, every silo shrinks each layer of the aggregated "
        "model by a factor computed from these numbers. They are computed from the model trained with DP-SGD, so "
        "they are post-processing of the silo's record-level release and are covered by its ledger entries (no "
        "extra epsilon). They travel encrypted with the update; the silos decrypt only their weighted sum over all "
        "silos.")}]


def _sq_norm(arrays: Mapping[str, np.ndarray], layer: Sequence[str]) -> float:
    return float(sum(np.dot(a.ravel(), a.ravel()) for a in (np.asarray(arrays[k], dtype=np.float64) for k in layer)))


def _numel(arrays: Mapping[str, np.ndarray], layer: Sequence[str]) -> int:
    return max(1, sum(int(np.asarray(arrays[k]).size) for k in layer))
