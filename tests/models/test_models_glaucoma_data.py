"""Tests of the glaucoma data: the built-in fundus/OCT generator, the datalist folder loader and batching."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Subset

from fedsilo.models.glaucoma_data import (
    FUNDUS,
    GRADES,
    OCT_GROUP,
    GlaucomaDataset,
    GlaucomaExample,
    GlaucomaInputs,
    GlaucomaTargets,
    SyntheticGlaucomaConfig,
    clinic_modalities,
    collate_glaucoma,
    domain_styles,
    glaucoma_silo_splits,
    glaucoma_unseen,
    grade_prior,
    unseen_styles,
)
from fedsilo.models.glaucoma_folder import GlaucomaFolderConfig, load_glaucoma_folder
from fedsilo.models.metrics import vertical_cdr

SMALL = {"n_train": 12, "n_val": 3, "n_test": 6, "n_unseen": 6}


def _cfg(**kw: object) -> SyntheticGlaucomaConfig:
    return SyntheticGlaucomaConfig.from_mapping({**SMALL, **kw})


# -- the built-in generator ------------------------------------------------------------------------------

def test_builtin_shapes_ranges_and_determinism() -> None:
    cfg = _cfg(image_size=32, oct_size=[16, 32])
    a, b = glaucoma_silo_splits(cfg, 1), glaucoma_silo_splits(cfg, 1)
    assert (len(a.train), len(a.val), len(a.test)) == (12, 3, 6)
    ex = a.train[0]
    assert isinstance(ex, GlaucomaExample)
    assert ex.fundus.shape == (3, 32, 32) and ex.fundus.dtype == torch.float32
    assert ex.oct.shape == (1, 16, 32) and ex.oct.dtype == torch.float32
    assert ex.mask.shape == (32, 32) and ex.mask.dtype == torch.int64 and ex.grade.dtype == torch.int64
    assert bool(ex.has_oct) and a.train.has_oct_modality
    for split in ("train", "val", "test"):
        x, y = getattr(a, split), getattr(b, split)
        for k in ("fundus", "oct", "has_oct", "masks", "grades"):
            assert torch.equal(getattr(x, k), getattr(y, k)), (split, k)
    ds = a.train
    assert 0 <= float(ds.fundus.min()) and float(ds.fundus.max()) <= 1
    assert 0 <= float(ds.oct.min()) and float(ds.oct.max()) <= 1 and float(ds.oct.std()) > 0.05
    assert set(ds.masks.unique().tolist()) == {0, 1, 2}
    assert set(a.train.grades.tolist()) == {0, 1, 2}  # every grade in a split of six or more
    assert sorted(a.test.grades.tolist()) == [0, 0, 1, 1, 2, 2]  # the test set is balanced
    other = glaucoma_silo_splits(cfg, 2)
    assert not torch.equal(other.train.fundus, a.train.fundus)
    assert not torch.equal(glaucoma_silo_splits(dataclasses.replace(cfg, seed=1), 1).train.fundus, a.train.fundus)


def test_cup_lies_inside_the_disc_and_the_fundus_shows_it() -> None:
    ds = glaucoma_silo_splits(_cfg(), 0).train
    for mask, fundus in zip(ds.masks, ds.fundus):
        cup = mask == 2
        disc = mask >= 1
        assert cup.any() and (disc & ~cup).any()
        # the disc is brighter than the retina around it (green channel)
        assert float(fundus[1][disc].mean()) > float(fundus[1][~disc].mean()) + 0.15


def test_vcdr_follows_the_grade() -> None:
    ds = glaucoma_silo_splits(_cfg(n_train=60), 0).train
    vcdr = np.array([vertical_cdr(m) for m in ds.masks])
    g = ds.grades.numpy()
    means = [vcdr[g == k].mean() for k in range(len(GRADES))]
    assert means[0] < means[1] < means[2], means
    assert 0.3 < means[0] < 0.47 and 0.5 < means[1] < 0.67 and 0.68 < means[2] < 0.88, means


def _rnfl_bright_rows(octs: torch.Tensor) -> np.ndarray:
    """Per B-scan: the mean count of bright pixels (> 0.6) per column, over the ten columns at each edge (away
    from the disc): the RNFL and RPE are the bright layers, and only the RNFL changes with the grade."""
    o = octs[:, 0].numpy()
    edges = np.concatenate([o[:, :, :10], o[:, :, -10:]], axis=2)
    return (edges > 0.6).sum(axis=1).mean(axis=1)


def test_rnfl_thins_with_the_grade() -> None:
    for domain in (0, 3):
        ds = glaucoma_silo_splits(_cfg(n_train=60), domain).train
        bright, g = _rnfl_bright_rows(ds.oct), ds.grades.numpy()
        means = [bright[g == k].mean() for k in range(len(GRADES))]
        assert means[0] > means[1] + 0.5 and means[1] > means[2] + 0.5, (domain, means)


def test_by_default_every_third_clinic_is_fundus_only_and_says_so() -> None:
    cfg = _cfg()
    assert [clinic_modalities(cfg, d) for d in range(6)] == ["both", "both", "fundus"] * 2
    assert clinic_modalities(_cfg(modalities="both"), 2) == "both"
    assert clinic_modalities(_cfg(modalities="fundus"), 0) == "fundus"
    for domain, has in ((0, True), (1, True), (2, False)):
        splits = glaucoma_silo_splits(cfg, domain)
        for ds in (splits.train, splits.val, splits.test, glaucoma_unseen(cfg, domain)):
            assert ds.has_oct_modality is has and bool(ds.has_oct.all()) is has
            assert ds.modalities == ({FUNDUS, OCT_GROUP} if has else {FUNDUS})
    explicit = glaucoma_silo_splits(_cfg(modalities="fundus"), 2)
    assert torch.equal(explicit.train.fundus, glaucoma_silo_splits(cfg, 2).train.fundus)


def test_fundus_only_silo_has_no_oct_anywhere() -> None:
    cfg = _cfg(modalities="fundus")
    splits = glaucoma_silo_splits(cfg, 0)
    both = glaucoma_silo_splits(_cfg(), 0)
    for ds in (splits.train, splits.val, splits.test, glaucoma_unseen(cfg, 0)):
        assert not ds.has_oct_modality and not bool(ds.has_oct.any()) and not bool(ds.oct.any())
    assert torch.equal(splits.train.masks, both.train.masks)  # the same eyes, only the OCT is missing
    inputs, _ = collate_glaucoma(splits.train, [0, 1], torch.device("cpu"))
    assert not bool(inputs.has_oct.any()) and inputs.oct.shape == (2, 1, 32, 64)


def test_styles_priors_and_the_unseen_domain() -> None:
    assert domain_styles(3, 1) == domain_styles(3, 1) and domain_styles(3, 1) != domain_styles(3, 2)
    fundus, oct_ = unseen_styles(0)
    for d in range(8):
        f, o = domain_styles(0, d)
        assert f.blur < fundus.blur and f.illumination < fundus.illumination and f.noise < fundus.noise
        assert o.speckle < oct_.speckle
        assert not 0.8 <= fundus.gamma <= 1.25 and not 0.8 <= oct_.contrast <= 1.2
    p = grade_prior(0, 0)
    assert p.shape == (3,) and np.isclose(p.sum(), 1) and p.min() > 0.1  # mildly skewed
    cfg = _cfg()
    unseen = glaucoma_unseen(cfg, 0)
    assert len(unseen) == 6 and sorted(unseen.grades.tolist()) == [0, 0, 1, 1, 2, 2]
    assert torch.equal(unseen.fundus, glaucoma_unseen(cfg, 0).fundus)


@pytest.mark.parametrize(("mapping", "message"), [
    ({"image_size": 16}, "image_size must be >= 32, got 16"),
    ({"oct_size": [32]}, "oct_size must be (height, width), two ints >= 16, got (32,)"),
    ({"oct_size": [8, 64]}, "got (8, 64)"),
    ({"n_train": 0}, "n_train must be >= 1, got 0"),
    ({"n_test": -1}, "n_test must be >= 0, got -1"),
    ({"modalities": "oct"}, "modalities must be one of ['auto', 'both', 'fundus'], got 'oct'"),
    ({"seed": -2}, "seed must be >= 0, got -2"),
    ({"colour": 1}, "unknown key(s) 'colour'"),
    ({"n_val": "3"}, "'n_val' must be an integer, got '3'"),
])
def test_config_errors_name_the_value(mapping: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        SyntheticGlaucomaConfig.from_mapping(mapping)
    assert message in str(err.value)


def test_config_round_trips() -> None:
    cfg = _cfg(oct_size=[16, 40], modalities="fundus")
    assert cfg.oct_size == (16, 40)
    assert SyntheticGlaucomaConfig.from_mapping(cfg.to_mapping()) == cfg


# -- batching ---------------------------------------------------------------------------------------------

def test_collate_stacks_slices_and_moves() -> None:
    ds = glaucoma_silo_splits(_cfg(image_size=32, oct_size=[16, 32]), 0).train
    cpu = torch.device("cpu")
    inputs, targets = collate_glaucoma(ds, [3, 1], cpu)
    assert isinstance(inputs, GlaucomaInputs) and isinstance(targets, GlaucomaTargets)
    assert inputs.shape == (2, 3, 32, 32) and inputs.batch_size == 2
    assert torch.equal(inputs.fundus[0], ds.fundus[3]) and torch.equal(inputs.oct[1], ds.oct[1])
    assert inputs.has_oct.dtype == torch.bool and targets.mask.shape == (2, 32, 32)
    assert torch.equal(targets.grade, ds.grades[[3, 1]]) and targets.shape[0] == 2
    fundus, oct_, has = inputs  # unpacks as a triple
    assert fundus is inputs.fundus and oct_ is inputs.oct and has is inputs.has_oct
    empty = tuple(t[:0] for t in (inputs, targets))  # as DP-SGD builds its empty batch
    assert isinstance(empty[0], GlaucomaInputs) and isinstance(empty[1], GlaucomaTargets)
    assert empty[0].shape == (0, 3, 32, 32) and empty[0].oct.shape == (0, 1, 16, 32)
    assert empty[1].mask.shape == (0, 32, 32) and empty[1].grade.shape == (0,)
    none_in, none_t = collate_glaucoma(ds, [], cpu)
    assert none_in.shape == (0, 3, 32, 32) and none_t.grade.shape == (0,) and none_in.has_oct.dtype == torch.bool
    moved = inputs.to(cpu, dtype=torch.float64)
    assert moved.fundus.dtype == torch.float64 and moved.has_oct.dtype == torch.bool
    pooled = ConcatDataset([Subset(ds, [0, 1]), ds])
    p_in, p_t = collate_glaucoma(pooled, [1, 2], cpu)
    assert torch.equal(p_in.fundus, ds.fundus[[1, 0]]) and torch.equal(p_t.mask, ds.masks[[1, 0]])


def test_dataset_refuses_bad_tensors() -> None:
    f, o = torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 4, 8)
    h, m, g = torch.ones(2, dtype=torch.bool), torch.zeros(2, 8, 8, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    assert len(GlaucomaDataset(f, o, h, m, g)) == 2
    bad = m.clone()
    bad[0, 0, 0] = 3
    with pytest.raises(ValueError, match="mask labels must lie in 0..2, got 0..3"):
        GlaucomaDataset(f, o, h, bad, g)
    with pytest.raises(ValueError, match="grades must lie in 0..2"):
        GlaucomaDataset(f, o, h, m, g + 3)
    with pytest.raises(ValueError, match="oct must be float32"):
        GlaucomaDataset(f, o[:1], h, m, g)
    with pytest.raises(ValueError, match="has_oct must be bool"):
        GlaucomaDataset(f, o, h.long(), m, g)


# -- the folder loader ------------------------------------------------------------------------------------

def _write_example(root: Path, i: int, *, grey: bool, with_oct: bool) -> list[str]:
    rng = np.random.default_rng(i)
    Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(root / f"f{i}.png")
    labels = np.zeros((40, 48), np.uint8)
    labels[10:30, 12:36] = 1
    labels[15:25, 18:30] = 2
    Image.fromarray(np.array([0, 128, 255], np.uint8)[labels] if grey else labels).save(root / f"m{i}.png")
    row = [f"f{i}.png", "", f"m{i}.png", GRADES[i % 3] if i % 2 else str(i % 3)]
    if with_oct:
        np.save(root / f"o{i}.npy", rng.uniform(0, 1, size=(20, 30)).astype(np.float32))
        row[1] = f"o{i}.npy"
    return row


def _folder(root: Path, n: int = 10, *, grey: bool = False, header: str = "fundus,oct,mask,grade") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = [_write_example(root, i, grey=grey, with_oct=i % 3 != 0) for i in range(n)]
    (root / "datalist.csv").write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    return root


@pytest.mark.parametrize("grey", [False, True])
def test_folder_reads_labels_or_grey_masks_and_splits(tmp_path: Path, grey: bool) -> None:
    root = _folder(tmp_path / "d", grey=grey)
    splits = load_glaucoma_folder(GlaucomaFolderConfig(path=root, image_size=24, oct_size=(16, 20), seed=1,
                                                       val_fraction=0.2, test_fraction=0.2))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 2)
    everything = torch.cat([splits.train.grades, splits.val.grades, splits.test.grades])
    assert sorted(everything.tolist()) == sorted(i % 3 for i in range(10))
    ds = splits.train
    assert ds.fundus.shape[1:] == (3, 24, 24) and ds.oct.shape[1:] == (1, 16, 20) and ds.masks.shape[1:] == (24, 24)
    assert set(ds.masks.unique().tolist()) == {0, 1, 2} and ds.has_oct_modality
    assert all(bool(ds.oct[i].any()) == bool(ds.has_oct[i]) for i in range(len(ds)))
    again = load_glaucoma_folder(GlaucomaFolderConfig(path=root, image_size=24, oct_size=(16, 20), seed=1,
                                                      val_fraction=0.2, test_fraction=0.2))
    assert torch.equal(again.test.fundus, splits.test.fundus)


def test_folder_refuge_encoding(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "f.png")
    mask = np.full((8, 8), 255, np.uint8)
    mask[2:6, 2:6] = 128
    mask[3:5, 3:5] = 0
    Image.fromarray(mask).save(root / "m.png")
    (root / "datalist.csv").write_text("fundus,oct,mask,grade\n" + "f.png,,m.png,advanced\n" * 3)
    ds = load_glaucoma_folder(GlaucomaFolderConfig(path=root, image_size=8, mask_encoding="refuge",
                                                   val_fraction=0.0, test_fraction=0.0)).train
    assert ds.masks[0].tolist()[3][2:6] == [1, 2, 2, 1] and int(ds.masks[0, 0, 0]) == 0
    assert not ds.has_oct_modality and ds.grades.tolist() == [2, 2, 2]


def _break(root: Path, line: int, column: int, value: str) -> None:
    table = root / "datalist.csv"
    rows = [r.split(",") for r in table.read_text().splitlines()]
    rows[line - 1][column] = value
    table.write_text("\n".join(",".join(r) for r in rows) + "\n")


def test_folder_bad_inputs_name_the_file(tmp_path: Path) -> None:
    cfg = lambda root, **kw: GlaucomaFolderConfig(path=root, image_size=16, **kw)  # noqa: E731
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_glaucoma_folder(cfg(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no datalist.csv"):
        load_glaucoma_folder(cfg(tmp_path / "empty"))
    root = _folder(tmp_path / "h", header="fundus,mask,grade,oct")
    with pytest.raises(ValueError, match=r"datalist.csv: the first row must be the header 'fundus,oct,mask,grade'"):
        load_glaucoma_folder(cfg(root))
    cases = [
        (2, 0, "missing.png", FileNotFoundError, r"row 2: file not found: .*missing.png"),
        (3, 3, "severe", ValueError, r"row 3: grade 'severe' is neither one of"),
        (3, 3, "7", ValueError, r"grade '7'"),
        (4, 2, "f0.png", ValueError, r"row 4: .*f0.png: expected a grey image"),
        (2, 1, "notes.txt", ValueError, r"notes.txt: unsupported file type"),
        (2, 3, "", ValueError, r"row 2 must be 'fundus,oct,mask,grade' with fundus, mask and grade filled"),
    ]
    for i, (line, column, value, kind, message) in enumerate(cases):
        root = _folder(tmp_path / f"c{i}")
        if value == "notes.txt":
            (root / value).write_text("x")
        _break(root, line, column, value)
        with pytest.raises(kind, match=message):
            load_glaucoma_folder(cfg(root))
    root = _folder(tmp_path / "v")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(root / "m1.png")
    with pytest.raises(ValueError, match=r"m1.png: mask values \[7\] are not all in \[0, 128, 255\]"):
        load_glaucoma_folder(cfg(root))
    root = _folder(tmp_path / "b")
    (root / "f2.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read .*f2.png"):
        load_glaucoma_folder(cfg(root))
    small = _folder(tmp_path / "s", n=2)
    with pytest.raises(ValueError, match="only 2 example"):
        load_glaucoma_folder(cfg(small, val_fraction=0.4, test_fraction=0.4))


@pytest.mark.parametrize(("mapping", "message"), [
    ({"path": "x", "mask_encoding": "inverted"}, "mask_encoding must be one of ['auto', 'labels', 'grey', 'refuge'], "
                                                 "got 'inverted'"),
    ({"path": "x", "val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction + test_fraction must be < 1"),
    ({"path": "x", "oct_size": [4, 4]}, "got (4, 4)"),
    ({"path": "x", "shuffle": True}, "unknown key(s) 'shuffle'"),
])
def test_folder_config_errors(mapping: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        GlaucomaFolderConfig.from_mapping(mapping)
    assert message in str(err.value)
