"""DEeR + pFL-ResFIM: DEeR's alternating LoRA factors, each shared under the silo's ResFIM masks."""

from __future__ import annotations

from fedsilo.core.methods import register_method
from fedsilo.silo_agent.presets import DEMO_LORA_HE_BOUND
from fedsilo.silo_agent.methods.deer import Deer
from fedsilo.silo_agent.methods.resfim import MaskedMethod


@register_method
class DeerResFim(MaskedMethod, Deer):
    """DEeR's alternating LoRA factors (B rounds, A rounds), each shared under the silo's ResFIM
    masks: an element of the phase's factor that the mask keeps local is personal to the silo."""

    name = "deer+resfim"
    summary = "DEeR's alternating LoRA factors, each shared under the silo's ResFIM masks"
    order = 120
    he_bound = DEMO_LORA_HE_BOUND  # LoRA factor values under the noise regulator, as DEeR's
    bench = None
