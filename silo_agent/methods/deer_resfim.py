"""DEeR + pFL-ResFIM: DEeR's alternating LoRA factors, each shared under the silo's ResFIM masks."""

from __future__ import annotations

from fedsilo.core.methods import register_method
from fedsilo.silo_agent.presets import DEMO_LORA_HE_BOUND
from fedsilo.silo_agent.methods.deer import Deer
from collections.abc import Mapping
from typing import Any

from fedsilo.silo_agent.methods.resfim import MaskedMethod, ResFimSettings, parse_settings


@register_method
class DeerResFim(MaskedMethod, Deer):
    """DEeR's alternating LoRA factors (B rounds, A rounds), each shared under the silo's ResFIM
    masks: an element of the phase's factor that the mask keeps local is personal to the silo."""

    name = "deer+resfim"
    summary = "DEeR's alternating LoRA factors, each shared under the silo's ResFIM masks"
    order = 120
    he_bound = DEMO_LORA_HE_BOUND  # LoRA factor values under the noise regulator, as DEeR's
    bench = None
    tables = {"resfim": parse_settings, "lora": None}

    def __init__(self, *, settings: ResFimSettings | None = None, lora: Mapping[str, Any] | None = None) -> None:
        MaskedMethod.__init__(self, settings=settings)
        Deer.__init__(self, lora=lora)

    @classmethod
    def for_run(cls, tables: Mapping[str, Mapping[str, Any]]) -> DeerResFim:
        return cls(settings=ResFimSettings.from_mapping(tables.get("resfim", {})), lora=tables.get("lora", {}))
