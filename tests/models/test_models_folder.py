"""Tests of fedsilo.models.folder: PNG/NIfTI folders and MONAI datalists, splits and error paths."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fedsilo.models import FolderConfig, SegmentationDataset, SiloSplits, load_folder


def _pair(rng: np.random.Generator, shape: tuple[int, int] = (40, 30)) -> tuple[np.ndarray, np.ndarray]:
    """A grey image with a bright rectangle and its 0/255 mask."""
    h, w = shape
    mask = np.zeros(shape, dtype=np.uint8)
    top, left = rng.integers(2, h // 2), rng.integers(2, w // 2)
    mask[top : top + h // 3, left : left + w // 3] = 255
    image = (40 + rng.integers(0, 30, size=shape) + (mask > 0) * 150).astype(np.uint8)
    return image, mask


def _write_png_folder(root: Path, n: int, *, mask_dir: str = "masks", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / mask_dir).mkdir()
    for i in range(n):
        image, mask = _pair(rng)
        Image.fromarray(image).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask).save(root / mask_dir / f"case{i:02d}.png")
    return root


def _save_nifti(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def _check_dataset(ds: SegmentationDataset, n: int, size: int) -> None:
    assert isinstance(ds, SegmentationDataset)
    assert len(ds) == n
    assert ds.images.shape == (n, 1, size, size) and ds.images.dtype == torch.float32
    assert ds.masks.shape == (n, 1, size, size) and ds.masks.dtype == torch.int64
    if n:
        assert set(torch.unique(ds.masks).tolist()) <= {0, 1}
        assert ds.masks.sum() > 0
        # the mask marks the bright object
        assert ds.images[ds.masks == 1].mean() > ds.images[ds.masks == 0].mean() + 1.0


def test_png_folder(tmp_path: Path) -> None:
    root = _write_png_folder(tmp_path / "silo", 10)
    splits = load_folder(FolderConfig(path=root, image_size=32))
    assert isinstance(splits, SiloSplits)
    # 10 pairs: test round(2.0) = 2, val round(1.5) = 2 (half up), train 6
    _check_dataset(splits.train, 6, 32)
    _check_dataset(splits.val, 2, 32)
    _check_dataset(splits.test, 2, 32)
    assert -2.0 <= float(splits.train.images.min()) and float(splits.train.images.max()) <= 2.0


def test_split_is_deterministic_disjoint_and_seeded(tmp_path: Path) -> None:
    root = _write_png_folder(tmp_path / "silo", 12)

    def fingerprint(splits: SiloSplits) -> list[set[bytes]]:
        return [{bytes(m.numpy().tobytes()) for m in ds.masks} for ds in (splits.train, splits.val, splits.test)]

    a = fingerprint(load_folder(FolderConfig(path=root, image_size=16)))
    b = fingerprint(load_folder(FolderConfig(path=str(root), image_size=16)))
    c = fingerprint(load_folder(FolderConfig(path=root, image_size=16, seed=1)))
    assert a == b
    assert a != c
    assert not (a[0] & a[1]) and not (a[0] & a[2]) and not (a[1] & a[2])
    assert sum(len(s) for s in a) == 12


def test_labels_folder_and_no_holdout(tmp_path: Path) -> None:
    root = _write_png_folder(tmp_path / "silo", 3, mask_dir="labels")
    splits = load_folder(FolderConfig(path=root, image_size=16, val_fraction=0.0, test_fraction=0.0))
    _check_dataset(splits.train, 3, 16)
    _check_dataset(splits.val, 0, 16)
    _check_dataset(splits.test, 0, 16)


def test_rgb_and_palette_pngs(tmp_path: Path) -> None:
    root = tmp_path / "silo"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image, mask = _pair(np.random.default_rng(3))
    Image.fromarray(np.stack([image] * 3, axis=-1)).save(root / "images" / "a.png")
    palette = Image.fromarray((mask > 0).astype(np.uint8)).convert("P")
    palette.save(root / "masks" / "a.png")
    splits = load_folder(FolderConfig(path=root, image_size=24, val_fraction=0.0, test_fraction=0.0))
    _check_dataset(splits.train, 1, 24)


def test_nifti_pairs_2d_and_singleton_3d(tmp_path: Path) -> None:
    root = tmp_path / "silo"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        image, mask = _pair(rng, (36, 36))
        image = image.astype(np.float32) * 7.0 - 1000.0  # CT-like range
        if i % 2:
            _save_nifti(root / "images" / f"v{i}.nii.gz", image[:, :, None])
            _save_nifti(root / "masks" / f"v{i}.nii.gz", (mask[:, :, None] > 0).astype(np.uint8))
        else:
            _save_nifti(root / "images" / f"v{i}.nii", image)
            _save_nifti(root / "masks" / f"v{i}.nii", (mask > 0).astype(np.int16) * 3)
    splits = load_folder(FolderConfig(path=root, image_size=32, val_fraction=0.25, test_fraction=0.25))
    _check_dataset(splits.train, 2, 32)
    _check_dataset(splits.val, 1, 32)
    _check_dataset(splits.test, 1, 32)


def test_image_already_at_size_is_kept_exactly(tmp_path: Path) -> None:
    root = tmp_path / "silo"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:9, 5:12] = 1
    _save_nifti(root / "images" / "x.nii.gz", mask.astype(np.float32) * 10)
    _save_nifti(root / "masks" / "x.nii.gz", mask)
    train = load_folder(FolderConfig(path=root, image_size=16, val_fraction=0.0, test_fraction=0.0)).train
    assert torch.equal(train.masks[0, 0], torch.from_numpy(mask.astype(np.int64)))


def _write_datalist(tmp_path: Path, n: int, extra: dict[str, int] | None = None) -> Path:
    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    data.mkdir()
    entries: dict[str, list[dict[str, str]]] = {"training": []}
    for key, count in [("training", n), *(extra or {}).items()]:
        entries.setdefault(key, [])
        for i in range(count):
            image, mask = _pair(rng)
            Image.fromarray(image).save(data / f"{key}{i}_img.png")
            Image.fromarray(mask).save(data / f"{key}{i}_seg.png")
            entries[key].append({"image": f"data/{key}{i}_img.png", "label": f"data/{key}{i}_seg.png"})
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"name": "toy", **entries}))
    return path


def test_datalist_split_from_training(tmp_path: Path) -> None:
    path = _write_datalist(tmp_path, 10)
    splits = load_folder(FolderConfig(path=path, image_size=32))
    _check_dataset(splits.train, 6, 32)
    _check_dataset(splits.val, 2, 32)
    _check_dataset(splits.test, 2, 32)


def test_datalist_uses_given_validation_and_test(tmp_path: Path) -> None:
    path = _write_datalist(tmp_path, 5, {"validation": 2, "testing": 3})
    splits = load_folder(FolderConfig(path=path, image_size=32))
    _check_dataset(splits.train, 5, 32)
    _check_dataset(splits.val, 2, 32)
    _check_dataset(splits.test, 3, 32)


def test_datalist_absolute_paths(tmp_path: Path) -> None:
    path = _write_datalist(tmp_path, 2)
    doc = json.loads(path.read_text())
    for entry in doc["training"]:
        entry["image"] = str(tmp_path / entry["image"])
        entry["label"] = str(tmp_path / entry["label"])
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    (elsewhere / "abs.json").write_text(json.dumps(doc))
    splits = load_folder(FolderConfig(path=elsewhere / "abs.json", image_size=16, val_fraction=0, test_fraction=0))
    _check_dataset(splits.train, 2, 16)


# ---- error paths -------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_folder(FolderConfig(path=tmp_path / "nowhere"))


def test_folder_without_subfolders(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"images/ folder and a masks/ \(or labels/\)"):
        load_folder(FolderConfig(path=tmp_path))


def test_folder_with_both_masks_and_labels(tmp_path: Path) -> None:
    root = _write_png_folder(tmp_path / "silo", 2)
    (root / "labels").mkdir()
    with pytest.raises(ValueError, match="both masks/ and labels/"):
        load_folder(FolderConfig(path=root))


def test_no_pairs(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no image/mask pairs"):
        load_folder(FolderConfig(path=tmp_path))


def test_image_without_mask_is_named(tmp_path: Path) -> None:
    root = _write_png_folder(tmp_path / "silo", 3)
    (root / "masks" / "case01.png").unlink()
    with pytest.raises(ValueError, match=r"case01\.png has no mask"):
        load_folder(FolderConfig(path=root))


def test_mask_without_image_is_named(tmp_path: Path) -> None:
    root = _write_png_folder(tmp_path / "silo", 3)
    (root / "images" / "case02.png").unlink()
    with pytest.raises(ValueError, match=r"case02\.png has no image"):
        load_folder(FolderConfig(path=root))


def test_duplicate_stems(tmp_path: Path) -> None:
    root = _write_png_folder(tmp_path / "silo", 2)
    _save_nifti(root / "images" / "case00.nii.gz", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="share the stem 'case00'"):
        load_folder(FolderConfig(path=root))


def test_unreadable_png_is_named(tmp_path: Path) -> None:
    root = _write_png_folder(tmp_path / "silo", 3)
    (root / "images" / "case00.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"cannot read .*case00\.png"):
        load_folder(FolderConfig(path=root, val_fraction=0, test_fraction=0))


def test_unreadable_nifti_is_named(tmp_path: Path) -> None:
    root = tmp_path / "silo"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "images" / "bad.nii.gz").write_bytes(b"not gzip at all")
    _save_nifti(root / "masks" / "bad.nii.gz", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"cannot read .*bad\.nii\.gz"):
        load_folder(FolderConfig(path=root, val_fraction=0, test_fraction=0))


def test_true_3d_volume_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "silo"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    _save_nifti(root / "images" / "vol.nii.gz", np.zeros((8, 8, 3), dtype=np.float32))
    _save_nifti(root / "masks" / "vol.nii.gz", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"vol\.nii\.gz: expected a 2-D image"):
        load_folder(FolderConfig(path=root, val_fraction=0, test_fraction=0))


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    root = tmp_path / "silo"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(root / "images" / "m.png")
    Image.fromarray(np.zeros((12, 10), dtype=np.uint8)).save(root / "masks" / "m.png")
    with pytest.raises(ValueError, match=r"m\.png has shape"):
        load_folder(FolderConfig(path=root, val_fraction=0, test_fraction=0))


def test_too_few_pairs_for_the_fractions(tmp_path: Path) -> None:
    root = _write_png_folder(tmp_path / "silo", 2)
    with pytest.raises(ValueError, match="too few"):
        load_folder(FolderConfig(path=root, val_fraction=0.4, test_fraction=0.4))


def test_non_json_file(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="not a .json datalist"):
        load_folder(FolderConfig(path=path))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "cannot read datalist"),
        ("[]", "'training' list"),
        ('{"validation": []}', "'training' list"),
        ('{"training": {}}', "'training' must be a list"),
        ('{"training": []}', "no image/mask pairs"),
        ('{"training": ["a.png"]}', r"training\[0\] must be an object"),
        ('{"training": [{"image": "a.png"}]}', r"training\[0\] \(a\.png\) has no 'label'"),
        ('{"training": [{"image": "a.png", "label": "b.png"}], "test": ["c.png"]}', r"test\[0\]"),
        ('{"training": [{"image": "a.png", "label": "b.png"}], "test": [], "testing": []}', "both 'test'"),
    ],
)
def test_bad_datalists(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "datalist.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_folder(FolderConfig(path=path))


def test_datalist_naming_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "gone.png", "label": "gone_seg.png"}]}))
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        load_folder(FolderConfig(path=path, val_fraction=0, test_fraction=0))


# ---- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"path": 3}, "path"),
        ({"path": ""}, "path"),
        ({"path": "x", "image_size": 4}, "image_size"),
        ({"path": "x", "val_fraction": 1.0}, "val_fraction"),
        ({"path": "x", "test_fraction": -0.1}, "test_fraction"),
        ({"path": "x", "val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
        ({"path": "x", "seed": -3}, "seed"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"FolderConfig.{field}"):
        FolderConfig(**kwargs)  # type: ignore[arg-type]


def test_config_from_mapping(tmp_path: Path) -> None:
    cfg = FolderConfig.from_mapping({"path": str(tmp_path), "image_size": 32, "val_fraction": 0})
    assert cfg == FolderConfig(path=tmp_path, image_size=32, val_fraction=0.0)
    assert FolderConfig.from_mapping(cfg.to_mapping()) == cfg
    with pytest.raises(ValueError, match="path"):
        FolderConfig.from_mapping({"image_size": 32})
    with pytest.raises(ValueError, match="'root'"):
        FolderConfig.from_mapping({"root": "x"})
