"""The confirmatory tests against hand-computed values and simulations with known truth, and
`nptm plan --power` against the noncentral t by numerical integration.

The simulations draw seeded sweeps of the quickstart grid (a `per_trial` grid: every seed has
its own networks and masks, which claim 2 does not pair away) with bench/power.py's model and
run the report's own functions on them, all studies at once (``by=["study"]``). A rate of
rejections over N studies is checked against the binomial 99.9% interval of its nominal level.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
from scipy import integrate
from scipy import stats as sps

from nptm.orchestrator.cli import main
from nptm.results.analysis import claim_random_clr, claim_schedules, final_round_retrain
from nptm.results.confirmatory import confirmatory_tests, paired_differences, pooled_tests
from nptm.results.power import (
    directional_power,
    min_detectable_effect,
    pooled_sd,
    seeds_needed,
)
from nptm.results.schema import STAGES_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
ALPHA, LEVEL, MARGIN = 0.05, 0.95, 0.005
N_STUDIES = 2000


def _bench() -> ModuleType:
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))  # the script imports its `_common` helper
    spec = importlib.util.spec_from_file_location("bench_power", ROOT / "bench" / "power.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _bench()


def binomial_bounds(rate: float, n: int = N_STUDIES) -> tuple[float, float]:
    """The 99.9% interval of the share of n Bernoulli(rate) trials."""
    return sps.binom.ppf(0.0005, n, rate) / n, sps.binom.ppf(0.9995, n, rate) / n


# -- the pooled estimate by hand ----------------------------------------------------------------


def stage(**kw: object) -> dict:
    row = {"round": 1, "dataset": "digits", "model": "resnet20", "structured": True,
           "ratio": 0.5, "reused": False, "status": "ok", "stage_kind": "retrain",
           "parent_ids": [], "overrides": "{}"}  # fmt: skip
    return row | kw


def test_confirmatory_estimate_by_hand() -> None:
    """Two pruners x two budgets x three seeds of ft and clr; seed 2 lacks the l1_filter
    budget-20 clr run, so that cell leaves the test in every seed (each seed must average the
    same cells), and a failed run is no pair."""
    clr_minus_ft = {  # (pruner, budget) -> differences in seeds 0, 1, 2
        ("l1_filter", 10): [0.010, 0.014, 0.006],
        ("l1_filter", 20): [0.020, 0.030, None],
        ("random_filter", 10): [0.004, 0.008, 0.012],
        ("random_filter", 20): [0.002, 0.000, 0.004],
    }
    rows = []
    for (pruner, budget), diffs in clr_minus_ft.items():
        for seed, d in enumerate(diffs):
            ft = 0.8 + 0.01 * seed + budget / 1000
            common = {"pruner": pruner, "budget_epochs": budget, "seed": seed}
            rows.append(stage(stage_id=f"{pruner}{budget}ft{seed}", schedule="ft",
                              test_acc=ft, **common))  # fmt: skip
            if d is not None:
                rows.append(stage(stage_id=f"{pruner}{budget}clr{seed}", schedule="clr",
                                  test_acc=ft + d, **common))  # fmt: skip
    rows.append(stage(stage_id="bad", schedule="clr", pruner="l1_filter", budget_epochs=20,
                      seed=2, status="failed", test_acc=None))  # fmt: skip
    final = final_round_retrain(pd.DataFrame(rows).reindex(columns=STAGES_SCHEMA.names))
    ok = final[(final["status"] == "ok") & final["test_acc"].notna()]
    claim_1, claim_2 = confirmatory_tests(ok, LEVEL, MARGIN).itertuples()
    # Claim 1, per seed: the mean over the 3 complete cells.
    per_seed_1 = [(0.010 + 0.004 + 0.002) / 3, (0.014 + 0.008 + 0.000) / 3,
                  (0.006 + 0.012 + 0.004) / 3]  # fmt: skip
    # Claim 2: random_filter + clr − l1_filter + ft, same budget and seed (ft is the same for
    # both pruners here, so the difference is random_filter's clr − ft), over budgets 10, 20.
    per_seed_2 = [(0.004 + 0.002) / 2, (0.008 + 0.000) / 2, (0.012 + 0.004) / 2]
    ps = []
    for row, per_seed, cells, null in ((claim_1, per_seed_1, 3, 0.0),
                                       (claim_2, per_seed_2, 2, -MARGIN)):  # fmt: skip
        mean, sd = statistics.mean(per_seed), statistics.stdev(per_seed)
        half = sps.t.ppf(0.975, 2) * sd / math.sqrt(3)
        assert (row.cells, row.n, row.null) == (cells, 3, null)
        assert (row.mean, row.sd) == pytest.approx((mean, sd), abs=1e-12)
        assert (row.low, row.high) == pytest.approx((mean - half, mean + half), abs=1e-12)
        ps.append(sps.ttest_1samp(per_seed, null).pvalue)
        assert row.p == pytest.approx(ps[-1], rel=1e-9)
    assert (claim_1.comparison, claim_2.comparison) == (
        "clr − ft",
        "random_filter + clr − l1_filter + ft",
    )
    # Holm over the family of 2: the smaller p doubled, the larger kept (if not smaller).
    small, large = sorted(ps)
    want = {small: 2 * small, large: max(large, 2 * small)}
    assert [claim_1.p_holm, claim_2.p_holm] == pytest.approx([want[p] for p in ps], rel=1e-9)


# -- the vectorised path is the report's path ---------------------------------------------------


@pytest.fixture(scope="module")
def design():
    return bench.load_design(str(QUICKSTART))


def simulated(design, setting, studies: int, seed: int) -> tuple[pd.DataFrame, dict]:
    acc, truths = bench.simulate(design, setting, studies, np.random.default_rng(seed))
    return bench.stacked(design, acc), truths


def test_studies_at_once_equal_studies_one_by_one(design) -> None:
    setting = bench.Setting("x", effect=0.3, claim2=-0.2)
    frame, _ = simulated(design, setting, 3, seed=1)
    together = confirmatory_tests(frame, LEVEL, MARGIN, by=["study"])
    alone = [
        confirmatory_tests(frame[frame["study"] == k], LEVEL, MARGIN).assign(study=k)
        for k in range(3)
    ]
    expected = pd.concat(alone, ignore_index=True)[together.columns]
    pd.testing.assert_frame_equal(together, expected, check_dtype=False)
    exp_together = claim_random_clr(paired_differences(frame, ["study"]), LEVEL, MARGIN, ["study"])
    exp_alone = claim_random_clr(paired_differences(frame[frame["study"] == 2]), LEVEL, MARGIN)
    last = exp_together[exp_together["study"] == 2].drop(columns="study").reset_index(drop=True)
    pd.testing.assert_frame_equal(last, exp_alone[last.columns], check_dtype=False)


def test_simulated_truth_is_the_pooled_estimate_without_noise() -> None:
    """With no run noise, a shared-pretrain grid's pooled estimates are the set truths exactly,
    whatever the networks, masks and per-network effects drawn (the simulator's centring),
    when every seed retrains one shared mask (`seeds.random_masks: shared`)."""
    grid = str(ROOT / "search_spaces" / "paper_cifar_pfec.yaml")
    pfec = bench.load_design(grid, overrides=("seeds.random_masks=shared",))
    setting = bench.Setting("x", effect=0.37, claim2=-0.21, seed_sd=0.0)
    frame, truths = simulated(pfec, setting, 2, seed=3)
    conf = confirmatory_tests(frame, LEVEL, MARGIN, by=["study"])
    assert conf["mean"].to_numpy() == pytest.approx(conf["claim"].map(truths), abs=1e-12)
    assert (conf["sd"] < 1e-12).all() and set(conf["cells"]) == {80, 40}
    # The grid as shipped draws a random mask per seed: claim 1's pairs retrain one mask of
    # their seed (it cancels), claim 2's compare it with a methodical mask (it varies).
    frame, truths = simulated(bench.load_design(grid), setting, 2, seed=3)
    conf = confirmatory_tests(frame, LEVEL, MARGIN, by=["study"])
    claim_1 = conf["claim"] == "claim 1"
    assert conf[claim_1]["mean"].to_numpy() == pytest.approx(truths["claim 1"], abs=1e-12)
    assert (conf[claim_1]["sd"] < 1e-12).all() and (conf[~claim_1]["sd"] > 1e-4).all()


# -- calibration by simulation ------------------------------------------------------------------


@pytest.fixture(scope="module")
def null_studies(design):
    """N_STUDIES sweeps with every test's truth at its null: claim 1 at 0, claim 2 at -margin
    (no per-network heterogeneity, so every per-cell exploratory null holds too)."""
    setting = bench.Setting("null", effect=0.0, claim2=-MARGIN * 100, hetero_sd=0.0)
    frame, _ = simulated(design, setting, N_STUDIES, seed=20260)
    diffs = paired_differences(frame, ["study"])  # as claim_tables, one call per study there
    return {
        "confirmatory": pooled_tests(diffs, LEVEL, MARGIN, by=["study"]),
        "claim_schedules": claim_schedules(diffs, LEVEL, by=["study"]),
        "claim_random_clr": claim_random_clr(diffs, LEVEL, MARGIN, by=["study"]),
    }


def test_every_test_is_calibrated_under_its_null(null_studies) -> None:
    low, high = binomial_bounds(ALPHA)
    conf = null_studies["confirmatory"]
    tests = conf.groupby(["claim", "structure", "comparison"])
    assert tests.ngroups == 8  # 2 structures x (lrw, slr, clr; random + clr vs methodical)
    # Each test alone (raw p): exact t-tests, claim 2's non-inferiority at -margin included.
    for name, rate in (tests["p"].apply(lambda p: (p < ALPHA).mean())).items():
        assert low <= rate <= high, (name, rate)
    # TOST at the boundary -margin: at most alpha (conservative when the se is not << margin).
    for name, rate in tests["p_tost"].apply(lambda p: (p < ALPHA).mean()).dropna().items():
        assert rate <= high, (name, rate)
    # The family: any false verdict (supported or contradicted) at most alpha.
    fwer = conf.groupby("study")["verdict"].apply(lambda v: (v != "inconclusive").any()).mean()
    assert fwer <= high
    # Coverage of the reported intervals.
    c_low, c_high = binomial_bounds(LEVEL)
    truth = np.where(conf["claim"] == "claim 2", -MARGIN, 0.0)
    covered = ((conf["low"] <= truth) & (truth <= conf["high"])).groupby(conf["comparison"])
    for name, rate in covered.mean().items():
        assert c_low <= rate <= c_high, (name, rate)


def test_exploratory_tests_are_calibrated_under_their_nulls(null_studies) -> None:
    low, high = binomial_bounds(ALPHA)
    for name, key, cols in (
        ("claim_schedules", "schedule", ["p"]),
        ("claim_random_clr", "pruner", ["p", "p_tost"]),
    ):
        table = null_studies[name]
        rows = table.groupby(["structure", "target", "budget", key], observed=True)
        assert rows.ngroups == (6 if key == "schedule" else 2)
        for col in cols:
            for row, rate in rows[col].apply(lambda p: (p < ALPHA).mean()).items():
                assert rate <= high, (name, col, row, rate)
                if col == "p":  # exact; the TOST may be conservative
                    assert rate >= low, (name, col, row, rate)
        # Benjamini-Hochberg over each study's table: under the global null its false
        # discovery rate is the chance of any discovery, at most alpha.
        any_q = table.groupby("study")["q"].apply(lambda q: (q < ALPHA).any()).mean()
        assert any_q <= high, (name, any_q)


def test_simulated_power_is_the_noncentral_t(design) -> None:
    """A single confirmatory test's rate of "supported" at raw alpha (its p before Holm) is
    the noncentral-t power `nptm plan --power` computes, for the pooled sd of its cells."""
    setting = bench.Setting("x", effect=0.3, claim2=0.0, mask_sd=0.0, hetero_sd=0.0)
    frame, _ = simulated(design, setting, N_STUDIES, seed=7)
    conf = confirmatory_tests(frame, LEVEL, MARGIN, by=["study"])
    claim_1 = conf[conf["claim"] == "claim 1"]
    for _, test in claim_1.groupby(["structure", "comparison"]):
        cells, seeds = int(test["cells"].iloc[0]), int(test["n"].iloc[0])
        want = directional_power(0.3, pooled_sd(0.15, cells, 0.0), seeds, ALPHA)
        got = ((test["p"] < ALPHA) & (test["mean"] > 0)).mean()
        assert binomial_bounds(want)[0] <= got <= binomial_bounds(want)[1], (want, got)


# -- power arithmetic ---------------------------------------------------------------------------


def power_by_integration(effect: float, sd: float, n: int, alpha: float) -> float:
    """P(Z + ncp > c * sqrt(V / df)), V ~ chi2(df), c the two-sided t quantile: the upper tail
    of the noncentral t, integrated over V with the normal cdf (no scipy.stats.nct)."""
    dof, ncp = n - 1, effect * math.sqrt(n) / sd
    c = sps.t.ppf(1 - alpha / 2, dof)
    value, _ = integrate.quad(
        lambda v: sps.norm.cdf(ncp - c * math.sqrt(v / dof)) * sps.chi2.pdf(v, dof), 0, np.inf
    )
    return value


@pytest.mark.parametrize(
    ("effect", "sd", "n", "alpha"),
    [(0.5, 0.15, 3, 0.0125), (0.5, 0.2121, 6, 0.0125), (0.1, 0.0237, 3, 0.05 / 8)],
)
def test_directional_power_by_integration(effect: float, sd: float, n: int, alpha: float) -> None:
    assert directional_power(effect, sd, n, alpha) == pytest.approx(
        power_by_integration(effect, sd, n, alpha), abs=1e-7
    )


def test_mde_seeds_and_pooled_sd() -> None:
    # sd of the mean of 80 paired differences of runs of sd 0.15: 0.15 * sqrt(2 / 80).
    assert pooled_sd(0.15, 80, 0.0) == pytest.approx(0.15 / math.sqrt(40))
    assert pooled_sd(0.15, 80, 1.0) == pytest.approx(0.15 * math.sqrt(2))
    assert pooled_sd(0.15, 2, 0.5) == pytest.approx(0.15 * math.sqrt(2 * (0.5 + 0.25)))
    sd, a = 0.15 * math.sqrt(2), 0.05 / 4
    mde = min_detectable_effect(sd, 3, a, 0.8)
    assert power_by_integration(mde, sd, 3, a) == pytest.approx(0.8, abs=1e-6)
    n = seeds_needed(0.5, sd, a, 0.8)
    assert n == 6  # the PFEC grid's 4 tests when a seed moves every cell alike
    assert power_by_integration(0.5, sd, n, a) >= 0.8 > power_by_integration(0.5, sd, n - 1, a)


def test_plan_power_cli(capsys) -> None:
    assert main(["plan", str(QUICKSTART), "--power", "--sd", "0.2", "--effect", "1"]) == 0
    out = capsys.readouterr().out
    assert "Holm's first-step alpha 0.05/8 = 0.00625" in out and "scipy.stats.nct" in out
    # claim 1 structured lrw − ft: 2 cells (l1_filter, random_filter), 3 seeds:
    # sd 0.2 * sqrt(2 / 2) = 0.2.
    line = next(x for x in out.splitlines() if x.startswith("claim 1  structured    lrw − ft"))
    cells, seeds, sd, mde, power, needed = line.split()[-6:]
    assert (cells, seeds, sd) == ("2", "3", "0.2000")
    assert float(power) == pytest.approx(power_by_integration(1.0, 0.2, 3, 0.05 / 8), abs=1e-3)
    assert float(mde) == pytest.approx(min_detectable_effect(0.2, 3, 0.05 / 8, 0.8), abs=1e-3)
    assert int(needed) == seeds_needed(1.0, 0.2, 0.05 / 8, 0.8)
    assert "If instead rho = 1" in out
    assert main(["plan", str(QUICKSTART), "--power", "--correlation", "2"]) == 2


def test_plan_power_from_a_finished_sweep(tmp_path: Path, capsys) -> None:
    """--from-sweep: each test's sd is the sd over seeds of its per-seed pooled difference in
    the stored sweep, computed here by hand for claim 1 structured clr − ft."""
    from nptm.orchestrator.planner import build_plan
    from nptm.results.power import plan_stages
    from nptm.results.store import SweepStore
    from nptm.search_spaces import load_grid

    plan = build_plan(load_grid(QUICKSTART))
    stages = plan_stages(plan)
    rng = np.random.default_rng(5)
    retrain = stages["stage_kind"] == "retrain"
    stages.loc[retrain, "test_acc"] = 0.9 + rng.normal(0, 0.01, int(retrain.sum()))
    store = SweepStore(tmp_path, plan.name)
    for row in stages.to_dict(orient="records"):
        store.write_stage(
            {k: v for k, v in row.items() if (v is not None and v == v) or k == "parent_ids"}
        )
    r = stages[retrain & (stages["structured"] == True)]  # noqa: E712
    acc = r.set_index(["pruner", "schedule", "seed"])["test_acc"]
    per_seed = [
        statistics.mean(
            acc[(p, "clr", s)] - acc[(p, "ft", s)] for p in ("l1_filter", "random_filter")
        )
        for s in (0, 1, 2)
    ]
    args = [
        "plan",
        str(QUICKSTART),
        "--power",
        "--from-sweep",
        plan.name,
        "--storage",
        str(tmp_path),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("claim 1  structured    clr − ft"))
    assert line.split()[-4] == f"{statistics.stdev(per_seed) * 100:.4f}"
    assert "observed over the seeds of sweep 'quickstart'" in out
    assert (
        main(
            ["plan", str(QUICKSTART), "--power", "--from-sweep", "nope", "--storage", str(tmp_path)]
        )
        == 2
    )


def test_vectorised_holm_and_bh_are_statsmodels() -> None:
    """Holm and Benjamini-Hochberg over every row of a matrix (one family per row, NaN: no
    test) equal statsmodels' multipletests row by row (a few rows for Holm: statsmodels
    collects garbage on every call of it)."""
    from statsmodels.stats.multitest import multipletests

    from nptm.results.stats import benjamini_hochberg, holm

    rng = np.random.default_rng(11)
    p = rng.uniform(0, 1, (60, 7)) ** 3
    p[rng.uniform(size=p.shape) < 0.2] = np.nan
    p[0] = np.nan  # a row without a test
    got_holm, got_bh = holm(p), benjamini_hochberg(p)
    assert np.isnan(got_holm[0]).all() and np.isnan(got_bh[0]).all()
    for i, (row, h, b) in enumerate(zip(p[1:], got_holm[1:], got_bh[1:], strict=True)):
        tested = ~np.isnan(row)
        assert np.isnan(h[~tested]).all() and np.isnan(b[~tested]).all()
        assert b[tested] == pytest.approx(multipletests(row[tested], method="fdr_bh")[1])
        if i < 8:
            assert h[tested] == pytest.approx(multipletests(row[tested], method="holm")[1])
