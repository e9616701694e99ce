"""DEeR (Zhu et al. 2024, arXiv:2410.12926): LoRA factors shared in alternate rounds, so the mean of products is exact."""

from __future__ import annotations

from fedsilo.core.methods import BenchDefaults, register_method
from fedsilo.core.phases import SharePhase
from fedsilo.silo_agent.presets import DEMO_LORA_PRIVACY
from fedsilo.silo_agent.methods.fedavg_lora import FedAvgLora, is_lora_a, is_lora_b


@register_method
class Deer(FedAvgLora):
    """DEeR's deviation eliminator: the run's rounds alternate between
    training and sharing only B (A frozen and identical on every silo) and only A (B frozen),
    so mean_i(B_i)·A = mean_i(B_i·A) exactly. Shares both factors over the run."""

    name = "deer"
    summary = "LoRA factors B and A shared in alternate rounds: the mean of products is exact (DEeR, Zhu et al. 2024)"
    order = 90
    alternates = True
    bench = BenchDefaults(needs_base=True, privacy=DEMO_LORA_PRIVACY, note="LoRA adapters on a base pretrained on a "
                          "domain no silo holds; B and A shared in alternate rounds (DEeR); with DP: silo-level (the "
                          "whole silo's data), noise regulator, noise split into shares under HE, ε against one upload")

    def trains(self, name: str, phase: SharePhase) -> bool:
        if phase is SharePhase.LORA_B:
            return is_lora_b(name)
        if phase is SharePhase.LORA_A:
            return is_lora_a(name)
        return is_lora_a(name) or is_lora_b(name)
