"""Corruption corpus: every stored file nptm reads, damaged every way, and what its reader does.

A damaged file costs its stage, never the sweep. The files: the per-stage Parquet files of
both tables, the two table snapshots, the outcome index, each stage's outcome.json and
payloads (.pt), and the run record's progress.json and plan.json. The damages: truncated to
half, emptied, garbled (a quarter of its bytes flipped), replaced by another stage's (or
sweep's) file, and replaced by a valid file of the wrong shape (a Parquet file of another
schema, JSON that is not what belongs there).

Reader level (no Ray), on copies of the session's finished tiny sweep: the store skips a damaged
per-stage file with a warning and lists it (`SweepStore.skipped`); the driver's read
(`intact_stage_ids`) sets it aside and leaves its stage out; a damaged snapshot is skipped and
replaced by the next compaction; a damaged index file is set aside and its stages read from
their outcomes; a damaged or foreign outcome is set aside and its stage counts as not done; a
damaged payload is refused naming its stage; `nptm status` and `nptm report` say what they
skipped. Sweep level: one rerun of a copy damaged in every way at once (different stages,
different damages) ends with exactly the undamaged run's rows.

Every test here waits for the session's tiny sweep (a process of its own), hence `slow`.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nptm.orchestrator.planner import build_plan
from nptm.results.run_record import PLAN_FILE, PROGRESS_FILE, RunRecord
from nptm.results.status import render_status, sweep_status
from nptm.results.store import SweepStore
from nptm.search_spaces import load_grid
from nptm.trainables.artifacts import MODEL, ArtifactStore, CorruptArtifactError
from nptm.trainables.layout import Layout
from nptm.trainables.stage_index import ENTRY_SCHEMA, OUTCOME_FILE, StageIndex
from tests.sweep_helpers import cli_in_process, copy_storage, sweep_on

pytestmark = pytest.mark.slow

SWEEP = "tiny"
DAMAGES = ("truncated", "empty", "garbled", "foreign", "wrong_schema")


# -- the undamaged run, and how to damage a copy of it ---------------------------------------
@pytest.fixture(scope="module")
def clean(tiny_sweep) -> SimpleNamespace:
    """The finished tiny sweep as it stands: its rows, epochs and outcomes, and which stage is
    which (pretrain; magnitude / l1 prunes; their ft / clr / wr retrains)."""
    assert tiny_sweep.result.returncode == 0, tiny_sweep.result.stderr[-3000:]
    storage = tiny_sweep.storage
    store = SweepStore(storage, SWEEP)
    stages, epochs = store.read_stages(), store.read_epochs()
    assert not store.skipped and len(stages) == 9
    plan = build_plan(load_grid(tiny_sweep.grid)).stages
    assert sorted(plan) == sorted(stages.stage_id)

    def one(kind: str, **match: str) -> str:
        sel = stages[stages.stage_kind == kind]
        for column, value in match.items():
            sel = sel[sel[column] == value]
        assert len(sel) == 1, (kind, match)
        return sel.stage_id.iloc[0]

    ids = SimpleNamespace(
        pretrain=one("pretrain"),
        prune_m=one("prune", pruner="magnitude"),
        prune_l=one("prune", pruner="l1_filter"),
        **{
            f"{p}_{s}": one("retrain", pruner=pruner, schedule=s)
            for p, pruner in (("m", "magnitude"), ("l", "l1_filter"))
            for s in ("ft", "clr", "wr")
        },
    )
    outcomes = {sid: (storage / "stages" / sid / OUTCOME_FILE).read_bytes() for sid in plan}
    return SimpleNamespace(
        storage=storage, grid=tiny_sweep.grid, stages=stages, epochs=epochs, plan=plan,
        ids=ids, outcomes=outcomes,
    )  # fmt: skip


def copy_tables(clean: SimpleNamespace, dest: Path) -> Path:
    """The sweep's tables and run record (no report, no stages, no MLflow): all `nptm status`
    and the store read."""
    shutil.copytree(
        clean.storage / "sweeps" / SWEEP,
        dest / "sweeps" / SWEEP,
        ignore=shutil.ignore_patterns("report"),
    )
    return dest


def copy_outcomes(clean: SimpleNamespace, dest: Path) -> Path:
    """Every stage's outcome and the outcome index, without the payloads."""
    shutil.copytree(
        clean.storage / "stages", dest / "stages", ignore=shutil.ignore_patterns("*.pt*")
    )
    return dest


def damage(path: Path, how: str, *, other: Path | None = None, wrong: bytes = b"") -> None:
    """Damage the file `how`: "truncated" (to half), "empty", "garbled" (its second quarter's
    bits flipped), "foreign" (`other`'s bytes), "wrong_schema" (`wrong`)."""
    data = path.read_bytes()
    n = len(data)
    if how == "truncated":
        data = data[: n // 2]
    elif how == "empty":
        data = b""
    elif how == "garbled":
        data = data[: n // 4] + bytes(b ^ 0xFF for b in data[n // 4 : n // 2]) + data[n // 2 :]
    elif how == "foreign":
        assert other is not None and other.read_bytes() != data
        data = other.read_bytes()
    elif how == "wrong_schema":
        assert wrong
        data = wrong
    else:
        raise ValueError(how)
    path.write_bytes(data)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def plain_table(stage_id: str) -> bytes:
    """A valid Parquet file a user might leave there: right names, not nptm's table."""
    return parquet_bytes(pa.table({"sweep": [SWEEP], "stage_id": [stage_id], "test_acc": [0.5]}))


def set_aside(path: Path) -> list[Path]:
    """What `path` was set aside as (trainables.storage.set_aside)."""
    return sorted(path.parent.glob(f"_{path.name}.damaged-*"))


def same_rows(got: pd.DataFrame, want: pd.DataFrame, columns=("stage_id", "test_acc")) -> None:
    key = ["stage_id"] + (["epoch"] if "epoch" in want.columns else [])
    got = got.sort_values(key).reset_index(drop=True)[list(columns)]
    want = want.sort_values(key).reset_index(drop=True)[list(columns)]
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


# -- per-stage Parquet files -----------------------------------------------------------------
@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("table", ["stages", "epochs"])
def test_a_damaged_per_stage_file_costs_its_stage_only(
    clean, tmp_path: Path, table: str, how: str, caplog, clean_env
) -> None:
    storage = copy_tables(clean, tmp_path)
    sid, other = clean.ids.m_clr, clean.ids.m_wr
    sweep = storage / "sweeps" / SWEEP
    path = sweep / table / f"{sid}.parquet"
    damage(path, how, other=sweep / table / f"{other}.parquet", wrong=plain_table(sid))

    # Readers: every other stage's rows as stored, this one's skipped (and left in place).
    store = SweepStore(storage, SWEEP)
    with caplog.at_level(logging.WARNING):
        got = store.read_stages() if table == "stages" else store.read_epochs()
    want = clean.stages if table == "stages" else clean.epochs
    same_rows(got, want[want.stage_id != sid])
    assert [(d.file, d.stage_id) for d in store.skipped] == [(str(path), sid)]
    assert str(path) in caplog.text and path.is_file() and not set_aside(path)
    if table == "stages":  # `nptm status` reads the stages table; it names what it skipped
        status = sweep_status(store)
        assert [s["file"] for s in status["skipped"]] == [str(path)]
        assert status["plan"]["done"] == 8
        assert f"skipped {path}: " in render_status(status)
    # `nptm report` reads both tables: it completes without the stage, and says so.
    report = cli_in_process(
        ["report", SWEEP, "--storage", str(storage), "--out", str(tmp_path / "r")]
    )
    assert report.returncode == 0 and f"skipped {path}: " in report.stdout, report.stderr[-3000:]
    assert path.is_file()  # readers move nothing

    # The driver: sets it aside, and leaves the stage out of the rows to keep.
    driver = SweepStore(storage, SWEEP)
    assert driver.intact_stage_ids() == sorted(set(clean.plan) - {sid})
    assert not path.exists() and len(set_aside(path)) == 1
    assert driver.skipped[0].moved_to == str(set_aside(path)[0])
    # Set aside, it is out of every reader's way, pyarrow's dataset discovery included.
    assert not SweepStore(storage, SWEEP).skipped
    same_rows(pd.read_parquet(sweep / table), want[want.stage_id != sid])


# -- snapshots -------------------------------------------------------------------------------
@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("table", ["stages", "epochs"])
def test_a_damaged_snapshot_is_skipped_then_replaced(
    clean, tmp_path: Path, table: str, how: str, caplog
) -> None:
    storage = copy_tables(clean, tmp_path)
    sweep = storage / "sweeps" / SWEEP
    path = sweep / f"{table}.parquet"
    other_table = "epochs" if table == "stages" else "stages"
    # foreign: one stage's file in the snapshot's place; wrong schema: the other snapshot
    foreign = sweep / table / f"{clean.ids.m_ft}.parquet"
    damage(path, how, other=foreign, wrong=(sweep / f"{other_table}.parquet").read_bytes())

    store = SweepStore(storage, SWEEP)
    with caplog.at_level(logging.WARNING):
        got = store.read_stages() if table == "stages" else store.read_epochs()
    same_rows(got, clean.stages if table == "stages" else clean.epochs)  # from the stage files
    assert [d.file for d in store.skipped] == [str(path)]
    assert store.skipped[0].moved_to is None and str(path) in caplog.text
    if table == "stages":
        assert [s["file"] for s in sweep_status(store)["skipped"]] == [str(path)]
    # The next compaction replaces it; then it reads clean.
    store.compact()
    again = SweepStore(storage, SWEEP)
    same_rows(again.read_stages(), clean.stages)
    same_rows(again.read_epochs(), clean.epochs)
    assert not again.skipped
    assert pq.read_table(path).num_rows == len(clean.stages if table == "stages" else clean.epochs)


# -- outcome index ----------------------------------------------------------------------------
@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_index_file_is_set_aside_and_its_outcomes_read(
    clean, tmp_path: Path, how: str, caplog
) -> None:
    storage = copy_outcomes(clean, tmp_path)
    index_dir = storage / "stages" / "_index"
    # One file to damage: a sweep slower than the index's flush interval (a loaded machine)
    # leaves several, which consolidation merges into one base file.
    StageIndex(Layout(str(storage))).consolidate()
    (path,) = sorted(index_dir.glob("*.parquet"))
    if how == "foreign":
        # A valid index file whose entries carry other stages' outcomes (under the right
        # stamps): newer than the real one, it would win, were outcomes not checked.
        entries = StageIndex(Layout(str(storage))).entries()
        ids = sorted(entries)
        rotated = ids[1:] + ids[:1]
        table = pa.table(
            {
                "stage_id": ids,
                "at_ns": [entries[s].at_ns + 1 for s in ids],
                "size": [entries[s].stamp.size for s in ids],
                "mtime_ns": [entries[s].stamp.mtime_ns for s in ids],
                "outcome": [entries[s].outcome for s in rotated],
            },
            schema=ENTRY_SCHEMA,
        )
        path = index_dir / "part-99999999999999999999-ffffffff.parquet"
        path.write_bytes(parquet_bytes(table))
    else:
        wrong = parquet_bytes(pa.table({"stage_id": ["x"], "outcome": ["{}"]}))
        damage(path, how, wrong=wrong)

    store = ArtifactStore(str(storage))
    with caplog.at_level(logging.WARNING):
        found, _ = store.stored_outcomes(clean.plan)
    # Every outcome as stored, each its own stage's.
    assert {sid: o.stage_id for sid, o in found.items()} == {sid: sid for sid in clean.plan}
    for sid, outcome in found.items():
        assert outcome.test_acc == json.loads(clean.outcomes[sid])["test_acc"]
    if how == "foreign":
        assert "stage index entry" in caplog.text  # the entries were not used
    else:
        assert not path.exists() and len(set_aside(path)) == 1
        assert [d.file for d in store.damaged] == [str(path)] and str(path) in caplog.text
    again = ArtifactStore(str(storage))
    assert again.stored_outcomes(clean.plan)[0] == found and not again.damaged


# -- outcome.json ----------------------------------------------------------------------------
@pytest.mark.parametrize("how", [*DAMAGES, "other_kind"])
def test_a_damaged_or_foreign_outcome_is_set_aside_and_its_stage_not_done(
    clean, tmp_path: Path, how: str, caplog
) -> None:
    storage = copy_outcomes(clean, tmp_path)
    sid, sibling = clean.ids.l_wr, clean.ids.l_ft
    path = storage / "stages" / sid / OUTCOME_FILE
    if how == "other_kind":  # its own id, another kind than the plan's stage
        path.write_text(json.dumps({**json.loads(clean.outcomes[sid]), "kind": "prune"}))
    else:
        plan_json = (clean.storage / "sweeps" / SWEEP / "run" / PLAN_FILE).read_bytes()
        damage(path, how, other=storage / "stages" / sibling / OUTCOME_FILE, wrong=plan_json)

    store = ArtifactStore(str(storage))
    with caplog.at_level(logging.WARNING):
        found, _ = store.stored_outcomes(clean.plan)
    assert sorted(found) == sorted(set(clean.plan) - {sid})  # not done: it runs again
    assert [(d.file, d.stage_id) for d in store.damaged] == [(str(path), sid)]
    assert not path.exists() and len(set_aside(path)) == 1 and str(path) in caplog.text
    if how == "foreign":
        assert f"the outcome of stage {sibling}, not of {sid}" in caplog.text
    assert ArtifactStore(str(storage)).read_outcome(sid) is None


def test_read_outcome_refuses_another_stages_outcome(clean, tmp_path: Path) -> None:
    """What a stage reads of its parent, or the driver of a stage that ended."""
    storage = copy_outcomes(clean, tmp_path)
    sid, sibling = clean.ids.l_wr, clean.ids.l_ft
    path = storage / "stages" / sid / OUTCOME_FILE
    damage(path, "foreign", other=storage / "stages" / sibling / OUTCOME_FILE)
    store = ArtifactStore(str(storage))
    assert store.read_outcome(sid) is None and len(set_aside(path)) == 1
    assert store.read_outcome(sibling).stage_id == sibling


# -- payloads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_payload_is_refused_naming_its_stage(clean, tmp_path: Path, how: str) -> None:
    sid, other = clean.ids.prune_m, clean.ids.prune_l
    for stage in (sid, other):
        shutil.copytree(clean.storage / "stages" / stage, tmp_path / "stages" / stage)
    path = tmp_path / "stages" / sid / f"{MODEL}.pt"
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}}, buf)  # a valid payload, not this one
    damage(path, how, other=tmp_path / "stages" / other / f"{MODEL}.pt", wrong=buf.getvalue())
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(CorruptArtifactError) as refused:
        store.load(sid, MODEL)
    assert refused.value.stage_id == sid and "checksum mismatch" in refused.value.reason
    assert store.load(other, MODEL)["state_dict"]  # the other stage's still loads


# -- run record -------------------------------------------------------------------------------
@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", [PROGRESS_FILE, PLAN_FILE])
def test_a_damaged_run_record_file_is_skipped_by_status(
    clean, tmp_path: Path, name: str, how: str, caplog
) -> None:
    storage = copy_tables(clean, tmp_path)
    run = storage / "sweeps" / SWEEP / "run"
    path = run / name
    other_sweep = run / f"other-{name}"
    other_sweep.write_text(json.dumps({**json.loads(path.read_bytes()), "sweep": "other"}))
    wrong = (run / (PLAN_FILE if name == PROGRESS_FILE else PROGRESS_FILE)).read_bytes()
    damage(path, how, other=other_sweep, wrong=wrong)

    store = SweepStore(storage, SWEEP)
    with caplog.at_level(logging.WARNING):
        status = sweep_status(store)
    assert [s["file"] for s in status["skipped"]] == [str(path)] and name in caplog.text
    text = render_status(status)
    assert f"skipped {path}: " in text
    if name == PLAN_FILE:  # the stored stages are still counted
        assert status["plan"] is None and "9 stages stored" in text
    else:  # the plan is still followed; only the driver's state is unknown
        assert status["plan"]["done"] == 9 and "driver: no progress recorded" in text
    assert path.is_file()  # left for the next sweep to write anew
    assert not RunRecord(store.layout, SWEEP).damaged


# -- nptm status and nptm report ---------------------------------------------------------------
def test_status_and_report_name_every_file_they_skipped(clean, tmp_path: Path, clean_env) -> None:
    """The command line, on a copy damaged every way a table reader meets: both commands
    complete and print a line naming each file they skipped."""
    storage = copy_tables(clean, tmp_path)
    sweep = storage / "sweeps" / SWEEP
    ids = clean.ids
    damaged = {
        "stages_file": sweep / "stages" / f"{ids.prune_l}.parquet",
        "epochs_file": sweep / "epochs" / f"{ids.l_clr}.parquet",
        "stages_snapshot": sweep / "stages.parquet",
        "epochs_snapshot": sweep / "epochs.parquet",
        "progress": sweep / "run" / PROGRESS_FILE,
    }
    damage(damaged["stages_file"], "truncated")
    damage(damaged["epochs_file"], "garbled")
    damage(damaged["stages_snapshot"], "empty")
    damage(damaged["epochs_snapshot"], "wrong_schema", wrong=plain_table(ids.l_clr))
    damage(damaged["progress"], "garbled")

    status = cli_in_process(["status", SWEEP, "--storage", str(storage)])
    assert status.returncode == 0, status.stderr[-3000:]
    for key in ("stages_file", "stages_snapshot", "progress"):  # what status reads
        assert f"skipped {damaged[key]}: " in status.stdout, (key, status.stdout)
    assert "8 of 9 planned stages done" in status.stdout
    as_json = json.loads(
        cli_in_process(["status", SWEEP, "--storage", str(storage), "--json"]).stdout
    )
    assert len(as_json["skipped"]) == 3

    report = cli_in_process(["report", SWEEP, "--storage", str(storage)])
    assert report.returncode == 0, report.stderr[-3000:]
    for key in ("stages_file", "epochs_file", "stages_snapshot", "epochs_snapshot"):
        assert f"skipped {damaged[key]}: " in report.stdout, (key, report.stdout)
    # Readers move nothing: the next sweep does.
    assert all(path.is_file() for path in damaged.values())


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in ("MLFLOW_TRACKING_URI", "NPTM_STORAGE", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


# -- one rerun, every damage at once -----------------------------------------------------------
@pytest.fixture(scope="module")
def damaged_rerun(clean, ray_node, tmp_path_factory) -> SimpleNamespace:
    """A copy of the finished tiny sweep, damaged in every file kind, each stage its own way,
    then swept again (one sweep):

    - l1 prune's stage row truncated; the pre-training's epochs emptied;
    - magnitude `clr`'s stage row replaced by magnitude `wr`'s; magnitude `wr`'s epochs a
      Parquet file of another schema; l1 `clr`'s epochs garbled;
    - the stages snapshot garbled, the epochs snapshot one stage's epochs file;
    - the outcome index truncated;
    - l1 `wr`'s outcome replaced by l1 `ft`'s (the attack's case: it must not be stored as
      `wr`'s row);
    - magnitude prune's model.pt garbled, and its `ft` child's outcome truncated (so the
      child runs, finds its parent damaged, and the prune is recomputed);
    - progress.json garbled, plan.json emptied.
    """
    storage = copy_storage(clean.storage, tmp_path_factory.mktemp("corrupt") / "runs")
    sweep, stages, ids = storage / "sweeps" / SWEEP, storage / "stages", clean.ids
    files = {
        "stages/truncated": sweep / "stages" / f"{ids.prune_l}.parquet",
        "epochs/empty": sweep / "epochs" / f"{ids.pretrain}.parquet",
        "stages/foreign": sweep / "stages" / f"{ids.m_clr}.parquet",
        "epochs/wrong_schema": sweep / "epochs" / f"{ids.m_wr}.parquet",
        "epochs/garbled": sweep / "epochs" / f"{ids.l_clr}.parquet",
        "outcome/foreign": stages / ids.l_wr / OUTCOME_FILE,
        "outcome/truncated": stages / ids.m_ft / OUTCOME_FILE,
        "index/truncated": sorted((stages / "_index").glob("*.parquet"))[0],
        "payload/garbled": stages / ids.prune_m / f"{MODEL}.pt",
    }
    damage(files["stages/truncated"], "truncated")
    damage(files["epochs/empty"], "empty")
    damage(files["stages/foreign"], "foreign", other=sweep / "stages" / f"{ids.m_wr}.parquet")
    damage(files["epochs/wrong_schema"], "wrong_schema", wrong=plain_table(ids.m_wr))
    damage(files["epochs/garbled"], "garbled")
    damage(sweep / "stages.parquet", "garbled")
    damage(sweep / "epochs.parquet", "foreign", other=sweep / "epochs" / f"{ids.m_ft}.parquet")
    damage(files["index/truncated"], "truncated")
    damage(files["outcome/foreign"], "foreign", other=stages / ids.l_ft / OUTCOME_FILE)
    damage(files["outcome/truncated"], "truncated")
    damage(files["payload/garbled"], "garbled")
    damage(sweep / "run" / PROGRESS_FILE, "garbled")
    damage(sweep / "run" / PLAN_FILE, "empty")

    result = sweep_on(ray_node, clean.grid, storage)
    return SimpleNamespace(storage=storage, result=result, files=files, node=ray_node)


def test_one_rerun_repairs_every_damage_at_once(clean, damaged_rerun) -> None:
    d, ids = damaged_rerun, clean.ids
    assert d.result.returncode == 0, d.result.stderr[-5000:]
    sweep = d.storage / "sweeps" / SWEEP
    # Exactly one row per planned stage, each as the undamaged run stored it.
    rows = pd.read_parquet(sweep / "stages")  # pyarrow's discovery skips what was set aside
    assert sorted(rows.stage_id) == sorted(clean.plan)
    same_rows(rows, clean.stages, columns=("stage_id", "stage_kind", "status", "test_acc"))
    store = SweepStore(d.storage, SWEEP)
    same_rows(store.read_stages(), clean.stages)
    same_rows(store.read_epochs(), clean.epochs, columns=("stage_id", "epoch", "test_acc", "lr"))
    assert not store.skipped
    # l1 `wr` ran again: its row holds its own curve, not `ft`'s.
    wr = store.read_epochs().query("stage_id == @ids.l_wr")
    ft = clean.epochs.query("stage_id == @ids.l_ft")
    assert wr.lr.tolist() != ft.lr.tolist()
    # Rows re-derived from their outcomes, stages run again.
    reused = rows.set_index("stage_id").reused
    for sid in (ids.prune_l, ids.pretrain, ids.m_clr, ids.m_wr, ids.l_clr):
        assert reused[sid], sid
    for sid in (ids.l_wr, ids.m_ft, ids.prune_m):
        assert not reused[sid], sid
    # Every damaged file kept aside for a human, and named in a warning.
    for key, path in d.files.items():
        if key == "payload/garbled":  # overwritten by the recomputed prune
            continue
        assert set_aside(path), key
        assert str(path) in d.result.stderr, key
    # The run record is whole again, and status reads it.
    status = sweep_status(store)
    assert status["plan"]["done"] == 9 and status["plan"]["driver"]["state"] == "finished"
    assert not status["skipped"]
    # A second rerun finds nothing to repair and runs nothing.
    again = sweep_on(d.node, clean.grid, d.storage)
    assert again.returncode == 0 and "executed 0, reused 9" in again.stdout, again.stdout
