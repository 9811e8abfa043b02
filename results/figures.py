"""The report's figures (matplotlib's object API: no pyplot, no global state, no GUI backend):
the paper's accuracy vs retraining budget, one panel per pruner, one line per schedule; and the
paper's Figure 1, the learning rate of every schedule over a budget, as the stages ran it."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from results.analysis import GROUP, order
from trainables.catalog import PRUNERS, SCHEDULES


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
        fig.legend(
            [handles[s] for s in scheds if s in handles],
            [s for s in scheds if s in handles],
            loc="center right",
            fontsize=7,
            title="schedule",
            title_fontsize=7,
        )
        fig.suptitle(" / ".join(map(str, key)) + "  (mean ± sd over seeds)", fontsize=9)
        path = fig_dir / ("acc_vs_budget__" + _slug("__".join(map(str, key))) + ".png")
        fig.savefig(path, dpi=80)
        paths.append(path)
    notes = []
    if single:
        notes.append(f"{single} group(s) have a single budget, so no curve is drawn for them")
    if capped:
        notes.append(f"{capped} more group(s) not drawn (limit max_figures={max_figures})")
    return paths, "; ".join(notes)


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
        path = fig_dir / f"schedules__{_slug(dataset)}__b{budget}.png"
        fig.savefig(path, dpi=80)
        paths.append(path)
    return paths
