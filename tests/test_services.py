"""Against real services: an `mlflow server` over HTTP, a two-node Ray cluster, Ray Jobs,
Ray Train's ranks across nodes, and the loss of one of the cluster's nodes mid-trial.

The sweeps run ahead of these tests (tests.cluster_sweeps, where each is described); these
assert on what they left. Everything listens on 127.0.0.1 and is started by the test session:
the cluster is a `ray.cluster_utils.Cluster` whose nodes are children of the test process
(never `ray stop`, which would also stop clusters that are not ours); the MLflow server is the
session's.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from nptm.orchestrator.cli import main as cli_main
from nptm.orchestrator.planner import build_plan
from nptm.orchestrator.trial import TRIAL_ACTOR, ray_name
from nptm.search_spaces import load_grid
from nptm.trainables.artifacts import ArtifactStore
from tests.cluster_sweeps import ClusterSweeps
from tests.sweep_helpers import (
    executions,
    mlflow_stage_runs,
    plan_stage_ids,
    trials,
)

pytestmark = pytest.mark.slow


def test_worker_group_larger_than_any_node_runs_across_both_nodes(
    cluster_sweeps: ClusterSweeps,
) -> None:
    """The retrain's ranks run one on each node, its prune as a Ray task, and the pre-training
    is reused. The dashboard's Train page lists the run under the stage's name with a worker
    on each node. (A damaged parent found by a rank: test_faults, where Ray Train's error is
    recognised, and the inline sweep that recomputes one end to end.)"""
    span = cluster_sweeps.span
    assert span.result.returncode == 0, span.result.stderr[-3000:]
    plan = build_plan(load_grid(span.grid))
    (retrain,) = (spec for spec in plan.stages.values() if spec.kind == "retrain")
    rows = trials(span.storage, "span").set_index("stage_kind")
    assert set(rows.status) == {"ok"} and rows.loc["pretrain", "reused"]
    assert rows.loc["prune", "executor"] == "task" and not rows.loc["prune", "reused"]
    assert rows.loc["retrain", "workers"] == 2 and rows.loc["retrain", "executor"] == "train"
    assert executions(span.storage, retrain.id) == 1

    (run,) = [run for run in span.train_runs if run["name"] == ray_name(retrain)]
    assert ray_name(retrain).startswith("retrain_digits_resnet20_l1_filter_ratio=0.5_ft_b1_s0-")
    workers = [w for attempt in run["attempts"] for w in attempt["workers"]]
    assert len(workers) == 2
    assert {w["node_id"] for w in workers} == {cluster_sweeps.head, cluster_sweeps.worker}
    # The Tasks page names the prune task after its stage; the Actors page names Tune's trial
    # actors NptmStage (Tune's own name: ImplicitFunc).
    (prune,) = (spec for spec in plan.stages.values() if spec.kind == "prune")
    tasks = {t["name"] for t in span.tasks}
    assert ray_name(prune) in tasks, sorted(tasks)
    classes = {a["class_name"] for a in span.actors}
    assert TRIAL_ACTOR in classes and "ImplicitFunc" not in classes, sorted(classes)


def test_sweep_submitted_as_a_ray_job_completes(cluster_sweeps: ClusterSweeps) -> None:
    job = cluster_sweeps.job
    submit, status = job.submit, job.status  # `ray job status`, asked once the job ended
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert f"Job '{job.job_id}' succeeded" in status.stdout, status.stdout + status.stderr
    n = len(plan_stage_ids(job.grid))
    assert f"sweep svc: ok {n}" in submit.stdout  # the job's own log, streamed back


def test_a_node_lost_mid_trial_costs_one_retry_that_resumes_on_the_survivor(
    cluster_sweeps: ClusterSweeps,
) -> None:
    d, head = cluster_sweeps.job, cluster_sweeps.head
    assert d.submit.returncode == 0, d.submit.stdout[-3000:] + d.submit.stderr[-3000:]
    rows = trials(d.storage, "svc").set_index("stage_id")
    assert sorted(rows.index) == sorted(plan_stage_ids(d.grid)) and set(rows.status) == {"ok"}
    # It joined this cluster, it did not start a Ray of its own.
    assert set(rows.node) <= {head, cluster_sweeps.worker}
    store = ArtifactStore(str(d.storage))
    resumed = {s: store.read_outcome(s).resumed_from_epoch for s in d.pretrains}
    # The two pre-trainings ran at once on two 1-CPU nodes, one on each: the worker node's
    # loss cut exactly one short, and only that one resumed.
    lost = [s for s, epoch in resumed.items() if epoch > 0]
    assert len(lost) == 1, resumed
    (lost_id,) = lost
    (kept_id,) = set(d.pretrains) - {lost_id}
    assert executions(d.storage, lost_id) == 2 and executions(d.storage, kept_id) == 1
    assert resumed[kept_id] == 0 and rows.loc[kept_id, "node"] == head
    assert rows.loc[lost_id, "node"] == head  # the retry ran on the survivor
    assert rows.loc[lost_id, "epochs_run"] == 8
    epochs = pd.read_parquet(d.storage / "sweeps" / "svc" / "epochs")
    assert sorted(epochs[epochs.stage_id == lost_id].epoch) == list(range(1, 9))


def test_mlflow_server_receives_the_runs_and_best_reads_them_back(
    cluster_sweeps: ClusterSweeps, capsys, monkeypatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = cluster_sweeps.job
    rows = trials(job.storage, "svc")
    runs = mlflow_stage_runs(job.uri, "svc")
    assert sorted(r.data.tags["nptm.stage_id"] for r in runs) == sorted(rows.stage_id)
    assert set(rows.mlflow_run_id) == {r.info.run_id for r in runs}

    argv = ["best", "--mlflow-uri", job.uri, "--sweep", "svc", "--agg", "none", "--json",
            "--top", "50"]  # fmt: skip
    assert cli_main(argv) == 0
    best = pd.DataFrame(json.loads(capsys.readouterr().out))
    # Independent expectation: the Parquet table's successful retrains, best first.
    want = rows[(rows.stage_kind == "retrain") & (rows.status == "ok")]
    want = want.sort_values("test_acc", ascending=False, kind="stable")
    assert sorted(best.stage_id) == sorted(want.stage_id)
    assert list(best.test_acc) == pytest.approx(list(want.test_acc))
    assert list(best.test_acc) == sorted(best.test_acc, reverse=True)
    by_id = want.set_index("stage_id")
    for rec in best.itertuples():
        assert rec.test_acc == pytest.approx(by_id.loc[rec.stage_id, "test_acc"])
        assert rec.schedule == by_id.loc[rec.stage_id, "schedule"]
        assert int(rec.seed) == by_id.loc[rec.stage_id, "seed"]
