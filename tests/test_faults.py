"""Fault injection: lost MLflow, damaged artifacts, concurrency, hostile input.

Every slow case runs the real CLI (`nptm sweep ...`, in this process; in a fresh one where a
process is killed) against a real Ray node (the session's `ray_node`) and checks what the sweep
left behind: the Parquet tables, the artifact store (outcomes, checksums, execution markers)
and MLflow. Sweeps start from the session's finished pre-training (`seed_stages`), or from a
copy of its whole tiny sweep (`copy_storage`). The logic of each damaged-artifact case is also
checked at the DagSearcher / run_stage level, below. The other cases of the
fault-injection suite live where their setting is: a killed driver, a failing or diverging
trial and a damaged parent found by Ray Train workers in test_sweep_e2e.py; a lost node in
test_services.py (it needs the two-raylet cluster).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from nptm.orchestrator.cli import main as cli_main
from nptm.orchestrator.trial import stage_id_of
from nptm.trainables.artifacts import ArtifactStore, CorruptArtifactError, rewind_name
from tests.ports import free_port
from tests.sweep_helpers import (
    ROOT,
    MlflowServer,
    copy_storage,
    executions,
    mlflow_stage_runs,
    plan_stage_ids,
    seed_stages,
    sweep_on,
    sweep_with_fault,
    trials,
    watched_concurrency,
    write_grid,
)

MALFORMED = sorted((ROOT / "tests" / "malformed_grids").glob("*.yaml"))
SWEEP_TIMEOUT = 600  # "did not hang" bound for one sweep on a busy 2-core machine
MLFLOW_HTTP_ENV = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)
MAGNITUDE, L1 = "{name: magnitude, ratio: 0.5}", "{name: l1_filter, ratio: 0.5}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """In-process CLI calls: no storage/MLflow/Ray from the environment; MLflow's HTTP
    settings (which the recorder sets process-wide) restored afterwards."""
    for key in ("MLFLOW_TRACKING_URI", "NPTM_STORAGE", "RAY_ADDRESS", *MLFLOW_HTTP_ENV):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def _stage(rows: pd.DataFrame, kind: str, **match) -> pd.Series:
    sel = rows[rows.stage_kind == kind]
    for col, value in match.items():
        sel = sel[sel[col] == value]
    assert len(sel) == 1, (kind, match, sel)
    return sel.iloc[0]


def _sync(capsys, sweep: str, storage: Path, uri: str) -> dict[str, int]:
    rc = cli_main(["sync-mlflow", sweep, "--storage", str(storage), "--mlflow-uri", uri])
    out = capsys.readouterr().out
    assert rc == 0, out
    found = re.search(r"created (\d+), updated (\d+), unchanged (\d+)", out)
    assert found, out
    return dict(zip(("created", "updated", "unchanged"), map(int, found.groups()), strict=True))


def _assert_parquet_complete(storage: Path, sweep: str, grid: Path) -> pd.DataFrame:
    """One untorn row per planned stage, every one ok, and the epochs each stage ran."""
    rows = trials(storage, sweep)
    assert sorted(rows.stage_id) == sorted(plan_stage_ids(grid))
    assert set(rows.status) == {"ok"}, rows[["stage_id", "status", "error"]]
    for path in (storage / "sweeps" / sweep / "stages").iterdir():
        assert not path.name.startswith("."), f"temporary file left behind: {path}"
        table = pq.read_table(path)  # each file reads on its own: nothing torn
        assert table.num_rows == 1 and table["stage_id"][0].as_py() == path.stem
    epochs = pd.read_parquet(storage / "sweeps" / sweep / "epochs")
    assert set(epochs.stage_id) <= set(rows.stage_id)
    for row in rows.itertuples():
        got = sorted(epochs[epochs.stage_id == row.stage_id].epoch)
        want = {"pretrain": row.epochs_run, "prune": 0, "retrain": row.budget_epochs}
        assert got == list(range(1, int(want[row.stage_kind]) + 1)), (row.stage_id, got)
    return rows


# -- 5. hostile input --------------------------------------------------------------------
class _Exploit:
    """Unpickling this runs a shell command (the textbook malicious checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Exploit(marker)}, buf)
    return buf.getvalue()


def test_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path: Path) -> None:
    sid = "feedfacecafebeef"
    marker = tmp_path / "pwned"
    data = _hostile_bytes(marker)
    stage = tmp_path / "runs" / "stages" / sid
    stage.mkdir(parents=True)
    (stage / "model.pt").write_bytes(data)
    (stage / "model.pt.sha256").write_text(hashlib.sha256(data).hexdigest())  # it verifies
    with pytest.raises(CorruptArtifactError, match="refused by safe loader") as err:
        ArtifactStore(str(tmp_path / "runs")).load(sid, "model")
    assert err.value.stage_id == sid
    assert not marker.exists()
    # Control: the same bytes are live, an unsafe load would have run the command.
    control = tmp_path / "control-marker"
    torch.load(io.BytesIO(_hostile_bytes(control)), weights_only=False)
    assert control.exists()


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    calls = []
    for package in ("orchestrator", "trainables", "results", "search_spaces"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"
                ):
                    safe = any(
                        k.arg == "weights_only"
                        and isinstance(k.value, ast.Constant)
                        and k.value.value is True
                        for k in node.keywords
                    )
                    calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", safe))
    assert calls, "the artifact store loads checkpoints with torch.load"
    assert all(safe for _, safe in calls), calls


def test_grid_with_python_object_tag_is_refused_and_runs_nothing(tmp_path, clean_env, capsys):
    marker = tmp_path / "pwned"
    grid = tmp_path / "evil.yaml"
    grid.write_text(
        f'name: !!python/object/apply:os.system ["touch {marker}"]\n'
        "axes: {dataset: [digits], model: [resnet20], pruner: [{name: magnitude, ratio: 0.5}],"
        " schedule: [ft], budget: [2], seed: [0]}\n"
    )
    clean_env.chdir(tmp_path)
    assert cli_main(["validate", str(grid)]) == 2
    err = capsys.readouterr().err
    assert "python/object/apply" in err and str(grid) in err
    assert cli_main(["sweep", str(grid), "--storage", str(tmp_path / "runs")]) == 2
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.yaml"]  # nothing written


def test_sweep_name_escaping_the_storage_root_is_refused(tmp_path, clean_env, capsys) -> None:
    storage = tmp_path / "box" / "runs"
    grid = write_grid(tmp_path / "escape.yaml", name="../escape")
    clean_env.chdir(tmp_path)
    assert cli_main(["sweep", str(grid), "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert "name" in err and "'../escape'" in err
    for argv in (
        ["status", "../escape"],
        ["report", "../escape"],
        ["sync-mlflow", "../escape"],
        ["best", "--sweep", "../escape"],
        ["status", "../../etc"],
    ):
        assert cli_main([*argv, "--storage", str(storage)]) == 2, argv
        assert "sweep name" in capsys.readouterr().err, argv
    # Nothing inside the storage root (it was never created) nor beside it.
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["escape.yaml"]


# -- 6. the malformed-grid corpus --------------------------------------------------------
def test_the_corpus_has_every_file() -> None:
    assert len(MALFORMED) == 41


@pytest.mark.parametrize("path", MALFORMED, ids=[p.stem for p in MALFORMED])
def test_malformed_grid_is_refused_before_anything_is_written(
    path: Path, tmp_path: Path, clean_env, capsys
) -> None:
    import ray

    header = dict(
        line[2:].split(": ", 1)
        for line in path.read_text().splitlines()
        if line.startswith("# expect-")
    )
    field = header["expect-field"].strip()
    storage = tmp_path / "runs"
    clean_env.chdir(tmp_path)  # where an MLflow default (./mlruns, ./mlflow.db) would land
    assert cli_main(["sweep", str(path), "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert field in err, err
    assert str(path) in err
    assert not storage.exists()
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns, no marker file
    assert not ray.is_initialized()  # refused before Ray started


# -- 3 (unit). damaged artifacts never loop or run twice -----------------------------------
def _searcher(grid: Path):
    from nptm.orchestrator.dag_search import DagSearcher
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import load_grid
    from nptm.trainables.stage import StageOutcome

    plan = build_plan(load_grid(grid))
    finished: list[str] = []
    stages = plan.stages
    prune = next(s for s, spec in stages.items() if spec.kind == "prune")
    done = {s for s, spec in stages.items() if spec.kind != "retrain"}
    searcher = DagSearcher(
        stages,
        done,
        resolve=lambda spec, result: StageOutcome(stage_id=spec.id, kind=spec.kind, status="ok"),
        on_finish=lambda spec, outcome: finished.append(spec.id),
    )
    children = [s for s, spec in stages.items() if prune in spec.parents]
    return searcher, prune, children, finished


def test_children_finding_one_damaged_producer_requeue_it_once(tmp_path: Path) -> None:
    grid = write_grid(tmp_path / "g.yaml", pruners=(MAGNITUDE,), schedules="[ft, clr]")
    searcher, prune, children, finished = _searcher(grid)
    assert len(children) == 2
    suggested = {f"t{i}": stage_id_of(searcher.suggest(f"t{i}")) for i in range(2)}
    assert sorted(suggested.values()) == sorted(children)
    first, second = suggested
    searcher.on_trial_complete(first, {"corrupt_parent": prune})
    assert stage_id_of(searcher.suggest("t2")) == prune  # recompute the producer
    # The second child reports the same damage while the producer is being recomputed.
    searcher.on_trial_complete(second, {"corrupt_parent": prune})
    assert searcher.suggest("t3") is None  # no second, concurrent run of the producer
    searcher.on_trial_complete("t2", {"finished": 1})
    again = sorted(stage_id_of(searcher.suggest(t)) for t in ("t4", "t5"))
    assert again == sorted(children)
    for t in ("t4", "t5"):
        searcher.on_trial_complete(t, {"finished": 1})
    assert sorted(finished) == sorted([prune, *children])
    assert searcher.suggest("t6") == "FINISHED"


def test_damaged_own_resume_checkpoint_restarts_the_stage_from_epoch_zero(
    tmp_path: Path, one_thread
) -> None:
    """A stage's own resume.pt that fails its checksum is dropped, not blamed on a parent
    (which would requeue the stage itself, forever)."""
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import load_grid
    from nptm.trainables.stage_runner import WorkerEnv, run_stage

    grid = write_grid(
        tmp_path / "g.yaml", pruners=(MAGNITUDE,), schedules="[ft]",
        pretrain_epochs=2, milestones="[1]",
    )  # fmt: skip
    spec = next(s for s in build_plan(load_grid(grid)).stages.values() if s.kind == "pretrain")
    store = ArtifactStore(str(tmp_path / "runs"))
    store.save(spec.id, "resume", {"epoch": 1, "model": {}})
    resume = tmp_path / "runs" / "stages" / spec.id / "resume.pt"
    resume.write_bytes(resume.read_bytes()[:-7])  # truncated: the checksum no longer matches
    outcome = run_stage(spec, WorkerEnv(storage=str(tmp_path / "runs")))
    assert outcome.status == "ok" and outcome.resumed_from_epoch == 0
    assert [e.epoch for e in outcome.epochs] == [1, 2]
    assert not store.exists(spec.id, "resume") and store.load(spec.id, "model")


def test_a_rewind_epoch_added_later_is_remade_without_pre_training_again(
    tmp_path: Path, one_thread
) -> None:
    """A grid without `wr` pre-trains (keeping no rewind weights); a later grid adds a `wr`
    budget whose rewind epoch that run did not keep. The same pretrain stage then re-makes
    just that checkpoint from its nearest kept state (here: the initial weights, its state
    file deleted), bit-identical on the CPU to the one a run asked for it from the start."""
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import load_grid
    from nptm.trainables.stage_runner import WorkerEnv, kept_state_epochs, run_stage, state_name

    def pretrain_of(schedules: str, name: str):
        grid = write_grid(
            tmp_path / name, pruners=(MAGNITUDE,), schedules=schedules, budget="1",
            pretrain_epochs=2, milestones="[1]",
        )  # fmt: skip
        return next(s for s in build_plan(load_grid(grid)).stages.values() if s.kind == "pretrain")

    first, later = pretrain_of("[ft]", "a.yaml"), pretrain_of("[ft, wr]", "b.yaml")
    assert first.id == later.id and first.keep_epochs == () and later.keep_epochs == (1,)
    assert kept_state_epochs(2) == (1,) and kept_state_epochs(160) == tuple(range(8, 160, 8))

    runs = str(tmp_path / "runs")
    store = ArtifactStore(runs)
    done = run_stage(first, WorkerEnv(storage=runs))
    assert done.status == "ok" and not store.exists(first.id, rewind_name(1))
    store.delete(first.id, state_name(1))  # the state at epoch 1 too: train epoch 0 again
    model_before = store.load(first.id, "model")

    remade = run_stage(later, WorkerEnv(storage=runs))
    assert remade.status == "ok" and remade.rewind_epochs_remade == [1]
    assert remade.test_acc == done.test_acc and remade.epochs == done.epochs
    weights = store.load(later.id, rewind_name(1))["state_dict"]
    for k, v in store.load(first.id, "model")["state_dict"].items():  # the final model is kept
        assert torch.equal(v, model_before["state_dict"][k])

    # Reference: a pre-training that kept epoch 1 from the start, in another storage.
    ref_runs = str(tmp_path / "ref")
    run_stage(later, WorkerEnv(storage=ref_runs))
    reference = ArtifactStore(ref_runs).load(later.id, rewind_name(1))["state_dict"]
    assert reference.keys() == weights.keys()
    for k in reference:
        assert torch.equal(reference[k], weights[k]), k


@pytest.mark.parametrize("kind", ["prune", "retrain"])
def test_a_child_finding_its_parent_damaged_blames_the_parent_and_writes_nothing(
    tmp_path: Path, kind: str
) -> None:
    """What an end-to-end rerun sees when a child loads a truncated parent: the error names
    the producing stage (which the driver then recomputes), and the child leaves no outcome."""
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import load_grid
    from nptm.trainables.stage_runner import WorkerEnv, run_stage

    grid = write_grid(tmp_path / "g.yaml", pruners=(MAGNITUDE,), schedules="[ft]")
    stages = build_plan(load_grid(grid)).stages
    child = next(s for s in stages.values() if s.kind == kind)
    (parent,) = child.parents
    store = ArtifactStore(str(tmp_path / "runs"))
    store.save(parent, "model", {"state_dict": {"w": torch.zeros(4)}, "plans": []})
    model = tmp_path / "runs" / "stages" / parent / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(CorruptArtifactError) as err:
        run_stage(child, WorkerEnv(storage=str(tmp_path / "runs")))
    assert err.value.stage_id == parent
    assert store.read_outcome(child.id) is None and not store.exists(child.id, "model")


def test_a_damaged_parent_found_by_a_ray_train_worker_is_recognised() -> None:
    """Ray Train reports a rank's exception inside a WorkerGroupError; the train executor
    must still see the damaged parent (and requeue it), as the inline executor does."""
    import ray.train

    from nptm.orchestrator.trial import _corrupt_cause

    damaged = CorruptArtifactError("0123456789abcdef", "model", "checksum mismatch")
    wrapped = ray.train.WorkerGroupError("rank 1 failed", {0: RuntimeError("x"), 1: damaged})
    assert _corrupt_cause(wrapped) is damaged
    try:
        raise RuntimeError("outer") from wrapped
    except RuntimeError as outer:
        assert _corrupt_cause(outer) is damaged
    assert _corrupt_cause(ray.train.WorkerGroupError("oom", {0: MemoryError()})) is None


def test_a_damaged_file_handled_on_the_way_is_not_the_cause() -> None:
    """A stage discards its own damaged resume file and goes on; an error after that (here
    while handling it) is the stage's own, never a damaged parent to requeue."""
    from nptm.orchestrator.trial import _corrupt_cause

    try:
        try:
            raise CorruptArtifactError("0123456789abcdef", "resume", "missing")
        except CorruptArtifactError:
            raise OSError("write refused") from None
    except OSError as later:
        assert later.__context__ is not None and _corrupt_cause(later) is None


def test_a_damaged_parent_found_by_a_prune_task_is_recognised() -> None:
    """A prune stage of a `train` sweep runs as a Ray task: `ray.get` raises Ray's
    RayTaskError(CorruptArtifactError) wrapper, and the original must come out of it."""
    from ray.exceptions import RayTaskError

    from nptm.orchestrator.trial import _corrupt_cause

    damaged = CorruptArtifactError("0123456789abcdef", "model", "checksum mismatch")
    wrapped = RayTaskError("_prune_task", "traceback", damaged).as_instanceof_cause()
    assert isinstance(wrapped, CorruptArtifactError) and wrapped is not damaged
    assert _corrupt_cause(wrapped) is damaged
    assert _corrupt_cause(RayTaskError("_prune_task", "tb", KeyError("x"))) is None


# -- 2. MLflow down from the start -------------------------------------------------------
@pytest.fixture(scope="module")
def down_sweep(tmp_path_factory, ray_node, tiny_sweep) -> SimpleNamespace:
    """A finished sweep (pre-training reused, a prune and a retrain run) whose MLflow server
    never answered."""
    tmp = tmp_path_factory.mktemp("down")
    grid = write_grid(tmp / "down.yaml", name="down", pruners=(MAGNITUDE,), schedules="[ft]")
    storage = tmp / "runs"
    seed_stages(tiny_sweep.storage, storage, grid)
    uri = f"http://127.0.0.1:{free_port()}"
    result = sweep_on(ray_node, grid, storage, "--mlflow-uri", uri)
    return SimpleNamespace(tmp=tmp, grid=grid, storage=storage, uri=uri, result=result)


@pytest.mark.slow
def test_mlflow_down_from_the_start_then_sync_restores_every_run(
    down_sweep, mlflow_server, clean_env, capsys
):
    result, storage, grid = down_sweep.result, down_sweep.storage, down_sweep.grid
    assert result.returncode == 0, result.stderr[-3000:]
    # One warning while it happened, one reminder at the end; not one per stage.
    assert result.stderr.count(f"MLflow at {down_sweep.uri} failed") == 1, result.stderr[-3000:]
    assert result.stderr.count("warning: MLflow was unreachable") == 1
    rows = _assert_parquet_complete(storage, "down", grid)
    assert len(rows) == 3 and rows.mlflow_run_id.isna().all()
    assert not (storage / "mlflow.db").exists()  # the given URI was used, not a fallback

    uri = mlflow_server.wait()  # restored over HTTP, into a server that never saw the sweep
    n = len(rows)
    assert _sync(capsys, "down", storage, uri) == {"created": n, "updated": 0, "unchanged": 0}
    runs = mlflow_stage_runs(uri, "down")
    assert sorted(r.data.tags["nptm.stage_id"] for r in runs) == sorted(rows.stage_id)
    by_id = rows.set_index("stage_id")
    for run in runs:
        row = by_id.loc[run.data.tags["nptm.stage_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["nptm.stage_kind"] == row.stage_kind
        if row.stage_kind != "prune":
            assert run.data.metrics["summary/test_acc"] == pytest.approx(row.test_acc)
    assert _sync(capsys, "down", storage, uri) == {"created": 0, "updated": 0, "unchanged": n}
    assert len(mlflow_stage_runs(uri, "down")) == n


# -- 3. damaged artifacts after a finished sweep -----------------------------------------
@pytest.fixture(scope="module")
def damaged_rerun(tiny_sweep, ray_node, tmp_path_factory) -> SimpleNamespace:
    """A copy of the session's finished tiny sweep, damaged three ways, then swept again.

    magnitude prune: model.pt truncated, and its `ft` child's outcome deleted (so it runs);
    l1 `ft` retrain: outcome.json garbled (not even UTF-8);
    l1 `clr` retrain: outcome deleted and a truncated resume.pt left behind.
    """
    assert tiny_sweep.result.returncode == 0, tiny_sweep.result.stderr[-3000:]
    storage = copy_storage(tiny_sweep.storage, tmp_path_factory.mktemp("damaged") / "runs")
    rows = trials(storage)
    store = ArtifactStore(str(storage))
    prune = _stage(rows, "prune", pruner="magnitude").stage_id
    child = _stage(rows, "retrain", pruner="magnitude", schedule="ft").stage_id
    sibling = _stage(rows, "retrain", pruner="magnitude", schedule="clr").stage_id
    garbled = _stage(rows, "retrain", pruner="l1_filter", schedule="ft").stage_id
    resumed = _stage(rows, "retrain", pruner="l1_filter", schedule="clr").stage_id
    before = {sid: json.loads((storage / "stages" / sid / "outcome.json").read_text())
              for sid in rows.stage_id}  # fmt: skip
    original_prune = store.load(prune, "model")

    model = storage / "stages" / prune / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    (storage / "stages" / child / "outcome.json").unlink()
    (storage / "stages" / garbled / "outcome.json").write_bytes(b"\x80\x81\xfe garbage {")
    (storage / "stages" / resumed / "outcome.json").unlink()
    store.save(resumed, "resume", {"epoch": 1, "model": {}})
    resume = storage / "stages" / resumed / "resume.pt"
    resume.write_bytes(resume.read_bytes()[:-9])

    result = sweep_on(ray_node, tiny_sweep.grid, storage)
    return SimpleNamespace(
        storage=storage, grid=tiny_sweep.grid, result=result, rows=rows, before=before,
        prune=prune, child=child, sibling=sibling, garbled=garbled, resumed=resumed,
        original_prune=original_prune,
    )  # fmt: skip


def _same(a, b) -> bool:
    """Deep equality of payloads that hold tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _rerun_ok(d: SimpleNamespace) -> pd.DataFrame:
    assert d.result.returncode == 0, d.result.stderr[-3000:]
    return _assert_parquet_complete(d.storage, "tiny", d.grid)


@pytest.mark.slow
def test_truncated_prune_model_is_detected_and_recomputed(damaged_rerun) -> None:
    d = damaged_rerun
    rows = _rerun_ok(d).set_index("stage_id")
    store = ArtifactStore(str(d.storage))
    # The child found the checksum mismatch, the prune ran again (once), then the child.
    assert executions(d.storage, d.prune) == 2
    assert executions(d.storage, d.child) == 3  # first sweep, refused attempt, real run
    assert executions(d.storage, d.sibling) == 1  # finished before: not touched
    # No garbage propagated: the recomputed artifact verifies and equals the original.
    reloaded = store.load(d.prune, "model")
    for key, tensor in d.original_prune["state_dict"].items():
        assert torch.equal(reloaded["state_dict"][key], tensor), key
    assert _same(store.load(d.child, "model")["plans"], reloaded["plans"])
    after = store.read_outcome(d.prune)
    assert after.ended_at > d.before[d.prune]["ended_at"]
    assert rows.loc[d.child, "acc_after_prune"] == pytest.approx(after.acc_after_prune)


@pytest.mark.slow
def test_garbled_outcome_reruns_only_that_stage(damaged_rerun) -> None:
    d = damaged_rerun
    _rerun_ok(d)
    outcome = ArtifactStore(str(d.storage)).read_outcome(d.garbled)
    assert outcome is not None and outcome.status == "ok"
    assert outcome.ended_at > d.before[d.garbled]["ended_at"]
    assert executions(d.storage, d.garbled) == 2
    untouched = set(d.rows.stage_id) - {d.prune, d.child, d.garbled, d.resumed}
    assert {sid: executions(d.storage, sid) for sid in untouched} == dict.fromkeys(untouched, 1)


@pytest.mark.slow
def test_truncated_resume_checkpoint_restarts_from_epoch_zero(damaged_rerun) -> None:
    d = damaged_rerun
    _rerun_ok(d)
    outcome = ArtifactStore(str(d.storage)).read_outcome(d.resumed)
    assert outcome.status == "ok" and outcome.resumed_from_epoch == 0
    assert [e.epoch for e in outcome.epochs] == [1, 2]
    assert executions(d.storage, d.resumed) == 2  # no requeue loop: one more run
    assert not (d.storage / "stages" / d.resumed / "resume.pt").exists()


# -- 4. many stages at once, and the MLflow server dies among them -----------------------
@pytest.mark.slow
def test_eight_stages_four_at_once_lose_no_rows_when_the_mlflow_server_dies(
    tmp_path: Path, clean_env, capsys, ray_node, tiny_sweep
) -> None:
    """Eight retrains are runnable at once (the session's two prunes, four schedules, one
    epoch each) with four slots of 0.5 CPU on 2 cores, more than the cores; the searcher and
    Tune's trial table are watched. The sweep records into an `mlflow server` over HTTP that
    is SIGKILLed once a retrain has landed, while the others run or wait: the sweep completes
    on Parquet and warns once, and `nptm sync-mlflow` fills what the dead server missed
    without duplicating what it had.

    (How many of the four then run physically at the same moment depends on how fast the
    machine boots Tune's worker processes; that is not asserted here.)"""
    grid = write_grid(
        tmp_path / "conc.yaml", name="conc", pruners=(MAGNITUDE, L1),
        schedules="[ft, slr, clr, scratch]", budget="1", cpus=0.5, max_concurrent=4,
    )  # fmt: skip
    storage = tmp_path / "runs"
    seed_stages(tiny_sweep.storage, storage, grid, kinds=("pretrain", "prune"))
    db = tmp_path / "mlflow-server.db"
    rows_dir = storage / "sweeps" / "conc" / "stages"
    n = len(plan_stage_ids(grid))
    with MlflowServer(db, tmp_path / "mlflow.log") as server, watched_concurrency() as peak:
        uri = server.wait()
        recorded = []

        def kill_server() -> None:
            # Rows on disk just before the kill and just after it: whatever lands between the
            # two counts (a loaded machine stretches that) is covered by one bound or the other.
            recorded.append(len(list(rows_dir.glob("*.parquet"))))
            server.kill()
            recorded.append(len(list(rows_dir.glob("*.parquet"))))

        result = sweep_with_fault(
            ray_node, grid, storage, "--mlflow-uri", uri, fault=kill_server,
            # the 3 reused stages, and a retrain that ran
            ready=lambda: len(list(rows_dir.glob("*.parquet"))) >= 4,
        )  # fmt: skip
    recorded_before_kill, recorded_at_kill = recorded
    assert 4 <= recorded_before_kill <= recorded_at_kill < n, "the server must die mid-sweep"
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(f"MLflow at {uri} failed") == 1, result.stderr[-3000:]
    rows = _assert_parquet_complete(storage, "conc", grid)
    retrain = rows[rows.stage_kind == "retrain"]
    assert len(retrain) == 8
    assert peak["handed_out"] == 4, peak  # a retrain in each slot at once
    print(f"concurrency: {peak}")
    # Parquet comes first, one stage at a time (the driver is the single writer): of the rows
    # on disk before the kill, only the one it was landing may still lack its MLflow run.
    assert rows.mlflow_run_id.notna().sum() >= recorded_before_kill - 1

    # What the dead server stored, read from its store directly (sqlite, as a restarted
    # server would serve it; tracking over HTTP is test_mlflow_down_from_the_start's).
    uri2 = f"sqlite:///{db}"
    counts = _sync(capsys, "conc", storage, uri2)
    assert counts["created"] + counts["updated"] + counts["unchanged"] == n
    # What the dead server missed: every stage that landed after the kill, as a run it never
    # saw (created) or one it saw start but not end (updated; the live view opens each run as
    # its stage starts).
    assert counts["created"] + counts["updated"] >= n - recorded_at_kill
    # what it had is not duplicated (all but, at most, the row in flight at the kill)
    assert counts["unchanged"] >= recorded_before_kill - 1
    runs = {r.data.tags["nptm.stage_id"]: r for r in mlflow_stage_runs(uri2, "conc")}
    assert sorted(runs) == sorted(rows.stage_id)
    assert _sync(capsys, "conc", storage, uri2)["created"] == 0
    assert len(mlflow_stage_runs(uri2, "conc")) == n

    import mlflow

    # Every retrain's run, recorded live or filled by the sync, is finished and holds the
    # epochs table's history of each metric.
    epochs = pd.read_parquet(storage / "sweeps" / "conc" / "epochs")
    client = mlflow.MlflowClient(uri2)
    for row in retrain.itertuples():
        run = runs[row.stage_id]
        assert run.info.status == "FINISHED"
        if isinstance(row.mlflow_run_id, str):  # recorded before the kill: the same run
            assert run.info.run_id == row.mlflow_run_id
        want = epochs[epochs.stage_id == row.stage_id].sort_values("epoch")
        for metric in ("train_loss", "val_acc", "lr"):
            history = sorted(client.get_metric_history(run.info.run_id, f"epoch/{metric}"),
                             key=lambda m: m.step)  # fmt: skip
            assert [m.step for m in history] == list(want.epoch), (row.stage_id, metric)
            assert [m.value for m in history] == pytest.approx(list(want[metric]))
