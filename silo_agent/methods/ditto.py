"""Ditto (Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021).

The federation trains and averages a global model w exactly as FedAvg does (every floating-point
entry is shared; default upload and apply). Besides it, each silo k keeps a personal model v_k that
never leaves the silo; after the round's local training it descends, on the same local data,

    F_k(v) + λ/2 · ‖v − w^t‖²,  i.e.  v ← v − η (∇F_k(v) + λ (v − w^t))

(Ditto's objective and Algorithm 1), λ = ``TrainConfig.personal_lambda`` and w^t the global model
at the start of the round. The step uses the run's optimiser (η its learning rate; with Adam the
bracket is the gradient Adam receives), batch size and epochs. The silo's own validation and test
data are scored with v; the unseen domain, which no silo trains on, with the global model.

The personal step is a second pass over the silo's training records. Under record-level DP it
would be a second release of those records (v's metrics are reported), which fedsilo's privacy
ledger does not plan; Ditto therefore runs only without record-level DP (the coordinator refuses
the combination).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING

from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, DpLevel, register_method
from fedsilo.silo_agent.strategy import Strategy

training = lazy_module("fedsilo.models.training")

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from fedsilo.models import TrainConfig
    from fedsilo.silo_agent.state import AgentState

PERSONAL_PREFIX = "personal/"
"""Prefix of the personal model's entries in ``AgentState.strategy_state`` (then the state_dict name)."""


def personal_model(state: AgentState) -> dict[str, torch.Tensor]:
    """The silo's personal model v kept in ``state.strategy_state`` (copies), or {} before its first step."""
    n = len(PERSONAL_PREFIX)
    return {k[n:]: v.clone() for k, v in state.strategy_state.items() if k.startswith(PERSONAL_PREFIX)}


@register_method
class Ditto(Strategy):
    """Shares everything (FedAvg's global model) and trains a personal model beside it.

    The personal model v lives in ``state.strategy_state`` under ``"personal/<state_dict name>"``
    (every state_dict entry), so it is saved with the agent's checkpoint. Its first step starts
    from the round's global model w^t.
    """

    name = "ditto"
    summary = "global model as FedAvg; personal model pulled to it by lambda/2 ||v - w||^2 (Li et al. 2021)"
    order = 50
    refuses = {DpLevel.RECORD: "its personal model is a second pass over each silo's data every round, a release "
                               "this plan does not account"}
    bench = BenchDefaults(note="global model as FedAvg; personal model pulled to it by lambda/2 ||v - w||^2, "
                               "lambda = 0.1 (Li et al. 2021); evaluated with the personal model",
                          why_no_dp="its personal model is a second pass over the data that the plan does not account")

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return True

    def after_training(self, *, model: torch.nn.Module, state: AgentState, train: Dataset, train_cfg: TrainConfig,
                       rnd: int) -> None:
        """One personal step: trains v on ``train`` toward w^t; ``model`` is left as it is.

        w^t is ``state.global_shared`` (still the values of the round's start) overlaid on
        ``state.model``, read before anything here changes; as every floating-point entry is
        shared, ``state.model`` contributes only non-floating-point buffers, so w^t is the same
        whether the agent has already stored this round's trained copy there or not. v starts from
        its stored value, or from w^t in the silo's first personal step. The step is
        ``train_local`` on a deep copy of ``model`` (same trainable parameters, same round index)
        with ``proximal_mu = train_cfg.personal_lambda`` and the anchor w^t.

        Args:
            model: The network after the round's local training of the global model (unchanged).
            state: The agent's state; its personal entries of ``strategy_state`` are replaced.
            train: The round's training set.
            train_cfg: The run's training settings (λ is ``personal_lambda``).
            rnd: The round (the shuffling seed's round index).
        """
        global_model = state.personal_state_dict()  # w^t: copies, taken before anything is overwritten
        start = {**global_model, **personal_model(state)}
        personal = copy.deepcopy(model)
        personal.load_state_dict(start)
        training.train_local(personal, train, replace(train_cfg, proximal_mu=train_cfg.personal_lambda), round_index=rnd,
                    anchor=global_model)
        for k, v in personal.state_dict().items():
            state.strategy_state[PERSONAL_PREFIX + k] = v.detach().to("cpu").clone()

    def eval_state_dict(self, state: AgentState) -> dict[str, torch.Tensor]:
        """The personal model v (the global model before the silo's first personal step)."""
        return personal_model(state) or state.personal_state_dict()

    def unseen_state_dict(self, state: AgentState) -> dict[str, torch.Tensor]:
        """The global model: no silo trains a personal model on the unseen domain."""
        return state.personal_state_dict()
