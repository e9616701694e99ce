"""Share phases and upload layouts: which of a run's shared tensors a round carries, and the companion sets of masked uploads."""

from __future__ import annotations

import enum
from dataclasses import replace

from fedsilo.core.tensors import Manifest

__all__ = ["COMPANION_MARK", "LORA_A_MARK", "LORA_B_MARK", "MASK_SUFFIXES", "SharePhase", "masked_manifest",
           "phase_manifest", "shared_numel"]

LORA_A_MARK = ".lora_A."
LORA_B_MARK = ".lora_B."
#: Masked uploads (pFL-ResFIM) carry, after the shared tensors' w·s⊙θ, one companion set per
#: suffix: the weight mask w·s and the local part w·(1−s)⊙θ (see fedsilo.silo_agent.masked).
MASK_SUFFIXES = ("--share-weight", "--local-part")


class SharePhase(enum.Enum):
    """The subset of the run's shared tensors a round uploads and aggregates."""

    ALL = "all"
    LORA_B = "lora_b"
    LORA_A = "lora_a"


def phase_manifest(manifest: Manifest, phase: SharePhase) -> Manifest:
    """The run's manifest restricted to one phase (the tensor order is kept)."""
    if phase is SharePhase.ALL:
        return manifest
    mark = LORA_B_MARK if phase is SharePhase.LORA_B else LORA_A_MARK
    return Manifest(tensors=tuple(t for t in manifest.tensors if mark in t.name))


def masked_manifest(manifest: Manifest, *, local_part: bool = True) -> Manifest:
    """The layout of a masked upload: the round's tensors, then each companion set in order.

    Every companion tensor has its tensor's shape and dtype; the coordinator adds all of them as
    ciphertexts like any other and never sees a mask (they are inside the encryption). The
    local-part set only serves the consensus model, so rounds that do not need it leave it out
    (see `carries_local_part`).
    """
    suffixes = MASK_SUFFIXES if local_part else MASK_SUFFIXES[:1]
    extra = tuple(replace(t, name=t.name + suffix) for suffix in suffixes for t in manifest.tensors)
    return Manifest(tensors=manifest.tensors + extra)


#: What every companion tensor's name holds and no state_dict entry can (a Python attribute name has no
#: ``-``): masked uploads' companion sets (:data:`MASK_SUFFIXES`) and a method's extra upload slots.
COMPANION_MARK = "--"


def shared_numel(layout: Manifest) -> int:
    """Parameters an upload layout shares: its tensors without the companion tensors (masked uploads'
    companion sets, a method's extra slots: every name holding :data:`COMPANION_MARK`)."""
    return sum(t.numel for t in layout.tensors if COMPANION_MARK not in t.name)
