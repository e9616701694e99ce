"""pFL-ResFIM: every tensor is in the upload, each element shared or kept local by the silo's Residual-Fisher mask."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, DpLevel, register_method
from fedsilo.silo_agent.presets import DEMO_RESFIM, DEMO_RESFIM_HE_BOUND, DEMO_RESFIM_PRIVACY
from fedsilo.silo_agent.strategy import RunContext, Strategy, StrategyError

models = lazy_module("fedsilo.models")

if TYPE_CHECKING:
    import torch

    from fedsilo.silo_agent.state import AgentState

#: The sealed-relay purpose of the silos' style banks.
BANK_PURPOSE = "style-bank"


class MaskedMethod(Strategy):
    """What the masked methods declare alike: HE only, at least two silos, no silo-level DP, the
    ``[resfim]`` table, the style-bank relay and the ResFIM disclosures of DP runs."""

    masked = True
    needs_he = "its uploads carry the silos' masks, which only encryption keeps from the coordinator"
    min_silos = (2, "masks are computed on images in the other silos' styles")
    refuses = {DpLevel.SILO: "its uploads are parameter values, including ones a silo kept local before (trained "
                             "without silo-level noise); use record_level DP-SGD"}
    relays = frozenset({BANK_PURPOSE})
    tables = frozenset({"resfim"})
    default_tables = frozenset({"resfim"})
    he_bound = DEMO_RESFIM_HE_BOUND

    def __init__(self, *, settings: Any = None) -> None:
        from fedsilo.coordinator.config import ResFimSettings

        self.settings = settings if settings is not None else ResFimSettings()
        self.session: Any = None  # fedsilo.silo_agent.resfim.ResFimSession, made by prepare()

    @classmethod
    def for_run(cls, tables: Mapping[str, Mapping[str, Any]]) -> MaskedMethod:
        from fedsilo.coordinator.config import ResFimSettings

        return cls(settings=ResFimSettings.from_mapping(tables.get("resfim", {})))

    @property
    def local_norm_layers(self) -> bool:
        """Whether normalisation-layer parameters stay local as a whole (``[resfim] local_norm_layers``)."""
        return self.settings.local_norm_layers

    # -- the agent's hooks: style banks once, masks before training, masked uploads and sums --
    def disclosures(self, *, train: Any, plan: Any = None) -> list[dict[str, str]]:
        """What the silo's masks and style bank disclose (how they are covered by its ledger, or not)."""
        from fedsilo.privacy.audit import resfim_disclosures

        r = self.settings
        private = plan is not None and bool(plan.resfim_every)
        return resfim_disclosures(rho=r.rho, recompute_every=r.recompute_every, beta=r.beta, clusters=r.clusters,
                                  plan=plan if private else None)

    def prepare(self, ctx: RunContext) -> None:
        """Builds, seals and publishes this silo's style bank (once per run; a restart resends it)."""
        from fedsilo.silo_agent.resfim import ResFimSession

        if ctx.he is None:
            raise StrategyError(f"strategy {self.name} needs HE aggregation (the masks travel encrypted)")
        self.session = ResFimSession(settings=self.settings, he=ctx.he, state_dir=ctx.state_dir,
                                     privacy=ctx.privacy)
        self.session.publish_bank(ctx.client, ctx.train)

    def extra_releases(self, state: AgentState, rnd: int, *, ahead: bool = False) -> list[Any]:
        """The noisy Fisher release of the masks computed for round ``rnd`` (DP runs)."""
        return self.session.mask_releases(state, rnd, ahead=ahead)

    def before_training(self, ctx: RunContext, *, model: torch.nn.Module, state: AgentState, rnd: int,
                        trainable: frozenset[str], shared_names: Sequence[str]) -> None:
        """(Re)computes the masks when due, on the silo's personalised model."""
        self.session.ensure_masks(ctx.client, ctx.stop, model=model, state=state, train=ctx.train, rnd=rnd,
                                  trainable=trainable, strategy=self, shared_names=list(shared_names),
                                  idle=ctx.idle)

    def upload(self, *, trained: Mapping[str, torch.Tensor], state: AgentState, names: Sequence[str], rnd: int,
               total_rounds: int) -> dict[str, np.ndarray]:
        """Parameter values (not differences): personal elements differ from silo to silo."""
        return {k: trained[k].detach().clone().numpy() for k in names}

    def he_vector(self, update: Mapping[str, np.ndarray], *, state: AgentState, names: Sequence[str], scale: float,
                  rnd: int, total_rounds: int) -> np.ndarray:
        """``[w·s⊙θ | w·s (| w·(1−s)⊙θ)]`` over the round's tensors (the companion sets of the layout)."""
        return self.session.upload_vector(dict(update), state, list(names), scale,
                                          local_part=self.carries_local_part(rnd, total_rounds))

    def apply_sum(self, flat_sum: np.ndarray, *, layout: Any, total_weight: float, weight_normalizer: float,
                  state: AgentState, rnd: int, total_rounds: int) -> None:
        """The shared elements take the masked mean, the local ones stay; the consensus is updated."""
        self.session.apply(state, flat_sum, layout, total_weight=total_weight / weight_normalizer)

    def unseen_state_dict(self, state: AgentState) -> dict[str, torch.Tensor]:
        """The consensus of the silos' models once it exists (the unseen domain has no personal part)."""
        if state.consensus:
            return self.session.consensus_state_dict(state)
        return super().unseen_state_dict(state)

    @classmethod
    def run_disclosures(cls, run: Any) -> list[dict[str, str]]:
        """What a DP run's masks and style banks disclose, for the coordinator's audit reports."""
        from fedsilo.privacy.audit import resfim_disclosures

        r = run.resfim
        plan = run.privacy
        if plan is None or r is None:
            return []
        return resfim_disclosures(rho=r.rho, recompute_every=r.recompute_every, beta=r.beta, clusters=r.clusters,
                                  plan=plan if plan.resfim_every else None)


@register_method
class ResFim(MaskedMethod):
    """Puts every floating-point tensor in the run's layout (normalisation layers only if they are
    not kept local as a whole); which *elements* a silo shares each round is its ResFIM mask's
    decision (``fedsilo.models.resfim``), applied inside the encryption (``fedsilo.silo_agent.masked``).

    Args:
        settings: the run's ``[resfim]`` settings (``local_norm_layers``: keep normalisation-layer
            parameters and buffers local as a whole, FedBN's choice and the default, instead of
            masking them element by element).
    """

    name = "resfim"
    summary = ("pFL-ResFIM: the top rho of each tensor by residual Fisher information kept local, the rest averaged "
               "(masked, under HE)")
    order = 80
    bench = BenchDefaults(tables={"resfim": DEMO_RESFIM}, privacy=DEMO_RESFIM_PRIVACY,
                          note=f"pFL-ResFIM: the top rho = {DEMO_RESFIM['rho']:g} of each tensor by residual Fisher "
                               "information kept local, the rest averaged (masked, under HE)")

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return not (self.local_norm_layers and name in models.local_parameter_names(model))
