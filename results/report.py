"""`nptm report`: the schedule-vs-pruner analysis of Le & Hua (ICLR 2021) for one sweep.

The analysis uses the final-round ``retrain`` rows; those with status ``ok`` carry the numbers,
the others are counted. Retrain rows are completed from their ``prune`` parent (sizes, sparsity,
accuracy before/after pruning) where they lack those columns. Everything is a vectorised
groupby, so a sweep of 100k stages is analysed in seconds; only the accuracy-vs-budget figures
are drawn (at most `max_figures`).

Statistics: cells are mean ± sample sd over seeds. Comparisons are paired on seed (the same
pre-trained network) and budget; the interval is a two-sided Student-t interval over seeds.
A claim is *supported* when the interval lies above 0, *contradicted* when below 0 and
*inconclusive* otherwise (including n = 1, where no interval exists).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from results.schema import LINEAGE_COLUMNS
from results.stats import CONTRADICTED, INCONCLUSIVE, SUPPORTED, grouped_ci
from results.store import SweepStore
from trainables.catalog import PRUNERS, SCHEDULES
from trainables.stage import StageKind, StageStatus

GROUP = ["dataset", "model", "structure", "target"]
# structure -> (random pruner, methodical pruners it is compared with)
RANDOM_VS_METHODICAL = {
    "unstructured": ("random", ("magnitude", "magnitude_layerwise")),
    "structured": ("random_filter", ("l1_filter", "hrank", "taylor")),
}
LARGE_LR_SCHEDULES = ("lrw", "slr", "clr")
# Columns a retrain row inherits from its prune parent when it lacks them.
FROM_PRUNE = ("structured", *LINEAGE_COLUMNS)
STATUSES = tuple(s.value for s in StageStatus)


@dataclass
class Report:
    markdown_path: Path
    headline: str  # plain-text headline tables, printed by the CLI
    figures: list[Path] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def build_report(
    store: SweepStore, out_dir: str | Path, *, max_figures: int = 6, level: float = 0.95
) -> Report:
    """Analyse `store`'s sweep; write ``report.md``, figures and CSV tables under `out_dir`."""
    return build_report_from_stages(
        store.read_stages(), out_dir, sweep=store.sweep, max_figures=max_figures, level=level
    )


def build_report_from_stages(
    stages: pd.DataFrame,
    out_dir: str | Path,
    *,
    sweep: str = "",
    max_figures: int = 6,
    level: float = 0.95,
) -> Report:
    """`build_report` on a stages table already in memory (as `SweepStore.read_stages`)."""
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    final = final_round_retrain(stages)
    ok = final[(final["status"] == "ok") & final["test_acc"].notna()]
    cells = cell_stats(ok, "test_acc")
    tables: dict[str, pd.DataFrame] = {
        "status": status_counts(final),
        "headline": cells,
        "random_vs_methodical": random_vs_methodical(ok, cells, level),
        "claim_schedules": claim_schedules(ok, level),
        "claim_random_clr": claim_random_clr(ok, level),
        "pruning": pruning_effect(ok, cells),
    }
    if ok["test_acc_at_best_val"].notna().any():
        tables["val_selected"] = cell_stats(ok, "test_acc_at_best_val")
    figures, fig_note = plot_budget_curves(cells, out / "figures", max_figures)

    pivots = pivot_tables(cells)
    headline = _headline_text(sweep, final, pivots, tables)
    md = _markdown(sweep, final, pivots, tables, figures, fig_note, out, level)
    md_path = out / "report.md"
    md_path.write_text(md)
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    return Report(md_path, headline, figures, tables)


# -- preparation -----------------------------------------------------------------------------


def final_round_retrain(stages: pd.DataFrame) -> pd.DataFrame:
    """Retrain rows of the last pruning round of each configuration, with derived labels.

    Adds: ``structure`` (structured/unstructured), ``target`` (``ratio=0.5`` / ``preset=A``),
    ``budget``, ``variant`` (the overrides, "" if none), ``sched`` (schedule plus variant)
    and ``prune_id`` (the prune parent, used to count each pruned network once).
    """
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


def _order(values: Any, reference: tuple[str, ...]) -> list[Any]:
    rank = {name: i for i, name in enumerate(reference)}
    return sorted(set(values), key=lambda v: (rank.get(str(v).split(" ")[0], len(rank)), str(v)))


# -- tables ----------------------------------------------------------------------------------


def status_counts(final: pd.DataFrame) -> pd.DataFrame:
    """Final-round retrain rows per status, per (dataset, model, structure, target)."""
    counts = final.groupby([*GROUP, "status"], sort=True).size().unstack(fill_value=0)
    for status in STATUSES:
        if status not in counts:
            counts[status] = 0
    counts = counts[[*STATUSES, *[c for c in counts if c not in STATUSES]]]
    return counts.reset_index()


def cell_stats(ok: pd.DataFrame, column: str) -> pd.DataFrame:
    """mean, sd, n of `column` per (group, budget, pruner, schedule)."""
    return grouped_ci(ok[ok[column].notna()], [*GROUP, "budget", "pruner", "sched"], column)[
        [*GROUP, "budget", "pruner", "sched", "mean", "sd", "n"]
    ]


def _with_verdict(res: pd.DataFrame) -> pd.DataFrame:
    res["verdict"] = np.select(
        [res["n"] < 2, res["low"] > 0, res["high"] < 0],
        [INCONCLUSIVE, SUPPORTED, CONTRADICTED],
        INCONCLUSIVE,
    )
    return res


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
    res = _with_verdict(grouped_ci(pairs, keys, "diff", level))
    return res.sort_values(keys, key=_sort_key, kind="stable").reset_index(drop=True)


def _empty_ci(keys: list[str]) -> pd.DataFrame:
    cols = [*keys, "mean", "sd", "n", "half_width", "low", "high", "verdict"]
    return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})


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
        return _empty_ci(out_keys)
    pairs["diff"] = pairs["acc_s"] - pairs["acc_ft"]
    per_seed = pairs.groupby([*out_keys, "seed"], dropna=False)["diff"].mean().reset_index()
    res = _with_verdict(grouped_ci(per_seed, out_keys, "diff", level))
    return res.sort_values(out_keys, key=_sort_key, kind="stable").reset_index(drop=True)


def claim_random_clr(ok: pd.DataFrame, level: float) -> pd.DataFrame:
    """Claim 2: random pruner + clr minus each methodical pruner + ft (same budget and seed)."""
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
        return _empty_ci(keys)
    pairs["diff"] = pairs["acc_random"] - pairs["acc_methodical"]
    res = _with_verdict(grouped_ci(pairs, keys, "diff", level))
    return res.sort_values(keys, key=_sort_key, kind="stable").reset_index(drop=True)


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
    return agg.sort_values(keys, key=_sort_key, kind="stable").reset_index(drop=True)


def _sort_key(col: pd.Series) -> pd.Series:
    if col.name in ("pruner", "methodical"):
        rank = {p: i for i, p in enumerate(PRUNERS)}
        return col.map(lambda p: rank.get(p, len(rank)))
    if col.name == "schedule":
        rank = {p: i for i, p in enumerate(SCHEDULES)}
        return col.map(lambda p: rank.get(p, len(rank)))
    return col


# -- figures ---------------------------------------------------------------------------------


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
        pruners = _order(sub["pruner"], tuple(PRUNERS))
        scheds = _order(sub["sched"], SCHEDULES)
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


# -- rendering -------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:.2f}"


def _signed_pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{x * 100:+.2f}"


def _cell(mean: float, sd: float, n: int) -> str:
    if n < 2 or math.isnan(sd):
        return f"{_pct(mean)} (n={n})"
    return f"{_pct(mean)} ± {_pct(sd)} (n={n})"


def _ci(row: Any) -> str:
    if row.n < 2 or math.isnan(row.half_width):
        return "undefined (n=1)" if row.n == 1 else "undefined"
    return f"[{_signed_pct(row.low)}, {_signed_pct(row.high)}]"


def _budget(b: Any) -> str:
    return "–" if pd.isna(b) else str(int(b))


Pivot = tuple[str, list[str], list[list[str]]]


def pivot_tables(cells: pd.DataFrame) -> list[Pivot]:
    """(title, headers, rows) of pruner × schedule tables, one per group and budget."""
    groups: dict[tuple[Any, ...], dict[tuple[str, str], str]] = {}
    # One pass over the (already sorted) cells: per-group DataFrame filtering is far slower.
    for r in cells.itertuples(index=False):
        key = (r.dataset, r.model, r.structure, r.target, r.budget)
        groups.setdefault(key, {})[(r.pruner, r.sched)] = _cell(r.mean, r.sd, r.n)
    out = []
    for (*group, budget), table in groups.items():
        scheds = _order({s for _, s in table}, SCHEDULES)
        pruners = _order({p for p, _ in table}, tuple(PRUNERS))
        rows = [[p, *(table.get((p, s), "") for s in scheds)] for p in pruners]
        title = " / ".join(map(str, group)) + f" / budget {_budget(budget)}"
        out.append((title, ["pruner", *scheds], rows))
    return out


def text_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def esc(x: Any) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _status_line(final: pd.DataFrame) -> str:
    counts = final["status"].value_counts()
    parts = [f"{s} {int(counts.get(s, 0))}" for s in STATUSES]
    return f"{len(final)} final-round retraining runs: " + ", ".join(parts)


def _claim_counts(table: pd.DataFrame) -> str:
    if table.empty:
        return "not testable with this sweep"
    c = table["verdict"].value_counts()
    return (
        f"supported in {int(c.get(SUPPORTED, 0))}, inconclusive in "
        f"{int(c.get(INCONCLUSIVE, 0))}, contradicted in {int(c.get(CONTRADICTED, 0))} "
        f"of {len(table)} comparisons"
    )


def _headline_text(
    sweep: str, final: pd.DataFrame, pivots: list[Pivot], tables: dict[str, pd.DataFrame]
) -> str:
    parts = [f"sweep {sweep}: {_status_line(final)}".strip()]
    if not pivots:
        parts.append("no successful final-round retraining runs to report")
    else:
        parts.append("final test accuracy (%), mean ± sd over seeds (n)")
        for title, headers, rows in pivots:
            parts.append(f"\n{title}\n{text_table(headers, rows)}")
    parts.append("")
    parts.append("claim 1 (lrw/slr/clr beat ft): " + _claim_counts(tables["claim_schedules"]))
    parts.append(
        "claim 2 (random + clr >= methodical + ft): " + _claim_counts(tables["claim_random_clr"])
    )
    return "\n".join(parts)


def _claim_rows(table: pd.DataFrame, label_cols: list[str]) -> list[list[str]]:
    rows = []
    for r in table.itertuples(index=False):
        rows.append(
            [
                r.dataset,
                r.model,
                r.structure,
                r.target,
                _budget(r.budget),
                *(str(getattr(r, c)) for c in label_cols),
                _signed_pct(r.mean),
                _ci(r),
                str(r.n),
                r.verdict,
            ]
        )
    return rows


def _markdown(
    sweep: str,
    final: pd.DataFrame,
    pivots: list[Pivot],
    tables: dict[str, pd.DataFrame],
    figures: list[Path],
    fig_note: str,
    out: Path,
    level: float,
) -> str:
    lvl = f"{level * 100:g}%"
    md = [f"# Sweep report: {sweep}", ""]
    md.append(
        f"{_status_line(final)}. Accuracies are test accuracy in % after the final epoch "
        "(the headline figure; never the best epoch), as mean ± sample sd over seeds with n. "
        f"Differences are in percentage points, with a two-sided {lvl} Student-t interval over "
        "seeds, paired on seed and budget."
    )
    md += ["", "## Runs by status", ""]
    st = tables["status"]
    md.append(md_table(list(st.columns), st.astype(str).values.tolist()) if len(st) else "none")

    md += ["", "## Final test accuracy: pruner × schedule", ""]
    if not pivots:
        md.append("No successful final-round retraining runs.")
    for title, headers, rows in pivots:
        md += [f"### {title}", "", md_table(headers, rows), ""]

    md += ["", "## Accuracy vs retraining budget", ""]
    for path in figures:
        md.append(f"![{path.stem}]({path.relative_to(out).as_posix()})")
    if not figures:
        md.append("No figure drawn.")
    if fig_note:
        md += ["", f"Note: {fig_note}."]

    md += ["", "## Random pruning with its best schedule vs methodical pruning with ft", ""]
    md.append(
        "For each budget the random pruner's best schedule is the one with the highest mean "
        "over seeds; choosing it on the same runs favours random pruning, so read this table "
        "next to claim 2, which fixes the schedule to clr."
    )
    rvm = tables["random_vs_methodical"]
    if rvm.empty:
        md.append("\nNot available: the sweep lacks matching random / methodical (ft) pairs.")
    else:
        headers = [
            *GROUP,
            "budget",
            "methodical (ft)",
            "random schedule",
            "mean diff (pp)",
            f"{lvl} CI",
            "n",
            "reading",
        ]
        rows = _claim_rows(rvm, ["methodical", "random_schedule"])
        md += ["", md_table(headers, rows)]

    md += ["", "## Claims of Le & Hua (ICLR 2021)", ""]
    md.append(
        "Supported: the interval lies above 0. Contradicted: below 0. Inconclusive: it "
        "contains 0 or is undefined (one seed). Only runs without schedule overrides are used."
    )
    c1 = tables["claim_schedules"]
    md += ["", "### Claim 1: large-learning-rate schedules (lrw, slr, clr) beat ft at equal budget"]
    md.append("")
    md.append(
        "Difference = schedule − ft on the same pruner, budget and seed, averaged over pruners "
        f"within a seed. Result: {_claim_counts(c1)}."
    )
    if not c1.empty:
        headers = [
            *GROUP,
            "budget",
            "schedule",
            "mean diff (pp)",
            f"{lvl} CI",
            "n seeds",
            "verdict",
        ]
        md += ["", md_table(headers, _claim_rows(c1, ["schedule"]))]
    c2 = tables["claim_random_clr"]
    md += ["", "### Claim 2: random pruning + clr matches or beats methodical pruning + ft", ""]
    md.append(
        "Difference = random pruner with clr − methodical pruner with ft, same budget and seed. "
        "An interval containing 0 does not establish that the two match; it only fails to "
        f"separate them. Result: {_claim_counts(c2)}."
    )
    if not c2.empty:
        headers = [
            *GROUP,
            "budget",
            "random",
            "methodical",
            "mean diff (pp)",
            f"{lvl} CI",
            "n seeds",
            "verdict",
        ]
        md += ["", md_table(headers, _claim_rows(c2, ["random", "pruner"]))]

    md += ["", "## Pruning: size and accuracy before / after pruning / after retraining", ""]
    pe = tables["pruning"]
    if pe.empty:
        md.append("No successful runs.")
    else:
        headers = [
            *GROUP,
            "pruner",
            "networks",
            "sparsity %",
            "params ↓ %",
            "MACs ↓ %",
            "acc before prune",
            "acc after prune",
            "after ft",
            "best schedule",
            "after best",
            "at budget",
        ]
        rows = [
            [
                r.dataset,
                r.model,
                r.structure,
                r.target,
                r.pruner,
                r.n_pruned,
                _pct(r.achieved_sparsity),
                _pct(r.params_reduction),
                _pct(r.macs_reduction),
                _pct(r.acc_before_prune),
                _pct(r.acc_after_prune),
                _pct(r.acc_ft),
                "–" if pd.isna(r.best_schedule) else r.best_schedule,
                _pct(r.acc_best),
                _budget(r.at_budget),
            ]
            for r in pe.itertuples(index=False)
        ]
        md += [md_table(headers, rows)]

    if "val_selected" in tables:
        md += ["", "## Validation-selected test accuracy", ""]
        md.append(
            "Test accuracy at the epoch with the best validation accuracy (model selection on "
            "the held-out validation split), mean ± sd over seeds (n)."
        )
        for title, headers, rows in pivot_tables(tables["val_selected"]):
            md += ["", f"### {title}", "", md_table(headers, rows)]
    md.append("")
    return "\n".join(md)
