"""The benchmark scripts of bench/ run and print well-formed figures (no timing assertions).

The Ray-based benchmarks (overhead, scheduling) are not run here; their pure helpers are
checked against hand-computed values instead.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import their `_common` helper by name
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load("_common")


def _run(script: str, *args: str) -> tuple[str, dict]:
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, common.parse_json_line(out.stdout)


def _positive(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


# -- shared helpers --------------------------------------------------------------------------
def test_table_aligns_columns_and_formats_numbers() -> None:
    text = common.table(["name", "n", "x"], [["a", 1234, 0.5], ["bbb", 5, 123.4]])
    lines = text.splitlines()
    assert lines[0] == "name      n    x"
    assert lines[1] == "----  -----  ---"
    assert lines[2] == "a     1,234  0.5"
    assert lines[3] == "bbb       5  123"


def test_json_line_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    common.emit({"a": 1, "b": [1.5]}, as_json=True)
    assert common.parse_json_line("table\n" + capsys.readouterr().out) == {"a": 1, "b": [1.5]}
    with pytest.raises(ValueError, match="no 'json: ' line"):
        common.parse_json_line("nothing here")


# -- plan_scaling ----------------------------------------------------------------------------
@pytest.mark.bench
def test_plan_scaling_quick() -> None:
    stdout, res = _run("plan_scaling.py")
    assert "build_plan s" in stdout
    sizes = {r["trials"]: r for r in res["sizes"]}
    assert sorted(sizes) == [100, 1_000]
    # 1,000 trials = 2 models x 2 pruners x 5 ratios x 5 schedules x 2 budgets x 5 seeds:
    # 2 x 5 pretrain + 2 x 2 x 5 x 5 prune + 100 x 5 x 2 retrain stages.
    assert sizes[1_000]["stages"] == 10 + 100 + 1_000
    for r in res["sizes"]:
        assert _positive(r["plan_s"]) and _positive(r["expand_s"])
        assert r["plan_s_max"] >= r["plan_s"]
        assert _positive(r["maxrss_mib"]) and r["plan_rss_mib"] >= 0
    assert _positive(res["scaling"])


# -- report_scale ----------------------------------------------------------------------------
def test_report_scale_core(tmp_path: Path) -> None:
    report_scale = _load("report_scale")
    trials = report_scale.synthetic_trials(1)
    kinds = trials["stage_kind"].value_counts()
    # 2 datasets x 2 models x 5 pruners x 4 ratios x 1 seed, then x 5 schedules x 5 budgets.
    assert kinds["prune"] == 80 and kinds["retrain"] == 80 * 25
    r = report_scale.time_report(1, 1, max_figures=0)
    assert r["rows"] == 2_080 and r["retrain_rows"] == 2_000 and r["figures"] == 0
    assert all(_positive(r[k]) for k in ("report_s", "no_figures_s", "prepare_s", "us_per_row"))


# -- dedup -----------------------------------------------------------------------------------
def test_dedup_epochs_and_hours_by_hand() -> None:
    dedup = _load("dedup")
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import parse_grid

    grid = parse_grid(
        {
            "name": "dd",
            "pretrain": {"epochs": 10, "milestones": [5]},
            "axes": {
                "dataset": "digits",
                "model": "resnet20",
                "pruner": [{"name": "magnitude", "ratio": [0.5, 0.9]}],
                "schedule": ["ft", "clr"],
                "budget": [2, 4],
                "seed": [0, 1],
            },
        }
    )
    planned, naive = dedup.epochs_by_pair(build_plan(grid))
    # 16 trials; 2 pre-trainings of 10 epochs; retrain stages = all 16 trials' budgets.
    retrain = 2 * 2 * 2 * (2 + 4)
    assert planned == {("resnet20", "digits"): 2 * 10 + retrain}
    assert naive == {("resnet20", "digits"): 16 * 10 + retrain}
    assert dedup.train_samples("digits", 0.1) == 1437 - 144
    assert dedup.train_samples("cifar10", 0.1) == 45_000


def test_dedup_rates_given_and_mac_scaled() -> None:
    dedup = _load("dedup")
    rates = dedup.Rates(dedup.parse_rates(["resnet56=100", "vgg16@cifar100=7"]))
    assert rates.get("resnet56", "cifar100") == (100.0, "given")
    assert rates.get("vgg16", "cifar100") == (7.0, "given")
    # Unmeasured: scaled by MACs from ResNet-56 (PFEC Table 1: 1.25e8 vs VGG-16 3.13e8).
    rate, source = rates.get("vgg16", "cifar10")
    assert rate == pytest.approx(100 * 1.25e8 / 3.13e8, rel=0.02)
    assert source == "MAC-scaled from resnet56@cifar10"
    with pytest.raises(SystemExit, match="MODEL=N"):
        dedup.parse_rates(["resnet56:100"])
    with pytest.raises(SystemExit, match="N > 0"):
        dedup.parse_rates(["resnet56=-1"])


@pytest.mark.bench
def test_dedup_quick() -> None:
    stdout, res = _run("dedup.py", "--samples-per-sec", "resnet20=1000")
    assert "naive/planned" in stdout and "NOTE" not in stdout  # a figure was given
    names = {g["grid"] for g in res["grids"]}
    assert names == {"quickstart.yaml", "paper_hrank_taylor.yaml"}
    for g in res["grids"]:
        assert 0 < g["planned_epochs"] <= g["naive_epochs"]
        assert g["naive_over_planned"] == pytest.approx(g["naive_epochs"] / g["planned_epochs"])
        assert 0 < g["planned_hours"] <= g["naive_hours"]


# -- throughput ------------------------------------------------------------------------------
@pytest.mark.bench
def test_throughput_core_tiny() -> None:
    throughput = _load("throughput")
    threads = torch.get_num_threads()
    try:
        res = throughput.measure(
            ["resnet20"], n_train=throughput.BATCH, rounds=1, workers=[0],
            device=torch.device("cpu"), threads=1,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    variants = res["models"]["resnet20"]
    assert set(variants) == {"nptm", "bare", "ref-w0"}
    for v in variants.values():
        assert _positive(v["samples_per_s"]) and v["min"] <= v["samples_per_s"] <= v["max"]
    assert set(res["data_only"]) == {"nptm", "ref-w0"}
    assert all(_positive(v) for v in res["data_only"].values())


def test_reference_epoch_sees_every_sample_once() -> None:
    throughput = _load("throughput")
    data = torch.utils.data.TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10) % 10)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen, seconds, first = throughput.reference_epoch(model, opt, loader, torch.device("cpu"))
    assert seen == 10 and seconds > 0 and 0 <= first <= seconds


# -- overhead (helpers only: the benchmark itself starts Ray) -------------------------------
def test_overhead_share() -> None:
    overhead = _load("overhead")
    assert overhead.overhead_share(15.0, 285.0) == pytest.approx(0.05)
    assert overhead.overhead_share(0.0, 30.0) == 0.0


def test_in_stage_times_by_hand() -> None:
    overhead = _load("overhead")
    trials = pd.DataFrame(
        {"stage_id": ["a", "b", "c"], "stage_kind": ["pretrain", "prune", "retrain"],
         "wall_seconds": [10.0, 0.5, 4.0]}
    )  # fmt: skip
    epochs = pd.DataFrame({"stage_id": ["a", "a", "c"], "wall_s": [4.0, 5.0, 3.5]})
    got = overhead.in_stage_times(trials, epochs)
    assert got.loc["a", "loop_s"] == 9.0 and got.loc["a", "in_stage_s"] == 1.0
    assert got.loc["b", "loop_s"] == 0.0 and got.loc["b", "in_stage_s"] == 0.5
    assert got.loc["c", "in_stage_s"] == 0.5


def _events(sid: str, kind: str, t0: float, train: bool) -> list[dict]:
    e = [("suggest", 0.0, 1), ("trial_enter", 0.5, 1)]
    if train:
        e += [("trainer_enter", 0.6, 1), ("pg_enter", 3.6, 2), ("pg_exit", 4.1, 2),
              ("worker_enter", 4.15, 2), ("import_enter", 4.2, 2), ("import_exit", 4.3, 2),
              ("stage_enter", 4.4, 2), ("stage_exit", 9.4, 2), ("worker_exit", 9.45, 2),
              ("trainer_exit", 11.4, 1)]  # fmt: skip
    else:
        e += [("stage_enter", 0.6, 1), ("stage_exit", 5.6, 1)]
    end = e[-1][1]
    e += [("trial_exit", end + 0.1, 1), ("complete_enter", end + 0.3, 0),
          ("complete_exit", end + 0.5, 0)]  # fmt: skip
    out = []
    for name, t, pid in e:
        ev = {"t": t0 + t, "pid": 100 * pid + (7 if train else 0), "event": name}
        if name.startswith("import_"):
            ev["module"] = "nptm.trainables.stage_runner"
        elif not name.startswith("pg_"):
            ev |= {"stage": sid, "kind": kind}
        if name in ("worker_enter", "worker_exit", "stage_enter", "stage_exit"):
            ev["rank"] = 0
        out.append(ev)
    return out


def test_trace_phases_by_hand() -> None:
    overhead = _load("overhead")
    events = _events("s1", "retrain", 1000.0, train=True) + _events("s2", "pretrain", 0.0, False)
    # a rank-1 worker of s1 whose events must not count
    events.append({"t": 1004.0, "pid": 999, "event": "worker_enter", "stage": "s1", "rank": 1})
    ph = overhead.trace_phases(events)
    t = ph.loc["s1"]
    assert t["schedule_s"] == pytest.approx(0.5)
    assert t["group_start_s"] == pytest.approx(3.0)  # fit entered -> process-group set-up
    assert t["pg_s"] == pytest.approx(0.5)
    assert t["dispatch_s"] == pytest.approx(0.3)  # process group up -> run_stage, import included
    assert t["import_s"] == pytest.approx(0.1)
    assert t["stage_s"] == pytest.approx(5.0)
    assert t["group_stop_s"] == pytest.approx(2.0)
    assert t["trial_exit_s"] == pytest.approx(0.1)
    assert t["driver_s"] == pytest.approx(0.4)
    assert t["total_s"] == pytest.approx(11.9)
    i = ph.loc["s2"]
    assert (i["schedule_s"], i["stage_s"], i["trial_exit_s"]) == pytest.approx((0.5, 5.0, 0.1))
    assert math.isnan(i["group_start_s"]) and math.isnan(i["import_s"])
    assert i["total_s"] == pytest.approx(6.1)


def test_summarise_by_hand() -> None:
    overhead = _load("overhead")
    events = (
        _events("p0", "pretrain", 0.0, False)
        + _events("r1", "retrain", 100.0, False)
        + _events("r2", "retrain", 200.0, False)
    )
    trials = pd.DataFrame(
        {"stage_id": ["p0", "r1", "r2"], "stage_kind": ["pretrain", "retrain", "retrain"],
         "wall_seconds": [5.0, 5.0, 5.0]}
    )  # fmt: skip
    epochs = pd.DataFrame({"stage_id": ["p0", "r1", "r2"], "wall_s": [4.0, 4.5, 4.5]})
    s = overhead.summarise(trials, epochs, overhead.trace_phases(events), 40.0, 10.0)
    assert s["stages"] == 3 and s["per_stage_wall_s"] == pytest.approx(10.0)
    assert s["wall_over_loop"] == pytest.approx(30.0 / 13.0)
    assert s["cold_start_s"] == pytest.approx(0.5)
    assert s["timed_training_stages"] == 2  # the first stage is left out
    assert s["loop_s"] == 4.5 and s["in_stage_s"] == pytest.approx(0.5)
    assert s["outside_s"] == pytest.approx(6.1 - 5.0)
    assert s["overhead_s"] == pytest.approx(1.6)
    assert s["share"]["300"] == pytest.approx(1.6 / 301.6)


# -- scheduling (helpers only) --------------------------------------------------------------
@pytest.mark.parametrize("n", [100, 1000, 4000])
def test_noop_grid_plans_exactly_n_stages(n: int) -> None:
    scheduling = _load("scheduling")
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import parse_grid

    plan = build_plan(parse_grid(scheduling.noop_grid(n)))
    seeds, ratios, budgets = scheduling.SHAPES[n]
    per_seed = {"pretrain": 1, "prune": ratios, "retrain": ratios * 5 * budgets}
    assert plan.count_by_kind() == {k: seeds * v for k, v in per_seed.items()}
    assert len(plan.stages) == n


# -- concurrency -----------------------------------------------------------------------------
def test_peak_overlap_by_hand() -> None:
    peak_overlap = _load("concurrency").peak_overlap
    assert peak_overlap([]) == 0
    assert peak_overlap([(0, 1), (2, 3)]) == 1
    assert peak_overlap([(0, 2), (1, 3), (1.5, 4)]) == 3
    assert peak_overlap([(0, 1), (1, 2)]) == 1  # one ends as the other starts
    assert peak_overlap([(0, 10), (1, 2), (3, 4), (5, 6)]) == 2


# -- makespan (simulated part only; the real run starts a Ray cluster) -----------------------
def test_makespan_release_bound_by_hand() -> None:
    from types import SimpleNamespace

    release_bound = _load("makespan").release_bound
    # x(10) -> y1..y4 (10 each) on 2 slots: LB = max(20, 50 / 2) = 25, but no y runs before
    # 10, and then 40 of work is left for 2 slots: 10 + 20 = 30 (what the best schedule takes).
    stages = {"x": SimpleNamespace(parents=())}
    stages |= {f"y{i}": SimpleNamespace(parents=("x",)) for i in range(4)}
    cost = dict.fromkeys(stages, 10.0)
    assert release_bound(stages, cost, 2) == 30
    assert release_bound(stages, cost, 1) == 50  # t = 0: all the work on one slot


def test_makespan_simulated_rows_are_well_formed() -> None:
    makespan = _load("makespan")
    grid = makespan.GRIDS[0].parent / "paper_imagenet_resnet50.yaml"
    rows = makespan.simulated(grid, (1, 8))
    assert [r["slots"] for r in rows] == [1, 8] and all(r["timed"] for r in rows)
    one = rows[0]  # one slot: every order takes the whole work, the lower bound
    assert one["fifo"] == pytest.approx(1) and one["critical_path"] == pytest.approx(1)
    for r in rows:
        assert 1 - 1e-9 <= r["critical_path"] <= r["fifo"] + 1e-9
        assert r["tight_over_lb"] >= 1 and r["cp_over_tight"] >= 1 - 1e-9
        assert r["makespan_h"] == pytest.approx(r["critical_path"] * r["lower_bound_h"])
