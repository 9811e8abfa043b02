"""The sweeps of tests/test_services.py, on a two-node Ray cluster of their own, started with
the session and run on a thread of their own (tests.background): their Ray processes mostly
wait on each other (Ray Train's start-up, a job's driver, a lost node's retry), and the
session's other tests fill the cores meanwhile. The tests then assert on what they left.

Everything they start is a process of its own (a sweep's driver, `ray job submit`): the test
process's own Ray driver belongs to the sweeps the tests run in it. The cluster is started
before the first test, from the session's environment as it is then, and that environment,
copied, is what these processes get. Once the sweeps have ended and what the tests read from
the cluster (its dashboard's pages, the job's status) is taken, the cluster is stopped: its
idle daemons would otherwise share the session's cores until its end.

1. `span`: a retrain whose 2 DDP workers x 0.9 CPU plus its 0.1-CPU trial actor fit no 1-CPU
   node but fit the two; its prune runs as a Ray task. Then the dashboard's Train page data,
   and its Actors and Tasks pages' (Ray's state API).
2. `job`: `nptm sweep` submitted as a Ray job (`ray job submit`, the documented path onto a
   cluster), MLflow over HTTP, and a node lost mid-trial: two seeds, so two pre-trainings
   run side by side, one on each 1-CPU node; once both stored an epoch checkpoint, the worker
   node's raylet is SIGKILLed, as a crashed machine would be. Tune retries the lost trial on
   the head (max_failures = --max-retries) and the stage continues from its checkpoint.
   Second: it takes the cluster's second node away.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from nptm.orchestrator.planner import build_plan
from nptm.search_spaces import load_grid
from tests.background import Background
from tests.ray_cluster import VENV_BIN, RayCluster, ray_cluster
from tests.sweep_helpers import (
    NPTM,
    ROOT,
    MlflowServer,
    empty_mlflow_store,
    seed_stages,
    with_fault,
    write_grid,
)

SWEEP_TIMEOUT = 600  # "did not hang" bound on a busy 2-core machine
MAGNITUDE = "{name: magnitude, ratio: 0.5}"
L1 = "{name: l1_filter, ratio: 0.5}"
TRAIN_RUNS = "/api/train/v2/runs/v1"  # what the dashboard's Train page lists
STATE_API = "/api/v0/{}?limit=10000"  # what its Actors and Tasks pages list


@dataclass(frozen=True)
class ClusterSweeps:
    head: str  # node ids, taken while both nodes were alive
    worker: str
    span: SimpleNamespace
    job: SimpleNamespace


def start_cluster_sweeps(
    stack: contextlib.ExitStack,
    tmp: Path,
    mlflow_server: MlflowServer,
    tiny_storage: Callable[[], Path],
) -> Background[ClusterSweeps]:
    """Starts the cluster here, then the sweeps on a thread, which stops the cluster once they
    have ended (else `stack`, closing, does). `tiny_storage()` waits for the session's tiny
    sweep and returns its storage: `span` reuses its pre-training."""
    cluster = stack.enter_context(ray_cluster(cpus=(1, 1), dashboard=True))
    (head,) = [r.node_id for r in cluster.raylets() if r.head]
    (worker,) = [r.node_id for r in cluster.raylets() if not r.head]

    def sweeps() -> ClusterSweeps:
        try:
            span = _span_sweep(cluster, tmp / "span", tiny_storage())
            job = _job_sweep(cluster, tmp / "svc", mlflow_server.wait())
        finally:
            cluster.stop()
        return ClusterSweeps(head, worker, span, job)

    lane = Background("cluster-sweeps", sweeps)
    lane.start()
    return lane


def _span_sweep(cluster: RayCluster, tmp: Path, tiny_storage: Path) -> SimpleNamespace:
    tmp.mkdir()
    grid = write_grid(
        tmp / "span.yaml", name="span", executor="train", workers=2, cpus=0.9,
        pruners=(L1,), schedules="[ft]", budget="1",
    )  # fmt: skip
    storage = tmp / "runs"
    seed_stages(tiny_storage, storage, grid)
    empty_mlflow_store(storage)
    result = subprocess.run(
        [*NPTM, "sweep", str(grid), "--storage", str(storage), "--address", cluster.address,
         "--no-report"],
        env={**cluster.env, "PYTHONPATH": str(ROOT), "NPTM_SHARED_FS": "1"},
        capture_output=True, text=True, timeout=SWEEP_TIMEOUT, cwd=ROOT,
    )  # fmt: skip
    train_runs = cluster.dashboard_json(TRAIN_RUNS)["train_runs"]
    actors, tasks = (
        cluster.dashboard_json(STATE_API.format(kind))["data"]["result"]["result"]
        for kind in ("actors", "tasks")
    )
    return SimpleNamespace(
        grid=grid, storage=storage, result=result, train_runs=train_runs, actors=actors,
        tasks=tasks,
    )  # fmt: skip


def _job_sweep(cluster: RayCluster, tmp: Path, uri: str) -> SimpleNamespace:
    tmp.mkdir()
    grid = write_grid(
        tmp / "svc.yaml", name="svc", seeds="[0, 1]", pruners=(MAGNITUDE,), schedules="[ft]",
        budget="1", pretrain_epochs=8, milestones="[4, 6]",
    )  # fmt: skip
    storage = tmp / "runs"
    plan = build_plan(load_grid(grid))
    pretrains = [s for s, spec in plan.stages.items() if spec.kind == "pretrain"]
    checkpoints = [storage / "stages" / s / "resume.pt.sha256" for s in pretrains]
    outcomes = [storage / "stages" / s / "outcome.json" for s in pretrains]

    def kill_worker_node() -> None:
        assert not any(o.exists() for o in outcomes), "a pre-training already ended"
        cluster.kill_worker_raylet()

    job_id = f"nptm-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"NPTM_SHARED_FS": "1", "PYTHONPATH": str(ROOT)}}
    argv = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
        "--submission-id", job_id, "--runtime-env-json", json.dumps(runtime_env), "--",
        str(VENV_BIN / "nptm"), "sweep", str(grid), "--storage", str(storage),
        "--mlflow-uri", uri, "--no-report", "--max-retries", "2",
    ]  # fmt: skip

    def submit_job() -> subprocess.CompletedProcess:
        deadline = time.time() + 120
        while True:
            submit = subprocess.run(
                argv, env=cluster.env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT,
                cwd=ROOT,
            )  # fmt: skip
            # The head's job agent may still be starting: Ray answers 500 and asks to retry.
            if "No available agent" not in submit.stderr or time.time() > deadline:
                return submit
            time.sleep(2)

    submit = with_fault(
        submit_job, lambda done: done.stdout + done.stderr, fault=kill_worker_node,
        ready=lambda: all(c.exists() for c in checkpoints), timeout=SWEEP_TIMEOUT,
    )  # fmt: skip
    status = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "status", "--address", cluster.dashboard_url, job_id],
        env=cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return SimpleNamespace(
        grid=grid, storage=storage, uri=uri, job_id=job_id, submit=submit, status=status,
        pretrains=pretrains,
    )  # fmt: skip
