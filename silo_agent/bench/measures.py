"""What the bench report derives from cells: validation-selected rounds, weighted means, fairness, bytes to converge.

Every measure is of the cell's Task headline metric (``dice``, ``accuracy``, ...), read from the
cell (see :mod:`fedsilo.silo_agent.bench.cells`); a lower-is-better headline turns "best" into
"lowest" everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsilo.silo_agent.bench.cells import cell_metrics, upgrade_cell, validate_cell

__all__ = [
    "CellSummary",
    "VsReference",
    "beats",
    "compare_with",
    "paired_difference",
    "bytes_to_95",
    "convergence_curve",
    "cumulative_bytes",
    "final_details",
    "final_scores",
    "group_means",
    "mean_std",
    "metric_decimals",
    "metric_label",
    "metric_unit",
    "sample_std",
    "select_rounds",
    "summarize_cell",
    "summarize_cells",
    "unseen_score",
    "weighted_mean",
]

#: How reports write a few well-known metrics (label, decimals, unit); any other metric is shown
#: by its name with 3 decimals and no unit.
_DISPLAY: dict[str, tuple[str, int, str]] = {"dice": ("Dice", 3, ""), "hd95": ("HD95", 1, "pixels")}


def metric_label(metric: str) -> str:
    """The name tables and plots show for ``metric`` (``"Dice"`` for ``dice``; else the name itself)."""
    return _DISPLAY.get(metric, (metric, 3, ""))[0]


def metric_decimals(metric: str) -> int:
    """Decimals tables show for ``metric`` (1 for ``hd95``, in pixels; else 3)."""
    return _DISPLAY.get(metric, (metric, 3, ""))[1]


def metric_unit(metric: str) -> str:
    """The unit of ``metric`` where reports know one (``"pixels"`` for ``hd95``), else ``""``."""
    return _DISPLAY.get(metric, (metric, 3, ""))[2]


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
        task: The registered name of the cell's Task.
        model: The study's ``[model]`` table (None: the bench's default for the Task).
        headline: The Task's headline metric.
        metric_names: Every test metric of the Task, in its order.
        lower_is_better: The metrics where smaller is better.
        silos: The silos, in the cell's order.
        test_sizes: Test examples per silo (the weights of every weighted mean).
        selected_round: Per silo, the round picked by its validation headline.
        scores: Per metric, per silo, the test value at the silo's selected round.
        val_at_selected: Per silo, the validation headline at its selected round (None: the silo
            logged none and fell back to its last round).
        means: Per metric, the test-size-weighted mean of ``scores``.
        std: Sample standard deviation of the headline across silos (0 with one silo).
        worst: The worst silo's headline (lowest, or highest if lower is better).
        worst_silo: The silo with ``worst`` (first in silo order on ties).
        unseen: Unseen-domain headline at the round with the best weighted mean validation headline.
        bytes_total: Bytes on the wire over the whole run, up and down, all silos.
        bytes_to_95: Cumulative bytes through the first round whose mean test headline comes
            within 5% of the final one's.
        epsilon: ε spent per silo, or None without DP.
        epsilon_max: Largest ε over silos, or None.
        without_dp: The study ran with DP (the cell's ``dp``) but this method could not, so it ran
            without (its ε is None); the tables say "no DP" instead of comparing it as equal.
        curve: Weighted mean test headline per round (round 1 first; NaN where no silo logged one).
        cumulative_bytes: Bytes on the wire through each round.
        seconds: Wall time of the run.
        groups: Per silo, its group (the Task's ``group_of``); None for a cell without groups.
        final: Per metric, per silo, the test value at the final round (see :func:`final_scores`).
        details: Per detail metric (e.g. ``f1_class_3``), per silo that reports it, the test value at
            the final round (see :func:`final_details`); empty for a cell without details.
    """

    method: str
    seed: int
    rounds: int
    local_epochs: int
    main: bool
    note: str
    task: str
    headline: str
    metric_names: tuple[str, ...]
    lower_is_better: frozenset[str]
    silos: tuple[str, ...]
    test_sizes: dict[str, int]
    selected_round: dict[str, int]
    scores: dict[str, dict[str, float]]
    val_at_selected: dict[str, float | None]
    means: dict[str, float]
    std: float
    worst: float
    worst_silo: str
    unseen: float | None
    bytes_total: int
    bytes_to_95: int
    epsilon: dict[str, float] | None
    epsilon_max: float | None
    without_dp: bool = False
    curve: tuple[float, ...]
    cumulative_bytes: tuple[int, ...]
    seconds: float
    model: Mapping[str, Any] | None = None
    groups: Mapping[str, str] | None = None
    final: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    details: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @property
    def schedule(self) -> tuple[int, int]:
        """``(rounds, local_epochs)``."""
        return (self.rounds, self.local_epochs)

    @property
    def mean(self) -> float:
        """The weighted mean test headline (``means[headline]``)."""
        return self.means[self.headline]

    @property
    def higher_is_better(self) -> bool:
        """Whether larger headline values are better."""
        return self.headline not in self.lower_is_better


def weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Mean of ``values`` weighted by ``weights[key]`` over the keys of ``values``.

    Args:
        values: Per-silo values (only the silos present count).
        weights: Per-silo weights (test examples), covering every key of ``values``.

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


def _best_later(scores: Sequence[tuple[int, float]], *, higher: bool) -> int | None:
    """The round with the best score (highest, or lowest if not ``higher``); ties go to the later round."""
    best: tuple[int, float] | None = None
    for rnd, score in scores:
        if best is None or (score >= best[1] if higher else score <= best[1]):
            best = (rnd, score)
    return None if best is None else best[0]


def select_rounds(cell: Mapping[str, Any]) -> dict[str, int]:
    """Model selection by the validation headline, never a test metric.

    Among the rounds where a silo has a test headline value, its selected round is the one with
    its best ``val_<headline>`` (highest, or lowest for a lower-is-better headline; ties: the
    later round); a silo with no validation value in those rounds takes the last of them.

    Args:
        cell: A valid cell (see :func:`fedsilo.silo_agent.bench.cells.validate_cell`).

    Returns:
        Per silo, the selected round (1-based).
    """
    m = cell_metrics(cell)
    higher = m.higher_is_better(m.headline)
    selected = {}
    for silo in cell["silos"]:
        tested = [e for e in cell["rounds_log"] if silo in e["metrics"][m.headline]]
        scored = [(e["round"], float(e["metrics"][m.val_name][silo])) for e in tested
                  if silo in e["metrics"][m.val_name]]
        pick = _best_later(scored, higher=higher)
        selected[silo] = pick if pick is not None else tested[-1]["round"]
    return selected


def unseen_score(cell: Mapping[str, Any], metric: str | None = None) -> float | None:
    """An unseen-domain metric at the round with the best test-size-weighted mean validation headline.

    Only rounds that logged the unseen ``metric`` compete; ties go to the later round. Without
    any validation headline in those rounds, the last of them counts.

    Args:
        cell: A valid cell.
        metric: One of the cell's metrics (None: the headline).

    Returns:
        The unseen-domain value, or None when no round logged one.
    """
    m = cell_metrics(cell)
    metric = m.headline if metric is None else metric
    sizes = cell["test_sizes"]
    rounds = [e for e in cell["rounds_log"] if metric in e["unseen"]]
    if not rounds:
        return None
    scored = [(e["round"], weighted_mean(e["metrics"][m.val_name], sizes)) for e in rounds
              if e["metrics"][m.val_name]]
    pick = _best_later(scored, higher=m.higher_is_better(m.headline))
    entry = rounds[-1] if pick is None else next(e for e in rounds if e["round"] == pick)
    return float(entry["unseen"][metric])


def convergence_curve(cell: Mapping[str, Any], metric: str | None = None) -> list[float]:
    """Test-size-weighted mean of a test metric per round, over the silos present in that round.

    Args:
        cell: A valid cell.
        metric: One of the cell's metrics (None: the headline).

    Returns:
        One value per round, round 1 first; NaN for a round where no silo logged the metric.
    """
    metric = cell_metrics(cell).headline if metric is None else metric
    return [weighted_mean(e["metrics"][metric], cell["test_sizes"]) for e in cell["rounds_log"]]


def cumulative_bytes(cell: Mapping[str, Any]) -> list[int]:
    """Bytes on the wire (up plus down, all silos) through each round, round 1 first."""
    out, total = [], 0
    for entry in cell["rounds_log"]:
        total += int(entry["bytes_up"]) + int(entry["bytes_down"])
        out.append(total)
    return out


def bytes_to_95(cell: Mapping[str, Any]) -> int:
    """Cumulative bytes through the first round whose mean test headline comes within 5% of the final round's.

    "Mean test headline" is the :func:`convergence_curve` value (no model selection). For a
    higher-is-better headline the round must reach 95% of the final value, and when the final
    value is not positive (or undefined) the whole run's bytes count; for a lower-is-better one
    the round must be at most the final value plus 5% of its magnitude.
    """
    m = cell_metrics(cell)
    curve, cum = convergence_curve(cell), cumulative_bytes(cell)
    final = curve[-1]
    if math.isnan(final):
        return cum[-1]
    if m.higher_is_better(m.headline):
        if final <= 0:
            return cum[-1]
        target = 0.95 * final
        return next(b for c, b in zip(curve, cum) if not math.isnan(c) and c >= target)
    target = final + 0.05 * abs(final)
    return next(b for c, b in zip(curve, cum) if not math.isnan(c) and c <= target)


def final_scores(cell: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per test metric, per silo, the value at the final round: the last round in which the silo
    logged its test headline (the run's last round unless the silo missed it).

    Args:
        cell: A valid cell in the current format.
    """
    m = cell_metrics(cell)
    out: dict[str, dict[str, float]] = {name: {} for name in m.metric_names}
    for entry in cell["rounds_log"]:
        for silo in entry["metrics"][m.headline]:
            for name in m.metric_names:
                out[name][silo] = float(entry["metrics"][name][silo])
    return out


def final_details(cell: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per detail metric, per silo, the value in the silo's final round (as :func:`final_scores`: the last
    round in which it logged its test headline); a silo whose final round lacks a detail (e.g. a class
    absent from its test set and its predictions) is left out of that detail.

    Args:
        cell: A valid cell in the current format (rounds without ``details`` have none).

    Returns:
        ``{name: {silo: value}}``, names in first-appearance order; empty without details.
    """
    m = cell_metrics(cell)
    last: dict[str, Mapping[str, Any]] = {}
    for entry in cell["rounds_log"]:
        for silo in entry["metrics"][m.headline]:
            last[silo] = entry
    out: dict[str, dict[str, float]] = {}
    for silo in cell["silos"]:
        entry = last.get(silo, {})
        for name, values in entry.get("details", {}).items():
            if silo in values:
                out.setdefault(name, {})[silo] = float(values[silo])
    return out


def group_means(summary: CellSummary) -> dict[str, dict[str, float]]:
    """Per silo group (in order of first silo), per test metric, the mean over that group's silos of
    their final-round values (:attr:`CellSummary.final`); empty for a cell without groups."""
    if summary.groups is None:
        return {}
    members: dict[str, list[str]] = {}
    for silo in summary.silos:
        members.setdefault(summary.groups[silo], []).append(silo)
    return {group: {name: sum(summary.final[name][s] for s in silos) / len(silos) for name in summary.metric_names}
            for group, silos in members.items()}


def summarize_cell(cell: Mapping[str, Any], *, index: int | None = None) -> CellSummary:
    """Validates ``cell`` (upgrading an older one first) and derives every measure the report shows.

    Args:
        cell: One finished run, as loaded from JSON.
        index: The cell's position in its list, for error messages.

    Raises:
        ValueError: the cell is malformed (see :func:`fedsilo.silo_agent.bench.cells.validate_cell`).
    """
    cell = upgrade_cell(cell)
    validate_cell(cell, index=index)
    m = cell_metrics(cell)
    silos = tuple(cell["silos"])
    sizes = {s: int(cell["test_sizes"][s]) for s in silos}
    selected = select_rounds(cell)
    at = {s: next(e for e in cell["rounds_log"] if e["round"] == selected[s])["metrics"] for s in silos}
    scores = {name: {s: float(at[s][name][s]) for s in silos} for name in m.metric_names}
    val_sel = {s: (float(at[s][m.val_name][s]) if s in at[s][m.val_name] else None) for s in silos}
    head = scores[m.headline]
    worst_silo = (min if m.higher_is_better(m.headline) else max)(silos, key=lambda s: head[s])
    eps = None if cell["epsilon"] is None else {s: float(v) for s, v in cell["epsilon"].items()}
    cum = cumulative_bytes(cell)
    return CellSummary(
        method=cell["method"], seed=int(cell["seed"]), rounds=int(cell["rounds"]),
        local_epochs=int(cell["local_epochs"]), main=bool(cell["main"]), note=cell["note"], task=cell["task"],
        headline=m.headline, metric_names=m.metric_names, lower_is_better=m.lower_is_better,
        silos=silos, test_sizes=sizes, selected_round=selected, scores=scores, val_at_selected=val_sel,
        means={name: weighted_mean(scores[name], sizes) for name in m.metric_names},
        std=sample_std([head[s] for s in silos]), worst=head[worst_silo], worst_silo=worst_silo,
        unseen=unseen_score(cell), bytes_total=cum[-1], bytes_to_95=bytes_to_95(cell), epsilon=eps,
        epsilon_max=max(eps.values()) if eps else None, curve=tuple(convergence_curve(cell)),
        cumulative_bytes=tuple(cum), seconds=float(cell["seconds"]),
        without_dp=bool(cell.get("dp", False)) and eps is None, model=cell.get("model"),
        groups=None if cell.get("groups") is None else {s: str(cell["groups"][s]) for s in silos},
        final=final_scores(cell), details=final_details(cell))


def summarize_cells(cells: Sequence[Mapping[str, Any]]) -> list[CellSummary]:
    """Summarizes every cell of one study.

    Raises:
        ValueError: a malformed cell, cells of different Tasks or metrics, two cells with the same
            method, seed and schedule, or one method with main cells on two schedules.
    """
    out = [summarize_cell(c, index=i) for i, c in enumerate(cells)]
    seen: dict[tuple[str, int, int, int], int] = {}
    main_schedule: dict[str, tuple[int, int]] = {}
    for i, s in enumerate(out):
        first_task = (out[0].task, out[0].headline, out[0].metric_names)
        if (s.task, s.headline, s.metric_names) != first_task:
            raise ValueError(f"cell {i} ({s.method!r}, seed {s.seed}): task {s.task!r} (headline {s.headline!r}), "
                             f"but cell 0 ran {first_task[0]!r} (headline {first_task[1]!r}); one study, one Task")
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


# ----------------------------------------------------------------------------- against a reference (local)


def beats(diff: float | None, *, higher_is_better: bool = True, decimals: int = 3) -> bool:
    """Whether a difference to a reference (method minus reference) is a win as the tables show it.

    The difference is rounded to ``decimals`` first (as the tables print it), so a method beats the
    reference only when it is ahead by at least half a unit in the last printed place: above 0 for a
    higher-is-better headline, below 0 for a lower-is-better one. None (no pair) is no win.
    """
    if diff is None or math.isnan(diff):
        return False
    d = round(diff, decimals)
    return d > 0 if higher_is_better else d < 0


def paired_difference(s: CellSummary, ref: CellSummary, silo: str) -> float | None:
    """``s``'s test headline on ``silo`` minus ``ref``'s (None when either lacks the silo)."""
    a, b = s.scores[s.headline].get(silo), ref.scores[ref.headline].get(silo)
    return None if a is None or b is None else a - b


@dataclass(frozen=True, kw_only=True)
class VsReference:
    """A method's test headline minus a reference method's (``local``), silo by silo, paired by seed.

    Only main-schedule cells count, and only the seeds both methods ran; each difference is between
    two cells of the same seed (the same data splits and initialisation).

    Attributes:
        method: The method.
        reference: The method it is compared with.
        silos: The silos compared, in the method's order.
        seeds: The seeds both ran on the main schedule, in the method's order.
        per_silo: Per silo, one difference per seed of ``seeds``: the method's test headline on that
            silo (its selected round's, with the model it evaluates there) minus the reference's.
        weighted: Per seed, the method's weighted mean test headline minus the reference's (the
            test-size-weighted mean of that seed's per-silo differences).
        unseen: Per seed, the method's unseen-domain headline minus the reference's (None where
            either has none).
        higher_is_better: Whether larger headline values are better.
        decimals: The decimals the tables print the headline with (``beats`` rounds to them).
    """

    method: str
    reference: str
    silos: tuple[str, ...]
    seeds: tuple[int, ...]
    per_silo: dict[str, list[float]]
    weighted: list[float]
    unseen: list[float | None]
    higher_is_better: bool = True
    decimals: int = 3

    def mean(self, silo: str) -> float | None:
        """The mean over seeds of ``silo``'s difference (None with no pair)."""
        values = self.per_silo.get(silo, [])
        return sum(values) / len(values) if values else None

    @property
    def beaten_silos(self) -> tuple[str, ...]:
        """The silos the method beats the reference on: the mean over seeds of its difference there is a
        win as printed (see :func:`beats`)."""
        return tuple(silo for silo in self.silos
                     if beats(self.mean(silo), higher_is_better=self.higher_is_better, decimals=self.decimals))

    @property
    def beats_count(self) -> int:
        """How many of ``silos`` the method beats the reference on."""
        return len(self.beaten_silos)


def compare_with(summaries: Sequence[CellSummary], reference: str) -> dict[str, VsReference]:
    """Every method with main cells (but ``reference``) against ``reference``, paired by seed.

    Args:
        summaries: Every cell's summary of one study.
        reference: The method to compare with (e.g. ``local``).

    Returns:
        Per method, in first-appearance order, its :class:`VsReference`; a method that shares no seed
        with the reference has empty lists. {} when ``reference`` has no main cells.
    """
    main = [s for s in summaries if s.main]
    refs = {s.seed: s for s in main if s.method == reference}
    if not refs:
        return {}
    out: dict[str, VsReference] = {}
    for method in dict.fromkeys(s.method for s in main if s.method != reference):
        cells = [s for s in main if s.method == method]
        first = cells[0]
        silos = tuple(dict.fromkeys(silo for s in cells for silo in s.silos))
        per_silo: dict[str, list[float]] = {silo: [] for silo in silos}
        weighted: list[float] = []
        unseen: list[float | None] = []
        seeds = []
        for s in cells:
            ref = refs.get(s.seed)
            if ref is None:
                continue
            seeds.append(s.seed)
            for silo in silos:
                d = paired_difference(s, ref, silo)
                if d is not None:
                    per_silo[silo].append(d)
            weighted.append(s.mean - ref.mean)
            unseen.append(None if s.unseen is None or ref.unseen is None else s.unseen - ref.unseen)
        out[method] = VsReference(method=method, reference=reference, silos=silos, seeds=tuple(seeds),
                                  per_silo=per_silo, weighted=weighted, unseen=unseen,
                                  higher_is_better=first.higher_is_better, decimals=metric_decimals(first.headline))
    return out
