"""Share phases and upload layouts: which of a run's shared tensors a round carries, and the companion sets of masked uploads."""

from __future__ import annotations

import enum
import re
from dataclasses import replace

from fedsilo.core.tensors import DType, Manifest, TensorSpec

__all__ = ["COMPANION_MARK", "COUNT_PRESENT", "LORA_A_MARK", "LORA_B_MARK", "MASK_SUFFIXES", "MODALITY_SEGMENT",
           "MODALITY_SLOT", "SharePhase", "count_slot", "masked_manifest", "modality_groups", "modality_of",
           "modality_slots", "phase_manifest", "shared_numel"]

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


# -- modality groups ---------------------------------------------------------------------------------
#: A state_dict path segment ``modality_<g>`` puts an entry in modality group g (e.g.
#: ``modality_oct.encoder.levels.0.0.conv.weight`` is in group ``oct``): the tensors only examples with
#: modality g train. A silo whose data lacks g trains none of them and uploads zeros for them; each
#: upload carries one count slot per group (:func:`modality_slots`), 1 where the silo holds g and 0 where
#: it does not, so the aggregate of g's tensors divided by its count's is their mean over the silos
#: that hold g (weighted as usual), in the clear and under additive HE alike.
MODALITY_SEGMENT = "modality_"
#: The prefix of a count slot's name (``modality--oct``); it holds :data:`COMPANION_MARK`.
MODALITY_SLOT = "modality--"
#: A count mean at or below this is absent (no silo of the round holds the group): a fraction of the
#: round's total weight, many orders above HE's rounding and below any real silo's share.
COUNT_PRESENT = 1e-8
_GROUP = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")


def modality_of(name: str) -> str | None:
    """The modality group of state_dict entry ``name`` (its first path segment ``modality_<g>``), or None.

    Companion tensors and slots (names holding :data:`COMPANION_MARK`) belong to no group.
    """
    if COMPANION_MARK in name:
        return None
    for segment in name.split("."):
        if segment.startswith(MODALITY_SEGMENT) and _GROUP.fullmatch(segment[len(MODALITY_SEGMENT):]):
            return segment[len(MODALITY_SEGMENT):]
    return None


def modality_groups(manifest: Manifest) -> tuple[str, ...]:
    """The modality groups of ``manifest``'s tensors, in order of their first tensor."""
    return tuple(dict.fromkeys(g for t in manifest.tensors if (g := modality_of(t.name)) is not None))


def count_slot(group: str) -> str:
    """The name of modality group ``group``'s count slot (``modality--<group>``)."""
    return MODALITY_SLOT + group


def modality_slots(manifest: Manifest) -> tuple[TensorSpec, ...]:
    """One count slot per modality group of ``manifest`` (float64, shape (1,)), in group order."""
    return tuple(TensorSpec(name=count_slot(g), dtype=DType.FLOAT64, shape=(1,)) for g in modality_groups(manifest))
