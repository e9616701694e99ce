"""The agent's checkpoint survives a reload exactly; its data loader honours the config."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedsilo.silo_agent.config import DataConfig, DataSource
from fedsilo.silo_agent.daemon import AgentError, load_data
from fedsilo.silo_agent.state import CHECKPOINT, AgentState


def test_checkpoint_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    state = AgentState(run_id="r", fingerprint="f" * 64, applied_round=3, done_round=4, reported_round=3,
                       global_shared={"w": torch.arange(6.0).reshape(2, 3)},
                       model={"w": torch.ones(2, 3), "norm.weight": torch.full((3,), 2.0)}, last_train_loss=0.5)
    state.save(tmp_path)
    state.done_round = 5
    state.save(tmp_path)
    assert not list(tmp_path.glob("*.tmp")), "the temporary file must be renamed away"
    back = AgentState.load(tmp_path)
    assert back is not None
    assert (back.applied_round, back.done_round, back.reported_round) == (3, 5, 3)
    assert torch.equal(back.global_shared["w"], state.global_shared["w"])
    assert torch.equal(back.model["norm.weight"], state.model["norm.weight"])
    assert back.last_train_loss == 0.5
    assert (tmp_path / CHECKPOINT).is_file()
    assert AgentState.load(tmp_path / "empty") is None


def test_builtin_data_follows_options() -> None:
    data = load_data(DataConfig(source=DataSource.BUILTIN, domain=1, seed=3, options={"n_train": 10, "n_test": 4}))
    assert len(data.splits.train) == 10 and len(data.splits.test) == 4
    assert data.unseen is not None and len(data.unseen) > 0
    again = load_data(DataConfig(source=DataSource.BUILTIN, domain=1, seed=3, options={"n_train": 10, "n_test": 4}))
    assert torch.equal(data.splits.train[0][0], again.splits.train[0][0])


def _png_folder(root: Path, n: int, seed: int = 0) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = (rng.random((40, 40)) * 255).astype(np.uint8)
        mask = np.zeros((40, 40), np.uint8)
        mask[10:20, 10 + i : 20 + i] = 255
        Image.fromarray(img).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i:02d}.png")
    return root


def test_folder_data(tmp_path: Path) -> None:
    _png_folder(tmp_path, 12)
    data = load_data(DataConfig(source=DataSource.FOLDER, path=tmp_path, options={"image_size": 32}))
    total = len(data.splits.train) + len(data.splits.val) + len(data.splits.test)
    assert total == 12 and data.unseen is None
    image, mask = data.splits.train[0]
    assert tuple(image.shape[-2:]) == (32, 32) and set(mask.unique().tolist()) <= {0, 1}


def test_bad_data_settings_are_agent_errors(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="data"):
        load_data(DataConfig(source=DataSource.FOLDER, path=tmp_path / "missing"))
    with pytest.raises(AgentError, match="n_tran"):
        load_data(DataConfig(source=DataSource.BUILTIN, options={"n_tran": 3}))


def test_folder_data_with_a_held_out_domain(tmp_path: Path) -> None:
    """``data.unseen_path``: every image of the held-out folder is the unseen domain; the silo's splits are
    unchanged by it."""
    own, held = _png_folder(tmp_path / "silo", 12), _png_folder(tmp_path / "held", 7, seed=1)
    data = load_data(DataConfig(source=DataSource.FOLDER, path=own, options={"image_size": 32}, unseen_path=held))
    plain = load_data(DataConfig(source=DataSource.FOLDER, path=own, options={"image_size": 32}))
    assert data.unseen is not None and len(data.unseen) == 7
    assert torch.equal(data.splits.train[0][0], plain.splits.train[0][0])
    assert tuple(data.unseen[0][0].shape[-2:]) == (32, 32)
    with pytest.raises(AgentError, match="data"):
        load_data(DataConfig(source=DataSource.FOLDER, path=own, unseen_path=tmp_path / "absent"))


def test_unseen_path_only_with_folder_data(tmp_path: Path) -> None:
    from fedsilo.silo_agent.config import ConfigError

    with pytest.raises(ConfigError, match="data.unseen_path: only with data.source = 'folder'"):
        DataConfig(source=DataSource.BUILTIN, unseen_path=tmp_path)
