"""Tests of the sensor-activity Task: generator, folder loader, SPConv/species-norm network, training and DP-SGD."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsilo.models import sensor_data as sd
from fedsilo.models.sensor_net import (
    SensorNet,
    SensorNetConfig,
    SPConv,
    build_sensor_net,
    is_adapter,
    is_species_norm,
    species_of_param,
)
from fedsilo.models.tasks import canonical_task_name, get_task, task_names
from fedsilo.models.tasks.sensor import accuracy_and_macro_f1
from fedsilo.models.training import TrainConfig, train_local

SMALL = {"n_train": 60, "n_val": 10, "n_test": 30, "n_unseen": 20}


def _data(domain: int = 0, **options: object):
    return get_task("sensor").load_data({"source": "builtin", "domain": domain, "seed": 0,
                                         "options": {**SMALL, **options}})


# -- registry ------------------------------------------------------------------------------------------


def test_alias_resolves_to_the_canonical_name() -> None:
    assert canonical_task_name("sensor") == "sensor-activity"
    assert get_task("sensor").name == "sensor-activity"
    assert "sensor" in task_names(aliases=True) and "sensor-activity" in task_names()
    assert get_task("sensor").report_names() == ("accuracy", "macro_f1", "val_accuracy", "unseen_accuracy",
                                                 "unseen_macro_f1")


# -- the generator ---------------------------------------------------------------------------------------


def test_generator_is_deterministic_with_the_documented_shapes() -> None:
    a, b = _data(1), _data(1)
    for split in ("train", "val", "test"):
        da, db = getattr(a.splits, split), getattr(b.splits, split)
        assert torch.equal(da.windows, db.windows) and torch.equal(da.labels, db.labels)
    assert a.splits.train.windows.shape == (60, sd.SENSOR_CHANNELS, 64)
    assert a.splits.train.windows.dtype == torch.float32 and a.splits.train.labels.dtype == torch.int64
    assert (len(a.splits.val), len(a.splits.test), len(a.unseen)) == (10, 30, 20)
    (x, species), y = a.splits.train[0]
    assert x.shape == (6, 64) and species == "horse" and 0 <= int(y) < len(sd.BEHAVIOURS)
    other = get_task("sensor").load_data({"source": "builtin", "domain": 1, "seed": 1, "options": SMALL})
    assert not torch.equal(other.splits.train.windows, a.splits.train.windows)


def test_domains_map_to_species_as_documented() -> None:
    assert [sd.domain_species(i) for i in range(9)] == [
        "horse", "horse", "sheep", "sheep", "cattle", "cattle", "goat", "goat", "horse"]
    assert [_data(i).splits.train.species for i in range(3)] == ["horse", "horse", "sheep"]
    assert _data(2).unseen.species == "sheep"  # the unseen device keeps the silo's species


def test_species_differ_and_silos_of_one_species_differ_in_labels() -> None:
    cfg = sd.SyntheticSensorConfig(n_train=400, n_val=0, n_test=0, n_unseen=0)
    horse, horse2, sheep = (sd.sensor_silo_splits(cfg, d).train for d in (0, 1, 2))

    def mean_per_class(ds: sd.SensorDataset) -> torch.Tensor:
        return torch.stack([ds.windows[ds.labels == k].mean(dim=(0, 2)) for k in range(len(sd.BEHAVIOURS))])

    # the same behaviour looks alike within a species and differently across species (sensor placement)
    within = (mean_per_class(horse) - mean_per_class(horse2)).abs().mean()
    across = (mean_per_class(horse) - mean_per_class(sheep)).abs().mean()
    assert across > 3 * within
    # two silos of one species hold different label mixes
    counts = [torch.bincount(ds.labels, minlength=5) for ds in (horse, horse2)]
    assert not torch.equal(counts[0], counts[1]) and all(int(c.min()) >= 1 for c in counts)
    balanced = sd.sensor_silo_splits(sd.SyntheticSensorConfig(n_train=1000, imbalance=0.0), 0).train
    assert int(torch.bincount(balanced.labels).min()) > 150


def test_generator_refuses_bad_options() -> None:
    with pytest.raises(ValueError, match="n_train"):
        get_task("sensor").load_data({"source": "builtin", "options": {"n_train": 0}})
    with pytest.raises(ValueError, match="bogus"):
        get_task("sensor").load_data({"source": "builtin", "options": {"bogus": 1}})


# -- the folder loader ---------------------------------------------------------------------------------


def _arrays(n: int = 40, c: int = 3, t: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, c, t)).astype(np.float32), (np.arange(n) % 5).astype(np.int64)


def _load(path: Path, **options: object):
    return get_task("sensor").load_data({"source": "folder", "path": path, "seed": 3,
                                         "options": {"species": "sheep", **options}})


def _all(data) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [data.splits.train, data.splits.val, data.splits.test]
    x, y = torch.cat([p.windows for p in parts]), torch.cat([p.labels for p in parts])
    order = torch.argsort(x[:, 0, 0])
    return x[order], y[order]


def _sorted(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    order = np.argsort(x[:, 0, 0])
    return torch.from_numpy(x[order]), torch.from_numpy(y[order])


def test_folder_npy_round_trip(tmp_path: Path) -> None:
    x, y = _arrays()
    np.save(tmp_path / "windows.npy", x)
    np.save(tmp_path / "labels.npy", y)
    data = _load(tmp_path)
    assert (len(data.splits.train), len(data.splits.val), len(data.splits.test)) == (26, 6, 8)
    assert data.splits.train.species == "sheep" and data.unseen is None
    got, want = _all(data), _sorted(x, y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_folder_csv_round_trip_and_unseen(tmp_path: Path) -> None:
    x, y = _arrays(c=2, t=3)
    header = "label," + ",".join(f"c{c}_t{t}" for c in range(2) for t in range(3))
    lines = [header] + [f"{int(lab)}," + ",".join(repr(float(v)) for v in win.reshape(-1)) for win, lab in zip(x, y)]
    (tmp_path / "silo").mkdir()
    (tmp_path / "silo" / "windows.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "new").mkdir()
    np.save(tmp_path / "new" / "windows.npy", x[:10])
    np.save(tmp_path / "new" / "labels.npy", y[:10])
    data = get_task("sensor").load_data({"source": "folder", "path": tmp_path / "silo", "seed": 3,
                                         "unseen_path": tmp_path / "new",
                                         "options": {"species": "sheep", "unseen_species": "goat"}})
    got, want = _all(data), _sorted(x, y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(data.unseen) == 10 and data.unseen.species == "goat"


@pytest.mark.parametrize(("write", "message"), [
    (lambda p: (p / "windows.csv").write_text("y,c0_t0\n1,0.5\n"), "header starting with 'label'"),
    (lambda p: (p / "windows.csv").write_text("label,c0_t0,c0_t1\n1,0.5\n"), "row 2 has 2 fields"),
    (lambda p: (p / "windows.csv").write_text("label,c0_t0\nwalk,0.5\n"), "not an integer"),
    (lambda p: (p / "windows.csv").write_text("label,x\n1,0.5\n"), "c<channel>_t<sample>"),
    (lambda p: (np.save(p / "windows.npy", np.zeros((4, 8), np.float32)),
                np.save(p / "labels.npy", np.zeros(4, np.int64))), r"windows must be a numeric array \[N, C, T\]"),
    (lambda p: (np.save(p / "windows.npy", np.zeros((4, 2, 8), np.float32)),
                np.save(p / "labels.npy", np.zeros(3, np.int64))), "4 windows but 3 labels"),
    (lambda p: (np.save(p / "windows.npy", np.zeros((4, 2, 8), np.float32)),
                np.save(p / "labels.npy", np.full(4, 7, np.int64))), r"labels must lie in \[0, 5\)"),
])
def test_folder_refuses_a_bad_file_clearly(tmp_path: Path, write, message: str) -> None:
    write(tmp_path)
    with pytest.raises(ValueError, match=message):
        _load(tmp_path)


def test_folder_needs_species_and_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="species"):
        get_task("sensor").load_data({"source": "folder", "path": tmp_path})
    with pytest.raises(ValueError, match="species"):
        _load(tmp_path, species="Big Horse")
    with pytest.raises(FileNotFoundError, match="no windows.npy"):
        _load(tmp_path)
    np.save(tmp_path / "windows.npy", np.zeros((4, 2, 8), np.float32))
    with pytest.raises(FileNotFoundError, match="labels.npy is missing"):
        _load(tmp_path)


# -- the network ---------------------------------------------------------------------------------------


def test_config_validates_and_round_trips() -> None:
    cfg = get_task("sensor").model_config({"species": ["horse", "sheep"], "norm": "sgn", "seed": 2})
    assert cfg.species == ("horse", "sheep") and SensorNetConfig.from_mapping(cfg.to_mapping()) == cfg
    for bad, key in [({"species": []}, "species"), ({"species": ["horse", "horse"]}, "distinct"),
                     ({"species": ["a.b"]}, "a.b"), ({"kernel": 4}, "kernel"), ({"rank": 40}, "rank"),
                     ({"norm": "bn"}, "norm"), ({"norm": "sgn", "norm_groups": 5}, "norm_groups"),
                     ({"channels": []}, "channels"), ({"depth": 3}, "depth")]:
        with pytest.raises(ValueError, match=key):
            get_task("sensor").model_config(bad)


def test_parameter_naming_contract_and_helpers() -> None:
    model = build_sensor_net(SensorNetConfig(species=("horse", "sheep"), channels=(8, 16), rank=2))
    names = list(model.state_dict())
    for want in ("blocks.0.conv.shared.weight", "blocks.0.conv.adapters.horse.down.weight",
                 "blocks.0.conv.adapters.horse.up.weight", "blocks.1.conv.adapters.sheep.up.weight",
                 "blocks.0.norms.horse.weight", "blocks.0.norms.horse.bias", "blocks.0.norms.sheep.running_mean",
                 "blocks.1.norms.sheep.running_var", "head.weight", "head.bias"):
        assert want in names
    assert isinstance(model.blocks[0].conv, SPConv)
    assert isinstance(model.blocks[0].conv.adapters, torch.nn.ModuleDict)
    assert isinstance(model.blocks[0].norms, torch.nn.ModuleDict)
    assert species_of_param("blocks.0.conv.adapters.horse.down.weight") == "horse"
    assert species_of_param("blocks.1.norms.sheep.num_batches_tracked") == "sheep"
    assert species_of_param("blocks.0.conv.shared.weight") is None and species_of_param("head.bias") is None
    assert is_adapter("blocks.0.conv.adapters.horse.up.weight") and not is_adapter("blocks.0.norms.horse.weight")
    assert is_species_norm("blocks.0.norms.horse.weight") and not is_species_norm("blocks.0.conv.shared.weight")
    shared = [n for n in names if species_of_param(n) is None]
    assert shared == ["blocks.0.conv.shared.weight", "blocks.1.conv.shared.weight", "head.weight", "head.bias"]
    assert {n for n in names if species_of_param(n) == "horse"} == {n.replace("sheep", "horse") for n in names
                                                                     if species_of_param(n) == "sheep"}
    # the same config gives the same weights
    again = build_sensor_net(SensorNetConfig(species=("horse", "sheep"), channels=(8, 16), rank=2))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_spconv_with_zero_low_rank_part_is_the_shared_conv() -> None:
    torch.manual_seed(0)
    conv = SPConv(3, 5, 5, 2, ("horse", "sheep"))
    x = torch.randn(4, 3, 16)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 0]), 2).float()
    assert torch.equal(conv(x, onehot), conv.shared(x))  # initially: every up is zero
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.5)
    for _ in range(3):  # after training the adapters are non-zero ...
        optimizer.zero_grad()
        (conv(x, onehot) - 1).pow(2).mean().backward()
        optimizer.step()
    assert not torch.equal(conv(x, onehot), conv.shared(x))
    with torch.no_grad():  # ... and with their up convolutions zeroed again it is the shared conv exactly
        for adapter in conv.adapters.values():
            adapter.up.weight.zero_()
    assert torch.equal(conv(x, onehot), conv.shared(x))


def _hand_set_net(norm: str) -> SensorNet:
    """One block (1 -> 1 channel, kernel 1, rank 1), species a/b with known adapters and norm affines."""
    model = build_sensor_net(SensorNetConfig.from_mapping({
        "species": ["a", "b"], "in_channels": 1, "n_classes": 2, "channels": [1], "kernel": 1, "rank": 1,
        "norm": norm, "norm_groups": 1}))
    with torch.no_grad():
        block = model.blocks[0]
        block.conv.shared.weight.fill_(1.0)
        for s, (down, up) in {"a": (2.0, 1.0), "b": (3.0, -1.0)}.items():
            block.conv.adapters[s].down.weight.fill_(down)
            block.conv.adapters[s].up.weight.fill_(up)
        for s, (w, b) in {"a": (1.0, 10.0), "b": (1.0, 20.0)}.items():
            block.norms[s].weight.fill_(w)
            block.norms[s].bias.fill_(b)
        model.head.weight.copy_(torch.tensor([[1.0], [0.0]]))
        model.head.bias.zero_()
    return model


@pytest.mark.parametrize("norm", ["sbn", "sgn"])
def test_a_mixed_batch_routes_each_example_to_its_species(norm: str) -> None:
    model = _hand_set_net(norm).eval()
    x = torch.tensor([[1.0, 3.0], [1.0, 3.0], [2.0, 6.0]])[:, None, :]  # [3, 1, T=2]
    idx = torch.tensor([0, 1, 0])
    # conv: a -> (1 + 2) x = 3x; b -> (1 - 3) x = -2x. Each window normalised over its own 2 samples
    # (sgn) or by the running statistics mean 0, var 1 (sbn in eval): then + bias 10 (a) or 20 (b), ReLU
    if norm == "sgn":
        z = torch.tensor([[-1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])  # sign of the normalised conv output
        expected = torch.relu(z + torch.tensor([[10.0], [20.0], [10.0]]))
    else:
        conv = torch.tensor([[3.0, 9.0], [-2.0, -6.0], [6.0, 18.0]]) / (1 + 1e-5) ** 0.5
        expected = torch.relu(conv + torch.tensor([[10.0], [20.0], [10.0]]))
    logits = model(x, idx)
    assert torch.allclose(logits[:, 0], expected.mean(dim=1), atol=1e-3)
    assert torch.equal(logits[:, 1], torch.zeros(3))
    # the same batch through SensorInputs whose names are in another order gives the same logits
    inputs = sd.SensorInputs(x, torch.tensor([1, 0, 1]), ("b", "a"))
    assert torch.equal(model(inputs), logits)
    with pytest.raises(ValueError, match="not among the network's species"):
        model(sd.SensorInputs(x, torch.tensor([0, 0, 0]), ("zebra",)))
    with pytest.raises(ValueError, match=r"species_idx must lie in \[0, 2\)"):
        model(x, torch.tensor([0, 2, 0]))


def test_sbn_updates_only_the_statistics_of_the_batch_species() -> None:
    model = _hand_set_net("sbn").train()
    model(torch.randn(4, 1, 8), torch.tensor([1, 1, 1, 1]))
    norms = model.blocks[0].norms
    assert int(norms["a"].num_batches_tracked) == 0 and int(norms["b"].num_batches_tracked) == 1
    assert torch.equal(norms["a"].running_mean, torch.zeros(1))


def test_accuracy_and_macro_f1_known_answer() -> None:
    acc, f1 = accuracy_and_macro_f1(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 5)
    # class 0: P 1/2 R 1 F1 2/3; class 1: P 1 R 1/3 F1 1/2; class 2: predicted only, F1 0
    assert acc == 0.5 and f1 == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)


# -- training ------------------------------------------------------------------------------------------


def test_train_local_learns_above_chance() -> None:
    task = get_task("sensor")
    data = _data(2, n_train=240, n_test=100)
    model = task.build_model(task.default_model_config(0))
    for r in range(3):
        train_local(model, data.splits.train, TrainConfig(), round_index=r, task=task)
    scores = task.evaluate_split(model, data.splits.test, "test")
    assert scores["accuracy"][0] > 0.6 and scores["accuracy"][1] == 100  # chance is 0.2
    assert set(task.evaluate_split(model, data.unseen, "unseen")) == {"unseen_accuracy", "unseen_macro_f1"}
    assert set(task.evaluate_split(model, data.splits.val, "val")) == {"val_accuracy"}
    # only the silo's species moved: the other species' branches are as built
    fresh = task.build_model(task.default_model_config(0)).state_dict()
    after = model.state_dict()
    moved = {species_of_param(k) for k in after if species_of_param(k) and not torch.equal(after[k], fresh[k])}
    assert moved == {"sheep"}


def test_dp_sgd_trains_the_sgn_network_with_per_sample_gradients() -> None:
    from fedsilo.models.dp_training import train_local_dp
    from fedsilo.privacy.dpsgd import DpSgdConfig, make_private_compatible

    task = get_task("sensor")
    data = _data(0, n_train=120)
    model = task.build_model({"norm": "sgn", "channels": [8, 16], "rank": 2})
    assert make_private_compatible(model) is model  # per-species GroupNorm: nothing to fix
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = DpSgdConfig(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=0.1, steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_local_dp(model, data.splits.train, TrainConfig(), dp, round_index=0, noise_seed=1, task=task)
        # a draw this sparse gives empty batches too (noise-only steps)
        sparse = DpSgdConfig(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=0.002, steps=3)
        train_local_dp(model, data.splits.train, TrainConfig(), sparse, round_index=1, noise_seed=1, task=task)
    assert result.steps == 4 and result.examples > 0
    assert not torch.equal(model.state_dict()["blocks.0.conv.shared.weight"], before["blocks.0.conv.shared.weight"])


def test_dp_sgd_fix_of_sbn_gives_per_species_groupnorm() -> None:
    from fedsilo.privacy.dpsgd import make_private_compatible

    model = get_task("sensor").build_model({"channels": [8, 16], "rank": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = make_private_compatible(model)
    assert isinstance(fixed.blocks[0].norms["horse"], torch.nn.GroupNorm)
    assert "blocks.0.norms.horse.weight" in fixed.state_dict()
    inputs, _ = get_task("sensor").collate(_data(0).splits.train, [0, 1, 2], torch.device("cpu"))
    assert fixed(inputs).shape == (3, 5)


def test_the_sensor_task_is_1d_and_refuses_methods_for_2d_images() -> None:
    """A series Task declares spatial_dims 1, and a run of it refuses a method that needs 2-D images."""
    from fedsilo.core.methods import get_method
    import fedsilo.silo_agent.methods  # noqa: F401 - registers the built-in methods

    assert get_task("sensor").spatial_dims == 1
    run = type("Run", (), {"task": "sensor", "strategy": "resfim"})()
    with pytest.raises(ValueError, match="works on 2-D images only .* 'sensor' is a 1-D Task"):
        get_method("resfim").check_run(run)
