"""Power of the report's confirmatory tests (`nptm plan GRID --power`, docs/reports.md).

Each confirmatory test (nptm.results.confirmatory) is a one-sample t-test, over S seeds, of the
per-seed mean of a test's paired differences, two-sided, Holm-adjusted over the family of m
tests. Its power to declare "supported" when the truth is `effect` away from the test's null
is the exact noncentral-t probability

    P(T' > t_{1 - a/2, S-1}),  T' ~ t'(df = S - 1, ncp = effect * sqrt(S) / sd),  a = alpha / m,

at Holm's first step (the most conservative: later steps test at alpha / (m - 1), ...), so
it is a lower bound for every test of the family. `sd` is the sd over seeds of the per-seed
pooled difference: observed in a finished sweep, or from a run's seed sd and the correlation
of the paired differences of two cells within a seed (`pooled_sd`).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import pandas as pd
from scipy import optimize
from scipy import stats as sps

MAX_SEEDS = 10_000


def directional_power(effect: float, sd: float, seeds: int, alpha: float) -> float:
    """Probability that the two-sided one-sample t-test at level `alpha` over `seeds` values
    of sd `sd` rejects on the side of a true `effect` (> 0), exactly (noncentral t)."""
    if seeds < 2:
        return 0.0
    dof = seeds - 1
    crit = sps.t.ppf(1 - alpha / 2, dof)
    return float(sps.nct.sf(crit, dof, effect * math.sqrt(seeds) / sd))


def min_detectable_effect(sd: float, seeds: int, alpha: float, power: float) -> float:
    """The smallest true effect the test detects with probability `power` (inf below 2 seeds)."""
    if seeds < 2:
        return math.inf
    high = sd
    while directional_power(high, sd, seeds, alpha) < power:
        high *= 2
    return float(
        optimize.brentq(lambda e: directional_power(e, sd, seeds, alpha) - power, 0.0, high)
    )


def seeds_needed(effect: float, sd: float, alpha: float, power: float) -> int | None:
    """The fewest seeds (>= 2) at which the test detects `effect` with probability `power`;
    None beyond MAX_SEEDS."""
    for seeds in range(2, MAX_SEEDS + 1):
        if directional_power(effect, sd, seeds, alpha) >= power:
            return seeds
    return None


def pooled_sd(run_sd: float, cells: int, correlation: float) -> float:
    """sd over seeds of the per-seed mean of `cells` paired differences, each the difference
    of two runs of seed sd `run_sd` (independent of each other), when the differences of two
    cells of one seed have correlation `correlation`: sqrt(2 run_sd^2 (rho + (1 - rho) / C))."""
    return run_sd * math.sqrt(2 * (correlation + (1 - correlation) / cells))


@dataclass(frozen=True)
class PowerSettings:
    """What `nptm plan --power` is asked (points of accuracy; alpha family-wise)."""

    effect: float = 0.5  # distance of the truth from each test's null (claim 2: from -margin)
    sd: float = 0.15  # seed sd of one run
    correlation: float = 0.0  # of two cells' paired differences within a seed
    power: float = 0.8
    alpha: float = 0.05


def plan_design(plan) -> pd.DataFrame:
    """The confirmatory tests a grid's plan makes (claim, structure, comparison) with their
    `cells` and `seeds`, by the report's own code path on the plan's stages table."""
    from nptm.results.confirmatory import TEST, in_order, paired_differences, seed_means

    per_seed = seed_means(paired_differences(plan_final_ok(plan)))
    design = per_seed.groupby(TEST, sort=False).agg(
        cells=("cells", "max"), seeds=("seed", "nunique")
    )
    return in_order(design.reset_index())


def plan_stages(plan) -> pd.DataFrame:
    """The stages table a finished sweep of `plan` stores (every stage ok, no measurements):
    the rows nptm.results.sink writes, in the stored columns."""
    from nptm.results.schema import STAGES_SCHEMA
    from nptm.results.sink import stage_rows
    from nptm.trainables.stage import StageOutcome, StageStatus

    rows = [
        stage_rows(plan.name, spec, StageOutcome(sid, spec.kind, StageStatus.OK), reused=False)[0]
        for sid, spec in plan.stages.items()
    ]
    return pd.DataFrame(rows).reindex(columns=STAGES_SCHEMA.names)


def plan_final_ok(plan) -> pd.DataFrame:
    """`plan_stages` through `final_round_retrain`, as the report reads it (test_acc 0)."""
    from nptm.results.analysis import final_round_retrain

    return final_round_retrain(plan_stages(plan).assign(test_acc=0.0))


def modelled_sds(design: pd.DataFrame, settings: PowerSettings) -> pd.Series:
    """Per test of `design`: `pooled_sd` of its cells from the settings' run sd and
    correlation (points)."""
    sds = [pooled_sd(settings.sd, int(c), settings.correlation) for c in design["cells"]]
    return pd.Series(sds, index=design.index, dtype=float)


def power_table(design: pd.DataFrame, sds: pd.Series, settings: PowerSettings) -> pd.DataFrame:
    """Per test of `design` with `sds`, the sd of its per-seed pooled difference (points; NaN:
    unknown): the minimum detectable effect at the design's seeds (`mde`), the `power` at
    the settings' effect and the seeds needed for the settings' power, all at Holm's
    first-step alpha (`alpha_step`); NaN (None) where the sd is unknown."""
    out = design.copy()
    out["sd"] = sds.to_numpy(dtype=float)
    a = settings.alpha / max(len(out), 1)
    out["alpha_step"] = a

    def each(fn, r) -> float | int | None:
        return None if math.isnan(r.sd) or r.sd <= 0 else fn(r)

    rows = list(out.itertuples(index=False))
    out["mde"] = [
        each(lambda r: min_detectable_effect(r.sd, int(r.seeds), a, settings.power), r)
        for r in rows
    ]
    out["power"] = [
        each(lambda r: directional_power(settings.effect, r.sd, int(r.seeds), a), r) for r in rows
    ]
    out["seeds_needed"] = [
        each(lambda r: seeds_needed(settings.effect, r.sd, a, settings.power), r) for r in rows
    ]
    return out


def observed_sds(stages: pd.DataFrame, design: pd.DataFrame) -> pd.Series:
    """The sd over seeds of each design test's per-seed pooled difference in a finished sweep
    (points; NaN where the sweep lacks the test or has fewer than 2 seeds of it)."""
    from nptm.results.analysis import final_round_retrain, successful
    from nptm.results.confirmatory import TEST, paired_differences, seed_means

    ok = successful(final_round_retrain(stages))
    per_seed = seed_means(paired_differences(ok))
    sd = per_seed.groupby(TEST, sort=False)["diff"].std() * 100
    return design.join(sd.rename("sd"), on=TEST)["sd"]


def render_power(table: pd.DataFrame, settings: PowerSettings, source: str) -> str:
    """The `nptm plan --power` text: a line of method, then one row per test."""
    from nptm.results.tables import text_table

    if table.empty:
        return "power: the grid makes no confirmatory test (it lacks the paired runs)"
    m = len(table)
    method = (
        f"Power of the report's {m} confirmatory tests (docs/reports.md): one-sample t-tests "
        "over seeds of each test's per-seed mean paired difference (df = seeds - 1, "
        "two-sided); power by the exact noncentral t (scipy.stats.nct) at Holm's first-step "
        f"alpha {settings.alpha:g}/{m} = {settings.alpha / m:.4g}, the family's most "
        "conservative step: a lower bound for every test. Effect: the truth's distance from "
        f"each test's null, {settings.effect:g} points (claim 1: a gain of "
        f"{settings.effect:g}; claim 2: random + clr at -margin + {settings.effect:g}); "
        f"target power {settings.power:g}. sd of the per-seed pooled difference: {source}."
    )
    head = [textwrap.fill(method, 100)]

    def fmt(x: float | None, spec: str) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    rows = [
        [r.claim, r.structure, r.comparison, int(r.cells), int(r.seeds), fmt(r.sd, ".4f"),
         fmt(r.mde, ".3f"), fmt(r.power, ".3f"), fmt(r.seeds_needed, "d")]
        for r in table.itertuples(index=False)
    ]  # fmt: skip
    headers = ["claim", "structure", "comparison", "cells", "seeds", "sd (pp)", "MDE (pp)",
               f"power at {settings.effect:g}", f"seeds for {settings.power:g}"]  # fmt: skip
    return "\n".join([*head, "", text_table(headers, rows, right=range(3, 9))])


def worst_case(settings: PowerSettings, tests: int, seeds: int) -> str:
    """The line for rho = 1 (a seed moves every cell alike: pooling over cells does not
    shrink the sd), where every test's sd is the same."""
    sd = pooled_sd(settings.sd, 1, 1.0)
    a = settings.alpha / max(tests, 1)
    power = directional_power(settings.effect, sd, seeds, a)
    needed = seeds_needed(settings.effect, sd, a, settings.power)
    return textwrap.fill(
        f"If instead rho = 1 (a seed moves every cell alike), every test's sd is "
        f"{settings.sd:g} * sqrt(2) = {sd:.3f} points: power {power:.3f} at {seeds} seeds, "
        f"{needed} seeds for {settings.power:g} (at the first Holm step).",
        100,
    )
