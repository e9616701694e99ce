"""FedAWA (Shi et al., CVPR 2025): aggregation weights optimised from per-silo scalars of the client vectors, under HE.

Shi, Zhao, Zhang, Zhou, Guo and Chang, "FedAWA: Adaptive Optimization of Aggregation Weights in
Federated Learning Using Client Vectors", CVPR 2025 (arXiv:2503.15842). In the paper the server
holds every client vector τ_k = θ_k − θ_g (local model minus the round's global model) and sets
the aggregation weights to λ = softmax(T), T taking a few optimiser steps (Adam) on

    L(λ) = Σ_k λ_k · (1 − cos(θ_g, θ_k))  +  Σ_k λ_k · ‖τ_k − Σ_j λ_j τ_j‖₂            (paper)

(a cosine "regularisation" between the global and each local model, and the distance of each
client vector to their λ-weighted mean, the paper's "global" direction: the objective as a public
re-implementation of the authors' code, github.com/ChanglongShi/FedAWA, writes it; the paper's
method section itself was not reachable from here). The global model becomes Σ_k λ_k θ_k, i.e.
θ_g + Σ_k λ_k τ_k.
fedsilo's coordinator never sees a τ_k, so this module computes the weights on the silos, from
two scalars per silo, and lets the coordinator add encrypted, already weighted uploads as for any
method.

**What a silo releases** (every round r ≥ 2, after training, before its upload). With
g = Δ_g^{r−1} the global update the silos applied last (the decrypted mean of the last good round,
identical on every silo) and τ_k this round's update (the shared tensors' ``new − old``, flattened):

    c_k = cos(τ_k, g) = ⟨τ_k, g⟩ / (‖τ_k‖ ‖g‖)   (0 when τ_k = 0),     n_k = ‖τ_k‖₂.

(‖τ_k − g‖ follows from them and ‖g‖, which every silo knows.) The pair is sealed with the run's
shared secret (sealing purpose ``fedawa-scalars/v1/r<r>``, the round authenticated), kept in the
state dir, and published through the coordinator's sealed relay under purpose ``fedawa-r<r>``
(one blob per silo, purpose and run is the relay's rule, hence a purpose per round, declared in
``Method.round_relays``: the coordinator takes round r's blob only while round r is open).

**The weights** (:func:`aggregation_weights`, a deterministic function of the set of
(silo, c, n): sorted by silo name, so the order of arrival does not matter). Every client vector
is split along g: τ_k = a_k ĝ + p_k with a_k = n_k c_k and ‖p_k‖² = q_k = n_k²(1 − c_k²). Assuming
the parts orthogonal to g are mutually orthogonal (⟨p_i, p_j⟩ = 0 for i ≠ j: the Gram matrix of
the client vectors is approximated by a aᵀ + diag(q)), the paper's distance term is exactly

    ‖τ_k − Σ_j λ_j τ_j‖² = (a_k − Σ_j λ_j a_j)² + q_k (1 − λ_k)² + Σ_{j≠k} λ_j² q_j,

so the silos minimise (ours, in units of the mean norm s = mean_k n_k so step sizes are
dimensionless)

    L̃(λ) = Σ_k λ_k D_k(λ),
    D_k(λ) = √[(a_k − Σ_j λ_j a_j)² + q_k (1 − λ_k)² + Σ_{j≠k} λ_j² q_j] / s

by ``steps`` mirror-descent (exponentiated-gradient) steps from T = 0 (uniform λ):
T ← clip(T − η (h − mean(h)), −M, M) with h = ∂L̃/∂λ (analytic), λ = softmax(T); η =
``step_size``, M = ``max_logit``. A silo whose update points away from the others' (small or
negative c_k) or is much longer than theirs lies far from the weighted mean and loses weight.

**How far this is from the paper (our choices):**

- the client vectors' Gram matrix is approximated by a aᵀ + diag(q) around the last global
  update g: exact when the components orthogonal to g are mutually orthogonal (e.g. when at most
  one silo's vector leaves the line of g), an underestimate of the silos' agreement where they
  share a direction g does not capture (this round's common direction is assumed to be g's);
- the paper's cosine term between global and local *models* is left out: it would need a third
  released scalar per silo, and for a model whose weights are much longer than one round's update
  it is of second order (≈ ‖τ_k⊥θ_g‖² / (2‖θ_g‖²));
- mirror-descent steps (λ_k ∝ λ_k e^{−η h_k}) on a normalised objective instead of Adam on T:
  Adam's per-coordinate normalisation turns arbitrarily small differences between silos into
  full-size steps, so nearly identical silos would not get nearly identical weights;
- T starts at 0 every round (uniform λ), not from the previous round's T; the weights replace
  FedAvg's data-size weights (the paper's λ does too); |T_k| ≤ M bounds any silo's weight
  against the others' by e^{2M} (the scalars are self-reported; see below);
- round 1 (no previous global update), and any round whose reference g is missing or zero, uses
  uniform weights and releases nothing.

**Waiting and missing silos.** A silo waits for the scalars of every joined silo, polling every
``poll_s``, for at most ``wait_s`` seconds, then computes its weights from the scalars that
arrived (its own always included); a silo missing from the set is simply not in it. Silos that
end up with different sets still produce a normalised weighted mean (each contributor weighted as
its own set says): see *The upload*.

**The upload** (additive HE, coordinator unchanged). Silo k uploads f_k·τ_k followed by one
float64 slot :data:`WEIGHT_SLOT` = f_k, with f_k = b · λ_k / max_j λ_j and b = min(1, the HE bound)
(so f_k ≤ 1 keeps every value inside the codec's per-silo bound, as FedAvg's n_k/Σn does). The
coordinator adds the ciphertexts; every silo decrypts [Σ f_k τ_k ‖ Σ f_k] and applies
Σ f_k τ_k / Σ f_k = Σ λ_k τ_k / Σ λ_k over the round's actual contributors (b cancels, and so
does max λ when the silos computed the same λ; a silo that published scalars but did not upload
is simply in neither sum). The declared
training-set sizes (the coordinator's weights and ``weight_normalizer``) are not used. An
aggregate whose slot does not sum to a finite number > 0 (only an upload outside the rules can
cause one) leaves the shared model as it was, logged, on every silo alike.

**Privacy.** The scalars are a release of the silo's data. *Without DP* they are not noised and
not in any ledger: sealed against the coordinator, readable by the other silos, and stated as a
disclosure. *Record-level DP*: DP-SGD noises the gradients during training, so the trained model,
its update τ_k (the very release the round's ledger entry accounts, written before anything
leaves) and any function of it and of public or already-released values (g is the decrypted
mean of earlier DP releases) are post-processing: c_k and n_k add no ε; the audit report says so
(:meth:`FedAwa.disclosures`). *Silo-level DP* is refused: each silo's noise share σC/√K would
be multiplied by its own weight, so the aggregate would no longer carry noise σC against every
silo's contribution, which is what the plan states. What additive HE cannot check is stated too:
a silo may report scalars that do not match its update to gain weight (at most e^{2M} times
another silo's) or send a weight slot that does not match the weight it used.

**Restarts.** The sealed blob of round r is written to the state dir before it is published; a
restarted silo republishes those bytes and uses the scalars in them (if it trained the round
again, its weight comes from the first training's scalars, which is what the other silos used).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from fedsilo.core import validators
from fedsilo.core.configfile import ConfigError, MethodTable
from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, DpLevel, register_method
from fedsilo.core.tensors import DType, Manifest, TensorSpec
from fedsilo.silo_agent.client import Stopped
from fedsilo.silo_agent.fedawa_weights import (
    aggregation_weights,
    client_scalars,
    scalars_from_bytes,
    scalars_to_bytes,
    upload_factor,
)
from fedsilo.silo_agent.presets import DEMO_PRIVACY
from fedsilo.silo_agent.secure import write_private
from fedsilo.silo_agent.strategy import RunContext, Strategy, StrategyError

torch = lazy_module("torch")

if TYPE_CHECKING:
    from fedsilo.silo_agent.state import AgentState

log = logging.getLogger("fedsilo.agent")

#: The extra upload slot: this silo's weight factor f_k (shape (1,), float64; its name holds ``--``,
#: which no state_dict entry can contain).
WEIGHT_SLOT = "fedawa--weight"
#: Relay purposes: ``fedawa-r<round>``.
RELAY_PREFIX = "fedawa-r"
#: ``state.strategy_state`` keys: the last applied global update (flat float32, the layout's
#: tensors in order) and [round, λ_own, f_own, silos in the set] of this silo's last weighted upload.
REFERENCE_KEY = "fedawa/reference"
WEIGHT_KEY = "fedawa/weight"
SCALARS_POLL_S = 0.5



def sealing_purpose(rnd: int) -> str:
    """The purpose round ``rnd``'s scalars are sealed (and authenticated) under."""
    return f"fedawa-scalars/v1/r{rnd}"


def relay_purpose(rnd: int) -> str:
    """The sealed-relay purpose round ``rnd``'s scalars are published under."""
    return f"{RELAY_PREFIX}{rnd}"


def scalars_file(rnd: int) -> str:
    """The state-dir file that keeps round ``rnd``'s sealed scalars (what a restart republishes)."""
    return f"fedawa_r{rnd}.sealed"


# -- the [fedawa] table ----------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class FedAwaSettings(MethodTable):
    """The ``[fedawa]`` table: how the weights are computed (the same on every silo) and how long to wait.

    Attributes:
        steps: mirror-descent steps on the weights each round, 0..1000 (0: uniform weights).
        step_size: η > 0 of each step (in units of the mean client-vector norm).
        max_logit: M > 0: every |T_k| <= M, so no silo weighs more than e^{2M} times another.
        wait_s: seconds a silo waits for the other silos' scalars each round, >= 0; keep it below
            ``run.round_deadline_s`` (the run config checks).
    """

    TABLE = "fedawa"

    steps: int = 10
    step_size: float = 0.1
    max_logit: float = 1.0
    wait_s: float = 60.0

    def __post_init__(self) -> None:
        validators.int_in("fedawa.steps", self.steps, 0, 1000, error=ConfigError)
        validators.positive("fedawa.step_size", self.step_size, error=ConfigError)
        validators.positive("fedawa.max_logit", self.max_logit, error=ConfigError)
        validators.non_negative("fedawa.wait_s", self.wait_s, error=ConfigError)



parse_settings = FedAwaSettings.parse  #: the ``[fedawa]`` parser the method declares in ``tables``


def fedawa_disclosures(*, plan: Any = None) -> list[dict[str, str]]:
    """What a FedAWA run shares besides its model updates, in words for the privacy officer.

    Args:
        plan: the run's ``PrivacyPlan`` (record-level: the scalars are post-processing of the
            round's DP-SGD release), or None (no DP: they are released without noise).
    """
    what = ("From round 2 on, each silo shares 2 numbers per round with the other silos: the cosine between its "
            "model update of the round and the previous round's global update, and its update's L2 norm. Every "
            "silo computes the aggregation weights from them (FedAWA). They are sealed (AES-256-GCM under a key "
            "derived from the run's shared secret key, which the coordinator does not hold), so only the other "
            "silos can read them.")
    if plan is not None and plan.record_level:
        return [{"topic": "FedAWA weighting scalars (post-processing of DP-SGD releases, no extra epsilon)",
                 "statement": what + " They are computed only from the silo's DP-SGD-trained update of the round (the "
                 "release its ledger entry for the round accounts, written before they leave) and the previous "
                 "global update (the decrypted mean of earlier DP releases): post-processing, with no ledger entry of "
                 "their own and no extra epsilon."}]
    return [{"topic": "FedAWA weighting scalars (not differentially private)",
             "statement": what + " They are computed without noise and have no ledger entry: a deterministic function "
             "of the silo's update, they reveal how far and in which direction (relative to the federation's last "
             "step) its data moved the model."}]


@register_method
class FedAwa(Strategy):
    """Shares every floating-point entry, weighted by FedAWA's adaptive weights computed on the silos.

    Args:
        settings: the run's ``[fedawa]`` settings.
        poll_s: seconds between polls for the other silos' scalars, > 0.

    Raises:
        ValueError: a non-positive ``poll_s``.
    """

    consensus_aggregate = True  # every silo applies the same decrypted aggregate the same way
    name = "fedawa"
    summary = ("aggregation weights softmax(T) optimised from per-silo update scalars relayed sealed; weighted "
               "uploads under HE (FedAWA, Shi et al. 2025)")
    order = 19
    needs_he = ("its per-silo scalars travel sealed under the run's key and its weights' sum inside the encrypted "
                "upload, which only HE runs have")
    refuses = {DpLevel.SILO: "its adaptive weights would scale each silo's share of the noise, so the aggregate would "
                             "no longer carry noise sigma*C against every silo's contribution; use record_level "
                             "DP-SGD (the weights are then post-processing)"}
    round_relays = frozenset({RELAY_PREFIX})
    tables = {"fedawa": parse_settings}
    default_tables = frozenset({"fedawa"})
    bench = BenchDefaults(privacy=DEMO_PRIVACY, note="FedAWA: aggregation weights optimised from each silo's update "
                          "cosine to the last global update and its norm, 2 scalars per silo and round shared sealed "
                          "(post-processing under DP-SGD) (Shi et al. 2025)")

    def __init__(self, *, settings: FedAwaSettings | None = None, poll_s: float = SCALARS_POLL_S) -> None:
        if not poll_s > 0:
            raise ValueError(f"FedAwa: poll_s must be > 0, got {poll_s!r}")
        self.settings = settings if settings is not None else FedAwaSettings()
        self.poll_s = float(poll_s)
        self.ctx: RunContext | None = None
        #: The weights of this silo's last weighted upload, by silo (for logs and tests).
        self.last_weights: dict[str, float] = {}

    @classmethod
    def for_run(cls, tables: Mapping[str, Mapping[str, Any]]) -> FedAwa:
        return cls(settings=FedAwaSettings.from_mapping(tables.get("fedawa", {})))

    @classmethod
    def check_run(cls, run: Any) -> None:
        """``fedawa.wait_s`` must stay below ``run.round_deadline_s`` (a silo waiting longer would miss the round).

        Raises:
            ValueError: naming ``fedawa.wait_s``.
        """
        super().check_run(run)
        settings = FedAwaSettings.from_mapping(getattr(run, "tables", {}).get("fedawa", {}))
        deadline = getattr(run, "round_deadline_s", None)
        if deadline is not None and not settings.wait_s < deadline:
            raise ValueError(f"fedawa.wait_s: {settings.wait_s:g} s must be below run.round_deadline_s "
                             f"({deadline:g} s): a silo waiting for the others' scalars would miss the round")

    @classmethod
    def run_disclosures(cls, run: Any) -> list[dict[str, str]]:
        """The scalars' statement for the coordinator's audit reports of a DP run (:func:`fedawa_disclosures`)."""
        if run.privacy is None:
            return []
        return fedawa_disclosures(plan=run.privacy)

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return True

    def disclosures(self, *, train: Any, plan: Any = None) -> list[dict[str, str]]:
        """The per-round scalars this silo shares (post-processing under record-level DP, else undisclosed by DP)."""
        return fedawa_disclosures(plan=plan)

    # -- the layout: the round's tensors, then the weight slot -------------------------------------
    @classmethod
    def upload_layout(cls, manifest: Manifest, rnd: int, total_rounds: int) -> Manifest:
        """The round's shared tensors followed by :data:`WEIGHT_SLOT` (one float64 value)."""
        layout = super().upload_layout(manifest, rnd, total_rounds)
        return Manifest(tensors=layout.tensors + (TensorSpec(name=WEIGHT_SLOT, dtype=DType.FLOAT64, shape=(1,)),))

    # -- once per run ------------------------------------------------------------------------------
    def prepare(self, ctx: RunContext) -> None:
        """Keeps the run context: the relay client and the sealing keys the rounds' exchanges use.

        Raises:
            StrategyError: ``ctx.he`` is None (no HE aggregation: nothing to seal with).
        """
        if ctx.he is None:
            raise StrategyError("fedawa needs HE aggregation: the scalars travel sealed under the run's key")
        self.ctx = ctx

    # -- what travels, and what comes back ---------------------------------------------------------
    def he_vector(self, update: Mapping[str, np.ndarray], *, state: AgentState, names: Sequence[str], scale: float,
                  rnd: int, total_rounds: int) -> np.ndarray:
        """``[f·τ ‖ f]``: the round's tensors flattened in order, times this silo's weight factor f, then f.

        From round 2 on this exchanges the scalars through the relay and computes the weights
        (:meth:`weights_for`); ``scale`` (the data-size weight) is not used.

        Raises:
            StrategyError: :meth:`prepare` has not run.
            Stopped: the agent was asked to stop while waiting for the other silos.
        """
        flat = np.concatenate([np.asarray(update[k]).astype(np.float64).ravel() for k in names])
        weights = self.weights_for(flat, state=state, rnd=rnd)
        assert self.ctx is not None
        me = self.ctx.he.me
        factor = upload_factor(weights, me, _he_bound(self.ctx.he))
        self.last_weights = weights
        state.strategy_state[WEIGHT_KEY] = torch.tensor([float(rnd), weights[me], factor, float(len(weights))],
                                                        dtype=torch.float64)
        if len(weights) > 1:
            log.info("round %d: FedAWA weights %s (this silo's upload factor %.6g)", rnd,
                     ", ".join(f"{s} {w:.4f}" for s, w in sorted(weights.items())), factor)
        return np.concatenate([flat * factor, [factor]])

    def weights_for(self, flat: np.ndarray, *, state: AgentState, rnd: int) -> dict[str, float]:
        """This round's weights by silo: uniform over this silo alone when there is no reference
        global update (round 1), else from the scalars of every silo that published in time.

        Raises:
            StrategyError: :meth:`prepare` has not run.
            Stopped: the agent was asked to stop while waiting.
        """
        ctx = self.ctx
        if ctx is None:
            raise StrategyError("fedawa: the run context is unknown; FedAwa.prepare must run first")
        me = ctx.he.me
        reference = state.strategy_state.get(REFERENCE_KEY)
        if reference is None or reference.numel() != flat.size or not bool(torch.any(reference != 0)):
            log.info("round %d: FedAWA has no previous global update to compare with; uniform weights", rnd)
            return {me: 1.0}
        own = self._publish(ctx, rnd, client_scalars(flat, reference.numpy()))
        scalars = {me: own, **self._others(ctx, rnd)}
        s = self.settings
        return aggregation_weights(scalars, steps=s.steps, step_size=s.step_size, max_logit=s.max_logit)

    def apply_sum(self, flat_sum: np.ndarray, *, layout: Any, total_weight: float, weight_normalizer: float,
                  state: AgentState, rnd: int, total_rounds: int) -> None:
        """Σ f_k τ_k / Σ f_k onto the shared values; the mean is kept as the next round's reference.

        The coordinator's ``total_weight`` and ``weight_normalizer`` (data sizes) are not used. A
        slot sum that is not a finite number > 0 leaves the model as it was (logged).

        Raises:
            ValueError: ``layout`` does not end with the weight slot.
        """
        specs = list(layout.tensors)
        if not specs or specs[-1].name != WEIGHT_SLOT or specs[-1].numel != 1:
            raise ValueError(f"fedawa: the round's aggregate does not end with the {WEIGHT_SLOT!r} slot")
        total = float(flat_sum[-1])
        if not (math.isfinite(total) and total > 0):
            log.error("round %d: the FedAWA weights sum to %r, not a number > 0 (an upload broke the rules); the "
                      "shared model is left as it was", rnd, total)
            return
        mean = np.asarray(flat_sum[:-1], dtype=np.float64) / total
        out, pos = {}, 0
        for spec in specs[:-1]:
            out[spec.name] = mean[pos : pos + spec.numel].astype(spec.dtype.numpy).reshape(spec.shape)
            pos += spec.numel
        self.apply(mean=out, state=state, rnd=rnd, total_rounds=total_rounds)
        state.strategy_state[REFERENCE_KEY] = torch.from_numpy(mean.astype(np.float32))

    # -- the relay ---------------------------------------------------------------------------------
    def _publish(self, ctx: RunContext, rnd: int, fresh: tuple[float, float]) -> tuple[float, float]:
        """Seals, keeps and publishes this silo's scalars of round ``rnd``; returns the scalars published
        (those of a blob kept from before a restart, if there is one)."""
        he = ctx.he
        path = Path(ctx.state_dir) / scalars_file(rnd)
        if path.is_file():
            sealed = path.read_bytes()
            own = scalars_from_bytes(he.open_sealed(sealed, purpose=sealing_purpose(rnd), silo=he.me), rnd=rnd)
            log.info("round %d: republishing the FedAWA scalars sealed before the restart", rnd)
        else:
            own = fresh
            sealed = he.seal(scalars_to_bytes(rnd, *own), purpose=sealing_purpose(rnd))
            Path(ctx.state_dir).mkdir(parents=True, exist_ok=True)
            write_private(path, sealed)  # durable before it is sent: a restart resends these very bytes
        for old in Path(ctx.state_dir).glob("fedawa_r*.sealed"):
            if old.name != path.name:
                old.unlink(missing_ok=True)
        try:
            ctx.client.publish_sealed(relay_purpose(rnd), sealed)
        except grpc.RpcError as exc:  # ALREADY_EXISTS: other bytes went out before the state dir was lost
            if exc.code() is not grpc.StatusCode.ALREADY_EXISTS:
                raise
            log.warning("round %d: the relay already holds other FedAWA scalars of this silo (sealed before its "
                        "state dir was lost); the other silos weight with those", rnd)
        return own

    def _others(self, ctx: RunContext, rnd: int) -> dict[str, tuple[float, float]]:
        """The other silos' scalars of round ``rnd``, opened and checked; waits for every joined silo's
        (up to ``wait_s``)."""
        he = ctx.he
        purpose = relay_purpose(rnd)
        waited = 0.0
        while True:
            sealed, joined = ctx.client.sealed(purpose)
            sealed = {s: b for s, b in sealed.items() if s != he.me}
            if len(sealed) >= joined - 1 or waited >= self.settings.wait_s:
                break
            if ctx.idle is not None:
                ctx.idle()
            if ctx.stop.wait(self.poll_s):
                raise Stopped(f"waiting for the other silos' FedAWA scalars of round {rnd}")
            waited += self.poll_s
        if len(sealed) < joined - 1:
            log.warning("round %d: FedAWA gave up waiting after %g s with the scalars of %d of the %d other joined "
                        "silo(s); the weights are computed without the others", rnd, waited, len(sealed), joined - 1)
        out: dict[str, tuple[float, float]] = {}
        for silo, blob in sorted(sealed.items()):
            try:
                out[silo] = scalars_from_bytes(he.open_sealed(blob, purpose=sealing_purpose(rnd), silo=silo), rnd=rnd)
            except ValueError as exc:
                log.error("ignoring the FedAWA scalars relayed for %s: %s", silo, exc)
        return out


def _he_bound(he: Any) -> float:
    """The run's HE clip bound from the silo's HE session (1 where it does not say)."""
    codec = getattr(he, "codec", None)
    bound = getattr(codec, "bound", None)
    if bound is None:
        bound = getattr(getattr(he, "params", None), "bound", None)
    return float(bound) if bound is not None else 1.0
