"""The confirmatory tests of Le & Hua's two claims: a small pre-declared family whose
estimates pool what the paper pools, tested over seeds (docs/reports.md, "Confirmatory tests").

One test per claim, large-lr schedule and structure present in the sweep:

- claim 1, per schedule s in (lrw, slr, clr) and structure: s − ft on the same cell (dataset,
  model, target, budget, pruner) and seed;
- claim 2, per structure: the random pruner with clr − each methodical pruner with ft on the
  same (dataset, model, target, budget) and seed, against the null −margin (non-inferiority).

Cells that share a seed are not independent (in a `per_trial` grid they share the seed's
pre-trained network and masks; in a `shared` one its random masks; in any grid, its data
order), so each test averages its paired
differences over cells within a seed and runs a one-sample t-test over seeds (df = seeds − 1):
exact whatever the correlation between cells, since seeds are independent replicates of the
whole design. Only cells with a pair in every seed of the test enter it, so each seed averages
the same cells. Every function takes `by`, extra key columns that split the rows into
independent studies (`bench/power.py` analyses thousands of simulated sweeps in one call).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from nptm.results.stats import (
    adjust_within,
    directional_verdict,
    grouped_ci,
    holm,
    t_pvalue,
    tost_pvalue,
)

CLAIM_1, CLAIM_2 = "claim 1", "claim 2"
LARGE_LR_SCHEDULES = ("lrw", "slr", "clr")
# structure -> (random pruner, methodical pruners it is compared with)
RANDOM_VS_METHODICAL = {
    "unstructured": ("random", ("magnitude", "magnitude_layerwise")),
    "structured": ("random_filter", ("l1_filter", "hrank", "taylor_conv_oneshot")),
}
TEST = ["claim", "structure", "comparison"]  # one confirmatory test
CELL = ["dataset", "model", "target", "budget", "pruner"]  # what a test pools over
STRUCTURES = ("structured", "unstructured")


def paired_differences(ok: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """One row per (test, cell, seed): `diff`, the paired difference of the test's two arms
    (test accuracy, 0-1), from the successful final-round runs without schedule overrides
    (`nptm.results.analysis.final_round_retrain`). ``pruner`` is the cell's pruner (claim 2:
    the methodical one), ``schedule`` arm A's schedule."""
    by = list(by)
    plain = ok[ok["variant"] == ""]
    parts = [_claim_1(plain, by), *(_claim_2(plain, by, s) for s in STRUCTURES)]
    columns = [*by, *TEST, *CELL, "schedule", "seed", "diff"]
    parts = [p[columns] for p in parts if len(p)]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=float if c == "diff" else object) for c in columns})
    return pd.concat(parts, ignore_index=True)


def _arm(frame: pd.DataFrame, keys: list[str]) -> pd.Series:
    return frame.groupby(keys, dropna=False, observed=True)["test_acc"].mean()


def _claim_1(plain: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    keys = [*by, "structure", *CELL, "seed"]
    scheds = [s for s in LARGE_LR_SCHEDULES if (plain["schedule"] == s).any()]
    if not scheds or not (plain["schedule"] == "ft").any():
        return pd.DataFrame()
    wide = _arm(plain[plain["schedule"].isin(["ft", *scheds])], [*keys, "schedule"]).unstack(
        "schedule"
    )
    parts = []
    for sched in scheds:
        diff = (wide[sched] - wide["ft"]).dropna().rename("diff").reset_index()
        diff["claim"] = CLAIM_1
        diff["comparison"] = f"{sched} − ft"
        diff["schedule"] = sched
        parts.append(diff)
    return pd.concat(parts, ignore_index=True)


def _claim_2(plain: pd.DataFrame, by: list[str], structure: str) -> pd.DataFrame:
    rnd, methods = RANDOM_VS_METHODICAL[structure]
    here = plain[plain["structure"] == structure]
    keys = [*by, "structure", *(c for c in CELL if c != "pruner"), "seed"]
    random_arm = here[(here["pruner"] == rnd) & (here["schedule"] == "clr")]
    methodical = here[here["pruner"].isin(methods) & (here["schedule"] == "ft")]
    if random_arm.empty or methodical.empty:
        return pd.DataFrame()
    a = _arm(random_arm, keys).rename("acc_random").reset_index()
    b = _arm(methodical, [*keys, "pruner"]).rename("acc_methodical").reset_index()
    pairs = b.merge(a, on=keys)
    pairs["diff"] = pairs["acc_random"] - pairs["acc_methodical"]
    present = "/".join(m for m in methods if m in set(pairs["pruner"]))
    pairs["claim"] = CLAIM_2
    pairs["comparison"] = f"{rnd} + clr − {present} + ft"
    pairs["schedule"] = "clr"
    return pairs


def seed_means(diffs: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Per test and seed: `diff`, the mean paired difference over the test's complete cells
    (those with a pair in every seed of the test), and `cells`, how many."""
    test = [*by, *TEST]
    seeds = diffs.groupby(test, dropna=False, observed=True)["seed"].transform("nunique")
    per_cell = diffs.groupby([*test, *CELL], dropna=False, observed=True)["seed"].transform(
        "nunique"
    )
    complete = diffs[per_cell == seeds]
    return (
        complete.groupby([*test, "seed"], dropna=False, observed=True)["diff"]
        .agg(diff="mean", cells="size")
        .reset_index()
    )


def confirmatory_tests(
    ok: pd.DataFrame, level: float, margin: float, by: Sequence[str] = ()
) -> pd.DataFrame:
    """The confirmatory family: per test, the pooled difference over seeds (mean, sd, n
    seeds, `cells`, the two-sided `level` interval low/high), `null` (claim 1: 0; claim 2:
    −`margin`), `p` (two-sided t-test of mean = null), `p_holm` (Holm over every test of
    both claims, within each study of `by`) and `verdict`; claim 2 adds the secondary
    equivalence reading `p_tost` / `p_tost_holm` (TOST at ±`margin`, its own Holm family)."""
    return pooled_tests(paired_differences(ok, by), level, margin, by)


def pooled_tests(
    diffs: pd.DataFrame, level: float, margin: float, by: Sequence[str] = ()
) -> pd.DataFrame:
    """`confirmatory_tests` from the paired differences (`paired_differences`)."""
    by = list(by)
    test = [*by, *TEST]
    per_seed = seed_means(diffs, by)
    if per_seed.empty:
        return _empty(by)
    out = grouped_ci(per_seed, test, "diff", level)
    cells = per_seed.groupby(test, dropna=False, observed=True)["cells"].max()
    out = out.merge(cells.reset_index(), on=test, how="left")
    out["null"] = np.where(out["claim"] == CLAIM_2, -margin, 0.0)
    out["p"] = t_pvalue(out["mean"], out["sd"], out["n"], out["null"])
    out = in_order(out, by)
    alpha = 1 - level
    out["p_holm"] = adjust_within(out, "p", by, holm)
    out["verdict"] = directional_verdict(out["mean"], out["null"], out["p_holm"], alpha)
    claim_2 = out["claim"] == CLAIM_2
    tost = tost_pvalue(out["mean"], out["sd"], out["n"], margin)
    out["p_tost"] = np.where(claim_2, tost, np.nan)
    out["p_tost_holm"] = adjust_within(out, "p_tost", by, holm)
    out["equivalent"] = np.where(
        claim_2, np.where(out["p_tost_holm"] < alpha, "yes", "not shown"), ""
    )
    return out[_columns(by)]


def in_order(out: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Claim 1 before claim 2, then the schedules in the paper's order, then the structure."""
    comparison = out["comparison"].map(
        lambda c: next((i for i, s in enumerate(LARGE_LR_SCHEDULES) if c.startswith(s)), 9)
    )
    rank = out["claim"].map({CLAIM_1: 0, CLAIM_2: 1}) * 100 + comparison * 10
    rank = rank + out["structure"].map({s: i for i, s in enumerate(STRUCTURES)}).fillna(9)
    keys = [*by, "_rank"]
    ordered = out.assign(_rank=rank).sort_values(keys, kind="stable")
    return ordered.drop(columns="_rank").reset_index(drop=True)


def _columns(by: list[str]) -> list[str]:
    return [*by, *TEST, "cells", "n", "mean", "sd", "half_width", "low", "high", "null", "p",
            "p_holm", "verdict", "p_tost", "p_tost_holm", "equivalent"]  # fmt: skip


def _empty(by: list[str]) -> pd.DataFrame:
    text = {*by, *TEST, "verdict", "equivalent"}
    return pd.DataFrame({c: pd.Series(dtype=object if c in text else float) for c in _columns(by)})
