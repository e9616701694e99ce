"""``fedsilo bench``'s runner: settings refused with a message naming the bad value, the sweep and
seed parsers' known answers, the reference methods' defining rules on tiny real data, the CLI
end to end (a real two-method study, resumed cell by cell, refusing a reused folder), and a study
of a toy classification Task whose reports name accuracy, never Dice."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import ConcatDataset

from fedsilo.models import ModelConfig, SyntheticConfig, TrainConfig, build_model, evaluate, silo_splits, train_local
from fedsilo.models.tasks import Task, get_task, register_task, unregister_task
from fedsilo.silo_agent.bench.centralised import run_centralised
from fedsilo.silo_agent.bench.local import run_local
from fedsilo.silo_agent.bench.methods import study_method_names
from fedsilo.silo_agent.bench.reference import Silo
from fedsilo.silo_agent.bench.runner import (
    BenchConfig,
    BenchError,
    cell_id,
    default_sweep,
    parse_seeds,
    parse_sweep,
)
from fedsilo.cli.main import main
from fedsilo.silo_agent.daemon import SiloData
from fedsilo.silo_agent.demo import DEMO_TRAINING
from tests.models.test_models_task import ToyImageClassification

SEGMENTATION = get_task("segmentation-2d")


class BenchToy(ToyImageClassification):
    """The Task seam's toy classification Task (headline accuracy, metrics accuracy and nll), whose
    default model config follows the seed, under a name of its own for this module."""

    name = "toy-bench-classification"

    def default_model_config(self, seed: int = 0) -> dict:
        return {"seed": seed}


@pytest.fixture
def toy_task() -> Iterator[Task]:
    """The toy Task, registered for one test and removed after."""
    register_task(BenchToy)
    try:
        yield get_task(BenchToy.name)
    finally:
        unregister_task(BenchToy.name)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Train on one thread, as the simulated agents do (their configs say threads = 1): the
    reference runs otherwise use every core, which on a busy 2-core machine is many times slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# -- BenchConfig --------------------------------------------------------------------------------
def _cfg(tmp_path: Path, **kw) -> BenchConfig:
    values = {"methods": ("fedavg", "local"), "seeds": (0,), "rounds": 2, "out": tmp_path / "out",
              "aggregation": "plain"}
    values.update(kw)
    return BenchConfig(**values)


@pytest.mark.parametrize(("kw", "fragment"), [
    ({"methods": ("fedavg", "nope")}, "'nope'"),
    ({"methods": ("fedavg", "local", "fedavg")}, "fedavg,local,fedavg"),
    ({"methods": ()}, "methods"),
    ({"seeds": (0, -1)}, "-1"),
    ({"seeds": (3, 1, 3)}, "(3, 1, 3)"),
    ({"seeds": ()}, "seeds"),
    ({"rounds": 0}, "rounds: 0"),
    ({"silos": 1}, "silos: 1 must be an integer in [2, 16]"),
    ({"local_epochs": 0}, "local_epochs: 0"),
    ({"rounds": 4, "sweep": ((4, 1), (3, 1))}, "3x1"),
    ({"rounds": 4, "sweep": ((0, 4),)}, "0x4"),
    ({"aggregation": "ckks"}, "'ckks'"),
    ({"mu": -0.5}, "-0.5"),
    ({"mu": math.nan}, "nan"),
    ({"mu": math.inf}, "inf"),
    ({"methods": ("fedavg", "resfim")}, "resfim"),
    ({"methods": ("fedrdn",)}, "fedrdn"),
    ({"held_out": "site-z"}, "held_out"),
    ({"task": "segmentation-9d"}, "task: unknown task 'segmentation-9d'"),
    ({"model": {"channels": [4, 8], "bogus": 1}}, "model: "),
    ({"model": [1, 2]}, "model: [1, 2] must be a table"),
    ({"data_options": {"domain": 3}}, "data_options: domain is set by the bench for each silo"),
    ({"data_options": ["n_train"]}, "data_options: ['n_train'] must be a table of option names"),
    ({"task": "glaucoma", "data_options": {"modalities": "oct"}},
     "data_options: task 'glaucoma-multimodal' refuses them: SyntheticGlaucomaConfig.modalities must be one of"),
    ({"data_options": {"n_trian": 4}}, "data_options: task 'segmentation-2d' refuses them"),
    ({"task": "glaucoma", "methods": ("fedavg", "fednova")},
     "methods: fednova makes or applies uploads its own way, without per-modality counts, and the study's network "
     "has modality groups (oct)"),
    ({"task": "glaucoma", "methods": ("fedbm",), "aggregation": "he"},
     "methods: 'fedbm' works on 2-D image tensors only"),
    ({"task": "sensor", "methods": ("resfim",), "aggregation": "he"}, "methods: 'resfim' works on 2-D images only"),
])
def test_bench_config_refuses_bad_settings(tmp_path: Path, kw: dict, fragment: str) -> None:
    with pytest.raises(BenchError, match=re.escape(fragment)):
        _cfg(tmp_path, **kw)
    assert not (tmp_path / "out").exists()


def test_plain_aggregation_refusal_says_what_to_use(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="resfim needs --aggregation he"):
        _cfg(tmp_path, methods=("resfim",))
    # the same methods are fine under HE (the deployed default)
    assert _cfg(tmp_path, methods=("resfim", "fedrdn"), aggregation="he").methods == ("resfim", "fedrdn")


def test_data_folder_needs_two_silo_folders(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "site-a").mkdir(parents=True)
    (data / ".hidden").mkdir()
    (data / "README.txt").write_text("not a silo")
    with pytest.raises(BenchError, match=r"holds 1 silo folder\(s\)"):
        _cfg(tmp_path, data=data)
    with pytest.raises(BenchError, match="is not a folder"):
        _cfg(tmp_path, data=tmp_path / "missing")
    (data / "site-b").mkdir()
    (data / "site-c").mkdir()
    # the held-out domain is not a silo: two silos remain
    with pytest.raises(BenchError, match="site-x"):
        _cfg(tmp_path, data=data, held_out="site-x")
    cfg = _cfg(tmp_path, data=data, held_out="site-c", silos=7)
    assert cfg.silos == 2
    assert cfg.study()["held_out"] == "site-c"
    assert cfg.study()["data"] == str(data)


def test_schedules_main_first_and_no_duplicate(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, rounds=4, sweep=((8, 1), (4, 2), (2, 4), (1, 8)), local_epochs=2)
    assert cfg.schedules == [(4, 2, True), (8, 1, False), (2, 4, False), (1, 8, False)]
    assert _cfg(tmp_path, rounds=3).schedules == [(3, 1, True)]
    assert _cfg(tmp_path, rounds=3, sweep=((1, 3),)).schedules == [(3, 1, True), (1, 3, False)]


def test_study_settings_known_answer(tmp_path: Path) -> None:
    assert _cfg(tmp_path, mu=0.5).study() == {"task": "segmentation-2d", "model": None, "aggregation": "plain",
                                              "dp": False, "data": "builtin", "held_out": None, "mu": 0.5,
                                              "base": None}
    model = {"channels": [4, 8], "strides": [2], "num_res_units": 0}
    assert _cfg(tmp_path, model=model).study()["model"] == model
    # data options are part of the study (a study without them keeps its settings, so old cells still match)
    assert _cfg(tmp_path, data_options={"n_train": 4}).study()["data_options"] == {"n_train": 4}


def test_all_names_only_the_methods_a_task_can_run() -> None:
    from fedsilo.silo_agent.bench.methods import study_method_names

    everything = study_method_names()
    glaucoma = study_method_names("glaucoma")
    assert {"fedavg", "fedbn", "fedprox", "local"} <= set(glaucoma) < set(everything)
    assert not {"fednova", "fedawa", "fedlws", "pfa", "cksp", "fedbm", "resfim", "fedrdn", "deer"} & set(glaucoma)
    assert "deer" not in study_method_names("sensor") and "resfim" not in study_method_names("segmentation-3d")
    assert "deer" in study_method_names("segmentation-2d") and "fednova" in study_method_names("sensor")


def test_data_options_reach_every_silo(tmp_path: Path) -> None:
    from fedsilo.models.tasks import DataSpec, get_task
    from fedsilo.silo_agent.bench.runner import agent_data_tables

    small = {"n_train": 4, "n_val": 2, "n_test": 3, "n_unseen": 0, "image_size": 32, "oct_size": [16, 32]}
    names = ["a", "b", "c"]
    assert agent_data_tables(_cfg(tmp_path), 0, names) is None  # the demo's built-in tables
    for options, has_oct in (({**small, "modalities": "both"}, [True, True, True]), (small, [True, True, False])):
        tables = agent_data_tables(_cfg(tmp_path, task="glaucoma", data_options=options), 7, names)
        assert [(t["source"], t["domain"], t["seed"]) for t in tables] == [("builtin", i, 7) for i in range(3)]
        fields = ("source", "domain", "seed")
        loaded = [get_task("glaucoma").load_data(DataSpec(**{k: t[k] for k in fields},
                                                          options={k: v for k, v in t.items() if k not in fields}))
                  for t in tables]
        assert [len(d.splits.train) for d in loaded] == [4, 4, 4]
        assert [d.splits.train.has_oct_modality for d in loaded] == has_oct  # by default the third clinic has none


def test_another_task_is_its_own_study_and_needs_no_segmentation_base(tmp_path: Path, toy_task: Task) -> None:
    cfg = _cfg(tmp_path, task=toy_task.name)
    assert cfg.study()["task"] == "toy-bench-classification"
    with pytest.raises(BenchError, match="deer fine-tunes a pretrained base"):
        _cfg(tmp_path, task=toy_task.name, methods=("fedavg", "deer"), aggregation="he")
    data = tmp_path / "data"
    for site in ("site-a", "site-b"):
        (data / site).mkdir(parents=True)
    with pytest.raises(BenchError, match="reads no folder data"):
        _cfg(tmp_path, task=toy_task.name, data=data)
    with pytest.raises(BenchError, match="model: ToyModelConfig: unknown key"):
        _cfg(tmp_path, task=toy_task.name, model={"channels": [4]})


def test_every_method_is_accepted_under_he(tmp_path: Path) -> None:
    names = study_method_names(SEGMENTATION.name)
    cfg = _cfg(tmp_path, methods=names, aggregation="he")
    assert cfg.methods == names
    assert {"local", "centralised", "fedavg", "resfim", "fedrdn"} <= set(names)
    assert "one-for-one" in study_method_names() and "one-for-one" not in names  # its silos have no groups


# -- sweep and seeds ----------------------------------------------------------------------------
@pytest.mark.parametrize(("main", "expected"), [
    ((40, 1), ((40, 1), (20, 2), (10, 4), (8, 5), (5, 8))),
    ((3, 1), ((3, 1), (1, 3))),
    ((10, 1), ((10, 1), (5, 2), (2, 5))),
    ((1, 1), ((1, 1),)),
    ((5, 2), ((10, 1), (5, 2), (2, 5))),
    ((7, 1), ((7, 1), (1, 7))),
])
def test_default_sweep_known_answers(main: tuple[int, int], expected: tuple) -> None:
    assert default_sweep(*main) == expected


@settings(max_examples=150, deadline=None)
@given(rounds=st.integers(1, 200), epochs=st.integers(1, 8))
def test_default_sweep_invariants(rounds: int, epochs: int) -> None:
    sweep = default_sweep(rounds, epochs)
    total = rounds * epochs
    assert sweep[0] == (total, 1)
    assert len(set(sweep)) == len(sweep)
    assert all(r * e == total and r >= 1 and 1 <= e <= 8 for r, e in sweep)
    assert [e for _, e in sweep] == sorted(e for _, e in sweep)
    assert (rounds, epochs) in sweep  # the main schedule is one of the splits
    # every split with at most 8 epochs per round is there
    assert {e for _, e in sweep} == {e for e in range(1, 9) if total % e == 0}


@pytest.mark.parametrize(("text", "expected"), [
    ("40x1, 20\u00d72", ((40, 1), (20, 2))),
    ("3x1", ((3, 1),)),
    (" 10 x 4 ,", ((10, 4),)),
    ("", ()),
])
def test_parse_sweep_known_answers(text: str, expected: tuple) -> None:
    assert parse_sweep(text) == expected


@pytest.mark.parametrize("text", ["40-1", "x2", "40x", "4x1,2*2", "-1x4", "1.5x2"])
def test_parse_sweep_refuses_malformed_entries(text: str) -> None:
    with pytest.raises(BenchError, match="ROUNDSxEPOCHS"):
        parse_sweep(text)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 10_000), st.integers(1, 100)), max_size=8),
       st.sampled_from(["x", "\u00d7", " x ", "X"]))
def test_parse_sweep_reads_back_what_it_formats(entries: list, sep: str) -> None:
    text = ",".join(f"{r}{sep}{e}" for r, e in entries)
    if sep == "X":  # only x and × are separators
        if entries:
            with pytest.raises(BenchError):
                parse_sweep(text)
        return
    assert parse_sweep(text) == tuple(entries)


@pytest.mark.parametrize(("text", "expected"), [
    ("3", (0, 1, 2)),
    ("1", (0,)),
    ("0,4", (0, 4)),
    ("7, 2,9", (7, 2, 9)),
])
def test_parse_seeds_known_answers(text: str, expected: tuple) -> None:
    assert parse_seeds(text) == expected


@pytest.mark.parametrize("text", ["0", "-2", "a", "1,b", "1.5"])
def test_parse_seeds_refuses(text: str) -> None:
    with pytest.raises(BenchError, match=re.escape(repr(text))):
        parse_seeds(text)


def test_cell_id_known_answer() -> None:
    assert cell_id("fedavg", 3, 20, 2) == "fedavg-seed3-20x2"


# -- the reference methods on tiny real data ----------------------------------------------------
MODEL = ModelConfig.from_mapping({"channels": [4, 8], "strides": [2], "num_res_units": 0, "seed": 0})
TRAIN = TrainConfig.from_mapping({"local_epochs": 1, "batch_size": 4, "seed": 0})
DATA = SyntheticConfig(seed=0, n_train=8, n_val=4, n_test=4, image_size=32)


@pytest.fixture(scope="module")
def silos() -> list[Silo]:
    return [Silo(name=f"site-{d}", data=SiloData(splits=silo_splits(DATA, d), unseen=None)) for d in (0, 1)]


def _no_bytes_and_shape(log: list[dict], silos: list[Silo], rounds: int) -> None:
    assert [r["round"] for r in log] == list(range(1, rounds + 1))
    names = {s.name for s in silos}
    for r in log:
        assert r["bytes_up"] == 0 and r["bytes_down"] == 0
        assert set(r["metrics"]) == {"dice", "hd95", "val_dice"}
        assert set(r["metrics"]["dice"]) == set(r["metrics"]["hd95"]) == set(r["metrics"]["val_dice"]) == names
        assert r["unseen"] == {}
        assert all(0.0 <= v <= 1.0 for v in r["metrics"]["dice"].values())


def test_local_trains_each_silo_on_its_own_data_only(silos: list[Silo]) -> None:
    seen: list[int] = []
    log = run_local(silos, task=SEGMENTATION, model_cfg=MODEL, train_cfg=TRAIN, rounds=2, on_round=seen.append)
    assert seen == [1, 2]
    _no_bytes_and_shape(log, silos, 2)
    for silo in silos:  # a model built the same way, trained on this silo's data and nothing else
        alone = build_model(MODEL)
        train_local(alone, silo.data.splits.train, TRAIN, round_index=1)
        assert log[0]["metrics"]["dice"][silo.name] == evaluate(alone, silo.data.splits.test).dice
        train_local(alone, silo.data.splits.train, TRAIN, round_index=2)
        assert log[1]["metrics"]["dice"][silo.name] == evaluate(alone, silo.data.splits.test).dice
        assert log[1]["metrics"]["hd95"][silo.name] == evaluate(alone, silo.data.splits.test).hd95
        assert log[1]["metrics"]["val_dice"][silo.name] == evaluate(alone, silo.data.splits.val).dice


def test_centralised_trains_one_model_on_the_pooled_data(silos: list[Silo]) -> None:
    log = run_centralised(silos, task=SEGMENTATION, model_cfg=MODEL, train_cfg=TRAIN, rounds=2)
    _no_bytes_and_shape(log, silos, 2)
    pooled = build_model(MODEL)
    data = ConcatDataset([s.data.splits.train for s in silos])
    train_local(pooled, data, TRAIN, round_index=1)
    train_local(pooled, data, TRAIN, round_index=2)
    for silo in silos:  # the one model, scored on each silo's own test set
        res = evaluate(pooled, silo.data.splits.test)
        assert log[1]["metrics"]["dice"][silo.name] == res.dice
        assert log[1]["metrics"]["hd95"][silo.name] == res.hd95
        assert log[1]["metrics"]["val_dice"][silo.name] == evaluate(pooled, silo.data.splits.val).dice


def test_centralised_is_not_local(silos: list[Silo]) -> None:
    """The two references differ (else the checks above could not tell them apart)."""
    local = run_local(silos, task=SEGMENTATION, model_cfg=MODEL, train_cfg=TRAIN, rounds=1)
    central = run_centralised(silos, task=SEGMENTATION, model_cfg=MODEL, train_cfg=TRAIN, rounds=1)
    assert local[0]["metrics"] != central[0]["metrics"]


# -- the CLI ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "fragment"), [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--methods", "fedavg,fedavg"], "names a method twice"),
    (["--sweep", "3x3", "--rounds", "2"], "sweep: 3x3"),
    (["--sweep", "3-3"], "'3-3' is not ROUNDSxEPOCHS"),
    (["--seeds", "x"], "seeds: 'x'"),
    (["--seeds", "0"], "seeds: '0'"),
    (["--methods", "resfim", "--aggregation", "plain"], "resfim needs --aggregation he"),
    (["--rounds", "0"], "rounds: 0"),
    (["--task", "nope"], "unknown task 'nope'"),
    (["--model-json", "{channels"], "--model-json is not JSON"),
    (["--data-json", "[1]"], "--data-json must be a JSON object of [data] options"),
    (["--data-json", '{"n_train": 0}'], "data_options: task 'segmentation-2d' refuses them"),
])
def test_cli_bench_refuses_bad_input_and_writes_nothing(tmp_path: Path, args: list[str], fragment: str,
                                                        fedsilo_logger: None) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", *args, "--out", str(out)])
    assert result.exit_code != 0
    assert "error:" in result.output and fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()


STUDY = ["bench", "--methods", "fedavg,local", "--rounds", "2", "--seeds", "1", "--sweep", "2x1,1x2",
         "--aggregation", "plain"]
OUTPUTS = ("results.csv", "summary.md", "dice_vs_rounds.png", "dice_vs_bytes.png", "per_silo.png", "sweep.png")
CELLS = {cell_id(m, 0, r, e) for m in ("fedavg", "local") for r, e in ((2, 1), (1, 2))}
SILO_NAMES = ["hospital-a", "hospital-b", "hospital-c"]


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_cli_bench_study_resumes_and_refuses_other_settings(tmp_path: Path, fedsilo_logger: None) -> None:
    out = tmp_path / "study"
    cells_dir = out / "cells"
    runner = CliRunner()

    # (b) a real small study: 2 methods x 1 seed x 2 schedules (2x1 is the main one, given twice)
    result = runner.invoke(main, [*STUDY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.output
    assert "fedsilo bench: 2 method(s) x 1 seed(s) x 2 schedule(s)" in result.output
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in OUTPUTS[2:]:
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name
    assert {p.stem for p in cells_dir.glob("*.json")} == CELLS
    assert not list((out / "work").glob("*")), "each cell's work folder is removed when it ends"

    cells = {p.stem: json.loads(p.read_text()) for p in cells_dir.glob("*.json")}
    for cid, cell in cells.items():
        method, _seed, schedule = cid.split("-")
        rounds, epochs = (int(x) for x in schedule.split("x"))
        assert (cell["method"], cell["seed"], cell["rounds"], cell["local_epochs"]) == (method, 0, rounds, epochs)
        assert cell["main"] is ((rounds, epochs) == (2, 1))
        assert (cell["aggregation"], cell["dp"], cell["mu"], cell["data"], cell["held_out"]) == (
            "plain", False, 0.01, "builtin", None)
        assert (cell["task"], cell["model"], cell["headline"], cell["metric_names"], cell["lower_is_better"]) == (
            "segmentation-2d", None, "dice", ["dice", "hd95"], ["hd95"])
        assert cell["silos"] == SILO_NAMES
        assert cell["epsilon"] is None
        assert [r["round"] for r in cell["rounds_log"]] == list(range(1, rounds + 1))
        assert set(cell["test_sizes"]) == set(SILO_NAMES) and all(n > 0 for n in cell["test_sizes"].values())
        for rec in cell["rounds_log"]:
            assert set(rec["metrics"]) == {"dice", "hd95", "val_dice"}, cid
            assert set(rec["metrics"]["dice"]) == set(SILO_NAMES), cid
            assert set(rec["unseen"]) == {"dice", "hd95"}, cid  # evaluated every round on the held-out domain
            if method == "fedavg":
                assert rec["bytes_up"] > 0 and rec["bytes_down"] > 0, cid
            else:
                assert rec["bytes_up"] == 0 and rec["bytes_down"] == 0, cid
    # both fedavg cells train 2 epochs in all and upload one model per silo per round: one round of
    # 1x2 uploads half the bytes of 2x1's two rounds
    up = {cid: sum(r["bytes_up"] for r in c["rounds_log"]) for cid, c in cells.items()}
    assert up["fedavg-seed0-2x1"] > up["fedavg-seed0-1x2"] > 0

    summary = (out / "summary.md").read_text()
    for method in ("fedavg", "local"):
        assert re.search(rf"^\| {method} \|", summary, re.MULTILINE), summary
    with (out / "results.csv").open() as f:
        rows = f.read().splitlines()
    assert len(rows) == 1 + len(CELLS) * len(SILO_NAMES)  # a row per cell and silo

    # (c) resumable: only the missing cell runs again; the others are not touched
    gone = cells_dir / "local-seed0-1x2.json"
    gone_text = gone.read_text()
    gone.unlink()
    kept = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells_dir.glob("*.json")}
    assert len(kept) == 3
    result = runner.invoke(main, [*STUDY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "resuming: 3 of 4" in _flat(result.output), result.output
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells_dir.glob("*.json") if p != gone} == kept
    assert gone.is_file()
    redone, before = json.loads(gone.read_text()), json.loads(gone_text)
    # the reference run is deterministic: the same numbers again (only its wall time differs)
    redone.pop("seconds"), before.pop("seconds")
    assert redone == before
    results_csv = (out / "results.csv").read_bytes()

    # (d) the same folder with other study settings is refused, and nothing there changes
    result = runner.invoke(main, [*STUDY, "--mu", "0.5", "--out", str(out)])
    assert result.exit_code != 0
    assert "error:" in result.output, result.output
    assert "use a new --out" in _flat(result.output), result.output
    assert "mu=0.01" in _flat(result.output), result.output
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells_dir.glob("*.json") if p != gone} == kept
    assert (out / "results.csv").read_bytes() == results_csv
    # another number of silos is another study too: its cells are not the 3-silo ones
    result = runner.invoke(main, [*STUDY, "--silos", "2", "--out", str(out)])
    assert result.exit_code != 0 and "use a new --out" in _flat(result.output), result.output
    assert "silos=['hospital-a', 'hospital-b', 'hospital-c']" in _flat(result.output), result.output
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells_dir.glob("*.json") if p != gone} == kept


def test_cli_bench_study_of_another_task_names_its_headline_never_dice(tmp_path: Path, toy_task: Task,
                                                                     fedsilo_logger: None) -> None:
    """A toy classification Task (headline accuracy, nll lower-is-better): fedavg and local for 2 rounds;
    the cells, results.csv, summary.md and plot names speak of accuracy, and the local reference
    trains and scores with the Task (the same numbers as the Task's own calls)."""
    out = tmp_path / "toy"
    result = CliRunner().invoke(main, ["bench", "--task", toy_task.name, "--methods", "fedavg,local", "--rounds", "2",
                                       "--seeds", "1", "--sweep", "none", "--silos", "2", "--aggregation", "plain",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = ["hospital-a", "hospital-b"]
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert set(cells) == {cell_id(m, 0, 2, 1) for m in ("fedavg", "local")}
    for cid, cell in cells.items():
        assert (cell["task"], cell["headline"], cell["metric_names"], cell["lower_is_better"]) == (
            toy_task.name, "accuracy", ["accuracy", "nll"], ["nll"]), cid
        assert cell["test_sizes"] == {n: ToyImageClassification.N["test"] for n in names}, cid
        for rec in cell["rounds_log"]:
            assert set(rec["metrics"]) == {"accuracy", "nll", "val_accuracy"}, cid
            assert all(set(v) == set(names) for v in rec["metrics"].values()), cid
            assert set(rec["unseen"]) == {"accuracy", "nll"}, cid
    # the local reference: each silo's model built, trained and scored by the Task, nothing else
    local = cells[cell_id("local", 0, 2, 1)]["rounds_log"]
    train = TrainConfig.from_mapping({**DEMO_TRAINING, "seed": 0})
    for i, silo in enumerate(names):
        data = toy_task.load_data({"source": "builtin", "domain": i, "seed": 0})
        model = toy_task.build_model(toy_task.default_model_config(0))
        for rnd in (1, 2):
            train_local(model, data.splits.train, train, round_index=rnd, task=toy_task)
        assert local[1]["metrics"]["accuracy"][silo] == toy_task.evaluate(model, data.splits.test)["accuracy"][0]
        assert local[1]["metrics"]["val_accuracy"][silo] == toy_task.evaluate(model, data.splits.val)["accuracy"][0]

    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert files == sorted(["results.csv", "summary.md", "accuracy_vs_rounds.png", "accuracy_vs_bytes.png",
                            "per_silo.png", "sweep.png"])
    summary = (out / "summary.md").read_text()
    assert "dice" not in summary.lower() and "hd95" not in summary.lower()
    assert "Task: toy-bench-classification (headline metric: accuracy; metrics: accuracy, nll)" in summary
    assert "| Method | accuracy (weighted mean) | Std across silos | Worst silo | nll | Unseen accuracy |" in summary
    assert "## accuracy per silo" in summary and "validation accuracy peaked" in summary
    for method in ("fedavg", "local"):
        assert re.search(rf"^\| {method} \| \d\.\d{{3}}", summary, re.MULTILINE), summary
    text = (out / "results.csv").read_text()
    assert "dice" not in text.lower()
    with (out / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(names)
    assert {"accuracy", "nll", "val_accuracy_at_selected", "cell_mean_accuracy", "unseen_accuracy"} <= set(rows[0])
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and float(r["nll"]) >= 0 for r in rows)


# -- method variants: base@table.key=value ------------------------------------------------------


def test_a_variant_replaces_entries_of_its_base_tables() -> None:
    from fedsilo.silo_agent.bench.methods import resolve

    base = resolve("resfim")
    rho = resolve("resfim@resfim.rho=0.2")
    assert rho.name == "resfim@resfim.rho=0.2" and rho.strategy == base.strategy == "resfim"
    assert rho.resfim == {**base.resfim, "rho": 0.2} and base.resfim["rho"] != 0.2
    both = resolve("fedavg@training.proximal_mu=0.05&training.optimizer=sgd")
    assert both.training == {"proximal_mu": 0.05, "optimizer": "sgd"} and both.strategy == "fedavg"
    assert resolve("fedprox", mu=0.3).training == {"proximal_mu": 0.3}


def test_a_variant_varies_any_table_of_its_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 fedsilo_logger: None) -> None:
    """A method's own table (MOON's [moon], declared in its class) is a variant's to vary, and the
    cell's run config carries it; other tables of its base stay as they were."""
    from fedsilo.silo_agent import simulation
    from fedsilo.silo_agent.bench.methods import resolve, variable_tables
    from fedsilo.silo_agent.bench.runner import run_cell

    moon = resolve("moon@moon.mu=5")
    assert moon.strategy == "moon" and moon.tables == {"moon": {"mu": 5}} and moon.note.endswith("[moon.mu=5]")
    assert resolve("moon").tables == {} and variable_tables(resolve("moon")) == ("training", "model", "moon")
    assert variable_tables(resolve("resfim"))[:3] == ("training", "model", "resfim")
    assert resolve("resfim@resfim.rho=0.2").tables["resfim"]["rho"] == 0.2
    carried: list[Any] = []

    def no_run(fed: Any, agents: Any, **kw: Any) -> None:
        carried.append(fed)
        raise simulation.SimulationError("stopped by the test once the run config was read")

    monkeypatch.setattr(simulation, "simulate", no_run)
    cfg = _cfg(tmp_path, methods=("moon@moon.mu=5",), rounds=1, silos=2)
    with pytest.raises(BenchError, match="stopped by the test"):
        run_cell(cfg, moon, 0, 1, 1)
    assert carried[0].strategy == "moon" and carried[0].tables["moon"]["mu"] == 5


@pytest.mark.parametrize("name, fragment", [
    ("nosuch@training.x=1", "unknown method 'nosuch'"),
    ("local@training.lr=0.1", "local is a reference run"),
    ("fedavg@resfim.rho=0.2", "fedavg has no [resfim] table"),
    ("moon@resfim.rho=0.2", "moon has no [resfim] table to vary (its tables: training, model, moon)"),
    ("moon@moon.mu=-1", "moon@moon.mu=-1: moon.mu: -1 must be a finite number >= 0"),
    ("fedavg@rho=0.2", "a variant is base@table.key=value"),
    ("fedavg@training.lr=", "a variant is base@table.key=value"),
    ("fedavg@model.norm=bogus", "fedavg@model.norm=bogus: model.norm=bogus is not a model the study's Task builds: "
                                "ModelConfig: key 'norm' must be one of"),
    ("fedavg@training.lr=0.1&model.nrm=1", "model.nrm=1 is not a model the study's Task builds: ModelConfig: "
                                           "unknown key(s) 'nrm'"),
    ("fedavg@model.channels=[8,16]", "model.channels=[8,16] is not a model"),  # the strides no longer fit
    ("local@model.norm=pn", "local is a reference run"),
])
def test_malformed_variants_are_refused_naming_them(tmp_path: Path, name: str, fragment: str) -> None:
    with pytest.raises(BenchError, match=re.escape(fragment)):
        _cfg(tmp_path, methods=(name,))


def test_a_variant_cell_is_its_own_file_and_says_what_changed(tmp_path: Path, fedsilo_logger: None) -> None:
    from fedsilo.silo_agent.bench.runner import run_study

    cfg = _cfg(tmp_path, methods=("fedavg", "fedavg@training.proximal_mu=0.5"), rounds=1, silos=2)
    run_study(cfg)
    cells = sorted(p.name for p in (tmp_path / "out" / "cells").glob("*.json"))
    assert cells == ["fedavg-seed0-1x1.json", "fedavg_training.proximal_mu_0.5-seed0-1x1.json"]
    variant = json.loads((tmp_path / "out" / "cells" / cells[1]).read_text())
    assert variant["method"] == "fedavg@training.proximal_mu=0.5" and variant["note"].endswith("[training.proximal_mu=0.5]")


def test_a_model_variant_sets_entries_of_the_study_model_table(tmp_path: Path, toy_task: Task) -> None:
    from fedsilo.silo_agent.bench.methods import model_of, resolve
    from fedsilo.silo_agent.demo import DEMO_MODEL

    base, pn = resolve("fedavg"), resolve("fedavg@model.norm=pn")
    assert pn.name == "fedavg@model.norm=pn" and pn.strategy == base.strategy == "fedavg"
    assert pn.model == {"norm": "pn"} and base.model == {}
    assert (pn.training, pn.resfim, pn.privacy) == (base.training, base.resfim, base.privacy)
    assert pn.note.endswith("[model.norm=pn]")
    # the demo UNet of each seed, with the entry set; a registered method's table is the study's own
    assert model_of(pn, task="segmentation-2d", model=None, seed=3) == {**DEMO_MODEL, "seed": 3, "norm": "pn"}
    assert model_of(base, task="segmentation-2d", model=None, seed=3) == {**DEMO_MODEL, "seed": 3}
    study = {"channels": [4, 8], "strides": [2], "num_res_units": 0, "norm": "group"}
    assert model_of(pn, task="segmentation-2d", model=study, seed=3) == {**study, "norm": "pn"}
    both = resolve("fedavg@model.norm=pn&model.dropout=0.1&training.proximal_mu=0.05")
    assert both.model == {"norm": "pn", "dropout": 0.1} and both.training == {"proximal_mu": 0.05}
    # checked against the study's own table and Task: what one Task builds, another may not
    _cfg(tmp_path, methods=("fedavg", "fedavg@model.norm=pn"), model=study)
    with pytest.raises(BenchError, match=re.escape("fedavg@model.norm_groups=3: model.norm_groups=3 is not a model")):
        _cfg(tmp_path, methods=("fedavg@model.norm_groups=3",), model=study)  # 3 does not divide 4, 8
    with pytest.raises(BenchError, match=re.escape("model.norm=pn is not a model the study's Task builds: "
                                                   "ToyModelConfig: unknown key")):
        _cfg(tmp_path, task=toy_task.name, methods=("fedavg@model.norm=pn",))
    assert not (tmp_path / "out").exists()


def test_a_changed_variant_is_another_cell_and_a_collision_is_refused(tmp_path: Path) -> None:
    ids = {cell_id(m, 0, 1, 1) for m in ("fedavg", "fedavg@model.norm=pn", "fedavg@model.norm=group")}
    assert len(ids) == 3
    with pytest.raises(BenchError, match="would share cell files"):
        _cfg(tmp_path, methods=("fedavg@training.a_b=1", "fedavg@training.a=b_1"))


def test_a_lora_variant_that_changes_the_model_cannot_use_the_study_base(tmp_path: Path) -> None:
    base = tmp_path / "base.pt"
    base.write_bytes(b"a checkpoint of the study's model")
    with pytest.raises(BenchError, match="deer@model.norm=pn changes the model, but the given base"):
        _cfg(tmp_path, methods=("deer@model.norm=pn",), aggregation="he", base=base)
    _cfg(tmp_path, methods=("deer@model.norm=pn",), aggregation="he")  # the bench pretrains a base for it


def test_the_bench_pretrains_a_base_of_each_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A base loads only into the model it was made for: a variant's model gets a base file of its own,
    the study's default model keeps the name it always had."""
    from fedsilo.silo_agent import demo
    from fedsilo.silo_agent.bench.runner import _base_checkpoint

    made: list[tuple[str, dict]] = []

    def fake_make_base(path: Path, seed: int, model: dict | None = None) -> Path:
        made.append((Path(path).name, dict(model or {})))
        Path(path).write_bytes(b"base")
        return path

    monkeypatch.setattr(demo, "make_base", fake_make_base)
    cfg = _cfg(tmp_path, methods=("deer", "deer@model.norm=pn"), aggregation="he")
    default, pn = demo.model_table(None, 0), demo.model_table(None, 0, {"norm": "pn"})
    first, again = _base_checkpoint(cfg, 0, default), _base_checkpoint(cfg, 0, default)
    assert first == again and first.name == "base-seed0.pt"
    other = _base_checkpoint(cfg, 0, pn)
    assert other != first and re.fullmatch(r"base-seed0-[0-9a-f]{12}\.pt", other.name) and other.is_file()
    assert [model for _name, model in made] == [default, pn]  # each made once, for its own model


def test_cli_bench_pn_variant_is_a_row_of_its_own_run_on_its_model(tmp_path: Path, fedsilo_logger: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """FedAvg and FedAvg of the PN model (``fedavg@model.norm=pn``), 1 round x 1 seed x 2 silos: each
    cell's federation.toml holds its own [model] (and a pin of that model), both rows are reported, and
    running again resumes both cells."""
    import tomllib

    from fedsilo.silo_agent import demo
    from fedsilo.silo_agent.demo import DEMO_MODEL

    written: dict[str, dict] = {}
    real = demo.write_configs

    def spy(work: Path, **kw):
        fed, agents = real(work, **kw)
        written[work.name] = tomllib.loads(fed.read_text())
        return fed, agents

    monkeypatch.setattr(demo, "write_configs", spy)
    out = tmp_path / "pn"
    args = ["bench", "--methods", "fedavg,fedavg@model.norm=pn", "--rounds", "1", "--seeds", "1", "--sweep", "none",
            "--silos", "2", "--aggregation", "plain", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    plain, pn = cell_id("fedavg", 0, 1, 1), cell_id("fedavg@model.norm=pn", 0, 1, 1)
    assert set(written) == {plain, pn}
    assert written[plain]["model"] == {**DEMO_MODEL, "seed": 0}
    assert written[pn]["model"] == {**DEMO_MODEL, "seed": 0, "norm": "pn"}
    assert written[plain]["run"]["strategy"] == written[pn]["run"]["strategy"] == "fedavg"
    assert written[plain]["run"]["model_fingerprint"] != written[pn]["run"]["model_fingerprint"]
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert set(cells) == {plain, pn}
    assert cells[pn]["method"] == "fedavg@model.norm=pn" and cells[pn]["model"] is None  # the study's table
    assert cells[pn]["rounds_log"][0]["bytes_up"] > 0
    summary = (out / "summary.md").read_text()
    for method in ("fedavg", "fedavg@model.norm=pn"):
        assert re.search(rf"^\| {re.escape(method)} \|", summary, re.MULTILINE), summary
    assert "fedavg, fedavg@model.norm=pn: one model for both" in summary  # scored as FedAvg is
    with (out / "results.csv").open(newline="") as f:
        methods_in_csv = {row["method"] for row in csv.DictReader(f)}
    assert methods_in_csv == {"fedavg", "fedavg@model.norm=pn"}
    written.clear()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "resuming: 2 of 2" in _flat(result.output) and not written, result.output


# -- the LoRA methods' base ------------------------------------------------------------------------


def test_a_given_base_must_be_a_file_and_is_part_of_the_study(tmp_path: Path, toy_task: Task) -> None:
    with pytest.raises(BenchError, match="is not a checkpoint file"):
        _cfg(tmp_path, methods=("fedavg", "deer"), aggregation="he", base=tmp_path / "missing.pt")
    base = tmp_path / "base.pt"
    base.write_bytes(b"a checkpoint")  # the bench checks the file exists; the agents check what it holds
    assert _cfg(tmp_path).study()["base"] is None
    assert _cfg(tmp_path, base=base).study()["base"] == str(base.resolve())
    # with a base of its own, a LoRA method may run on another Task (the bench makes bases only for 2-D)
    assert _cfg(tmp_path, task=toy_task.name, methods=("fedavg", "deer"), aggregation="he", base=base)


def test_a_lora_cell_fine_tunes_the_given_base_and_a_study_without_it_is_another(tmp_path: Path,
                                                                                 fedsilo_logger: None) -> None:
    from fedsilo.silo_agent.bench.runner import run_study
    from fedsilo.silo_agent.demo import make_base

    base = make_base(tmp_path / "my-base.pt", 0)
    cfg = _cfg(tmp_path, methods=("deer",), aggregation="he", rounds=1, silos=2, base=base)
    run_study(cfg)
    out = tmp_path / "out"
    assert not (out / "bases").exists(), "no base of the bench's own was made"
    assert json.loads((out / "cells" / "deer-seed0-1x1.json").read_text())["base"] == str(base.resolve())
    loaded = [line for line in (out / "logs" / "bench.log").read_text().splitlines()
              if f"base model loaded from {base.resolve()}" in line]
    assert len(loaded) >= 2, "every agent fine-tunes the given base"
    with pytest.raises(BenchError, match="other study settings"):
        run_study(_cfg(tmp_path, methods=("deer",), aggregation="he", rounds=1, silos=2))


def test_cli_bench_all_combines_with_variants(tmp_path: Path) -> None:
    """'all' expands in place inside a list (each method once), so a study can add variants to every
    registered method; an unknown name beside it is still refused by name, before anything is written."""
    out = tmp_path / "study"
    result = CliRunner().invoke(main, ["bench", "--methods", "all,fedavg,bogus", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "unknown method 'bogus'" in result.output and "'all'" not in result.output
    assert not out.exists()
