"""`best_runs` on a real sqlite MLflow store, and `sweep_status` on a Parquet store."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from nptm.results.best import best_runs, default_mode, parse_where, render_best
from nptm.results.run_record import (
    FORMAT,
    PLAN_FILE,
    DriverState,
    PlannedStage,
    Progress,
    RunningStage,
    RunRecord,
    plan_record,
)
from nptm.results.schema import rows_to_table
from nptm.results.status import is_running, render_status, sweep_status
from nptm.results.store import SweepStore
from nptm.results.tracking import MlflowRecorder
from nptm.trainables.layout import Layout
from tests.sweep_helpers import empty_mlflow_store


def row(stage_id: str, **kw: object) -> dict:
    r = {
        "stage_id": stage_id,
        "stage_kind": "retrain",
        "parent_ids": [],
        "round": 1,
        "dataset": "digits",
        "model": "resnet20",
        "pruner": "l1_filter",
        "ratio": 0.5,
        "schedule": "ft",
        "budget_epochs": 10,
        "seed": 0,
        "status": "ok",
        "reused": False,
    }
    r.update(kw)
    return r


# (sweep, stage_id, pruner, schedule, seed, test_acc, test_loss, extra); budget 10 unless said
RUNS = [
    ("s1", "a0", "l1_filter", "ft", 0, 0.80, 0.60, {}),
    ("s1", "a1", "l1_filter", "ft", 1, 0.82, 0.58, {}),
    ("s1", "a2", "l1_filter", "ft", 2, 0.84, 0.50, {}),
    ("s1", "b0", "l1_filter", "clr", 0, 0.86, 0.30, {}),
    ("s1", "b1", "l1_filter", "clr", 1, 0.90, 0.32, {}),
    ("s1", "c0", "random_filter", "ft", 0, 0.78, 0.70, {}),
    ("s1", "d0", "random_filter", "clr", 0, 0.84, 0.52, {}),
    ("s1", "d1", "random_filter", "clr", 1, 0.85, 0.50, {}),
    ("s1", "d2", "random_filter", "clr", 2, 0.98, 0.10, {}),  # the lucky seed
    ("s1", "e", "random_filter", "lrw", 10, 0.83, 0.55, {"budget_epochs": 20}),
    ("s1", "i", "random_filter", "slr", 2, 0.70, 0.90, {}),
    # Higher accuracy, but not a successful retrain stage: never "best".
    ("s1", "f", "l1_filter", "clr", 3, 0.99, 0.01, {"status": "failed"}),
    ("s1", "g", "l1_filter", None, 0, 0.98, 0.02, {"stage_kind": "prune", "budget_epochs": None}),
    ("s2", "h", "l1_filter", "slr", 0, 0.91, 0.40, {}),
]
# The cells of s1 (pruner, schedule, budget) by hand: mean, sample sd, n of test_acc.
CELLS = {
    ("random_filter", "clr", 10): (0.89, math.sqrt((0.05**2 + 0.04**2 + 0.09**2) / 2), 3),
    ("l1_filter", "clr", 10): (0.88, math.sqrt(2 * 0.02**2), 2),
    ("random_filter", "lrw", 20): (0.83, math.nan, 1),
    ("l1_filter", "ft", 10): (0.82, 0.02, 3),
    ("random_filter", "ft", 10): (0.78, math.nan, 1),
    ("random_filter", "slr", 10): (0.70, math.nan, 1),
}  # highest mean first
# Mean test_loss of the same cells, lowest first: 0.31, 0.3733, 0.55, 0.56, 0.70, 0.90.
LOSS_ORDER = [("l1_filter", "clr"), ("random_filter", "clr"), ("random_filter", "lrw"),
              ("l1_filter", "ft"), ("random_filter", "ft"), ("random_filter", "slr")]  # fmt: skip


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    storage = tmp_path_factory.mktemp("best")
    uri = empty_mlflow_store(storage)
    for sweep in ("s1", "s2"):
        rec = MlflowRecorder(uri, sweep)
        rec.start_sweep({"sweep": sweep})
        for sw, sid, pruner, sched, seed, acc, loss, extra in RUNS:
            if sw == sweep:
                stage = row(sid, sweep=sw, pruner=pruner, schedule=sched, seed=seed,
                            test_acc=acc, test_loss=loss, **extra)  # fmt: skip
                assert rec.record_stage(rows_to_table("stages", [stage]).to_pylist()[0])
        rec.end_sweep()
    # An unrelated experiment in the same store is ignored.
    client = MlflowClient(tracking_uri=uri)
    other = client.create_experiment("someone-else")
    run = client.create_run(other, tags={"nptm.stage_kind": "retrain", "nptm.status": "ok"})
    client.log_metric(run.info.run_id, "test_acc", 1.0)
    return uri


def cells_of(df) -> list[tuple[str, str, int]]:
    return list(zip(df["pruner"], df["schedule"], df["budget"], strict=True))


def test_cells_mean_sd_n_over_seeds(uri: str) -> None:
    df = best_runs(uri, sweep="s1", top=10)  # --agg mean, --mode max for an accuracy
    assert cells_of(df) == list(CELLS)
    for r in df.itertuples(index=False):
        mean, sd, n = CELLS[(r.pruner, r.schedule, r.budget)]
        assert (r.test_acc, r.n) == (pytest.approx(mean), n)
        assert r.sd == pytest.approx(sd, nan_ok=True)
    assert df.columns[:5].tolist() == ["test_acc", "sd", "n", "pruner", "schedule"]
    assert set(df["sweep"]) == {"s1"} and set(df["target"]) == {"ratio=0.5"}
    assert set(df["structure"]) == {"structured"}
    assert best_runs(uri, sweep="s1", top=2, mode="min")["test_acc"].tolist() == pytest.approx(
        [0.70, 0.78]
    )


def test_a_loss_ranks_lowest_first(uri: str) -> None:
    assert default_mode("test_loss") == "min" and default_mode("val_error") == "min"
    assert default_mode("test_acc") == "max"
    df = best_runs(uri, sweep="s1", metric="test_loss", top=10)
    assert list(zip(df["pruner"], df["schedule"], strict=True)) == LOSS_ORDER
    assert df["test_loss"].iloc[:2].tolist() == pytest.approx([0.31, (0.52 + 0.50 + 0.10) / 3])
    highest = best_runs(uri, sweep="s1", metric="test_loss", mode="max", top=1)
    assert highest["test_loss"].tolist() == pytest.approx([0.90])


def test_single_runs(uri: str) -> None:
    df = best_runs(uri, sweep="s1", agg="none", top=3)
    assert df["stage_id"].tolist() == ["d2", "b1", "b0"]
    assert df["test_acc"].tolist() == pytest.approx([0.98, 0.90, 0.86])
    assert df["seed"].tolist() == [2, 1, 0] and "n" not in df
    assert df["run_id"].str.fullmatch("[0-9a-f]{32}").all()
    everywhere = best_runs(uri, agg="none", top=2)
    assert everywhere["stage_id"].tolist() == ["d2", "h"]
    assert everywhere["sweep"].tolist() == ["s1", "s2"]


def test_all_nptm_experiments(uri: str) -> None:
    df = best_runs(uri, top=2)  # cells of each sweep apart
    assert df[["sweep", "pruner", "schedule"]].values.tolist() == [
        ["s2", "l1_filter", "slr"],
        ["s1", "random_filter", "clr"],
    ]
    assert df["n"].tolist() == [1, 3]


def test_top_per_group(uri: str) -> None:
    df = best_runs(uri, sweep="s1", by=["pruner"], top=1)
    assert df[["pruner", "schedule"]].values.tolist() == [
        ["l1_filter", "clr"],  # the catalog's order of pruners
        ["random_filter", "clr"],
    ]
    assert df.columns[:2].tolist() == ["pruner", "test_acc"]
    df = best_runs(uri, sweep="s1", agg="none", by=["pruner", "seed"], top=1)
    assert df[["pruner", "seed", "stage_id"]].values.tolist() == [
        ["l1_filter", 0, "b0"],
        ["l1_filter", 1, "b1"],
        ["l1_filter", 2, "a2"],
        ["random_filter", 0, "d0"],
        ["random_filter", 1, "d1"],
        ["random_filter", 2, "d2"],
        ["random_filter", 10, "e"],  # numbers in numeric order
    ]


def test_where_filters_runs(uri: str) -> None:
    clr = best_runs(uri, sweep="s1", where=[parse_where("schedule=clr")])
    assert cells_of(clr) == [("random_filter", "clr", 10), ("l1_filter", "clr", 10)]
    either = [parse_where("pruner=l1_filter"), parse_where("pruner=random_filter")]
    assert len(best_runs(uri, sweep="s1", where=either, top=10)) == len(CELLS)
    both = [parse_where("budget=20"), parse_where("ratio=0.5")]
    assert cells_of(best_runs(uri, sweep="s1", where=both)) == [("random_filter", "lrw", 20)]
    seed_0 = best_runs(uri, sweep="s1", where=[parse_where("seed=0")], top=10)
    assert set(seed_0["n"]) == {1} and seed_0["test_acc"].iloc[0] == pytest.approx(0.86)
    assert best_runs(uri, where=[parse_where("sweep=s2")])["test_acc"].tolist() == [0.91]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("budget=abc", "--where budget: expected an integer, got 'abc'"),
        ("ratio=half", "--where ratio: expected a number, got 'half'"),
        ("colour=red", "--where 'colour=red': unknown key 'colour'"),
        ("pruner", "--where 'pruner': expected KEY=VALUE"),
        ("pruner=hrank", "--where pruner=hrank: no final-round retrain run has it; recorded: "
                         "l1_filter, random_filter"),
    ],
)  # fmt: skip
def test_bad_where_is_named_and_exits_2(uri: str, where: str, message: str) -> None:
    from tests.sweep_helpers import cli_in_process

    result = cli_in_process(["best", "--mlflow-uri", uri, "--sweep", "s1", "--where", where])
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_rendering_fits_100_columns(uri: str) -> None:
    df = best_runs(uri, sweep="s1", top=3)
    text = render_best(df)
    lines = text.splitlines()
    assert lines[0] == "mean test_acc over seeds per cell, highest first"
    assert lines[1] == "all rows: target=ratio=0.5, dataset=digits, model=resnet20, " + (
        "structure=structured, sweep=s1"
    )
    assert lines[2].split() == ["test_acc", "sd", "n", "pruner", "schedule", "budget"]
    assert lines[4].split() == ["0.8900", "0.0781", "3", "random_filter", "clr", "10"]
    assert lines[6].split() == ["0.8300", "–", "1", "random_filter", "lrw", "20"]
    runs = render_best(best_runs(uri, agg="none", top=20), "test_acc")
    assert max(map(len, runs.splitlines())) <= 100
    run_ids = best_runs(uri, agg="none", top=1)["run_id"]
    assert f"  {run_ids[0][:8]}" in runs and run_ids[0] not in runs  # ids shortened
    assert render_best(df.iloc[0:0]) == "no successful final-round retrain runs found"
    # Every column differing, with the longest labels a grid makes: cut to 100 with "…".
    long = {"pruner": "magnitude[layers=conv+linear,min_keep=0.05]",
            "schedule": 'clr {"lr":0.05,"momentum_max":0.95}', "target": "preset=resnet56-B",
            "budget": 160, "dataset": "cifar100", "model": "resnet110",
            "structure": "unstructured", "sweep": "paper-cifar-unstructured-2"}  # fmt: skip
    wide = pd.DataFrame([
        {"test_acc": 0.9312 - i / 100, "sd": 0.0042, "n": 10, **long,
         **{k: f"{v}{i}" for k, v in long.items() if isinstance(v, str)}}
        for i in range(3)
    ])  # fmt: skip
    lines = render_best(wide).splitlines()
    assert max(map(len, lines)) <= 100 and "…" in lines[-1]
    assert lines[-1].split()[:3] == ["0.9112", "0.0042", "10"]


def test_bad_requests_are_named(uri: str) -> None:
    with pytest.raises(
        ValueError, match=r"'accuracy' is not recorded .*\['test_acc', 'test_loss'\]"
    ):
        best_runs(uri, sweep="s1", metric="accuracy")
    with pytest.raises(ValueError, match="metric 'budget' is a grid axis"):
        best_runs(uri, sweep="s1", metric="budget")
    with pytest.raises(ValueError, match="cannot group by 'colour'"):
        best_runs(uri, sweep="s1", by=["colour"])
    with pytest.raises(ValueError, match="cannot group by 'seed'"):  # a cell spans the seeds
        best_runs(uri, sweep="s1", by=["seed"])
    with pytest.raises(ValueError, match="no MLflow experiment 'nptm/nope'"):
        best_runs(uri, sweep="nope")
    with pytest.raises(ValueError, match="top must be at least 1"):
        best_runs(uri, top=0)


def test_empty_store(tmp_path: Path, uri: str) -> None:
    db = Path(uri.removeprefix("sqlite:///"))
    shutil.copy(db, tmp_path / "mlflow.db")
    fresh = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=fresh)
    for exp in client.search_experiments(filter_string="name LIKE 'nptm/%'"):
        client.delete_experiment(exp.experiment_id)
    assert best_runs(fresh).empty


# -- status ------------------------------------------------------------------------------------


def test_sweep_status(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "st")
    store.write_stage(row("p0", stage_kind="pretrain", pruner=None, ratio=None, schedule=None))
    store.write_stage(row("q0", stage_kind="prune", schedule=None))
    store.write_stage(
        row(
            "q1",
            stage_kind="prune",
            schedule=None,
            status="failed",
            error="Traceback (most recent call last):\n  ...\nValueError: bad mask",
        )
    )
    for i, status in enumerate(["ok", "ok", "diverged", "skipped"]):
        store.write_stage(
            row(
                f"r{i}",
                seed=i,
                status=status,
                error="loss is NaN at epoch 3" if status == "diverged" else None,
            )
        )
    d = sweep_status(store)
    assert d["stages"] == 7
    assert d["counts"]["pretrain"] == {"ok": 1, "diverged": 0, "failed": 0, "skipped": 0}
    assert d["counts"]["prune"] == {"ok": 1, "diverged": 0, "failed": 1, "skipped": 0}
    assert d["counts"]["retrain"] == {"ok": 2, "diverged": 1, "failed": 0, "skipped": 1}
    assert d["by_status"] == {"ok": 4, "diverged": 1, "failed": 1, "skipped": 1}
    failed = {f["stage_id"]: f for f in d["failed"]}
    assert sorted(failed) == ["q1", "r2"]
    assert failed["q1"]["error"].endswith("ValueError: bad mask")
    assert failed["r2"]["status"] == "diverged" and failed["r2"]["seed"] == 2
    assert failed["q1"]["budget_epochs"] == 10 and failed["q1"]["preset"] is None
    json.dumps(d)  # serialisable for --json

    text = render_status(d)
    assert "ValueError: bad mask" in text and "loss is NaN at epoch 3" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("stage"))
    retrain = next(line for line in lines if line.startswith("retrain"))
    assert header.split() == ["stage", "ok", "diverged", "failed", "skipped", "total"]
    assert retrain.split() == ["retrain", "2", "1", "0", "1", "4"]


def test_status_truncates_long_failure_lists(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "many")
    for i in range(5):
        store.write_stage(row(f"r{i}", seed=i, status="failed", error=f"error {i}"))
    text = render_status(sweep_status(store), max_failures=2)
    assert "error 0" in text and "error 1" in text and "error 2" not in text
    assert "... and 3 more" in text


def test_status_of_empty_sweep(tmp_path: Path) -> None:
    d = sweep_status(SweepStore(tmp_path, "none"))
    assert d["stages"] == 0 and d["failed"] == [] and d["by_status"]["ok"] == 0
    assert "0 stages" in render_status(d)


# -- status against the saved plan (nptm.results.run_record) -------------------------------


def planned(kind: str, epochs: int, *parents: str) -> PlannedStage:
    return PlannedStage(kind, f"{kind}/digits/{len(parents)}", parents, epochs)


PLAN = {
    "p0": planned("pretrain", 4),
    "q0": planned("prune", 0, "p0"),
    "q1": planned("prune", 0, "p0"),
    **{f"r{i}": planned("retrain", 2, "q0") for i in range(4)},
}


def write_record(storage: Path, sweep: str, plan: dict, progress: Progress | None) -> None:
    """A run record as `nptm sweep` writes it (plan.json in plan_record's format)."""
    record = RunRecord(Layout(str(storage)), sweep)
    stages = {sid: asdict(stage) for sid, stage in plan.items()}
    record.write_json(PLAN_FILE, {"format": FORMAT, "sweep": sweep, "stages": stages})
    if progress is not None:
        record.write_progress(progress)


def test_status_against_the_plan(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "pl")
    store.write_stage(row("p0", stage_kind="pretrain", pruner=None, ratio=None, schedule=None))
    store.write_stage(row("q0", stage_kind="prune", schedule=None))
    store.write_stage(row("q1", stage_kind="prune", schedule=None, status="failed", error="x"))
    store.write_stage(row("r0"))
    store.write_stage(row("r3", status="failed", error="first try"))  # retried: running again
    store.write_stage(row("zz"))  # stored by another grid of the same name: not in this plan
    running = {
        "r1": RunningStage("retrain", "retrain/r1", 2, epoch=1, started_at=1005.0),
        "r3": RunningStage("retrain", "retrain/r3", 2, epoch=1, started_at=1001.0),
    }
    progress = Progress("pl", 42, "node-a", 1000.0, 1020.0, running=running, epochs_done=10)
    write_record(tmp_path, "pl", PLAN, progress)

    d = sweep_status(store, now=1030.0)
    p = d["plan"]
    # done: p0, q0, q1 (failed is finished), r0; r3 runs again, so it is not done.
    assert (p["done"], p["planned"]) == (4, 7)
    assert p["by_kind"]["pretrain"] == {"planned": 1, "done": 1, "ok": 1, "diverged": 0,
                                        "failed": 0, "skipped": 0}  # fmt: skip
    assert (p["by_kind"]["prune"]["done"], p["by_kind"]["prune"]["failed"]) == (2, 1)
    assert (p["by_kind"]["retrain"]["planned"], p["by_kind"]["retrain"]["done"]) == (4, 1)
    assert [r["stage_id"] for r in p["running"]] == ["r3", "r1"]  # oldest first
    # Epochs to go: r1, r2, r3 plan 2 each; r1 and r3 have finished 1 each: 6 - 2 = 4.
    assert p["remaining_epochs"] == 4
    assert p["epochs_per_s"] == pytest.approx(10 / 20)  # epochs_done / (updated - started)
    assert p["eta_s"] == pytest.approx(4 / 0.5)
    assert p["driver"]["state"] == "running" and p["driver"]["seconds_since_update"] == 10
    assert not p["driver"]["may_be_gone"] and is_running(d)
    json.dumps(d)

    text = render_status(d)
    assert text.splitlines()[0] == "sweep pl: 4 of 7 planned stages done (57.1%)"
    assert "retrain/r1  epoch 1/2" in text and "retrain/r3  epoch 1/2" in text
    assert "rate: 0.5 epochs/s; 4 planned epochs to go; ETA 8s" in text
    assert "last heard from 10s ago" in text and "may be gone" not in text
    assert next(x for x in text.splitlines() if x.startswith("retrain")).split() == [
        "retrain", "1/4", "1", "0", "0", "0",
    ]  # fmt: skip
    assert "first try" in text  # failures still listed

    # 61 s of silence from a driver that says it runs: it may be gone; --watch stops.
    stale = sweep_status(store, now=1020.0 + 61)
    assert stale["plan"]["driver"]["may_be_gone"] and not is_running(stale)
    assert "may be gone" in render_status(stale)
    # A finished driver: no ETA, not running.
    progress.state, progress.running = DriverState.FINISHED, {}
    write_record(tmp_path, "pl", PLAN, progress)
    done = sweep_status(store, now=5000.0)
    assert done["plan"]["eta_s"] is None and not is_running(done)
    assert done["plan"]["remaining_epochs"] == 2 * 2  # r1, r2 (r3 stored as failed)
    assert "last heard from 1h06m ago" in render_status(done)


def test_status_plan_without_progress(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "np")
    write_record(tmp_path, "np", PLAN, None)
    p = sweep_status(store, now=0.0)["plan"]
    assert (p["done"], p["planned"], p["remaining_epochs"]) == (0, 7, 4 + 4 * 2)
    assert p["driver"] is None and p["eta_s"] is None
    assert "no progress recorded" in render_status(sweep_status(store))


@pytest.mark.slow
def test_status_cli_on_a_finished_sweep_then_watching_a_running_one(
    tiny_sweep, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nptm status` on a real sweep's storage: today's counts without a run record; with the
    plan of its grid, done/planned; `--watch` refreshes until the driver says it finished."""
    from nptm.orchestrator.cli import build_parser
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import load_grid
    from tests.sweep_helpers import cli_in_process, copy_storage

    storage = copy_storage(tiny_sweep.storage, tmp_path / "runs")
    record = RunRecord(Layout(str(storage)), "tiny")
    shutil.rmtree(record.layout.run_dir("tiny"), ignore_errors=True)  # an older sweep
    argv = ["status", "tiny", "--storage", str(storage)]
    old = cli_in_process(argv)
    assert old.returncode == 0 and "9 stages stored" in old.stdout

    stages = build_plan(load_grid(tiny_sweep.grid)).stages
    record.write_json(PLAN_FILE, plan_record("tiny", stages))
    now = time.time()
    record.write_progress(Progress("tiny", 1, "h", now - 8, now, epochs_done=16))
    finish = threading.Timer(
        0.5,
        lambda: record.write_progress(
            Progress("tiny", 1, "h", now - 8, time.time(), DriverState.FINISHED, epochs_done=16)
        ),
    )
    finish.start()
    watched = cli_in_process([*argv, "--watch", "0.2"])
    finish.join()
    assert watched.returncode == 0
    frames = watched.stdout.count("sweep tiny: 9 of 9 planned stages done (100.0%)")
    assert frames >= 2 and "driver: finished" in watched.stdout.split("sweep tiny:")[-1]
    assert "rate: 2 epochs/s; 0 planned epochs to go" in watched.stdout  # 16 epochs in 8 s

    as_json = json.loads(cli_in_process([*argv, "--json"]).stdout)
    # 1 pre-training of 4 epochs, 2 prunes, 6 retrains of 2 epochs: all stored.
    assert as_json["plan"]["by_kind"]["retrain"]["done"] == 6
    assert as_json["plan"]["remaining_epochs"] == 0 and as_json["stages"] == 9
    with pytest.raises(SystemExit) as bad:  # argparse refuses it
        build_parser().parse_args([*argv, "--watch", "0"])
    assert (
        bad.value.code == 2 and "expected seconds in (0, inf), got '0'" in capsys.readouterr().err
    )

    # The report of the same sweep, with its options: LaTeX next to the Markdown, the margin.
    out = tmp_path / "report"
    rep = cli_in_process(["report", "tiny", "--storage", str(storage), "--out", str(out),
                          "--latex", "--equivalence-margin", "1.5"])  # fmt: skip
    assert rep.returncode == 0
    assert "LaTeX tables: confirmatory.tex, status.tex, headline.tex" in rep.stdout
    assert (out / "headline.tex").read_text().startswith("\\begin{table}")
    md = (out / "report.md").read_text()
    assert "the margin −1.5 points" in md and "](figures/acc_bars__" in md  # one budget: bars

    # `nptm best` from the sweep's MLflow store ranks the report's headline cells.
    best = cli_in_process(["best", "--sweep", "tiny", "--storage", str(storage), "--json",
                           "--top", "100"])  # fmt: skip
    assert best.returncode == 0, best.stderr
    got = {(r["pruner"], r["schedule"], r["target"], r["budget"]): r
           for r in json.loads(best.stdout)}  # fmt: skip
    head = pd.read_csv(out / "headline.csv")
    want = {(r.pruner, r.sched, r.target, r.budget): r for r in head.itertuples()}
    assert len(want) == 6 and got.keys() == want.keys()
    assert {k: r["test_acc"] for k, r in got.items()} == pytest.approx(
        {k: r.mean for k, r in want.items()}
    )
    assert {k: r["n"] for k, r in got.items()} == {k: r.n for k, r in want.items()}


@pytest.mark.parametrize("garbage", [b"", b"\x80\x81 {", b"[1, 2]", b'{"sweep": "other"}'])
def test_status_names_a_damaged_run_record_instead_of_crashing(tmp_path: Path, garbage) -> None:
    store = SweepStore(tmp_path, "dm")
    store.write_stage(row("p0", stage_kind="pretrain", pruner=None, ratio=None, schedule=None))
    write_record(tmp_path, "dm", PLAN, Progress("dm", 1, "h", 0.0, 1.0))
    run = tmp_path / "sweeps" / "dm" / "run"
    (run / "progress.json").write_bytes(garbage)
    d = sweep_status(store, now=2.0)
    assert d["plan"]["done"] == 1 and d["plan"]["driver"] is None
    assert [s["file"] for s in d["skipped"]] == [str(run / "progress.json")]
    assert f"skipped {run / 'progress.json'}: " in render_status(d)
    (run / PLAN_FILE).write_bytes(garbage)
    d = sweep_status(store, now=2.0)
    assert d["plan"] is None and d["stages"] == 1  # counts of the stored stages instead
    assert [s["file"] for s in d["skipped"]] == [str(run / PLAN_FILE)]
    json.dumps(d)
