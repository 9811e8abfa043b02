"""`nptm report`: the analysis of one sweep (nptm.results.analysis) as report.md, CSV tables,
figures (nptm.results.figures) and the plain-text headline the CLI prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from nptm.results.adaptive import Design, answer_table, design_of, looks_table, seeds_per_cell
from nptm.results.analysis import (
    GROUP,
    cell_stats,
    claim_tables,
    final_round_retrain,
    order,
    pruning_effect,
    random_vs_methodical,
    seed_replication,
    status_counts,
    successful,
)
from nptm.results.figures import FORMATS as FIGURE_FORMATS
from nptm.results.figures import (
    plot_budget_bars,
    plot_budget_curves,
    plot_schedules,
    plot_tradeoff_curves,
)
from nptm.results.schema import STATUSES
from nptm.results.store import SweepStore
from nptm.results.tables import latex_table, md_table, text_table
from nptm.trainables.catalog import PRUNERS, SCHEDULES


@dataclass
class Report:
    markdown_path: Path
    headline: str  # plain-text headline tables, printed by the CLI
    figures: list[Path] = field(default_factory=list)  # a PNG per figure, an SVG beside it
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
    (`latex`: also the tables as ``.tex`` files). A sweep that added seeds adaptively
    (`nptm sweep --until-conclusive`) is read with the looks of its run record."""
    from nptm.results.run_record import RunRecord

    return build_report_from_stages(
        store.read_stages(),
        out_dir,
        sweep=store.sweep,
        max_figures=max_figures,
        level=level,
        epochs=store.read_epochs(),
        margin=margin,
        latex=latex,
        looks=RunRecord(store.layout, store.sweep).read_looks(),
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
    looks: dict[str, Any] | None = None,
) -> Report:
    """`build_report` on a stages table already in memory (as `SweepStore.read_stages`);
    with its `epochs` table, the report also draws the learning rate each schedule ran.
    `margin`: claim 2's equivalence margin in accuracy (0-1). `looks`: the run record's
    looks.json of a sweep that added seeds adaptively; its design's verdicts are then the
    answer (`confirmatory`), with the looks and the seeds each run got."""
    if not margin > 0:
        raise ValueError(f"equivalence margin must be positive, got {margin!r}")
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    final = final_round_retrain(stages)
    ok = successful(final)
    cells = cell_stats(ok, "test_acc", level)
    tables: dict[str, pd.DataFrame] = {
        "status": status_counts(final),
        "headline": cells,
        "random_vs_methodical": random_vs_methodical(ok, cells, level),
        **claim_tables(ok, level, margin),
        "pruning": pruning_effect(ok, cells),
    }
    if looks is not None:  # a fixed-sample test over every seed is not valid after looks
        tables.update(sequential_tables(looks, ok))
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
    headline = _headline_text(sweep, final, pivots, tables, level)
    shown: dict[str, list[Shown]] = {}
    replication = seed_replication(stages, final)
    md = _markdown(sweep, final, pivots, tables, figures, out, level, margin, shown, replication)
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


def _exploratory_counts(table: pd.DataFrame) -> str:
    if table.empty:
        return "not testable with this sweep"
    reading = table["reading"].astype(str)
    above, below = (int(reading.str.startswith(side).sum()) for side in ("above", "below"))
    null = table["null"].iloc[0] * 100
    return (
        f"{above} above and {below} below {_null_text(null)} points of {len(table)} comparisons "
        "(BH q < alpha)"
    )


def _null_text(points: float) -> str:
    return "0" if points == 0 else f"{points:+g}".replace("-", "−")


def confirmatory_rows(table: pd.DataFrame) -> list[list[str]]:
    """The confirmatory tests as the report shows them (headline, report.md, LaTeX)."""
    return [
        [
            r.claim,
            r.structure,
            r.comparison,
            _null_text(r.null * 100),
            str(int(r.cells)),
            str(int(r.n)),
            _signed_pct(r.mean),
            _ci(r),
            _p(r.p),
            _p(r.p_holm),
            r.verdict,
            _p(r.p_tost_holm),
            r.equivalent or "–",
        ]
        for r in table.itertuples(index=False)
    ]


CONFIRMATORY_HEADERS = ["claim", "structure", "comparison", "null (pp)", "cells", "seeds",
                        "mean diff (pp)", "{lvl} CI", "p", "p (Holm)", "verdict",
                        "p TOST (Holm)", "equivalent"]  # fmt: skip


def _confirmatory_headers(level: float) -> list[str]:
    lvl = f"{level * 100:g}%"
    return [h.format(lvl=lvl) for h in CONFIRMATORY_HEADERS]


def sequential_tables(looks: dict[str, Any], ok: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tables of an adaptive sweep (`nptm sweep --until-conclusive`): the design's
    verdicts as the answer (`confirmatory`), its `looks`, and the seeds every run of the
    claims' schedules got (`adaptive_seeds`)."""
    return {
        "confirmatory": answer_table(looks),
        "looks": looks_table(looks),
        "adaptive_seeds": seeds_per_cell(ok),
        "adaptive_design": pd.DataFrame([design_of(looks).to_dict()]),
    }


def sequential_rows(table: pd.DataFrame) -> list[list[str]]:
    """An adaptive sweep's answer as the report shows it."""

    def number(x: Any, spec: str) -> str:
        return "–" if x is None or pd.isna(x) else format(x, spec)

    return [
        [
            r.claim,
            r.structure,
            r.comparison,
            _null_text(r.null * 100) if pd.notna(r.null) else "–",
            str(int(r.cells)) if pd.notna(r.cells) else "–",
            str(int(r.seeds)),
            _signed_pct(r.mean),
            "–" if pd.isna(r.low) else f"[{_signed_pct(r.low)}, {_signed_pct(r.high)}]",
            number(abs(r.t) if pd.notna(r.t) else None, ".2f"),
            f"{number(r.critical, '.2f')} (level {number(r.level, '.4g')})",
            r.verdict,
            "–" if pd.isna(r.decided_at) else str(int(r.decided_at)),
        ]
        for r in table.itertuples(index=False)
    ]


SEQUENTIAL_HEADERS = ["claim", "structure", "comparison", "null (pp)", "cells", "seeds",
                      "mean diff (pp)", "{lvl} repeated CI", "|t|", "critical |t| (Holm level)",
                      "verdict", "decided at look"]  # fmt: skip


def _answer(tables: dict[str, pd.DataFrame], level: float) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the answer: the confirmatory tests, or an adaptive sweep's."""
    lvl = f"{level * 100:g}%"
    if "looks" in tables:
        headers = [h.format(lvl=lvl) for h in SEQUENTIAL_HEADERS]
        return headers, sequential_rows(tables["confirmatory"])
    return _confirmatory_headers(level), confirmatory_rows(tables["confirmatory"])


def _adaptive_section(tables: dict[str, pd.DataFrame], table: Any, level: float) -> list[str]:
    """The answer of a sweep that added seeds adaptively, its design, looks and the seeds
    every run got; `table(name, title, headers, rows)` renders (and records) a table."""
    design = Design(**tables["adaptive_design"].to_dict(orient="records")[0])
    lvl = f"{level * 100:g}%"
    md = [
        "This sweep added seeds where the tests were inconclusive (`nptm sweep "
        f"--until-conclusive`): {design.describe()}. A fixed-sample test over every stored seed "
        "is not valid after repeated looks, so the answer is the design's: at each look an "
        "open test rejects when |t| reaches its critical value, the Lan-DeMets boundary of "
        "its own looks at its Holm level (alpha / number of tests not yet rejected); a "
        "rejected test stops with its verdict, and only the runs of the open tests' two arms "
        f"get the next seed. The interval is the {lvl} repeated confidence interval at the "
        "test's last look (covers the truth at every look at once); p-values and the TOST "
        "reading are not computed (docs/reports.md, 'Adaptive seeds').",
        "",
        table("confirmatory", "Confirmatory tests of the claims (group-sequential)",
              *_answer(tables, level)),
        "",
        "### Looks",
        "",
    ]  # fmt: skip
    looks = tables["looks"]
    headers = ["look", "tests open", "their seeds", "verdicts reached", "seeds added",
               "runs added"]  # fmt: skip
    md.append(table("looks", "Looks of the group-sequential design", headers,
                    looks.astype(str).replace("", "–").values.tolist()))  # fmt: skip
    md += ["", "### Seeds each run of the claims' schedules got", ""]
    seeds = tables["adaptive_seeds"]
    keys = ["dataset", "model", "structure", "pruner", "schedule"]
    per = seeds.groupby(keys, sort=False)["seeds"].agg(["size", "min", "max"]).reset_index()
    rows = [
        [*(str(getattr(r, k)) for k in keys), str(r.size),
         str(r.min) if r.min == r.max else f"{r.min}–{r.max}"]
        for r in per.itertuples(index=False)
    ]  # fmt: skip
    md.append(table("adaptive_seeds", "Seeds each run got", [*keys, "runs", "seeds"], rows))
    return md


def _headline_text(
    sweep: str,
    final: pd.DataFrame,
    pivots: list[Pivot],
    tables: dict[str, pd.DataFrame],
    level: float,
) -> str:
    parts = [f"sweep {sweep}: {_status_line(final)}".strip(), ""]
    conf = tables["confirmatory"]
    if conf.empty:
        parts.append("confirmatory tests of the claims: not testable with this sweep")
    else:
        parts.append(
            f"confirmatory tests of the claims (the answer): Holm over {len(conf)} tests at "
            f"family-wise alpha {1 - level:.2g}; each pools its cells within a seed and tests "
            "over seeds (docs/reports.md)"
        )
        if "looks" in tables:
            parts.append(
                f"seeds added where inconclusive over {len(tables['looks'])} looks "
                "(--until-conclusive): the group-sequential verdicts, each at its test's last "
                "look"
            )
        parts.append(text_table(*_answer(tables, level)))
    parts.append("")
    if not pivots:
        parts.append("no successful final-round retraining runs to report")
    else:
        parts.append("final test accuracy (%), mean ± sd over seeds (n)")
        for title, headers, rows in pivots:
            parts.append(f"\n{title}\n{text_table(headers, rows)}")
    parts.append("")
    parts.append("exploratory, per budget and network (no verdict; Benjamini-Hochberg):")
    parts.append("claim 1 (lrw/slr/clr − ft): " + _exploratory_counts(tables["claim_schedules"]))
    parts.append(
        "claim 2 (random + clr − methodical + ft): "
        + _exploratory_counts(tables["claim_random_clr"])
    )
    return "\n".join(parts)


def _p(x: float) -> str:
    """A p-value as read in a table ("–": no test, n < 2)."""
    if x is None or math.isnan(x):
        return "–"
    return "<0.0001" if x < 1e-4 else f"{x:.4f}"


def _claim_rows(
    table: pd.DataFrame,
    label_cols: list[str],
    p_cols: tuple[str, ...] = (),
    reading: str = "verdict",
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
                getattr(r, reading),
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
    replication: str,
) -> str:
    """report.md; every table it shows is also put in `shown` under its table's name.
    `replication`: what the seeds replicate (`seed_replication`)."""
    lvl = f"{level * 100:g}%"
    alpha = f"{1 - level:.2g}"

    def table(name: str, title: str, headers: list[str], rows: list[list[str]]) -> str:
        shown.setdefault(name, []).append((title, headers, rows))
        return md_table(headers, rows)

    def images(kind: str) -> list[str]:
        """Each figure's PNG shown, its other formats linked (same stem)."""
        paths, note = figures[kind]
        lines = []
        for p in paths:
            link = p.relative_to(out).as_posix()
            others = [f"[{s[1:].upper()}]({link.removesuffix(p.suffix)}{s})"
                      for s in FIGURE_FORMATS[1:]]  # fmt: skip
            lines.append(f"![{p.stem}]({link})" + (f" ({', '.join(others)})" if others else ""))
        return lines + (["", f"Note: {note}."] if note else [])

    md = [f"# Sweep report: {sweep}", ""]
    md.append(
        f"{_status_line(final)}. Accuracies are test accuracy in % after the final epoch "
        "(the headline figure; never the best epoch), as mean ± sample sd over seeds with n. "
        f"Differences are in percentage points, with a two-sided {lvl} Student-t interval over "
        f"seeds, paired on cell, budget and seed. Seeds: {replication}."
    )
    md += ["", "## The answer: confirmatory tests of Le & Hua (ICLR 2021)", ""]
    conf = tables["confirmatory"]
    md.append(
        "One pre-declared test per claim, large-lr schedule and structure. Each pools what the "
        "paper pools: the paired differences (same cell and seed) over datasets, models, "
        "targets, budgets and pruners, averaged over cells within a seed (cells sharing a "
        "seed are not independent); the test is a one-sample t-test of those per-seed means "
        "over seeds (df = seeds − 1), the interval its two-sided "
        f"{lvl} Student-t interval. The {len(conf)} tests of both claims are one family: "
        f"p (Holm) is Holm's step-down adjustment (statsmodels), read at alpha {alpha}. "
        "Claim 1 (lrw, slr, clr beat ft at equal budget): null 0; **supported** = the schedule "
        "is significantly better than ft, **contradicted** = significantly worse. Claim 2 "
        "(random pruning + clr matches methodical pruning + ft): a non-inferiority test at "
        f"the margin −{margin * 100:g} points (`--equivalence-margin`); **supported** = "
        f"random + clr is shown no worse than methodical + ft by more than {margin * 100:g} "
        "points (a one-sided test at alpha/2 after Holm: the Holm-adjusted two-sided test of "
        f"the null −{margin * 100:g} rejects with the estimate above it), **contradicted** = "
        f"shown worse by more than {margin * 100:g} points. Equivalence within "
        f"±{margin * 100:g} points (TOST, Holm over claim 2's tests) is a secondary reading, "
        "outside the family. **Inconclusive**: neither (always with one seed). "
        "Only cells with a pair in every seed enter a test."
    )
    md.append("")
    if "looks" in tables:
        md += _adaptive_section(tables, table, level)
    else:
        md.append(
            table("confirmatory", "Confirmatory tests of the claims", _confirmatory_headers(level),
                  confirmatory_rows(conf))
            if len(conf) else "Not testable: the sweep lacks the paired runs the claims compare."
        )  # fmt: skip

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
        md += ["", "## Accuracy vs size (the pruning trade-off)", ""]
        md.append(
            "x: the mean sparsity, and the mean MACs reduction (structured pruning) or nonzero "
            "parameters (unstructured pruning: masks leave the dense MACs unchanged), the runs "
            f"of each pruning target achieved (stored columns); y: mean ± {lvl} CI over seeds."
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
    md += ["", "## Exploratory: the claims per budget and per network", ""]
    md.append(
        "Estimates with intervals for each (dataset, model, target, budget): **exploratory**, "
        "no verdict. p is the two-sided paired t-test over seeds of the row's null (claim 1: "
        f"0; claim 2: −{margin * 100:g} points, non-inferiority), q its Benjamini-Hochberg "
        "false-discovery-rate adjustment over the table's rows (statsmodels), and the "
        f"reading says whether q < {alpha} and on which side of the null. The answer to the "
        "claims is the confirmatory family above; these rows show where it comes from. Only "
        "runs without schedule overrides are used."
    )
    md += ["", "### Claim 1: large-learning-rate schedules (lrw, slr, clr) minus ft", ""]
    md.append(
        "Difference = schedule − ft on the same pruner, budget and seed, averaged over pruners "
        f"within a seed. {_exploratory_counts(c1)}."
    )
    if not c1.empty:
        headers = [*GROUP, "budget", "schedule", "mean diff (pp)", f"{lvl} CI", "n seeds", "p",
                   "q (BH)", "reading"]  # fmt: skip
        rows = _claim_rows(c1, ["schedule"], ("p", "q"), "reading")
        md += ["", table("claim_schedules", "Claim 1: schedule minus ft", headers, rows)]
    md += ["", "### Claim 2: random pruning + clr minus methodical pruning + ft", ""]
    md.append(
        "Difference = random pruner with clr − methodical pruner with ft, same budget and seed; "
        f"p tests it against −{margin * 100:g} points, p TOST its equivalence within "
        f"±{margin * 100:g} points (`nptm report --equivalence-margin`). "
        f"{_exploratory_counts(c2)}."
    )
    if not c2.empty:
        headers = [*GROUP, "budget", "random", "methodical", "mean diff (pp)", f"{lvl} CI",
                   "n seeds", "p", "q (BH)", "p TOST", "q TOST (BH)", "reading"]  # fmt: skip
        rows = _claim_rows(c2, ["random", "pruner"], ("p", "q", "p_tost", "q_tost"), "reading")
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
