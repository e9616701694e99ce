"""``fedsilo bench``'s report: validation-selected Dice, the derived measures by hand, the files, older cells
read alike, and a lower-is-better headline."""

from __future__ import annotations

import copy
import csv
import math
import re
from pathlib import Path

import pytest

from fedsilo.silo_agent.bench.cells import LEGACY_TASK, upgrade_cell, validate_cell
from fedsilo.silo_agent.bench.measures import (
    beats,
    bytes_to_95,
    compare_with,
    convergence_curve,
    group_means,
    mean_std,
    sample_std,
    select_rounds,
    summarize_cell,
    unseen_score,
    weighted_mean,
)
from fedsilo.silo_agent.bench.methods import ALONE, ONE_MODEL, PER_SILO, PERSONAL_THEN_CONSENSUS, scoring
from fedsilo.silo_agent.bench.report import csv_columns, format_vs_reference, render_summary, write_outputs

A, B = "hospital-a", "hospital-b"
SIZES = {A: 30, B: 10}
PNG = b"\x89PNG\r\n\x1a\n"
MINUS = "\u2212"
#: The columns of results.csv for 2-D segmentation: those every study before the Task seam wrote, and
#: vs_local_dice (the row's Dice minus local's on the same silo, seed and schedule).
CSV_COLUMNS = (
    "method", "seed", "rounds", "local_epochs", "main", "silo", "test_size", "selected_round",
    "dice", "hd95", "val_dice_at_selected", "cell_mean_dice", "cell_std_dice", "cell_worst_dice",
    "unseen_dice", "vs_local_dice", "bytes_total", "bytes_to_95", "epsilon", "seconds",
)
SEGMENTATION = {"task": "segmentation-2d", "model": None, "headline": "dice", "metric_names": ["dice", "hd95"],
                "lower_is_better": ["hd95"]}

# Three rounds of a 2-silo run. Test Dice peaks at round 2 for A and round 3 for B, but validation
# Dice peaks at round 3 for A and round 1 for B: those are the rounds reported.
# Validation values are dyadic so the weighted means tie exactly: round 1 (30*0.5 + 10*1.0)/40 =
# 0.625 = round 2 (0.625 everywhere) > round 3 (30*0.75 + 0)/40 = 0.5625. The unweighted mean
# would pick round 1 (0.75); the later of the tied rounds is round 2.
def _entry(bytes_up: int, bytes_down: int, dice: dict, hd95: dict, val_dice: dict, unseen: float | None) -> dict:
    """One round of a cell in the current format (the test values of each silo under ``metrics``)."""
    return {"bytes_up": bytes_up, "bytes_down": bytes_down,
            "metrics": {"dice": dice, "hd95": hd95, "val_dice": val_dice},
            "unseen": {} if unseen is None else {"dice": unseen}}


BASE_ROUNDS = [
    _entry(1_000_000, 3_000_000, {A: 0.40, B: 0.50}, {A: 20.0, B: 14.0}, {A: 0.5, B: 1.0}, 0.30),
    _entry(1_500_000, 3_500_000, {A: 0.80, B: 0.65}, {A: 8.0, B: 12.0}, {A: 0.625, B: 0.625}, 0.35),
    _entry(2_000_000, 4_000_000, {A: 0.70, B: 0.80}, {A: 10.0, B: 6.0}, {A: 0.75, B: 0.0}, 0.40),
]


def _cell(method: str, seed: int, offset: float = 0.0, *, epsilon: dict | None = None) -> dict:
    """The base run with every test Dice shifted by ``offset`` (validation unchanged)."""
    log = []
    for i, r in enumerate(BASE_ROUNDS, start=1):
        entry = copy.deepcopy(r)
        entry["round"] = i
        entry["metrics"]["dice"] = {s: round(v + offset, 6) for s, v in r["metrics"]["dice"].items()}
        log.append(entry)
    return {"method": method, "seed": seed, "rounds": 3, "local_epochs": 1, "main": True, **SEGMENTATION,
            "dp": epsilon is not None, "aggregation": "he", "silos": [A, B],
            "test_sizes": dict(SIZES), "rounds_log": log, "epsilon": epsilon,
            "seconds": 40.0 + seed, "note": f"{method} note"}


def _sweep_cell() -> dict:
    """fedavg, seed 0, one round of three local epochs (not the main schedule)."""
    return {"method": "fedavg", "seed": 0, "rounds": 1, "local_epochs": 3, "main": False, **SEGMENTATION,
            "dp": False, "aggregation": "he", "silos": [A, B], "test_sizes": dict(SIZES),
            "rounds_log": [{"round": 1, **_entry(100, 200, {A: 0.6, B: 0.4}, {A: 5.0, B: 7.0},
                                                 {A: 0.5, B: 0.5}, None)}],
            "epsilon": None, "seconds": 15.0, "note": "fedavg note"}


def _cells() -> list[dict]:
    return [
        _cell("fedavg", 0),
        _cell("fedavg", 1, 0.02),
        _cell("local", 0, -0.10, epsilon={A: 7.9, B: 8.1}),
        _cell("local", 1, -0.08, epsilon={A: 8.0, B: 8.3}),
        _sweep_cell(),
    ]


# ----------------------------------------------------------------------------- pure measures


def test_selection_uses_validation_not_test() -> None:
    cell = _cell("fedavg", 0)
    assert select_rounds(cell) == {A: 3, B: 1}  # test Dice would pick 2 and 3
    s = summarize_cell(cell)
    assert s.scores["dice"] == {A: pytest.approx(0.70), B: pytest.approx(0.50)}
    assert s.scores["hd95"] == {A: 10.0, B: 14.0}
    assert s.val_at_selected == {A: 0.75, B: 1.0}


def test_selection_ties_go_to_later_round_and_no_val_means_last_round() -> None:
    cell = _cell("fedavg", 0)
    cell["rounds_log"][1]["metrics"]["val_dice"] = {A: 0.75}  # A: rounds 2 and 3 tie at 0.75
    for entry in cell["rounds_log"]:
        entry["metrics"]["val_dice"].pop(B, None)  # B: no validation Dice at all
    assert select_rounds(cell) == {A: 3, B: 3}
    cell["rounds_log"][2]["metrics"]["val_dice"] = {A: 0.5}
    assert select_rounds(cell) == {A: 2, B: 3}
    s = summarize_cell(cell)
    assert s.val_at_selected == {A: 0.75, B: None}
    assert s.scores["dice"][B] == pytest.approx(0.80)


def test_cell_measures_by_hand() -> None:
    s = summarize_cell(_cell("fedavg", 0))
    # Dice 0.70 (A, 30 images) and 0.50 (B, 10 images)
    assert s.headline == "dice" and s.task == "segmentation-2d"
    assert s.mean == s.means["dice"] == pytest.approx((30 * 0.70 + 10 * 0.50) / 40)  # 0.65
    assert s.mean == pytest.approx(0.65)
    assert s.std == pytest.approx(math.sqrt(0.02))  # sample std of {0.7, 0.5}
    assert (s.worst, s.worst_silo) == (pytest.approx(0.50), B)
    assert s.means["hd95"] == pytest.approx((30 * 10.0 + 10 * 14.0) / 40)  # 11.0
    assert s.bytes_total == 15_000_000
    assert s.epsilon is None and s.epsilon_max is None
    assert s.curve == pytest.approx((0.425, 0.7625, 0.725))
    assert s.cumulative_bytes == (4_000_000, 9_000_000, 15_000_000)


def test_bytes_to_95_by_hand() -> None:
    cell = _cell("fedavg", 0)
    # curve 0.425, 0.7625, 0.725: target 0.95 * 0.725 = 0.68875, first reached at round 2
    assert bytes_to_95(cell) == 9_000_000
    # round 2 just below the target (weighted 0.68): only round 3 reaches it
    cell["rounds_log"][1]["metrics"]["dice"] = {A: 0.70, B: 0.62}
    assert convergence_curve(cell)[1] == pytest.approx(0.68)
    assert bytes_to_95(cell) == 15_000_000
    # round 1 already above 95% of the final round
    cell["rounds_log"][0]["metrics"]["dice"] = {A: 0.70, B: 0.70}
    assert bytes_to_95(cell) == 4_000_000
    # final mean Dice 0: the whole run's bytes
    cell["rounds_log"][2]["metrics"]["dice"] = {A: 0.0, B: 0.0}
    assert bytes_to_95(cell) == 15_000_000


def test_curve_uses_only_silos_present_in_the_round() -> None:
    cell = _cell("fedavg", 0)
    del cell["rounds_log"][0]["metrics"]["dice"][B]
    del cell["rounds_log"][0]["metrics"]["hd95"][B]
    assert convergence_curve(cell)[0] == pytest.approx(0.40)  # A alone
    # B's best validation round (1) has no test Dice: selection runs over rounds 2 and 3
    assert select_rounds(cell)[B] == 2


def test_unseen_picks_best_weighted_validation_round() -> None:
    cell = _cell("fedavg", 0)
    assert unseen_score(cell) == pytest.approx(0.35)  # round 2 (tie with round 1, later wins)
    assert unseen_score(cell, "dice") == pytest.approx(0.35)
    assert unseen_score(cell, "hd95") is None  # no round logged an unseen HD95
    cell["rounds_log"][1]["metrics"]["val_dice"] = {A: 0.5, B: 0.5}  # round 2 drops to 0.5: round 1 wins
    assert unseen_score(cell) == pytest.approx(0.30)
    cell["rounds_log"][0]["unseen"] = {}  # round 1 logged none: best of rounds 2, 3 is 3
    assert unseen_score(cell) == pytest.approx(0.40)
    for entry in cell["rounds_log"]:
        entry["unseen"] = {}
    assert unseen_score(cell) is None


def test_small_helpers() -> None:
    assert weighted_mean({A: 1.0, B: 0.0}, SIZES) == pytest.approx(0.75)
    assert math.isnan(weighted_mean({}, SIZES))
    assert sample_std([0.3]) == 0.0
    assert sample_std([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert mean_std([0.5]) == (0.5, None)
    assert mean_std([None, 0.5, 0.7]) == (pytest.approx(0.6), pytest.approx(math.sqrt(0.02)))
    assert mean_std([None]) == (None, None)
    assert format_vs_reference(0.0123) == "+0.012"
    assert format_vs_reference(-0.0341) == f"{MINUS}0.034 (loses)"
    assert format_vs_reference(None) == "\u2014"


# ----------------------------------------------------------------------------- validation


def test_missing_rounds_log_is_named(tmp_path: Path) -> None:
    cell = _cell("fedavg", 0)
    del cell["rounds_log"]
    with pytest.raises(ValueError, match="rounds_log"):
        validate_cell(cell)
    with pytest.raises(ValueError, match=r"cell 2 \('fedavg', seed 0\): missing key 'rounds_log'"):
        write_outputs([_cell("local", 0), _cell("local", 1), cell], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_finite_dice_is_named(tmp_path: Path) -> None:
    cell = _cell("fedavg", 0)
    cell["rounds_log"][1]["metrics"]["dice"][A] = float("nan")
    with pytest.raises(ValueError, match=r"round 2: 'dice'\['hospital-a'\] is nan"):
        validate_cell(cell)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="round 2"):
        write_outputs([cell], out)
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["rounds_log"][0].update(round=2), "expected 1"),
    (lambda c: c.update(rounds=4), "has 3 entries"),
    (lambda c: c["rounds_log"][2]["metrics"]["hd95"].pop(B), "'hd95' lacks 'hospital-b'"),
    (lambda c: c["rounds_log"][2]["metrics"].pop("val_dice"), "round 3: 'val_dice' must be a mapping"),
    (lambda c: c["rounds_log"][0]["metrics"].update(accuracy={}), "'metrics' names \\['accuracy'\\]"),
    (lambda c: c["rounds_log"][0].update(unseen={"dice": math.inf}), r"'unseen'\['dice'\] is inf"),
    (lambda c: c.update(headline="accuracy"), "'headline' 'accuracy' is not one of"),
    (lambda c: c.update(lower_is_better=["nll"]), "'lower_is_better'"),
    (lambda c: c["test_sizes"].pop(B), r"'test_sizes'\['hospital-b'\]"),
    (lambda c: c["rounds_log"][0].update(bytes_up=-1), "'bytes_up'"),
    (lambda c: c.update(epsilon={A: float("inf")}), "'epsilon'"),
])
def test_other_malformed_cells(mutate, message) -> None:
    cell = _cell("fedavg", 0)
    mutate(cell)
    with pytest.raises(ValueError, match=message):
        validate_cell(cell)


def test_duplicate_cells_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="same method, seed and schedule"):
        write_outputs([_cell("fedavg", 0), _cell("fedavg", 0)], tmp_path)


# ----------------------------------------------------------------------------- outputs


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}")[1].split("\n## ")[0]


def _row(section: str, method: str) -> list[str]:
    line = next(l for l in section.splitlines() if l.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_write_outputs(tmp_path: Path) -> None:
    paths = write_outputs(_cells(), tmp_path)
    names = ["results.csv", "summary.md", "dice_vs_rounds.png", "dice_vs_bytes.png",
             "per_silo.png", "sweep.png"]
    assert paths == [tmp_path / n for n in names]
    for p in paths[2:]:
        assert p.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temp files left

    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS == csv_columns("dice", ("dice", "hd95"))
    assert len(rows) == 10  # 4 main cells x 2 silos + the sweep cell x 2 silos
    row = next(r for r in rows if (r["method"], r["seed"], r["rounds"], r["silo"]) == ("fedavg", "0", "3", B))
    assert row["selected_round"] == "1" and row["main"] == "true" and row["test_size"] == "10"
    assert float(row["dice"]) == pytest.approx(0.50)
    assert float(row["hd95"]) == 14.0 and float(row["val_dice_at_selected"]) == 1.0
    assert float(row["cell_mean_dice"]) == pytest.approx(0.65)
    assert float(row["cell_worst_dice"]) == pytest.approx(0.50)
    assert float(row["unseen_dice"]) == pytest.approx(0.35)
    assert (row["bytes_total"], row["bytes_to_95"], row["epsilon"]) == ("15000000", "9000000", "")
    row = next(r for r in rows if (r["method"], r["seed"], r["silo"]) == ("local", "0", B))
    assert float(row["epsilon"]) == pytest.approx(8.1)
    assert float(row["dice"]) == pytest.approx(0.40)
    sweep = [r for r in rows if r["rounds"] == "1"]
    assert [(r["main"], r["local_epochs"], r["unseen_dice"]) for r in sweep] == [("false", "3", "")] * 2

    text = (tmp_path / "summary.md").read_text()
    assert "Seeds: 2 (0, 1)" in text and "validation Dice" in text
    assert "Task: segmentation-2d (headline metric: dice; metrics: dice, hd95)" in text
    main = _section(text, "Main results")
    fedavg, local = _row(main, "fedavg"), _row(main, "local")
    # fedavg: cell means 0.65 and 0.67; local: 0.55 and 0.57
    assert fedavg[1] == "0.660 ± 0.014" and local[1] == "0.560 ± 0.014"
    assert fedavg[3] == "0.510 ± 0.014 (hospital-b)"
    assert fedavg[4] == "11.0 ± 0.0" and fedavg[5] == "0.350 ± 0.000"
    assert fedavg[6] == "9.00 ± 0.00" and fedavg[7] == "15.00 ± 0.00"
    assert fedavg[8] == "\u2014" and local[8] == "8.20 ± 0.14"
    assert fedavg[9] == "40.5 ± 0.7"
    assert fedavg[10] == "\u2014" and "(loses)" not in " ".join(fedavg)
    assert local[10] == f"{MINUS}0.100 (loses)"
    assert _row(_section(text, "Dice per silo"), "fedavg")[1:3] == ["0.710 ± 0.014", "0.510 ± 0.014"]
    other = _row(_section(text, "Other metrics per silo"), "fedavg")  # HD95 per silo, at the same selected rounds
    for silo, cell in zip((A, B), other[2:4]):
        values = [float(r["hd95"]) for r in rows if (r["method"], r["main"], r["silo"]) == ("fedavg", "true", silo)]
        assert len(values) == 2 and cell.startswith(f"{sum(values) / 2:.3f} ± "), (silo, cell, values)
    assert "Dice" not in other[1]  # the headline has its own table
    comm = _section(text, "Communication frequency")
    assert "| Method | 3\u00d71 | 1\u00d73 |" in comm
    assert _row(comm, "fedavg")[1:] == ["0.660 ± 0.014", "0.550"]
    assert _row(comm, "local")[1:] == ["0.560 ± 0.014", "\u2014"]
    assert "- **local**: local note" in _section(text, "Methods")


def test_summary_against_another_reference() -> None:
    summaries = [summarize_cell(c) for c in _cells()]
    main = _section(render_summary(summaries, reference="local"), "Main results")
    assert _row(main, "fedavg")[10] == "+0.100"
    assert _row(main, "local")[10] == "\u2014"
    assert "(loses)" not in main
    absent = _section(render_summary(summaries, reference="fedprox"), "Main results")
    assert _row(absent, "local")[10] == "\u2014" and "no main cells" in absent


def test_a_method_run_without_dp_in_a_dp_study_is_marked_not_compared_as_equal() -> None:
    """In a --dp study a method that cannot run under DP (its cells: dp true, epsilon null) shows "no DP" for ε
    and beside its difference to the reference; DP methods show their ε."""
    dp = _cell("fedavg", 0, epsilon={A: 7.5, B: 8.0})
    nodp = {**_cell("ditto", 0, offset=0.1), "dp": True}
    main = _section(render_summary([summarize_cell(dp), summarize_cell(nodp)]), "Main results")
    assert _row(main, "fedavg")[8] == "8.00" and _row(main, "ditto")[8] == "no DP"
    assert _row(main, "ditto")[10] == "+0.100 (no DP)"
    plain = _section(render_summary([summarize_cell(_cell("fedavg", 0)), summarize_cell(_cell("ditto", 0, 0.1))]),
                     "Main results")
    assert _row(plain, "ditto")[8] == "\u2014" and _row(plain, "ditto")[10] == "+0.100"


# ----------------------------------------------------------------------------- other cell shapes and Tasks


def _legacy(cell: dict) -> dict:
    """``cell`` as bench wrote it before cells named their Task (per-round dice, hd95, val_dice, unseen_dice)."""
    old = {k: v for k, v in copy.deepcopy(cell).items() if k not in SEGMENTATION}
    for entry in old["rounds_log"]:
        metrics, unseen = entry.pop("metrics"), entry.pop("unseen")
        entry.update(metrics, unseen_dice=unseen.get("dice"))
    return old


def test_cells_written_before_the_task_seam_read_alike(tmp_path: Path) -> None:
    cells = _cells()
    legacy = [_legacy(c) for c in cells]
    assert "metrics" not in legacy[0]["rounds_log"][0] and "unseen_dice" in legacy[0]["rounds_log"][0]
    assert [upgrade_cell(c) for c in legacy] == cells
    assert upgrade_cell(cells[0]) is cells[0]  # a current cell is left as it is
    assert {k: LEGACY_TASK[k] for k in SEGMENTATION} == SEGMENTATION
    new, old = tmp_path / "new", tmp_path / "old"
    write_outputs(cells, new)
    write_outputs(legacy, old)
    for name in ("results.csv", "summary.md"):
        assert (old / name).read_text() == (new / name).read_text(), name
    broken = _legacy(_cell("fedavg", 0))
    del broken["rounds_log"][1]["hd95"]  # a missing key stays missing and is named
    with pytest.raises(ValueError, match="round 2: 'hd95' must be a mapping"):
        summarize_cell(broken)


def test_cells_of_two_tasks_are_not_one_study(tmp_path: Path) -> None:
    other = _cell("local", 0)
    other.update(task="segmentation-3d")
    with pytest.raises(ValueError, match=r"cell 1 \('local', seed 0\): task 'segmentation-3d'.*one study, one Task"):
        write_outputs([_cell("fedavg", 0), other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _loss_cell(method: str, losses: list[dict], val: list[dict], *, seed: int = 0) -> dict:
    """A cell of a Task whose only metric, ``loss``, is lower-is-better."""
    log = [{"round": i, "bytes_up": 10, "bytes_down": 10, "metrics": {"loss": t, "val_loss": v},
            "unseen": {"loss": 2.0 + i}} for i, (t, v) in enumerate(zip(losses, val), start=1)]
    return {"method": method, "seed": seed, "rounds": len(log), "local_epochs": 1, "main": True,
            "task": "toy-regression", "model": None, "headline": "loss", "metric_names": ["loss"],
            "lower_is_better": ["loss"], "dp": False, "aggregation": "plain", "silos": [A, B],
            "test_sizes": dict(SIZES), "rounds_log": log, "epsilon": None, "seconds": 1.0, "note": ""}


def test_a_lower_is_better_headline_selects_and_compares_the_lowest(tmp_path: Path) -> None:
    cell = _loss_cell("fedavg", [{A: 4.0, B: 2.0}, {A: 1.0, B: 3.0}, {A: 1.1, B: 2.0}],
                      [{A: 3.0, B: 1.0}, {A: 1.0, B: 1.0}, {A: 2.0, B: 5.0}])
    assert select_rounds(cell) == {A: 2, B: 2}  # the lowest validation loss; B's tie goes to the later round
    s = summarize_cell(cell)
    assert s.scores["loss"] == {A: 1.0, B: 3.0}
    assert (s.worst, s.worst_silo) == (3.0, B)  # the worst silo has the highest loss
    assert s.unseen == 4.0  # round 2: weighted mean validation loss 1.0 is the lowest
    # curve 3.5, 1.5, 1.325: within 5% of the final (<= 1.39125) first at round 3
    assert convergence_curve(cell) == pytest.approx([3.5, 1.5, 1.325])
    assert bytes_to_95(cell) == 60
    assert format_vs_reference(0.2, higher_is_better=False) == "+0.200 (loses)"
    assert format_vs_reference(-0.2, higher_is_better=False) == f"{MINUS}0.200"
    better = _loss_cell("ditto", [{A: 0.5, B: 0.5}] * 3, [{A: 0.5, B: 0.5}] * 3)
    paths = write_outputs([cell, better], tmp_path)
    assert [p.name for p in paths[2:]] == ["loss_vs_rounds.png", "loss_vs_bytes.png", "per_silo.png", "sweep.png"]
    text = (tmp_path / "summary.md").read_text()
    assert "validation loss was lowest" in text and "comes within 5% of" in text
    main = _section(text, "Main results")
    assert "| Method | loss (weighted mean) | Std across silos | Worst silo | Unseen loss |" in main
    assert _row(main, "ditto")[-1] == f"{MINUS}1.000" and "(loses)" not in main
    assert _row(_section(text, "loss per silo"), "fedavg")[1:] == ["1.000", "3.000"]
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header.split(",")[8:13] == ["loss", "val_loss_at_selected", "cell_mean_loss", "cell_std_loss",
                                       "cell_worst_loss"]
    assert "dice" not in text.lower() and "dice" not in header


# ----------------------------------------------------------------------------- against local, silo by silo


def _final_cell(method: str, seed: int, dice: dict, unseen: float) -> dict:
    """A one-round cell whose test Dice per silo is ``dice`` (the round every silo selects)."""
    log = [{"round": 1, **_entry(10, 20, dict(dice), {A: 5.0, B: 5.0}, {A: 0.5, B: 0.5}, unseen)}]
    return {"method": method, "seed": seed, "rounds": 1, "local_epochs": 1, "main": True, **SEGMENTATION,
            "dp": False, "aggregation": "he", "silos": [A, B], "test_sizes": dict(SIZES), "rounds_log": log,
            "epsilon": None, "seconds": 1.0, "note": f"{method} note"}


#: local, and three methods against it. ditto: A +0.05 / +0.02, B -0.05 / -0.04 (seeds 0 / 1);
#: fedavg: seed 0 only pairs (its seed 2 has no local cell), A ties, B +0.0004 (0.000 as printed);
#: pfa: ahead on both silos.
VERSUS = [
    _final_cell("local", 0, {A: 0.80, B: 0.60}, 0.50),
    _final_cell("local", 1, {A: 0.70, B: 0.70}, 0.40),
    _final_cell("ditto", 0, {A: 0.85, B: 0.55}, 0.60),
    _final_cell("ditto", 1, {A: 0.72, B: 0.66}, 0.45),
    _final_cell("fedavg", 0, {A: 0.80, B: 0.6004}, 0.55),
    _final_cell("fedavg", 2, {A: 0.99, B: 0.99}, 0.99),
    _final_cell("pfa", 0, {A: 0.81, B: 0.61}, 0.50),
]


def test_vs_local_by_hand(tmp_path: Path) -> None:
    versus = compare_with([summarize_cell(c) for c in VERSUS], "local")
    assert list(versus) == ["ditto", "fedavg", "pfa"]
    ditto = versus["ditto"]
    assert ditto.seeds == (0, 1) and ditto.silos == (A, B)
    assert ditto.per_silo[A] == pytest.approx([0.05, 0.02]) and ditto.per_silo[B] == pytest.approx([-0.05, -0.04])
    assert ditto.mean(A) == pytest.approx(0.035) and ditto.mean(B) == pytest.approx(-0.045)
    # weighted by test images (A 30, B 10): seed 0 (1.5 - 0.5) / 40 = 0.025, seed 1 (0.6 - 0.4) / 40 = 0.005
    assert ditto.weighted == pytest.approx([0.025, 0.005])
    assert ditto.unseen == pytest.approx([0.10, 0.05])
    assert ditto.beaten_silos == (A,) and ditto.beats_count == 1
    fedavg = versus["fedavg"]
    assert fedavg.seeds == (0,) and fedavg.beats_count == 0  # a tie, and +0.0004 that prints as +0.000
    assert versus["pfa"].beaten_silos == (A, B)

    write_outputs(VERSUS, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    main = _section(text, "Main results")
    assert "| s/run | vs fedavg | vs local | Beats local | Unseen vs local |" in main
    assert _row(main, "ditto")[11:] == ["+0.015 ± 0.014", "1/2 (hospital-a)", "+0.075 ± 0.035"]
    assert _row(main, "fedavg")[11:] == ["+0.000", "0/2", "+0.050"]
    assert _row(main, "pfa")[12] == "2/2 (hospital-a, hospital-b)"
    assert _row(main, "local")[11:] == ["\u2014"] * 3
    per_silo = _section(text, "Dice per silo")
    assert "| Method | hospital-a | hospital-b | hospital-a vs local | hospital-b vs local | Beats local |" in per_silo
    assert _row(per_silo, "ditto")[3:] == ["+0.035 ± 0.021", f"{MINUS}0.045 ± 0.007", "1/2 (hospital-a)"]
    assert _row(per_silo, "fedavg")[3:] == ["+0.000", "+0.000", "0/2"]
    with open(tmp_path / "results.csv", newline="") as f:
        rows = {(r["method"], r["seed"], r["silo"]): r["vs_local_dice"] for r in csv.DictReader(f)}
    assert float(rows["ditto", "1", B]) == pytest.approx(-0.04)
    assert rows["local", "0", A] == "" and rows["fedavg", "2", A] == ""  # the reference itself; no local cell of seed 2


def test_without_local_the_columns_are_left_out_and_the_summary_says_so() -> None:
    text = render_summary([summarize_cell(c) for c in VERSUS if c["method"] != "local"])
    assert "vs local" not in _section(text, "Main results").splitlines()[2]
    assert "Beats local" not in text and "'local' (each silo training alone) has no main cells" in text
    assert compare_with([summarize_cell(c) for c in VERSUS if c["method"] != "local"], "local") == {}


def test_beats_rounds_as_printed_and_follows_the_headline_direction() -> None:
    assert beats(0.0006) and not beats(0.0004) and not beats(0.0) and not beats(None)
    assert beats(-0.2, higher_is_better=False) and not beats(0.2, higher_is_better=False)
    assert beats(0.06, decimals=1) and not beats(0.04, decimals=1)


def test_the_notes_say_which_model_scores_each_figure_from_the_registry() -> None:
    assert scoring("fedavg", task="segmentation-2d") == ONE_MODEL
    assert scoring("ditto", task="segmentation-2d") == scoring("fedavg-ft", task="segmentation-2d") == \
        PERSONAL_THEN_CONSENSUS
    assert scoring("fedbn", task="segmentation-2d") == scoring("pfa", task="segmentation-2d") == PER_SILO
    # they reshape the aggregate, but every silo applies it alike (Strategy.consensus_aggregate)
    assert {scoring(m, task="segmentation-2d") for m in ("fednova", "fedlws", "fedawa")} == {ONE_MODEL}
    assert scoring("local", task="segmentation-2d") == ALONE
    assert scoring("no-such-method", task="segmentation-2d") is None
    text = render_summary([summarize_cell(c) for c in VERSUS])
    notes = _section(text, "Main results").split("Notes:")[1]
    assert "  - fedavg: one model for both: the personal model is the consensus (global) model" in notes
    assert ("  - ditto: each silo's personal model on its own test set, the consensus (global) model on the unseen "
            "domain.") in notes
    assert "  - pfa: each silo's own model after the last aggregate" in notes
    assert "  - local: each silo's own model, trained alone" in notes


# ----------------------------------------------------------------------------- per silo group

H1, H2, S1 = "farm-1", "farm-2", "farm-3"
GROUPS = {H1: "horse", H2: "horse", S1: "sheep"}
SENSOR = {"task": "sensor-activity", "model": None, "headline": "accuracy", "metric_names": ["accuracy", "macro_f1"],
          "lower_is_better": []}


def _grouped_cell(method: str, seed: int, accuracy: tuple[float, ...], macro_f1: tuple[float, ...], *,
                  groups: dict | None = GROUPS) -> dict:
    """Two rounds of a three-silo sensor run: validation peaks in round 1 (every test value 0.5), the
    final round holds ``accuracy`` and ``macro_f1`` of (H1, H2, S1)."""
    silos = [H1, H2, S1]

    def entry(rnd: int, acc: tuple, f1: tuple, val: float) -> dict:
        return {"round": rnd, "bytes_up": 0, "bytes_down": 0, "unseen": {},
                "metrics": {"accuracy": dict(zip(silos, acc)), "macro_f1": dict(zip(silos, f1)),
                            "val_accuracy": dict.fromkeys(silos, val)}}

    cell = {"method": method, "seed": seed, "rounds": 2, "local_epochs": 1, "main": True, **SENSOR, "dp": False,
            "aggregation": "he", "silos": silos, "test_sizes": dict.fromkeys(silos, 20),
            "rounds_log": [entry(1, (0.5,) * 3, (0.5,) * 3, 1.0), entry(2, accuracy, macro_f1, 0.0)],
            "epsilon": None, "seconds": 1.0, "note": f"{method} note"}
    if groups is not None:
        cell["groups"] = dict(groups)
    return cell


GROUPED = [
    _grouped_cell("one-for-one", 0, (0.80, 0.60, 0.90), (0.70, 0.50, 0.80)),
    _grouped_cell("one-for-one", 1, (0.70, 0.70, 0.90), (0.60, 0.60, 0.80)),
    _grouped_cell("cksp", 0, (0.90, 0.70, 0.80), (0.80, 0.60, 0.85)),
    _grouped_cell("cksp", 1, (0.80, 0.80, 0.95), (0.70, 0.70, 0.75)),
]


def test_the_per_group_table_by_hand(tmp_path: Path) -> None:
    """Group means at the final round (not the validation-selected round 1, whose values are all 0.5),
    mean ± sample std over seeds, paired differences to one-for-one and the seeds ahead of it."""
    summaries = [summarize_cell(c) for c in GROUPED]
    assert summaries[2].final["accuracy"] == {H1: 0.90, H2: 0.70, S1: 0.80}
    assert group_means(summaries[2]) == {"horse": {"accuracy": pytest.approx(0.80), "macro_f1": pytest.approx(0.70)},
                                         "sheep": {"accuracy": 0.80, "macro_f1": 0.85}}
    section = _section(render_summary(summaries), "Per silo group (sensor-activity)")
    rows = [line for line in section.splitlines() if line.startswith("| horse") or line.startswith("| sheep")]
    assert rows == [
        "| horse | one-for-one | 0.700 ± 0.000 | 0.600 ± 0.000 | — | — | — |",
        "| horse | cksp | 0.800 ± 0.000 | 0.700 ± 0.000 | +0.100 ± 0.000 | +0.100 ± 0.000 | accuracy 2/2, macro_f1 2/2 |",
        "| sheep | one-for-one | 0.900 ± 0.000 | 0.800 ± 0.000 | — | — | — |",
        f"| sheep | cksp | 0.875 ± 0.106 | 0.800 ± 0.071 | {MINUS}0.025 ± 0.106 | +0.000 ± 0.071 | "
        "accuracy 1/2, macro_f1 1/2 |",
    ]
    assert "- horse: in accuracy: cksp; in macro_f1: cksp." in section
    assert "- sheep: in accuracy: no method; in macro_f1: no method." in section
    write_outputs(GROUPED, tmp_path)
    with (tmp_path / "results.csv").open() as f:
        rows_csv = list(csv.DictReader(f))
    assert [r["group"] for r in rows_csv[:3]] == ["horse", "horse", "sheep"]


def test_cells_without_groups_have_no_group_table_and_still_load() -> None:
    old = [_grouped_cell(c["method"], c["seed"], (0.8, 0.8, 0.8), (0.7, 0.7, 0.7), groups=None) for c in GROUPED]
    assert upgrade_cell(old[0]) is old[0]
    summaries = [summarize_cell(c) for c in old]
    assert summaries[0].groups is None and group_means(summaries[0]) == {}
    text = render_summary(summaries)
    assert "Per silo group" not in text
    assert "Per silo group" not in render_summary([summarize_cell(c) for c in _cells()])
    mixed = render_summary([summarize_cell(c) for c in (*old[:2], *GROUPED[2:])])  # one-for-one without groups
    assert "| horse | cksp | 0.800 ± 0.000 |" in mixed and "'one-for-one' has no main cells with groups" in mixed


@pytest.mark.parametrize(("groups", "fragment"), [
    ({H1: "horse", H2: "horse"}, "'groups' must map each silo"),
    ({H1: "horse", H2: "horse", S1: ""}, "'groups'['farm-3'] must be a non-empty string"),
    (["horse"], "'groups' must map each silo"),
])
def test_bad_groups_are_named(groups: object, fragment: str) -> None:
    cell = _grouped_cell("cksp", 0, (0.8, 0.8, 0.8), (0.7, 0.7, 0.7))
    cell["groups"] = groups
    with pytest.raises(ValueError, match=re.escape(fragment)):
        validate_cell(cell)
