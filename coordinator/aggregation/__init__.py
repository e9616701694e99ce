"""Aggregators: how the coordinator adds up one round's uploads."""

from fedsilo.coordinator.aggregation.base import Aggregator
from fedsilo.coordinator.aggregation.plain import PlainAggregator

__all__ = ["Aggregator", "PlainAggregator"]
