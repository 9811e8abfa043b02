"""The schedule-vs-pruner analysis of Le & Hua (ICLR 2021) as tables (pure pandas).

The analysis uses the final-round ``retrain`` rows; those with status ``ok`` carry the numbers,
the others are counted. Retrain rows are completed from their ``prune`` parent (sizes, sparsity,
accuracy before/after pruning) where they lack those columns. Everything is a vectorised
groupby, so a sweep of 100k stages is analysed in seconds.

Statistics: cells are mean ± sample sd over seeds. Comparisons are paired on seed (the same
pre-trained network) and budget; the interval is a two-sided Student-t interval over seeds, read
by `nptm.results.stats.with_verdict`. The claims' verdicts come from their t-test (and, for claim 2,
TOST equivalence) p-values after Holm's correction over all the claims' tests
(`nptm.results.stats.holm_verdicts`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from nptm.results.schema import LINEAGE_COLUMNS, STATUSES
from nptm.results.stats import grouped_ci, holm_verdicts, t_pvalue, tost_paired, with_verdict
from nptm.trainables.catalog import PRUNERS, SCHEDULES, UNSTRUCTURED_OPTIONS
from nptm.trainables.stage import StageKind

GROUP = ["dataset", "model", "structure", "target"]
# structure -> (random pruner, methodical pruners it is compared with)
RANDOM_VS_METHODICAL = {
    "unstructured": ("random", ("magnitude", "magnitude_layerwise")),
    "structured": ("random_filter", ("l1_filter", "hrank", "taylor_conv_oneshot")),
}
LARGE_LR_SCHEDULES = ("lrw", "slr", "clr")
# Columns a retrain row inherits from its prune parent when it lacks them.
FROM_PRUNE = ("structured", *LINEAGE_COLUMNS)


def final_round_retrain(stages: pd.DataFrame) -> pd.DataFrame:
    """Retrain rows of the last pruning round of each configuration, with derived labels.

    Adds: ``structure`` (structured/unstructured), ``target`` (``ratio=0.5`` / ``preset=A``),
    ``budget``, ``variant`` (the overrides, "" if none), ``sched`` (schedule plus variant)
    and ``prune_id`` (the prune parent, used to count each pruned network once).
    """
    for col in ("pruner_options", "emptied_layers"):  # absent from tables of older versions
        if col not in stages:
            stages = stages.assign(**{col: pd.NA})
    r = stages[stages["stage_kind"] == StageKind.RETRAIN].copy()
    prune = stages[stages["stage_kind"] == StageKind.PRUNE].drop_duplicates("stage_id")
    r["prune_id"] = r["stage_id"].astype(object)
    if len(r) and len(prune):
        parents = r[["stage_id", "parent_ids"]].explode("parent_ids")
        parents = parents[parents["parent_ids"].isin(set(prune["stage_id"]))]
        parent_of = parents.drop_duplicates("stage_id").set_index("stage_id")["parent_ids"]
        mapped = r["stage_id"].map(parent_of)
        r["prune_id"] = mapped.where(mapped.notna(), r["stage_id"]).astype(object)
        # One index lookup, then a positional take per column (-1: no prune parent -> NA).
        pos = pd.Index(prune["stage_id"]).get_indexer(r["prune_id"])
        for col in FROM_PRUNE:
            if r[col].notna().all():
                continue
            inherited = pd.Series(
                prune[col].array.take(pos, allow_fill=True), index=r.index, dtype=prune[col].dtype
            )
            r[col] = r[col].where(r[col].notna(), inherited)
    catalog_structured = {name: info.structured for name, info in PRUNERS.items()}
    structured = r["structured"].where(r["structured"].notna(), r["pruner"].map(catalog_structured))
    r["structure"] = np.select(
        [structured.eq(True).fillna(False), structured.eq(False).fillna(False)],
        ["structured", "unstructured"],
        "unknown",
    )
    r["target"] = _labels(r["ratio"], lambda x: f"ratio={x:g}").where(
        r["ratio"].notna(), _labels(r["preset"], lambda x: f"preset={x}")
    )
    r["budget"] = r["budget_epochs"]
    # A pruner run with non-default options is another pruner: "magnitude[layers=conv+linear]".
    r["pruner"] = r["pruner"].astype(object) + r["pruner_options"].map(
        _options_label, na_action="ignore"
    ).fillna("")
    overrides = r["overrides"].astype(object).where(r["overrides"].notna(), "{}")
    lr_label = _labels(r["lr_override"], lambda x: f'{{"lr":{x:g}}}')
    variant = overrides.where(overrides != "{}", lr_label.where(r["lr_override"].notna(), ""))
    r["variant"] = variant.astype(object)
    r["sched"] = (r["schedule"].astype(object) + np.where(variant != "", " " + variant, "")).astype(
        object
    )
    config = [*GROUP, "pruner", "sched", "budget"]
    last = r.groupby(config, dropna=False, sort=False)["round"].transform("max")
    return r[r["round"] == last]


def _labels(values: pd.Series, fmt: Any) -> pd.Series:
    """Format each distinct value once (fast on 100k rows with few distinct values)."""
    uniques = values.dropna().unique()
    return values.map({u: fmt(u) for u in uniques}).astype(object)


def order(values: Any, reference: tuple[str, ...]) -> list[Any]:
    rank = {name: i for i, name in enumerate(reference)}
    return sorted(set(values), key=lambda v: (rank.get(str(v).split(" ")[0], len(rank)), str(v)))


def status_counts(final: pd.DataFrame) -> pd.DataFrame:
    """Final-round retrain rows per status, per (dataset, model, structure, target)."""
    counts = final.groupby([*GROUP, "status"], sort=True).size().unstack(fill_value=0)
    for status in STATUSES:
        if status not in counts:
            counts[status] = 0
    counts = counts[[*STATUSES, *[c for c in counts if c not in STATUSES]]]
    return counts.reset_index()


CELL = [*GROUP, "budget", "pruner", "sched"]
SIZE_COLUMNS = ("achieved_sparsity", "macs_reduction")  # x of the trade-off curves


def cell_stats(ok: pd.DataFrame, column: str, level: float = 0.95) -> pd.DataFrame:
    """mean, sd, n and the `level` interval's half_width of `column` per (group, budget,
    pruner, schedule), with the mean sparsity and MACs reduction the cell's runs achieved."""
    have = ok[ok[column].notna()]
    stats = grouped_ci(have, CELL, column, level)[[*CELL, "mean", "sd", "n", "half_width"]]
    sizes = have.groupby(CELL, dropna=False, sort=True)[list(SIZE_COLUMNS)].mean()
    return stats.merge(sizes.reset_index(), on=CELL, how="left")


def _seed_means(frame: pd.DataFrame, keys: list[str], name: str) -> pd.DataFrame:
    return (
        frame.groupby([*keys, "seed"], dropna=False)["test_acc"].mean().rename(name).reset_index()
    )


def random_vs_methodical(ok: pd.DataFrame, cells: pd.DataFrame, level: float) -> pd.DataFrame:
    """Random pruner with its best schedule (per budget) minus each methodical pruner with ft."""
    parts = []
    for structure, (rnd, methods) in RANDOM_VS_METHODICAL.items():
        rc = cells[(cells["structure"] == structure) & (cells["pruner"] == rnd)]
        if rc.empty:
            continue
        best = rc.sort_values("mean", ascending=False, kind="stable").drop_duplicates(
            [*GROUP, "budget"]
        )[[*GROUP, "budget", "sched"]]
        arm_a = ok[(ok["pruner"] == rnd) & (ok["structure"] == structure)].merge(
            best, on=[*GROUP, "budget", "sched"]
        )
        a = _seed_means(arm_a, [*GROUP, "budget", "sched"], "acc_random")
        a = a.rename(columns={"sched": "random_schedule"})
        arm_b = ok[ok["pruner"].isin(methods) & (ok["schedule"] == "ft")]
        b = _seed_means(arm_b, [*GROUP, "budget", "pruner", "sched"], "acc_methodical")
        b = b.rename(columns={"pruner": "methodical", "sched": "methodical_schedule"})
        parts.append(b.merge(a, on=[*GROUP, "budget", "seed"]))
    keys = [*GROUP, "budget", "methodical", "methodical_schedule", "random_schedule"]
    if not parts:
        return _empty_ci(keys)
    pairs = pd.concat(parts, ignore_index=True)
    pairs["diff"] = pairs["acc_random"] - pairs["acc_methodical"]
    res = with_verdict(grouped_ci(pairs, keys, "diff", level))
    return res.sort_values(keys, key=sort_key, kind="stable").reset_index(drop=True)


def _empty_ci(keys: list[str], extra: tuple[str, ...] = ()) -> pd.DataFrame:
    cols = [*keys, "mean", "sd", "n", "half_width", "low", "high", *extra, "verdict"]
    return pd.DataFrame({c: pd.Series(dtype=float if c in extra else object) for c in cols})


def claim_schedules(ok: pd.DataFrame, level: float) -> pd.DataFrame:
    """Claim 1: each large-lr schedule minus ft, same pruner, budget and seed.

    Differences are averaged over pruners within a seed (pruners share the seed's pre-trained
    network, so they are not independent replicates); the interval is over seeds.
    """
    plain = ok[ok["variant"] == ""]
    keys = [*GROUP, "budget", "pruner"]
    ft = _seed_means(plain[plain["schedule"] == "ft"], keys, "acc_ft")
    parts = []
    for sched in LARGE_LR_SCHEDULES:
        s = _seed_means(plain[plain["schedule"] == sched], keys, "acc_s").merge(
            ft, on=[*keys, "seed"]
        )
        s["schedule"] = sched
        parts.append(s)
    out_keys = [*GROUP, "budget", "schedule"]
    pairs = pd.concat(parts, ignore_index=True)
    if pairs.empty:
        return _empty_ci(out_keys, ("p",))
    pairs["diff"] = pairs["acc_s"] - pairs["acc_ft"]
    per_seed = pairs.groupby([*out_keys, "seed"], dropna=False)["diff"].mean().reset_index()
    res = with_verdict(_with_p(grouped_ci(per_seed, out_keys, "diff", level)))
    return res.sort_values(out_keys, key=sort_key, kind="stable").reset_index(drop=True)


def claim_random_clr(ok: pd.DataFrame, level: float, margin: float) -> pd.DataFrame:
    """Claim 2: random pruner + clr minus each methodical pruner + ft (same budget and seed),
    with ``p_tost``: the paired TOST p-value that the two are equivalent within ±`margin`
    (accuracy, 0-1)."""
    plain = ok[ok["variant"] == ""]
    parts = []
    for structure, (rnd, methods) in RANDOM_VS_METHODICAL.items():
        here = plain[plain["structure"] == structure]
        a = _seed_means(
            here[(here["pruner"] == rnd) & (here["schedule"] == "clr")],
            [*GROUP, "budget"],
            "acc_random",
        )
        b = _seed_means(
            here[here["pruner"].isin(methods) & (here["schedule"] == "ft")],
            [*GROUP, "budget", "pruner"],
            "acc_methodical",
        )
        pair = b.merge(a, on=[*GROUP, "budget", "seed"])
        pair["random"] = rnd
        parts.append(pair)
    keys = [*GROUP, "budget", "random", "pruner"]
    pairs = pd.concat(parts, ignore_index=True)
    if pairs.empty:
        return _empty_ci(keys, ("p", "p_tost"))
    pairs["diff"] = pairs["acc_random"] - pairs["acc_methodical"]
    res = with_verdict(_with_p(grouped_ci(pairs, keys, "diff", level)))
    tost = (
        pairs.groupby(keys, dropna=False, sort=False)[["acc_random", "acc_methodical"]]
        .apply(lambda g: tost_paired(g["acc_random"], g["acc_methodical"], margin))
        .rename("p_tost")
        .reset_index()
    )
    res = res.merge(tost, on=keys, how="left")  # merge matches NaN keys (no budget)
    return res.sort_values(keys, key=sort_key, kind="stable").reset_index(drop=True)


def claim_tables(ok: pd.DataFrame, level: float, margin: float) -> dict[str, pd.DataFrame]:
    """Claims 1 and 2, their verdicts read from Holm-adjusted p-values: every test of both
    claims (t-tests and claim 2's TOST) is one family at alpha = 1 - `level`."""
    tables = {
        "claim_schedules": claim_schedules(ok, level),
        "claim_random_clr": claim_random_clr(ok, level, margin),
    }
    holm_verdicts(list(tables.values()), 1 - level)
    return tables


def _with_p(cis: pd.DataFrame) -> pd.DataFrame:
    cis["p"] = t_pvalue(cis["mean"].to_numpy(), cis["sd"].to_numpy(), cis["n"].to_numpy())
    return cis


def pruning_effect(ok: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Size reductions and accuracy before pruning, right after it and after retraining."""
    keys = [*GROUP, "pruner"]
    if ok.empty:
        return pd.DataFrame(columns=[*keys, "n_pruned"])
    once = ok.drop_duplicates("prune_id")  # one row per pruned network
    numeric = [
        "achieved_sparsity",
        "params_reduction",
        "macs_reduction",
        "acc_before_prune",
        "acc_after_prune",
    ]
    agg = once.groupby(keys, dropna=False)[numeric].mean()
    agg["n_pruned"] = once.groupby(keys, dropna=False).size()
    agg = agg.reset_index()
    # After retraining: at the largest budget of each group, plain ft and the best schedule.
    top = cells[cells["budget"] == cells.groupby(keys, dropna=False)["budget"].transform("max")]
    ft = top[top["sched"] == "ft"].set_index(keys)["mean"].rename("acc_ft")
    best = top.sort_values("mean", ascending=False, kind="stable").drop_duplicates(keys)
    best = best.set_index(keys)[["budget", "sched", "mean"]].rename(
        columns={"budget": "at_budget", "sched": "best_schedule", "mean": "acc_best"}
    )
    agg = agg.join(ft, on=keys).join(best, on=keys)
    return agg.sort_values(keys, key=sort_key, kind="stable").reset_index(drop=True)


def sort_key(col: pd.Series) -> pd.Series:
    if col.name in ("pruner", "methodical"):
        rank = {p: i for i, p in enumerate(PRUNERS)}
        return col.map(lambda p: rank.get(p, len(rank)))
    if col.name == "schedule":
        rank = {p: i for i, p in enumerate(SCHEDULES)}
        return col.map(lambda p: rank.get(p, len(rank)))
    return col


def _options_label(options_json: str) -> str:
    """Label of the options that differ from the defaults ("[layers=conv+linear]"), or ""."""
    options = json.loads(options_json) if options_json else {}
    diff = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in sorted(options.items()) if UNSTRUCTURED_OPTIONS.get(k) != v]  # fmt: skip
    return f"[{','.join(diff)}]" if diff else ""
