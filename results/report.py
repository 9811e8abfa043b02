"""`nptm report`: the analysis of one sweep (nptm.results.analysis) as report.md, CSV tables,
figures (nptm.results.figures) and the plain-text headline the CLI prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from nptm.results.analysis import (
    GROUP,
    cell_stats,
    claim_tables,
    final_round_retrain,
    order,
    pruning_effect,
    random_vs_methodical,
    status_counts,
)
from nptm.results.figures import (
    plot_budget_bars,
    plot_budget_curves,
    plot_schedules,
    plot_tradeoff_curves,
)
from nptm.results.schema import STATUSES
from nptm.results.stats import CONTRADICTED, INCONCLUSIVE, SUPPORTED
from nptm.results.store import SweepStore
from nptm.results.tables import latex_table, md_table, text_table
from nptm.trainables.catalog import PRUNERS, SCHEDULES


@dataclass
class Report:
    markdown_path: Path
    headline: str  # plain-text headline tables, printed by the CLI
    figures: list[Path] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    latex: list[Path] = field(default_factory=list)  # the tables as LaTeX (`latex=True`)


DEFAULT_MARGIN = 0.005  # TOST equivalence margin of claim 2: 0.5 accuracy points


def build_report(
    store: SweepStore,
    out_dir: str | Path,
    *,
    max_figures: int = 6,
    level: float = 0.95,
    margin: float = DEFAULT_MARGIN,
    latex: bool = False,
) -> Report:
    """Analyse `store`'s sweep; write ``report.md``, figures and CSV tables under `out_dir`
    (`latex`: also the tables as ``.tex`` files)."""
    return build_report_from_stages(
        store.read_stages(),
        out_dir,
        sweep=store.sweep,
        max_figures=max_figures,
        level=level,
        epochs=store.read_epochs(),
        margin=margin,
        latex=latex,
    )


def build_report_from_stages(
    stages: pd.DataFrame,
    out_dir: str | Path,
    *,
    sweep: str = "",
    max_figures: int = 6,
    level: float = 0.95,
    epochs: pd.DataFrame | None = None,
    margin: float = DEFAULT_MARGIN,
    latex: bool = False,
) -> Report:
    """`build_report` on a stages table already in memory (as `SweepStore.read_stages`);
    with its `epochs` table, the report also draws the learning rate each schedule ran.
    `margin`: claim 2's equivalence margin in accuracy (0-1)."""
    if not margin > 0:
        raise ValueError(f"equivalence margin must be positive, got {margin!r}")
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    final = final_round_retrain(stages)
    ok = final[(final["status"] == "ok") & final["test_acc"].notna()]
    cells = cell_stats(ok, "test_acc", level)
    tables: dict[str, pd.DataFrame] = {
        "status": status_counts(final),
        "headline": cells,
        "random_vs_methodical": random_vs_methodical(ok, cells, level),
        **claim_tables(ok, level, margin),
        "pruning": pruning_effect(ok, cells),
    }
    if ok["test_acc_at_best_val"].notna().any():
        tables["val_selected"] = cell_stats(ok, "test_acc_at_best_val", level)
    fig_dir = out / "figures"
    figures = {
        "budget": plot_budget_curves(cells, fig_dir, max_figures),
        "bars": plot_budget_bars(cells, fig_dir, max_figures, level),
        "tradeoff": plot_tradeoff_curves(cells, fig_dir, max_figures, level),
        "schedules": (
            [] if epochs is None else plot_schedules(final, epochs, fig_dir, max_figures),
            "",
        ),
    }

    pivots = pivot_tables(cells)
    headline = _headline_text(sweep, final, pivots, tables)
    shown: dict[str, list[Shown]] = {}
    md = _markdown(sweep, final, pivots, tables, figures, out, level, margin, shown)
    md_path = out / "report.md"
    md_path.write_text(md)
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    tex_paths = []
    for name, parts in shown.items() if latex else ():
        tex_paths.append(out / f"{name}.tex")
        tex_paths[-1].write_text("\n".join(latex_table(h, r, caption=t) for t, h, r in parts))
    drawn = [path for paths, _ in figures.values() for path in paths]
    return Report(md_path, headline, drawn, tables, tex_paths)


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
Shown = Pivot  # (title, headers, rows) of a table as report.md shows it


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


def _p(x: float) -> str:
    """A p-value as read in a table ("–": no test, n < 2)."""
    if x is None or math.isnan(x):
        return "–"
    return "<0.0001" if x < 1e-4 else f"{x:.4f}"


def _claim_rows(
    table: pd.DataFrame, label_cols: list[str], p_cols: tuple[str, ...] = ()
) -> list[list[str]]:
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
                *(_p(getattr(r, c)) for c in p_cols),
                r.verdict,
            ]
        )
    return rows


Figures = dict[str, tuple[list[Path], str]]


def _markdown(
    sweep: str,
    final: pd.DataFrame,
    pivots: list[Pivot],
    tables: dict[str, pd.DataFrame],
    figures: Figures,
    out: Path,
    level: float,
    margin: float,
    shown: dict[str, list[Shown]],
) -> str:
    """report.md; every table it shows is also put in `shown` under its table's name."""
    lvl = f"{level * 100:g}%"
    alpha = f"{1 - level:.2g}"

    def table(name: str, title: str, headers: list[str], rows: list[list[str]]) -> str:
        shown.setdefault(name, []).append((title, headers, rows))
        return md_table(headers, rows)

    def images(kind: str) -> list[str]:
        paths, note = figures[kind]
        lines = [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in paths]
        return lines + (["", f"Note: {note}."] if note else [])

    md = [f"# Sweep report: {sweep}", ""]
    md.append(
        f"{_status_line(final)}. Accuracies are test accuracy in % after the final epoch "
        "(the headline figure; never the best epoch), as mean ± sample sd over seeds with n. "
        f"Differences are in percentage points, with a two-sided {lvl} Student-t interval over "
        "seeds, paired on seed and budget."
    )
    md += ["", "## Runs by status", ""]
    st = tables["status"]
    md.append(
        table("status", "Final-round retraining runs by status", list(st.columns),
              st.astype(str).values.tolist())
        if len(st) else "none"
    )  # fmt: skip

    md += ["", "## Final test accuracy: pruner × schedule", ""]
    if not pivots:
        md.append("No successful final-round retraining runs.")
    for title, headers, rows in pivots:
        md += [f"### {title}", "", table("headline", title, headers, rows), ""]

    drawn = {kind: bool(paths) for kind, (paths, _) in figures.items()}
    if drawn["bars"]:
        md += ["", f"## Accuracy per pruner and schedule (mean ± {lvl} CI over seeds)", ""]
        md += images("bars")
    if drawn["budget"] or not drawn["bars"]:
        md += ["", "## Accuracy vs retraining budget", ""]
        md += images("budget") if drawn["budget"] else ["No figure drawn."]
        if not drawn["budget"] and figures["budget"][1]:
            md += ["", f"Note: {figures['budget'][1]}."]
    if drawn["tradeoff"]:
        md += ["", "## Accuracy vs sparsity and MACs reduction (the pruning trade-off)", ""]
        md.append(
            "x: the mean sparsity or MACs reduction the runs of each pruning target achieved "
            f"(stored columns); y: mean ± {lvl} CI over seeds."
        )
        md += ["", *images("tradeoff")]
    if drawn["schedules"]:
        md += ["", "## Learning rate of each schedule, as run (the paper's Figure 1)", ""]
        md += images("schedules")

    md += ["", "## Random pruning with its best schedule vs methodical pruning with ft", ""]
    md.append(
        "For each budget the random pruner's best schedule is the one with the highest mean "
        "over seeds; choosing it on the same runs favours random pruning, so read this table "
        "next to claim 2, which fixes the schedule to clr. Its reading is the raw interval's "
        "(no multiple-comparison correction)."
    )
    rvm = tables["random_vs_methodical"]
    if rvm.empty:
        md.append("\nNot available: the sweep lacks matching random / methodical (ft) pairs.")
    else:
        headers = [*GROUP, "budget", "methodical (ft)", "random schedule", "mean diff (pp)",
                   f"{lvl} CI", "n", "reading"]  # fmt: skip
        rows = _claim_rows(rvm, ["methodical", "random_schedule"])
        title = "Random pruning with its best schedule minus methodical pruning with ft"
        md += ["", table("random_vs_methodical", title, headers, rows)]

    c1, c2 = tables["claim_schedules"], tables["claim_random_clr"]
    n_tests = int(sum(t[c].notna().sum() for t in (c1, c2) for c in ("p", "p_tost") if c in t))
    md += ["", "## Claims of Le & Hua (ICLR 2021)", ""]
    md.append(
        "Each comparison is a paired t-test over seeds (p: two-sided, of a difference of 0); "
        "claim 2 adds an equivalence test (TOST, two one-sided paired t-tests) with margin "
        f"±{margin * 100:g} points. All {n_tests} tests of both claims form one family: "
        f"p (Holm) is Holm's step-down adjustment of p (statsmodels), read at alpha {alpha}. "
        "Supported: the difference is significantly above 0 (claim 2: or significantly "
        "within the margin). Contradicted: significantly below 0 (claim 2: and not "
        "equivalent). Inconclusive otherwise, and always with one seed. Only runs without "
        "schedule overrides are used."
    )
    md += ["", "### Claim 1: large-learning-rate schedules (lrw, slr, clr) beat ft at equal budget"]
    md.append("")
    md.append(
        "Difference = schedule − ft on the same pruner, budget and seed, averaged over pruners "
        f"within a seed. Result: {_claim_counts(c1)}."
    )
    if not c1.empty:
        headers = [*GROUP, "budget", "schedule", "mean diff (pp)", f"{lvl} CI", "n seeds", "p",
                   "p (Holm)", "verdict"]  # fmt: skip
        rows = _claim_rows(c1, ["schedule"], ("p", "p_holm"))
        md += ["", table("claim_schedules", "Claim 1: schedule minus ft", headers, rows)]
    md += ["", "### Claim 2: random pruning + clr matches or beats methodical pruning + ft", ""]
    md.append(
        "Difference = random pruner with clr − methodical pruner with ft, same budget and seed. "
        f"They match when the TOST shows the difference within ±{margin * 100:g} points "
        "(`nptm report --equivalence-margin`); an interval that merely contains 0 does not "
        f"establish that. Result: {_claim_counts(c2)}."
    )
    if not c2.empty:
        headers = [*GROUP, "budget", "random", "methodical", "mean diff (pp)", f"{lvl} CI",
                   "n seeds", "p", "p (Holm)", "p TOST", "p TOST (Holm)", "verdict"]  # fmt: skip
        rows = _claim_rows(c2, ["random", "pruner"], ("p", "p_holm", "p_tost", "p_tost_holm"))
        title = "Claim 2: random pruning with clr minus methodical pruning with ft"
        md += ["", table("claim_random_clr", title, headers, rows)]

    md += ["", "## Pruning: size and accuracy before / after pruning / after retraining", ""]
    pe = tables["pruning"]
    if pe.empty:
        md.append("No successful runs.")
    else:
        headers = [*GROUP, "pruner", "networks", "sparsity %", "params ↓ %", "MACs ↓ %",
                   "acc before prune", "acc after prune", "after ft", "best schedule",
                   "after best", "at budget"]  # fmt: skip
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
        title = "Size and accuracy before pruning, after pruning and after retraining"
        md += [table("pruning", title, headers, rows)]

    if "val_selected" in tables:
        md += ["", "## Validation-selected test accuracy", ""]
        md.append(
            "Test accuracy at the epoch with the best validation accuracy (model selection on "
            "the held-out validation split), mean ± sd over seeds (n)."
        )
        for title, headers, rows in pivot_tables(tables["val_selected"]):
            md += ["", f"### {title}", "", table("val_selected", title, headers, rows)]
    md.append("")
    return "\n".join(md)
