"""Tests of fedsilo.models.pretrain and `fedsilo pretrain`: base checkpoints for LoRA fine-tuning."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fedsilo.models import (
    PRETRAIN_DOMAIN,
    Architecture,
    LoraSettings,
    ModelConfig,
    PretrainConfig,
    TrainConfig,
    build_lora_model,
    build_model,
    load_base_checkpoint,
    model_fingerprint,
    save_checkpoint,
)
from fedsilo.models.pretrain import pretrain
from fedsilo.cli.main import main

SMALL_UNET = ModelConfig(channels=(4, 8), strides=(2,))
TINY = PretrainConfig(model=SMALL_UNET, epochs=2, image_size=32, n_train=6, n_test=3)
TINY_ARGS = ["--epochs", "2", "--image-size", "32", "--n-train", "6", "--n-test", "3",
             "--model", '{"channels": [4, 8], "strides": [2]}']


@pytest.fixture(scope="module")
def checkpoint() -> dict:
    torch.set_num_threads(1)
    return pretrain(TINY)


# -- config -------------------------------------------------------------------------------


def test_defaults_pick_a_source_domain_outside_the_demo_silos() -> None:
    cfg = PretrainConfig()
    assert cfg.domain == PRETRAIN_DOMAIN == 16  # `fedsilo demo` runs at most 16 silos: domains 0-15
    assert cfg.model == ModelConfig() and cfg.training == TrainConfig()
    assert (cfg.epochs, cfg.seed, cfg.image_size, cfg.n_train, cfg.n_test) == (30, 0, 64, 48, 24)
    assert cfg.run_id == "pretrain-16-0"
    assert cfg.data.n_val == 0 and cfg.data.image_size == 64


def test_mapping_round_trip_with_nested_tables() -> None:
    unetr = ModelConfig(architecture=Architecture.UNETR, image_size=32)
    cfg = PretrainConfig(model=unetr, training=TrainConfig(lr=0.01), domain=5, epochs=3, seed=2, image_size=32)
    plain = cfg.to_mapping()
    assert plain["model"]["architecture"] == "unetr" and plain["training"]["lr"] == 0.01
    assert PretrainConfig.from_mapping(plain) == cfg
    assert PretrainConfig.from_mapping({"model": {"channels": [4, 8], "strides": [2]}}).model == SMALL_UNET
    assert PretrainConfig.from_mapping({}) == PretrainConfig()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"domain": -1}, "domain"),
        ({"epochs": 0}, "epochs"),
        ({"seed": -1}, "seed"),
        ({"image_size": 16}, "image_size"),
        ({"n_train": 0}, "n_train"),
        ({"n_test": 0}, "n_test"),
        ({"model": {"channels": [4, 8]}}, "model"),
        ({"model": ModelConfig(architecture=Architecture.UNETR, image_size=32)}, "image_size"),
        ({"model": ModelConfig(channels=(4, 8, 16, 32, 64, 128), strides=(2,) * 5), "image_size": 48}, "image_size"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"PretrainConfig.{field}")):
        PretrainConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mapping", "key"),
    [({"epoch": 3}, "epoch"), ({"model": {"chanels": [4]}}, "chanels"), ({"training": {"lr": "x"}}, "lr"),
     ({"domain": "1"}, "domain")],
)
def test_from_mapping_names_the_bad_key(mapping: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        PretrainConfig.from_mapping(mapping)


# -- pretraining and checkpoints ----------------------------------------------------------


def test_checkpoint_has_the_export_format(checkpoint: dict) -> None:
    assert {"run_id", "round", "fingerprint", "model_config", "state_dict"} <= set(checkpoint)
    assert checkpoint["run_id"] == f"pretrain-{PRETRAIN_DOMAIN}-0" and checkpoint["round"] == 0
    assert ModelConfig.from_mapping(checkpoint["model_config"]) == SMALL_UNET
    assert checkpoint["fingerprint"] == model_fingerprint(build_model(SMALL_UNET))
    info = checkpoint["pretrain"]
    assert (info["domain"], info["epochs"], info["seed"], info["n_test"]) == (PRETRAIN_DOMAIN, 2, 0, 3)
    assert 0.0 <= info["dice"] <= 1.0 and info["hd95"] >= 0.0
    assert PretrainConfig.from_mapping(info["config"]) == TINY
    init = build_model(SMALL_UNET).state_dict()
    assert list(checkpoint["state_dict"]) == list(init)
    assert any(not torch.equal(init[k], checkpoint["state_dict"][k]) for k in init)  # it trained


def test_pretrain_is_deterministic(checkpoint: dict) -> None:
    again = pretrain(TINY)
    assert all(torch.equal(checkpoint["state_dict"][k], again["state_dict"][k]) for k in again["state_dict"])
    other = pretrain(dataclasses.replace(TINY, domain=3))
    assert other["run_id"] == "pretrain-3-0"
    assert any(not torch.equal(checkpoint["state_dict"][k], other["state_dict"][k]) for k in other["state_dict"])


def test_save_and_load_base_checkpoint(checkpoint: dict, tmp_path: Path) -> None:
    path = save_checkpoint(checkpoint, tmp_path / "sub" / "base.pt")
    assert path.is_file() and not (tmp_path / "sub" / "base.pt.tmp").exists()
    state = load_base_checkpoint(path, SMALL_UNET)
    model = build_model(SMALL_UNET)
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(state[k], checkpoint["state_dict"][k]) for k in state)
    # The frozen base of a LoRA model: its output at init is the pretrained network's.
    lora = build_lora_model(SMALL_UNET, LoraSettings(rank=2), base_state_dict=state).eval()
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lora(x), model.eval()(x))


def test_load_refuses_another_model_config(checkpoint: dict, tmp_path: Path) -> None:
    path = save_checkpoint(checkpoint, tmp_path / "base.pt")
    with pytest.raises(ValueError, match=r"another model config: seed=0 \(expected 1\)"):
        load_base_checkpoint(path, dataclasses.replace(SMALL_UNET, seed=1))
    with pytest.raises(ValueError, match="channels"):
        load_base_checkpoint(path, ModelConfig())
    with pytest.raises(ValueError, match="architecture"):
        load_base_checkpoint(path, ModelConfig(architecture=Architecture.UNETR))


def test_load_refuses_what_is_not_a_base_checkpoint(checkpoint: dict, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_base_checkpoint(junk, SMALL_UNET)
    bare = save_checkpoint({"state_dict": checkpoint["state_dict"]}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="model_config"):
        load_base_checkpoint(bare, SMALL_UNET)
    lora_state = build_lora_model(SMALL_UNET, LoraSettings()).state_dict()
    lora = save_checkpoint({**checkpoint, "state_dict": lora_state}, tmp_path / "lora.pt")
    with pytest.raises(ValueError, match="LoRA"):
        load_base_checkpoint(lora, SMALL_UNET)
    wrong = dict(checkpoint["state_dict"])
    first = next(iter(wrong))
    wrong[first] = wrong[first].double()
    with pytest.raises(ValueError, match=re.escape(first)):
        load_base_checkpoint(save_checkpoint({**checkpoint, "state_dict": wrong}, tmp_path / "w.pt"), SMALL_UNET)


def test_load_accepts_an_export_with_a_partial_model_config(tmp_path: Path) -> None:
    # `fedsilo export` stores the federation's model table as written, e.g. empty for defaults.
    state = build_model(ModelConfig()).state_dict()
    path = save_checkpoint({"run_id": "r", "round": 3, "model_config": {}, "state_dict": state}, tmp_path / "e.pt")
    loaded = load_base_checkpoint(path, ModelConfig())
    assert all(torch.equal(loaded[k], state[k]) for k in state)


# -- command line -------------------------------------------------------------------------


def test_cli_pretrain_writes_a_loadable_checkpoint(tmp_path: Path, checkpoint: dict) -> None:
    out = tmp_path / "base.pt"
    result = CliRunner().invoke(main, ["pretrain", "--out", str(out), *TINY_ARGS])
    assert result.exit_code == 0, result.output
    assert f"built-in domain {PRETRAIN_DOMAIN}" in result.output and "Dice" in result.output
    assert str(out) in result.output
    state = load_base_checkpoint(out, SMALL_UNET)
    assert all(torch.equal(state[k], checkpoint["state_dict"][k]) for k in state)  # same as the API


def test_cli_pretrain_options_reach_the_config(tmp_path: Path) -> None:
    out = tmp_path / "b.pt"
    args = ["pretrain", "--out", str(out), "--domain", "4", "--seed", "7", "--training", '{"lr": 0.005}', *TINY_ARGS]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["run_id"] == "pretrain-4-7"
    cfg = PretrainConfig.from_mapping(ckpt["pretrain"]["config"])
    assert (cfg.domain, cfg.seed, cfg.training.lr) == (4, 7, 0.005)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "epochs"),
        (["--domain", "-2"], "domain"),
        (["--model", "{not json"], "--model: not valid JSON"),
        (["--model", "[1, 2]"], "JSON object"),
        (["--model", '{"chanels": [4]}'], "chanels"),
        (["--training", '{"lr": -1}'], "lr"),
        (["--epochs", "two"], "two"),
        (["--model", '{"architecture": "unetr"}', "--image-size", "40"], "image_size"),
    ],
)
def test_cli_pretrain_bad_arguments_fail(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "base.pt"
    result = CliRunner().invoke(main, ["pretrain", "--out", str(out), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert not out.exists()


def test_cli_pretrain_needs_out() -> None:
    result = CliRunner().invoke(main, ["pretrain", "--epochs", "1"])
    assert result.exit_code != 0 and "--out" in result.output


# -- pretraining on the user's own folder ------------------------------------------------------------


def _write_folder(root: Path, n: int, domain: int = 5) -> Path:
    """A user's folder of PNG images/ + masks/ (made from a built-in domain no demo silo holds here)."""
    import numpy as np
    from PIL import Image

    from fedsilo.models.synthetic import SyntheticConfig, silo_splits

    splits = silo_splits(SyntheticConfig(seed=7, image_size=48, n_train=n, n_val=0, n_test=1), domain)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = splits.train[i]
        x = image[0].numpy()
        png = np.clip((x - x.min()) / (x.max() - x.min() + 1e-9) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(png).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray((mask[0].numpy() * 255).astype(np.uint8)).save(root / "masks" / f"case{i:02d}.png")
    return root


def test_pretraining_on_a_folder_uses_its_images_and_reports_its_test_dice(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "mr", 10)
    cfg = dataclasses.replace(TINY, folder=str(folder))
    assert cfg.run_id == "pretrain-folder-0"
    assert PretrainConfig.from_mapping(cfg.to_mapping()) == cfg
    ckpt = pretrain(cfg)
    info = ckpt["pretrain"]
    assert info["folder"] == str(folder) and info["domain"] is None
    assert info["n_test"] == len(cfg.splits().test) >= 1  # the folder's own test split, not TINY's n_test
    assert 0.0 <= info["dice"] <= 1.0
    again = pretrain(cfg)
    assert all(torch.equal(again["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
    builtin = pretrain(TINY)
    assert any(not torch.equal(builtin["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
    base = load_base_checkpoint(save_checkpoint(ckpt, tmp_path / "base.pt"), SMALL_UNET)
    assert base.keys() == build_model(SMALL_UNET).state_dict().keys()


def test_pretrain_cli_on_a_folder(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "mr", 10)
    out = tmp_path / "base.pt"
    args = ["pretrain", "--out", str(out), "--data", str(folder), "--epochs", "1", "--image-size", "32",
            "--model", '{"channels": [4, 8], "strides": [2]}']
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"on {folder}" in result.output and out.is_file()
    both = CliRunner().invoke(main, [*args, "--domain", "3", "--n-train", "5"])
    assert both.exit_code == 2 and "--domain, --n-train: settings of the built-in data" in both.output
    missing = CliRunner().invoke(main, ["pretrain", "--out", str(out), "--data", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    bad = CliRunner().invoke(main, ["pretrain", "--out", str(tmp_path / "x.pt"), "--data", str(empty)])
    assert bad.exit_code == 1 and bad.output.startswith("error: --data:") and "Traceback" not in bad.output
    assert not (tmp_path / "x.pt").exists()
