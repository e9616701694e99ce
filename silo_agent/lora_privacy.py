"""Silo-level DP for a DEeR upload: the model's LoRA layers fed to the product-space noise regulator."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedsilo.core.phases import SharePhase
from fedsilo.models.lora import from_matrix, lora_layers, to_matrix
from fedsilo.privacy.lora_noise import LoraFactors, LoraPhase, regulate

__all__ = ["regulate_lora_update"]


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def regulate_lora_update(
    model: torch.nn.Module,
    update: Mapping[str, np.ndarray],
    frozen: Mapping[str, torch.Tensor | np.ndarray],
    *,
    phase: SharePhase,
    clip_norm: float,
    noise_multiplier: float,
    shares: int = 1,
) -> tuple[dict[str, np.ndarray], float, bool]:
    """Clips a DEeR upload in the product space, adds Gaussian noise there, maps it back.

    Args:
        model: The LoRA model (its layers give names, shapes and scalings).
        update: The trained factor's deltas, by state_dict name (ΔB in the B phase, ΔA in the
            A phase), as the agent computed them.
        frozen: The federation's current shared values (the frozen factor is read from here:
            identical on every silo, hence public among them).
        phase: ``LORA_B`` or ``LORA_A``.
        clip_norm: C, the bound on ‖s·ΔB·A‖_F (or ‖s·B·ΔA‖_F) over all layers jointly.
        noise_multiplier: σ.
        shares: K; each silo adds std σC/√K.

    Returns:
        (released deltas by state_dict name in the update's shapes and dtypes, the product-space
        norm before clipping, whether it was clipped).

    Raises:
        ValueError: The update does not cover exactly the phase's factors of the model.
    """
    if phase not in (SharePhase.LORA_B, SharePhase.LORA_A):
        raise ValueError(f"invalid phase {phase!r}: the noise regulator needs a LoRA B or A phase")
    lora_phase = LoraPhase.B if phase is SharePhase.LORA_B else LoraPhase.A
    layers: dict[str, LoraFactors] = {}
    deltas: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in lora_layers(model):
        trained = layer.b_name if lora_phase is LoraPhase.B else layer.a_name
        if trained not in update:
            raise ValueError(f"the update lacks {trained!r}, a {lora_phase.name} factor of the model")
        layers[trained] = LoraFactors(a=to_matrix(_numpy(frozen[layer.a_name])).astype(np.float64),
                                      b=to_matrix(_numpy(frozen[layer.b_name])).astype(np.float64),
                                      scaling=layer.scaling)
        deltas[trained] = to_matrix(np.asarray(update[trained]))
        shapes[trained] = tuple(np.asarray(update[trained]).shape)
    extra = sorted(set(update) - set(deltas))
    if extra:
        raise ValueError(f"the update holds {extra[0]!r}, which is not a {lora_phase.name} factor of the model")
    out = regulate(layers, deltas, phase=lora_phase, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                   shares=shares)
    released = {k: from_matrix(np.asarray(v), shapes[k]) for k, v in out.deltas.items()}
    return {k: released[k] for k in update}, out.original_norm, out.clipped
