"""Sharing strategies: which parameters a silo shares each round and which stay local."""

from fedsilo.coordinator.config import Strategy as StrategyName
from fedsilo.silo_agent.strategies.base import Strategy
from fedsilo.silo_agent.strategies.fedavg import FedAvg
from fedsilo.silo_agent.strategies.fedbn import FedBN

STRATEGIES: dict[StrategyName, type[Strategy]] = {
    StrategyName.FEDAVG: FedAvg,
    StrategyName.FEDBN: FedBN,
}


def strategy_for(name: StrategyName) -> Strategy:
    """The strategy implementing ``name``."""
    return STRATEGIES[name]()


__all__ = ["FedAvg", "FedBN", "STRATEGIES", "Strategy", "strategy_for"]
