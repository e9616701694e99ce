"""Sharing strategies: which parameters a silo shares each round and which stay local."""

from fedsilo.coordinator.config import Strategy as StrategyName
from fedsilo.silo_agent.strategies.base import Strategy
from fedsilo.silo_agent.strategies.fedavg import FedAvg
from fedsilo.silo_agent.strategies.fedbn import FedBN
from fedsilo.silo_agent.strategies.lora import Deer, FedAvgLora, FfaLora
from fedsilo.silo_agent.strategies.fedper import FedPer
from fedsilo.silo_agent.strategies.resfim import DeerResFim, ResFim
from fedsilo.silo_agent.strategies.siobn import SioBN
from fedsilo.silo_agent.strategies.ditto import Ditto
from fedsilo.silo_agent.strategies.fedrdn import FedRdn
from fedsilo.silo_agent.strategies.pfa import Pfa

STRATEGIES: dict[StrategyName, type[Strategy]] = {
    StrategyName.FEDAVG: FedAvg,
    StrategyName.FEDBN: FedBN,
    StrategyName.DEER: Deer,
    StrategyName.FEDAVG_LORA: FedAvgLora,
    StrategyName.FFA_LORA: FfaLora,
    StrategyName.RESFIM: ResFim,
    StrategyName.DEER_RESFIM: DeerResFim,
    StrategyName.SIOBN: SioBN,
    StrategyName.FEDPER: FedPer,
    StrategyName.DITTO: Ditto,
    StrategyName.FEDRDN: FedRdn,
    StrategyName.PFA: Pfa,
}


def strategy_for(name: StrategyName, *, local_norm_layers: bool = True) -> Strategy:
    """The strategy implementing ``name`` (``local_norm_layers``: ResFIM's setting of that name)."""
    if name is StrategyName.RESFIM:
        return ResFim(local_norm_layers=local_norm_layers)
    return STRATEGIES[name]()


__all__ = ["STRATEGIES", "Deer", "DeerResFim", "Ditto", "FedAvg", "FedAvgLora", "FedBN", "FedPer", "FedRdn", "FfaLora",
           "Pfa", "ResFim", "SioBN", "Strategy", "strategy_for"]
