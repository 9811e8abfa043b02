"""`nptm sweep` end to end: both executors, resume after a killed driver, failures, divergence.

The first test checks the README's path (conftest.tiny_sweep: the `nptm` console script in a
fresh process, which starts and stops its own local Ray). The others run the CLI in this
process, joined to the session's Ray node with `--address` (see conftest.ray_node): the same
code runs in the trials, without a fresh process and 10-15 s of Ray start-up per sweep. Only
the killed driver runs in a process of its own: its death is the subject.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.planner import build_plan
from search_spaces import load_grid
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
    trials,
    write_grid,
)
from trainables.artifacts import ArtifactStore

pytestmark = pytest.mark.slow


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

    storage = copy_storage(storage, tmp_path / "runs")  # the session's copy stays as it was
    uri = f"sqlite:///{storage}/mlflow.db"
    again = sweep_on(ray_node, grid, storage)  # where it runs does not matter: nothing runs
    assert again.returncode == 0, again.stderr[-3000:]
    assert "executed 0" in again.stdout
    assert all(executions(storage, sid) == 1 for sid in stage_ids)  # nothing ran twice
    assert len(trials(storage)) == len(stage_ids)
    assert len(mlflow_stage_runs(uri)) == len(stage_ids)


def test_driver_killed_mid_sweep_then_rerun_completes_without_repeats(
    tiny_sweep, tmp_path: Path, ray_node
) -> None:
    grid = write_grid(tmp_path / "tiny.yaml", pruners=("{name: magnitude, ratio: 0.5}",))
    storage = tmp_path / "runs"
    seed_stages(tiny_sweep.storage, storage, grid)  # a prune and 3 retrains left to run
    proc = subprocess.Popen(
        [*NPTM, "sweep", str(grid), "--storage", str(storage), "--address", ray_node.address,
         "--no-report"],
        cwd=ROOT, env={**ray_node.env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and len(list(storage.glob("stages/*/outcome.json"))) < 3:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # Ray then ends the trials the driver owned
    proc.wait()
    finished_before = {p.parent.name for p in storage.glob("stages/*/outcome.json")}
    assert len(finished_before) >= 3  # the pre-training, the prune, a retrain
    assert len(finished_before) < len(plan_stage_ids(grid)), "the driver died after the sweep"

    rerun = sweep_on(ray_node, grid, storage)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    stage_ids = plan_stage_ids(grid)
    rows = trials(storage)
    assert sorted(rows.stage_id) == sorted(stage_ids) and set(rows.status) == {"ok"}
    assert all(executions(storage, sid) == 1 for sid in finished_before)
    runs = mlflow_stage_runs(f"sqlite:///{storage}/mlflow.db")
    assert sorted(r.data.tags["nptm.stage_id"] for r in runs) == sorted(stage_ids)


def test_train_executor_runs_ddp_workers_and_recomputes_a_damaged_parent(
    tiny_sweep, tmp_path: Path, ray_node
) -> None:
    """A retrain as a two-rank Ray Train group whose parent prune is damaged: a rank finds it
    (Ray reports the rank's exception inside its own error), the prune is recomputed as a Ray
    task, and the retrain runs again. The pre-training and the prune are the session's."""
    grid = write_grid(
        tmp_path / "ddp.yaml", name="ddp", executor="train", workers=2, cpus=0.5,
        pruners=("{name: l1_filter, ratio: 0.5}",), schedules="[ft]", budget="1",
    )  # fmt: skip
    storage = tmp_path / "runs"
    seed_stages(tiny_sweep.storage, storage, grid, kinds=("pretrain", "prune"))
    plan = build_plan(load_grid(grid))
    (prune,) = (sid for sid, spec in plan.stages.items() if spec.kind == "prune")
    (retrain,) = (sid for sid, spec in plan.stages.items() if spec.kind == "retrain")
    model = storage / "stages" / prune / "model.pt"
    model.write_bytes(model.read_bytes()[:100])

    result = sweep_on(ray_node, grid, storage)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = trials(storage, "ddp").set_index("stage_kind")
    assert set(rows.status) == {"ok"}
    assert rows.loc["retrain", "workers"] == 2 and rows.loc["retrain", "executor"] == "train"
    assert rows.loc["prune", "executor"] == "task" and not rows.loc["prune", "reused"]
    assert rows.loc["pretrain", "reused"]
    # prune: the recomputation only; retrain: the refused parent, then the run
    assert executions(storage, prune) == 1 and executions(storage, retrain) == 2
    ArtifactStore(str(storage)).load(prune, "model")  # verifies the checksum again


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
    empty_root = tmp_path / "no-data"
    empty_root.mkdir()
    grid = write_grid(
        tmp_path / "faults.yaml", name="faults", datasets="[digits, cifar10]",
        pruners=("{name: magnitude, ratio: 0.5}",), schedules="[ft]",
        extra="""\
        include:
          - {dataset: digits, model: resnet20, pruner: magnitude, ratio: 0.5, schedule: clr,
             budget: 2, seed: 0, lr: 100000.0}
        """,
    )  # fmt: skip
    storage = tmp_path / "runs"
    # The digits pre-training is the session's (its data is scikit-learn's, not the root's).
    seed_stages(tiny_sweep.storage, storage, grid)
    result = sweep_on(ray_node, grid, storage, "--data-root", str(empty_root), "--max-retries", "0")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "FAILED pretrain" in result.stderr
    rows = trials(storage, "faults")
    cifar = rows[rows.dataset == "cifar10"].set_index("stage_kind")
    assert cifar.loc["pretrain", "status"] == "failed"
    assert "FileNotFoundError" in cifar.loc["pretrain", "error"]
    assert str(empty_root) in cifar.loc["pretrain", "error"]
    assert cifar.loc["prune", "status"] == "skipped"
    assert "failed ancestor" in cifar.loc["prune", "error"]
    assert cifar.loc["retrain", "status"] == "skipped"
    digits = rows[rows.dataset == "digits"]
    diverged = digits[digits.lr_override == 100000.0]
    assert list(diverged.status) == ["diverged"] and "diverged" in diverged.error.iloc[0]
    assert set(digits[digits.lr_override.isna()].status) == {"ok"}
    uri = f"sqlite:///{storage}/mlflow.db"
    runs = {r.data.tags["nptm.stage_id"]: r for r in mlflow_stage_runs(uri, "faults")}
    assert runs[cifar.loc["pretrain", "stage_id"]].info.status == "FAILED"
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
