"""Exports a silo's model from its agent state: the only way a model leaves the federation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedsilo.core.atomic import atomic_write_with

from fedsilo.silo_agent.state import AgentState


class ExportError(Exception):
    """Nothing to export, or the output cannot be written."""


def export_model(state_dir: Path, out: Path) -> dict[str, Any]:
    """Writes ``{"run_id", "round", "fingerprint", "model_config", "state_dict"}`` to ``out``.

    The state dict is the silo's personalised model (the federation's shared values after the
    last applied aggregate plus the silo's local values); rebuild the network with
    ``fedsilo.models.build_model(ModelConfig.from_mapping(model_config))``.

    Raises:
        ExportError: no agent state in ``state_dir``, or no aggregate applied yet.
    """
    state = AgentState.load(state_dir)
    if state is None:
        raise ExportError(f"{state_dir} holds no agent state (checkpoint.pt); run the agent first")
    if state.applied_round == 0:
        raise ExportError("no aggregate has been applied yet: there is no federated model to export")
    info = {"run_id": state.run_id, "round": state.applied_round, "fingerprint": state.fingerprint,
            "model_config": state.model_config, "state_dict": state.personal_state_dict()}
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_with(out, lambda f: torch.save(info, f))
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc}") from None
    return info
