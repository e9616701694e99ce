"""``fedsilo bench``'s one-for-one reference: the Task's silo groups, one model per group on the pooled
data of its silos (the same model for silos of one group, another for each group), and the refusal of
a study whose Task has no groups."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import ConcatDataset

from fedsilo.cli.main import main
from fedsilo.models import TrainConfig, train_local
from fedsilo.models.tasks import get_task
from fedsilo.silo_agent.bench import reference
from fedsilo.silo_agent.bench.grouped import run_grouped, silo_groups
from fedsilo.silo_agent.bench.methods import GROUP_POOLED, has_groups, resolve, scoring, study_method_names
from fedsilo.silo_agent.bench.reference import Silo
from fedsilo.silo_agent.bench.runner import BenchConfig, BenchError

SENSOR = get_task("sensor")
SEGMENTATION = get_task("segmentation-2d")
#: Tiny built-in sensor silos: domains 0, 1 are horse, domains 2, 3 sheep.
OPTIONS = {"n_train": 8, "n_val": 4, "n_test": 16, "n_unseen": 0}
TRAIN = TrainConfig.from_mapping({"local_epochs": 1, "batch_size": 4, "seed": 0})
MODEL = SENSOR.default_model_config(0)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Train on one thread, as the simulated agents do."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def silos() -> list[Silo]:
    """Two groups of two silos: horse (domains 0, 1) and sheep (domains 2, 3)."""
    return [Silo(name=f"site-{d}", data=SENSOR.load_data({"source": "builtin", "domain": d, "seed": 0,
                                                            "options": OPTIONS}))
            for d in range(4)]


def _pooled_model(members: list[Silo]) -> torch.nn.Module:
    """A model built as the run builds it, trained one round on the pooled training data of ``members``."""
    model = SENSOR.build_model(MODEL)
    train_local(model, ConcatDataset([s.data.splits.train for s in members]), TRAIN, round_index=1, task=SENSOR)
    return model


def test_the_sensor_task_groups_silos_by_species(silos: list[Silo]) -> None:
    assert [SENSOR.group_of(s.data) for s in silos] == ["horse", "horse", "sheep", "sheep"]
    assert silo_groups(silos, SENSOR) == {"site-0": "horse", "site-1": "horse", "site-2": "sheep", "site-3": "sheep"}
    assert has_groups("sensor") and has_groups("sensor-activity") and not has_groups("segmentation-2d")


def test_a_task_without_groups_has_none(silos: list[Silo]) -> None:
    assert SEGMENTATION.group_of(silos[0].data) is None  # the Task seam's default
    with pytest.raises(ValueError, match="silo 'site-0' has no group"):
        silo_groups(silos, SEGMENTATION)


def test_one_for_one_trains_one_model_per_group_on_its_pooled_data(silos: list[Silo],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    scored: list[list[Any]] = []
    record = reference.round_record

    def spy(rnd: int, models: list, silos_: list, task: Any) -> dict:
        scored.append(list(models))
        return record(rnd, models, silos_, task)

    monkeypatch.setattr(reference, "round_record", spy)
    seen: list[int] = []
    log = run_grouped(silos, task=SENSOR, model_cfg=MODEL, train_cfg=TRAIN, rounds=1, on_round=seen.append)
    assert seen == [1] and [r["round"] for r in log] == [1]
    models = scored[0]
    assert models[0] is models[1] and models[2] is models[3] and models[0] is not models[2]
    entry = log[0]
    assert entry["bytes_up"] == entry["bytes_down"] == 0 and entry["unseen"] == {}
    assert set(entry["metrics"]) == {"accuracy", "macro_f1", "val_accuracy"}
    horse, sheep = _pooled_model(silos[:2]), _pooled_model(silos[2:])
    for model, members in ((horse, silos[:2]), (sheep, silos[2:])):  # each silo scored with its group's model
        for silo in members:
            scores = SENSOR.evaluate(model, silo.data.splits.test)
            assert entry["metrics"]["accuracy"][silo.name] == scores["accuracy"][0]
            assert entry["metrics"]["macro_f1"][silo.name] == scores["macro_f1"][0]
            assert entry["metrics"]["val_accuracy"][silo.name] == SENSOR.evaluate(model, silo.data.splits.val)["accuracy"][0]
    trained = dict(horse.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in sheep.named_parameters())  # the groups' models differ


def test_one_for_one_is_a_reference_scored_per_group_and_listed_for_grouped_tasks_only(tmp_path: Path) -> None:
    method = resolve("one-for-one", task="sensor")
    assert method.strategy is None and "group_of" in method.note
    assert scoring("one-for-one", task="sensor") == GROUP_POOLED
    assert "one-for-one" in study_method_names("sensor") and "one-for-one" not in study_method_names("segmentation-2d")
    cfg = BenchConfig(methods=("local", "one-for-one", "cksp"), seeds=(0,), rounds=1, out=tmp_path / "out",
                      task="sensor", silos=4)
    assert cfg.methods == ("local", "one-for-one", "cksp")


def test_a_study_of_a_task_without_groups_refuses_one_for_one_before_any_cell(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="one-for-one trains one model per silo group, but the silos of task "
                                         "'segmentation-2d' have no groups"):
        BenchConfig(methods=("local", "one-for-one"), seeds=(0,), rounds=1, out=tmp_path / "out")
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["bench", "--methods", "fedavg,one-for-one", "--out", str(out)])
    assert result.exit_code != 0 and "error:" in result.output and "have no groups" in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()
