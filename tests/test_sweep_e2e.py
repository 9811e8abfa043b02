"""`nptm sweep` end to end: both executors, resume after a killed driver, failures, divergence.

The first test checks the README's path (conftest.tiny_sweep: the `nptm` console script in a
fresh process, which starts and stops its own local Ray). The others run the CLI in this
process, joined to the session's Ray node with `--address` (see conftest.ray_node): the same
code runs in the trials, without a fresh process and 10-15 s of Ray start-up per sweep. Only
the killed driver runs in a process of its own: its death is the subject.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.flaky_plugin import ERROR, flaky_data_plugin
from tests.sweep_helpers import (
    NPTM,
    ROOT,
    cli_in_process,
    copy_storage,
    executions,
    mlflow_stage_runs,
    plan_stage_ids,
    seed_stages,
    sweep_on,
    sweep_with_fault,
    trials,
    write_grid,
)

pytestmark = pytest.mark.slow
STOP = (signal.SIGINT, signal.SIGTERM)


def test_inline_sweep_lands_every_stage_once_then_reruns_nothing(
    tiny_sweep, tmp_path: Path, ray_node
) -> None:
    grid, first = tiny_sweep.grid, tiny_sweep.result
    # A relative storage path means the driver's directory, wherever Ray runs the workers.
    storage = tiny_sweep.storage
    assert first.returncode == 0, first.stderr[-3000:]
    stage_ids = plan_stage_ids(grid)
    rows = trials(storage)
    assert sorted(rows.stage_id) == sorted(stage_ids)  # every stage exactly once
    assert set(rows.status) == {"ok"}
    retrain = rows[rows.stage_kind == "retrain"]
    assert retrain.test_acc.notna().all() and (retrain.epochs_run == 2).all()
    # The retrained network keeps the sparsity that pruning gave it (masks survive retraining).
    mag = retrain[retrain.pruner == "magnitude"]
    assert ((mag.achieved_sparsity - 0.5).abs() < 0.01).all()
    assert "final test accuracy" in first.stdout  # the report's headline table closes the run
    uri = f"sqlite:///{storage}/mlflow.db"
    runs = mlflow_stage_runs(uri)
    assert sorted(r.data.tags["nptm.stage_id"] for r in runs) == sorted(stage_ids)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(executions(storage, sid) == 1 for sid in stage_ids)
    _check_banner_and_record(tiny_sweep, rows, runs, uri)

    storage = copy_storage(storage, tmp_path / "runs")  # the session's copy stays as it was
    uri = f"sqlite:///{storage}/mlflow.db"
    again = sweep_on(ray_node, grid, storage)  # where it runs does not matter: nothing runs
    assert again.returncode == 0, again.stderr[-3000:]
    assert "executed 0" in again.stdout
    assert all(executions(storage, sid) == 1 for sid in stage_ids)  # nothing ran twice
    assert len(trials(storage)) == len(stage_ids)
    assert len(mlflow_stage_runs(uri)) == len(stage_ids)


def _check_banner_and_record(tiny_sweep, rows, runs, uri: str) -> None:
    """What the README's sweep showed at start (the banner, a dashboard that answered while it
    ran) and recorded: the recipe of each stage, the run record, the parent run's files."""
    import json

    import mlflow
    import yaml

    out, storage = tiny_sweep.result.stdout, tiny_sweep.storage
    assert tiny_sweep.dashboard.url and tiny_sweep.dashboard.answered_while_running, out[:2000]
    assert "ray get-auth-token" in out and "experiment nptm/tiny" in out
    assert out.index("Ray dashboard: http") < out.index("sweep tiny: ok")  # banner first
    assert "9 stages (1 pretrain, 2 prune, 6 retrain); 9 to run" in out.splitlines()[0]
    assert "runs: http://127.0.0.1:5000/#/experiments/" in out
    assert "Ray dashboard (gone: nptm's local Ray stopped with the sweep)" in out
    # Each stage's recipe as its schedule resolves it: the grid's 4-epoch pre-training recipe
    # (digits defaults: lr 0.1, batch 64, wd 5e-4, momentum 0.9), /10 at epochs 2 and 3.
    retrain = rows[rows.stage_kind == "retrain"].set_index("schedule")
    peak = {"ft": 0.1 * 0.1**2, "clr": 0.1, "wr": 0.1 * 0.1}  # wr replays epochs 2-3
    for schedule, lr in peak.items():
        assert list(retrain.loc[schedule, "lr_peak"]) == pytest.approx([lr, lr]), schedule
    assert set(retrain.epochs) == {2} and set(retrain.batch_size) == {64}
    assert set(retrain.weight_decay) == {5e-4} and set(retrain.momentum) == {0.9}
    assert all(list(m) == [2, 3] for m in retrain.milestones)
    assert set(rows.target.dropna()) == {"ratio=0.5"}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    assert set(rows.git_commit) == {head or None}
    by_id = {r.data.tags["nptm.stage_id"]: r for r in runs}
    pretrain = rows[rows.stage_kind == "pretrain"].iloc[0]
    params = by_id[pretrain.stage_id].data.params
    assert params["epochs"] == "4" and params["lr_peak"] == "0.1" and "target" not in params
    # The run record and the parent run: grid as given, plan, versions, report, headline.
    run_dir = storage / "sweeps" / "tiny" / "run"
    assert (run_dir / "grid.yaml").read_text() == tiny_sweep.grid.read_text()
    assert json.loads((run_dir / "overrides.json").read_text()) == ["resources.max_concurrent=2"]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["counts"] == {"pretrain": 1, "prune": 2, "retrain": 6}
    versions = json.loads((run_dir / "versions.json").read_text())
    assert versions["git_commit"] == (head or None) and versions["ray"] and versions["torch"]
    assert json.loads((run_dir / "progress.json").read_text())["state"] == "finished"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("nptm/tiny")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`nptm.role` = 'sweep'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["nptm.overrides"] == "resources.max_concurrent=2"
    parent_id = parent.info.run_id
    files = {a.path for d in ("run", "report") for a in client.list_artifacts(parent_id, d)}
    assert {"run/grid.yaml", "run/overrides.json", "run/plan.json", "run/versions.json"} <= files
    assert "report/report.md" in files
    assert "mlflow.parentRunId" not in runs[0].data.tags  # stage runs at the top level
    cells = retrain.groupby(["pruner", "schedule"]).test_acc.mean()
    metrics = parent.data.metrics
    structure = {"magnitude": "unstructured", "l1_filter": "structured"}
    for (pruner, schedule), acc in cells.items():
        key = f"test_acc_mean/digits/resnet20/{structure[pruner]}/ratio:0.5/b2/{pruner}/{schedule}"
        assert metrics[key] == pytest.approx(acc)
    assert metrics["stages_ok"] == 9 and metrics["stages_planned"] == 9
    assert yaml.safe_load((run_dir / "grid.yaml").read_text())["name"] == "tiny"


def test_interrupted_and_killed_drivers_then_rerun_completes_without_repeats(
    tiny_sweep, tmp_path: Path, ray_node, mlflow_server
) -> None:
    """Three drivers of one sweep, against a real `mlflow server`: the first is sent SIGINT
    while a retrain's run is RUNNING with part of its epochs in MLflow, the second SIGTERM
    (what `ray job stop` sends), the third SIGKILL; then a fourth completes the sweep. The
    first two run in this process (their signal handlers are the subject), the killed one in
    a process of its own. One stage at a time: each driver then starts one trial actor."""
    grid = write_grid(
        tmp_path / "live.yaml", name="live", pruners=("{name: magnitude, ratio: 0.5}",),
        schedules="[ft, clr]", budget="3", max_concurrent=1,
    )  # fmt: skip
    storage = tmp_path / "runs"
    seed_stages(tiny_sweep.storage, storage, grid)  # a prune and 2 retrains left to run
    stage_ids, n = plan_stage_ids(grid), len(plan_stage_ids(grid))
    uri = mlflow_server.wait()
    client = MlflowClient(uri)
    progress = storage / "sweeps" / "live" / "run" / "progress.json"

    def outcomes() -> set[str]:
        return {p.parent.name for p in storage.glob("stages/*/outcome.json")}

    def runs(status: str | None = None) -> list:
        exp = client.get_experiment_by_name("nptm/live")
        found = client.search_runs([exp.experiment_id]) if exp else []
        return [r for r in found if status is None or r.info.status == status]

    def parent():
        (run,) = [r for r in runs() if r.data.tags.get("nptm.role") == "sweep"]
        return run

    def partial_retrain() -> str | None:
        """A retrain's run that is RUNNING with 1 of its 3 epochs logged."""
        for run in runs("RUNNING"):
            if run.data.tags.get("nptm.stage_kind") == "retrain":
                history = client.get_metric_history(run.info.run_id, "epoch/train_loss")
                steps = {m.step for m in history}
                if len(steps) == 1:
                    return run.info.run_id
        return None

    def signalled(ready, signum: int) -> tuple[int, float, str]:
        """This process runs the sweep's driver (`nptm sweep` in process) and sends itself
        `signum` once `ready()` holds: (exit code, seconds to exit, stdout + stderr)."""
        sent: list[float] = []
        late: list[int] = []

        def send() -> None:
            sent.append(time.time())
            os.kill(os.getpid(), signum)

        # The sweep's own handlers replace these while it runs: they catch only a signal that
        # comes after the sweep ended, which would otherwise end the test session.
        previous = {s: signal.signal(s, lambda n, _: late.append(n)) for s in STOP}
        try:
            result = sweep_with_fault(
                ray_node, grid, storage, "--mlflow-uri", uri, ready=ready, fault=send, timeout=300
            )
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        assert not late, f"the sweep ended before the signal\n{result.stderr[-3000:]}"
        return result.returncode, time.time() - sent[0], result.stdout + result.stderr

    def killed(ready) -> None:
        """A driver in a process of its own, SIGKILLed (with its process group) once
        `ready()` holds."""
        log = tmp_path / "sigkill.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [*NPTM, "sweep", str(grid), "--storage", str(storage), "--address",
                 ray_node.address, "--mlflow-uri", uri],
                cwd=ROOT, env={**ray_node.env, "PYTHONPATH": str(ROOT), "NPTM_LEASE_S": "2"},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            try:
                deadline = time.time() + 300
                while time.time() < deadline and proc.poll() is None and not ready():
                    time.sleep(0.2)
                assert proc.poll() is None, f"ended before the signal\n{log.read_text()}"
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=120)

    def check_interrupted(rc: int, seconds: float, out: str, code: int) -> None:
        assert rc == code, out[-3000:]
        assert seconds < 60, f"took {seconds:.0f}s to stop"  # measured under load
        assert re.search(rf"\d+ of {n} stages did not run; rerun the same command", out), out
        assert "Tuner.restore" not in out
        assert parent().info.status == "KILLED" and not runs("RUNNING")
        assert json.loads(progress.read_text())["state"] == "interrupted"
        assert set(trials(storage, "live").status) == {"ok"}  # a stopped stage is no failure
        # No report that reads as final (the sweep writes one when it completes).
        assert "report: " not in out and not (storage / "sweeps" / "live" / "report").exists()

    # 1. SIGINT (Ctrl-C) while a retrain is live in MLflow: RUNNING, 1 of its 3 epochs in.
    live: list[str] = []

    def retrain_is_live() -> bool:
        live.extend(filter(None, [partial_retrain()]))
        return bool(live)

    rc, seconds, out = signalled(retrain_is_live, signal.SIGINT)
    check_interrupted(rc, seconds, out, 130)
    live_id = live[0]
    assert client.get_run(live_id).info.status == "KILLED"
    print(f"SIGINT: exit 130 after {seconds:.1f}s; SIGTERM: ", end="")

    # 2. SIGTERM (`ray job stop`, a scheduler) as soon as this driver has a stage running.
    before = time.time()

    def stage_running() -> bool:  # as this driver's progress.json says
        try:
            now = json.loads(progress.read_text())
        except (OSError, ValueError):
            return False
        return now["started_at"] > before and bool(now["running"])

    rc, seconds, out = signalled(stage_running, signal.SIGTERM)
    check_interrupted(rc, seconds, out, 143)
    print(f"exit 143 after {seconds:.1f}s")

    # 3. SIGKILL while a stage runs: the driver can end nothing.
    before = time.time()
    killed(stage_running)
    finished_before = outcomes()
    assert len(finished_before) < n, "the driver died after the sweep"
    assert parent().info.status == "RUNNING"  # left by the killed driver
    assert json.loads(progress.read_text())["state"] == "running"
    attempts = {sid: executions(storage, sid) for sid in finished_before}

    # 4. The same command resumes: nothing finished runs again, no run is left RUNNING. It
    # takes over the lease the killed driver left (nptm.orchestrator.lease), once expired.
    left = json.loads((storage / "sweeps" / "live" / "run" / "lease.json").read_text())
    while time.time() <= left["expires"]:
        time.sleep(0.1)
    rerun = sweep_on(ray_node, grid, storage, "--mlflow-uri", uri)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "took over the lease of host" in rerun.stderr
    rows = trials(storage, "live")
    assert sorted(rows.stage_id) == sorted(stage_ids) and set(rows.status) == {"ok"}
    assert {sid: executions(storage, sid) for sid in finished_before} == attempts
    assert not runs("RUNNING") and parent().info.status == "FINISHED"
    stage_runs = mlflow_stage_runs(uri, "live")
    assert sorted(r.data.tags["nptm.stage_id"] for r in stage_runs) == sorted(stage_ids)
    assert {r.info.status for r in stage_runs} == {"FINISHED"}
    # The run that was live at the SIGINT is the stage's run still, now with every epoch.
    final = client.get_run(live_id)
    row = rows.set_index("stage_id").loc[final.data.tags["nptm.stage_id"]]
    assert final.info.status == "FINISHED" and row.mlflow_run_id == live_id
    steps = {m.step for m in client.get_metric_history(live_id, "epoch/train_loss")}
    assert steps == {1, 2, 3}
    assert final.data.metrics["summary/test_acc"] == pytest.approx(row.test_acc)
    assert json.loads(progress.read_text())["state"] == "finished"


def test_stage_that_fits_no_node_is_refused_instead_of_hanging(tmp_path: Path, ray_node) -> None:
    grid = write_grid(tmp_path / "big.yaml", name="big", executor="train", workers=4, cpus=1)
    started = time.time()
    result = sweep_on(ray_node, grid, tmp_path / "runs")  # a 2-CPU node
    assert result.returncode == 2
    assert "cannot be scheduled" in result.stderr and "CPU needs 4.1" in result.stderr
    assert time.time() - started < 180
    assert not list((tmp_path / "runs").glob("stages/*"))  # nothing ran


def test_failure_skips_descendants_divergence_is_recorded_and_the_rest_completes(
    tiny_sweep, tmp_path: Path, ray_node
) -> None:
    # A dataset whose loader fails on the workers (a missing data root is refused before
    # the first stage: tests/test_preflight.py).
    with flaky_data_plugin(tmp_path) as plugin:
        grid = write_grid(
            tmp_path / "faults.yaml", name="faults", datasets=f"[digits, {plugin.dataset}]",
            pruners=("{name: magnitude, ratio: 0.5}",), schedules="[ft]",
            extra=f"""\
            plugins: [{plugin.module}]
            include:
              - {{dataset: digits, model: resnet20, pruner: magnitude, ratio: 0.5, schedule: clr,
                 budget: 2, seed: 0, lr: 100000.0}}
            """,
        )  # fmt: skip
        storage = tmp_path / "runs"
        # The digits pre-training is the session's.
        seed_stages(tiny_sweep.storage, storage, grid)
        result = sweep_on(ray_node, grid, storage, "--max-retries", "0")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "FAILED pretrain" in result.stderr
    rows = trials(storage, "faults")
    broken = rows[rows.dataset == plugin.dataset].set_index("stage_kind")
    assert broken.loc["pretrain", "status"] == "failed"
    assert f"OSError: [Errno 116] {ERROR}" in broken.loc["pretrain", "error"]
    assert broken.loc["prune", "status"] == "skipped"
    assert "failed ancestor" in broken.loc["prune", "error"]
    assert broken.loc["retrain", "status"] == "skipped"
    digits = rows[rows.dataset == "digits"]
    diverged = digits[digits.lr_override == 100000.0]
    assert list(diverged.status) == ["diverged"] and "diverged" in diverged.error.iloc[0]
    assert set(digits[digits.lr_override.isna()].status) == {"ok"}
    uri = f"sqlite:///{storage}/mlflow.db"
    runs = {r.data.tags["nptm.stage_id"]: r for r in mlflow_stage_runs(uri, "faults")}
    assert runs[broken.loc["pretrain", "stage_id"]].info.status == "FAILED"
    assert runs[diverged.stage_id.iloc[0]].info.status == "FAILED"


@pytest.mark.parametrize("fault", ["not writable", "out of space"])
def test_unusable_storage_is_refused_before_any_work(tmp_path: Path, fault: str) -> None:
    grid = write_grid(tmp_path / "tiny.yaml")
    if fault == "not writable":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        storage, extra, message = blocker / "runs", [], str(blocker / "runs")
    else:  # more free space asked for than any disk has
        storage, extra, message = tmp_path / "runs", ["--min-free-gb", "1e9"], "GiB free"
    ray_sessions = set((Path(os.environ["RAY_TMPDIR"]) / "ray").glob("session_2*"))
    started = time.time()
    result = cli_in_process(["sweep", str(grid), "--storage", str(storage), *extra])
    assert result.returncode == 2
    assert message in result.stderr and str(storage) in result.stderr
    assert not list(storage.glob("stages/*")) and not (storage / "mlflow.db").exists()
    # Refused before Ray start-up (a local Ray leaves a session directory) and training.
    assert set((Path(os.environ["RAY_TMPDIR"]) / "ray").glob("session_2*")) == ray_sessions
    assert time.time() - started < 60
