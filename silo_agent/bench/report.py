"""Turns finished benchmark cells into ``results.csv``, ``summary.md`` and four PNG plots, naming the Task's headline metric.

The measures come from :mod:`fedsilo.silo_agent.bench.measures`, the plots from
:mod:`fedsilo.silo_agent.bench.plots`; this module renders the table files and writes them all.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsilo.core.atomic import atomic_write
from fedsilo.silo_agent.bench.measures import (
    CellSummary,
    VsReference,
    beats,
    compare_with,
    group_means,
    mean_std,
    metric_decimals,
    metric_label,
    metric_unit,
    paired_difference,
    summarize_cells,
)
from fedsilo.silo_agent.bench.methods import (
    ALONE,
    GROUP_POOLED,
    LOCAL,
    ONE_FOR_ONE,
    ONE_MODEL,
    PER_SILO,
    PERSONAL_THEN_CONSENSUS,
    POOLED,
    scoring,
)
from fedsilo.silo_agent.bench.plots import write_plots

__all__ = [
    "csv_columns",
    "detail_label",
    "detail_lines",
    "format_vs_reference",
    "group_lines",
    "render_csv",
    "render_summary",
    "results_rows",
    "selection_rule",
    "write_outputs",
]

_MINUS = "\u2212"
_DASH = "\u2014"
_MB = 1e6


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def selection_rule(headline: str, metric_names: Sequence[str], *, higher_is_better: bool = True) -> str:
    """The summary's model-selection sentence for a Task's metrics (its labels, see ``metric_label``)."""
    h = metric_label(headline)
    best = "peaked" if higher_is_better else "was lowest"
    return (f"each silo reports its test {_and([metric_label(m) for m in metric_names])} at the round where its "
            f"own validation {h} {best} (ties: the later round; no validation {h}: its last round), so test {h} "
            "never picks a round.")


# ----------------------------------------------------------------------------- results.csv


def csv_columns(headline: str, metric_names: Sequence[str], *, groups: bool = False) -> tuple[str, ...]:
    """The columns of ``results.csv`` for a Task: every test metric, then the headline's cell measures.

    For 2-D segmentation (headline ``dice``, metrics ``dice``, ``hd95``): ``..., dice, hd95,
    val_dice_at_selected, cell_mean_dice, cell_std_dice, cell_worst_dice, unseen_dice, vs_local_dice, ...``.
    With ``groups`` (a study of a Task with silo groups) a ``group`` column follows ``silo``.
    """
    return ("method", "seed", "rounds", "local_epochs", "main", "silo", *(("group",) if groups else ()),
            "test_size", "selected_round",
            *metric_names, f"val_{headline}_at_selected", f"cell_mean_{headline}", f"cell_std_{headline}",
            f"cell_worst_{headline}", f"unseen_{headline}", f"vs_{LOCAL}_{headline}", "bytes_total", "bytes_to_95",
            "epsilon", "seconds")


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def results_rows(summaries: Sequence[CellSummary]) -> list[dict[str, Any]]:
    """One row per (method, seed, rounds, local_epochs, silo), keyed by :func:`csv_columns`.

    ``epsilon`` is the silo's own ε (None without DP); ``val_<headline>_at_selected`` is None where
    the silo fell back to its last round; ``vs_local_<headline>`` is the row's test headline minus the
    ``local`` cell's on the same silo, seed and schedule (None for ``local`` itself or without such a cell);
    ``group`` is the silo's group (None for a cell without groups).
    """
    rows = []
    alone = {(s.seed, s.rounds, s.local_epochs): s for s in summaries if s.method == LOCAL}
    for s in summaries:
        h = s.headline
        ref = alone.get((s.seed, s.rounds, s.local_epochs)) if s.method != LOCAL else None
        for silo in s.silos:
            rows.append({
                "method": s.method, "seed": s.seed, "rounds": s.rounds,
                "local_epochs": s.local_epochs, "main": s.main, "silo": silo,
                "group": None if s.groups is None else s.groups[silo], "test_size": s.test_sizes[silo], "selected_round": s.selected_round[silo],
                **{name: s.scores[name][silo] for name in s.metric_names},
                f"val_{h}_at_selected": s.val_at_selected[silo],
                f"cell_mean_{h}": s.mean, f"cell_std_{h}": s.std,
                f"cell_worst_{h}": s.worst, f"unseen_{h}": s.unseen,
                f"vs_{LOCAL}_{h}": None if ref is None else paired_difference(s, ref, silo),
                "bytes_total": s.bytes_total, "bytes_to_95": s.bytes_to_95,
                "epsilon": None if s.epsilon is None else s.epsilon.get(silo),
                "seconds": s.seconds,
            })
    return rows


def render_csv(summaries: Sequence[CellSummary]) -> str:
    """The text of ``results.csv`` (a header of :func:`csv_columns`, then :func:`results_rows`); the
    ``group`` column only where some cell has groups."""
    buf = io.StringIO()
    first = summaries[0]
    grouped = any(s.groups is not None for s in summaries)
    columns = csv_columns(first.headline, first.metric_names, groups=grouped)
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in results_rows(summaries):
        writer.writerow({k: _csv_value(v) for k, v in row.items() if k in columns})
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


def _signed(value: float, decimals: int) -> str:
    """``value`` with its sign (``+0.012``, ``−0.034``) at ``decimals``."""
    text = f"{abs(value):.{decimals}f}"
    return f"{_MINUS}{text}" if round(value, decimals) < 0 else f"+{text}"


def _fmt_diff(values: Sequence[float | None], decimals: int) -> str:
    """``"+mean ± std"`` of differences over seeds (std only with two or more); ``"—"`` when empty."""
    mean, std = mean_std(values)
    if mean is None:
        return _DASH
    return _signed(mean, decimals) + ("" if std is None else f" ± {std:.{decimals}f}")


def _beats_cell(vs: VsReference) -> str:
    """``"2/3 (hospital-a, hospital-c)"``: silos the method beats the reference on, of those compared."""
    if not vs.seeds:
        return _DASH
    won = vs.beaten_silos
    return f"{len(won)}/{len(vs.silos)}" + (f" ({', '.join(won)})" if won else "")


def format_vs_reference(diff: float | None, *, higher_is_better: bool = True) -> str:
    """Formats a method's mean headline minus the reference's: ``"+0.012"``, ``"−0.034 (loses)"``.

    The difference is rounded to 3 decimals first, so a method "loses" only when it is behind by
    at least 0.0005 (below the reference, or above it for a lower-is-better headline); None (the
    reference itself, or no reference) gives ``"—"``.
    """
    if diff is None:
        return _DASH
    d = round(diff, 3)
    loses = " (loses)" if (d < 0 if higher_is_better else d > 0) else ""
    if d < 0:
        return f"{_MINUS}{-d:.3f}{loses}"
    return f"+{abs(d):.3f}{loses}"


def _schedule_label(schedule: tuple[int, int]) -> str:
    return f"{schedule[0]}\u00d7{schedule[1]}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _with_unit(metric: str) -> str:
    unit = metric_unit(metric)
    return f"{metric_label(metric)} ({unit})" if unit else metric_label(metric)


def _header_lines(summaries: Sequence[CellSummary], main_by: Mapping[str, list[CellSummary]]) -> list[str]:
    """The summary's bullet list: Task, seeds, silos, schedule, selection rule and how values are made."""
    first = summaries[0]
    h, label = first.headline, metric_label(first.headline)
    main = [s for s in summaries if s.main]
    silos = _ordered([silo for s in summaries for silo in s.silos])
    sizes: dict[str, int] = {}
    for s in summaries:
        for silo in s.silos:
            sizes.setdefault(silo, s.test_sizes[silo])
    seeds = _ordered([s.seed for s in main])
    schedules = _ordered([s.schedule for s in main])
    lines = [f"- Task: {first.task} (headline metric: {h}; metrics: {', '.join(first.metric_names)})"]
    seed_line = f"- Seeds: {len(seeds)} ({', '.join(str(x) for x in seeds)})"
    if any(len({s.seed for s in cs}) != len(seeds) for cs in main_by.values() if cs):
        seed_line += "; not every method ran every seed (see results.csv)"
    lines.append(seed_line)
    lines.append(f"- Silos: {len(silos)} (" + ", ".join(f"{x}: {sizes[x]} test examples" for x in silos) + ")")
    if schedules:
        lines.append("- Main schedule: " + ", ".join(
            f"{r} rounds \u00d7 {e} local epoch{'s' if e != 1 else ''}" for r, e in schedules))
    lines.append(f"- Model selection: {selection_rule(h, first.metric_names, higher_is_better=first.higher_is_better)}")
    reach = "reaches 95% of" if first.higher_is_better else "comes within 5% of"
    lines.append(f"- Values are mean ± sample std over seeds (std only with two or more seeds). "
                 f"{_and([_with_unit(m) for m in first.metric_names])} are means weighted by each silo's test "
                 f"examples; MB = 10^6 bytes on the wire, up and down, all silos; MB to 95% counts through the first "
                 f"round whose mean test {label} {reach} the final round's.")
    return lines


def _scoring_notes(methods: Sequence[str], first: CellSummary) -> list[str]:
    """Table notes: which model scored each method's own-test and unseen figures (see ``methods.scoring``)."""
    label = metric_label(first.headline)
    groups: dict[str | None, list[str]] = {}
    for m in methods:
        groups.setdefault(scoring(m, task=first.task, model=first.model), []).append(m)
    say = {
        ONE_MODEL: "one model for both: the personal model is the consensus (global) model (every entry training "
                   "changes is shared, and every silo applies the aggregate alike)",
        PERSONAL_THEN_CONSENSUS: "each silo's personal model on its own test set, the consensus (global) model on "
                                 "the unseen domain",
        PER_SILO: "each silo's own model after the last aggregate (the shared values plus what it keeps or makes "
                  f"locally) on both; no single consensus model is evaluated, and the unseen {label} is the mean over "
                  "the silos' models",
        ALONE: f"each silo's own model, trained alone, on both (the unseen {label} is the mean over the silos' models)",
        POOLED: "the one model trained on the pooled data, on both",
        GROUP_POOLED: "each silo's group model (trained on the pooled data of that group's silos), on both (the "
                      f"unseen {label} is the mean over the silos' models)",
    }
    lines = [f"- Which model each figure scores ({label} on the silos' own test sets, and Unseen {label}):"]
    for kind in (ONE_MODEL, PERSONAL_THEN_CONSENSUS, PER_SILO, ALONE, POOLED, GROUP_POOLED, None):
        if kind in groups:
            text = say.get(kind, "not known to this fedsilo (a method or Task it does not register)")
            lines.append(f"  - {', '.join(groups[kind])}: {text}.")
    return lines


def _vs_local_notes(versus: Mapping[str, VsReference], main_by: Mapping[str, list[CellSummary]], local: str,
                    label: str) -> list[str]:
    """Table notes: how the "vs local" and "Beats local" columns are made, and a DP study's caveat."""
    lines = [f"- vs {local}: a method's test {label} on a silo's own test set (the model it evaluates there) minus "
             f"{local}'s on that silo, both of the same seed, then mean ± std over the seeds both ran; in the main "
             f"table the weighted mean over silos. Beats {local}: the silos where that mean, as printed, is ahead of "
             f"{local}'s. Unseen vs {local}: the unseen {label} minus {local}'s, same seed."]
    dp = [m for m, cs in main_by.items() if cs and any(s.epsilon is not None for s in cs)]
    if dp and all(s.without_dp or s.epsilon is None for s in main_by.get(local, [])):
        lines.append(f"- {local} ran without DP in this DP study: vs {local} compares each DP method with training "
                     "alone without DP.")
    return lines


def group_lines(main_by: Mapping[str, Sequence[CellSummary]], *, reference: str = ONE_FOR_ONE) -> list[str]:
    """The summary's per-group section: every test metric per silo group and method at the final round.

    For each group (the Task's ``group_of``, in order of first silo) and each method with main cells
    that record groups: per metric, the mean over seeds of the mean over that group's silos of the
    final-round test value (:func:`~fedsilo.silo_agent.bench.measures.group_means`), ± the sample
    std over seeds; where ``reference`` (one-for-one) has such cells, each method's difference to it
    (paired by seed, mean ± std) and the seeds on which it is ahead per metric (as printed, see
    :func:`~fedsilo.silo_agent.bench.measures.beats`); then one line per group naming the methods
    ahead of ``reference`` on every seed in each metric.

    Args:
        main_by: Per method (in table order), its main cells.
        reference: The method the differences compare against.

    Returns:
        The section's lines; none when no main cell records groups.
    """
    per = {m: {s.seed: group_means(s) for s in cs if s.groups is not None} for m, cs in main_by.items()}
    per = {m: seeds for m, seeds in per.items() if seeds}
    if not per:
        return []
    first = next(s for cs in main_by.values() for s in cs if s.groups is not None)
    names = first.metric_names
    groups = _ordered([g for seeds in per.values() for means in seeds.values() for g in means])
    ref = per.get(reference, {})
    header = ["Group", "Method", *[metric_label(n) for n in names]]
    if ref:
        header += [f"{metric_label(n)} vs {reference}" for n in names] + [f"Seeds ahead of {reference}"]
    rows = []
    ahead: dict[str, dict[str, list[str]]] = {g: {n: [] for n in names} for g in groups}
    for g in groups:
        for m, seeds in per.items():
            values = {seed: means[g] for seed, means in seeds.items() if g in means}
            if not values:
                continue
            row = [g, m, *[_fmt([v[n] for v in values.values()], metric_decimals(n)) for n in names]]
            if ref:
                paired = [seed for seed in values if g in ref.get(seed, {})]
                if m == reference or not paired:
                    row += [_DASH] * (len(names) + 1)
                else:
                    counts = []
                    for n in names:
                        diffs = [values[seed][n] - ref[seed][g][n] for seed in paired]
                        row.append(_fmt_diff(diffs, metric_decimals(n)))
                        won = sum(beats(d, higher_is_better=n not in first.lower_is_better,
                                        decimals=metric_decimals(n)) for d in diffs)
                        counts.append(f"{metric_label(n)} {won}/{len(diffs)}")
                        if won == len(diffs) == len(ref):
                            ahead[g][n].append(m)
                    row.append(", ".join(counts))
            rows.append(row)
    lines = [f"## Per silo group ({first.task})", "",
             "Every test metric at the final round, per silo group (the Task's group_of) and method: the mean over "
             "that group's silos, then mean \u00b1 sample std over seeds"
             + (f"; then the difference to {reference} (same seed, mean \u00b1 std over seeds) and the seeds on "
                f"which a method is ahead of {reference} as printed." if ref else "."), ""]
    lines += _table(header, rows)
    if ref:
        lines += ["", f"Ahead of {reference} on every seed ({len(ref)}):", ""]
        for g in groups:
            parts = [f"in {metric_label(n)}: {', '.join(ahead[g][n]) or 'no method'}" for n in names]
            lines.append(f"- {g}: " + "; ".join(parts) + ".")
    else:
        lines += ["", f"The method {reference!r} has no main cells with groups in this study: no comparison."]
    lines.append("")
    return lines


def _class_names(summary: CellSummary) -> tuple[str, ...]:
    """The class names of ``summary``'s model: its study's ``[model]`` table (None: the Task's default) as
    the Task parses it, where that config has ``class_names``; () when the Task is not registered here
    or its config has none."""
    from fedsilo.models.tasks import get_task

    try:
        task = get_task(summary.task)
        table = task.default_model_config(summary.seed) if summary.model is None else summary.model
        names = getattr(task.model_config(table), "class_names", None)
    except (ValueError, TypeError):
        return ()
    return tuple(str(n) for n in names) if isinstance(names, (list, tuple)) else ()


_INDEXED = re.compile(r"(.*?)(\d+)")


def _detail_order(name: str) -> tuple[str, int]:
    """Sort key of detail names: by prefix, then by their trailing index as a number (``f1_class_2`` before ``_10``)."""
    match = _INDEXED.fullmatch(name)
    return (match[1], int(match[2])) if match else (name, -1)


def detail_label(name: str, class_names: Sequence[str]) -> str:
    """A detail metric's row label: ``"f1_class_3 (malignant tumour)"`` where the name ends in an index of
    ``class_names``, else the name itself."""
    match = _INDEXED.fullmatch(name)
    if match and int(match[2]) < len(class_names):
        return f"{name} ({class_names[int(match[2])]})"
    return name


def detail_lines(main_by: Mapping[str, Sequence[CellSummary]]) -> list[str]:
    """The summary's per-class section: every detail metric (e.g. per-class F1) per method at the final round.

    For each detail metric (rows, by prefix and index, labelled with the class name where the model
    has ``class_names``, see :func:`detail_label`) and each method with main cells that record details
    (columns): the mean over the silos that report it of its final-round test value
    (:attr:`~fedsilo.silo_agent.bench.measures.CellSummary.details`), then mean ± sample std over seeds.

    Args:
        main_by: Per method (in table order), its main cells.

    Returns:
        The section's lines; none when no main cell records details.
    """
    per = {m: [s for s in cs if s.details] for m, cs in main_by.items()}
    per = {m: cs for m, cs in per.items() if cs}
    if not per:
        return []
    first = next(iter(per.values()))[0]
    classes = _class_names(first)
    names = sorted({n for cs in per.values() for s in cs for n in s.details}, key=_detail_order)
    rows = []
    for name in names:
        row = [detail_label(name, classes)]
        for cs in per.values():
            values = [sum(s.details[name].values()) / len(s.details[name]) if s.details.get(name) else None
                      for s in cs]
            row.append(_fmt(values, metric_decimals(name)))
        rows.append(row)
    lines = [f"## Per class ({first.task})", "",
             "Every detail metric the Task reports (e.g. per-class F1) at the final round, per method: the mean over "
             "the silos that report it (a class neither in a silo's test set nor predicted there has none), then "
             "mean \u00b1 sample std over seeds.", ""]
    lines += _table(["Metric", *per], rows)
    lines.append("")
    return lines


def render_summary(summaries: Sequence[CellSummary], *, reference: str = "fedavg") -> str:
    """The Markdown report: the main table, the headline and every other metric per silo, every metric per
    silo group (cells that record groups, see :func:`group_lines`), every detail metric per method (cells
    that record details, see :func:`detail_lines`), the communication sweep and the notes.

    Args:
        summaries: Every cell's summary, all of one Task (main cells feed the main and per-silo
            tables; all cells feed the sweep).
        reference: The method the "vs" column of the main table compares against. Every method is
            also compared with ``local`` (each silo training alone) silo by silo, paired by seed: the
            "vs local" and "Beats local" columns of the main and per-silo tables; without main cells
            of ``local`` those columns are left out and the summary says so.

    Returns:
        The text of ``summary.md``.
    """
    first = summaries[0]
    h, label, higher = first.headline, metric_label(first.headline), first.higher_is_better
    others = [m for m in first.metric_names if m != h]
    methods = _ordered([s.method for s in summaries])
    main = [s for s in summaries if s.main]
    main_by = {m: [s for s in main if s.method == m] for m in methods}
    main_methods = [m for m in methods if main_by[m]]
    silos = _ordered([silo for s in summaries for silo in s.silos])
    lines = ["# fedsilo bench", "", *_header_lines(summaries, main_by), ""]

    local = LOCAL
    lines += ["## Main results", ""]
    ref_mean = mean_std([s.mean for s in main_by.get(reference, [])])[0]
    versus = compare_with(summaries, local)
    decimals = metric_decimals(h)
    header = ["Method", f"{label} (weighted mean)", "Std across silos", "Worst silo",
              *[metric_label(m) for m in others], f"Unseen {label}", "MB to 95%", "MB total", "\u03b5 (max)",
              "s/run", f"vs {reference}"]
    if versus:
        header += [f"vs {local}", f"Beats {local}", f"Unseen vs {local}"]
    rows = []
    for m in main_methods:
        cs = main_by[m]
        worst_names = _ordered(sorted((s.worst_silo for s in cs),
                                      key=[s.worst_silo for s in cs].count, reverse=True))
        mean = mean_std([s.mean for s in cs])[0]
        vs = None if (m == reference or ref_mean is None or mean is None) else mean - ref_mean
        rows.append([
            m, _fmt([s.mean for s in cs], 3), _fmt([s.std for s in cs], 3),
            f"{_fmt([s.worst for s in cs], 3)} ({', '.join(worst_names)})",
            *[_fmt([s.means[o] for s in cs], metric_decimals(o)) for o in others],
            _fmt([s.unseen for s in cs], 3),
            _fmt([s.bytes_to_95 for s in cs], 2, scale=_MB),
            _fmt([s.bytes_total for s in cs], 2, scale=_MB),
            "no DP" if all(s.without_dp for s in cs) else _fmt([s.epsilon_max for s in cs], 2),
            _fmt([s.seconds for s in cs], 1),
            format_vs_reference(vs, higher_is_better=higher)
            + (" (no DP)" if vs is not None and all(s.without_dp for s in cs) else ""),
        ])
        if versus:
            v = versus.get(m)
            rows[-1] += ([_DASH] * 3 if v is None else
                         [_fmt_diff(v.weighted, decimals), _beats_cell(v), _fmt_diff(v.unseen, decimals)])
    lines += _table(header, rows)
    if reference not in main_methods:
        lines += ["", f"The reference method {reference!r} has no main cells: no comparison."]
    lines += ["", "Notes:", "", *_scoring_notes(main_methods, first)]
    if versus:
        lines += _vs_local_notes(versus, main_by, local, label)
    else:
        lines += [f"- The method {local!r} (each silo training alone) has no main cells in this study: no vs {local} "
                  "comparison."]
    lines.append("")

    lines += [f"## {label} per silo", "",
              f"Test {label} at each silo's validation-selected round, mean ± std over seeds"
              + (f"; then each silo's difference to {local} (same seed, mean ± std over seeds) and the silos "
                 f"each method beats {local} on." if versus else "."), ""]
    rows = [[m] + [_fmt([s.scores[h].get(silo) for s in main_by[m]], 3) for silo in silos] for m in main_methods]
    header = ["Method"] + silos
    if versus:
        header += [f"{silo} vs {local}" for silo in silos] + [f"Beats {local}"]
        for row, m in zip(rows, main_methods):
            v = versus.get(m)
            row += ([_DASH] * (len(silos) + 1) if v is None else
                    [_fmt_diff(v.per_silo.get(silo, []), decimals) for silo in silos] + [_beats_cell(v)])
    lines += _table(header, rows)
    lines.append("")
    if others:
        lines += ["## Other metrics per silo", "",
                  f"Each other test metric at the same validation-selected round ({label}'s), mean ± std over seeds: "
                  "what a silo gets from each method beyond the headline (a silo that lacks a modality, say).", ""]
        rows = [[m, metric_label(k)] + [_fmt([s.scores[k].get(silo) for s in main_by[m]], 3) for silo in silos]
                for k in others for m in main_methods]
        lines += _table(["Method", "Metric", *silos], rows)
        lines.append("")
    lines += group_lines(main_by)
    lines += detail_lines(main_by)

    sweep = sorted(_ordered([s.schedule for s in summaries]), key=lambda rs: (-rs[0], rs[1]))
    totals = _ordered([r * e for r, e in sweep])
    lines += ["## Communication frequency", "",
              f"Weighted mean {label} per schedule, rounds \u00d7 local epochs (all cells); "
              + (f"every schedule trains {totals[0]} local epochs in all."
                 if len(totals) == 1 else
                 "the schedules differ in total local epochs: "
                 + ", ".join(f"{_schedule_label(rs)} = {rs[0] * rs[1]}" for rs in sweep) + "."), ""]
    rows = [[m] + [_fmt([s.mean for s in summaries if s.method == m and s.schedule == rs], 3) for rs in sweep]
            for m in methods]
    lines += _table(["Method"] + [_schedule_label(rs) for rs in sweep], rows)
    lines.append("")

    lines += ["## Methods", ""]
    for m in methods:
        note = next((s.note for s in summaries if s.method == m and s.note), "")
        lines.append(f"- **{m}**: {note}" if note else f"- **{m}**")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point


def write_outputs(cells: Sequence[Mapping[str, Any]], out: Path, *, reference: str = "fedavg") -> list[Path]:
    """Writes ``results.csv``, ``summary.md`` and the four plots into ``out``, each atomically.

    Args:
        cells: Finished runs of one study as loaded from JSON (see
            :func:`fedsilo.silo_agent.bench.cells.validate_cell`; older cells are upgraded).
        out: The output folder (created if missing).
        reference: The method the summary's "vs" column compares against.

    Returns:
        The files written: ``results.csv``, ``summary.md``, then the plots.

    Raises:
        ValueError: no cells, a malformed cell, cells of different Tasks, two cells with the same
            method, seed and schedule, or one method with main cells on two schedules. Nothing is
            written then.
    """
    if not cells:
        raise ValueError("no cells to report")
    summaries = summarize_cells(cells)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "results.csv", out / "summary.md"
    atomic_write(csv_path, render_csv(summaries).encode())
    atomic_write(md_path, render_summary(summaries, reference=reference).encode())
    return [csv_path, md_path, *write_plots(summaries, out)]
