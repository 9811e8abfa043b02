"""Against real services: an `mlflow server` over HTTP, a two-node Ray cluster, Ray Jobs,
and the loss of one of the cluster's nodes mid-trial.

Everything listens on 127.0.0.1 and is started by these tests: the cluster is a
`ray.cluster_utils.Cluster` whose nodes are children of this process (never `ray stop`, which
would also stop clusters that are not ours); the MLflow server is the session's.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import ray

from orchestrator.cli import main as cli_main
from orchestrator.planner import build_plan
from orchestrator.trial import ray_name
from search_spaces import load_grid
from tests.ray_cluster import VENV_BIN, RayCluster, ray_cluster
from tests.sweep_helpers import (
    ROOT,
    FaultInjector,
    executions,
    mlflow_stage_runs,
    plan_stage_ids,
    seed_stages,
    sweep_on,
    trials,
    write_grid,
)
from trainables.artifacts import ArtifactStore

pytestmark = pytest.mark.slow

SWEEP_TIMEOUT = 600  # "did not hang" bound on a busy 2-core machine
MAGNITUDE = "{name: magnitude, ratio: 0.5}"
L1 = "{name: l1_filter, ratio: 0.5}"


@pytest.fixture(scope="module")
def cluster(mlflow_server):  # the session's MLflow server comes up while the cluster does
    with ray_cluster(cpus=(1, 1), dashboard=True) as c:
        yield c


# First in this module: the Ray job's sweep below takes the cluster's second node away.
def test_worker_group_larger_than_any_node_runs_across_both_nodes(
    cluster: RayCluster, tmp_path: Path, tiny_sweep
) -> None:
    """2 DDP workers x 0.9 CPU plus the 0.1-CPU trial actor fit no 1-CPU node but fit the
    two: the sweep is accepted and the retrain's ranks run one on each node; its prune runs
    as a Ray task. Ray Train's own state (what the dashboard's Train page lists) names the run
    after the stage. (A damaged parent found by a rank: test_faults, where Ray Train's error
    is recognised, and the inline sweep that recomputes one end to end.)"""
    grid = write_grid(
        tmp_path / "span.yaml", name="span", executor="train", workers=2, cpus=0.9,
        pruners=(L1,), schedules="[ft]", budget="1",
    )  # fmt: skip
    storage = tmp_path / "runs"
    seed_stages(tiny_sweep.storage, storage, grid)
    plan = build_plan(load_grid(grid))
    (retrain,) = (spec for spec in plan.stages.values() if spec.kind == "retrain")

    result = sweep_on(cluster, grid, storage, env={"NPTM_SHARED_FS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = trials(storage, "span").set_index("stage_kind")
    assert set(rows.status) == {"ok"} and rows.loc["pretrain", "reused"]
    assert rows.loc["prune", "executor"] == "task" and not rows.loc["prune", "reused"]
    assert rows.loc["retrain", "workers"] == 2 and rows.loc["retrain", "executor"] == "train"
    assert executions(storage, retrain.id) == 1

    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        state = ray.get_actor("train_v2_state_actor", namespace="_train_state_actor")
        runs = ray.get(state.get_train_runs.remote())
        attempts = ray.get(state.get_train_run_attempts.remote())
    finally:
        ray.shutdown()
    (run_id,) = [run_id for run_id, run in runs.items() if run.name == ray_name(retrain)]
    assert ray_name(retrain).startswith("retrain_digits_resnet20_l1_filter_ratio=0.5_ft_b1_s0-")
    workers = [w for attempt in attempts[run_id].values() for w in attempt.workers]
    assert len(workers) == 2 and {w.node_id for w in workers} == {
        r.node_id for r in cluster.raylets()
    }


@pytest.fixture(scope="module")
def cluster_sweep(mlflow_server, cluster: RayCluster, tmp_path_factory) -> SimpleNamespace:
    """`nptm sweep` submitted as a Ray job (`ray job submit`, the documented path onto a
    cluster), MLflow over HTTP, and a node lost mid-trial: two seeds, so two pre-trainings run
    side by side, one on each 1-CPU node; once both stored an epoch checkpoint, the worker
    node's raylet is SIGKILLed, as a crashed machine would be. Tune retries the lost trial on
    the head (max_failures = --max-retries) and the stage continues from its checkpoint.
    `submit` is the finished `ray job submit` (the job's log streamed back)."""
    tmp = tmp_path_factory.mktemp("svc")
    grid = write_grid(
        tmp / "svc.yaml", name="svc", seeds="[0, 1]", pruners=(MAGNITUDE,), schedules="[ft]",
        budget="1", pretrain_epochs=8, milestones="[4, 6]",
    )  # fmt: skip
    storage = tmp / "runs"
    plan = build_plan(load_grid(grid))
    pretrains = [s for s, spec in plan.stages.items() if spec.kind == "pretrain"]
    checkpoints = [storage / "stages" / s / "resume.pt.sha256" for s in pretrains]
    outcomes = [storage / "stages" / s / "outcome.json" for s in pretrains]
    (head,) = [r.node_id for r in cluster.raylets() if r.head]
    (worker,) = [r.node_id for r in cluster.raylets() if not r.head]

    def kill_worker_node() -> None:
        assert not any(o.exists() for o in outcomes), "a pre-training already ended"
        cluster.kill_worker_raylet()

    uri = mlflow_server.wait()
    job_id = f"nptm-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"NPTM_SHARED_FS": "1", "PYTHONPATH": str(ROOT)}}
    argv = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
        "--submission-id", job_id, "--runtime-env-json", json.dumps(runtime_env), "--",
        str(VENV_BIN / "nptm"), "sweep", str(grid), "--storage", str(storage),
        "--mlflow-uri", uri, "--no-report", "--max-retries", "2",
    ]  # fmt: skip
    injector = FaultInjector(ready=lambda: all(c.exists() for c in checkpoints),
                             fault=kill_worker_node, timeout=SWEEP_TIMEOUT)  # fmt: skip
    injector.start()
    deadline = time.time() + 120
    try:
        while True:
            submit = subprocess.run(
                argv, env=cluster.env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT,
                cwd=ROOT,
            )  # fmt: skip
            # The head's job agent may still be starting: Ray answers 500 and asks to retry.
            if "No available agent" not in submit.stderr or time.time() > deadline:
                break
            time.sleep(2)
    except BaseException:
        injector.stop()
        raise
    injector.finish(submit.stdout + submit.stderr)
    return SimpleNamespace(
        grid=grid, storage=storage, uri=uri, job_id=job_id, submit=submit,
        pretrains=pretrains, head=head, worker=worker,
    )  # fmt: skip


def test_sweep_submitted_as_a_ray_job_completes(cluster_sweep, cluster: RayCluster) -> None:
    submit = cluster_sweep.submit
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    status = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "status", "--address", cluster.dashboard_url,
         cluster_sweep.job_id],
        env=cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert f"Job '{cluster_sweep.job_id}' succeeded" in status.stdout, status.stdout + status.stderr
    n = len(plan_stage_ids(cluster_sweep.grid))
    assert f"sweep svc: ok {n}" in submit.stdout  # the job's own log, streamed back


def test_a_node_lost_mid_trial_costs_one_retry_that_resumes_on_the_survivor(
    cluster_sweep,
) -> None:
    d = cluster_sweep
    assert d.submit.returncode == 0, d.submit.stdout[-3000:] + d.submit.stderr[-3000:]
    rows = trials(d.storage, "svc").set_index("stage_id")
    assert sorted(rows.index) == sorted(plan_stage_ids(d.grid)) and set(rows.status) == {"ok"}
    assert set(rows.node) <= {d.head, d.worker}  # it joined this cluster, not a Ray of its own
    store = ArtifactStore(str(d.storage))
    resumed = {s: store.read_outcome(s).resumed_from_epoch for s in d.pretrains}
    # The two pre-trainings ran at once on two 1-CPU nodes, one on each: the worker node's
    # loss cut exactly one short, and only that one resumed.
    lost = [s for s, epoch in resumed.items() if epoch > 0]
    assert len(lost) == 1, resumed
    (lost_id,) = lost
    (kept_id,) = set(d.pretrains) - {lost_id}
    assert executions(d.storage, lost_id) == 2 and executions(d.storage, kept_id) == 1
    assert resumed[kept_id] == 0 and rows.loc[kept_id, "node"] == d.head
    assert rows.loc[lost_id, "node"] == d.head  # the retry ran on the survivor
    assert rows.loc[lost_id, "epochs_run"] == 8
    epochs = pd.read_parquet(d.storage / "sweeps" / "svc" / "epochs")
    assert sorted(epochs[epochs.stage_id == lost_id].epoch) == list(range(1, 9))


def test_mlflow_server_receives_the_runs_and_best_reads_them_back(
    cluster_sweep, capsys, monkeypatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = trials(cluster_sweep.storage, "svc")
    runs = mlflow_stage_runs(cluster_sweep.uri, "svc")
    assert sorted(r.data.tags["nptm.stage_id"] for r in runs) == sorted(rows.stage_id)
    assert set(rows.mlflow_run_id) == {r.info.run_id for r in runs}

    argv = ["best", "--mlflow-uri", cluster_sweep.uri, "--sweep", "svc", "--json", "--top", "50"]
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
