"""The methods ``fedsilo bench`` compares: each is a deployed run strategy with its settings, or a reference run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedsilo.silo_agent.demo import (
    DEMO_LORA,
    DEMO_LORA_HE_BOUND,
    DEMO_LORA_PRIVACY,
    DEMO_PRIVACY,
    DEMO_RESFIM,
    DEMO_RESFIM_HE_BOUND,
    DEMO_RESFIM_PRIVACY,
    PFA_HE_BOUND,
)


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
        resfim: its ``[resfim]`` table, if any.
        lora: whether it fine-tunes LoRA adapters on a pretrained base.
        privacy: its ``[privacy]`` plan when the study runs with DP (None: it cannot run with DP;
            ``why_no_dp`` says why).
        why_no_dp: the reason it runs only without DP.
    """

    name: str
    strategy: str | None
    note: str
    training: Mapping[str, Any] = field(default_factory=dict)
    he_bound: float | None = None
    resfim: Mapping[str, Any] | None = None
    lora: bool = False
    privacy: Mapping[str, Any] | None = None
    why_no_dp: str = ""


def methods(*, mu: float = 0.01) -> dict[str, Method]:
    """Every method, by name, with FedProx's μ = ``mu``."""
    ms = [
        Method(name="local", strategy=None, note="no federation: each silo trains alone on its own data (0 bytes)",
               why_no_dp="reference run without DP"),
        Method(name="centralised", strategy=None, note="pooled data of all silos in one place (the upper reference; "
               "the pooling itself is what federated learning avoids)", why_no_dp="reference run without DP"),
        Method(name="fedavg", strategy="fedavg", note="every parameter averaged (McMahan et al. 2017)",
               privacy=DEMO_PRIVACY),
        Method(name="fedprox", strategy="fedavg", training={"proximal_mu": mu},
               note=f"FedAvg with the proximal term mu/2 ||w - w_global||^2, mu = {mu:g} (Li et al. 2020)",
               privacy=DEMO_PRIVACY),
        Method(name="fedbn", strategy="fedbn", note="normalisation layers local, the rest averaged (Li et al. 2021)",
               privacy=DEMO_PRIVACY),
        Method(name="siobn", strategy="siobn", note="norm affine parameters shared, running statistics local "
               "(Andreux et al. 2020; fedsilo's InstanceNorm UNet has no running statistics: equals FedAvg)",
               privacy=DEMO_PRIVACY),
        Method(name="fedper", strategy="fedper", note="output head local, the rest averaged (Arivazhagan et al. 2019)",
               privacy=DEMO_PRIVACY),
        Method(name="ditto", strategy="ditto", note="global model as FedAvg; personal model pulled to it by "
               "lambda/2 ||v - w||^2, lambda = 0.1 (Li et al. 2021); evaluated with the personal model",
               why_no_dp="its personal model is a second pass over the data that the plan does not account"),
        Method(name="fedrdn", strategy="fedrdn", note="FedAvg on images normalised with a random silo's channel "
               "mean/std (Yan et al. 2023); the 2 x C statistics per silo are shared sealed, outside the DP ledger",
               privacy=DEMO_PRIVACY),
        Method(name="pfa", strategy="pfa", he_bound=PFA_HE_BOUND, note="amplitudes inside a low-frequency window "
               "(0.7 -> 0.95) averaged; own phase, outer amplitude and norm layers kept (PRR-FL, Chen et al. 2021)",
               privacy=DEMO_PRIVACY),
        Method(name="resfim", strategy="resfim", he_bound=DEMO_RESFIM_HE_BOUND, resfim=DEMO_RESFIM,
               note=f"pFL-ResFIM: the top rho = {DEMO_RESFIM['rho']:g} of each tensor by residual Fisher information "
               "kept local, the rest averaged (masked, under HE)", privacy=DEMO_RESFIM_PRIVACY),
        Method(name="deer", strategy="deer", lora=True, he_bound=DEMO_LORA_HE_BOUND, note="LoRA adapters on a base "
               "pretrained on a domain no silo holds; B and A shared in alternate rounds (DEeR); with DP: "
               "silo-level (the whole silo's data), noise regulator, noise split into shares under HE, "
               "ε against one upload",
               privacy=DEMO_LORA_PRIVACY),
    ]
    return {m.name: m for m in ms}


#: Method names in the order of the study's tables.
METHOD_NAMES: tuple[str, ...] = tuple(methods())

__all__ = ["METHOD_NAMES", "Method", "PFA_HE_BOUND", "methods"]
