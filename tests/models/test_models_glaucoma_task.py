"""Tests of the "glaucoma-multimodal" Task (with a stand-in network of the ImoNet interface) and its metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score
from torch import nn
from torch.nn import functional

from fedsilo.models.glaucoma_data import GlaucomaDataset, GlaucomaInputs, GlaucomaTargets
from fedsilo.models.metrics import cup_dice, disc_dice, quadratic_weighted_kappa, vertical_cdr
from fedsilo.models.tasks import DataSpec, canonical_task_name, get_task, task_names
from fedsilo.models.training import TrainConfig, train_local

SMALL = {"image_size": 32, "oct_size": [16, 32], "n_train": 8, "n_val": 2, "n_test": 3, "n_unseen": 3}


@dataclass
class _Output:
    """The output object the Task relies on: ``seg_logits``, ``grade_logits``, ``loss(targets)``."""

    seg_logits: torch.Tensor
    grade_logits: torch.Tensor

    def loss(self, targets: GlaucomaTargets) -> torch.Tensor:
        return functional.cross_entropy(self.seg_logits, targets.mask) + functional.cross_entropy(self.grade_logits,
                                                                                                   targets.grade)


class StandIn(nn.Module):
    """A tiny network of ImoNet's interface: a 1x1 conv for the segmentation, a linear grader of pooled fundus and OCT."""

    def __init__(self) -> None:
        super().__init__()
        self.seg = nn.Conv2d(3, 3, 1)
        self.grade = nn.Linear(4, 3)

    def forward(self, inputs: GlaucomaInputs) -> _Output:
        pooled = torch.cat([inputs.fundus.mean(dim=(2, 3)),
                            inputs.oct.mean(dim=(1, 2, 3))[:, None] * inputs.has_oct[:, None]], dim=1)
        return _Output(self.seg(inputs.fundus), self.grade(pooled))


class Oracle(nn.Module):
    """Predicts what the fundus encodes: label ``round(2 * fundus[0])`` per pixel, grade ``round(2 * fundus[1, 0, 0])``."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, inputs: GlaucomaInputs) -> _Output:
        labels = torch.round(2 * inputs.fundus[:, 0]).long()
        grades = torch.round(2 * inputs.fundus[:, 1, 0, 0]).long()
        return _Output(functional.one_hot(labels, 3).permute(0, 3, 1, 2).float(), functional.one_hot(grades, 3).float())


def test_registered_with_its_alias() -> None:
    assert "glaucoma-multimodal" in task_names() and "glaucoma" in task_names(aliases=True)
    assert canonical_task_name("glaucoma") == "glaucoma-multimodal"
    task = get_task("glaucoma")
    assert task.headline_metric == "cup_dice" and task.spatial_dims == 2
    assert not task.higher_is_better("vcdr_error") and task.higher_is_better("unseen_grade_kappa")


# -- metrics ----------------------------------------------------------------------------------------------

def _disc(cup_rows: tuple[int, int] | None) -> np.ndarray:
    m = np.zeros((12, 12), np.int64)
    m[2:10, 2:10] = 1
    if cup_rows is not None:
        m[cup_rows[0]:cup_rows[1], 4:8] = 2
    return m


def test_vertical_cdr_and_dice_known_answers() -> None:
    assert vertical_cdr(_disc((4, 8))) == 0.5 and vertical_cdr(torch.from_numpy(_disc((4, 6)))) == 0.25
    assert vertical_cdr(_disc(None)) == 0.0 and math.isnan(vertical_cdr(np.zeros((5, 5), np.int64)))
    assert cup_dice(_disc((4, 6)), _disc((4, 8))) == pytest.approx(2 * 8 / (8 + 16))
    assert disc_dice(_disc((4, 6)), _disc((4, 8))) == 1.0
    empty = np.zeros((12, 12), np.int64)
    assert disc_dice(empty, _disc(None)) == 0.0 and cup_dice(empty, _disc(None)) == 1.0
    shifted = np.roll(_disc(None), 4, axis=1)  # 8x8 squares overlapping in 8x4
    assert disc_dice(shifted, _disc(None)) == pytest.approx(2 * 32 / 128)
    with pytest.raises(ValueError, match=r"\[H, W\] label map"):
        vertical_cdr(np.zeros((1, 5, 5)))


def test_vertical_cdr_measures_the_largest_disc_and_the_largest_cup_inside_it() -> None:
    noisy = _disc((4, 8))
    noisy[0, 11] = 2  # a stray cup pixel outside the disc, in the top row
    noisy[11, 0] = 1  # a stray disc pixel in the bottom row
    noisy[2, 2] = 2  # a one-pixel cup inside the disc, apart from the real one (rows 4..7, columns 4..7)
    assert vertical_cdr(noisy) == 0.5  # without the components: 12 / 12 = 1.0
    far = _disc(None)
    far[0, 0] = 2  # the only cup pixel lies outside the disc: no cup
    assert vertical_cdr(far) == 0.0
    diagonal = np.zeros((6, 6), np.int64)
    diagonal[[0, 1, 2], [0, 1, 2]] = 1  # 8-connected: one disc of three rows
    diagonal[1, 1] = 2
    assert vertical_cdr(diagonal) == pytest.approx(1 / 3)


def test_quadratic_weighted_kappa_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        for _ in range(20):
            true = rng.integers(0, k, size=int(rng.integers(2, 40)))
            pred = np.where(rng.random(true.size) < 0.6, true, rng.integers(0, k, size=true.size))
            if len(set(true.tolist()) | set(pred.tolist())) < 2:
                continue
            assert quadratic_weighted_kappa(pred, true, k) == pytest.approx(
                cohen_kappa_score(true, pred, weights="quadratic", labels=list(range(k))), abs=1e-12)
    assert quadratic_weighted_kappa([0, 1, 2], [0, 1, 2], 3) == 1.0
    assert quadratic_weighted_kappa([1, 1], [1, 1], 3) == 1.0  # scikit-learn's 0/0; perfect agreement here
    assert quadratic_weighted_kappa([2, 0], [0, 2], 3) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        quadratic_weighted_kappa([3], [0], 3)
    with pytest.raises(ValueError, match="equal-length"):
        quadratic_weighted_kappa([0, 1], [0], 3)


# -- evaluate, loss, collate --------------------------------------------------------------------------------

def _encoded(pred_masks: list[np.ndarray], true_masks: list[np.ndarray], pred_grades: list[int],
             true_grades: list[int]) -> GlaucomaDataset:
    n = len(pred_masks)
    fundus = torch.zeros(n, 3, 12, 12)
    for i, (m, g) in enumerate(zip(pred_masks, pred_grades)):
        fundus[i, 0] = torch.from_numpy(m) / 2
        fundus[i, 1] = g / 2
    return GlaucomaDataset(fundus, torch.zeros(n, 1, 4, 8), torch.zeros(n, dtype=torch.bool),
                           torch.from_numpy(np.stack(true_masks)), torch.tensor(true_grades))


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_evaluate_known_answers_with_a_stand_in(batch_size: int) -> None:
    ds = _encoded([_disc((4, 6)), np.zeros((12, 12), np.int64)], [_disc((4, 8)), _disc(None)], [0, 1], [0, 2])
    model = Oracle().train()
    scores = get_task("glaucoma").evaluate(model, ds, batch_size=batch_size)
    assert model.training  # restored
    assert list(scores) == list(get_task("glaucoma").metric_names)
    assert scores["cup_dice"] == (pytest.approx((2 / 3 + 1) / 2), 2)
    assert scores["disc_dice"] == (0.5, 2)
    assert scores["vcdr_error"] == (0.25, 1)  # the second image has no predicted disc
    assert scores["grade_accuracy"] == (0.5, 2) and scores["grade_macro_f1"] == (pytest.approx(1 / 3), 2)
    assert scores["grade_kappa"][0] == pytest.approx(cohen_kappa_score([0, 2], [0, 1], weights="quadratic"))
    none = _encoded([np.zeros((12, 12), np.int64)], [_disc(None)], [0], [0])
    assert get_task("glaucoma").evaluate(model, none)["vcdr_error"] == (1.0, 0)
    with pytest.raises(ValueError, match="empty dataset"):
        get_task("glaucoma").evaluate(model, torch.utils.data.Subset(ds, []))
    with pytest.raises(ValueError, match="batch_size"):
        get_task("glaucoma").evaluate(model, ds, batch_size=0)


def test_loss_delegates_to_the_output_object() -> None:
    task = get_task("glaucoma-multimodal")

    class Probe:
        def loss(self, targets: object) -> torch.Tensor:
            self.seen = targets
            return torch.tensor(1.5)

    probe, target = Probe(), object()
    assert float(task.loss(probe, target)) == 1.5 and probe.seen is target


def test_builtin_data_trains_and_scores_with_a_stand_in() -> None:
    task = get_task("glaucoma")
    data = task.load_data(DataSpec(seed=1, domain=2, options=SMALL))
    assert len(data.splits.train) == 8 and data.unseen is not None and len(data.unseen) == 3
    inputs, targets = task.collate(data.splits.train, [0, 1, 2], torch.device("cpu"))
    torch.manual_seed(0)
    model = StandIn()
    out = task.forward(model, inputs)
    assert out.seg_logits.shape == (3, 3, 32, 32) and out.grade_logits.shape == (3, 3)
    assert task.loss(out, targets).dim() == 0
    before = [p.detach().clone() for p in model.parameters()]
    result = train_local(model, data.splits.train, TrainConfig(batch_size=4, local_epochs=1), round_index=0, task=task)
    assert math.isfinite(result.loss) and result.examples == 8
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    scores = task.evaluate_split(model, data.unseen, "unseen")
    assert set(scores) == {f"unseen_{m}" for m in task.metric_names}
    assert all(math.isfinite(v) for v, _ in scores.values())
    fundus_only = task.load_data(DataSpec(seed=1, domain=2, options={**SMALL, "modalities": "fundus"}))
    assert not fundus_only.splits.train.has_oct_modality


def test_dp_sgd_runs_on_glaucoma_batches_including_empty_ones() -> None:
    from fedsilo.models.dp_training import train_local_dp
    from fedsilo.privacy.dpsgd import DpSgdConfig

    task = get_task("glaucoma")
    train = task.load_data(DataSpec(seed=0, options={**SMALL, "n_unseen": 0})).splits.train
    torch.manual_seed(0)
    model = StandIn()
    dp = DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=6)
    result = train_local_dp(model, train, TrainConfig(batch_size=2), dp, round_index=0, noise_seed=3, task=task)
    assert result.steps == 6


def test_model_hooks_delegate_to_imo_net() -> None:
    pytest.importorskip("fedsilo.models.imo_net", reason="models/imo_net.py is written separately")
    from fedsilo.models.imo_net import ImoNetConfig

    task = get_task("glaucoma")
    cfg = task.model_config(task.default_model_config(seed=2))
    assert isinstance(cfg, ImoNetConfig) and task.model_config(cfg) is cfg
    assert isinstance(task.build_model(cfg), nn.Module)


def test_folder_source_with_unseen_path(tmp_path: Path) -> None:
    from PIL import Image

    for name in ("silo", "held"):
        root = tmp_path / name
        root.mkdir()
        rows = []
        for i in range(5):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / f"f{i}.png")
            Image.fromarray(_disc((4, 8)).astype(np.uint8)).save(root / f"m{i}.png")
            rows.append(f"f{i}.png,,m{i}.png,{i % 3}")
        (root / "datalist.csv").write_text("fundus,oct,mask,grade\n" + "\n".join(rows) + "\n")
    data = get_task("glaucoma").load_data({"source": "folder", "path": tmp_path / "silo", "seed": 0,
                                           "unseen_path": tmp_path / "held", "options": {"image_size": 12}})
    assert sum(len(s) for s in (data.splits.train, data.splits.val, data.splits.test)) == 5
    assert isinstance(data.unseen, GlaucomaDataset) and len(data.unseen) == 5
    assert data.unseen.masks.shape == (5, 12, 12) and not data.unseen.has_oct_modality
    with pytest.raises(ValueError, match="unknown key"):
        get_task("glaucoma").load_data({"source": "builtin", "options": {"labels": 3}})


@pytest.mark.parametrize("strategy", ["fedbm", "fedrdn", "resfim"])
def test_methods_that_read_image_tensors_are_refused_for_the_multimodal_task(tmp_path, strategy: str) -> None:  # type: ignore[no-untyped-def]
    """Its batches are GlaucomaInputs, not one image tensor (Task.image_batches = False): the run config
    refuses the methods that read images directly, naming both; FedAvg is accepted."""
    from fedsilo.core.configfile import ConfigError
    from fedsilo.coordinator.loading import load_federation_config
    from fedsilo.silo_agent.demo import make_certs, silo_names, write_configs

    names = silo_names(2)
    for method in (strategy, "fedavg"):
        work = tmp_path / method
        make_certs(work / "certs", names)
        fed, _ = write_configs(work, names=names, rounds=2, strategy=method, seed=0, port=1, insecure=False,
                               aggregation="he", min_silos=2, task="glaucoma", pin_model=False)
        if method == "fedavg":
            assert load_federation_config(fed).strategy == "fedavg"
            continue
        with pytest.raises(ConfigError, match=rf"run.strategy: '{strategy}' works on 2-D image tensors only \(.+\); "
                                              r"run.task = 'glaucoma' feeds its network structured inputs"):
            load_federation_config(fed)
