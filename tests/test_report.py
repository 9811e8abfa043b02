"""Report statistics and tables against hand-computed values."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from nptm.results.analysis import final_round_retrain
from nptm.results.report import build_report, build_report_from_stages
from nptm.results.schema import STAGES_SCHEMA
from nptm.results.stats import (
    benjamini_hochberg,
    directional_verdict,
    grouped_ci,
    holm,
    t_half_width,
    tost_pvalue,
    with_verdict,
)
from nptm.results.store import SweepStore

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
    """Exploratory claim 1: per budget, schedule − ft averaged over pruners within a seed;
    p: scipy's one-sample t-test; q: Benjamini-Hochberg over the table's 4 rows."""
    c1 = report.tables["claim_schedules"]
    assert len(c1) == 2 * 2  # (lrw, clr) x budgets; slr is absent from the sweep
    expected_p = []
    for r in c1.itertuples():
        # Per seed: mean over the pruners that ran both schedules (l1_filter, random_filter).
        diffs = [
            statistics.mean(
                acc(p, r.schedule, r.budget, s) - acc(p, "ft", r.budget, s)
                for p in ("l1_filter", "random_filter")
            )
            for s in SEEDS
        ]
        assert (r.mean, r.low, r.high) == pytest.approx(expected_ci(diffs))
        assert r.n == 3
        expected_p.append(sps.ttest_1samp(diffs, 0.0).pvalue)
    assert c1["p"].tolist() == pytest.approx(expected_p, rel=1e-9)
    assert c1["q"].tolist() == pytest.approx(bh_by_hand(expected_p), rel=1e-9)
    # lrw: diffs 0.012, 0.008, 0.010 -> p 0.0131 at both budgets, q = 0.0131 x 4 / 2 = 0.026;
    # clr: diffs 0.015, 0.025, 0.010 -> p 0.063, q 0.063.
    assert set(c1[c1.schedule == "lrw"]["reading"]) == {"above 0"}
    assert set(c1[c1.schedule == "clr"]["reading"]) == {"–"}
    assert "verdict" not in c1  # exploratory: no verdict
    md = report.markdown_path.read_text()
    assert "[+0.50, +1.50]" in md  # lrw in percentage points


def test_claim_2_random_clr_vs_methodical_ft(report) -> None:
    """Exploratory claim 2: random_filter + clr − methodical + ft per budget, tested against
    −0.5 points (non-inferiority), TOST at ±0.5 points, BH q over the table's 4 rows."""
    c2 = report.tables["claim_random_clr"]
    assert set(c2["pruner"]) == {"l1_filter", "hrank"} and set(c2["random"]) == {"random_filter"}
    expected_p, expected_tost = [], []
    for r in c2.itertuples():
        diffs = [
            acc("random_filter", "clr", r.budget, s) - acc(r.pruner, "ft", r.budget, s)
            for s in SEEDS
        ]
        assert (r.mean, r.low, r.high) == pytest.approx(expected_ci(diffs))
        assert r.null == -0.005
        expected_p.append(sps.ttest_1samp(diffs, -0.005).pvalue)
        expected_tost.append(tost_by_hand(diffs, 0.005))
    assert c2["p"].tolist() == pytest.approx(expected_p, rel=1e-9)
    assert c2["q"].tolist() == pytest.approx(bh_by_hand(expected_p), rel=1e-9)
    assert c2["p_tost"].tolist() == pytest.approx(expected_tost, rel=1e-9)
    assert c2["q_tost"].tolist() == pytest.approx(bh_by_hand(expected_tost), rel=1e-9)
    # hrank: diffs -0.035, -0.025, -0.040: p 0.023 against -0.005, q 0.047 -> below;
    # l1_filter: diffs -0.005, 0.005, -0.010, mean -0.0033: not separated from -0.005.
    assert c2.set_index(["pruner", "budget"])["reading"].to_dict() == {
        ("l1_filter", 10): "–",
        ("l1_filter", 20): "–",
        ("hrank", 10): "below −0.5",
        ("hrank", 20): "below −0.5",
    }


def holm_by_hand(ps: list[float]) -> list[float]:
    """Holm's step-down: the k-th smallest p times (m - k + 1), made monotone, capped at 1."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def bh_by_hand(ps: list[float]) -> list[float]:
    """Benjamini-Hochberg: the k-th smallest p times m / k, made monotone from the largest."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i], reverse=True)
    adjusted, running = [0.0] * m, 1.0
    for k, i in zip(range(m, 0, -1), order, strict=True):
        running = min(running, ps[i] * m / k)
        adjusted[i] = running
    return adjusted


def tost_by_hand(diffs: list[float], margin: float) -> float:
    """Two one-sided t-tests of mean(diffs) > -margin and < +margin: the larger p."""
    n, mean, sd = len(diffs), statistics.mean(diffs), statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    return max(sps.t.sf((mean + margin) / se, n - 1), sps.t.cdf((mean - margin) / se, n - 1))


def test_confirmatory_family(report) -> None:
    """One test per claim, schedule and structure, pooling every cell (pruner x budget)
    within a seed; Holm over the 3 tests (lrw, clr; claim 2), by hand.

    Per seed, lrw − ft over (l1_filter, random_filter) x (10, 20) = S[lrw] + E[lrw][s]:
    0.012, 0.008, 0.010; clr: 0.015, 0.025, 0.010. Claim 2, random_filter + clr −
    (l1_filter, hrank) + ft over both budgets = 0.015 + E[clr][s] − (0.02 + 0.05) / 2:
    −0.020, −0.010, −0.025, tested against −0.005.
    """
    conf = report.tables["confirmatory"]
    assert conf["comparison"].tolist() == [
        "lrw − ft",
        "clr − ft",
        "random_filter + clr − l1_filter/hrank + ft",
    ]
    assert set(conf["structure"]) == {"structured"} and conf["cells"].tolist() == [4, 4, 4]
    per_seed = {
        "lrw − ft": [0.012, 0.008, 0.010],
        "clr − ft": [0.015, 0.025, 0.010],
        "random_filter + clr − l1_filter/hrank + ft": [-0.020, -0.010, -0.025],
    }
    nulls = [0.0, 0.0, -0.005]
    expected_p = []
    for r, null in zip(conf.itertuples(), nulls, strict=True):
        diffs = per_seed[r.comparison]  # (t quantile from tables: 7 digits)
        assert (r.mean, r.low, r.high) == pytest.approx(expected_ci(diffs), abs=1e-8)
        assert (r.n, r.null) == (3, null)
        expected_p.append(sps.ttest_1samp(diffs, null).pvalue)
    assert conf["p"].tolist() == pytest.approx(expected_p, rel=1e-9)
    holm_p = holm_by_hand(expected_p)  # 0.0131 x 3 = 0.039; 0.063 x 2, 0.094 x 1 -> 0.127
    assert conf["p_holm"].tolist() == pytest.approx(holm_p, rel=1e-9)
    assert holm_p[0] == pytest.approx(0.0393, abs=1e-3)
    # Pooled, lrw is supported (the per-budget rows alone would need 2 budgets x 2 schedules
    # + claim 2's tests in one family); clr and claim 2 are not separated from their nulls.
    assert conf["verdict"].tolist() == ["supported", "inconclusive", "inconclusive"]
    # Claim 2's secondary reading: TOST of the pooled differences, its own Holm family of one.
    tost = tost_by_hand(per_seed["random_filter + clr − l1_filter/hrank + ft"], 0.005)
    assert conf["p_tost"].iloc[2] == pytest.approx(tost, rel=1e-9)
    assert conf["p_tost_holm"].iloc[2] == pytest.approx(tost, rel=1e-9)
    assert conf["equivalent"].tolist() == ["", "", "not shown"]
    # The headline and report.md read the confirmatory verdicts out first.
    head = report.headline
    assert head.index("confirmatory tests") < head.index("final test accuracy")
    assert "Holm over 3 tests" in head and "supported" in head.splitlines()[5]
    md = report.markdown_path.read_text()
    assert md.index("## The answer: confirmatory tests") < md.index("## Runs by status")
    assert "The 3 tests of both claims are one family" in md


def test_tost_and_holm_verdicts() -> None:
    """The vectorised TOST against statsmodels' paired TOST and against two one-sided t-tests
    by hand; Holm, BH and the directional verdicts on a family where some tests survive."""
    from statsmodels.stats.weightstats import ttost_paired

    a = np.array([0.801, 0.799, 0.803, 0.800])
    b = np.array([0.800, 0.800, 0.800, 0.801])
    d = a - b

    def tost(margin: float) -> float:
        return float(tost_pvalue(d.mean(), d.std(ddof=1), len(d), margin))

    for margin in (0.005, 0.0005, 0.002):
        want = ttost_paired(a, b, -margin, margin)[0]
        assert tost(margin) == pytest.approx(want, rel=1e-9)
        assert tost(margin) == pytest.approx(tost_by_hand(list(d), margin), rel=1e-9)
    assert tost(0.005) < 0.05  # the mean difference, 0.0005, is well inside ±0.005
    assert tost(0.0005) > 0.5  # ... and not inside ±0.0005
    assert math.isnan(float(tost_pvalue(0.0, float("nan"), 1, 0.005)))

    family = [0.001, 0.004, 0.3, np.nan, 0.002]
    tested = [0.001, 0.004, 0.3, 0.002]  # the NaN is no test
    want = holm_by_hand(tested)  # 0.004 0.012 0.3 0.006
    got = holm(np.array(family))
    assert math.isnan(got[3]) and [*got[:3], got[4]] == pytest.approx(want)
    q = benjamini_hochberg(np.array(family))
    assert [*q[:3], q[4]] == pytest.approx(bh_by_hand(tested))
    verdicts = directional_verdict(
        np.array([0.02, -0.03, 0.01, 0.01, -0.002]),
        np.array([0.0, 0.0, 0.0, 0.0, -0.005]),
        got,
        alpha=0.05,
    )
    # Significantly above 0; below 0; not significant; no test; above the null -0.005.
    assert verdicts.tolist() == [
        "supported",
        "contradicted",
        "inconclusive",
        "inconclusive",
        "supported",
    ]


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


def figure_files(png: Path) -> tuple[tuple[int, int], tuple[float, float]]:
    """A report figure's PNG pixel size and dpi (its pHYs chunk, whole dots per metre: 150 dpi
    is stored as 5906, read back as 150.012), after checking that the PNG and its SVG twin
    (same stem) exist."""
    from PIL import Image

    assert png.suffix == ".png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = png.parent / (png.stem + ".svg")
    assert b"<svg" in svg.read_bytes()[:2000]
    with Image.open(png) as image:
        return image.size, image.info["dpi"]


def test_figure_is_a_png_at_150_dpi_and_an_svg(report) -> None:
    assert len(report.figures) == 1
    path = report.figures[0]
    size, dpi = figure_files(path)
    assert dpi == pytest.approx((150, 150), abs=0.02)
    assert size[1] > 300 and size[0] > 600
    link = path.relative_to(report.markdown_path.parent).as_posix()
    svg_link = link.removesuffix(".png") + ".svg"
    assert f"]({link}) ([SVG]({svg_link}))" in report.markdown_path.read_text()


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
    (bars,) = rep.figures  # one budget: a bar chart instead of budget curves
    assert bars.name == "acc_bars__digits__resnet20__unstructured__ratio-0.9.png"
    # 2 pruners x 2 schedules: figsize max(5, 1 + 0.35 * 4 + 1.6) x 3.2 inches, at 150 dpi
    assert figure_files(bars)[0] == (5 * 150, round(3.2 * 150))
    md = rep.markdown_path.read_text()
    assert "](figures/acc_bars__digits__resnet20__unstructured__ratio-0.9.png)" in md
    assert "Accuracy vs retraining budget" not in md and "undefined (n=1)" in md
    c2 = rep.tables["claim_random_clr"].iloc[0]
    assert c2["mean"] == pytest.approx(0.1) and c2["n"] == 1 and c2["reading"] == "–"
    conf = rep.tables["confirmatory"]  # one seed: no test, whatever the difference
    assert set(conf["verdict"]) == {"inconclusive"} and conf["p"].isna().all()
    assert conf.set_index("comparison")["mean"].to_dict() == pytest.approx(
        {"clr − ft": 0.1, "random + clr − magnitude + ft": 0.1}
    )
    assert "70.00 (n=1)" in rep.headline


def test_bar_chart_draws_mean_and_interval_of_every_cell() -> None:
    """Bar heights are the cells' means, error bars their t intervals (in %)."""
    from matplotlib.container import BarContainer

    from nptm.results.figures import bar_figure

    rows = [
        {"pruner": p, "sched": sched, "mean": m, "half_width": hw, "budget": 6}
        for p, sched, m, hw in [
            ("magnitude", "ft", 0.90, 0.01), ("magnitude", "clr", 0.93, 0.02),
            ("random", "ft", 0.85, float("nan")), ("random", "clr", 0.88, 0.005),
        ]
    ]  # fmt: skip
    fig = bar_figure(pd.DataFrame(rows), ("digits", "resnet20", "unstructured", "ratio=0.9"), 0.95)
    ax = fig.axes[0]
    drawn = {}
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    for container, sched in zip(bars, ("ft", "clr"), strict=True):
        segments = container.errorbar.lines[2][0].get_segments()
        lengths = [abs(seg[1][1] - seg[0][1]) / 2 for seg in segments if len(seg)]
        drawn[sched] = ([bar.get_height() for bar in container.patches], lengths)
    assert drawn["ft"][0] == pytest.approx([90.0, 85.0])
    assert drawn["clr"][0] == pytest.approx([93.0, 88.0])
    assert drawn["clr"][1] == pytest.approx([2.0, 0.5])
    assert drawn["ft"][1] == pytest.approx([1.0])  # n = 1 (NaN interval): no error bar
    assert [t.get_text() for t in ax.get_xticklabels()] == ["magnitude", "random"]


def tradeoff_stages() -> pd.DataFrame:
    """Two pruners at ratios 0.5 and 0.8, ft and clr, 3 seeds, one budget; the sparsity, MACs
    reduction and nonzero parameters each run achieved vary with the seed."""
    rows = []
    for pruner in ("magnitude", "random"):
        for ratio in (0.5, 0.8):
            for sched in ("ft", "clr"):
                for seed in SEEDS:
                    rows.append(
                        base(
                            stage_id=f"{pruner}-{ratio}-{sched}-{seed}",
                            stage_kind="retrain",
                            parent_ids=[],
                            seed=seed,
                            pruner=pruner,
                            structured=False,
                            ratio=ratio,
                            schedule=sched,
                            budget_epochs=6,
                            test_acc=0.9
                            - ratio / 10
                            + (0.01 if sched == "clr" else 0)
                            + seed / 1000,
                            achieved_sparsity=ratio + seed / 100,
                            macs_reduction=ratio / 2 + seed / 100,
                            nonzero_params=round(1000 * (1 - ratio)) - 10 * seed,
                        )
                    )
    return pd.DataFrame(rows).reindex(columns=STAGES_SCHEMA.names)


def test_tradeoff_curves_over_pruning_ratios(tmp_path: Path) -> None:
    from nptm.results.figures import tradeoff_figure

    rep = build_report_from_stages(tradeoff_stages(), tmp_path, sweep="ratios")
    names = sorted(p.name for p in rep.figures)
    # One budget per ratio group: bars; two ratios per (dataset, model, structure, budget):
    # one trade-off figure.
    assert names == [
        "acc_bars__digits__resnet20__unstructured__ratio-0.5.png",
        "acc_bars__digits__resnet20__unstructured__ratio-0.8.png",
        "acc_vs_size__digits__resnet20__unstructured__6.png",
    ]
    cells = rep.tables["headline"]
    cell = cells[
        (cells.pruner == "random") & (cells.sched == "clr") & (cells.target == "ratio=0.8")
    ]
    # x: mean over seeds 0, 1, 2 of ratio + seed / 100 and ratio / 2 + seed / 100
    assert cell["achieved_sparsity"].iloc[0] == pytest.approx(0.81)
    assert cell["macs_reduction"].iloc[0] == pytest.approx(0.41)
    fig = tradeoff_figure(cells, ("digits", "resnet20", "unstructured", 6), 0.95)
    sparsity_random = fig.axes[1]  # row 1: sparsity; columns: magnitude, random
    assert sparsity_random.get_title() == "random"
    ft_line, clr_line = (c.lines[0] for c in sparsity_random.containers)
    assert ft_line.get_xdata() == pytest.approx([51.0, 81.0])
    assert clr_line.get_ydata() == pytest.approx([(0.86 + 0.001) * 100, (0.83 + 0.001) * 100])
    # Unstructured: masks leave dense MACs unchanged, so row 2 is the nonzero parameters,
    # mean over seeds 0, 1, 2 of 1000 * (1 - ratio) - 10 * seed: 190 (0.8) and 490 (0.5).
    assert len(fig.axes) == 4 and "MACs" not in fig.get_suptitle()
    params_random = fig.axes[3]
    assert params_random.get_xlabel() == "nonzero parameters"
    assert "accuracy vs sparsity and nonzero parameters" in fig.get_suptitle()
    for container in params_random.containers:
        assert container.lines[0].get_xdata() == pytest.approx([190.0, 490.0])
    ft_y = [(0.9 - r / 10 + 0.001) * 100 for r in (0.8, 0.5)]
    assert params_random.containers[0].lines[0].get_ydata() == pytest.approx(ft_y)
    # The same cells as structured pruning: MACs reduction instead, 0.8 / 2 + 0.01 = 41 %.
    structured = tradeoff_figure(cells, ("digits", "resnet20", "structured", 6), 0.95)
    assert structured.axes[3].get_xlabel() == "MACs reduction (%)"
    assert structured.axes[3].containers[0].lines[0].get_xdata() == pytest.approx([26.0, 41.0])
    md = rep.markdown_path.read_text()
    assert "](figures/acc_vs_size__digits__resnet20__unstructured__6.png)" in md
    for path in rep.figures:
        assert figure_files(path)[1] == pytest.approx((150, 150), abs=0.02)


def test_quickstart_grid_gets_figures(tmp_path: Path) -> None:
    """The quickstart grid (one budget; one ratio per pruner) as a finished sweep would store
    it: its report draws a bar chart per pruning target."""
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import load_grid

    plan = build_plan(load_grid(Path(__file__).parents[1] / "search_spaces" / "quickstart.yaml"))
    rows = [
        base(
            stage_id=sid, stage_kind="retrain", parent_ids=[], seed=spec.seed, pruner=spec.pruner,
            structured=None, ratio=spec.ratio, schedule=spec.schedule,
            budget_epochs=spec.budget, test_acc=0.9 + spec.seed / 100,
        )
        for sid, spec in plan.stages.items()
        if spec.kind == "retrain"
    ]  # fmt: skip
    rep = build_report_from_stages(
        pd.DataFrame(rows).reindex(columns=STAGES_SCHEMA.names), tmp_path
    )
    assert sorted(p.name for p in rep.figures) == [
        "acc_bars__digits__resnet20__structured__ratio-0.5.png",
        "acc_bars__digits__resnet20__unstructured__ratio-0.9.png",
    ]


def test_latex_tables(sweep_store: SweepStore, report, tmp_path: Path) -> None:
    """`latex=True`: every table of report.md also as a .tex file, the same cells escaped."""
    rep = build_report(sweep_store, tmp_path, latex=True)
    assert sorted(p.name for p in rep.latex) == sorted(
        f"{n}.tex"
        for n in ("status", "confirmatory", "headline", "random_vs_methodical",
                  "claim_schedules", "claim_random_clr", "pruning", "val_selected")
    )  # fmt: skip
    headline = (tmp_path / "headline.tex").read_text()
    assert headline.count("\\begin{tabular}") == 2  # one per budget, as in report.md
    l1_ft_10 = [acc("l1_filter", "ft", 10, s) * 100 for s in SEEDS]
    cell = f"{sum(l1_ft_10) / 3:.2f} $\\pm$ {statistics.stdev(l1_ft_10):.2f} (n=3)"
    assert f"l1\\_filter & {cell}" in headline
    assert "\\caption{digits / resnet20 / structured / ratio=0.5 / budget 10}" in headline
    pruning = (tmp_path / "pruning.tex").read_text()
    assert "params $\\downarrow$ \\%" in pruning  # header escaped and symbol made math
    assert report.latex == []  # only on request


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
    # The default cap of 6 per kind: 32 groups have several budgets (budget curves), 40
    # (dataset, model, structure, budget) have several ratios (trade-off curves).
    kinds = [p.name.split("__")[0] for p in rep.figures]
    assert (kinds.count("acc_vs_budget"), kinds.count("acc_vs_size"), len(kinds)) == (6, 6, 12)


def test_emptied_layers_and_pruner_options_are_flagged() -> None:
    from nptm.results.report import _status_line

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
    from nptm.results.figures import plot_schedules, schedule_lines

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
    assert figure_files(path)[0] == (round(5.2 * 150), round(2.8 * 150))
    assert plot_schedules(final, epochs.iloc[:0], tmp_path, max_figures=4) == []
