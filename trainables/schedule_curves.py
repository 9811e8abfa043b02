"""`nptm schedules`: the lr (and momentum) of every retraining schedule over a budget.

The paper's Figure 1, computed by the functions the train loop uses
(`nptm.trainables.schedules.lr_schedule` / `momentum_schedule`, with the dataset's default recipe
and the steps per epoch of its whole training set at the recipe's global batch, as the paper
trains: no hold-out). Values are per optimizer step; the table and the JSON show the first
step of every epoch, the plot every step.

`scratch_e` and `scratch_b` are not drawn at the budget: they train T epochs and
T x base MACs / pruned MACs epochs (see `nptm inspect` for a pruned network's MACs), whatever
the budget is; their curve is the pre-training schedule stretched to that length.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from nptm.trainables.catalog import DATASETS, FULL_LENGTH_SCHEDULES, SCHEDULES
from nptm.trainables.recipe import DEFAULT_RECIPES, Recipe
from nptm.trainables.schedules import lr_schedule, momentum_schedule, rewind_epoch

# The schedules whose length is the retraining budget, in the catalog's order.
BUDGET_SCHEDULES: tuple[str, ...] = tuple(s for s in SCHEDULES if s not in FULL_LENGTH_SCHEDULES)


def steps_per_epoch(dataset: str, recipe: Recipe) -> int:
    """Optimizer steps of one epoch over the whole training set at the recipe's global batch."""
    return math.ceil(DATASETS[dataset].train_size / recipe.batch_size)


def schedule_curves(dataset: str, budget: int) -> dict[str, Any]:
    """Per-step lr and momentum of every budget-length schedule; ValueError on bad input."""
    if dataset not in DEFAULT_RECIPES:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DEFAULT_RECIPES)}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"budget: {budget!r} must be a positive integer")
    recipe = DEFAULT_RECIPES[dataset]
    spe = steps_per_epoch(dataset, recipe)
    curves: dict[str, dict[str, np.ndarray]] = {}
    skipped: dict[str, str] = {}
    for name in BUDGET_SCHEDULES:
        try:
            if SCHEDULES[name].rewinds:
                rewind_epoch(recipe, budget)
        except ValueError as err:
            skipped[name] = str(err)
            continue
        kw = {"budget": budget, "steps_per_epoch": spe, "recipe": recipe}
        lr = lr_schedule(name, **kw)
        momentum = momentum_schedule(name, **kw)  # None: the recipe's fixed momentum
        if momentum is None:
            momentum = np.full(len(lr), recipe.momentum, dtype=np.float64)
        curves[name] = {"lr": lr, "momentum": momentum}
    for name in sorted(FULL_LENGTH_SCHEDULES):
        skipped[name] = "trains its own length, not the budget"
    return {
        "dataset": dataset,
        "budget": budget,
        "steps_per_epoch": spe,
        "recipe": recipe.model_dump(mode="json"),
        "curves": curves,
        "skipped": skipped,
    }


def per_epoch(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON view: lr and momentum at the first step of every epoch (1-based epochs)."""
    spe = result["steps_per_epoch"]
    return {
        "dataset": result["dataset"],
        "budget": result["budget"],
        "steps_per_epoch": spe,
        "recipe": result["recipe"],
        "epochs": list(range(1, result["budget"] + 1)),
        "schedules": {
            name: {key: curve[key][::spe].tolist() for key in ("lr", "momentum")}
            for name, curve in result["curves"].items()
        },
        "skipped": result["skipped"],
    }


def plot_curves(result: dict[str, Any], path: str | Path) -> Path:
    """Every step of every curve against epochs: lr above, momentum below (PNG)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    spe = result["steps_per_epoch"]
    fig = Figure(figsize=(7.5, 5.0))
    ax_lr, ax_m = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for i, (name, curve) in enumerate(result["curves"].items()):
        x = np.arange(len(curve["lr"])) / spe
        ax_lr.plot(x, curve["lr"], color=f"C{i % 10}", label=name, lw=1.2)
        ax_m.plot(x, curve["momentum"], color=f"C{i % 10}", lw=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title(
        f"{result['dataset']}: retraining schedules over {result['budget']} epochs", fontsize=10
    )
    ax_lr.legend(fontsize=8)
    ax_m.set_ylabel("momentum")
    ax_m.set_xlabel("retraining epoch")
    for ax in (ax_lr, ax_m):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=90)
    return out
