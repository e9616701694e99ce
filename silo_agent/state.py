"""The agent's persistent state: one checkpoint file, replaced atomically after every step."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedsilo.core.atomic import atomic_write_with

CHECKPOINT = "checkpoint.pt"


@dataclass(kw_only=True)
class AgentState:
    """What an agent must not lose.

    Attributes:
        run_id: the run this state belongs to.
        fingerprint: the model fingerprint joined with.
        applied_round: aggregates 1..applied_round are in ``global_shared``.
        done_round: last round this agent trained and uploaded (or gave up on).
        reported_round: last round whose metrics were reported.
        global_shared: the federation's shared parameters after ``applied_round``.
        model: the silo's full model state (shared values as trained, local values personal).
        last_train_loss: mean training loss of ``done_round``.
        model_config: the run's model settings (to rebuild the network from this checkpoint).
        pending_round: DP runs: the round whose noised update is saved in ``pending_update``
            but not yet known to be uploaded (0 if none). After a restart the agent resends
            exactly this update, so its ledger counts the release once.
        pending_update: that update (clipped and noised, before any encryption).
        retired: DP runs: this silo declined for good (its privacy budget would be exceeded).
        sensitive: ResFIM runs: the silo's masks (True = domain-sensitive, stays local), per
            parameter; they never leave the silo.
        masks_round: the round before whose training ``sensitive`` was computed (0: none yet).
        shared_fraction: the fraction of masked elements the masks share.
        consensus: ResFIM runs: the consensus values (invariant part + mean of the silos' local
            parts) of the shared tensors after the last applied round.
        strategy_state: a strategy's own tensors (Ditto's personal model, FedRDN's statistics);
            keys are the strategy's.
    """

    run_id: str
    fingerprint: str
    applied_round: int = 0
    done_round: int = 0
    reported_round: int = 0
    global_shared: dict[str, torch.Tensor] = field(default_factory=dict)
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    last_train_loss: float | None = None
    model_config: dict = field(default_factory=dict)
    pending_round: int = 0
    pending_update: dict[str, torch.Tensor] = field(default_factory=dict)
    retired: bool = False
    sensitive: dict[str, torch.Tensor] = field(default_factory=dict)
    masks_round: int = 0
    shared_fraction: float | None = None
    consensus: dict[str, torch.Tensor] = field(default_factory=dict)
    strategy_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def personal_state_dict(self) -> dict[str, torch.Tensor]:
        """This silo's model: the federation's shared values plus its own local ones."""
        sd = {k: v.clone() for k, v in self.model.items()}
        sd.update({k: v.clone() for k, v in self.global_shared.items()})
        return sd

    def save(self, state_dir: Path) -> None:
        """Writes the checkpoint atomically (temp file, fsync, rename)."""
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_with(state_dir / CHECKPOINT, lambda f: torch.save(self.__dict__, f))

    @classmethod
    def load(cls, state_dir: Path) -> AgentState | None:
        """The saved state, or None if there is none."""
        path = state_dir / CHECKPOINT
        if not path.is_file():
            return None
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**data)
