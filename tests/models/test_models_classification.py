"""Tests of the classification-2d Task: registry, data through the Task, metrics (per-class F1, macro-F1), training and DP-SGD."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fedsilo.models.classify_data import BUILTIN_CLASSES, ClassifyDataset
from fedsilo.models.metrics import accuracy_and_macro_f1
from fedsilo.models.tasks import canonical_task_name, get_task, task_names
from fedsilo.models.tasks.classification import per_class_f1
from fedsilo.models.training import TrainConfig, train_local

SMALL = {"n_train": 40, "n_val": 10, "n_test": 20, "n_unseen": 10}


def _data(domain: int = 0, **options: object):
    return get_task("classify").load_data({"source": "builtin", "domain": domain, "seed": 0,
                                           "options": {**SMALL, **options}})


def test_alias_resolves_to_the_canonical_name() -> None:
    task = get_task("classify")
    assert canonical_task_name("classify") == "classification-2d" == task.name
    assert {"classify", "classification-2d"} <= set(task_names(aliases=True))
    assert task.spatial_dims == 2 and task.data_sources == ("builtin", "folder")
    assert task.report_names() == ("accuracy", "macro_f1", "val_accuracy", "unseen_accuracy", "unseen_macro_f1")


def test_builtin_data_through_the_task() -> None:
    data = _data(1)
    assert (len(data.splits.train), len(data.splits.val), len(data.splits.test), len(data.unseen)) == (40, 10, 20, 10)
    x, y = get_task("classify").collate(data.splits.train, [0, 1, 2], torch.device("cpu"))
    assert x.shape == (3, 3, 32, 32) and y.shape == (3,)
    assert _data(1, n_unseen=0).unseen is None
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'window'"):
        _data(0, window=3)


def test_folder_data_with_an_unseen_folder_keeps_the_silos_classes(tmp_path: Path) -> None:
    for root, classes in ((tmp_path / "silo", ("b", "c")), (tmp_path / "held", ("c",))):
        for name in classes:
            (root / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 30 * i, dtype=np.uint8)).save(root / name / f"{i}.png")
    spec = {"source": "folder", "path": str(tmp_path / "silo"), "unseen_path": str(tmp_path / "held"),
            "options": {"classes": ["a", "b", "c"], "image_size": 8}}
    data = get_task("classify").load_data(spec)
    assert data.splits.train.class_names == ("a", "b", "c") and data.unseen.class_names == ("a", "b", "c")
    assert len(data.unseen) == 3 and data.unseen.labels.tolist() == [2, 2, 2]


def test_model_config_default_and_custom_classes() -> None:
    task = get_task("classify")
    table = task.default_model_config(7)
    assert table == {"seed": 7, "class_names": list(BUILTIN_CLASSES)}
    assert task.model_config(table).seed == 7
    model = task.build_model({"class_names": ["benign", "malignant"], "channels": [16, 32]})
    assert model.n_classes == 2 and model(torch.rand(1, 3, 32, 32)).shape == (1, 2)
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'species'"):
        task.model_config({"species": ["horse"]})


# -- metrics -------------------------------------------------------------------------------------------


def test_per_class_f1_and_macro_f1_known_answers() -> None:
    pred, true = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1])
    f1 = per_class_f1(pred, true, 5)
    # class 0: P 1/2 R 1 -> 2/3; class 1: P 1 R 1/3 -> 1/2; class 2: predicted only -> 0; 3, 4: absent -> NaN
    assert f1[:3] == pytest.approx([2 / 3, 0.5, 0.0]) and math.isnan(f1[3]) and math.isnan(f1[4])
    acc, macro = accuracy_and_macro_f1(pred, true, 5)
    assert acc == 0.5 and macro == pytest.approx((2 / 3 + 0.5) / 3)
    assert per_class_f1([1, 1], [1, 1], 2)[1] == 1.0 and math.isnan(per_class_f1([], [], 2)[0])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        per_class_f1([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match="equal-length"):
        per_class_f1([0], [0, 1], 2)


def test_the_sensor_task_still_exports_the_moved_metric() -> None:
    from fedsilo.models.tasks import sensor

    assert sensor.accuracy_and_macro_f1 is accuracy_and_macro_f1


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6).flatmap(lambda k: st.tuples(
    st.just(k), st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=40))))
def test_macro_f1_is_the_mean_of_the_defined_per_class_f1(case: tuple[int, list[tuple[int, int]]]) -> None:
    k, pairs = case
    pred, true = np.array([p for p, _ in pairs]), np.array([t for _, t in pairs])
    acc, macro = accuracy_and_macro_f1(pred, true, k)
    f1 = np.array(per_class_f1(pred, true, k))
    assert 0.0 <= acc <= 1.0 and 0.0 <= macro <= 1.0
    assert np.all((f1[~np.isnan(f1)] >= 0) & (f1[~np.isnan(f1)] <= 1))
    assert macro == pytest.approx(float(np.nanmean(f1)))
    assert set(np.flatnonzero(~np.isnan(f1))) == set(pred.tolist()) | set(true.tolist())


def test_evaluate_scores_every_example_and_keeps_the_mode() -> None:
    task = get_task("classify")
    data = _data(0)
    model = task.build_model(task.default_model_config(0))
    scores = task.evaluate(model, data.splits.test, batch_size=7)
    assert {"accuracy", "macro_f1"} <= set(scores) and scores["accuracy"][1] == 20 and model.training
    assert all(task.is_detail(name) for name in set(scores) - {"accuracy", "macro_f1"})
    assert scores == task.evaluate(model, data.splits.test, batch_size=20)
    with pytest.raises(ValueError, match="empty"):
        task.evaluate(model, ClassifyDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.int64), ("a", "b")))


class _FixedLogits(torch.nn.Module):
    """A classifier whose prediction for example i is ``preds[i]`` (read from the image's first pixel)."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.scale = torch.nn.Parameter(torch.ones(()))  # a parameter, so the scorer finds a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred = x[:, 0, 0, 0].round().to(torch.int64)
        return torch.nn.functional.one_hot(pred, self.n_classes).float() * self.scale


def _fixed(preds: list[int], labels: list[int]) -> ClassifyDataset:
    images = torch.zeros(len(preds), 3, 4, 4)
    images[:, 0, 0, 0] = torch.tensor(preds, dtype=torch.float32)
    return ClassifyDataset(images, torch.tensor(labels, dtype=torch.int64), tuple("abcde"))


def test_evaluate_reports_the_f1_of_each_present_class_with_its_support() -> None:
    task = get_task("classify")
    assert task.detail_prefixes == ("f1_class_",)
    data = _fixed(preds=[0, 0, 1, 2, 1], labels=[0, 1, 1, 1, 0])
    scores = task.evaluate(_FixedLogits(5), data, batch_size=2)
    # class 0: TP 1, support 2, predicted 2 -> 1/2; class 1: TP 1, support 3, predicted 2 -> 2/5;
    # class 2: predicted once, absent -> 0 (support 0); classes 3 and 4: neither -> left out
    assert scores == {"accuracy": (pytest.approx(2 / 5), 5), "macro_f1": (pytest.approx(0.3), 5),
                      "f1_class_0": (pytest.approx(0.5), 2), "f1_class_1": (pytest.approx(0.4), 3),
                      "f1_class_2": (0.0, 0)}
    assert all(math.isfinite(v) for v, _ in scores.values())
    unseen = task.evaluate_split(_FixedLogits(5), data, "unseen")
    assert set(unseen) == {f"unseen_{k}" for k in scores} and unseen["unseen_f1_class_1"] == scores["f1_class_1"]
    assert task.evaluate_split(_FixedLogits(5), data, "val") == {"val_accuracy": scores["accuracy"]}
    assert task.higher_is_better("f1_class_2") and task.higher_is_better("unseen_f1_class_2")


# -- training -------------------------------------------------------------------------------------------


def test_train_local_learns_well_above_chance_on_domain_0() -> None:
    task = get_task("classify")
    start = time.monotonic()
    data = _data(0, n_train=160, n_test=100, n_unseen=0, label_skew=0)
    model = task.build_model(task.default_model_config(0))
    for r in range(10):
        train_local(model, data.splits.train, TrainConfig(), round_index=r, task=task)
    scores = task.evaluate_split(model, data.splits.test, "test")
    assert scores["accuracy"][0] > 0.5 and scores["accuracy"][1] == 100  # chance is 0.2
    assert scores["macro_f1"][0] > 0.4
    assert set(task.evaluate_split(model, data.splits.val, "val")) == {"val_accuracy"}
    assert time.monotonic() - start < 20


def test_dp_sgd_trains_the_group_norm_network() -> None:
    from fedsilo.models.dp_training import train_local_dp
    from fedsilo.privacy.dpsgd import DpSgdConfig, make_private_compatible

    task = get_task("classify")
    data = _data(0)
    model = task.build_model({"channels": [16, 32], "embed_dim": 16})
    assert make_private_compatible(model) is model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = DpSgdConfig(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=0.2, steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_local_dp(model, data.splits.train, TrainConfig(), dp, round_index=0, noise_seed=1, task=task)
        sparse = DpSgdConfig(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=0.002, steps=2)  # empty draws too
        train_local_dp(model, data.splits.train, TrainConfig(), sparse, round_index=1, noise_seed=1, task=task)
    assert result.steps == 3 and result.examples > 0
    after = model.state_dict()
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert not torch.equal(after["features.0.0.weight"], before["features.0.0.weight"])
