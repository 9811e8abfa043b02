"""`nptm.results.report.build_report_from_stages` on 100k synthetic trial rows: time.

The synthetic sweep: 2 datasets x 2 models x 5 pruners x 4 ratios x S seeds prune stages, each
retrained with 5 schedules x 5 budgets (100k retrain rows at S = 50), 1% of them failed.
The baseline is the same report on a tenth of the rows: the ratio of per-row cost says how the
report scales (1.0 = linear). Target: 100k rows in under 5 s.

    .venv/bin/python bench/report_scale.py [--quick] [--json]
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import _common
import numpy as np
import pandas as pd

TARGET_S = 5.0
PRUNERS = [
    ("magnitude", False),
    ("random", False),
    ("l1_filter", True),
    ("random_filter", True),
    ("hrank", True),
]
SCHEDULES = ["ft", "lrw", "slr", "clr", "scratch"]
BUDGETS = [10, 20, 40, 80, 160]
PER_SEED = 2 * 2 * len(PRUNERS) * 4 * len(SCHEDULES) * len(BUDGETS)  # retrain rows per seed


def synthetic_trials(n_seeds: int, seed: int = 0) -> pd.DataFrame:
    """A stages table (nptm.results.schema columns) of n_seeds * PER_SEED retrain rows + prunes."""
    from nptm.results.schema import STAGES_SCHEMA

    rng = np.random.default_rng(seed)
    prune = pd.MultiIndex.from_product(
        [["cifar10", "cifar100"], ["resnet56", "vgg16"], range(len(PRUNERS)),
         [0.3, 0.5, 0.7, 0.9], range(n_seeds)],
        names=["dataset", "model", "pi", "ratio", "seed"],
    ).to_frame(index=False)  # fmt: skip
    prune["pruner"] = [PRUNERS[i][0] for i in prune["pi"]]
    prune["structured"] = [PRUNERS[i][1] for i in prune["pi"]]
    prune["stage_id"] = "p" + prune.index.astype(str)
    prune["stage_kind"] = "prune"
    prune["parent_ids"] = [["pre"]] * len(prune)
    prune["acc_before_prune"] = 0.93
    prune["acc_after_prune"] = rng.uniform(0.1, 0.9, len(prune))
    prune["params_reduction"] = prune["ratio"]
    prune["macs_reduction"] = prune["ratio"] / 2
    prune["status"] = "ok"
    sched = pd.MultiIndex.from_product(
        [SCHEDULES, BUDGETS], names=["schedule", "budget_epochs"]
    ).to_frame(index=False)
    retrain = prune.drop(columns=["acc_after_prune", "acc_before_prune"]).merge(sched, how="cross")
    retrain["parent_ids"] = [[p] for p in retrain["stage_id"]]
    retrain["stage_id"] = "r" + retrain.index.astype(str)
    retrain["stage_kind"] = "retrain"
    retrain["structured"] = None
    retrain["overrides"] = "{}"
    retrain["test_acc"] = np.clip(0.9 + rng.normal(0, 0.01, len(retrain)), 0, 1)
    retrain["test_acc_at_best_val"] = np.clip(0.9 + rng.normal(0, 0.01, len(retrain)), 0, 1)
    retrain["status"] = np.where(rng.random(len(retrain)) < 0.01, "failed", "ok")
    trials = pd.concat([prune, retrain], ignore_index=True)
    trials["round"] = 1
    trials["reused"] = False
    return trials.reindex(columns=STAGES_SCHEMA.names)


def time_report(n_seeds: int, repeats: int, max_figures: int = 6) -> dict[str, Any]:
    """Median wall time of build_report_from_stages (figures and files included)."""
    from nptm.results.analysis import final_round_retrain
    from nptm.results.report import build_report_from_stages

    trials = synthetic_trials(n_seeds)
    n_retrain = int((trials["stage_kind"] == "retrain").sum())
    total, prep, no_fig = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        final_round_retrain(trials)
        prep.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            rep = build_report_from_stages(trials, out, sweep="bench", max_figures=max_figures)
            total.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as out:  # the analysis alone, no matplotlib
            t0 = time.perf_counter()
            build_report_from_stages(trials, out, sweep="bench", max_figures=0)
            no_fig.append(time.perf_counter() - t0)
    return {
        "rows": len(trials),
        "retrain_rows": n_retrain,
        "figures": len(rep.figures),
        "report_s": _common.median(total),
        "report_s_max": max(total),
        "prepare_s": _common.median(prep),
        "no_figures_s": _common.median(no_fig),
        "us_per_row": _common.median(total) / len(trials) * 1e6,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _common.parser(__doc__.splitlines()[0]).parse_args(argv)
    info = _common.machine()
    seeds = (1, 2) if args.quick else (5, 50)  # quick: 2k and 4k retrain rows
    repeats = 1 if args.quick else 3
    import matplotlib

    matplotlib.use("Agg")
    if not args.quick:
        time_report(1, 1)  # warm-up: imports, matplotlib's font cache
    cap = 1 if args.quick else 6  # quick: one figure, matplotlib dominates small reports
    results = [time_report(s, repeats, cap) for s in seeds]
    base, big = results
    ratio = big["us_per_row"] / base["us_per_row"]
    print(_common.machine_line(info))
    print(
        f"build_report_from_stages, median of {repeats}: 'report s' with max_figures={cap} "
        f"({results[-1]['figures']} drawn), 'no figures s' with max_figures=0, 'prepare s' "
        "final_round_retrain"
    )
    headers = ["trial rows", "retrain rows", "report s", "worst s", "no figures s"]
    keys = ["rows", "retrain_rows", "report_s", "report_s_max", "no_figures_s"]
    headers += ["prepare s", "us/row"]
    keys += ["prepare_s", "us_per_row"]
    print(_common.table(headers, [[r[k] for k in keys] for r in results]))
    print(f"per-row cost, {big['rows']:,} vs {base['rows']:,} rows: {ratio:.2f}x (1.0 = linear)")
    verdict = None
    if big["retrain_rows"] >= 100_000:
        verdict = big["report_s"] < TARGET_S
        _common.print_target(f"100k rows < {TARGET_S:g} s", f"{big['report_s']:.2f} s", verdict)
    result = {
        "machine": info,
        "max_figures": cap,
        "sizes": results,
        "scaling": ratio,
        "target_met": verdict,
    }
    _common.emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
