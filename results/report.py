"""`nptm report`: the analysis of one sweep (results.analysis) as report.md, CSV tables, figures
(results.figures) and the plain-text headline the CLI prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from results.analysis import (
    GROUP,
    cell_stats,
    claim_random_clr,
    claim_schedules,
    final_round_retrain,
    order,
    pruning_effect,
    random_vs_methodical,
    status_counts,
)
from results.figures import plot_budget_curves, plot_schedules
from results.schema import STATUSES
from results.stats import CONTRADICTED, INCONCLUSIVE, SUPPORTED
from results.store import SweepStore
from results.tables import md_table, text_table
from trainables.catalog import PRUNERS, SCHEDULES


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
        store.read_stages(),
        out_dir,
        sweep=store.sweep,
        max_figures=max_figures,
        level=level,
        epochs=store.read_epochs(),
    )


def build_report_from_stages(
    stages: pd.DataFrame,
    out_dir: str | Path,
    *,
    sweep: str = "",
    max_figures: int = 6,
    level: float = 0.95,
    epochs: pd.DataFrame | None = None,
) -> Report:
    """`build_report` on a stages table already in memory (as `SweepStore.read_stages`);
    with its `epochs` table, the report also draws the learning rate each schedule ran."""
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
    schedule_figures = (
        [] if epochs is None else plot_schedules(final, epochs, out / "figures", max_figures)
    )

    pivots = pivot_tables(cells)
    headline = _headline_text(sweep, final, pivots, tables)
    md = _markdown(sweep, final, pivots, tables, figures, fig_note, out, level, schedule_figures)
    md_path = out / "report.md"
    md_path.write_text(md)
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    return Report(md_path, headline, figures + schedule_figures, tables)


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
        scheds = order({s for _, s in table}, SCHEDULES)
        pruners = order({p for p, _ in table}, tuple(PRUNERS))
        rows = [[p, *(table.get((p, s), "") for s in scheds)] for p in pruners]
        title = " / ".join(map(str, group)) + f" / budget {_budget(budget)}"
        out.append((title, ["pruner", *scheds], rows))
    return out


def _status_line(final: pd.DataFrame) -> str:
    counts = final["status"].value_counts()
    parts = [f"{s} {int(counts.get(s, 0))}" for s in STATUSES]
    line = f"{len(final)} final-round retraining runs: " + ", ".join(parts)
    emptied = final[final["emptied_layers"].fillna(0).astype(int) > 0]
    if len(emptied):
        configs = sorted(
            {f"{r.model} {r.pruner} {r.target}" for r in emptied.itertuples(index=False)}
        )
        line += (
            f"; WARNING: {len(emptied)} of them retrain a network in which pruning emptied a "
            f"whole layer (emptied_layers > 0): {', '.join(configs)}"
        )
    return line


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
    schedule_figures: list[Path] | None = None,
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
    if schedule_figures:
        md += ["", "## Learning rate of each schedule, as run (the paper's Figure 1)", ""]
        md += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in schedule_figures]

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
