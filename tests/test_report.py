"""Report statistics and tables against hand-computed values."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from results.analysis import final_round_retrain
from results.report import build_report, build_report_from_stages
from results.schema import STAGES_SCHEMA
from results.stats import grouped_ci, t_half_width, with_verdict
from results.store import SweepStore

T_975_DF2 = 4.302653  # Student t quantile, 0.975, 2 degrees of freedom (tables)

# -- stats -------------------------------------------------------------------------------------


def test_grouped_ci_hand_computed() -> None:
    frame = pd.DataFrame(
        {
            "g": ["a", "a", "a", "b", "b", "c", "c", "d", "d", "d", "d"],
            "x": [1.0, 2.0, 3.0, 0.0, 2.0, 0.7, float("nan"), 1.0, 2.0, 3.0, 4.0],
        }
    )
    ci = grouped_ci(frame, ["g"], "x").set_index("g")
    # a: mean 2, sd 1, n 3; half-width t_{0.975, 2} / sqrt(3)
    assert (ci.loc["a", "mean"], ci.loc["a", "sd"], ci.loc["a", "n"]) == pytest.approx((2, 1, 3))
    assert ci.loc["a", "half_width"] == pytest.approx(T_975_DF2 / math.sqrt(3), abs=1e-6)
    assert (ci.loc["a", "low"], ci.loc["a", "high"]) == pytest.approx(
        (2 - 2.484138, 2 + 2.484138), abs=1e-6
    )
    # b, n = 2: t_{0.975, 1} = 12.706205; values [0, 2]: sd sqrt(2)
    assert ci.loc["b", "half_width"] == pytest.approx(12.706205 * math.sqrt(2) / math.sqrt(2))
    # c: NaN is not a value; one value leaves the interval undefined
    assert ci.loc["c", "mean"] == 0.7 and ci.loc["c", "n"] == 1
    assert math.isnan(ci.loc["c", "sd"]) and math.isnan(ci.loc["c", "low"])
    # d: sd of 1..4 is sqrt(5/3)
    assert ci.loc["d", "sd"] == pytest.approx(math.sqrt(5 / 3))
    # 90%: t_{0.95, 2} = 2.919986
    at_90 = grouped_ci(frame, ["g"], "x", level=0.90).set_index("g")
    assert at_90.loc["a", "half_width"] == pytest.approx(2.919986 / math.sqrt(3), abs=1e-6)


def test_t_half_width_vectorised_and_level_checked() -> None:
    got = t_half_width(np.array([1.0, 1.0, 2.0]), np.array([3, 1, 3]))
    assert got[0] == pytest.approx(T_975_DF2 / math.sqrt(3), abs=1e-6)
    assert math.isnan(got[1])
    assert got[2] == pytest.approx(2 * T_975_DF2 / math.sqrt(3), abs=1e-6)
    with pytest.raises(ValueError, match="level"):
        t_half_width(1.0, 3, level=95)


def test_verdict() -> None:
    cis = pd.DataFrame(
        {
            "low": [0.1, -0.1, -0.5, float("nan"), 0.2],
            "high": [0.5, 0.5, -0.1, float("nan"), 0.3],
            "n": [3, 3, 3, 1, 1],
        }
    )
    assert with_verdict(cis)["verdict"].tolist() == [
        "supported",
        "inconclusive",
        "contradicted",
        "inconclusive",
        "inconclusive",  # n < 2: no interval, whatever the bounds say
    ]


# -- fixture sweep -----------------------------------------------------------------------------
# acc = 0.80 + P[pruner] + S[schedule] + B[budget] + E[schedule][seed]

P = {"l1_filter": 0.02, "random_filter": 0.0, "hrank": 0.05}
S = {"ft": 0.0, "lrw": 0.01, "clr": 0.015}
B = {10: 0.0, 20: 0.01}
E = {"ft": [0.0, 0.0, 0.0], "lrw": [0.002, -0.002, 0.0], "clr": [0.0, 0.01, -0.005]}
SEEDS = (0, 1, 2)
AFTER_PRUNE = {"l1_filter": [0.5, 0.6, 0.7], "random_filter": [0.3, 0.3, 0.3], "hrank": [0.4] * 3}


def acc(pruner: str, sched: str, budget: int, seed: int) -> float:
    return 0.80 + P[pruner] + S[sched] + B[budget] + E[sched][seed]


def schedules_of(pruner: str) -> tuple[str, ...]:
    return ("ft",) if pruner == "hrank" else ("ft", "lrw", "clr")


def base(**kw: object) -> dict:
    row = {
        "round": 1,
        "dataset": "digits",
        "model": "resnet20",
        "structured": True,
        "ratio": 0.5,
        "reused": False,
        "status": "ok",
    }
    row.update(kw)
    return row


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory: pytest.TempPathFactory) -> SweepStore:
    store = SweepStore(tmp_path_factory.mktemp("rep"), "fx")
    for seed in SEEDS:
        store.write_stage(
            base(
                stage_id=f"pre{seed}",
                stage_kind="pretrain",
                parent_ids=[],
                seed=seed,
                structured=None,
                ratio=None,
                test_acc=0.85,
            )
        )
        for pruner in P:
            pid = f"pr-{pruner}-{seed}"
            store.write_stage(
                base(
                    stage_id=pid,
                    stage_kind="prune",
                    parent_ids=[f"pre{seed}"],
                    seed=seed,
                    pruner=pruner,
                    acc_before_prune=0.85,
                    acc_after_prune=AFTER_PRUNE[pruner][seed],
                    params_reduction=0.4,
                    macs_reduction=0.45,
                    achieved_sparsity=0.5,
                )
            )
            for sched in schedules_of(pruner):
                for budget in B:
                    a = acc(pruner, sched, budget, seed)
                    store.write_stage(
                        base(
                            stage_id=f"rt-{pruner}-{sched}-{budget}-{seed}",
                            stage_kind="retrain",
                            parent_ids=[pid],
                            seed=seed,
                            pruner=pruner,
                            structured=None,
                            schedule=sched,
                            budget_epochs=budget,
                            overrides="{}",
                            test_acc=a,
                            test_acc_at_best_val=a - 0.001,
                        )
                    )
    # Seed 3 only failed or diverged: it must be counted, never averaged.
    store.write_stage(
        base(
            stage_id="bad1",
            stage_kind="retrain",
            parent_ids=[],
            seed=3,
            pruner="l1_filter",
            schedule="clr",
            budget_epochs=20,
            status="failed",
            error="boom",
        )
    )
    store.write_stage(
        base(
            stage_id="bad2",
            stage_kind="retrain",
            parent_ids=[],
            seed=3,
            pruner="random_filter",
            schedule="lrw",
            budget_epochs=20,
            status="diverged",
            test_acc=0.1,
        )
    )
    return store


@pytest.fixture(scope="module")
def report(sweep_store: SweepStore, tmp_path_factory: pytest.TempPathFactory):
    return build_report(sweep_store, tmp_path_factory.mktemp("out"))


def expected_ci(diffs: list[float]) -> tuple[float, float, float]:
    mean = sum(diffs) / len(diffs)
    sd = statistics.stdev(diffs)
    half = T_975_DF2 * sd / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def test_headline_cells(report) -> None:
    cells = report.tables["headline"]
    assert len(cells) == (2 * 3 + 1) * 2  # (pruner, schedule) pairs x budgets
    for pruner in P:
        for sched in schedules_of(pruner):
            for budget in B:
                values = [acc(pruner, sched, budget, s) for s in SEEDS]
                row = cells[
                    (cells.pruner == pruner) & (cells.sched == sched) & (cells.budget == budget)
                ].iloc[0]
                assert row["mean"] == pytest.approx(sum(values) / 3)
                assert row["sd"] == pytest.approx(statistics.stdev(values), abs=1e-12)
                assert row["n"] == 3  # the failed / diverged seed-3 rows are not averaged
                assert (row.dataset, row.model, row.structure, row.target) == (
                    "digits",
                    "resnet20",
                    "structured",
                    "ratio=0.5",
                )
    # The rendered table shows the same numbers, in percent.
    l1_ft_10 = [acc("l1_filter", "ft", 10, s) * 100 for s in SEEDS]
    text = f"{sum(l1_ft_10) / 3:.2f} ± {statistics.stdev(l1_ft_10):.2f} (n=3)"
    assert text in report.headline
    assert text in report.markdown_path.read_text()


def test_status_counts(report) -> None:
    st = report.tables["status"].iloc[0]
    assert (st["ok"], st["failed"], st["diverged"], st["skipped"]) == (14 * 3, 1, 1, 0)


def test_claim_1_schedules_beat_ft(report) -> None:
    c1 = report.tables["claim_schedules"]
    assert len(c1) == 2 * 2  # (lrw, clr) x budgets; slr is absent from the sweep
    for sched in ("lrw", "clr"):
        for budget in B:
            # Per seed: mean over the pruners that ran both schedules (l1_filter, random_filter).
            diffs = [
                statistics.mean(
                    acc(p, sched, budget, s) - acc(p, "ft", budget, s)
                    for p in ("l1_filter", "random_filter")
                )
                for s in SEEDS
            ]
            mean, low, high = expected_ci(diffs)
            row = c1[(c1.schedule == sched) & (c1.budget == budget)].iloc[0]
            assert (row["mean"], row["low"], row["high"]) == pytest.approx((mean, low, high))
            assert row["n"] == 3
    # lrw: diffs 0.012, 0.008, 0.010 -> CI [0.00503, 0.01497]: above 0.
    assert set(c1[c1.schedule == "lrw"]["verdict"]) == {"supported"}
    # clr: diffs 0.015, 0.025, 0.010 -> CI [-0.0023, 0.0356]: contains 0.
    assert set(c1[c1.schedule == "clr"]["verdict"]) == {"inconclusive"}
    md = report.markdown_path.read_text()
    assert "[+0.50, +1.50]" in md  # lrw in percentage points


def test_claim_2_random_clr_vs_methodical_ft(report) -> None:
    c2 = report.tables["claim_random_clr"]
    assert set(c2["pruner"]) == {"l1_filter", "hrank"} and set(c2["random"]) == {"random_filter"}
    for pruner, expected in (("l1_filter", "inconclusive"), ("hrank", "contradicted")):
        for budget in B:
            diffs = [
                acc("random_filter", "clr", budget, s) - acc(pruner, "ft", budget, s) for s in SEEDS
            ]
            mean, low, high = expected_ci(diffs)
            row = c2[(c2.pruner == pruner) & (c2.budget == budget)].iloc[0]
            assert (row["mean"], row["low"], row["high"]) == pytest.approx((mean, low, high))
            assert row["verdict"] == expected


def test_random_best_schedule_vs_methodical_ft(report) -> None:
    rvm = report.tables["random_vs_methodical"]
    # random_filter's best schedule by mean is clr at both budgets (0.8167 / 0.8267).
    assert set(rvm["random_schedule"]) == {"clr"}
    row = rvm[(rvm.methodical == "l1_filter") & (rvm.budget == 10)].iloc[0]
    diffs = [acc("random_filter", "clr", 10, s) - acc("l1_filter", "ft", 10, s) for s in SEEDS]
    assert (row["mean"], row["low"], row["high"]) == pytest.approx(expected_ci(diffs))


def test_pruning_table_inherits_from_prune_rows(report) -> None:
    pe = report.tables["pruning"].set_index("pruner")
    assert pe.loc["l1_filter", "acc_after_prune"] == pytest.approx(0.6)
    assert pe.loc["random_filter", "acc_after_prune"] == pytest.approx(0.3)
    assert pe.loc["l1_filter", "acc_before_prune"] == pytest.approx(0.85)
    assert pe.loc["l1_filter", "params_reduction"] == pytest.approx(0.4)
    assert pe.loc["l1_filter", "n_pruned"] == 3  # networks, not retraining runs
    assert pe.loc["l1_filter", "acc_ft"] == pytest.approx(0.83)  # largest budget, 20
    assert pe.loc["l1_filter", "best_schedule"] == "clr"
    assert pe.loc["l1_filter", "acc_best"] == pytest.approx(
        statistics.mean(acc("l1_filter", "clr", 20, s) for s in SEEDS)
    )


def test_validation_selected_table(report) -> None:
    val = report.tables["val_selected"]
    head = report.tables["headline"]
    merged = val.merge(head, on=["pruner", "sched", "budget"], suffixes=("_val", "_test"))
    assert np.allclose(merged["mean_val"], merged["mean_test"] - 0.001)
    assert "Validation-selected test accuracy" in report.markdown_path.read_text()


def test_figure_is_a_valid_png(report) -> None:
    import matplotlib.image

    assert len(report.figures) == 1
    path = report.figures[0]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
    assert f"]({path.relative_to(report.markdown_path.parent).as_posix()})" in (
        report.markdown_path.read_text()
    )


def test_final_round_only() -> None:
    rows = []
    for rnd, value in ((1, 0.5), (2, 0.7), (3, 0.9)):
        rows.append(
            base(
                stage_id=f"r{rnd}",
                stage_kind="retrain",
                parent_ids=[],
                seed=0,
                pruner="magnitude",
                structured=False,
                schedule="ft",
                budget_epochs=5,
                overrides=None,
                round=rnd,
                test_acc=value,
            )
        )
    df = pd.DataFrame(rows).reindex(columns=STAGES_SCHEMA.names)
    final = final_round_retrain(df)
    assert final["stage_id"].tolist() == ["r3"]
    assert final.iloc[0]["structure"] == "unstructured" and final.iloc[0]["sched"] == "ft"


def test_overrides_make_separate_columns() -> None:
    rows = [
        base(
            stage_id=f"r{i}",
            stage_kind="retrain",
            parent_ids=[],
            seed=0,
            pruner="l1_filter",
            schedule="ft",
            budget_epochs=5,
            overrides=ov,
            test_acc=0.5,
        )
        for i, ov in enumerate(['{"lr":0.01}', "{}"])
    ]
    final = final_round_retrain(pd.DataFrame(rows).reindex(columns=STAGES_SCHEMA.names))
    assert sorted(final["sched"]) == ["ft", 'ft {"lr":0.01}']


def test_single_seed_and_single_budget(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "one")
    for pruner in ("random", "magnitude"):
        for sched in ("ft", "clr"):
            store.write_stage(
                base(
                    stage_id=f"{pruner}-{sched}",
                    stage_kind="retrain",
                    parent_ids=[],
                    seed=0,
                    pruner=pruner,
                    structured=False,
                    ratio=0.9,
                    schedule=sched,
                    budget_epochs=10,
                    test_acc=0.7 if sched == "clr" else 0.6,
                )
            )
    rep = build_report(store, tmp_path / "out")
    assert rep.figures == []
    md = rep.markdown_path.read_text()
    assert "single budget" in md and "undefined (n=1)" in md
    c2 = rep.tables["claim_random_clr"].iloc[0]
    assert c2["mean"] == pytest.approx(0.1) and c2["n"] == 1 and c2["verdict"] == "inconclusive"
    assert "70.00 (n=1)" in rep.headline


def test_empty_sweep(tmp_path: Path) -> None:
    rep = build_report(SweepStore(tmp_path, "empty"), tmp_path / "out")
    assert "no successful" in rep.headline
    assert rep.markdown_path.is_file() and rep.figures == []
    assert "not testable" in rep.headline


def synthetic_trials(n_seeds: int = 35, seed: int = 0) -> pd.DataFrame:
    """~100k retrain rows (+ prune rows) spanning 2 datasets, 2 models, 7 pruners, 4 ratios."""
    rng = np.random.default_rng(seed)
    pruners = [
        ("magnitude", False),
        ("magnitude_layerwise", False),
        ("random", False),
        ("l1_filter", True),
        ("random_filter", True),
        ("hrank", True),
        ("taylor_conv_oneshot", True),
    ]
    grid = pd.MultiIndex.from_product(
        [
            ["cifar10", "cifar100"],
            ["resnet56", "vgg16"],
            range(len(pruners)),
            [0.3, 0.5, 0.7, 0.9],
            range(n_seeds),
        ],
        names=["dataset", "model", "pi", "ratio", "seed"],
    ).to_frame(index=False)
    grid["pruner"] = [pruners[i][0] for i in grid["pi"]]
    grid["structured"] = [pruners[i][1] for i in grid["pi"]]
    grid["prune_id"] = "p" + grid.index.astype(str)
    prune = grid.assign(
        stage_id=grid["prune_id"],
        stage_kind="prune",
        parent_ids=[["pre"]] * len(grid),
        acc_before_prune=0.93,
        acc_after_prune=rng.uniform(0.1, 0.9, len(grid)),
        params_reduction=grid["ratio"],
        macs_reduction=grid["ratio"] / 2,
    )
    retrain = grid.merge(
        pd.MultiIndex.from_product(
            [["ft", "lrw", "slr", "clr", "scratch"], [10, 20, 40, 80, 160]],
            names=["schedule", "budget_epochs"],
        ).to_frame(index=False),
        how="cross",
    )
    retrain["stage_id"] = "r" + retrain.index.astype(str)
    retrain["stage_kind"] = "retrain"
    retrain["parent_ids"] = [[p] for p in retrain["prune_id"]]
    retrain["structured"] = None
    retrain["overrides"] = "{}"
    retrain["test_acc"] = np.clip(0.9 + rng.normal(0, 0.01, len(retrain)), 0, 1)
    retrain["status"] = np.where(rng.random(len(retrain)) < 0.01, "failed", "ok")
    trials = pd.concat([prune, retrain], ignore_index=True)
    trials["round"] = 1
    trials["reused"] = False
    trials["status"] = trials["status"].fillna("ok")
    return trials.reindex(columns=STAGES_SCHEMA.names)


@pytest.mark.scale
def test_report_on_100k_rows(tmp_path: Path) -> None:
    trials = synthetic_trials()
    n_retrain = int((trials["stage_kind"] == "retrain").sum())
    assert n_retrain >= 98_000
    started = time.perf_counter()
    rep = build_report_from_stages(trials, tmp_path, sweep="big")
    elapsed = time.perf_counter() - started
    print(
        f"\nreport on {len(trials)} trial rows ({n_retrain} retrain): {elapsed:.2f}s, "
        f"{len(rep.figures)} figures"
    )
    assert len(rep.tables["headline"]) == 2 * 2 * 7 * 4 * 5 * 5
    assert len(rep.figures) == 6  # the default cap; 32 groups have several budgets


def test_emptied_layers_and_pruner_options_are_flagged() -> None:
    from results.report import _status_line

    rows = [
        base(
            stage_id=f"r{i}",
            stage_kind="retrain",
            parent_ids=[],
            seed=0,
            pruner="magnitude",
            structured=False,
            ratio=0.95,
            pruner_options=options,
            schedule="ft",
            budget_epochs=5,
            overrides=None,
            test_acc=0.5,
            emptied_layers=emptied,
        )
        for i, (options, emptied) in enumerate(
            [
                ('{"layers": "conv", "min_keep": 0.0}', 2),
                ('{"layers": "conv+linear", "min_keep": 0.0}', 0),
            ]
        )
    ]
    df = pd.DataFrame(rows).reindex(columns=STAGES_SCHEMA.names)
    final = final_round_retrain(df)
    assert sorted(final["pruner"]) == ["magnitude", "magnitude[layers=conv+linear]"]
    line = _status_line(final)
    assert "WARNING: 1 of them" in line and "resnet20 magnitude ratio=0.95" in line
    assert "WARNING" not in _status_line(final[final["emptied_layers"] == 0])


def test_schedules_figure_draws_the_lr_each_schedule_ran(tmp_path: Path) -> None:
    """Figure 1 as run: per (dataset, budget), the recorded lr of the lowest-seed successful
    retrain of each schedule; a failed run and a higher seed are not drawn."""
    from results.figures import plot_schedules, schedule_lines

    final = pd.DataFrame(
        [
            {"stage_id": "ft1", "dataset": "digits", "budget": 3, "schedule": "ft", "seed": 1,
             "status": "ok"},
            {"stage_id": "ft0", "dataset": "digits", "budget": 3, "schedule": "ft", "seed": 0,
             "status": "ok"},
            {"stage_id": "clr0", "dataset": "digits", "budget": 3, "schedule": "clr", "seed": 0,
             "status": "failed"},
            {"stage_id": "clr1", "dataset": "digits", "budget": 3, "schedule": "clr", "seed": 1,
             "status": "ok"},
        ]
    )  # fmt: skip
    lrs = {"ft0": [0.001] * 3, "ft1": [0.5] * 3, "clr0": [9.0] * 3, "clr1": [0.001, 0.1, 0.05]}
    epochs = pd.DataFrame(
        [{"stage_id": sid, "epoch": e + 1, "lr": lr} for sid, v in lrs.items()
         for e, lr in reversed(list(enumerate(v)))]  # stored out of order on purpose
    )  # fmt: skip
    assert schedule_lines(final, epochs) == {
        ("digits", 3): {"ft": ([1, 2, 3], [0.001] * 3), "clr": ([1, 2, 3], [0.001, 0.1, 0.05])}
    }
    (path,) = plot_schedules(final, epochs, tmp_path, max_figures=4)
    assert path.name == "schedules__digits__b3.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_schedules(final, epochs.iloc[:0], tmp_path, max_figures=4) == []
