"""Turns finished benchmark cells into ``results.csv``, ``summary.md`` and four PNG plots."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsilo.core.atomic import atomic_write

__all__ = [
    "CSV_COLUMNS",
    "CellSummary",
    "bytes_to_95",
    "convergence_curve",
    "cumulative_bytes",
    "format_vs_reference",
    "mean_std",
    "render_summary",
    "results_rows",
    "sample_std",
    "select_rounds",
    "summarize_cell",
    "unseen_dice",
    "validate_cell",
    "weighted_mean",
    "write_outputs",
    "write_plots",
]

CSV_COLUMNS = (
    "method", "seed", "rounds", "local_epochs", "main", "silo", "test_size", "selected_round",
    "dice", "hd95", "val_dice_at_selected", "cell_mean_dice", "cell_std_dice", "cell_worst_dice",
    "unseen_dice", "bytes_total", "bytes_to_95", "epsilon", "seconds",
)

SELECTION_RULE = ("each silo reports its test Dice and HD95 at the round where its own validation "
                  "Dice peaked (ties: the later round; no validation Dice: its last round), so test "
                  "Dice never picks a round.")

_MINUS = "\u2212"
_DASH = "\u2014"
_MB = 1e6


@dataclass(frozen=True, kw_only=True)
class CellSummary:
    """One cell's derived measures (see :func:`summarize_cell`).

    Attributes:
        method: Method name.
        seed: The run's seed.
        rounds: Federated rounds in the schedule.
        local_epochs: Local epochs per round in the schedule.
        main: Whether the cell ran the main schedule (False: a communication-frequency sweep point).
        note: One line on what the method shares and keeps.
        silos: The silos, in the cell's order.
        test_sizes: Test images per silo (the weights of every weighted mean).
        selected_round: Per silo, the round picked by its validation Dice.
        dice: Per silo, test Dice at its selected round.
        hd95: Per silo, test HD95 (pixels) at its selected round.
        val_dice_at_selected: Per silo, validation Dice at its selected round (None: the silo
            logged no validation Dice and fell back to its last round).
        mean_dice: Test-size-weighted mean of ``dice``.
        std_dice: Sample standard deviation of ``dice`` across silos (0 with one silo).
        worst_dice: Lowest ``dice``.
        worst_silo: The silo with ``worst_dice`` (first in silo order on ties).
        mean_hd95: Test-size-weighted mean of ``hd95``.
        unseen_dice: Unseen-domain Dice at the round with the best weighted mean validation Dice.
        bytes_total: Bytes on the wire over the whole run, up and down, all silos.
        bytes_to_95: Cumulative bytes through the first round reaching 95% of the final mean Dice.
        epsilon: ε spent per silo, or None without DP.
        epsilon_max: Largest ε over silos, or None.
        without_dp: The study ran with DP (the cell's ``dp``) but this method could not, so it ran
            without (its ε is None); the tables say "no DP" instead of comparing it as equal.
        curve: Weighted mean test Dice per round (round 1 first; NaN where no silo logged one).
        cumulative_bytes: Bytes on the wire through each round.
        seconds: Wall time of the run.
    """

    method: str
    seed: int
    rounds: int
    local_epochs: int
    main: bool
    note: str
    silos: tuple[str, ...]
    test_sizes: dict[str, int]
    selected_round: dict[str, int]
    dice: dict[str, float]
    hd95: dict[str, float]
    val_dice_at_selected: dict[str, float | None]
    mean_dice: float
    std_dice: float
    worst_dice: float
    worst_silo: str
    mean_hd95: float
    unseen_dice: float | None
    bytes_total: int
    bytes_to_95: int
    epsilon: dict[str, float] | None
    epsilon_max: float | None
    without_dp: bool = False
    curve: tuple[float, ...]
    cumulative_bytes: tuple[int, ...]
    seconds: float

    @property
    def schedule(self) -> tuple[int, int]:
        """``(rounds, local_epochs)``."""
        return (self.rounds, self.local_epochs)


# ----------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _label(cell: Any, index: int | None) -> str:
    where = "cell" if index is None else f"cell {index}"
    if isinstance(cell, Mapping):
        parts = [f"{cell[k]!r}" if k == "method" else f"{k} {cell[k]!r}"
                 for k in ("method", "seed") if k in cell]
        if parts:
            where += f" ({', '.join(parts)})"
    return where


def validate_cell(cell: Mapping[str, Any], *, index: int | None = None) -> None:
    """Checks that ``cell`` holds every key this module reads, with sane values.

    Every listed silo needs a positive test size and a test Dice in at least one round; a silo
    with a test Dice in a round needs an HD95 there too. Dice values lie in [0, 1], HD95 and ε
    are finite and non-negative, bytes are non-negative integers, and ``rounds_log`` holds
    rounds 1..``rounds`` in order.

    Args:
        cell: One finished run, as loaded from JSON.
        index: The cell's position in its list, for the error message.

    Raises:
        ValueError: naming the cell and the bad key (and round and silo where it applies).
    """
    where = _label(cell, index)

    def fail(msg: str) -> None:
        raise ValueError(f"{where}: {msg}")

    if not isinstance(cell, Mapping):
        fail(f"is a {type(cell).__name__}, not a mapping")
    for key in ("method", "seed", "rounds", "local_epochs", "main", "silos", "test_sizes",
                "rounds_log", "epsilon", "seconds", "note"):
        if key not in cell:
            fail(f"missing key {key!r}")
    if not isinstance(cell["method"], str) or not cell["method"]:
        fail(f"'method' must be a non-empty string, not {cell['method']!r}")
    if not _is_int(cell["seed"]):
        fail(f"'seed' must be an integer, not {cell['seed']!r}")
    for key in ("rounds", "local_epochs"):
        if not _is_int(cell[key]) or cell[key] < 1:
            fail(f"{key!r} must be a positive integer, not {cell[key]!r}")
    if not isinstance(cell["main"], bool):
        fail(f"'main' must be true or false, not {cell['main']!r}")
    silos = cell["silos"]
    if (not isinstance(silos, Sequence) or isinstance(silos, str) or not silos
            or not all(isinstance(s, str) and s for s in silos) or len(set(silos)) != len(silos)):
        fail(f"'silos' must be a non-empty list of distinct silo names, not {silos!r}")
    sizes = cell["test_sizes"]
    if not isinstance(sizes, Mapping):
        fail("'test_sizes' must be a mapping of silo -> test images")
    for silo in silos:
        if not _is_int(sizes.get(silo)) or sizes[silo] < 1:
            fail(f"'test_sizes'[{silo!r}] must be a positive integer, not {sizes.get(silo)!r}")
    if not isinstance(cell["note"], str):
        fail(f"'note' must be a string, not {cell['note']!r}")
    if not _is_number(cell["seconds"]) or cell["seconds"] < 0:
        fail(f"'seconds' must be a finite non-negative number, not {cell['seconds']!r}")
    eps = cell["epsilon"]
    if eps is not None:
        if not isinstance(eps, Mapping):
            fail("'epsilon' must be null or a mapping of silo -> ε")
        for silo, value in eps.items():
            if silo not in silos:
                fail(f"'epsilon' names {silo!r}, which is not in 'silos'")
            if not _is_number(value) or value < 0:
                fail(f"'epsilon'[{silo!r}] must be a finite non-negative number, not {value!r}")
    log = cell["rounds_log"]
    if not isinstance(log, Sequence) or isinstance(log, str):
        fail("'rounds_log' must be a list of round entries")
    if len(log) != cell["rounds"]:
        fail(f"'rounds_log' has {len(log)} entries but 'rounds' is {cell['rounds']}")
    seen_dice: set[str] = set()
    for i, entry in enumerate(log, start=1):
        if not isinstance(entry, Mapping):
            fail(f"'rounds_log' entry {i} is not a mapping")
        for key in ("round", "bytes_up", "bytes_down", "dice", "hd95", "val_dice", "unseen_dice"):
            if key not in entry:
                fail(f"'rounds_log' entry {i} misses key {key!r}")
        if not _is_int(entry["round"]) or entry["round"] != i:
            fail(f"'rounds_log' entry {i} has 'round' {entry['round']!r}; expected {i} (rounds 1.., in order)")
        for key in ("bytes_up", "bytes_down"):
            if not _is_int(entry[key]) or entry[key] < 0:
                fail(f"round {i}: {key!r} must be a non-negative integer, not {entry[key]!r}")
        for key in ("dice", "hd95", "val_dice"):
            values = entry[key]
            if not isinstance(values, Mapping):
                fail(f"round {i}: {key!r} must be a mapping of silo -> value")
            for silo, value in values.items():
                if silo not in silos:
                    fail(f"round {i}: {key!r} names {silo!r}, which is not in 'silos'")
                if key == "hd95":
                    ok = _is_number(value) and value >= 0
                    want = "a finite non-negative number"
                else:
                    ok = _is_number(value) and 0 <= value <= 1
                    want = "a finite number in [0, 1]"
                if not ok:
                    fail(f"round {i}: {key!r}[{silo!r}] is {value!r}, not {want}")
        for silo in entry["dice"]:
            if silo not in entry["hd95"]:
                fail(f"round {i}: 'hd95' lacks {silo!r}, which has a 'dice' in that round")
        seen_dice.update(entry["dice"])
        unseen = entry["unseen_dice"]
        if unseen is not None and not (_is_number(unseen) and 0 <= unseen <= 1):
            fail(f"round {i}: 'unseen_dice' is {unseen!r}, not null or a finite number in [0, 1]")
    for silo in silos:
        if silo not in seen_dice:
            fail(f"'dice' never holds {silo!r}: no round has a test Dice for it")


# ----------------------------------------------------------------------------- measures


def weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Mean of ``values`` weighted by ``weights[key]`` over the keys of ``values``.

    Args:
        values: Per-silo values (only the silos present count).
        weights: Per-silo weights (test images), covering every key of ``values``.

    Returns:
        The weighted mean, or NaN when ``values`` is empty or its weights sum to 0.
    """
    total = sum(weights[k] for k in values)
    if not values or total <= 0:
        return math.nan
    return sum(weights[k] * v for k, v in values.items()) / total


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (``n - 1`` in the denominator); 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std over seeds, ignoring ``None`` and NaN entries.

    Returns:
        ``(mean, std)``: ``mean`` is None when nothing is left, ``std`` is None with fewer than
        two values left.
    """
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return None, None
    return sum(kept) / len(kept), (sample_std(kept) if len(kept) >= 2 else None)


def _argmax_later(scores: Sequence[tuple[int, float]]) -> int | None:
    """The round with the highest score; ties go to the later round."""
    best: tuple[int, float] | None = None
    for rnd, score in scores:
        if best is None or score >= best[1]:
            best = (rnd, score)
    return None if best is None else best[0]


def select_rounds(cell: Mapping[str, Any]) -> dict[str, int]:
    """Model selection by validation Dice, never test Dice.

    Among the rounds where a silo has a test Dice, its selected round is the one with its highest
    ``val_dice`` (ties: the later round); a silo with no ``val_dice`` in those rounds takes the
    last of them.

    Args:
        cell: A valid cell (see :func:`validate_cell`).

    Returns:
        Per silo, the selected round (1-based).
    """
    selected = {}
    for silo in cell["silos"]:
        tested = [e for e in cell["rounds_log"] if silo in e["dice"]]
        scored = [(e["round"], float(e["val_dice"][silo])) for e in tested if silo in e["val_dice"]]
        pick = _argmax_later(scored)
        selected[silo] = pick if pick is not None else tested[-1]["round"]
    return selected


def unseen_dice(cell: Mapping[str, Any]) -> float | None:
    """Unseen-domain Dice at the round with the best test-size-weighted mean validation Dice.

    Only rounds with a non-null ``unseen_dice`` compete; ties go to the later round. Without any
    validation Dice in those rounds, the last of them counts.

    Returns:
        The unseen-domain Dice, or None when no round logged one.
    """
    sizes = cell["test_sizes"]
    rounds = [e for e in cell["rounds_log"] if e["unseen_dice"] is not None]
    if not rounds:
        return None
    scored = [(e["round"], weighted_mean(e["val_dice"], sizes)) for e in rounds if e["val_dice"]]
    pick = _argmax_later(scored)
    entry = rounds[-1] if pick is None else next(e for e in rounds if e["round"] == pick)
    return float(entry["unseen_dice"])


def convergence_curve(cell: Mapping[str, Any]) -> list[float]:
    """Test-size-weighted mean test Dice per round, over the silos present in that round.

    Returns:
        One value per round, round 1 first; NaN for a round where no silo logged a test Dice.
    """
    return [weighted_mean(e["dice"], cell["test_sizes"]) for e in cell["rounds_log"]]


def cumulative_bytes(cell: Mapping[str, Any]) -> list[int]:
    """Bytes on the wire (up plus down, all silos) through each round, round 1 first."""
    out, total = [], 0
    for entry in cell["rounds_log"]:
        total += int(entry["bytes_up"]) + int(entry["bytes_down"])
        out.append(total)
    return out


def bytes_to_95(cell: Mapping[str, Any]) -> int:
    """Cumulative bytes through the first round whose mean test Dice reaches 95% of the final one.

    "Mean test Dice" is the :func:`convergence_curve` value (no model selection). When the final
    round's mean Dice is not positive (or undefined), the whole run's bytes count.
    """
    curve, cum = convergence_curve(cell), cumulative_bytes(cell)
    final = curve[-1]
    if math.isnan(final) or final <= 0:
        return cum[-1]
    target = 0.95 * final
    return next(b for c, b in zip(curve, cum) if not math.isnan(c) and c >= target)


def summarize_cell(cell: Mapping[str, Any], *, index: int | None = None) -> CellSummary:
    """Validates ``cell`` and derives every measure the report shows.

    Args:
        cell: One finished run, as loaded from JSON.
        index: The cell's position in its list, for error messages.

    Raises:
        ValueError: the cell is malformed (see :func:`validate_cell`).
    """
    validate_cell(cell, index=index)
    silos = tuple(cell["silos"])
    sizes = {s: int(cell["test_sizes"][s]) for s in silos}
    selected = select_rounds(cell)
    by_round = {e["round"]: e for e in cell["rounds_log"]}
    dice = {s: float(by_round[selected[s]]["dice"][s]) for s in silos}
    hd95 = {s: float(by_round[selected[s]]["hd95"][s]) for s in silos}
    val_sel = {s: (float(by_round[selected[s]]["val_dice"][s])
                   if s in by_round[selected[s]]["val_dice"] else None) for s in silos}
    worst_silo = min(silos, key=lambda s: dice[s])
    eps = None if cell["epsilon"] is None else {s: float(v) for s, v in cell["epsilon"].items()}
    cum = cumulative_bytes(cell)
    return CellSummary(
        method=cell["method"], seed=int(cell["seed"]), rounds=int(cell["rounds"]),
        local_epochs=int(cell["local_epochs"]), main=bool(cell["main"]), note=cell["note"],
        silos=silos, test_sizes=sizes, selected_round=selected, dice=dice, hd95=hd95,
        val_dice_at_selected=val_sel, mean_dice=weighted_mean(dice, sizes),
        std_dice=sample_std([dice[s] for s in silos]), worst_dice=dice[worst_silo],
        worst_silo=worst_silo, mean_hd95=weighted_mean(hd95, sizes), unseen_dice=unseen_dice(cell),
        bytes_total=cum[-1], bytes_to_95=bytes_to_95(cell), epsilon=eps,
        epsilon_max=max(eps.values()) if eps else None, curve=tuple(convergence_curve(cell)),
        cumulative_bytes=tuple(cum), seconds=float(cell["seconds"]),
        without_dp=bool(cell.get("dp", False)) and eps is None)


def _summaries(cells: Sequence[Mapping[str, Any]]) -> list[CellSummary]:
    """Summarizes every cell and rejects duplicates and methods with two main schedules."""
    out = [summarize_cell(c, index=i) for i, c in enumerate(cells)]
    seen: dict[tuple[str, int, int, int], int] = {}
    main_schedule: dict[str, tuple[int, int]] = {}
    for i, s in enumerate(out):
        key = (s.method, s.seed, s.rounds, s.local_epochs)
        if key in seen:
            raise ValueError(f"cell {i} ({s.method!r}, seed {s.seed}): same method, seed and schedule "
                             f"{s.rounds}x{s.local_epochs} as cell {seen[key]}")
        seen[key] = i
        if s.main:
            first = main_schedule.setdefault(s.method, s.schedule)
            if first != s.schedule:
                raise ValueError(f"cell {i} ({s.method!r}, seed {s.seed}): main schedule "
                                 f"{s.rounds}x{s.local_epochs}, but another main cell of "
                                 f"{s.method!r} ran {first[0]}x{first[1]}")
    return out


# ----------------------------------------------------------------------------- results.csv


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def results_rows(summaries: Sequence[CellSummary]) -> list[dict[str, Any]]:
    """One row per (method, seed, rounds, local_epochs, silo), keyed by :data:`CSV_COLUMNS`.

    ``epsilon`` is the silo's own ε (None without DP); ``val_dice_at_selected`` is None where the
    silo fell back to its last round.
    """
    rows = []
    for s in summaries:
        for silo in s.silos:
            rows.append({
                "method": s.method, "seed": s.seed, "rounds": s.rounds,
                "local_epochs": s.local_epochs, "main": s.main, "silo": silo,
                "test_size": s.test_sizes[silo], "selected_round": s.selected_round[silo],
                "dice": s.dice[silo], "hd95": s.hd95[silo],
                "val_dice_at_selected": s.val_dice_at_selected[silo],
                "cell_mean_dice": s.mean_dice, "cell_std_dice": s.std_dice,
                "cell_worst_dice": s.worst_dice, "unseen_dice": s.unseen_dice,
                "bytes_total": s.bytes_total, "bytes_to_95": s.bytes_to_95,
                "epsilon": None if s.epsilon is None else s.epsilon.get(silo),
                "seconds": s.seconds,
            })
    return rows


def _render_csv(summaries: Sequence[CellSummary]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in results_rows(summaries):
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return buf.getvalue()


# ----------------------------------------------------------------------------- summary.md


def _ordered(items: Sequence[Any]) -> list[Any]:
    """Distinct items in first-appearance order."""
    return list(dict.fromkeys(items))


def _fmt(values: Sequence[float | None], decimals: int, *, scale: float = 1.0) -> str:
    """``"mean ± std"`` over seeds (std only with two or more values); ``"—"`` when empty."""
    mean, std = mean_std([None if v is None else v / scale for v in values])
    if mean is None:
        return _DASH
    text = f"{mean:.{decimals}f}"
    return text if std is None else f"{text} ± {std:.{decimals}f}"


def format_vs_reference(diff: float | None) -> str:
    """Formats a method's mean Dice minus the reference's: ``"+0.012"``, ``"−0.034 (loses)"``.

    The difference is rounded to 3 decimals first, so a method "loses" only when it is behind by
    at least 0.0005; None (the reference itself, or no reference) gives ``"—"``.
    """
    if diff is None:
        return _DASH
    d = round(diff, 3)
    if d < 0:
        return f"{_MINUS}{-d:.3f} (loses)"
    return f"+{abs(d):.3f}"


def _schedule_label(schedule: tuple[int, int]) -> str:
    return f"{schedule[0]}\u00d7{schedule[1]}"


def _sweep_schedules(summaries: Sequence[CellSummary]) -> list[tuple[int, int]]:
    """Every schedule, most rounds first."""
    return sorted(_ordered([s.schedule for s in summaries]), key=lambda rs: (-rs[0], rs[1]))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_summary(summaries: Sequence[CellSummary], *, reference: str = "fedavg") -> str:
    """The Markdown report: the main table, Dice per silo, the communication sweep and the notes.

    Args:
        summaries: Every cell's summary (main cells feed the main and per-silo tables; all cells
            feed the sweep).
        reference: The method the last column of the main table compares against.

    Returns:
        The text of ``summary.md``.
    """
    methods = _ordered([s.method for s in summaries])
    main = [s for s in summaries if s.main]
    main_by = {m: [s for s in main if s.method == m] for m in methods}
    main_methods = [m for m in methods if main_by[m]]
    silos = _ordered([silo for s in summaries for silo in s.silos])
    sizes: dict[str, int] = {}
    for s in summaries:
        for silo in s.silos:
            sizes.setdefault(silo, s.test_sizes[silo])
    seeds = _ordered([s.seed for s in main])
    schedules = _ordered([s.schedule for s in main])

    lines = ["# fedsilo bench", ""]
    seed_line = f"- Seeds: {len(seeds)} ({', '.join(str(x) for x in seeds)})"
    if any(len({s.seed for s in main_by[m]}) != len(seeds) for m in main_methods):
        seed_line += "; not every method ran every seed (see results.csv)"
    lines.append(seed_line)
    lines.append(f"- Silos: {len(silos)} ("
                 + ", ".join(f"{x}: {sizes[x]} test images" for x in silos) + ")")
    if schedules:
        lines.append("- Main schedule: " + ", ".join(
            f"{r} rounds \u00d7 {e} local epoch{'s' if e != 1 else ''}" for r, e in schedules))
    lines.append(f"- Model selection: {SELECTION_RULE}")
    lines.append("- Values are mean ± sample std over seeds (std only with two or more seeds). Dice "
                 "and HD95 (pixels) are means weighted by each silo's test images; MB = 10^6 bytes "
                 "on the wire, up and down, all silos; MB to 95% counts through the first round "
                 "whose mean test Dice reaches 95% of the final round's.")
    lines.append("")

    lines += ["## Main results", ""]
    ref_mean = mean_std([s.mean_dice for s in main_by.get(reference, [])])[0]
    header = ["Method", "Dice (weighted mean)", "Std across silos", "Worst silo", "HD95",
              "Unseen Dice", "MB to 95%", "MB total", "\u03b5 (max)", "s/run", f"vs {reference}"]
    rows = []
    for m in main_methods:
        cs = main_by[m]
        worst_names = _ordered(sorted((s.worst_silo for s in cs),
                                      key=[s.worst_silo for s in cs].count, reverse=True))
        mean = mean_std([s.mean_dice for s in cs])[0]
        vs = None if (m == reference or ref_mean is None or mean is None) else mean - ref_mean
        rows.append([
            m, _fmt([s.mean_dice for s in cs], 3), _fmt([s.std_dice for s in cs], 3),
            f"{_fmt([s.worst_dice for s in cs], 3)} ({', '.join(worst_names)})",
            _fmt([s.mean_hd95 for s in cs], 1), _fmt([s.unseen_dice for s in cs], 3),
            _fmt([s.bytes_to_95 for s in cs], 2, scale=_MB),
            _fmt([s.bytes_total for s in cs], 2, scale=_MB),
            "no DP" if all(s.without_dp for s in cs) else _fmt([s.epsilon_max for s in cs], 2),
            _fmt([s.seconds for s in cs], 1),
            format_vs_reference(vs) + (" (no DP)" if vs is not None and all(s.without_dp for s in cs) else ""),
        ])
    lines += _table(header, rows)
    if reference not in main_methods:
        lines += ["", f"The reference method {reference!r} has no main cells: no comparison."]
    lines.append("")

    lines += ["## Dice per silo", "",
              "Test Dice at each silo's validation-selected round, mean ± std over seeds.", ""]
    rows = [[m] + [_fmt([s.dice.get(silo) for s in main_by[m]], 3) for silo in silos]
            for m in main_methods]
    lines += _table(["Method"] + silos, rows)
    lines.append("")

    sweep = _sweep_schedules(summaries)
    totals = _ordered([r * e for r, e in sweep])
    lines += ["## Communication frequency", "",
              "Weighted mean Dice per schedule, rounds \u00d7 local epochs (all cells); "
              + (f"every schedule trains {totals[0]} local epochs in all."
                 if len(totals) == 1 else
                 "the schedules differ in total local epochs: "
                 + ", ".join(f"{_schedule_label(rs)} = {rs[0] * rs[1]}" for rs in sweep) + "."), ""]
    rows = [[m] + [_fmt([s.mean_dice for s in summaries if s.method == m and s.schedule == rs], 3)
                   for rs in sweep] for m in methods]
    lines += _table(["Method"] + [_schedule_label(rs) for rs in sweep], rows)
    lines.append("")

    lines += ["## Methods", ""]
    for m in methods:
        note = next((s.note for s in summaries if s.method == m and s.note), "")
        lines.append(f"- **{m}**: {note}" if note else f"- **{m}**")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _mean_curves(cs: Sequence[CellSummary]) -> tuple[list[float], list[float]]:
    """Per-round mean over seeds of the convergence curve and of the cumulative MB."""
    n = min(len(s.curve) for s in cs)
    dice = [mean_std([s.curve[r] for s in cs])[0] for r in range(n)]
    mb = [sum(s.cumulative_bytes[r] for s in cs) / len(cs) / _MB for r in range(n)]
    return [math.nan if d is None else d for d in dice], mb


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def write_plots(summaries: Sequence[CellSummary], out: Path) -> list[Path]:
    """Draws ``dice_vs_rounds.png``, ``dice_vs_bytes.png``, ``per_silo.png`` and ``sweep.png``.

    Args:
        summaries: Every cell's summary (main cells for the first three plots, all for the sweep).
        out: The folder to write into (must exist).

    Returns:
        The four paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    methods = _ordered([s.method for s in summaries])
    main = [s for s in summaries if s.main]
    main_by = {m: [s for s in main if s.method == m] for m in methods}
    main_methods = [m for m in methods if main_by[m]]
    written = []
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours, and a marker each: a method looks the same in every plot
    markers = "osD^vP*Xh<>p"
    style = {m: {"color": palette[(2 * i) % 20 + (2 * i // 20) % 2], "marker": markers[i % len(markers)]}
             for i, m in enumerate(methods)}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in main_methods:
        dice, _ = _mean_curves(main_by[m])
        ax.plot(range(1, len(dice) + 1), dice, label=m, **style[m])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Round")
    ax.set_ylabel("Weighted mean test Dice")
    ax.set_title("Convergence (main schedule, mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "dice_vs_rounds.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs_all = []
    for m in main_methods:
        dice, mb = _mean_curves(main_by[m])
        xs_all += mb
        ax.plot(mb, dice, label=m, **style[m])
    positive = [x for x in xs_all if x > 0]
    if positive and len(positive) == len(xs_all) and max(positive) / min(positive) > 100:
        ax.set_xscale("log")
    ax.set_xlabel("Cumulative MB on the wire (up + down, all silos)")
    ax.set_ylabel("Weighted mean test Dice")
    ax.set_title("Dice vs communication (main schedule, mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "dice_vs_bytes.png"))

    silos = _ordered([silo for s in main for silo in s.silos])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(silos) * max(1, len(main_methods)) ** 0.5), 4.5))
    width = 0.8 / max(1, len(main_methods))
    for k, m in enumerate(main_methods):
        stats = [mean_std([s.dice.get(silo) for s in main_by[m]]) for silo in silos]
        heights = [math.nan if mu is None else mu for mu, _ in stats]
        errs = [0.0 if sd is None else sd for _, sd in stats]
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(silos))]
        ax.bar(xs, heights, width, yerr=errs, capsize=3, label=m, color=style[m]["color"])
    ax.set_xticks(range(len(silos)))
    ax.set_xticklabels(silos)
    ax.set_xlabel("Silo")
    ax.set_ylabel("Test Dice (validation-selected round)")
    ax.set_title("Dice per silo (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.legend()
    written.append(_save(fig, out / "per_silo.png"))

    sweep = _sweep_schedules(summaries)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        stats = [mean_std([s.mean_dice for s in summaries if s.method == m and s.schedule == rs])
                 for rs in sweep]
        ys = [math.nan if mu is None else mu for mu, _ in stats]
        errs = [0.0 if sd is None else sd for _, sd in stats]
        ax.errorbar(range(len(sweep)), ys, yerr=errs, capsize=3, label=m, **style[m])
    ax.set_xticks(range(len(sweep)))
    ax.set_xticklabels([_schedule_label(rs) for rs in sweep])
    ax.set_xlim(-0.5, len(sweep) - 0.5)
    ax.set_xlabel("Schedule (rounds \u00d7 local epochs)")
    ax.set_ylabel("Weighted mean test Dice")
    ax.set_title("Communication frequency (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "sweep.png"))
    return written


# ----------------------------------------------------------------------------- entry point


def write_outputs(cells: Sequence[Mapping[str, Any]], out: Path, *,
                  reference: str = "fedavg") -> list[Path]:
    """Writes ``results.csv``, ``summary.md`` and the four plots into ``out``, each atomically.

    Args:
        cells: Finished runs as loaded from JSON (see :func:`validate_cell`).
        out: The output folder (created if missing).
        reference: The method the summary's last column compares against.

    Returns:
        The files written: ``results.csv``, ``summary.md``, then the plots.

    Raises:
        ValueError: no cells, a malformed cell, two cells with the same method, seed and schedule,
            or one method with main cells on two schedules. Nothing is written then.
    """
    if not cells:
        raise ValueError("no cells to report")
    summaries = _summaries(cells)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "results.csv", out / "summary.md"
    atomic_write(csv_path, _render_csv(summaries).encode())
    atomic_write(md_path, render_summary(summaries, reference=reference).encode())
    return [csv_path, md_path, *write_plots(summaries, out)]
