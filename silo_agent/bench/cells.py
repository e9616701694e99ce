"""The bench cell format: one finished run as stored in ``OUT/cells/*.json``, its checks, and the upgrade of older cells.

A cell names its Task and the Task's metrics, so the report needs neither the Task's code nor
any knowledge of what is learned::

    {"method": "fedavg", "seed": 0, "rounds": 10, "local_epochs": 1, "main": true,
     "task": "segmentation-2d", "model": null,            # the study's settings (see BenchConfig.study)
     "aggregation": "he", "dp": false, "data": "builtin", "held_out": null, "mu": 0.01,
     "headline": "dice", "metric_names": ["dice", "hd95"], "lower_is_better": ["hd95"],
     "silos": [...], "groups": {silo: group},             # groups: only for a Task with silo groups
     "test_sizes": {silo: examples}, "epsilon": null | {silo: ε},
     "seconds": 19.6, "note": "...",
     "rounds_log": [{"round": 1, "bytes_up": 96321, "bytes_down": 188829,
                     "metrics": {"dice": {silo: v}, "hd95": {silo: v}, "val_dice": {silo: v}},
                     "unseen": {"dice": v, "hd95": v},
                     "details": {"f1_class_3": {silo: v}}}, ...]}   # details: optional

``metrics`` holds, per silo, every test metric under its name and the validation headline as
``val_<headline>`` (the names :meth:`fedsilo.models.tasks.Task.evaluate_split` reports);
``unseen`` holds each unseen-domain metric averaged over the silos that report one (``{}``: none).
``details`` (optional) holds, per silo, the test detail metrics of a Task with
``detail_prefixes`` (:meth:`fedsilo.models.tasks.Task.is_detail`, e.g. per-class F1), only where
the silo's test data defines them; a round without it (cells written before details were
recorded) has none.
``groups`` (optional) names each silo's group where the Task has groups
(:meth:`fedsilo.models.tasks.Task.group_of`, e.g. the sensor Task's species); a cell without it
(every cell of a Task without groups, and cells written before groups were recorded) has no
per-group figures.
Cells written before the Task seam (per-round ``dice``, ``hd95``, ``val_dice``, ``unseen_dice``
keys; always 2-D segmentation) are read through :func:`upgrade_cell`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsilo.models.tasks import Task

__all__ = ["LEGACY_TASK", "CellMetrics", "cell_metrics", "task_fields", "upgrade_cell", "validate_cell"]

#: The Task fields of every cell written before cells named their Task (2-D segmentation).
LEGACY_TASK: dict[str, Any] = {"task": "segmentation-2d", "model": None, "headline": "dice",
                               "metric_names": ["dice", "hd95"], "lower_is_better": ["hd95"]}
_LEGACY_ROUND_KEYS = ("dice", "hd95", "val_dice", "unseen_dice")
_CELL_KEYS = ("method", "seed", "rounds", "local_epochs", "main", "task", "headline", "metric_names",
              "lower_is_better", "silos", "test_sizes", "rounds_log", "epsilon", "seconds", "note")


@dataclass(frozen=True)
class CellMetrics:
    """What a cell's Task measures: its metric names, the headline and which are lower-is-better.

    Attributes:
        headline: The metric reports, plots and model selection name.
        metric_names: Every test metric, in the Task's order.
        lower_is_better: The metrics where smaller is better.
    """

    headline: str
    metric_names: tuple[str, ...]
    lower_is_better: frozenset[str]

    @property
    def val_name(self) -> str:
        """The validation headline's report name (``val_<headline>``)."""
        return f"val_{self.headline}"

    def higher_is_better(self, metric: str) -> bool:
        """Whether larger values of ``metric`` (one of :attr:`metric_names`) are better."""
        return metric not in self.lower_is_better


def task_fields(task: Task) -> dict[str, Any]:
    """The fields a cell stores about its Task's metrics (``headline``, ``metric_names``, ``lower_is_better``)."""
    return {"headline": task.headline_metric, "metric_names": list(task.metric_names),
            "lower_is_better": sorted(task.lower_is_better)}


def cell_metrics(cell: Mapping[str, Any]) -> CellMetrics:
    """The metrics of a cell in the current format (see :func:`validate_cell`)."""
    return CellMetrics(headline=cell["headline"], metric_names=tuple(cell["metric_names"]),
                       lower_is_better=frozenset(cell["lower_is_better"]))


def upgrade_cell(cell: Any) -> Any:
    """A cell in the current format: cells written before the Task seam are converted, others returned as they are.

    An old cell (no ``headline``; per-round ``dice``, ``hd95``, ``val_dice`` and ``unseen_dice``)
    becomes a 2-D segmentation cell (:data:`LEGACY_TASK`) whose rounds hold the same numbers under
    ``metrics`` and ``unseen``. Missing keys stay missing, so :func:`validate_cell` still names them.

    Args:
        cell: A cell as loaded from JSON (anything else is returned unchanged).

    Returns:
        The cell in the current format (a new mapping when converted).
    """
    if not isinstance(cell, Mapping) or "headline" in cell:
        return cell
    log = cell.get("rounds_log")
    if not isinstance(log, Sequence) or isinstance(log, str) or not any(
            isinstance(e, Mapping) and any(k in e for k in _LEGACY_ROUND_KEYS) for e in log):
        return cell
    out = {**{k: v for k, v in LEGACY_TASK.items() if k not in cell}, **cell}
    rounds = []
    for entry in log:
        if not isinstance(entry, Mapping):
            rounds.append(entry)
            continue
        new = {k: v for k, v in entry.items() if k not in _LEGACY_ROUND_KEYS}
        new["metrics"] = {k: entry[k] for k in ("dice", "hd95", "val_dice") if k in entry}
        if "unseen_dice" in entry:
            new["unseen"] = {} if entry["unseen_dice"] is None else {"dice": entry["unseen_dice"]}
        rounds.append(new)
    out["rounds_log"] = rounds
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _names_list(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str)
            and all(isinstance(s, str) and s for s in value) and len(set(value)) == len(value))


def _label(cell: Any, index: int | None) -> str:
    where = "cell" if index is None else f"cell {index}"
    if isinstance(cell, Mapping):
        parts = [f"{cell[k]!r}" if k == "method" else f"{k} {cell[k]!r}" for k in ("method", "seed") if k in cell]
        if parts:
            where += f" ({', '.join(parts)})"
    return where


def validate_cell(cell: Mapping[str, Any], *, index: int | None = None) -> None:
    """Checks that ``cell`` (in the current format) holds every key the report reads, with sane values.

    The Task fields are consistent (the headline is one of ``metric_names``, ``lower_is_better``
    a subset); every listed silo has a positive test size and a test headline value in at least
    one round; a silo with a test headline value in a round has every other test metric there
    too; every metric value and ε is finite (ε non-negative); bytes are non-negative integers;
    and ``rounds_log`` holds rounds 1..``rounds`` in order. ``groups``, where present, maps every
    listed silo (and nothing else) to a non-empty group name; a round's ``details``, where present,
    maps names other than the metrics' to listed silos' finite values.

    Args:
        cell: One finished run, as loaded from JSON (see :func:`upgrade_cell` for older ones).
        index: The cell's position in its list, for the error message.

    Raises:
        ValueError: naming the cell and the bad key (and round and silo where it applies).
    """
    where = _label(cell, index)

    def fail(msg: str) -> None:
        raise ValueError(f"{where}: {msg}")

    if not isinstance(cell, Mapping):
        fail(f"is a {type(cell).__name__}, not a mapping")
    for key in _CELL_KEYS:
        if key not in cell:
            fail(f"missing key {key!r}")
    for key in ("method", "task", "headline"):
        if not isinstance(cell[key], str) or not cell[key]:
            fail(f"{key!r} must be a non-empty string, not {cell[key]!r}")
    if not _is_int(cell["seed"]):
        fail(f"'seed' must be an integer, not {cell['seed']!r}")
    for key in ("rounds", "local_epochs"):
        if not _is_int(cell[key]) or cell[key] < 1:
            fail(f"{key!r} must be a positive integer, not {cell[key]!r}")
    if not isinstance(cell["main"], bool):
        fail(f"'main' must be true or false, not {cell['main']!r}")
    names = cell["metric_names"]
    if not _names_list(names) or not names:
        fail(f"'metric_names' must be a non-empty list of distinct metric names, not {names!r}")
    if cell["headline"] not in names:
        fail(f"'headline' {cell['headline']!r} is not one of 'metric_names' {list(names)}")
    if not _names_list(cell["lower_is_better"]) or not set(cell["lower_is_better"]) <= set(names):
        fail(f"'lower_is_better' must list metrics of 'metric_names', not {cell['lower_is_better']!r}")
    silos = cell["silos"]
    if not _names_list(silos) or not silos:
        fail(f"'silos' must be a non-empty list of distinct silo names, not {silos!r}")
    sizes = cell["test_sizes"]
    if not isinstance(sizes, Mapping):
        fail("'test_sizes' must be a mapping of silo -> test examples")
    for silo in silos:
        if not _is_int(sizes.get(silo)) or sizes[silo] < 1:
            fail(f"'test_sizes'[{silo!r}] must be a positive integer, not {sizes.get(silo)!r}")
    if not isinstance(cell["note"], str):
        fail(f"'note' must be a string, not {cell['note']!r}")
    if not _is_number(cell["seconds"]) or cell["seconds"] < 0:
        fail(f"'seconds' must be a finite non-negative number, not {cell['seconds']!r}")
    groups = cell.get("groups")
    if groups is not None:
        if not isinstance(groups, Mapping) or set(groups) != set(silos):
            fail(f"'groups' must map each silo of 'silos' to its group, not {groups!r}")
        for silo, group in groups.items():
            if not isinstance(group, str) or not group:
                fail(f"'groups'[{silo!r}] must be a non-empty string, not {group!r}")
    eps = cell["epsilon"]
    if eps is not None:
        if not isinstance(eps, Mapping):
            fail("'epsilon' must be null or a mapping of silo -> ε")
        for silo, value in eps.items():
            if silo not in silos:
                fail(f"'epsilon' names {silo!r}, which is not in 'silos'")
            if not _is_number(value) or value < 0:
                fail(f"'epsilon'[{silo!r}] must be a finite non-negative number, not {value!r}")
    _validate_rounds(cell, fail)


def _validate_rounds(cell: Mapping[str, Any], fail: Any) -> None:
    """The ``rounds_log`` part of :func:`validate_cell`."""
    m = cell_metrics(cell)
    silos = cell["silos"]
    log = cell["rounds_log"]
    if not isinstance(log, Sequence) or isinstance(log, str):
        fail("'rounds_log' must be a list of round entries")
    if len(log) != cell["rounds"]:
        fail(f"'rounds_log' has {len(log)} entries but 'rounds' is {cell['rounds']}")
    keys = (*m.metric_names, m.val_name)
    seen: set[str] = set()
    for i, entry in enumerate(log, start=1):
        if not isinstance(entry, Mapping):
            fail(f"'rounds_log' entry {i} is not a mapping")
        for key in ("round", "bytes_up", "bytes_down", "metrics", "unseen"):
            if key not in entry:
                fail(f"'rounds_log' entry {i} misses key {key!r}")
        if not _is_int(entry["round"]) or entry["round"] != i:
            fail(f"'rounds_log' entry {i} has 'round' {entry['round']!r}; expected {i} (rounds 1.., in order)")
        for key in ("bytes_up", "bytes_down"):
            if not _is_int(entry[key]) or entry[key] < 0:
                fail(f"round {i}: {key!r} must be a non-negative integer, not {entry[key]!r}")
        metrics = entry["metrics"]
        if not isinstance(metrics, Mapping):
            fail(f"round {i}: 'metrics' must be a mapping of metric -> silo -> value")
        unknown = sorted(set(metrics) - set(keys))
        if unknown:
            fail(f"round {i}: 'metrics' names {unknown}, which the cell's metrics {list(keys)} do not")
        for key in keys:
            values = metrics.get(key)
            if not isinstance(values, Mapping):
                fail(f"round {i}: {key!r} must be a mapping of silo -> value, not {values!r}")
            for silo, value in values.items():
                if silo not in silos:
                    fail(f"round {i}: {key!r} names {silo!r}, which is not in 'silos'")
                if not _is_number(value):
                    fail(f"round {i}: {key!r}[{silo!r}] is {value!r}, not a finite number")
        for name in m.metric_names:
            for silo in metrics[m.headline]:
                if silo not in metrics[name]:
                    fail(f"round {i}: {name!r} lacks {silo!r}, which has a {m.headline!r} in that round")
        seen.update(metrics[m.headline])
        unseen = entry["unseen"]
        if not isinstance(unseen, Mapping):
            fail(f"round {i}: 'unseen' must be a mapping of metric -> value, not {unseen!r}")
        for name, value in unseen.items():
            if name not in m.metric_names:
                fail(f"round {i}: 'unseen' names {name!r}, which is not in 'metric_names'")
            if not _is_number(value):
                fail(f"round {i}: 'unseen'[{name!r}] is {value!r}, not a finite number")
        _validate_details(entry.get("details", {}), i, keys, silos, fail)
    for silo in silos:
        if silo not in seen:
            fail(f"{m.headline!r} never holds {silo!r}: no round has a test {m.headline} for it")


def _validate_details(details: Any, i: int, keys: Sequence[str], silos: Sequence[str], fail: Any) -> None:
    """The ``details`` part of round ``i`` in :func:`validate_cell`."""
    if not isinstance(details, Mapping):
        fail(f"round {i}: 'details' must be a mapping of metric -> silo -> value, not {details!r}")
    for name, values in details.items():
        if not isinstance(name, str) or not name or name in keys:
            fail(f"round {i}: 'details' names {name!r}, which is empty or one of the cell's metrics {list(keys)}")
        if not isinstance(values, Mapping):
            fail(f"round {i}: 'details'[{name!r}] must be a mapping of silo -> value, not {values!r}")
        for silo, value in values.items():
            if silo not in silos:
                fail(f"round {i}: 'details'[{name!r}] names {silo!r}, which is not in 'silos'")
            if not _is_number(value):
                fail(f"round {i}: 'details'[{name!r}][{silo!r}] is {value!r}, not a finite number")
