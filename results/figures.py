"""The report's figures (matplotlib's object API: no pyplot, no global state, no GUI backend):
the paper's accuracy vs retraining budget, one panel per pruner, one line per schedule; for a
group with one budget, a bar chart of every pruner × schedule; for several pruning ratios, the
accuracy vs sparsity and vs MACs reduction (structured) or nonzero parameters (unstructured)
trade-off; and the paper's Figure 1, the learning rate of every schedule over a budget, as the
stages ran it.

Every figure is written twice, same stem: a PNG at `DPI` and an SVG (`FORMATS`); the
functions return the PNG's path, one per figure."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nptm.results.analysis import GROUP, order
from nptm.trainables.catalog import PRUNERS, SCHEDULES

DPI = 150  # of the PNGs
FORMATS = (".png", ".svg")  # every figure in each; the first is the path returned


def plot_budget_curves(
    cells: pd.DataFrame, fig_dir: Path, max_figures: int
) -> tuple[list[Path], str]:
    """Accuracy vs budget, one panel per pruner, one line per schedule (the paper's figure).

    One figure per (dataset, model, structure, target) with at least two budgets.
    """
    n_budgets = cells.groupby(GROUP, sort=True)["budget"].nunique()
    drawable = n_budgets[n_budgets >= 2].index
    single = len(n_budgets) - len(drawable)
    capped = max(0, len(drawable) - max_figures)
    chosen = set(drawable[:max_figures])
    paths: list[Path] = []
    if chosen:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    for key, sub in cells.groupby(GROUP, sort=True):
        if key not in chosen:
            continue
        pruners = order(sub["pruner"], tuple(PRUNERS))
        scheds = order(sub["sched"], SCHEDULES)
        colour = {s: f"C{i % 10}" for i, s in enumerate(scheds)}  # same colour in every panel
        fig = Figure(figsize=(2.6 * len(pruners) + 1.9, 2.6))
        axes = fig.subplots(1, len(pruners), sharey=True, squeeze=False)[0]
        # Fixed margins: tight_layout would draw every figure twice.
        width = fig.get_figwidth()
        fig.subplots_adjust(
            left=0.9 / width, right=1 - 1.1 / width, bottom=0.2, top=0.82, wspace=0.08
        )
        handles = {}
        for ax, pruner in zip(axes, pruners, strict=True):
            mine = sub[sub["pruner"] == pruner]
            for sched in scheds:
                line = mine[mine["sched"] == sched].sort_values("budget")
                if line.empty:
                    continue
                x = line["budget"].to_numpy(dtype=float)
                y = line["mean"].to_numpy() * 100
                sd = line["sd"].fillna(0).to_numpy() * 100
                (handles[sched],) = ax.plot(x, y, marker="o", markersize=3, color=colour[sched])
                ax.fill_between(x, y - sd, y + sd, color=colour[sched], alpha=0.15, lw=0)
            ax.set_title(pruner, fontsize=9)
            ax.set_xlabel("budget (epochs)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test accuracy (%)", fontsize=8)
        _schedule_legend(fig, handles, scheds)
        fig.suptitle(" / ".join(map(str, key)) + "  (mean ± sd over seeds)", fontsize=9)
        paths.append(_save(fig, fig_dir, "acc_vs_budget", key))
    notes = []
    if single:
        notes.append(f"{single} group(s) have a single budget: a bar chart shows them")
    if capped:
        notes.append(f"{capped} more group(s) not drawn (limit max_figures={max_figures})")
    return paths, "; ".join(notes)


def plot_budget_bars(
    cells: pd.DataFrame, fig_dir: Path, max_figures: int, level: float = 0.95
) -> tuple[list[Path], str]:
    """Mean ± `level` interval over seeds of every pruner × schedule, one figure per (dataset,
    model, structure, target) with a single budget (`plot_budget_curves` draws the others)."""
    n_budgets = cells.groupby(GROUP, sort=True)["budget"].nunique(dropna=False)
    keys = list(n_budgets[n_budgets == 1].index)
    paths = [
        _save(bar_figure(cells_of(cells, key), key, level), fig_dir, "acc_bars", key)
        for key in keys[:max_figures]
    ]
    capped = len(keys) - len(paths)
    return paths, (f"{capped} more bar chart(s) not drawn (limit {max_figures})" if capped else "")


def cells_of(cells: pd.DataFrame, key: tuple, columns: list[str] = GROUP) -> pd.DataFrame:
    """The cells whose `columns` hold `key` (NaN matches NaN, as in groupby's keys)."""
    mask = pd.Series(True, index=cells.index)
    for col, value in zip(columns, key, strict=True):
        mask &= cells[col].isna() if pd.isna(value) else cells[col] == value
    return cells[mask]


def bar_figure(sub: pd.DataFrame, key: tuple, level: float):
    """Grouped bars: one group per pruner, one bar per schedule, the interval as error bar."""
    from matplotlib.figure import Figure

    pruners = order(sub["pruner"], tuple(PRUNERS))
    scheds = order(sub["sched"], SCHEDULES)
    width = 0.8 / len(scheds)
    fig = Figure(figsize=(max(5.0, 1.0 + 0.35 * len(pruners) * len(scheds) + 1.6), 3.2))
    ax = fig.subplots()
    w = fig.get_figwidth()
    fig.subplots_adjust(left=0.8 / w, right=1 - 1.4 / w, bottom=0.14, top=0.8)
    lows, highs = [], []
    for i, sched in enumerate(scheds):
        mine = sub[sub["sched"] == sched].set_index("pruner")
        xs = [
            j + (i - (len(scheds) - 1) / 2) * width
            for j, p in enumerate(pruners)
            if p in mine.index
        ]
        here = [p for p in pruners if p in mine.index]
        y = mine.loc[here, "mean"].to_numpy(dtype=float) * 100
        err = mine.loc[here, "half_width"].to_numpy(dtype=float) * 100
        ax.bar(xs, y, width, yerr=err, capsize=2, color=f"C{i % 10}", label=sched)
        lows.append((y - np.nan_to_num(err)).min())  # n = 1: no interval
        highs.append((y + np.nan_to_num(err)).max())
    # Accuracies of one group differ by points, not tens of points: zoom on them.
    span = max(max(highs) - min(lows), 1.0)
    ax.set_ylim(max(0.0, min(lows) - 0.3 * span), min(100.0, max(highs) + 0.15 * span))
    ax.set_xticks(range(len(pruners)), pruners, fontsize=7)
    ax.set_ylabel("test accuracy (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, title="schedule")
    budget = sub["budget"].iloc[0]
    where = " / ".join(map(str, key)) + ("" if pd.isna(budget) else f" / budget {int(budget)}")
    fig.suptitle(f"{where}\nmean ± {level * 100:g}% CI over seeds (axis not from 0)", fontsize=9)
    return fig


# x of the trade-off figures: column -> (axis label, scale of the stored value). Masks leave
# the dense MACs unchanged, so only structured pruning gets a MACs panel; unstructured pruning
# gets the nonzero parameters its masks leave instead.
TRADEOFF_X = {
    "achieved_sparsity": ("sparsity (%)", 100.0),
    "macs_reduction": ("MACs reduction (%)", 100.0),
    "nonzero_params": ("nonzero parameters", 1.0),
}
STRUCTURED_X = ("achieved_sparsity", "macs_reduction")
UNSTRUCTURED_X = ("achieved_sparsity", "nonzero_params")


def plot_tradeoff_curves(
    cells: pd.DataFrame, fig_dir: Path, max_figures: int, level: float = 0.95
) -> tuple[list[Path], str]:
    """The pruning trade-off: accuracy vs achieved sparsity and vs MACs reduction (structured)
    or nonzero parameters (unstructured), one panel per pruner, one line per schedule (mean ±
    interval over seeds, x the mean of the runs' stored columns), one figure per (dataset,
    model, structure, budget) with at least two pruning targets."""
    keys = ["dataset", "model", "structure", "budget"]
    n_targets = cells.groupby(keys, sort=True, dropna=False)["target"].nunique()
    groups = {key: cells_of(cells, key, keys) for key in n_targets[n_targets >= 2].index}
    chosen = [key for key, sub in groups.items() if size_measures(sub, key[2])]
    paths = [
        _save(tradeoff_figure(groups[key], key, level), fig_dir, "acc_vs_size", key)
        for key in chosen[:max_figures]
    ]
    capped = len(chosen) - min(len(chosen), max_figures)
    note = f"{capped} more trade-off figure(s) not drawn (limit {max_figures})" if capped else ""
    return paths, note


def size_measures(sub: pd.DataFrame, structure: str) -> list[str]:
    """The size axes of `structure` that the cells `sub` have values of."""
    sizes = STRUCTURED_X if structure == "structured" else UNSTRUCTURED_X
    return [m for m in sizes if m in sub and sub[m].notna().any()]


def tradeoff_figure(sub: pd.DataFrame, key: tuple, level: float):
    """Rows: the size measures of the structure `key[2]` that `sub` has (`STRUCTURED_X`,
    `UNSTRUCTURED_X`); columns: pruners; lines: schedules."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    dataset, model, structure, budget = key
    measures = size_measures(sub, structure)
    pruners = order(sub["pruner"], tuple(PRUNERS))
    scheds = order(sub["sched"], SCHEDULES)
    colour = {s: f"C{i % 10}" for i, s in enumerate(scheds)}
    fig = Figure(figsize=(2.6 * len(pruners) + 1.9, 2.4 * len(measures) + 0.6))
    axes = fig.subplots(len(measures), len(pruners), sharey=True, squeeze=False)
    w, h = fig.get_figwidth(), fig.get_figheight()
    fig.subplots_adjust(
        left=0.9 / w, right=1 - 1.1 / w, bottom=0.55 / h, top=1 - 0.75 / h, wspace=0.08,
        hspace=0.45,
    )  # fmt: skip
    handles = {}
    for row, measure in zip(axes, measures, strict=True):
        label, scale = TRADEOFF_X[measure]
        for ax, pruner in zip(row, pruners, strict=True):
            mine = sub[sub["pruner"] == pruner]
            for sched in scheds:
                line = mine[mine["sched"] == sched].dropna(subset=[measure])
                line = line.sort_values(measure)
                if line.empty:
                    continue
                handles[sched] = ax.errorbar(
                    line[measure].to_numpy(dtype=float) * scale,
                    line["mean"].to_numpy(dtype=float) * 100,
                    yerr=line["half_width"].to_numpy(dtype=float) * 100,
                    marker="o", markersize=3, capsize=2, color=colour[sched],
                )  # fmt: skip
            ax.set_title(pruner, fontsize=9)
            ax.set_xlabel(label, fontsize=8)
            if measure == "nonzero_params":  # a count: 30k, 1.2M
                ax.xaxis.set_major_formatter(EngFormatter())
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("test accuracy (%)", fontsize=8)
    _schedule_legend(fig, handles, scheds)
    where = f"{dataset} / {model} / {structure}" + (
        "" if pd.isna(budget) else f" / budget {int(budget)}"
    )
    versus = " and ".join(TRADEOFF_X[m][0].removesuffix(" (%)") for m in measures)
    fig.suptitle(
        f"{where}\naccuracy vs {versus} (mean ± {level * 100:g}% CI over seeds)", fontsize=9
    )
    return fig


def _save(fig, fig_dir: Path, prefix: str, key: tuple) -> Path:
    """`fig` as ``<prefix>__<key>`` in every format of `FORMATS`; the PNG's path."""
    stem = f"{prefix}__" + _slug("__".join(map(str, key)))  # may hold dots: "ratio-0.5"
    for suffix in FORMATS:
        # No date in the SVG: the same sweep draws the same file.
        meta = {"Date": None} if suffix == ".svg" else None
        fig.savefig(fig_dir / f"{stem}{suffix}", dpi=DPI, metadata=meta)
    return fig_dir / f"{stem}{FORMATS[0]}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def schedule_lines(
    final: pd.DataFrame, epochs: pd.DataFrame
) -> dict[tuple[str, int], dict[str, tuple[list[int], list[float]]]]:
    """(dataset, budget) -> schedule -> (epochs, lr at each epoch's last step), as the train
    loop recorded them for the lowest-seed successful retrain of that schedule and budget."""
    ok = final[(final["status"] == "ok") & final["budget"].notna()]
    runs = epochs.dropna(subset=["lr"]).sort_values("epoch").groupby("stage_id")
    lines: dict[tuple[str, int], dict[str, tuple[list[int], list[float]]]] = {}
    for (dataset, budget), sub in ok.groupby(["dataset", "budget"], sort=True):
        for sched in order(sub["schedule"], SCHEDULES):
            first = sub[sub["schedule"] == sched].sort_values("seed").iloc[0]["stage_id"]
            if first in runs.groups:
                run = runs.get_group(first)
                lines.setdefault((str(dataset), int(budget)), {})[sched] = (
                    run["epoch"].astype(int).tolist(),
                    run["lr"].astype(float).tolist(),
                )
    return lines


def plot_schedules(
    final: pd.DataFrame, epochs: pd.DataFrame, fig_dir: Path, max_figures: int
) -> list[Path]:
    """The paper's Figure 1 for the recipe the sweep really used: one figure per (dataset,
    budget), the learning rate of each schedule per epoch (`schedule_lines`)."""
    lines = schedule_lines(final, epochs) if len(epochs) else {}
    if not lines:
        return []
    from matplotlib.figure import Figure

    paths: list[Path] = []
    for (dataset, budget), scheds in list(lines.items())[:max_figures]:
        fig = Figure(figsize=(5.2, 2.8))
        ax = fig.subplots()
        fig.subplots_adjust(left=0.14, right=0.78, bottom=0.18, top=0.86)
        for i, (sched, (x, lr)) in enumerate(scheds.items()):
            ax.step(x, lr, where="pre", label=sched, color=f"C{i % 10}")  # lr closes its epoch
        ax.set_yscale("log")
        ax.set_xlabel("retraining epoch", fontsize=8)
        ax.set_ylabel("learning rate (epoch's last step)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, title="schedule")
        fig.suptitle(f"{dataset} / budget {budget}: learning rate as run", fontsize=9)
        paths.append(_save(fig, fig_dir, "schedules", (dataset, f"b{budget}")))
    return paths


def _schedule_legend(fig: Any, handles: dict[str, Any], scheds: list[str]) -> None:
    """One legend entry per schedule drawn, in the schedules' order."""
    drawn = [s for s in scheds if s in handles]
    fig.legend(
        [handles[s] for s in drawn],
        drawn,
        loc="center right",
        fontsize=7,
        title="schedule",
        title_fontsize=7,
    )
