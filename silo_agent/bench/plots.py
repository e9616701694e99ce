"""The bench report's four PNG plots of the Task's headline metric: convergence, vs bytes, per silo, the sweep."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsilo.core.atomic import atomic_write
from fedsilo.silo_agent.bench.measures import CellSummary, mean_std, metric_label

__all__ = ["plot_names", "write_plots"]

_MB = 1e6


def plot_names(headline: str) -> tuple[str, str, str, str]:
    """The four plot files of a study whose headline metric is ``headline`` (``dice_vs_rounds.png``, ...)."""
    return (f"{headline}_vs_rounds.png", f"{headline}_vs_bytes.png", "per_silo.png", "sweep.png")


def _ordered(items: Sequence[Any]) -> list[Any]:
    """Distinct items in first-appearance order."""
    return list(dict.fromkeys(items))


def _schedule_label(schedule: tuple[int, int]) -> str:
    return f"{schedule[0]}\u00d7{schedule[1]}"


def _mean_curves(cs: Sequence[CellSummary]) -> tuple[list[float], list[float]]:
    """Per-round mean over seeds of the convergence curve and of the cumulative MB."""
    n = min(len(s.curve) for s in cs)
    curve = [mean_std([s.curve[r] for s in cs])[0] for r in range(n)]
    mb = [sum(s.cumulative_bytes[r] for s in cs) / len(cs) / _MB for r in range(n)]
    return [math.nan if v is None else v for v in curve], mb


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
    """Draws the four plots of :func:`plot_names` (headline vs rounds, vs bytes, per silo, the sweep).

    Args:
        summaries: Every cell's summary, all of one Task (main cells for the first three plots,
            all for the sweep).
        out: The folder to write into (must exist).

    Returns:
        The four paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    headline = summaries[0].headline
    label = metric_label(headline)
    names = plot_names(headline)
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
        curve, _ = _mean_curves(main_by[m])
        ax.plot(range(1, len(curve) + 1), curve, label=m, **style[m])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Round")
    ax.set_ylabel(f"Weighted mean test {label}")
    ax.set_title("Convergence (main schedule, mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / names[0]))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs_all = []
    for m in main_methods:
        curve, mb = _mean_curves(main_by[m])
        xs_all += mb
        ax.plot(mb, curve, label=m, **style[m])
    positive = [x for x in xs_all if x > 0]
    if positive and len(positive) == len(xs_all) and max(positive) / min(positive) > 100:
        ax.set_xscale("log")
    ax.set_xlabel("Cumulative MB on the wire (up + down, all silos)")
    ax.set_ylabel(f"Weighted mean test {label}")
    ax.set_title(f"{label} vs communication (main schedule, mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / names[1]))

    silos = _ordered([silo for s in main for silo in s.silos])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(silos) * max(1, len(main_methods)) ** 0.5), 4.5))
    width = 0.8 / max(1, len(main_methods))
    bars: list[float] = []
    for k, m in enumerate(main_methods):
        stats = [mean_std([s.scores[headline].get(silo) for s in main_by[m]]) for silo in silos]
        heights = [math.nan if mu is None else mu for mu, _ in stats]
        errs = [0.0 if sd is None else sd for _, sd in stats]
        bars += heights
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(silos))]
        ax.bar(xs, heights, width, yerr=errs, capsize=3, label=m, color=style[m]["color"])
    ax.set_xticks(range(len(silos)))
    ax.set_xticklabels(silos)
    ax.set_xlabel("Silo")
    ax.set_ylabel(f"Test {label} (validation-selected round)")
    ax.set_title(f"{label} per silo (mean ± std over seeds)")
    if all(0.0 <= h <= 1.0 for h in bars if not math.isnan(h)):
        ax.set_ylim(0, 1)  # a fraction (Dice, accuracy): the whole scale
    ax.legend()
    written.append(_save(fig, out / names[2]))

    sweep = sorted(_ordered([s.schedule for s in summaries]), key=lambda rs: (-rs[0], rs[1]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        stats = [mean_std([s.mean for s in summaries if s.method == m and s.schedule == rs]) for rs in sweep]
        ys = [math.nan if mu is None else mu for mu, _ in stats]
        errs = [0.0 if sd is None else sd for _, sd in stats]
        ax.errorbar(range(len(sweep)), ys, yerr=errs, capsize=3, label=m, **style[m])
    ax.set_xticks(range(len(sweep)))
    ax.set_xticklabels([_schedule_label(rs) for rs in sweep])
    ax.set_xlim(-0.5, len(sweep) - 0.5)
    ax.set_xlabel("Schedule (rounds \u00d7 local epochs)")
    ax.set_ylabel(f"Weighted mean test {label}")
    ax.set_title("Communication frequency (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / names[3]))
    return written
