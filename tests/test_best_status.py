"""`best_runs` on a real sqlite MLflow store, and `sweep_status` on a Parquet store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from results.best import best_runs, render_best
from results.schema import rows_to_table
from results.status import render_status, sweep_status
from results.store import SweepStore
from results.tracking import MlflowRecorder
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


# (sweep, stage_id, pruner, schedule, test_acc, extra)
RUNS = [
    ("s1", "a", "l1_filter", "ft", 0.80, {}),
    ("s1", "b", "l1_filter", "clr", 0.86, {}),
    ("s1", "c", "random_filter", "ft", 0.78, {}),
    ("s1", "d", "random_filter", "clr", 0.84, {}),
    ("s1", "e", "random_filter", "lrw", 0.83, {"seed": 10}),
    ("s1", "i", "random_filter", "slr", 0.70, {"seed": 2}),
    # Higher accuracy, but not a successful retrain stage: never "best".
    ("s1", "f", "l1_filter", "clr", 0.99, {"status": "failed"}),
    ("s1", "g", "l1_filter", None, 0.98, {"stage_kind": "prune", "budget_epochs": None}),
    ("s2", "h", "l1_filter", "slr", 0.90, {}),
]


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    storage = tmp_path_factory.mktemp("best")
    uri = empty_mlflow_store(storage)
    for sweep in ("s1", "s2"):
        rec = MlflowRecorder(uri, sweep)
        rec.start_sweep({"sweep": sweep})
        for sw, tid, pruner, sched, acc, extra in RUNS:
            if sw == sweep:
                stage = row(tid, sweep=sw, pruner=pruner, schedule=sched, test_acc=acc, **extra)
                assert rec.record_stage(rows_to_table("stages", [stage]).to_pylist()[0])
        rec.end_sweep()
    # An unrelated experiment in the same store is ignored.
    client = MlflowClient(tracking_uri=uri)
    other = client.create_experiment("someone-else")
    run = client.create_run(other, tags={"nptm.stage_kind": "retrain", "nptm.status": "ok"})
    client.log_metric(run.info.run_id, "test_acc", 1.0)
    return uri


def test_top_k_of_one_sweep(uri: str) -> None:
    df = best_runs(uri, sweep="s1", top=3)
    assert df["stage_id"].tolist() == ["b", "d", "e"]
    assert df["test_acc"].tolist() == pytest.approx([0.86, 0.84, 0.83])
    assert df["pruner"].tolist() == ["l1_filter", "random_filter", "random_filter"]
    assert set(df["sweep"]) == {"s1"}
    assert df.columns[:2].tolist() == ["test_acc", "dataset"]


def test_all_nptm_experiments(uri: str) -> None:
    df = best_runs(uri, top=2)
    assert df["stage_id"].tolist() == ["h", "b"]
    assert df["sweep"].tolist() == ["s2", "s1"]


def test_top_per_group(uri: str) -> None:
    df = best_runs(uri, sweep="s1", by=["pruner"], top=1)
    assert df[["pruner", "stage_id"]].values.tolist() == [
        ["l1_filter", "b"],
        ["random_filter", "d"],
    ]
    df = best_runs(uri, sweep="s1", by=["pruner", "seed"], top=5)
    assert df[["pruner", "seed", "stage_id"]].values.tolist() == [
        ["l1_filter", "0", "b"],
        ["l1_filter", "0", "a"],
        ["random_filter", "0", "d"],
        ["random_filter", "0", "c"],
        ["random_filter", "2", "i"],  # numeric order of the param strings, not "10" < "2"
        ["random_filter", "10", "e"],
    ]
    assert df.columns[:3].tolist() == ["pruner", "seed", "test_acc"]


def test_other_metric_and_rendering(uri: str) -> None:
    df = best_runs(uri, sweep="s1", metric="test_acc", top=1)
    text = render_best(df)
    assert "0.8600" in text and "l1_filter" in text and text.splitlines()[0].startswith("test_acc")
    assert render_best(df.iloc[0:0]) == "no successful retrain runs found"


def test_bad_requests_are_named(uri: str) -> None:
    with pytest.raises(ValueError, match="metric 'accuracy' is not recorded"):
        best_runs(uri, sweep="s1", metric="accuracy")
    with pytest.raises(ValueError, match="cannot group by 'colour'"):
        best_runs(uri, sweep="s1", by=["colour"])
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
