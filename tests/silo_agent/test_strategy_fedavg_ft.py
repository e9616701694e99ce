"""FedAvg+FT: the final global model fine-tuned per silo, the epoch (0 included) chosen on validation; unseen: the global model."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from fedsilo.cli.main import main
from fedsilo.coordinator.config import ConfigError, parse_tables
from fedsilo.coordinator.loading import load_federation_config
from fedsilo.core.methods import DpLevel, get_method
from fedsilo.models import Optimizer, TrainConfig, train_local
from fedsilo.models.tasks import SiloData, get_task
from fedsilo.silo_agent.bench.methods import resolve, study_method_names
from fedsilo.silo_agent.config import load_agent_config
from fedsilo.silo_agent.demo import DEMO_PRIVACY, make_certs, silo_names, write_configs
from fedsilo.silo_agent.methods import strategy_for
from fedsilo.silo_agent.methods.fedavg import FedAvg
from fedsilo.silo_agent.methods.fedavg_ft import EPOCH_KEY, VAL_KEY, FedAvgFt, parse_settings
from fedsilo.silo_agent.simulation import simulate
from fedsilo.silo_agent.state import AgentState

TASK = get_task("segmentation-2d")
SMALL = {"n_train": 16, "n_val": 8, "n_test": 4, "image_size": 32}
NET = {"channels": [4, 8], "strides": [2], "num_res_units": 0, "seed": 0}
ADAM = TrainConfig(batch_size=8, lr=3e-3, seed=0)


@pytest.fixture(scope="module")
def data() -> SiloData:
    return TASK.load_data({"source": "builtin", "domain": 1, "seed": 0, "options": SMALL})


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _final(data: SiloData) -> tuple[nn.Module, AgentState]:
    """A global model after a little training (as after the run's last aggregate), and its state."""
    model = TASK.build_model(NET)
    train_local(model, data.splits.train, ADAM, round_index=1, task=TASK)
    w = _sd(model)
    return model, AgentState(run_id="run", fingerprint="fp", global_shared=dict(w), model=dict(w))


def _val(model: nn.Module, sd: dict[str, torch.Tensor], data: SiloData) -> float:
    m = copy.deepcopy(model)
    m.load_state_dict(sd)
    return TASK.evaluate_split(m, data.splits.val, "val")["val_dice"][0]


def test_declarations_and_settings() -> None:
    method = get_method("fedavg-ft")
    assert method is FedAvgFt and DpLevel.RECORD in method.refuses and DpLevel.SILO not in method.refuses
    assert method.bench is not None and method.bench.privacy is None and method.bench.why_no_dp
    assert parse_tables(method, {}) == {"finetune": {"epochs": 5}}  # filled in when a run leaves it out
    assert strategy_for("fedavg-ft", {"finetune": {"epochs": 0}}).epochs == 0
    assert parse_settings({"epochs": 3}) == {"epochs": 3}
    for bad, fragment in (({"epochs": -1}, "epochs"), ({"epochs": True}, "epochs"), ({"epochs": 1.5}, "epochs"),
                          ({"epochs": 101}, "epochs"), ({"rate": 1}, "rate")):
        with pytest.raises(ConfigError, match=fragment):
            parse_tables(method, {"finetune": bad})
    model = TASK.build_model(NET)
    assert FedAvgFt().shared_names(model) == FedAvg().shared_names(model)


def test_zero_epochs_is_fedavg(data: SiloData) -> None:
    model, state = _final(data)
    before = _sd(model)
    FedAvgFt(epochs=0).after_final_aggregate(model=model, state=state, data=data, task=TASK, train_cfg=ADAM, rnd=3)
    fedavg = FedAvg()
    assert _same(FedAvgFt().eval_state_dict(state), fedavg.eval_state_dict(state))
    assert _same(FedAvgFt().unseen_state_dict(state), fedavg.unseen_state_dict(state))
    assert int(state.strategy_state[EPOCH_KEY]) == 0 and _same(_sd(model), before)


def test_fine_tuning_never_lowers_validation_and_leaves_the_global_model(data: SiloData) -> None:
    """The kept model's validation Dice is the best of epochs 0..E, epoch 0 (the global model) included,
    and is what the silo then evaluates; the unseen domain still gets the global model."""
    model, state = _final(data)
    trained, flags = _sd(model), [p.requires_grad for p in model.parameters()]
    global_model = state.personal_state_dict()
    ft = FedAvgFt(epochs=3)
    ft.after_final_aggregate(model=model, state=state, data=data, task=TASK, train_cfg=ADAM, rnd=3)
    assert _same(_sd(model), trained) and [p.requires_grad for p in model.parameters()] == flags
    assert _same(state.personal_state_dict(), global_model)  # the consensus model is not touched
    scores = state.strategy_state[VAL_KEY].tolist()
    epoch = int(state.strategy_state[EPOCH_KEY])
    assert len(scores) == 4 and scores[0] == pytest.approx(_val(model, global_model, data))
    assert scores[epoch] == max(scores) and all(s < max(scores) for s in scores[:epoch])  # ties keep the earlier
    assert epoch > 0, "fine-tuning a barely trained model on its own silo's data helps here"
    personal = ft.eval_state_dict(state)
    assert _val(model, personal, data) == pytest.approx(max(scores))
    assert max(scores) >= scores[0]
    assert _same(ft.unseen_state_dict(state), global_model)
    # deterministic, from the global model whatever was kept before (a restart repeats the call)
    again = copy.deepcopy(state)
    ft.after_final_aggregate(model=model, state=again, data=data, task=TASK, train_cfg=ADAM, rnd=3)
    assert _same(ft.eval_state_dict(again), personal)
    # fine-tuning epoch e shuffles as round rnd + e of the run would: one epoch equals train_local there
    one = AgentState(run_id="run", fingerprint="fp", global_shared=dict(global_model), model=dict(global_model))
    FedAvgFt(epochs=1).after_final_aggregate(model=model, state=one, data=data, task=TASK,
                                             train_cfg=replace(ADAM, local_epochs=4, proximal_mu=0.5), rnd=3)
    reference = copy.deepcopy(model)
    reference.load_state_dict(global_model)
    train_local(reference, data.splits.train, ADAM, round_index=4, task=TASK)
    assert int(one.strategy_state[EPOCH_KEY]) == 1
    assert _same(FedAvgFt().eval_state_dict(one), _sd(reference))


def test_a_harmful_fine_tuning_keeps_the_global_model(data: SiloData) -> None:
    """A learning rate that wrecks the model: every epoch scores below epoch 0, so the global model is kept."""
    model, state = _final(data)
    wreck = TrainConfig(batch_size=4, lr=10.0, optimizer=Optimizer.SGD, seed=0)
    ft = FedAvgFt(epochs=2)
    ft.after_final_aggregate(model=model, state=state, data=data, task=TASK, train_cfg=wreck, rnd=3)
    scores = state.strategy_state[VAL_KEY].tolist()
    assert int(state.strategy_state[EPOCH_KEY]) == 0 and all(not s >= scores[0] for s in scores[1:]), scores
    assert _same(ft.eval_state_dict(state), state.personal_state_dict())


def test_no_validation_split_means_no_fine_tuning(data: SiloData) -> None:
    model, state = _final(data)
    empty = SiloData(splits=replace(data.splits, val=torch.utils.data.Subset(data.splits.val, [])), unseen=None)
    FedAvgFt(epochs=2).after_final_aggregate(model=model, state=state, data=empty, task=TASK, train_cfg=ADAM, rnd=3)
    assert int(state.strategy_state[EPOCH_KEY]) == 0
    assert _same(FedAvgFt().eval_state_dict(state), state.personal_state_dict())


def _run(work: Path, strategy: str, finetune: dict | None = None):
    names = silo_names(2)
    make_certs(work / "certs", names)
    cells = [{"source": "builtin", "domain": i, "seed": 0, **SMALL} for i in range(len(names))]
    fed, agents = write_configs(work, names=names, rounds=2, strategy=strategy, seed=0, port=1, insecure=False,
                                aggregation="plain", min_silos=len(names), data=cells,
                                model={**NET, "seed": 0})
    if finetune is not None:
        fed.write_text(fed.read_text() + "\n[finetune]\n" + "".join(f"{k} = {v}\n" for k, v in finetune.items()))
    return simulate(load_federation_config(fed), [load_agent_config(a) for a in agents], unseen_every_round=True)


def _metrics(result) -> list[dict]:
    return [{silo: {k: v for k, v, _ in values} for silo, values in r.metrics.items()} for r in result.rounds]


def test_a_whole_run_equals_fedavg_until_it_fine_tunes_after_the_last_aggregate(tmp_path: Path) -> None:
    """Deployed code in one process, 2 silos x 2 rounds: with 0 epochs every reported number is FedAvg's;
    with 3 epochs round 1 is FedAvg's, and round 2's validation Dice is at least FedAvg's while its unseen
    Dice (the global model) is FedAvg's exactly."""
    fedavg = _metrics(_run(tmp_path / "fedavg", "fedavg"))
    zero = _metrics(_run(tmp_path / "zero", "fedavg-ft", {"epochs": 0}))
    assert zero == fedavg
    tuned_run = _run(tmp_path / "ft", "fedavg-ft", {"epochs": 3})
    tuned = _metrics(tuned_run)
    assert tuned[0] == fedavg[0]
    for silo, m in tuned[1].items():
        assert m["val_dice"] >= fedavg[1][silo]["val_dice"], silo
        assert m["unseen_dice"] == fedavg[1][silo]["unseen_dice"], silo
        assert int(tuned_run.states[silo].strategy_state[EPOCH_KEY]) > 0, silo  # 2 rounds leave room to improve
        assert m["val_dice"] > fedavg[1][silo]["val_dice"] and m["dice"] != fedavg[1][silo]["dice"], silo


def test_record_level_dp_is_refused_with_the_reason(tmp_path: Path) -> None:
    names = silo_names(2)
    with pytest.raises(ConfigError, match="fine-tuning is another pass"):
        fed, _ = write_configs(tmp_path, names=names, rounds=1, strategy="fedavg-ft", seed=0, port=1, insecure=True,
                               aggregation="plain", privacy=DEMO_PRIVACY, pin_model=False)
        load_federation_config(fed)


def test_the_bench_and_the_demo_list_it_from_the_registry() -> None:
    assert "fedavg-ft" in study_method_names()
    names = list(study_method_names())
    assert names.index("ditto") < names.index("fedavg-ft")  # the registry's order (55, after Ditto's 50)
    method = resolve("fedavg-ft")
    assert method.strategy == "fedavg-ft" and method.privacy is None and "another pass" in method.why_no_dp
    for command in ("bench", "demo"):
        result = CliRunner().invoke(main, [command, "--help"], terminal_width=1000)
        assert result.exit_code == 0 and "fedavg-ft" in result.output, result.output
