"""pFL-ResFIM: every tensor is in the upload, each element shared or kept local by the silo's Residual-Fisher mask."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, DpLevel, register_method
from fedsilo.silo_agent.presets import DEMO_RESFIM, DEMO_RESFIM_HE_BOUND, DEMO_RESFIM_PRIVACY
from fedsilo.silo_agent.strategy import Strategy

models = lazy_module("fedsilo.models")

if TYPE_CHECKING:
    import torch

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
        local_norm_layers: keep normalisation-layer parameters and buffers local as a whole (FedBN's
            choice; the default), instead of masking them element by element.
    """

    name = "resfim"
    summary = ("pFL-ResFIM: the top rho of each tensor by residual Fisher information kept local, the rest averaged "
               "(masked, under HE)")
    order = 80
    bench = BenchDefaults(tables={"resfim": DEMO_RESFIM}, privacy=DEMO_RESFIM_PRIVACY,
                          note=f"pFL-ResFIM: the top rho = {DEMO_RESFIM['rho']:g} of each tensor by residual Fisher "
                               "information kept local, the rest averaged (masked, under HE)")

    def __init__(self, *, local_norm_layers: bool = True) -> None:
        self.local_norm_layers = local_norm_layers

    @classmethod
    def for_run(cls, tables: Mapping[str, Mapping[str, Any]]) -> ResFim:
        return cls(local_norm_layers=bool(tables.get("resfim", {}).get("local_norm_layers", True)))

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return not (self.local_norm_layers and name in models.local_parameter_names(model))
