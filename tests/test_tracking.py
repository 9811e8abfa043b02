"""MLflow tracking: one top-level run per stage beside the sweep's own run, thread safety,
degradation, Parquet sync and the headline metrics."""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from mlflow import MlflowClient

from nptm.results.mlflow_uri import HTTP_ENV_DEFAULTS, default_tracking_uri, resolve_tracking_uri
from nptm.results.schema import rows_to_table
from nptm.results.store import SweepStore
from nptm.results.tracking import MlflowRecorder, sync_mlflow
from tests.ports import free_port
from tests.sweep_helpers import empty_mlflow_store

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    empty_mlflow_store(tmp_path)
    return tmp_path


def sqlite_uri(storage: Path) -> str:
    return default_tracking_uri(storage)


def stage(
    stage_id: str,
    *,
    sweep: str = "s1",
    seed: int = 0,
    status: str = "ok",
    n_epochs: int = 4,
    acc: float = 0.9,
) -> tuple[dict, list[dict]]:
    """A stage's rows as `SweepStore.write_stage` stores them: what the recorder is given."""
    row = {
        "sweep": sweep,
        "stage_id": stage_id,
        "stage_kind": "retrain",
        "parent_ids": ["prune0"],
        "round": 1,
        "dataset": "digits",
        "model": "resnet20",
        "pruner": "l1_filter",
        "structured": True,
        "ratio": 0.5,
        "schedule": "clr",
        "budget_epochs": n_epochs,
        "overrides": {"lr": 0.05},
        "seed": seed,
        "test_acc": acc,
        "achieved_sparsity": 0.5,
        "params": 1000,
        "wall_seconds": 12.5,
        "status": status,
        "error": "Traceback...\nRuntimeError: boom" if status == "failed" else None,
        "reused": False,
        "started_at": T0,
        "ended_at": T0 + timedelta(seconds=12.5),
    }
    eps = [
        {
            "epoch": e,
            "lr": 0.1,
            "train_loss": 1.0 / (e + 1) + seed,
            "test_acc": max(0.0, acc - 0.01 * (n_epochs - 1 - e)),
            "wall_s": 3.0,
        }
        for e in range(n_epochs)
    ]
    keys = {"sweep": sweep, "stage_id": stage_id, "stage_kind": row["stage_kind"]}
    stored_eps = rows_to_table("epochs", [{**keys, **e} for e in eps]).to_pylist()
    return rows_to_table("stages", [row]).to_pylist()[0], stored_eps


def child_runs(uri: str, sweep: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(f"nptm/{sweep}")
    return [
        r
        for r in client.search_runs([exp.experiment_id], max_results=1000)
        if "nptm.stage_id" in r.data.tags
    ]


def test_default_uri_is_sqlite_under_storage(tmp_path: Path) -> None:
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert default_tracking_uri(tmp_path).startswith("sqlite:////")  # absolute path
    with pytest.raises(ValueError, match="'s3://bucket/x' is not local"):
        default_tracking_uri("s3://bucket/x")
    assert resolve_tracking_uri("s3://bucket/x", None) is None
    assert resolve_tracking_uri("s3://bucket/x", "http://h:5000") == "http://h:5000"


def test_one_top_level_run_per_stage_with_params_metrics_tags(storage: Path) -> None:
    uri = sqlite_uri(storage)
    rec = MlflowRecorder(uri, "s1")
    sweep_run = rec.start_sweep({"grid": {"seeds": [0, 1]}, "name": "s1"})
    row, eps = stage("t1", n_epochs=4, acc=0.9)
    run_id = rec.record_stage(row, eps)
    other = rec.record_stage(*stage("t2", seed=1, n_epochs=2))
    rec.end_sweep("FINISHED")

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert "mlflow.parentRunId" not in tags and tags["nptm.role"] == "stage"
    assert tags["nptm.stage_id"] == "t1" and tags["nptm.sweep"] == "s1"
    assert tags["nptm.stage_kind"] == "retrain" and tags["nptm.pruner"] == "l1_filter"
    assert tags["nptm.schedule"] == "clr"
    p = run.data.params
    assert p["dataset"] == "digits" and p["ratio"] == "0.5" and p["budget"] == "4"
    assert p["seed"] == "0" and p["override.lr"] == "0.05" and p["overrides"] == '{"lr":0.05}'
    m = run.data.metrics
    # One value per stage under summary/; the numeric axes as metrics too.
    assert m["summary/test_acc"] == pytest.approx(0.9) and m["summary/achieved_sparsity"] == 0.5
    assert m["summary/params"] == 1000 and m["summary/wall_seconds"] == 12.5
    assert (m["ratio"], m["budget"], m["seed"]) == (0.5, 4, 0)
    # MLflow charts a run's metrics in sections by prefix, in name order, then those without:
    # the curves (epoch/) lead, the one-off values (summary/) follow, then the axes.
    assert sorted({k.split("/")[0] for k in m if "/" in k}) == ["epoch", "summary"]
    assert sorted(k for k in m if "/" not in k) == ["budget", "ratio", "seed"]
    history = client.get_metric_history(run_id, "epoch/train_loss")
    assert [h.step for h in sorted(history, key=lambda h: h.step)] == [0, 1, 2, 3]
    assert sorted(h.value for h in history) == pytest.approx(sorted(1 / (e + 1) for e in range(4)))
    # The test accuracy per epoch, and the final figure at the last epoch's step.
    acc = sorted(client.get_metric_history(run_id, "epoch/test_acc"), key=lambda h: h.step)
    assert [h.value for h in acc] == pytest.approx([0.87, 0.88, 0.89, 0.9])
    assert [h.step for h in client.get_metric_history(run_id, "summary/test_acc")] == [3]
    # The sweep's own run sits beside the stages', told apart by its tag and name.
    sweep = client.get_run(sweep_run)
    assert sweep.info.status == "FINISHED" and sweep.info.run_name == "sweep/s1"
    assert sweep.data.tags["nptm.role"] == "sweep" and sweep.data.params["grid.seeds"] == "[0, 1]"
    eid = run.info.experiment_id
    # Shown by MLflow's UI as training runs, not GenAI evaluations.
    assert client.get_experiment(eid).tags["mlflow.experimentKind"] == "custom_model_development"
    stage_runs = client.search_runs([eid], "tags.nptm.role = 'stage' and tags.nptm.sweep = 's1'")
    assert sorted(r.info.run_id for r in stage_runs) == sorted([run_id, other])
    # budget 4 and 2: a numeric filter, which MLflow cannot apply to params (text).
    assert [r.info.run_id for r in client.search_runs([eid], "metrics.budget > 3")] == [run_id]


def test_concurrent_producers(storage: Path) -> None:
    uri = sqlite_uri(storage)
    rec = MlflowRecorder(uri, "conc")
    rec.start_sweep({})
    n_threads, per_thread, n_epochs = 8, 3, 5
    barrier = threading.Barrier(n_threads)
    returned: dict[str, str | None] = {}
    errors: list[BaseException] = []

    def produce(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                tid = f"t{t}-{i}"
                row, eps = stage(tid, sweep="conc", seed=t * 10 + i, n_epochs=n_epochs)
                returned[tid] = rec.record_stage(row, eps)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and not rec.degraded
    runs = child_runs(uri, "conc")
    ids = [r.data.tags["nptm.stage_id"] for r in runs]
    assert sorted(ids) == sorted(returned) and len(ids) == n_threads * per_thread
    client = MlflowClient(tracking_uri=uri)
    for r in runs:
        assert returned[r.data.tags["nptm.stage_id"]] == r.info.run_id
        seed = int(r.data.params["seed"])
        history = client.get_metric_history(r.info.run_id, "epoch/train_loss")
        assert sorted(h.step for h in history) == list(range(n_epochs))
        assert sorted(h.value for h in history) == pytest.approx(
            sorted(1 / (e + 1) + seed for e in range(n_epochs))
        )
    # Recording the same outcomes again (a resumed sweep) adds nothing.
    rec2 = MlflowRecorder(uri, "conc")
    again = {
        tid: rec2.record_stage(
            *stage(tid, sweep="conc", seed=int(tid[1]) * 10 + int(tid[-1]), n_epochs=5)
        )
        for tid in returned
    }
    assert again == returned
    assert len(child_runs(uri, "conc")) == n_threads * per_thread


def test_rerun_with_new_outcome_updates_the_run_in_place(storage: Path) -> None:
    uri = sqlite_uri(storage)
    rec = MlflowRecorder(uri, "s1")
    rec.start_sweep()
    failed = rec.record_stage(*stage("t1", status="failed"))
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(failed).info.status == "FAILED"
    assert client.get_run(failed).data.tags["nptm.error"].endswith("RuntimeError: boom")
    # A crash of the driver, then a fresh recorder records the retried stage.
    ok = MlflowRecorder(uri, "s1").record_stage(*stage("t1", acc=0.95))
    assert ok == failed
    runs = child_runs(uri, "s1")
    assert [r.info.run_id for r in runs] == [ok]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["summary/test_acc"] == pytest.approx(0.95)
    assert "nptm.error" not in runs[0].data.tags  # the failure's tag went with it
    # A run left half-written (no fingerprint, still RUNNING) is completed, not duplicated;
    # points it already has are not logged twice.
    client.delete_tag(ok, "nptm.row_hash")
    client.update_run(ok, status="RUNNING")
    again = MlflowRecorder(uri, "s1").record_stage(*stage("t1", acc=0.95))
    assert again == ok and [r.info.run_id for r in child_runs(uri, "s1")] == [ok]
    assert client.get_run(ok).info.status == "FINISHED"
    history = client.get_metric_history(ok, "epoch/train_loss")
    assert sorted(h.step for h in history) == [0, 1, 2, 3]


def test_stage_run_is_live_from_start_to_end(storage: Path) -> None:
    """RUNNING with the epochs so far while the stage trains; then the stored outcome ends it,
    without doubling the points logged live."""
    uri = sqlite_uri(storage)
    rec = MlflowRecorder(uri, "live")
    rec.start_sweep()
    row, eps = stage("t1", sweep="live", n_epochs=3, acc=0.9)
    run_id = rec.start_stage({**row, "status": "skipped"})  # outcome columns not known yet
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["nptm.status"] == "running"
    assert "mlflow.parentRunId" not in run.data.tags and run.data.params["budget"] == "3"
    assert run.data.metrics["ratio"] == 0.5  # a filter on the axes finds it while it runs
    for e in eps[:2]:
        rec.log_epoch("t1", {**e, "epoch_done": 1, "training_iteration": 7})
    history = client.get_metric_history(run_id, "epoch/train_loss")
    assert sorted(h.step for h in history) == [0, 1]
    assert "training_iteration" not in client.get_run(run_id).data.metrics
    rec.log_epoch("t1", eps[2])
    assert rec.record_stage(row, eps) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["nptm.status"] == "ok"
    for key in ("epoch/train_loss", "epoch/test_acc", "epoch/lr"):
        steps = sorted(h.step for h in client.get_metric_history(run_id, key))
        assert steps == [0, 1, 2], (key, steps)
    assert [h.value for h in client.get_metric_history(run_id, "ratio")] == [0.5]  # not twice
    assert rec.end_open_stages("KILLED") == 0  # nothing left open


def test_interrupted_and_killed_drivers_leave_no_running_run(storage: Path) -> None:
    uri = sqlite_uri(storage)
    client = MlflowClient(tracking_uri=uri)
    # An interrupted driver ends what it opened.
    rec = MlflowRecorder(uri, "int")
    parent = rec.start_sweep()
    row, _ = stage("t1", sweep="int")
    run_id = rec.start_stage(row)
    assert rec.end_open_stages("KILLED") == 1
    rec.end_sweep("KILLED")
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(parent).info.status == "KILLED"
    # A killed driver ends nothing: the next driver of the sweep does, then reopens the parent.
    dead = MlflowRecorder(uri, "int")
    dead.start_sweep()
    left = dead.start_stage(stage("t2", sweep="int")[0])
    assert client.get_run(left).info.status == "RUNNING"
    MlflowRecorder(uri, "int").start_sweep()
    assert client.get_run(left).info.status == "KILLED"
    assert client.get_run(parent).info.status == "RUNNING"  # reopened by the new driver


@pytest.mark.slow
def test_a_users_tag_and_note_survive_a_re_record(mlflow_server) -> None:
    """Against a real `mlflow server`: a re-recorded stage keeps its run, and what a user
    added to it in the UI (a tag, a note)."""
    uri = mlflow_server.wait()
    rec = MlflowRecorder(uri, "usertag")
    rec.start_sweep()
    run_id = rec.record_stage(*stage("t1", sweep="usertag", status="failed"))
    client = MlflowClient(tracking_uri=uri)
    client.set_tag(run_id, "reviewed", "yes")
    client.set_tag(run_id, "mlflow.note.content", "odd loss spike at epoch 2")
    again = MlflowRecorder(uri, "usertag").record_stage(*stage("t1", sweep="usertag", acc=0.93))
    run = client.get_run(again)
    assert again == run_id and run.info.status == "FINISHED"
    assert run.data.tags["reviewed"] == "yes"
    assert run.data.tags["mlflow.note.content"] == "odd loss spike at epoch 2"
    assert run.data.metrics["summary/test_acc"] == pytest.approx(0.93)
    assert [r.info.run_id for r in child_runs(uri, "usertag")] == [run_id]


def test_status_mapping(storage: Path) -> None:
    uri = sqlite_uri(storage)
    rec = MlflowRecorder(uri, "s1")
    client = MlflowClient(tracking_uri=uri)
    diverged = client.get_run(rec.record_stage(*stage("d", status="diverged")))
    assert diverged.info.status == "FAILED" and diverged.data.tags["nptm.diverged"] == "true"
    skipped = client.get_run(rec.record_stage(*stage("s", status="skipped", n_epochs=0)))
    assert skipped.info.status == "KILLED" and "nptm.diverged" not in skipped.data.tags


def test_long_runs_are_split_over_batches(storage: Path) -> None:
    # 300 epochs x 5 series = 1500 metric points, more than one log_batch may carry.
    uri = sqlite_uri(storage)
    run_id = MlflowRecorder(uri, "long").record_stage(*stage("t", sweep="long", n_epochs=300))
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "epoch/train_loss")
    assert sorted(h.step for h in history) == list(range(300))


def test_final_model_is_a_logged_model_of_its_run(
    storage: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow
    import torch

    uri = sqlite_uri(storage)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for MLflow's own functions, as a user has it
    client = MlflowClient(tracking_uri=uri)
    row, eps = stage("t", sweep="m")
    # Recorded first without log_models: the run alone, nothing built.
    run_id = MlflowRecorder(uri, "m").record_stage(row, eps, model=lambda: 1 / 0)
    eid = client.get_experiment_by_name("nptm/m").experiment_id

    def models() -> list:
        return mlflow.search_logged_models(experiment_ids=[eid], output_format="list")

    def model_ids() -> list[str]:
        return [m.model_id for m in models()]

    assert models() == []
    # Then with it (a resumed sweep): the same run gets its model.
    net = torch.nn.Linear(3, 2)
    rec = MlflowRecorder(uri, "m", log_models=True)
    assert rec.record_stage(row, eps, model=lambda: net) == run_id
    (logged,) = models()
    assert logged.source_run_id == run_id and logged.tags["nptm.stage_id"] == "t"
    assert logged.params["pruner"] == "l1_filter"
    run = client.get_run(run_id)
    assert run.data.tags["nptm.model_id"] == logged.model_id
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(logged.model_id, 3)]
    # Output at the last epoch's step: the figures there are the model's (the run's, once).
    assert {m.key: m.value for m in logged.metrics}["summary/test_acc"] == pytest.approx(0.9)
    assert len(client.get_metric_history(run_id, "summary/test_acc")) == 1
    x = torch.randn(5, 3)
    assert torch.equal(mlflow.pytorch.load_model(logged.model_uri)(x), net(x))
    assert (storage / "mlartifacts").is_dir()  # next to the sqlite store, not in the cwd
    # The same outcome again logs nothing; a new outcome replaces the model.
    assert rec.record_stage(row, eps, model=lambda: 1 / 0) == run_id
    assert model_ids() == [logged.model_id]
    again = MlflowRecorder(uri, "m", log_models=True)
    again.record_stage(*stage("t", sweep="m", acc=0.95), model=lambda: torch.nn.Linear(3, 2))
    (newer,) = models()
    assert newer.model_id != logged.model_id and newer.source_run_id == run_id
    accs = [m.value for m in newer.metrics if m.key == "summary/test_acc"]
    assert accs == [pytest.approx(0.95)]  # not the earlier outcome's
    # A network that cannot be rebuilt: one warning, the run recorded without a model.
    with caplog.at_level(logging.WARNING, logger="nptm.results.tracking"):
        for i in range(2):
            again.record_stage(*stage(f"u{i}", sweep="m"), model=lambda: 1 / 0)
    assert "division by zero" in caplog.text and caplog.text.count("no MLflow model") == 1
    assert model_ids() == [newer.model_id] and not again.degraded
    assert os.environ["MLFLOW_TRACKING_URI"] == uri  # the user's setting, as it was


def test_dead_server_degrades_once_and_fast(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in HTTP_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="nptm.results.tracking"):
        rec = MlflowRecorder(uri, "s1")
        assert rec.start_sweep({"a": 1}) is None
        assert rec.degraded
        for i in range(20):
            assert rec.record_stage(*stage(f"t{i}")) is None
        rec.end_sweep("FINISHED")
    elapsed = time.monotonic() - started
    print(f"dead server: degraded in {elapsed:.2f}s")
    assert elapsed < 5
    warnings = [r for r in caplog.records if r.name == "nptm.results.tracking"]
    assert len(warnings) == 1
    assert uri in warnings[0].getMessage() and "start_sweep" in warnings[0].getMessage()
    # Conservative HTTP settings were put in place for MLflow's client.
    import os

    assert {k: os.environ[k] for k in HTTP_ENV_DEFAULTS} == HTTP_ENV_DEFAULTS


def test_user_http_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    MlflowRecorder("http://127.0.0.1:1", "s1")
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"


def test_disabled_recorder_records_nothing() -> None:
    rec = MlflowRecorder(None, "s1")
    assert rec.degraded and rec.start_sweep() is None and rec.record_stage(*stage("t")) is None


def test_sync_after_outage_restores_every_run(storage: Path) -> None:
    uri = sqlite_uri(storage)
    store = SweepStore(storage, "out")
    # Two stages reach MLflow, then the server goes away; the sweep carries on in Parquet.
    live = MlflowRecorder(uri, "out")
    live.start_sweep()
    for i in range(2):
        row, eps = stage(f"t{i}", sweep="out", seed=i)
        row["mlflow_run_id"] = live.record_stage(row, eps)
        store.write_stage(row, eps)
    dead = MlflowRecorder(f"http://127.0.0.1:{free_port()}", "out")
    for i in range(2, 6):
        row, eps = stage(f"t{i}", sweep="out", seed=i, status="failed" if i == 5 else "ok")
        row["mlflow_run_id"] = dead.record_stage(row, eps)
        store.write_stage(row, eps)
    assert dead.degraded and len(child_runs(uri, "out")) == 2

    result = sync_mlflow(store, uri)
    assert (result.created, result.updated, result.unchanged) == (4, 0, 2)
    runs = {r.data.tags["nptm.stage_id"]: r for r in child_runs(uri, "out")}
    assert sorted(runs) == [f"t{i}" for i in range(6)]
    assert runs["t5"].info.status == "FAILED"
    client = MlflowClient(tracking_uri=uri)
    for tid, run in runs.items():
        seed = int(tid[1:])
        history = client.get_metric_history(run.info.run_id, "epoch/train_loss")
        assert sorted(h.value for h in history) == pytest.approx(
            sorted(1 / (e + 1) + seed for e in range(4))
        )
    second = sync_mlflow(store, uri)
    assert (second.created, second.updated, second.unchanged) == (0, 0, 6)

    # A stage rerun with a new outcome while MLflow was down is updated, not duplicated.
    row, eps = stage("t3", sweep="out", seed=3, acc=0.99)
    store.write_stage(row, eps)
    third = sync_mlflow(store, uri)
    assert (third.created, third.updated, third.unchanged) == (0, 1, 5)
    runs = {r.data.tags["nptm.stage_id"]: r for r in child_runs(uri, "out")}
    assert len(runs) == 6 and runs["t3"].data.metrics["summary/test_acc"] == pytest.approx(0.99)


def test_sync_into_empty_store_creates_finished_sweep_run(storage: Path) -> None:
    uri = sqlite_uri(storage)
    store = SweepStore(storage, "fresh")
    store.write_stage(*stage("t0", sweep="fresh"))
    assert sync_mlflow(store, uri).created == 1
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("nptm/fresh")
    sweeps = client.search_runs([exp.experiment_id], "tags.\"nptm.role\" = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    assert sweeps[0].info.run_name == "sweep/fresh"
    (run,) = child_runs(uri, "fresh")
    assert "mlflow.parentRunId" not in run.data.tags and run.data.tags["nptm.role"] == "stage"


def test_runs_nested_by_an_earlier_version_are_lifted(storage: Path) -> None:
    """Stage runs an earlier version recorded as children of the sweep's run come up to the
    top level when a recorder next reads the experiment; nothing is recorded twice."""
    uri = sqlite_uri(storage)
    rec = MlflowRecorder(uri, "old")
    sweep_run = rec.start_sweep()
    row, eps = stage("t0", sweep="old")
    run_id = rec.record_stage(row, eps)
    client = MlflowClient(tracking_uri=uri)
    client.set_tag(run_id, "mlflow.parentRunId", sweep_run)  # as recorded before
    client.delete_tag(run_id, "nptm.role")
    assert MlflowRecorder(uri, "old").record_stage(row, eps) == run_id
    tags = client.get_run(run_id).data.tags
    assert "mlflow.parentRunId" not in tags and tags["nptm.role"] == "stage"
    assert [r.info.run_id for r in child_runs(uri, "old")] == [run_id]


def test_epochs_are_grouped_per_stage() -> None:
    import pyarrow as pa

    from nptm.results.tracking import epochs_by_stage

    rows = [
        {"sweep": "s", "stage_id": tid, "stage_kind": "retrain", "epoch": e, "test_acc": v}
        for tid, e, v in [("b", 1, 0.2), ("a", 0, 0.5), ("b", 0, 0.1), ("c", 0, 0.9), ("a", 1, 0.6)]
    ]
    table = pa.concat_tables([rows_to_table("epochs", rows[:2]), rows_to_table("epochs", rows[2:])])
    epochs_of = epochs_by_stage(table)
    assert [(e["epoch"], e["test_acc"]) for e in epochs_of("a")] == [(0, 0.5), (1, 0.6)]
    assert [(e["epoch"], e["test_acc"]) for e in epochs_of("b")] == [(0, 0.1), (1, 0.2)]
    assert [e["test_acc"] for e in epochs_of("c")] == [0.9]
    assert epochs_of("zzz") == []


def test_sync_finds_runs_recorded_under_the_old_stage_tag(storage: Path) -> None:
    # Runs recorded before schema version 2 carry nptm.trial_id instead of nptm.stage_id.
    uri = sqlite_uri(storage)
    rec = MlflowRecorder(uri, "old")
    rec.start_sweep()
    row, eps = stage("t0", sweep="old")
    run_id = rec.record_stage(row, eps)
    client = MlflowClient(tracking_uri=uri)
    client.delete_tag(run_id, "nptm.stage_id")
    client.set_tag(run_id, "nptm.trial_id", "t0")
    store = SweepStore(storage, "old")
    store.write_stage(row, eps)

    result = sync_mlflow(store, uri)
    assert (result.created, result.updated, result.unchanged) == (0, 0, 1)
    exp = client.get_experiment_by_name("nptm/old")
    stage_runs = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("nptm.role") != "sweep"
    ]
    assert [r.info.run_id for r in stage_runs] == [run_id]  # found, not duplicated


def test_headline_metrics_are_the_reports_cells(tmp_path: Path) -> None:
    """One mean per cell of the report's headline table (dataset, model, structure, target,
    budget, pruner, schedule with its overrides; final round; ok stages), under a valid key."""
    from nptm.results.mlflow_rows import headline_metrics

    store = SweepStore(tmp_path, "h")
    # (model, schedule, overrides, round, seed, status, test_acc)
    cells = [
        ("resnet20", "ft", {}, 1, 0, "ok", 0.80),
        ("resnet20", "ft", {}, 1, 1, "ok", 0.84),
        ("resnet56", "ft", {}, 1, 0, "ok", 0.90),  # another network: a cell of its own
        ("resnet56", "ft", {}, 1, 1, "ok", 0.94),
        ("resnet56", "ft", {}, 1, 2, "failed", 0.99),  # not a result
        ("resnet20", "ft", {"lr": 0.05}, 1, 0, "ok", 0.70),  # a variant of the schedule
        ("resnet20", "clr", {}, 1, 0, "ok", 0.50),  # superseded by its second round
        ("resnet20", "clr", {}, 2, 0, "ok", 0.60),
    ]
    for i, (model, schedule, overrides, rnd, seed, status, acc) in enumerate(cells):
        row, _ = stage(f"r{i}", sweep="h", seed=seed, status=status, n_epochs=2, acc=acc)
        store.write_stage({**row, "model": model, "schedule": schedule, "round": rnd,
                           "overrides": overrides, "lr_override": overrides.get("lr")})  # fmt: skip
    metrics = headline_metrics(store.read_stages())
    cell = "test_acc_mean/digits/{}/structured/ratio:0.5/b2/l1_filter/{}"
    assert metrics == pytest.approx({
        "stages_ok": 7, "stages_failed": 1, "test_acc_max": 0.94,
        cell.format("resnet20", "ft"): 0.82,
        cell.format("resnet56", "ft"): 0.92,
        cell.format("resnet20", "ft lr:0.05"): 0.70,
        cell.format("resnet20", "clr"): 0.60,
    })  # fmt: skip
    from mlflow.utils.validation import _validate_metric_name

    for key in metrics:
        _validate_metric_name(key)  # raises on a key MLflow refuses
