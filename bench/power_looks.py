"""Adding seeds where the confirmatory tests are inconclusive (`nptm sweep --until-conclusive`),
by simulation on a shipped grid's real plan: bench/power.py's model of a sweep, drawn at the
design's largest number of seeds K, and the group-sequential rule of nptm.results.sequential
applied look by look to the seeds a test would have had (the grid's, then one more per look).

Per setting: the family-wise rate of false verdicts with the looks (type I under the null),
the same looks read by the report's fixed-sample Holm test at every look ("naive looks"), the
power and the coverage of the repeated intervals per test, the seeds each test used, and the
GPU-hours of the whole sweep: the grid as planned plus, at every look, one seed for the runs
of the open tests' arms only (`nptm.results.adaptive.arm_cells`), at the shipped per-epoch
figures. Against it: the fixed design (every trial of the grid at n seeds, the report's
analysis) at the fewest seeds whose power is at least the sequential design's.

Run by `bench/power.py` (its `--looks` part).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from power import LEVEL, MARGIN, Design, Setting, load_design, run_setting, simulate, stacked
from scipy import stats as sps

ALPHA = 1 - LEVEL


@dataclass
class Costs:
    """GPU-hours (and retrain epochs) of the grid as planned, and of one added seed for the
    arms of each subset of the family's tests (indexed by a bit mask of the open tests)."""

    base_hours: float
    hours: np.ndarray
    epochs: np.ndarray


def family(design: Design) -> pd.DataFrame:
    """The family's tests in the report's order, with their null (0-1)."""
    from nptm.results.confirmatory import CLAIM_2, TEST, in_order, paired_differences

    tests = in_order(paired_differences(design.ok.assign(test_acc=0.0))[TEST].drop_duplicates())
    return tests.assign(null=np.where(tests["claim"] == CLAIM_2, -MARGIN, 0.0))


def plan_hours(grid: str, seeds: int) -> float:
    """GPU-hours of the grid's whole plan at `seeds` seeds (shipped figures)."""
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import load_grid

    override = f"axes.seed=[{','.join(map(str, range(seeds)))}]"
    total = build_plan(load_grid(grid, [override]), confirm_large=True).gpu_hours()["total"]
    return math.nan if total is None else float(total)


def arm_costs(grid: str, design: Design, tests: pd.DataFrame, first: int) -> Costs:
    """`Costs` of the grid at its `first` seeds, and per subset of `tests`, of one seed more
    for their arms' runs."""
    from nptm.orchestrator.gpu_hours import gpu_hours, shipped_figures
    from nptm.results.adaptive import ARM, arm_cells

    ok = design.ok.assign(test_acc=0.0)
    for col in ok.columns:  # the analysis' categoricals back to plain labels for the merge
        if isinstance(ok[col].dtype, pd.CategoricalDtype):
            ok[col] = ok[col].astype(object)
    runs = [arm_cells(ok, tests.iloc[[i]]) for i in range(len(tests))]
    figures = shipped_figures()

    def cost(arms: pd.DataFrame) -> tuple[float, float]:
        epochs = arms.groupby(["model", "dataset"])["budget"].sum()
        hours = gpu_hours({k: int(v) for k, v in epochs.items()}, 0.0, figures)["total"]
        return (math.nan if hours is None else hours), float(epochs.sum())

    m = len(tests)
    hours, epochs = np.zeros(2**m), np.zeros(2**m)
    for mask in range(1, 2**m):
        union = pd.concat([runs[i] for i in range(m) if mask >> i & 1]).drop_duplicates(ARM)
        hours[mask], epochs[mask] = cost(union)
    return Costs(plan_hours(grid, first), hours, epochs)


def per_seed_means(frame: pd.DataFrame, tests: pd.DataFrame, seeds: int) -> np.ndarray:
    """D(s) of each study, test and seed (studies x tests x seeds), tests in `tests`' order."""
    from nptm.results.confirmatory import TEST, paired_differences, seed_means

    d = seed_means(paired_differences(frame, ["study"]), ["study"])
    code = {tuple(t): i for i, t in enumerate(tests[TEST].itertuples(index=False))}
    d = d.assign(test=[code[tuple(t)] for t in d[TEST].itertuples(index=False)])
    d = d.sort_values(["study", "test", "seed"])
    return d["diff"].to_numpy().reshape(-1, len(tests), seeds)


def run_looks(
    d: np.ndarray, null: np.ndarray, looks: list[int], max_seeds: int
) -> dict[str, np.ndarray]:
    """The sequential design on per-seed means `d` (studies x tests x K): per study and test
    the look it was decided at (-1: never), its mean and half-width of the repeated interval
    there, the tests open after each look; and the report's fixed test at every look."""
    from nptm.results.sequential import boundaries_at, holm_levels, holm_look
    from nptm.results.stats import holm

    studies, m, _ = d.shape
    crit = boundaries_at(tuple(looks), max_seeds, holm_levels(ALPHA, m))  # levels x looks
    open_ = np.ones((studies, m), dtype=bool)
    decided_at = np.full((studies, m), -1)
    mean_at, half_at = np.zeros((studies, m)), np.zeros((studies, m))
    open_after, naive = [], np.zeros((studies, m), dtype=bool)
    for j, n in enumerate(looks):
        mean = d[:, :, :n].mean(axis=2)
        se = d[:, :, :n].std(axis=2, ddof=1) / math.sqrt(n)
        abs_t = np.abs(mean - null) / se
        new = holm_look(abs_t, open_, (~open_).sum(axis=1), np.repeat(crit[:, j : j + 1], m, 1))
        still = open_ & ~new
        # the repeated interval where a test stops (or at the last look)
        at = new | (still & (j == len(looks) - 1))
        mean_at[at], half_at[at] = mean[at], (crit[-1, j] * se)[at]
        decided_at[new] = j
        open_ = still
        open_after.append(open_.copy())
        p = 2 * sps.t.sf(abs_t, n - 1)
        naive |= holm(p) < ALPHA  # the fixed report read at every look
    return {
        "decided_at": decided_at,
        "mean": mean_at,
        "half": half_at,
        "open_after": np.stack(open_after, axis=1),
        "naive": naive,
    }


def sequential_setting(
    design: Design,
    tests: pd.DataFrame,
    setting: Setting,
    studies: int,
    rng: np.random.Generator,
    looks: list[int],
    costs: Costs,
    chunk: int = 250,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per test: power, false-verdict rate, coverage, mean seeds; per setting: the
    family-wise rates with the design and with naive looks, expected hours and epochs."""
    max_seeds = looks[-1]
    parts: list[dict[str, np.ndarray]] = []
    started = time.perf_counter()
    truths: dict[str, float] = {}
    for first in range(0, studies, chunk):
        acc, truths = simulate(design, setting, min(chunk, studies - first), rng)
        d = per_seed_means(stacked(design, acc, first), tests, max_seeds)
        parts.append(run_looks(d, tests["null"].to_numpy(), looks, max_seeds))
    res = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    truth = tests["claim"].map(truths).to_numpy()
    null = tests["null"].to_numpy()
    decided = res["decided_at"] >= 0
    above = res["mean"] > null
    at_null = np.isclose(truth, null)
    false = np.where(at_null, decided, decided & ~above)
    seeds = np.where(decided, np.array(looks)[res["decided_at"]], max_seeds)
    steps = np.diff(looks)
    bits = 1 << np.arange(len(tests))
    masks = (res["open_after"][:, :-1] * bits).sum(axis=2)  # open tests after each look
    hours = costs.base_hours + (costs.hours[masks] * steps).sum(axis=1)
    epochs = (costs.epochs[masks] * steps).sum(axis=1)
    table = tests.assign(
        truth=truth,
        power=(decided & above).mean(axis=0),
        false_rate=false.mean(axis=0),
        coverage=(np.abs(res["mean"] - truth) <= res["half"]).mean(axis=0),
        seeds=seeds.mean(axis=0),
    )
    info = {
        "seconds": time.perf_counter() - started,
        "fwer": float(false.any(axis=1).mean()),
        "naive_fwer": float(np.where(at_null, res["naive"], False).any(axis=1).mean()),
        "hours": float(hours.mean()),
        "added_epochs": float(epochs.mean()),
    }
    return table, info


def fixed_equal_power(
    grid: str, setting: Setting, power: float, first: int, max_seeds: int, studies: int, rng
) -> tuple[int | None, float]:
    """The fewest seeds (first..max_seeds) at which the fixed design's lowest power over the
    tests whose truth is off their null reaches `power`, and that power (None: none does)."""
    for seeds in range(first, max_seeds + 1):
        table, _ = run_setting(load_design(grid, seeds), setting, studies, rng)
        off = table[~np.isclose(table["truth"], table["null"])]
        if off["power"].min() >= power - 1e-9:
            return seeds, float(off["power"].min())
    return None, math.nan


def settings(first: int) -> list[Setting]:
    """The null at rho 0, 0.1 and 1 (type I with looks), +0.5 points at rho 0.1 (3 seeds
    suffice) and 1 (they do not), and +0.3 at rho 1 (a smaller effect)."""
    sd, rho = 0.15, 0.1
    null, half = {"effect": 0.0, "claim2": -MARGIN * 100}, {"effect": 0.5, "claim2": 0.0}
    some = {"seed_sd": sd * math.sqrt(1 - rho), "shared_sd": sd * math.sqrt(rho)}
    shared = {"seed_sd": 0.0, "shared_sd": sd}
    return [
        Setting("null, rho 0", **null),
        Setting("null, rho 0.1", **null, **some),
        Setting("null, rho 1", **null, **shared),
        Setting("+0.5, rho 0.1", **half, **some),
        Setting("+0.5, rho 1", **half, **shared),
        Setting("+0.3, rho 1", effect=0.3, claim2=-MARGIN * 100 + 0.3, **shared),
    ]
