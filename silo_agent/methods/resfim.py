"""pFL-ResFIM: every tensor is in the upload, each element shared or kept local by the silo's Residual-Fisher mask."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsilo.core.configfile import ConfigError, MethodTable
from fedsilo.core import validators
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
#: The ``[privacy]`` keys of the masks' and banks' own releases.
PRIVACY_KEYS = ("fisher_noise_multiplier", "fisher_clip_norm", "style_noise_multiplier")


@dataclass(frozen=True, kw_only=True)
class ResFimSettings(MethodTable):
    """The ``[resfim]`` table: pFL-ResFIM's settings, the same on every silo (DESIGN §5).

    Attributes:
        rho: ρ in (0, 1): the fraction of each shared tensor (rounded up) that a silo keeps local.
        recompute_every: rounds between two mask computations, >= 1 (masks at rounds 1, 1+k, …).
        local_norm_layers: whether normalisation-layer parameters stay local as a whole.
        max_examples: most local examples (and their re-styled twins) per Fisher, >= 1.
        beta: window ratio of the style banks' low-frequency amplitude window, in (0, 0.5].
        clusters: most styles per silo's bank, >= 1.
        style_clip_norm: C > 0: each image's log-amplitude window is clipped to this L2 norm
            before it enters a bank (with DP, the bank's sensitivity is √2·C).
        masks_without_dp: in a run with record-level DP, compute masks and style banks without
            noise and protect them by encryption only (stated in every audit report). Off by
            default: such runs give ``[privacy] fisher_noise_multiplier``, ``fisher_clip_norm``
            and ``style_noise_multiplier`` and account both releases in the ledger.
    """

    TABLE = "resfim"

    rho: float = 0.1
    recompute_every: int = 5
    local_norm_layers: bool = True
    max_examples: int = 64
    beta: float = 0.05
    clusters: int = 4
    style_clip_norm: float = 40.0
    masks_without_dp: bool = False

    def __post_init__(self) -> None:
        rho = self.rho
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho < 1:
            raise ConfigError(f"resfim.rho: {rho!r} must be a number in (0, 1)")
        validators.int_in("resfim.recompute_every", self.recompute_every, 1, 100_000, error=ConfigError)
        if not isinstance(self.local_norm_layers, bool):
            raise ConfigError(f"resfim.local_norm_layers: {self.local_norm_layers!r} must be true or false")
        validators.int_in("resfim.max_examples", self.max_examples, 1, 1_000_000, error=ConfigError)
        beta = self.beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 0.5:
            raise ConfigError(f"resfim.beta: {beta!r} must be a number in (0, 0.5]")
        validators.int_in("resfim.clusters", self.clusters, 1, 64, error=ConfigError)
        validators.positive("resfim.style_clip_norm", self.style_clip_norm, error=ConfigError)
        if not isinstance(self.masks_without_dp, bool):
            raise ConfigError(f"resfim.masks_without_dp: {self.masks_without_dp!r} must be true or false")


    def recompute(self, rnd: int) -> bool:
        """Whether masks are (re)computed before training round ``rnd`` (1-based): 1, 1+k, 1+2k, …"""
        return (rnd - 1) % self.recompute_every == 0


parse_settings = ResFimSettings.parse  #: the ``[resfim]`` parser the method declares in ``tables``


class MaskedMethod(Strategy):
    """What the masked methods declare alike: HE only, at least two silos, no silo-level DP, the
    ``[resfim]`` table, the style-bank relay and the ResFIM disclosures of DP runs."""

    masked = True
    needs_he = "its uploads carry the silos' masks, which only encryption keeps from the coordinator"
    needs_2d = "its style banks are 2-D Fourier amplitudes of [C, H, W] images"
    min_silos = (2, "masks are computed on images in the other silos' styles")
    refuses = {DpLevel.SILO: "its uploads are parameter values, including ones a silo kept local before (trained "
                             "without silo-level noise); use record_level DP-SGD"}
    relays = frozenset({BANK_PURPOSE})
    tables = {"resfim": parse_settings}
    default_tables = frozenset({"resfim"})
    privacy_keys = frozenset(PRIVACY_KEYS)
    he_bound = DEMO_RESFIM_HE_BOUND

    def __init__(self, *, settings: ResFimSettings | None = None) -> None:
        self.settings = settings if settings is not None else ResFimSettings()
        self.session: Any = None  # fedsilo.silo_agent.resfim.ResFimSession, made by prepare()

    @classmethod
    def for_run(cls, tables: Mapping[str, Mapping[str, Any]]) -> MaskedMethod:
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

    # -- the coordinator's view: the plan of the masks' and banks' releases -----------------
    @classmethod
    def plan_privacy(cls, table: dict[str, Any], tables: Mapping[str, Mapping[str, Any]], *, record: bool,
                     rounds: int) -> list[Any]:
        """Checks the ``[privacy]`` keys of the private masks, completes ``table`` with the plan's mask and
        bank fields, and returns the run's once-off releases: 2 noisy Fisher computations per mask
        round (originals and twins) and one style bank."""
        from fedsilo.privacy.accounting import Mechanism, Neighbouring, Release

        settings = ResFimSettings.from_mapping(tables.get("resfim", {}))
        given = [k for k in PRIVACY_KEYS if k in table]
        if not record or settings.masks_without_dp:
            if given:
                why = "resfim.masks_without_dp = true" if record else "record_level is off"
                raise ConfigError(f"privacy.{given[0]}: set, but {why}")
            return []
        for k in PRIVACY_KEYS:
            if k not in table:
                raise ConfigError(f"privacy.{k}: missing (run.strategy {cls.name!r} with record-level DP: the "
                                  "masks' Fisher information and the style bank are releases of each silo's images; "
                                  "give their noise, or set resfim.masks_without_dp = true to protect them by "
                                  "encryption only)")
            validators.positive(f"privacy.{k}", table[k], error=ConfigError)
        table["resfim_every"] = settings.recompute_every
        table["style_clip_norm"] = float(settings.style_clip_norm)
        try:
            masks = sum(1 for r in range(1, int(rounds) + 1) if settings.recompute(r))
        except (TypeError, ValueError):
            return []  # a bad rounds value fails its own check
        return [Release(mechanism=Mechanism.GAUSSIAN, neighbouring=Neighbouring.RECORD,
                        noise_multiplier=float(table["fisher_noise_multiplier"]), sample_rate=1.0, steps=2 * masks),
                Release(mechanism=Mechanism.GAUSSIAN, neighbouring=Neighbouring.RECORD,
                        noise_multiplier=float(table["style_noise_multiplier"]), sample_rate=1.0, steps=1)]

    @classmethod
    def check_privacy(cls, plan: Any, run: Any) -> None:
        """A record-level plan's mask and bank releases follow ``[resfim]`` (or are absent with
        ``masks_without_dp``)."""
        if plan.silo_level:
            return
        r = ResFimSettings.from_mapping(run.tables.get("resfim", {}))
        if r.masks_without_dp and plan.resfim_every:
            raise ConfigError("privacy.fisher_noise_multiplier: set, but resfim.masks_without_dp = true")
        if not r.masks_without_dp and (plan.resfim_every != r.recompute_every
                                       or plan.style_clip_norm != r.style_clip_norm):
            raise ConfigError("privacy.resfim_every: the plan's ResFIM releases must follow [resfim] "
                              f"(recompute_every {r.recompute_every}, style_clip_norm "
                              f"{r.style_clip_norm:g}); got {plan.resfim_every}, {plan.style_clip_norm:g}")

    @classmethod
    def run_disclosures(cls, run: Any) -> list[dict[str, str]]:
        """What a DP run's masks and style banks disclose, for the coordinator's audit reports: the
        statements each silo's own reports carry (:meth:`disclosures`)."""
        if run.privacy is None:
            return []
        return cls.for_run(run.tables).disclosures(train=None, plan=run.privacy)


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
