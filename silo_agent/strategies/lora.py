"""LoRA sharing strategies on a frozen base: DEeR, FedAvg-LoRA and FFA-LoRA."""

from __future__ import annotations

import torch

from fedsilo.core.phases import LORA_A_MARK, LORA_B_MARK, SharePhase
from fedsilo.silo_agent.strategies.base import Strategy


def _is_lora_a(name: str) -> bool:
    return LORA_A_MARK in name


def _is_lora_b(name: str) -> bool:
    return LORA_B_MARK in name


class FedAvgLora(Strategy):
    """FedAvg-LoRA: both factors trained and averaged every round (biased: the mean of B·A is
    not mean(B)·mean(A); with DP, noise on one factor is amplified by the other)."""

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return _is_lora_a(name) or _is_lora_b(name)


class Deer(FedAvgLora):
    """DEeR's deviation eliminator (Zhu et al. 2024, arXiv:2410.12926): the run's rounds alternate between
    training and sharing only B (A frozen and identical on every silo) and only A (B frozen),
    so mean_i(B_i)·A = mean_i(B_i·A) exactly. Shares both factors over the run."""

    def trains(self, name: str, phase: SharePhase) -> bool:
        if phase is SharePhase.LORA_B:
            return _is_lora_b(name)
        if phase is SharePhase.LORA_A:
            return _is_lora_a(name)
        return self.is_shared(name, None)  # type: ignore[arg-type]


class FfaLora(Strategy):
    """FFA-LoRA (Sun et al., ICLR 2024): A stays frozen at its shared initialisation; only B is
    trained and shared, so the aggregate is exact and the noise is not amplified by a trained A."""

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return _is_lora_b(name)

    def trains(self, name: str, phase: SharePhase) -> bool:
        return _is_lora_b(name)
