"""``fedsilo bench``'s detail metrics (per-class F1): kept per round, validated, and the summary's per-class table."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest

from fedsilo.models.tasks import get_task
from fedsilo.silo_agent.bench.cells import validate_cell
from fedsilo.silo_agent.bench.measures import summarize_cell
from fedsilo.silo_agent.bench.reference import round_entry
from fedsilo.silo_agent.bench.report import detail_label, render_summary, write_outputs

A, B = "hospital-a", "hospital-b"
CLASSIFY = {"task": "classification-2d", "model": None, "headline": "accuracy",
            "metric_names": ["accuracy", "macro_f1"], "lower_is_better": []}


def test_round_entry_keeps_the_test_details_apart_from_the_metrics() -> None:
    reports = {
        A: {"accuracy": (0.5, 4), "macro_f1": (0.4, 4), "f1_class_0": (0.8, 2), "f1_class_3": (0.0, 0),
            "val_accuracy": (0.6, 5), "train_loss": (0.7, 20), "unseen_accuracy": (0.3, 4),
            "unseen_macro_f1": (0.2, 4), "unseen_f1_class_0": (0.1, 4)},
        B: {"accuracy": (0.75, 4), "macro_f1": (0.7, 4), "f1_class_0": (0.6, 1), "val_accuracy": (0.5, 5)},
    }
    rec = round_entry(2, reports, task=get_task("classify"), bytes_up=3, bytes_down=4)
    assert rec["details"] == {"f1_class_0": {A: 0.8, B: 0.6}, "f1_class_3": {A: 0.0}}
    assert set(rec["metrics"]) == {"accuracy", "macro_f1", "val_accuracy"}
    assert rec["unseen"] == {"accuracy": 0.3, "macro_f1": 0.2}
    segmentation = round_entry(1, {A: {"dice": (0.5, 2), "hd95": (3.0, 2)}}, task=get_task("segmentation-2d"))
    assert segmentation["details"] == {}


def _cell(method: str, seed: int, final: dict | None) -> dict:
    """Two rounds of a two-silo classification run: validation peaks in round 1 (every test value 0.5,
    every detail 0.0), the final round holds the details ``final`` (None: no details recorded at all)."""
    def entry(rnd: int, val: float, details: dict | None) -> dict:
        e = {"round": rnd, "bytes_up": 0, "bytes_down": 0, "unseen": {},
             "metrics": {"accuracy": {A: 0.5, B: 0.5}, "macro_f1": {A: 0.5, B: 0.5},
                         "val_accuracy": {A: val, B: val}}}
        if details is not None:
            e["details"] = details
        return e

    first = None if final is None else {name: dict.fromkeys(values, 0.0) for name, values in final.items()}
    return {"method": method, "seed": seed, "rounds": 2, "local_epochs": 1, "main": True, **CLASSIFY, "dp": False,
            "aggregation": "he", "silos": [A, B], "test_sizes": {A: 20, B: 20},
            "rounds_log": [entry(1, 1.0, first), entry(2, 0.0, final)],
            "epsilon": None, "seconds": 1.0, "note": f"{method} note"}


CELLS = [
    _cell("fedavg", 0, {"f1_class_0": {A: 0.8, B: 0.6}, "f1_class_3": {A: 0.5}}),
    _cell("fedavg", 1, {"f1_class_0": {A: 0.9, B: 0.7}, "f1_class_3": {A: 0.7, B: 0.5}}),
    _cell("local", 0, {"f1_class_0": {A: 0.4, B: 0.4}, "f1_class_10": {B: 0.2}}),
    _cell("local", 1, {"f1_class_0": {A: 0.6, B: 0.6}}),
]


def test_the_per_class_table_by_hand(tmp_path: Path) -> None:
    """Final-round details (not the validation-selected round 1's zeros), the mean over the silos that
    report each, then mean ± sample std over seeds; rows by index and labelled with the built-in classes."""
    summaries = [summarize_cell(c) for c in CELLS]
    assert summaries[0].details == {"f1_class_0": {A: 0.8, B: 0.6}, "f1_class_3": {A: 0.5}}
    assert summaries[0].selected_round == {A: 1, B: 1}
    text = render_summary(summaries)
    section = text.split("## Per class (classification-2d)")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows == [
        "| Metric | fedavg | local |",
        "| f1_class_0 (normal tissue) | 0.750 ± 0.071 | 0.500 ± 0.141 |",
        "| f1_class_3 (malignant tumour) | 0.550 ± 0.071 | — |",
        "| f1_class_10 | — | 0.200 |",
    ]
    main = text.split("## Main results")[1].split("\n## ")[0]
    assert "f1_class" not in main
    write_outputs(CELLS, tmp_path)
    with (tmp_path / "results.csv").open() as f:
        assert not any("f1_class" in column for column in next(csv.reader(f)))
    assert "## Per class" in (tmp_path / "summary.md").read_text()


def test_detail_labels_name_the_class_where_the_index_has_one() -> None:
    assert detail_label("f1_class_1", ("cat", "dog")) == "f1_class_1 (dog)"
    assert detail_label("f1_class_2", ("cat", "dog")) == "f1_class_2"
    assert detail_label("f1_class_1", ()) == "f1_class_1"
    assert detail_label("recall", ("cat",)) == "recall"


def test_a_study_model_with_its_own_classes_labels_the_rows_with_them() -> None:
    cell = _cell("fedavg", 0, {"f1_class_1": {A: 0.5}})
    cell["model"] = {"seed": 0, "class_names": ["cat", "dog", "eel"]}
    assert "| f1_class_1 (dog) | 0.500 |" in render_summary([summarize_cell(cell)])


def test_cells_without_details_still_load_and_report_no_per_class_table() -> None:
    old = [_cell(c["method"], c["seed"], None) for c in CELLS]
    summaries = [summarize_cell(c) for c in old]
    assert all(s.details == {} for s in summaries)
    assert "## Per class" not in render_summary(summaries)
    mixed = render_summary([summarize_cell(c) for c in (*old[:2], *CELLS[2:])])  # fedavg without details
    assert "| Metric | local |" in mixed and "| f1_class_0 (normal tissue) | 0.500 ± 0.141 |" in mixed


@pytest.mark.parametrize(("details", "fragment"), [
    ([1], "'details' must be a mapping"),
    ({"accuracy": {A: 0.5}}, "one of the cell's metrics"),
    ({"f1_class_0": 0.5}, "'details'['f1_class_0'] must be a mapping"),
    ({"f1_class_0": {"nowhere": 0.5}}, "names 'nowhere', which is not in 'silos'"),
    ({"f1_class_0": {A: float("nan")}}, "not a finite number"),
])
def test_bad_details_are_named(details: object, fragment: str) -> None:
    cell = copy.deepcopy(CELLS[0])
    cell["rounds_log"][1]["details"] = details
    with pytest.raises(ValueError, match=r"round 2: .*") as info:
        validate_cell(cell)
    assert fragment in str(info.value)
