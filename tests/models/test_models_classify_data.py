"""Tests of the image classification data: the built-in generator (styles, label skew, unseen scanner), batching and the folder loader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedsilo.models import classify_data as cd
from fedsilo.models import classify_folder as cf

SMALL = {"n_train": 40, "n_val": 10, "n_test": 20, "n_unseen": 10}


def _cfg(**options: object) -> cd.SyntheticClassifyConfig:
    return cd.SyntheticClassifyConfig.from_mapping({"seed": 0, **SMALL, **options})


# -- the generator ---------------------------------------------------------------------------------------


def test_generator_is_deterministic_with_the_documented_shapes() -> None:
    a, b = cd.classify_silo_splits(_cfg(), 1), cd.classify_silo_splits(_cfg(), 1)
    for split in ("train", "val", "test"):
        da, db = getattr(a, split), getattr(b, split)
        assert torch.equal(da.images, db.images) and torch.equal(da.labels, db.labels)
        assert da.class_names == cd.BUILTIN_CLASSES
    train = a.train
    assert train.images.shape == (40, 3, 32, 32) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64 and (len(a.val), len(a.test)) == (10, 20)
    assert float(train.images.min()) >= 0.0 and float(train.images.max()) <= 1.0
    x, y = train[0]
    assert x.shape == (3, 32, 32) and y.dim() == 0 and 0 <= int(y) < 5
    assert cd.classify_silo_splits(_cfg(image_size=20), 1).train.images.shape[2:] == (20, 20)
    other_seed = cd.classify_silo_splits(_cfg(seed=1), 1)
    assert not torch.equal(other_seed.train.images, a.train.images)
    unseen = cd.classify_unseen(_cfg(), 1)
    assert torch.equal(unseen.images, cd.classify_unseen(_cfg(), 1).images) and len(unseen) == 10


def test_each_domain_has_its_own_style_and_the_unseen_style_is_none_of_them() -> None:
    styles = [cd.domain_style(0, d) for d in range(12)]
    assert cd.domain_style(0, 3) == styles[3] and cd.domain_style(1, 3) != styles[3]
    assert len({(s.gamma, s.contrast, s.blur) for s in styles}) == 12
    # the same labels drawn in two domains look different: their mean colours differ
    means = [cd.classify_silo_splits(_cfg(label_skew=0.0), d).test.images.mean(dim=(0, 2, 3)) for d in (0, 1)]
    assert float((means[0] - means[1]).abs().max()) > 0.02
    for seed in range(5):
        u = cd.unseen_style(seed)
        assert u == cd.unseen_style(seed)
        assert not 0.75 <= u.gamma <= 1.33 and not 0.75 <= u.contrast <= 1.25
        assert u.blur > 0.8 and u.noise > 0.05 and min(u.gain) < 0.8 and max(u.gain) > 1.2


def test_label_skew_follows_each_silos_dirichlet_prior_and_test_is_balanced() -> None:
    cfg = _cfg(n_train=400, n_val=0, n_test=50, image_size=16)
    priors = [cd.class_prior(cfg, d) for d in range(4)]
    assert all(p.shape == (5,) and math.isclose(p.sum(), 1.0) for p in priors)
    assert np.array_equal(priors[0], cd.class_prior(cfg, 0)) and not np.allclose(priors[0], priors[1])
    assert max(p.max() for p in priors) > 0.5  # α = 0.5: some silo is dominated by one class
    for d in (0, 1):
        splits = cd.classify_silo_splits(cfg, d)
        freq = np.bincount(splits.train.labels.numpy(), minlength=5) / 400
        assert np.abs(freq - priors[d]).max() < 0.08
        assert np.array_equal(np.bincount(splits.test.labels.numpy(), minlength=5), [10] * 5)
    assert np.array_equal(np.bincount(cd.classify_unseen(cfg, 0).labels.numpy(), minlength=5), [2] * 5)
    unseen = cd.classify_unseen(_cfg(n_unseen=25), 0)
    assert np.array_equal(np.bincount(unseen.labels.numpy(), minlength=5), [5] * 5)


def test_extreme_skew_keeps_two_training_classes_and_weak_skew_is_nearly_balanced() -> None:
    tiny = _cfg(label_skew=0.01, n_train=30, n_val=0, n_test=0, n_unseen=0, image_size=16)
    for d in range(8):
        assert len(np.unique(cd.classify_silo_splits(tiny, d).train.labels.numpy())) >= 2
    assert any(cd.class_prior(tiny, d).max() > 0.99 for d in range(8))
    flat = _cfg(label_skew=1000.0, n_train=400, n_val=0, n_test=0, n_unseen=0, image_size=16)
    freq = np.bincount(cd.classify_silo_splits(flat, 0).train.labels.numpy(), minlength=5) / 400
    assert np.all((freq > 0.12) & (freq < 0.28))
    assert np.array_equal(cd.class_prior(_cfg(label_skew=0), 3), np.full(5, 0.2))


@pytest.mark.parametrize(("options", "message"), [
    ({"image_size": 8}, r"image_size must be >= 16, got 8"),
    ({"n_train": 1}, r"n_train must be >= 2, got 1"),
    ({"n_test": -1}, r"n_test must be >= 0, got -1"),
    ({"label_skew": -0.5}, r"label_skew must be in .*, got -0.5"),
    ({"label_skew": float("nan")}, r"label_skew must be in .*, got nan"),
    ({"seed": -3}, r"seed must be >= 0, got -3"),
    ({"n_val": 2.5}, r"n_val.*2.5"),
    ({"bogus": 1}, r"unknown key\(s\) 'bogus'"),
])
def test_generator_config_names_the_bad_value(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _cfg(**options)


# -- dataset and batches ---------------------------------------------------------------------------------


def test_collate_stacks_slices_and_handles_empty_batches() -> None:
    ds = cd.classify_silo_splits(_cfg(), 0).train
    x, y = cd.collate_classify(ds, [0, 3], torch.device("cpu"))
    assert x.shape == (2, 3, 32, 32) and y.shape == (2,) and y.dtype == torch.int64
    assert torch.equal(x[1], ds.images[3]) and int(y[1]) == int(ds.labels[3])
    empty = tuple(t[:0] for t in cd.collate_classify(ds, [0], torch.device("cpu")))
    assert empty[0].shape == (0, 3, 32, 32) and empty[1].shape == (0,)
    none_x, none_y = cd.collate_classify(ds, [], torch.device("cpu"))
    assert none_x.shape == (0, 3, 32, 32) and none_y.shape == (0,)
    sub = torch.utils.data.Subset(ds, [5, 6])
    assert torch.equal(cd.collate_classify(sub, [1], torch.device("cpu"))[0][0], ds.images[6])


def test_dataset_refuses_bad_tensors() -> None:
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="labels must lie in"):
        cd.ClassifyDataset(images, torch.tensor([0, 2]), ("a", "b"))
    with pytest.raises(ValueError, match="images must be float32"):
        cd.ClassifyDataset(images.double(), torch.tensor([0, 1]), ("a", "b"))
    with pytest.raises(ValueError, match="distinct"):
        cd.ClassifyDataset(images, torch.tensor([0, 1]), ("a", "a"))


# -- the folder loader ----------------------------------------------------------------------------------


def _png(path: Path, value: int, size: int = 12, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).convert(mode).save(path)


def _class_folders(root: Path) -> None:
    for i in range(4):
        _png(root / "cyst" / f"c{i}.png", 40 + i)
        _png(root / "tumour" / f"t{i}.jpg", 200, mode="L")
    np.save(root / "tumour" / "t9.npy", np.full((10, 10), 0.5, dtype=np.float32))
    (root / "tumour" / "notes.txt").write_text("skipped")


def test_folder_of_class_subfolders(tmp_path: Path) -> None:
    _class_folders(tmp_path)
    cfg = cf.ClassifyFolderConfig.from_mapping({"path": str(tmp_path), "image_size": 16, "seed": 2})
    parts = cf.load_classify_folder(cfg)
    sets = (parts.train, parts.val, parts.test)
    assert [len(s) for s in sets] == [6, 1, 2]  # 9 images: round(1.8) test, round(1.35) val
    assert all(s.class_names == ("cyst", "tumour") for s in sets)
    images = torch.cat([s.images for s in sets])
    labels = torch.cat([s.labels for s in sets])
    assert images.shape == (9, 3, 16, 16) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 5
    grey = images[labels == 1]
    assert torch.all(grey[:, 0] == grey[:, 1])  # grey and single-channel files become RGB
    again = cf.load_classify_folder(cfg)
    assert torch.equal(again.train.images, parts.train.images)
    # a fixed class order (with a class this silo lacks) maps the sub-folders onto it
    fixed = cf.load_classify_folder(cf.ClassifyFolderConfig.from_mapping(
        {"path": str(tmp_path), "classes": ["normal", "tumour", "cyst"]}))
    assert fixed.train.class_names == ("normal", "tumour", "cyst")
    assert set(torch.cat([fixed.train.labels, fixed.val.labels, fixed.test.labels]).tolist()) == {1, 2}


def test_folder_with_labels_csv(tmp_path: Path) -> None:
    for i in range(5):
        _png(tmp_path / "img" / f"{i}.png", 20 * i)
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(
        f"img/{i}.png,{'benign' if i % 2 else 'malignant'}\n" for i in range(5)) + "\n")
    parts = cf.load_classify_folder(cf.ClassifyFolderConfig(path=tmp_path, val_fraction=0.0, test_fraction=0.2))
    assert (len(parts.train), len(parts.val), len(parts.test)) == (4, 0, 1)
    assert parts.train.class_names == ("benign", "malignant") and parts.train.images.shape[1:] == (3, 32, 32)
    labels = torch.cat([parts.train.labels, parts.test.labels])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 1]


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda r: None, ValueError, r"no labels.csv and no class sub-folders"),
    (lambda r: (r / "a").mkdir() or (r / "b").mkdir(), ValueError, r"no images"),
    (lambda r: _png(r / "only" / "x.png", 3), ValueError, r"at least two"),
    (lambda r: (_png(r / "a" / "x.png", 3), _png(r / "b" / "y.png", 3), (r / "b" / "z.png").write_text("junk")),
     ValueError, r"cannot read .*z\.png"),
    (lambda r: (_png(r / "a" / "x.png", 3), _png(r / "zz" / "y.png", 3)), ValueError,
     r"zz: class 'zz' is not one of the classes \['a', 'b'\]"),
    (lambda r: (_png(r / "x.png", 3), (r / "labels.csv").write_text("path,label\nx.png,a\nx.png,c\n")),
     ValueError, r"labels.csv row 3: class 'c' is not one of the classes \['a', 'b'\]"),
    (lambda r: (r / "labels.csv").write_text("path,label\nmissing.png,a\n"), FileNotFoundError,
     r"labels.csv row 2: image file not found: .*missing\.png"),
    (lambda r: (r / "labels.csv").write_text("file,class\nx.png,a\n"), ValueError, r"labels.csv: the first row must be"),
    (lambda r: (r / "labels.csv").write_text("path,label\nx.png\n"), ValueError, r"labels.csv: row 2 must be"),
    (lambda r: (_png(r / "x.png", 3), np.save(r / "y.npy", np.zeros((2, 2, 2, 2))),
                (r / "labels.csv").write_text("path,label\nx.png,a\ny.npy,b\n")), ValueError, r"y\.npy: expected a grey"),
])
def test_folder_refuses_bad_input_naming_the_file(tmp_path: Path, make, error: type, message: str) -> None:
    root = tmp_path / "silo"
    root.mkdir()
    make(root)
    classes = ["a", "b"] if "zz" in message or "'c'" in message else []
    with pytest.raises(error, match=message):
        cf.load_classify_folder(cf.ClassifyFolderConfig.from_mapping({"path": str(root), "classes": classes}))


def test_folder_config_validates_and_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cf.load_classify_folder(cf.ClassifyFolderConfig(path=tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"val_fraction \+ test_fraction must be < 1, got 0.5 \+ 0.5"):
        cf.ClassifyFolderConfig(path=tmp_path, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"distinct, got \['a', 'a'\]"):
        cf.ClassifyFolderConfig.from_mapping({"path": str(tmp_path), "classes": ["a", "a"]})
    with pytest.raises(ValueError, match=r"image_size must be >= 8, got 4"):
        cf.ClassifyFolderConfig(path=tmp_path, image_size=4)
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'species'"):
        cf.ClassifyFolderConfig.from_mapping({"path": str(tmp_path), "species": "x"})
    cfg = cf.ClassifyFolderConfig.from_mapping({"path": str(tmp_path), "classes": ["a", "b"]})
    assert cf.ClassifyFolderConfig.from_mapping(cfg.to_mapping()) == cfg
