"""The schedule-vs-pruner analysis of Le & Hua (ICLR 2021) as tables (pure pandas).

The analysis uses the final-round ``retrain`` rows; those with status ``ok`` carry the numbers,
the others are counted. Retrain rows are completed from their ``prune`` parent (sizes, sparsity,
accuracy before/after pruning) where they lack those columns. Everything is a vectorised
groupby, so a sweep of 100k stages is analysed in seconds.

Statistics: cells are mean ± sample sd over seeds. Comparisons are paired on cell, budget and
seed; the interval is a two-sided Student-t interval over seeds. What a seed replicates, and so
what an interval covers, depends on the grid's `seeds` (`seed_replication` says it in words):
with `per_trial` every seed pre-trains, prunes and retrains its own network; with `shared` the
seeds retrain one pre-trained network and one methodical mask per target, and draw a random
pruner's mask each (`random_masks: per_seed`, the default) or retrain one shared mask. The
claims' verdicts come from the confirmatory family (`nptm.results.confirmatory`: one pooled
test per claim, schedule and structure, Holm-adjusted); the per-budget and per-network
comparisons here are exploratory (Benjamini-Hochberg q-values, no verdict).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from nptm.results.confirmatory import (
    CLAIM_1,
    CLAIM_2,
    RANDOM_VS_METHODICAL,
    paired_differences,
    pooled_tests,
)
from nptm.results.schema import LINEAGE_COLUMNS, STATUSES
from nptm.results.stats import (
    adjust_within,
    benjamini_hochberg,
    grouped_ci,
    t_pvalue,
    tost_pvalue,
    with_verdict,
)
from nptm.trainables.catalog import PRUNERS, SCHEDULES, UNSTRUCTURED_OPTIONS
from nptm.trainables.stage import StageKind, StageStatus

GROUP = ["dataset", "model", "structure", "target"]
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


def successful(final: pd.DataFrame) -> pd.DataFrame:
    """The final-round retrain rows (`final_round_retrain`) whose numbers the analysis reads:
    status ok, with a final test accuracy."""
    return final[(final["status"] == StageStatus.OK) & final["test_acc"].notna()]


def seed_replication(stages: pd.DataFrame, final: pd.DataFrame) -> str:
    """What the seeds of the final retraining runs `final` (`final_round_retrain(stages)`)
    replicate, read from the stages they share, and so what an interval over seeds covers."""
    pruners = final["pruner"].astype(object)
    runs = final[["prune_id", "seed"]].assign(
        pretrain_id=_chain_roots(stages, final["prune_id"]),
        random=pruners.map({p: _is_random(str(p)) for p in pruners.unique()}),
    )
    if runs.empty or runs["seed"].nunique() < 2:
        return "one seed: no interval"
    shared_net = runs.groupby("pretrain_id")["seed"].nunique().gt(1).any()
    if not shared_net:
        return (
            "each seed pre-trains, prunes and retrains its own network (`seeds.pretrain: "
            "per_trial`): an interval covers the variation of the whole pipeline"
        )
    masks = runs.groupby("prune_id").agg(seeds=("seed", "nunique"), random=("random", "first"))
    shared = masks["seeds"].gt(1).groupby(masks["random"]).any()  # per kind of pruner
    text = "every seed retrains one pre-trained network per (dataset, model) (`seeds.pretrain: "
    text += "shared`)"
    covers, given = ["retraining"], ["the pre-trained networks"]
    if shared.get(False, False):
        text += " and one mask per methodical pruner target"
        given.append("the methodical masks")
    elif False in shared:  # iterative rounds after the first prune per seed
        text, covers = text + ", pruned again per seed", [*covers, "the masks"]
    if shared.get(True, False):
        text += ", one mask per random pruner target too (`seeds.random_masks: shared`)"
        given.append("the random masks")
    elif True in shared:
        text += "; a random pruner draws its mask per seed (`seeds.random_masks: per_seed`)"
        covers.append(
            "the random mask's draw where a random pruner is compared with a methodical one "
            "(claim 2; a pair of schedules on one pruner retrains the same mask of its seed)"
        )
    conditions = ", ".join(given[:-1]) + f" and {given[-1]}" if len(given) > 1 else given[0]
    return f"{text}: an interval covers {' and '.join(covers)}, conditional on {conditions}"


def _chain_roots(stages: pd.DataFrame, ids: pd.Series) -> pd.Series:
    """The first stage of each id's chain (its pre-training, stored or not): first parents
    followed up through prune and retrain stages (iterative rounds included)."""
    chain = stages[stages["stage_kind"].isin([StageKind.PRUNE, StageKind.RETRAIN])]
    chain = chain.drop_duplicates("stage_id").set_index("stage_id")["parent_ids"]
    parent = chain.map(lambda p: p[0] if len(p) else None).dropna()
    roots = ids.astype(object)
    for _ in range(2 * len(stages) + 1):  # at most one step per stage of a chain
        up = roots.map(parent)
        if up.isna().all():
            return roots
        roots = up.where(up.notna(), roots)
    return roots


def _is_random(label: str) -> bool:
    """Whether a pruner label ("random", "magnitude[layers=conv+linear]") draws its mask."""
    info = PRUNERS.get(label.split("[")[0])
    return bool(info is not None and info.random_mask)


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
SIZE_COLUMNS = ("achieved_sparsity", "macs_reduction", "nonzero_params")  # trade-off x


def cell_stats(ok: pd.DataFrame, column: str, level: float = 0.95) -> pd.DataFrame:
    """mean, sd, n and the `level` interval's half_width of `column` per (group, budget,
    pruner, schedule), with the mean sizes the cell's runs achieved (`SIZE_COLUMNS`)."""
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


def claim_schedules(diffs: pd.DataFrame, level: float, by: Sequence[str] = ()) -> pd.DataFrame:
    """Claim 1, exploratory, per (group, budget, schedule), from the paired differences
    (`nptm.results.confirmatory.paired_differences`): each large-lr schedule minus ft, same
    pruner, budget and seed, averaged over pruners within a seed (pruners share the seed's
    pre-trained network, so they are not independent replicates); interval and two-sided
    t-test over seeds, `q`: Benjamini-Hochberg over the table's tests."""
    claim_1 = diffs[diffs["claim"] == CLAIM_1]
    out_keys = [*GROUP, "budget", "schedule"]
    per_seed = claim_1.groupby([*by, *out_keys, "seed"], dropna=False, observed=True)["diff"]
    return _exploratory(per_seed.mean().reset_index(), [*by], out_keys, level, 0.0)


def claim_random_clr(
    diffs: pd.DataFrame, level: float, margin: float, by: Sequence[str] = ()
) -> pd.DataFrame:
    """Claim 2, exploratory, per (group, budget, methodical pruner), from the paired
    differences: the random pruner with clr minus the methodical pruner with ft (same budget
    and seed), tested against −`margin` (non-inferiority, two-sided p), with ``p_tost``: the
    TOST p-value that the two are equivalent within ±`margin` (accuracy, 0-1); `q`,
    `q_tost`: Benjamini-Hochberg."""
    random_of = {k: v[0] for k, v in RANDOM_VS_METHODICAL.items()}
    claim_2 = diffs[diffs["claim"] == CLAIM_2]
    claim_2 = claim_2.assign(random=claim_2["structure"].astype(object).map(random_of))
    keys = [*GROUP, "budget", "random", "pruner"]
    res = _exploratory(claim_2, [*by], keys, level, -margin)
    res["p_tost"] = tost_pvalue(res["mean"], res["sd"], res["n"], margin)
    res["q_tost"] = adjust_within(res, "p_tost", [*by], benjamini_hochberg)
    return res


def _exploratory(
    per_seed: pd.DataFrame, by: list[str], keys: list[str], level: float, null: float
) -> pd.DataFrame:
    """Interval over seeds, two-sided p of mean = `null`, BH q within each study of `by`, and
    the reading of q at alpha = 1 − `level` (above / below the null, or "–")."""
    if per_seed.empty:
        return _empty_ci([*by, *keys], ("null", "p", "q")).rename(columns={"verdict": "reading"})
    res = grouped_ci(per_seed, [*by, *keys], "diff", level)
    res["null"] = null
    res["p"] = t_pvalue(res["mean"], res["sd"], res["n"], null)
    res = res.sort_values([*by, *keys], key=sort_key, kind="stable").reset_index(drop=True)
    res["q"] = adjust_within(res, "p", by, benjamini_hochberg)
    significant = res["q"].to_numpy(dtype=float) < 1 - level
    above = res["mean"].to_numpy(dtype=float) > null
    null_text = f"{null * 100:+g}".replace("+0", "0").replace("-", "−")
    res["reading"] = np.select(
        [significant & above, significant & ~above],
        [f"above {null_text}", f"below {null_text}"],
        "–",
    )
    return res


def claim_tables(ok: pd.DataFrame, level: float, margin: float) -> dict[str, pd.DataFrame]:
    """The claims' tables: ``confirmatory``, the pre-declared family whose Holm-adjusted
    verdicts answer the claims (nptm.results.confirmatory), and the exploratory per-budget and
    per-network comparisons ``claim_schedules`` / ``claim_random_clr`` (BH q-values, no
    verdict), all at alpha = 1 − `level`."""
    diffs = paired_differences(ok)
    return {
        "confirmatory": pooled_tests(diffs, level, margin),
        "claim_schedules": claim_schedules(diffs, level),
        "claim_random_clr": claim_random_clr(diffs, level, margin),
    }


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
