"""Sharing strategies: which parameters a silo shares each round and which stay local."""

from fedsilo.coordinator.config import Strategy as StrategyName
from fedsilo.silo_agent.strategies.base import Strategy
from fedsilo.silo_agent.strategies.fedavg import FedAvg
from fedsilo.silo_agent.strategies.fedbn import FedBN
from fedsilo.silo_agent.strategies.lora import Deer, FedAvgLora, FfaLora

STRATEGIES: dict[StrategyName, type[Strategy]] = {
    StrategyName.FEDAVG: FedAvg,
    StrategyName.FEDBN: FedBN,
    StrategyName.DEER: Deer,
    StrategyName.FEDAVG_LORA: FedAvgLora,
    StrategyName.FFA_LORA: FfaLora,
}


def strategy_for(name: StrategyName) -> Strategy:
    """The strategy implementing ``name``."""
    return STRATEGIES[name]()


__all__ = ["STRATEGIES", "Deer", "FedAvg", "FedAvgLora", "FedBN", "FfaLora", "Strategy", "strategy_for"]
