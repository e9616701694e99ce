"""The segmentation-3d Task: the built-in 3-D generator, NIfTI folders with their spacing, HD95 in mm, and FedAvg on it."""

from __future__ import annotations

import json
import re
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.models.folder3d import Folder3DConfig
from fedsilo.models.synthetic3d import Synthetic3DConfig, volume_style
from fedsilo.models.tasks import DataSpec, get_task, task_names
from fedsilo.models.training import TrainConfig, train_local
from fedsilo.models.volumes import VolumeDataset, dice_and_hd95_mm

SMALL = {"size": 16, "n_train": 4, "n_val": 1, "n_test": 2}
TINY_UNET = {"channels": [4, 8], "strides": [2], "num_res_units": 0, "seed": 0}


def _stack(ds: Any) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_the_task_is_registered_with_its_metrics() -> None:
    assert "segmentation-3d" in task_names()
    task = get_task("segmentation-3d")
    assert task.metric_names == ("dice", "hd95") and task.headline_metric == "dice"
    assert not task.higher_is_better("unseen_hd95") and task.higher_is_better("val_dice")


def test_the_generator_is_deterministic_and_domains_differ() -> None:
    task = get_task("segmentation-3d")
    a = task.load_data(DataSpec(domain=1, seed=3, options=SMALL))
    b = task.load_data({"source": "builtin", "domain": 1, "seed": 3, "options": SMALL})
    other = task.load_data(DataSpec(domain=2, seed=3, options=SMALL))
    for split in ("train", "val", "test"):
        assert torch.equal(_stack(getattr(a.splits, split)), _stack(getattr(b.splits, split))), split
    image, label = a.splits.train[0]
    assert image.shape == (1, 16, 16, 16) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and set(label.unique().tolist()) == {0, 1}
    assert not torch.equal(_stack(a.splits.train), _stack(other.splits.train))
    sa, so, su = a.splits.train.spacing(0), other.splits.train.spacing(0), a.unseen.spacing(0)
    assert sa != so and su == (1.25, 1.25, 1.25)
    assert sa[0] > sa[1] == sa[2]  # thick slices: non-isotropic
    assert 1.5 <= sa[0] <= 3.0 and 0.6 <= sa[1] <= 1.0
    # styles are seeded and independent of the sizes
    assert volume_style(Synthetic3DConfig(seed=3, size=32), 1) == volume_style(Synthetic3DConfig(seed=3, size=16), 1)
    assert volume_style(Synthetic3DConfig(seed=3), 1) != volume_style(Synthetic3DConfig(seed=4), 1)


@pytest.mark.parametrize(("options", "message"), [
    ({"size": 20}, "size must be a multiple of 8, got 20"),
    ({"n_train": 0}, "n_train"),
    ({"colour": 1}, "colour"),
])
def test_bad_generator_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_task("segmentation-3d").load_data(DataSpec(options=options))


def _ball(shape: tuple[int, int, int], spacing: tuple[float, float, float], centre_mm: np.ndarray,
          radius_mm: float) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre_mm, strict=True)) <= radius_mm**2


def test_hd95_is_monais_in_millimetres_with_a_known_answer() -> None:
    """Two concentric balls whose radii differ by 4 mm: every surface point is 4 mm from the other
    surface, so HD95 is 4 mm (up to the voxel grid) at any spacing; in voxels it would not be."""
    from monai.metrics import compute_hausdorff_distance

    shape, spacing = (24, 40, 40), (2.0, 0.7, 0.7)
    centre = np.array([n * s / 2 for n, s in zip(shape, spacing, strict=True)])
    inner, outer = _ball(shape, spacing, centre, 8.0), _ball(shape, spacing, centre, 12.0)
    dice, hd = dice_and_hd95_mm(torch.from_numpy(inner.astype(np.int64)), torch.from_numpy(outer.astype(np.int64)),
                                2, spacing)
    monai = float(compute_hausdorff_distance(torch.from_numpy(inner)[None, None].float(),
                                             torch.from_numpy(outer)[None, None].float(),
                                             percentile=95, spacing=list(spacing)).item())
    assert hd == pytest.approx(monai, rel=1e-6)
    assert hd == pytest.approx(4.0, abs=0.75)
    assert dice == pytest.approx(2 * inner.sum() / (inner.sum() + outer.sum()))
    assert dice == pytest.approx(2 * 8**3 / (8**3 + 12**3), abs=0.03)  # the balls' volumes
    # a ball shifted by 3 slices of 2 mm: HD95 is 0.95 of the 6 mm shift (|cos| of a surface point is uniform)
    shifted = np.roll(inner, 3, axis=0)
    _, hd_shift = dice_and_hd95_mm(torch.from_numpy(shifted.astype(np.int64)),
                                   torch.from_numpy(inner.astype(np.int64)), 2, spacing)
    assert hd_shift == pytest.approx(0.95 * 6.0, abs=0.7)
    # conventions: both empty 0; one empty the diagonal in mm
    empty = torch.zeros(shape, dtype=torch.int64)
    assert dice_and_hd95_mm(empty, empty, 2, spacing) == (1.0, 0.0)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True)))
    assert dice_and_hd95_mm(empty, torch.from_numpy(inner.astype(np.int64)), 2, spacing) == (0.0, diagonal)


SPACING = (0.8, 0.8, 2.0)  # NIfTI x, y, z: RAS, so the voxel grid keeps this order
SHAPE = (28, 24, 12)


def _write_case(images: Path, labels: Path, name: str, rng: np.random.Generator) -> None:
    """A CT-like volume (HU) whose bright ball is the label shifted by one voxel along x."""
    centre = np.array([n * s / 2 for n, s in zip(SHAPE, SPACING, strict=True)]) + rng.uniform(-2, 2, size=3)
    label = _ball(SHAPE, SPACING, centre, 5.0)
    bright = np.roll(label, 1, axis=0)
    hu = np.where(bright, 150.0, -100.0) + rng.normal(0, 5, size=SHAPE)
    affine = np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(hu.astype(np.float32), affine), images / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), labels / f"{name}.nii.gz")


def _write_folder(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        _write_case(root / "images", root / "labels", f"case{i:02d}", rng)
    return root


class Threshold(nn.Module):
    """A pointwise 'network': foreground where the standardised intensity is above the window's middle."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-self.scale * x, self.scale * x], dim=1)


def test_a_nifti_folder_loads_trains_and_scores_hd95_in_mm(tmp_path: Path) -> None:
    from monai.metrics import compute_hausdorff_distance

    root = _write_folder(tmp_path / "silo", 6, seed=0)
    options = {"patch_size": 16, "modality": "ct", "ct_window": [-175, 250], "val_fraction": 0.2, "test_fraction": 0.2}
    task = get_task("segmentation-3d")
    data = task.load_data(DataSpec(source="folder", path=root, seed=1, options=options))
    train, test = data.splits.train, data.splits.test
    assert (len(train), len(data.splits.val), len(test)) == (4, 1, 1) and data.unseen is None
    assert isinstance(test, VolumeDataset) and test.spacing(0) == pytest.approx((0.8, 0.8, 2.0))
    image, label = test[0]
    assert image.shape == (1, 28, 24, 16)  # padded to the patch along z only
    # training takes balanced 16^3 crops; one epoch runs and is reproducible
    x, y = task.collate(train, [0, 1], torch.device("cpu"))
    assert x.shape == (2, 1, 16, 16, 16) and y.shape == (2, 1, 16, 16, 16)
    results = []
    for _ in range(2):
        model = task.build_model(TINY_UNET)
        results.append(train_local(model, train, TrainConfig(batch_size=2), round_index=0, task=task))
    assert results[0] == results[1] and math.isfinite(results[0].loss) and results[0].steps == 2
    scores = task.evaluate(model, test)
    assert 0.0 <= scores["dice"][0] <= 1.0 and math.isfinite(scores["hd95"][0])
    # a known prediction (the label shifted by one 0.8 mm voxel) scored by sliding windows over the
    # 28x24x16 volume: exactly MONAI's HD95 with the volume's spacing
    pred = np.roll(label[0].numpy() > 0, 1, axis=0)
    expected = float(compute_hausdorff_distance(torch.from_numpy(pred)[None, None].float(), label[None].float(),
                                                percentile=95, spacing=[0.8, 0.8, 2.0]).item())
    got = task.evaluate(Threshold(), test)
    assert got["hd95"] == (pytest.approx(expected, rel=1e-6), 1)
    assert expected == pytest.approx(0.8, abs=1e-6)  # a one-voxel shift along x is 0.8 mm, not 1 voxel
    assert got["dice"][0] > 0.6


def test_a_datalist_resized_to_the_patch_scales_the_spacing(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "d", 3, seed=2)
    doc = {"training": [{"image": f"images/case{i:02d}.nii.gz", "label": f"labels/case{i:02d}.nii.gz"}
                        for i in range(3)]}
    (root / "dataset.json").write_text(json.dumps(doc), encoding="utf-8")
    data = get_task("segmentation-3d").load_data(DataSpec(source="folder", path=root / "dataset.json", options={
        "patch_size": 16, "resize": True, "modality": "mr", "val_fraction": 0.0, "test_fraction": 0.0,
        "spacing": [1.0, 1.0, 2.0]}))
    train = data.splits.train
    assert len(train) == 3 and train[0][0].shape == (1, 16, 16, 16)
    # Spacingd to 1 x 1 x 2 mm gives 22 x 19 x 12 voxels; resizing them to 16 stretches each side
    sp = train.spacing(0)
    assert sp[2] == pytest.approx(2.0 * 12 / 16, rel=0.1) and sp[0] == pytest.approx(1.0 * 22 / 16, rel=0.1)


@pytest.mark.parametrize(("options", "message"), [
    ({"modality": "pet"}, "modality"),
    ({"ct_window": [250, -175]}, "ct_window must be"),
    ({"spacing": [1.0, 0.0, 1.0]}, "spacing must be positive"),
    ({"patch_size": 20}, "patch_size must be a multiple of 8, got 20"),
    ({"mr_percentiles": [5, 101]}, "mr_percentiles must satisfy"),
])
def test_bad_folder_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Folder3DConfig.from_mapping({"path": "x", **options})


def test_a_missing_folder_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        get_task("segmentation-3d").load_data({"source": "folder", "path": str(tmp_path / "nope")})


@pytest.mark.parametrize(("config", "message"), [
    ({"strides": [2, 2, 2]}, "strides must have len"),
    ({"out_channels": 1}, "out_channels"),
    ({"sw_overlap": 1.0}, "sw_overlap"),
    ({"depth": 3}, "depth"),
])
def test_bad_model_configs_are_refused(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_task("segmentation-3d").model_config(config)


def test_models_are_3d_and_deterministic() -> None:
    task = get_task("segmentation-3d")
    a, b = task.build_model({"seed": 4}), task.build_model({"seed": 4})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                     task.build_model({"seed": 5}).state_dict().values(), strict=True))
    assert a(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_fedavg_on_the_3d_task_through_simulate(tmp_path: Path) -> None:
    """Two silos with different scanners and spacings run two FedAvg rounds on 16^3 volumes."""
    from fedsilo.coordinator.loading import load_federation_config
    from fedsilo.silo_agent.config import load_agent_config
    from fedsilo.silo_agent.demo import make_certs, silo_names, write_configs
    from fedsilo.silo_agent.simulation import simulate

    names = silo_names(2)
    make_certs(tmp_path / "certs", names)
    fed, agents = write_configs(tmp_path, names=names, rounds=2, strategy="fedavg", seed=0, port=1, insecure=True,
                                aggregation="plain", min_silos=2, training={"local_epochs": 2, "batch_size": 2},
                                data=[{"source": "builtin", "domain": i, "seed": 0, **SMALL}  # [data] options are flat keys
                                      for i in range(2)],
                                task="segmentation-3d", model=TINY_UNET)
    federation = load_federation_config(fed)
    assert federation.task == "segmentation-3d"
    result = simulate(federation, [load_agent_config(a) for a in agents], timeout_s=300)
    assert [r.round for r in result.rounds] == [1, 2]
    a, b = (result.states[n] for n in names)
    for k in a.global_shared:
        assert torch.allclose(a.global_shared[k], b.global_shared[k]), k
    for name in names:
        metrics = {m: v for m, v, _ in result.rounds[-1].metrics[name]}
        assert {"dice", "hd95", "val_dice", "unseen_dice", "unseen_hd95"} <= set(metrics)
        assert all(math.isfinite(metrics[m]) for m in metrics), metrics
        assert 0.0 <= metrics["dice"] <= 1.0


@pytest.mark.parametrize("strategy", ["resfim", "deer+resfim", "fedrdn", "ffa-lora", "fedavg-lora", "deer", "pfa",
                                      "fedbn", "fedprox"])
def test_methods_that_need_2d_images_are_refused_for_the_3d_task(strategy: str, tmp_path: Path) -> None:
    from fedsilo.core.configfile import ConfigError
    from fedsilo.core.methods import get_method
    from fedsilo.coordinator.loading import load_federation_config
    from fedsilo.silo_agent.demo import make_certs, silo_names, write_configs

    names = silo_names(2)
    extra = {"training": {"proximal_mu": 0.01}} if strategy == "fedprox" else {}
    for task in ("segmentation-3d", "segmentation-2d"):
        make_certs(tmp_path / task / "certs", names)
        fed, _ = write_configs(tmp_path / task, names=names, rounds=2, strategy=strategy, seed=0, port=1,
                               insecure=False, aggregation="he", min_silos=2, task=task, pin_model=False, **extra)
        if task == "segmentation-3d" and strategy in ("resfim", "deer+resfim", "fedrdn", "ffa-lora", "fedavg-lora",
                                                      "deer"):
            assert get_method(strategy).needs_2d
            with pytest.raises(ConfigError, match=rf"run.strategy: '{re.escape(strategy)}' works on 2-D images only "
                                                  r"\(.+\); run.task = 'segmentation-3d' is a 3-D Task"):
                load_federation_config(fed)
        else:
            assert load_federation_config(fed).strategy == strategy


# -- the alias through the run's entry points -----------------------------------------------------


def test_the_alias_is_refused_with_methods_that_need_2d_images_too(tmp_path: Path) -> None:
    from fedsilo.core.configfile import ConfigError
    from fedsilo.coordinator.loading import load_federation_config
    from fedsilo.silo_agent.demo import make_certs, silo_names, write_configs

    names = silo_names(2)
    make_certs(tmp_path / "certs", names)
    fed, _ = write_configs(tmp_path, names=names, rounds=2, strategy="resfim", seed=0, port=1, insecure=False,
                           aggregation="he", min_silos=2, task="seg3d", pin_model=False)
    with pytest.raises(ConfigError, match=r"run.task = 'seg3d' is a 3-D Task"):
        load_federation_config(fed)


def test_bench_and_demo_record_the_canonical_name(tmp_path: Path) -> None:
    from fedsilo.silo_agent.bench.runner import BenchConfig
    from fedsilo.silo_agent.demo import DemoError, run_demo

    cfg = BenchConfig(methods=("fedavg",), seeds=(0,), rounds=1, out=tmp_path / "bench", aggregation="plain",
                      task="seg3d")
    assert cfg.task == "segmentation-3d" and cfg.study()["task"] == "segmentation-3d"
    with pytest.raises(DemoError, match=r"--task: unknown task 'seg9d'; known tasks: "
                                        r".*segmentation-3d \(alias seg3d\)"):
        run_demo(out=tmp_path / "demo", task="seg9d")
    assert not (tmp_path / "demo").exists()  # refused before anything ran


# -- SwinUNETR -----------------------------------------------------------------------------------

TINY_SWIN = {"architecture": "swinunetr", "feature_size": 12, "seed": 0}


@pytest.fixture(scope="module")
def volumes32() -> Any:
    """Built-in 32³ volumes (SwinUNETR's smallest patch): 2 to train on, 1 to test."""
    return get_task("segmentation-3d").load_data(DataSpec(options={"size": 32, "n_train": 2, "n_val": 1,
                                                                   "n_test": 1}))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Any:
    """One thread, as the agents train (this machine's cores are shared)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_a_tiny_swinunetr_builds_forwards_trains_and_scores(volumes32: Any) -> None:
    from fedsilo.models import model_fingerprint
    from fedsilo.models.tasks.segmentation3d import Architecture3D, UNet3DConfig

    task = get_task("seg3d")
    cfg = task.model_config(TINY_SWIN)
    assert cfg.architecture is Architecture3D.SWINUNETR and cfg.input_multiple == 32
    # the plain form round-trips (through JSON, as GetRun hands it to silos) and keeps the choice
    plain = json.loads(json.dumps(cfg.to_mapping()))
    assert plain["architecture"] == "swinunetr" and UNet3DConfig.from_mapping(plain) == cfg
    model = task.build_model(plain)
    assert type(model).__name__ == "SwinUNETR"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # the same config builds the same network (fingerprint); another seed or architecture does not
    assert model_fingerprint(model) == model_fingerprint(task.build_model(cfg))
    assert model_fingerprint(model) != model_fingerprint(task.build_model({**TINY_SWIN, "seed": 1}))
    assert model_fingerprint(model) != model_fingerprint(task.build_model({"seed": 0}))
    x, y = task.collate(volumes32.splits.train, [0, 1], torch.device("cpu"))
    assert x.shape == (2, 1, 32, 32, 32)
    with torch.no_grad():
        assert task.forward(model, x).shape == (2, 2, 32, 32, 32)  # [N, K, D, H, W] logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local(model, volumes32.splits.train, TrainConfig(batch_size=2), round_index=0, task=task)
    assert result.steps == 1 and result.examples == 2 and math.isfinite(result.loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    scores = task.evaluate(model, volumes32.splits.test)
    assert 0.0 <= scores["dice"][0] <= 1.0 and math.isfinite(scores["hd95"][0]) and scores["dice"][1] == 1


@pytest.mark.parametrize(("config", "message"), [
    ({"architecture": "swin"}, r"key 'architecture' must be one of 'unet', 'swinunetr', got 'swin'"),
    ({**TINY_SWIN, "feature_size": 16}, r"UNet3DConfig.feature_size must be a multiple of 12 .*got 16"),
    ({**TINY_SWIN, "feature_size": 0}, r"UNet3DConfig.feature_size must be >= 12, got 0"),
    ({**TINY_SWIN, "window_size": 0}, r"UNet3DConfig.window_size must be >= 1, got 0"),
])
def test_bad_swinunetr_configs_are_refused(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_task("segmentation-3d").model_config(config)


@pytest.mark.parametrize(("config", "side", "multiple"), [
    (TINY_SWIN, 16, 32),
    (TINY_SWIN, 48, 32),
    ({"channels": [4, 8, 8, 8, 8], "strides": [2, 2, 2, 2], "num_res_units": 0}, 24, 16),  # UNet: strides' product
])
def test_a_patch_the_network_cannot_take_is_refused_naming_it(config: dict[str, Any], side: int,
                                                              multiple: int) -> None:
    task = get_task("segmentation-3d")
    model = task.build_model(config)
    assert model.input_multiple == multiple
    with pytest.raises(ValueError, match=rf"patch \({side}, {side}, {side}\): every side must be a multiple of "
                                         rf"{multiple} .*data option size \(built-in data\) or patch_size"):
        task.forward(model, torch.zeros(1, 1, side, side, side))
    data = task.load_data(DataSpec(options={"size": side, "n_train": 1, "n_val": 0, "n_test": 1}))
    with pytest.raises(ValueError, match=rf"patch \({side}, {side}, {side}\)"):
        task.evaluate(model, data.splits.test)


def test_swinunetr_is_refused_under_record_level_dp(volumes32: Any) -> None:
    """Its windowed attention puts every example's windows in the batch dimension (Opacus' per-sample
    gradients would be per window): every DP-SGD path refuses it with the reason, once."""
    from fedsilo.privacy.dpsgd import dp_sgd_gradients, make_private_compatible
    from fedsilo.silo_agent.model_pin import build_run_model

    task = get_task("segmentation-3d")
    reason = r"architecture = 'swinunetr' cannot be trained with DP-SGD \(a record-level privacy plan\)"
    with pytest.raises(ValueError, match=reason) as refused:
        make_private_compatible(task.build_model(TINY_SWIN))
    assert str(refused.value).count("cannot be trained with DP-SGD (a record-level") == 1
    x, y = task.collate(volumes32.splits.train, [0, 1], torch.device("cpu"))
    with pytest.raises(ValueError, match=reason):
        dp_sgd_gradients(task.build_model(TINY_SWIN), x, y, max_grad_norm=1.0, noise_multiplier=1.0,
                         expected_batch_size=2)
    # the model silos build for a run: refused under a record-level plan, built without one
    with pytest.raises(ValueError, match=reason):
        build_run_model(task="seg3d", model_config=TINY_SWIN, strategy="fedavg", tables={}, record_level=True,
                        base_checkpoint=None)
    run = build_run_model(task="seg3d", model_config=TINY_SWIN, strategy="fedavg", tables={}, record_level=False,
                          base_checkpoint=None)
    assert run.task.name == "segmentation-3d" and type(run.model).__name__ == "SwinUNETR"
    # the default UNet stays DP-SGD compatible as it is
    unet = task.build_model(TINY_UNET)
    assert make_private_compatible(unet) is unet
