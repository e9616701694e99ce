"""The Task seam: the registry, segmentation-2d equal to the direct calls, and a toy second Task that fits."""

from __future__ import annotations

import enum
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

import fedsilo.models
from fedsilo.core.rng import seeded_global_rng
from fedsilo.models.data import SiloSplits
from fedsilo.models.folder import FolderConfig, load_folder
from fedsilo.models.registry import ModelConfig, build_model
from fedsilo.models.synthetic import SyntheticConfig, silo_splits, unseen_domain
from fedsilo.models.tasks import (
    EVAL_SPLITS,
    DataSpec,
    SiloData,
    Task,
    canonical_task_name,
    get_task,
    register_task,
    task_names,
    unregister_task,
)
from fedsilo.models.training import TrainConfig, evaluate, stack_batch, train_local

SMALL = {"image_size": 32, "n_train": 6, "n_val": 2, "n_test": 3}


# -- a toy second Task, registered by this test module only --------------------------------------


@dataclass(frozen=True, kw_only=True)
class ToyModelConfig:
    """The toy's model: a linear classifier of 8x8 images."""

    seed: int = 0

    def to_mapping(self) -> dict[str, Any]:
        return {"seed": self.seed}


class ToyImageClassification(Task):
    """Two classes of 8x8 images (bright left half or right half); each silo's scanner shifts the intensity."""

    name = "toy-classification"
    summary = "toy 8x8 two-class image classification (test only)"
    metric_names = ("accuracy", "nll")
    headline_metric = "accuracy"
    lower_is_better = frozenset({"nll"})
    unseen_domain = "a scanner with a larger intensity shift than any silo's"
    data_sources = ("builtin",)

    N = {"train": 64, "val": 16, "test": 32, "unseen": 32}

    @staticmethod
    def _images(seed: int, domain: int, split: str) -> TensorDataset:
        rng = np.random.default_rng([seed, domain + 1, list(ToyImageClassification.N).index(split)])
        n = ToyImageClassification.N[split]
        labels = rng.integers(0, 2, size=n)
        x = rng.normal(0.0, 0.3, size=(n, 1, 8, 8))
        x[labels == 0, :, :, :4] += 1.0
        x[labels == 1, :, :, 4:] += 1.0
        x += 0.5 * domain if domain >= 0 else 2.0
        return TensorDataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(labels))

    def read_data(self, spec: DataSpec) -> SiloData:
        splits = SiloSplits(**{s: self._images(spec.seed, spec.domain, s) for s in ("train", "val", "test")})
        return SiloData(splits=splits, unseen=self._images(spec.seed, -1, "unseen"))

    def model_config(self, config: Mapping[str, Any] | ToyModelConfig) -> ToyModelConfig:
        if isinstance(config, ToyModelConfig):
            return config
        unknown = set(config) - {"seed"}
        if unknown:
            raise ValueError(f"ToyModelConfig: unknown key(s) {sorted(unknown)}")
        return ToyModelConfig(**config)

    def build_model(self, config: Mapping[str, Any] | ToyModelConfig) -> nn.Module:
        cfg = self.model_config(config)
        with seeded_global_rng(cfg.seed):  # the process-wide lock: simulated silos build models in threads
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 2))

    def collate(self, dataset: Dataset[Any], indices: Sequence[int], device: torch.device) -> tuple[Any, Any]:
        items = [dataset[i] for i in indices]
        x = torch.stack([im for im, _ in items]).to(device)
        y = torch.stack([lab for _, lab in items]).to(device=device, dtype=torch.int64)
        return x, y

    def loss(self, output: Any, target: Any) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def evaluate(self, model: nn.Module, dataset: Dataset[Any], *, batch_size: int = 16) -> dict[str, tuple[float, int]]:
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        was_training = model.training
        model.eval()
        correct, nll = 0, 0.0
        try:
            with torch.no_grad():
                for start in range(0, n, batch_size):
                    x, y = self.collate(dataset, range(start, min(n, start + batch_size)), torch.device("cpu"))
                    logits = self.forward(model, x)
                    correct += int((logits.argmax(dim=1) == y).sum())
                    nll += float(F.cross_entropy(logits, y, reduction="sum"))
        finally:
            model.train(was_training)
        return {"accuracy": (correct / n, n), "nll": (nll / n, n)}


@pytest.fixture(scope="module")
def toy() -> Iterator[Task]:
    """The toy Task, registered with the decorator for this module's tests and removed after."""
    register_task(ToyImageClassification)
    yield get_task("toy-classification")
    unregister_task("toy-classification")


def test_toy_task_loads_trains_and_evaluates(toy: Task) -> None:
    assert "toy-classification" in task_names()
    data = toy.load_data({"source": "builtin", "domain": 1, "seed": 5})
    model = toy.build_model({"seed": 1})
    before = toy.evaluate(model, data.splits.test)
    result = train_local(model, data.splits.train, TrainConfig(lr=0.05, local_epochs=5, batch_size=8),
                         round_index=0, task=toy)
    assert result.steps == 5 * 8 and result.examples == 5 * 64
    after = toy.evaluate(model, data.splits.test)
    assert set(after) == set(toy.metric_names)
    assert after["accuracy"][1] == 32
    assert after["accuracy"][0] >= 0.9  # it learned
    assert after["nll"][0] < before["nll"][0]
    report = {}
    for split, ds in (("test", data.splits.test), ("val", data.splits.val), ("unseen", data.unseen)):
        report.update(toy.evaluate_split(model, ds, split))
    assert tuple(report) == toy.report_names() == (
        "accuracy", "nll", "val_accuracy", "unseen_accuracy", "unseen_nll")
    assert report["accuracy"] == after["accuracy"]
    assert toy.higher_is_better("unseen_accuracy") and not toy.higher_is_better("val_nll")


def test_toy_task_training_is_reproducible(toy: Task) -> None:
    data = toy.load_data(DataSpec(domain=0, seed=2))
    weights = []
    for _ in range(2):
        model = toy.build_model({})
        train_local(model, data.splits.train, TrainConfig(lr=0.05), round_index=3, task=toy)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_source_the_task_does_not_read_is_refused(toy: Task, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"reads data.source \['builtin'\], not 'folder'"):
        toy.load_data({"source": "folder", "path": str(tmp_path)})


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), domain=st.integers(0, 7), batch_size=st.integers(1, 40))
def test_toy_metrics_do_not_depend_on_the_batch_size(seed: int, domain: int, batch_size: int) -> None:
    toy = ToyImageClassification()  # instances need no registry
    data = toy.load_data(DataSpec(seed=seed, domain=domain))
    model = toy.build_model({"seed": seed % 1000})
    whole = toy.evaluate(model, data.splits.test, batch_size=64)
    parts = toy.evaluate(model, data.splits.test, batch_size=batch_size)
    assert whole["accuracy"] == parts["accuracy"]
    assert whole["nll"][0] == pytest.approx(parts["nll"][0], rel=1e-5)


# -- the registry --------------------------------------------------------------------------------


def test_builtin_tasks_are_registered() -> None:
    assert "segmentation-2d" in task_names()
    assert list(task_names()) == sorted(task_names())
    task = get_task("segmentation-2d")
    assert task.name == "segmentation-2d"
    assert task.headline_metric == "dice" and task.metric_names == ("dice", "hd95")
    assert task.summary and "\n" not in task.summary and task.unseen_domain
    assert task.higher_is_better("dice") and not task.higher_is_better("unseen_hd95")
    assert get_task("segmentation-2d") is not task  # a fresh instance per call


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'segmentation-9d'; known tasks: .*segmentation-2d"):
        get_task("segmentation-9d")
    with pytest.raises(ValueError, match="unknown task"):
        unregister_task("segmentation-9d")
    with pytest.raises(ValueError, match="unknown task"):
        get_task(None)  # type: ignore[arg-type]


def _concrete(name: str, **attrs: Any) -> type[Task]:
    """A complete Task class called ``name`` (methods borrowed from the toy)."""
    return type("Made", (ToyImageClassification,), {"name": name, **attrs})


def test_the_decorator_registers_and_duplicates_are_refused() -> None:
    @register_task
    class Another(ToyImageClassification):
        name = "another-toy"

    try:
        assert isinstance(get_task("another-toy"), Another)
        assert register_task(Another) is Another  # the same class again: no change
        with pytest.raises(ValueError, match=r"task name 'another-toy' is already registered by "
                                             r".*test_models_task\..*Another; choose another name"):
            register_task(_concrete("another-toy"))
        with pytest.raises(ValueError, match=r"'segmentation-2d' is already registered by "
                                             r"fedsilo\.models\.tasks\.segmentation2d\.Segmentation2D"):
            register_task(_concrete("segmentation-2d"))
    finally:
        unregister_task("another-toy")
    assert "another-toy" not in task_names()
    assert isinstance(get_task("segmentation-2d"), Task)


@pytest.mark.parametrize(("attrs", "message"), [
    ({"name": "Bad Name"}, "lower-case words joined by hyphens"),
    ({"headline_metric": "f1"}, "headline_metric 'f1' is not one of"),
    ({"summary": "two\nlines"}, "summary must be one line"),
    ({"metric_names": ("a", "a"), "headline_metric": "a"}, "distinct names"),
    ({"lower_is_better": frozenset({"f1"})}, "unknown metrics"),
    ({"unseen_domain": ""}, "unseen_domain must be a non-empty string"),
    ({"detail_prefixes": "f1_"}, "detail_prefixes must be a tuple"),
    ({"detail_prefixes": ("",)}, "detail_prefixes must be a tuple"),
    ({"detail_prefixes": ("F1-class",)}, r"strings of \[a-z0-9_\]"),
    ({"detail_prefixes": ("x" * 49,)}, "1..48-character"),
    ({"detail_prefixes": ("acc",)}, "nor begin a metric"),
    ({"detail_prefixes": ("unseen_f1_",)}, "must not start with 'val_' or 'unseen_'"),
])
def test_inconsistent_task_classes_are_refused(attrs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        register_task(_concrete(attrs.pop("name", "bad-toy"), **attrs))
    assert "bad-toy" not in task_names()


def test_detail_metrics_are_higher_is_better_and_trimmed_first() -> None:
    cls = _concrete("detail-toy", detail_prefixes=("f1_class_",))
    register_task(cls)
    try:
        task = get_task("detail-toy")
        assert task.detail_prefixes == ("f1_class_",) and get_task("segmentation-2d").detail_prefixes == ()
        assert task.is_detail("f1_class_2") and task.is_detail("unseen_f1_class_2")
        assert not task.is_detail("accuracy") and not task.is_detail("val_f1_class_2")
        assert task.higher_is_better("unseen_f1_class_0") and not task.higher_is_better("nll")
        assert task.report_names() == ("accuracy", "nll", "val_accuracy", "unseen_accuracy", "unseen_nll")
        report = {"accuracy": (0.5, 4), "f1_class_0": (1.0, 2), "f1_class_1": (0.0, 2), "val_accuracy": (0.5, 2),
                  "train_loss": (0.7, 8), "unseen_accuracy": (0.25, 4), "unseen_f1_class_0": (0.4, 1)}
        assert task.trim_report(report, 10) == report
        assert list(task.trim_report(report, 5)) == ["accuracy", "f1_class_0", "val_accuracy", "train_loss",
                                                     "unseen_accuracy"]
        assert list(task.trim_report(report, 1)) == ["accuracy", "val_accuracy", "train_loss", "unseen_accuracy"]
    finally:
        unregister_task("detail-toy")


def test_abstract_and_foreign_classes_are_refused() -> None:
    class Half(Task):
        name, summary, metric_names, headline_metric, unseen_domain = "half", "s", ("m",), "m", "u"

    with pytest.raises(ValueError, match=r"does not implement \['build_model', 'collate'"):
        register_task(Half)
    with pytest.raises(ValueError, match="needs a Task subclass"):
        register_task(int)  # type: ignore[arg-type]


def test_aliases_resolve_to_the_canonical_task() -> None:
    for alias, name in (("seg2d", "segmentation-2d"), ("seg3d", "segmentation-3d")):
        task = get_task(alias)
        assert type(task) is type(get_task(name)) and task.name == name  # .name is what runs record
        assert canonical_task_name(alias) == canonical_task_name(name) == name
        assert name in task_names() and alias not in task_names()  # one entry per Task
        assert alias in task_names(aliases=True) and name in task_names(aliases=True)
    assert list(task_names(aliases=True)) == sorted(task_names(aliases=True))
    with pytest.raises(ValueError, match="unknown task 'seg9d'"):
        canonical_task_name("seg9d")


def test_unknown_task_lists_the_names_with_their_aliases() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'seg'; known tasks: .*segmentation-2d \(alias seg2d\), "
                                         r"segmentation-3d \(alias seg3d\)"):
        get_task("seg")


def test_a_task_with_aliases_registers_and_unregisters_them_together() -> None:
    cls = _concrete("alias-toy", aliases=("at", "toy-a"))
    register_task(cls)
    try:
        assert isinstance(get_task("at"), cls) and get_task("toy-a").name == "alias-toy"
        assert register_task(cls) is cls  # the same class again: no change
        assert {"alias-toy", "at", "toy-a"} <= set(task_names(aliases=True))
        with pytest.raises(ValueError, match=r"known tasks: alias-toy \(alias at, toy-a\), classification-2d"):
            get_task("nope")
    finally:
        unregister_task("toy-a")  # by an alias: the Task and all its aliases go
    for key in ("alias-toy", "at", "toy-a"):
        assert key not in task_names(aliases=True)
        with pytest.raises(ValueError, match="unknown task"):
            get_task(key)


@pytest.mark.parametrize(("name", "aliases", "message"), [
    # an alias held by another Task, as its alias or its name
    ("clash-toy", ("seg3d",), r"task alias \(of .*Made\) 'seg3d' is already registered by fedsilo\.models\."
                              r"tasks\.segmentation3d\.Segmentation3D as an alias of 'segmentation-3d'"),
    ("clash-toy", ("segmentation-2d",), r"task alias \(of .*Made\) 'segmentation-2d' is already registered by "
                                        r"fedsilo\.models\.tasks\.segmentation2d\.Segmentation2D; choose another name"),
    # a name that is another Task's alias
    ("seg2d", (), r"task name 'seg2d' is already registered by .*Segmentation2D as an alias of 'segmentation-2d'"),
    # declarations that are wrong in themselves
    ("clash-toy", ("ct", "ct"), r"aliases \('ct', 'ct'\) must be distinct and differ from its name"),
    ("clash-toy", ("clash-toy",), r"must be distinct and differ from its name 'clash-toy'"),
    ("clash-toy", ("Seg 3D",), r"aliases: 'Seg 3D' must be lower-case words joined by hyphens"),
    ("clash-toy", ["ct"], r"aliases must be a tuple of names"),
])
def test_conflicting_or_bad_aliases_are_refused(name: str, aliases: Any, message: str) -> None:
    before = task_names(aliases=True)
    with pytest.raises(ValueError, match=message):
        register_task(_concrete(name, aliases=aliases))
    assert task_names(aliases=True) == before  # nothing of the refused class was registered
    assert get_task("seg3d").name == "segmentation-3d" and get_task("seg2d").name == "segmentation-2d"


def test_an_alias_cannot_be_taken_by_a_later_task() -> None:
    first = _concrete("first-toy", aliases=("ft",))
    register_task(first)
    try:
        with pytest.raises(ValueError, match=r"task alias \(of .*\) 'ft' is already registered by .*Made "
                                             r"as an alias of 'first-toy'; choose another name"):
            register_task(_concrete("second-toy", aliases=("ft",)))
        with pytest.raises(ValueError, match=r"task alias \(of .*\) 'first-toy' is already registered"):
            register_task(_concrete("third-toy", aliases=("first-toy",)))
        assert "second-toy" not in task_names() and "third-toy" not in task_names()
        assert isinstance(get_task("ft"), first)
    finally:
        unregister_task("first-toy")
    assert "ft" not in task_names(aliases=True)


def test_the_registry_imports_without_torch() -> None:
    code = ("import sys; import fedsilo.models.tasks as t; "
            "assert 'segmentation-2d' in t.task_names(); "
            "t.DataSpec.from_mapping({'source': 'folder', 'path': 'x'}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_every_package_export_resolves() -> None:
    for name in fedsilo.models.__all__:
        assert getattr(fedsilo.models, name) is not None, name
    assert fedsilo.models.get_task is get_task
    with pytest.raises(AttributeError):
        fedsilo.models.no_such_thing  # noqa: B018


# -- the data spec -------------------------------------------------------------------------------


class Source(enum.Enum):
    """Like the agent's DataSource."""

    BUILTIN = "builtin"
    FOLDER = "folder"


@dataclass(frozen=True, kw_only=True)
class AgentLikeData:
    """Shaped like the agent's DataConfig."""

    source: Source = Source.BUILTIN
    domain: int = 0
    seed: int = 0
    path: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    unseen_path: Path | None = None


@settings(max_examples=50, deadline=None)
@given(folder=st.booleans(), domain=st.integers(0, 10**6), seed=st.integers(0, 2**63 - 1),
       options=st.dictionaries(st.sampled_from(["image_size", "n_train", "val_fraction"]), st.integers(1, 99)),
       unseen=st.booleans())
def test_data_spec_is_the_same_from_a_mapping_or_a_config_object(
    folder: bool, domain: int, seed: int, options: dict[str, int], unseen: bool
) -> None:
    path = Path("/data/silo") if folder else None
    unseen_path = Path("/data/unseen") if folder and unseen else None
    obj = AgentLikeData(source=Source.FOLDER if folder else Source.BUILTIN, domain=domain, seed=seed,
                        path=path, options=options, unseen_path=unseen_path)
    mapping = {"source": obj.source.value, "domain": domain, "seed": seed, "path": None if path is None else str(path),
               "options": dict(options), "unseen_path": unseen_path}
    spec = DataSpec.coerce(obj)
    assert spec == DataSpec.coerce(mapping) == DataSpec.coerce(spec)
    assert spec.source == obj.source.value and dict(spec.options) == options and spec.path == path


@pytest.mark.parametrize(("mapping", "message"), [
    ({"source": "folder"}, "path is required"),
    ({"source": "builtin", "unseen_path": "/x"}, "only used with source = 'folder'"),
    ({"domain": -1}, "domain must be >= 0"),
    ({"seed": True}, "seed must be an int"),
    ({"source": ""}, "source must be a non-empty string"),
    ({"colour": 1}, r"unknown key\(s\) \['colour'\]"),
    ({"options": {1: 2}}, "string keys"),
])
def test_bad_data_specs_are_refused(mapping: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataSpec.from_mapping(mapping)


def test_segmentation_refuses_an_unknown_source() -> None:
    with pytest.raises(ValueError, match=r"reads data.source \['builtin', 'folder'\], not 'datalist'"):
        get_task("segmentation-2d").load_data({"source": "datalist"})


# -- segmentation-2d is the existing code ----------------------------------------------------------


def _same_dataset(a: Dataset[Any], b: Dataset[Any]) -> bool:
    n = len(a)  # type: ignore[arg-type]
    if n != len(b):  # type: ignore[arg-type]
        return False
    if n == 0:
        return True
    xa, ya = stack_batch(a, range(n), torch.device("cpu"))
    xb, yb = stack_batch(b, range(n), torch.device("cpu"))
    return torch.equal(xa, xb) and torch.equal(ya, yb)


def test_segmentation_builtin_data_is_the_generators() -> None:
    data = get_task("segmentation-2d").load_data(AgentLikeData(domain=2, seed=7, options=SMALL))
    scfg = SyntheticConfig(seed=7, **SMALL)
    direct = silo_splits(scfg, 2)
    for split in ("train", "val", "test"):
        assert _same_dataset(getattr(data.splits, split), getattr(direct, split)), split
    assert data.unseen is not None and _same_dataset(data.unseen, unseen_domain(scfg))


def _write_png_folder(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((20, 16), dtype=np.uint8)
        top, left = rng.integers(2, 10), rng.integers(2, 8)
        mask[top : top + 6, left : left + 5] = 255
        image = (40 + rng.integers(0, 30, size=mask.shape) + (mask > 0) * 150).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i:02d}.png")
    return root


def test_segmentation_folder_data_is_the_folder_loaders(tmp_path: Path) -> None:
    silo = _write_png_folder(tmp_path / "silo", 10, seed=1)
    held_out = _write_png_folder(tmp_path / "unseen", 5, seed=2)
    task = get_task("segmentation-2d")
    options = {"image_size": 16, "val_fraction": 0.2}
    data = task.load_data(AgentLikeData(source=Source.FOLDER, seed=4, path=silo, options=options,
                                        unseen_path=held_out))
    direct = load_folder(FolderConfig(path=silo, seed=4, **options))
    for split in ("train", "val", "test"):
        assert _same_dataset(getattr(data.splits, split), getattr(direct, split)), split
    other = load_folder(FolderConfig(path=held_out, seed=4, **options))
    assert data.unseen is not None
    assert _same_dataset(data.unseen, ConcatDataset([d for d in (other.train, other.val, other.test) if len(d)]))
    assert task.load_data({"source": "folder", "path": str(silo)}).unseen is None


def test_segmentation_missing_folder_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        get_task("segmentation-2d").load_data({"source": "folder", "path": str(tmp_path / "nope")})


def test_segmentation_models_are_the_registrys() -> None:
    task = get_task("segmentation-2d")
    plain = {"channels": [4, 8], "strides": [2], "seed": 3}
    cfg = task.model_config(plain)
    assert cfg == ModelConfig.from_mapping(plain) and task.model_config(cfg) is cfg
    a, b = task.build_model(plain), build_model(ModelConfig.from_mapping(plain))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    with pytest.raises(ValueError, match="no_such_key"):
        task.model_config({"no_such_key": 1})
    with pytest.raises(ValueError, match="mapping or a ModelConfig"):
        task.model_config(3)


@cache
def _small_silo() -> tuple[SiloData, dict[str, Any]]:
    data = get_task("segmentation-2d").load_data({"seed": 1, "domain": 0, "options": SMALL})
    return data, {"channels": [4, 8], "strides": [2], "seed": 0}


def test_segmentation_training_with_the_task_is_bit_identical() -> None:
    task = get_task("segmentation-2d")
    data, plain = _small_silo()
    cfg = TrainConfig(batch_size=4, local_epochs=2, seed=5, proximal_mu=0.01)
    models, results = [], []
    for seam in (None, task):
        model = task.build_model(plain)
        results.append(train_local(model, data.splits.train, cfg, round_index=2, task=seam))
        models.append(model.state_dict())
    assert results[0] == results[1]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_segmentation_metrics_are_the_agents() -> None:
    """The names and numbers silo_agent/daemon.py's _catch_up reports today."""
    task = get_task("segmentation-2d")
    data, plain = _small_silo()
    model = task.build_model(plain)
    train_local(model, data.splits.train, TrainConfig(batch_size=4), round_index=0)
    model.eval()
    test, val, unseen = (evaluate(model, ds) for ds in (data.splits.test, data.splits.val, data.unseen))
    expected = {"dice": (test.dice, test.n), "hd95": (test.hd95, test.n), "val_dice": (val.dice, val.n),
                "unseen_dice": (unseen.dice, unseen.n), "unseen_hd95": (unseen.hd95, unseen.n)}
    got: dict[str, tuple[float, int]] = {}
    for split, ds in zip(EVAL_SPLITS, (data.splits.test, data.splits.val, data.unseen)):
        got.update(task.evaluate_split(model, ds, split))
    assert got == expected  # exact
    assert tuple(got) == task.report_names()
    assert not model.training  # the mode is restored
    assert task.evaluate(model, data.splits.test) == {"dice": expected["dice"], "hd95": expected["hd95"]}
    assert task.evaluate_split(model, None, "unseen") == {}
    assert task.evaluate_split(model, TensorDataset(torch.zeros(0, 1, 32, 32)), "val") == {}
    with pytest.raises(ValueError, match="split must be one of"):
        task.evaluate_split(model, data.splits.test, "train")


@settings(max_examples=25, deadline=None)
@given(indices=st.lists(st.integers(0, SMALL["n_train"] - 1), max_size=8))
def test_segmentation_collate_stacks_the_examples(indices: list[int]) -> None:
    task = get_task("segmentation-2d")
    train = _small_silo()[0].splits.train
    images, masks = task.collate(train, indices, torch.device("cpu"))
    assert images.dtype == torch.float32 and masks.dtype == torch.int64
    assert images.shape[0] == masks.shape[0] == len(indices)
    for row, i in enumerate(indices):
        assert torch.equal(images[row], train[i][0]) and torch.equal(masks[row], train[i][1])


# -- the toy Task through a whole federation ------------------------------------------------------


def test_the_toy_task_federates_with_fedavg_under_he(toy: Task, tmp_path: Path) -> None:
    """The toy Task, registered by this module only, runs FedAvg through ``simulate()`` (the deployed
    coordinator and agents, BFV aggregation): every silo ends on the same global model, reports the
    Task's own metrics (accuracy, nll; no Dice) and learns its classes."""
    from fedsilo.coordinator.loading import load_federation_config
    from fedsilo.silo_agent.config import load_agent_config
    from fedsilo.silo_agent.demo import make_certs, silo_names, write_configs
    from fedsilo.silo_agent.simulation import simulate

    names = silo_names(2)
    make_certs(tmp_path / "certs", names)
    fed, agents = write_configs(tmp_path, names=names, rounds=2, strategy="fedavg", seed=0, port=1, insecure=False,
                                aggregation="he", min_silos=2, training={"local_epochs": 5},
                                data=[{"source": "builtin", "domain": i, "seed": 0} for i in range(2)],
                                task="toy-classification", model={"seed": 0})
    federation = load_federation_config(fed)
    assert federation.task == "toy-classification" and federation.aggregation.value == "he"
    result = simulate(federation, [load_agent_config(a) for a in agents], timeout_s=300)
    assert [r.round for r in result.rounds] == [1, 2]
    a, b = (result.states[n] for n in names)
    assert a.global_shared.keys() == b.global_shared.keys() and a.global_shared
    for k in a.global_shared:  # one global model, decrypted by each silo on its own
        assert torch.allclose(a.global_shared[k], b.global_shared[k], atol=1e-6), k
    last = result.rounds[-1]
    for name in names:
        metrics = {m: v for m, v, _ in last.metrics[name]}
        assert {"accuracy", "nll", "val_accuracy", "unseen_accuracy", "unseen_nll"} <= set(metrics)
        assert not any("dice" in m for m in metrics)
        assert metrics["accuracy"] >= 0.9, (name, metrics)


# -- DP-SGD takes the Task's batches and loss -------------------------------------------------------


def test_dp_sgd_on_the_toy_task_without_noise_or_clipping_is_ordinary_training(toy: Task) -> None:
    """With σ = 0, no clipping and q = 1, DP-SGD over the toy Task (its collate and cross-entropy) is
    ordinary full-batch SGD with the same Task: the per-example machinery adds nothing."""
    import copy
    import math

    from fedsilo.models.dp_training import train_local_dp
    from fedsilo.models.training import Optimizer
    from fedsilo.privacy.dpsgd import DpSgdConfig

    train = toy.load_data(DataSpec(seed=3, domain=1)).splits.train
    model = toy.build_model({"seed": 3})
    twin = copy.deepcopy(model)
    cfg = TrainConfig(optimizer=Optimizer.SGD, lr=0.5, batch_size=len(train), local_epochs=3)
    dp = DpSgdConfig(noise_multiplier=0.0, max_grad_norm=math.inf, sample_rate=1.0, steps=3)
    result = train_local_dp(model, train, cfg, dp, round_index=0, noise_seed=1, task=toy)
    train_local(twin, train, cfg, round_index=0, task=toy)
    worst = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    moved = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(),
                                                           toy.build_model({"seed": 3}).state_dict().values()))
    assert worst < 1e-5 < moved
    assert result.steps == 3 and result.examples == 3 * len(train)


def test_dp_sgd_with_the_segmentation_task_is_the_default(toy: Task) -> None:
    """Handing DP-SGD the segmentation Task gives bit-identical weights to the default (its loss and batches)."""
    import math

    from fedsilo.models.dp_training import train_local_dp
    from fedsilo.privacy.dpsgd import DpSgdConfig, make_private_compatible

    seg = get_task("segmentation-2d")
    data = seg.load_data(DataSpec(seed=0, domain=0, options={**SMALL, "n_train": 4})).splits.train
    cfg = ModelConfig(channels=(4, 8), strides=(2,), num_res_units=0)
    dp = DpSgdConfig(noise_multiplier=0.7, max_grad_norm=1.0, sample_rate=0.5, steps=2)
    a, b = (make_private_compatible(build_model(cfg)) for _ in range(2))
    train_local_dp(a, data, TrainConfig(), dp, round_index=1, noise_seed=5)
    train_local_dp(b, data, TrainConfig(), dp, round_index=1, noise_seed=5, task=seg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert math.isfinite(float(next(iter(a.parameters())).detach().sum()))
