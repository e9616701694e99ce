"""FedAvg+FT: FedAvg's final global model fine-tuned on each silo's own data, the epoch chosen on its validation split."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fedsilo.core.lazy import lazy_module
from fedsilo.core.methods import BenchDefaults, DpLevel, register_method
from fedsilo.silo_agent.strategy import Strategy

torch = lazy_module("torch")
training = lazy_module("fedsilo.models.training")

if TYPE_CHECKING:
    from fedsilo.models import TrainConfig
    from fedsilo.models.tasks import SiloData, Task
    from fedsilo.silo_agent.state import AgentState

log = logging.getLogger("fedsilo.agent")

#: The run table that holds the fine-tuning settings.
TABLE = "finetune"
#: Fine-tuning epochs when ``[finetune] epochs`` is left out.
DEFAULT_EPOCHS = 5
#: The most fine-tuning epochs a run may ask for.
MAX_EPOCHS = 100
#: Prefix of the fine-tuned model's entries in ``AgentState.strategy_state`` (then the state_dict name).
PERSONAL_PREFIX = "personal/"
#: ``strategy_state`` key of the kept epoch (0: the global model, not fine-tuned).
EPOCH_KEY = "finetune/epoch"
#: ``strategy_state`` key of the validation headline after each epoch 0..E (epoch 0: the global model).
VAL_KEY = "finetune/val"


def parse_settings(table: Mapping[str, Any]) -> dict[str, Any]:
    """The ``[finetune]`` table, complete and checked: ``epochs`` (default 5), an integer in [0, 100].

    Raises:
        ValueError: naming the key at fault.
    """
    unknown = sorted(set(table) - {"epochs"})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; [{TABLE}] has: epochs")
    epochs = table.get("epochs", DEFAULT_EPOCHS)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 0 <= epochs <= MAX_EPOCHS:
        raise ValueError(f"epochs: {epochs!r} must be an integer in [0, {MAX_EPOCHS}]")
    return {"epochs": epochs}


def personal_model(state: AgentState) -> dict[str, torch.Tensor]:
    """The silo's fine-tuned model kept in ``state.strategy_state`` (copies), or {} when it kept none
    (before the run's end, or when epoch 0, the global model, had the best validation score)."""
    n = len(PERSONAL_PREFIX)
    return {k[n:]: v.clone() for k, v in state.strategy_state.items() if k.startswith(PERSONAL_PREFIX)}


@register_method
class FedAvgFt(Strategy):
    """FedAvg during the run; after it, each silo fine-tunes the final global model on its own data.

    The federation trains and averages one global model w exactly as FedAvg does (every
    floating-point entry shared; default upload and apply). When the run's last aggregate has been
    applied (:meth:`after_final_aggregate`, before the silo's final evaluation), the silo trains a
    copy of w on its own training set for up to E = ``[finetune] epochs`` epochs, one
    ``train_local`` call per epoch (the run's optimiser, learning rate and batch size, a fresh
    optimiser each epoch as in each round of the run, the shuffling of rounds R+1, R+2, ..., no
    proximal term), and scores its validation split with the Task's headline after every epoch.
    It keeps the epoch e in 0..E with the best validation score, epoch 0 being w itself (ties keep
    the earlier epoch), so fine-tuning never lowers the validation score and nothing is chosen on
    test data. Without a validation split nothing can be chosen: the silo keeps w.

    The kept model (when e > 0) lives in ``state.strategy_state`` under ``"personal/<name>"``,
    with the kept epoch under ``"finetune/epoch"`` and the validation scores of epochs 0..E under
    ``"finetune/val"``; it is what the silo evaluates on its own validation and test data. The
    unseen domain, which no silo trains on, is scored with the consensus (global) model w. With
    E = 0 the method is FedAvg.

    Fine-tuning is another pass over the silo's records whose results (its metrics) are
    reported: under record-level DP that would be a release the plan does not account, so the
    method refuses record-level DP (as Ditto does); without DP and under silo-level DP (which
    protects the uploads, not the records, and never sees the fine-tuned model) it runs. It
    fine-tunes in float32 in the agent's process, on ``agent.device``, not across a training group.

    References: Wang et al. 2019, "Federated Evaluation of On-device Personalization"
    (arXiv:1910.10252); Cheng, Chadha & Duchi 2021, "Fine-tuning is Fine in Federated Learning"
    (arXiv:2108.07313).

    Args:
        epochs: E, the most fine-tuning epochs (0: none, FedAvg).
    """

    name = "fedavg-ft"
    summary = ("FedAvg, then the final global model fine-tuned on each silo's own data for up to E epochs, the epoch "
               "(0..E) chosen on its validation split (Wang et al. 2019; Cheng et al. 2021)")
    order = 55
    refuses = {DpLevel.RECORD: "its fine-tuning is another pass over each silo's records after the run, a release "
                               "this plan does not account"}
    tables = {TABLE: parse_settings}
    default_tables = frozenset({TABLE})
    bench = BenchDefaults(note=f"FedAvg; then the final global model fine-tuned on each silo's data for up to "
                               f"{DEFAULT_EPOCHS} epochs, the epoch (0 = none) kept by its validation score; evaluated "
                               "with the fine-tuned model, the unseen domain with the global one",
                          why_no_dp="its fine-tuning is another pass over the data that the plan does not account")

    def __init__(self, *, epochs: int = DEFAULT_EPOCHS) -> None:
        self.epochs = parse_settings({"epochs": epochs})["epochs"]

    @classmethod
    def for_run(cls, tables: Mapping[str, Mapping[str, Any]]) -> FedAvgFt:
        return cls(epochs=parse_settings(tables.get(TABLE, {}))["epochs"])

    def is_shared(self, name: str, model: torch.nn.Module) -> bool:
        return True

    def after_final_aggregate(self, *, model: torch.nn.Module, state: AgentState, data: SiloData, task: Task,
                              train_cfg: TrainConfig, rnd: int, device: torch.device | None = None) -> None:
        """Fine-tunes a copy of the final global model and keeps the epoch with the best validation score.

        Starts from ``state.personal_state_dict()`` (the final global model: every floating-point
        entry is shared) whatever was stored before, so a second call (after a restart) gives the
        same model. ``model`` is left as it is.

        Args:
            model: The network holding the final global model (unchanged; a deep copy is trained).
            state: The agent's state; its fine-tuning entries of ``strategy_state`` are replaced.
            data: The silo's data: its training split is fine-tuned on, its validation split chooses.
            task: The run's Task (batches, loss, metrics; its headline scores the validation split).
            train_cfg: The run's training settings (optimiser, learning rate, batch size, seed).
            rnd: The run's last round (the shuffling of epoch e is that of round ``rnd + e``).
            device: Where to train and evaluate (None: where the model is).
        """
        for key in [k for k in state.strategy_state if k.startswith(PERSONAL_PREFIX) or k in (EPOCH_KEY, VAL_KEY)]:
            del state.strategy_state[key]
        start = state.personal_state_dict()
        val = self.eval_data(data.splits.val, state=state)
        if self.epochs == 0 or len(val) == 0:  # type: ignore[arg-type]
            if self.epochs:
                log.warning("fedavg-ft: this silo has no validation data to choose a fine-tuning epoch by; it keeps "
                            "the global model")
            state.strategy_state[EPOCH_KEY] = torch.tensor(0)
            return
        higher = task.higher_is_better(task.headline_metric)
        name = f"val_{task.headline_metric}"
        tuned = copy.deepcopy(model)
        tuned.load_state_dict(start)

        def score() -> float:
            return float(task.evaluate_split(tuned, val, "val", device=device)[name][0])

        def better(new: float, old: float) -> bool:
            if math.isnan(new):
                return False
            return math.isnan(old) or (new > old if higher else new < old)

        scores = [score()]
        best_epoch, best, kept = 0, scores[0], None
        train = self.train_data(data.splits.train, state=state, rnd=rnd)
        cfg = replace(train_cfg, local_epochs=1, proximal_mu=0.0)
        for epoch in range(1, self.epochs + 1):
            training.train_local(tuned, train, cfg, round_index=rnd + epoch, task=task, device=device)
            scores.append(score())
            if better(scores[-1], best):
                best_epoch, best = epoch, scores[-1]
                kept = {k: v.detach().to("cpu").clone() for k, v in tuned.state_dict().items()}
        if kept is not None:
            for k, v in kept.items():
                state.strategy_state[PERSONAL_PREFIX + k] = v
        state.strategy_state[EPOCH_KEY] = torch.tensor(best_epoch)
        state.strategy_state[VAL_KEY] = torch.tensor(scores, dtype=torch.float64)
        log.info("fedavg-ft: validation %s by fine-tuning epoch (0 = the global model): %s; kept epoch %d",
                 task.headline_metric, ", ".join(f"{s:.4f}" for s in scores), best_epoch)

    def eval_state_dict(self, state: AgentState) -> dict[str, torch.Tensor]:
        """The fine-tuned model once the run has ended and an epoch > 0 was kept, else the global model."""
        return personal_model(state) or state.personal_state_dict()

    def unseen_state_dict(self, state: AgentState) -> dict[str, torch.Tensor]:
        """The consensus (global) model: no silo fine-tunes on the unseen domain."""
        return state.personal_state_dict()
