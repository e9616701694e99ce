"""Aggregators: how the coordinator adds up one round's uploads, one per aggregation mode (a small registry)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fedsilo.coordinator.aggregation.base import Aggregator
from fedsilo.coordinator.aggregation.plain import PlainAggregator
from fedsilo.coordinator.config import AggregationMode
from fedsilo.core.configfile import ConfigError

if TYPE_CHECKING:
    from fedsilo.coordinator.config import FederationConfig
    from fedsilo.core.tensors import Manifest

__all__ = ["AGGREGATORS", "Aggregator", "PlainAggregator", "aggregator_for"]

#: Aggregation mode -> ``module:class`` of its aggregator, imported when a run uses it (HE needs TenSEAL,
#: which a plain run never loads). Each class builds itself with ``for_run(manifest, config)``.
AGGREGATORS: dict[AggregationMode, str] = {
    AggregationMode.PLAIN: "fedsilo.coordinator.aggregation.plain:PlainAggregator",
    AggregationMode.HE: "fedsilo.coordinator.aggregation.he:HeAggregator",
}


def aggregator_for(config: FederationConfig, manifest: Manifest) -> Aggregator:
    """The run's aggregator for uploads laid out as ``manifest``.

    Raises:
        ConfigError: an aggregation mode no aggregator is registered for.
    """
    try:
        module, _, name = AGGREGATORS[config.aggregation].partition(":")
    except KeyError:
        raise ConfigError(f"run.aggregation: {config.aggregation!r} has no aggregator") from None
    return getattr(importlib.import_module(module), name).for_run(manifest, config)
