"""The results schema and the Parquet store."""

from __future__ import annotations

import json
import math
import os
import struct
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import nptm.results.schema as schema_mod
import nptm.results.store as store_mod
from nptm.results.schema import (
    EPOCHS_SCHEMA,
    SCHEMA_VERSION,
    STAGES_SCHEMA,
    SchemaError,
    rows_to_table,
)
from nptm.results.store import SweepStore
from nptm.trainables.storage import StorageError, check_writable

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def trial(trial_id: str = "a1b2c3", **kw: object) -> dict:
    row = {
        "stage_id": trial_id,
        "stage_kind": "retrain",
        "parent_ids": ["p0", "p1"],
        "round": 1,
        "dataset": "digits",
        "model": "resnet20",
        "pruner": "l1_filter",
        "structured": True,
        "ratio": 0.5,
        "schedule": "clr",
        "budget_epochs": 10,
        "overrides": {"lr": 0.05},
        "lr_override": 0.05,
        "seed": 3,
        "test_acc": 0.91,
        "params": 123_456,
        "status": "ok",
        "reused": False,
        "started_at": T0,
        "ended_at": T0 + timedelta(seconds=42),
    }
    row.update(kw)
    return row


def validate_row(table: str, row: dict) -> dict:
    """One row through the schema's check, as the store stores it."""
    return rows_to_table(table, [row]).to_pylist()[0]


def epochs(n: int, acc0: float = 0.5) -> list[dict]:
    return [{"epoch": e, "lr": 0.1 / (e + 1), "test_acc": acc0 + e / 100} for e in range(n)]


# -- schema ------------------------------------------------------------------------------------


def test_validate_row_fills_nullable_and_normalises() -> None:
    row = validate_row("stages", trial(sweep="s1"))
    assert set(row) == set(STAGES_SCHEMA.names)
    assert row["schema_version"] == SCHEMA_VERSION
    assert row["preset"] is None and row["error"] is None  # nullable and missing -> null
    assert row["overrides"] == '{"lr":0.05}'  # dict -> canonical JSON
    assert row["started_at"] == T0


def test_unknown_column_is_named() -> None:
    with pytest.raises(SchemaError, match="unknown column 'tset_acc'"):
        validate_row("stages", trial(sweep="s1", tset_acc=0.9))


def test_missing_required_column_is_named() -> None:
    row = trial(sweep="s1")
    del row["seed"]
    with pytest.raises(SchemaError, match="'seed' is required but missing"):
        validate_row("stages", row)
    with pytest.raises(SchemaError, match="'status' is required but null"):
        validate_row("stages", trial(sweep="s1", status=None))


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("seed", "3", "'seed' expects int64, got str '3'"),
        ("seed", True, "'seed' expects int64, got bool True"),
        ("budget_epochs", 10.5, "'budget_epochs' expects int32, got float 10.5"),
        ("ratio", "0.5", "'ratio' expects double, got str '0.5'"),
        ("structured", 1, "'structured' expects bool, got int 1"),
        ("parent_ids", "p0", "'parent_ids' expects list<item: string>, got str 'p0'"),
        ("parent_ids", ["p0", 3], "'parent_ids' expects list<item: string>, got list"),
        ("status", "done", r"'status' must be one of \['ok', 'diverged', 'failed', 'skipped'\]"),
        ("stage_kind", "train", "'stage_kind' must be one of"),
        ("test_acc", 91.0, r"'test_acc' is a fraction in \[0, 1\], got 91.0"),
        ("overrides", "{lr: 1}", "'overrides' expects a JSON object"),
        ("overrides", "[1]", "'overrides' expects a JSON object"),
        ("started_at", datetime(2025, 1, 1), "'started_at' needs a timezone"),
        ("started_at", "yesterday", "'started_at' expects an ISO-8601 timestamp"),
        ("workers", 2**40, "'workers' expects int32, got int 1099511627776"),
    ],
)
def test_bad_values_name_column_and_value(column: str, value: object, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        validate_row("stages", trial(sweep="s1", **{column: value}))


def test_values_from_pandas_rows_are_accepted() -> None:
    # A row taken from a DataFrame: NaN for a missing int, integral float, numpy scalars.
    import numpy as np

    row = validate_row(
        "stages",
        trial(
            sweep="s1",
            epochs_run=float("nan"),
            seed=np.int64(4),
            budget_epochs=20.0,
            reused=np.bool_(True),
        ),
    )
    assert row["epochs_run"] is None
    assert row["seed"] == 4 and type(row["seed"]) is int
    assert row["budget_epochs"] == 20 and type(row["budget_epochs"]) is int
    assert row["reused"] is True
    # NaN stays NaN in a float column (a diverged loss is a value, not a missing one).
    assert math.isnan(
        validate_row("stages", trial(sweep="s1", test_loss=float("nan")))["test_loss"]
    )


def test_timestamps_are_converted_to_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    row = validate_row(
        "stages", trial(sweep="s1", started_at=datetime(2025, 1, 1, 12, tzinfo=plus2))
    )
    assert row["started_at"] == datetime(2025, 1, 1, 10, tzinfo=UTC)
    assert row["started_at"].utcoffset() == timedelta(0)
    row = validate_row("stages", trial(sweep="s1", ended_at="2025-01-01T12:00:00+02:00"))
    assert row["ended_at"] == datetime(2025, 1, 1, 10, tzinfo=UTC)


def test_column_reference_is_current() -> None:
    # docs/results.md is generated from the column declarations; regenerate it with
    # `python -m nptm.results.schema > docs/results.md` after changing a column.
    doc = Path(__file__).parents[1] / "docs" / "results.md"
    assert doc.read_text() == schema_mod.reference()
    documented = {line.split(" | ")[0].removeprefix("| ") for line in doc.read_text().splitlines()}
    for schema in (STAGES_SCHEMA, EPOCHS_SCHEMA):
        missing = [n for n in schema.names if n not in documented]
        assert not missing, f"columns missing from docs/results.md: {missing}"


# -- store -------------------------------------------------------------------------------------


def test_roundtrip(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "s1")
    store.write_stage(trial(), epochs(3))
    df = store.read_stages()
    assert len(df) == 1
    r = df.iloc[0]
    assert r["sweep"] == "s1" and r["stage_id"] == "a1b2c3"
    assert list(r["parent_ids"]) == ["p0", "p1"]
    assert r["budget_epochs"] == 10 and r["seed"] == 3 and r["params"] == 123_456
    assert r["test_acc"] == pytest.approx(0.91)
    assert r["started_at"] == pd.Timestamp(T0)  # microseconds survive
    assert pd.isna(r["preset"]) and pd.isna(r["epochs_run"])
    ep = store.read_epochs().sort_values("epoch")
    assert ep["epoch"].tolist() == [0, 1, 2]
    assert ep["test_acc"].tolist() == pytest.approx([0.5, 0.51, 0.52])
    assert set(ep["stage_id"]) == {"a1b2c3"} and set(ep["stage_kind"]) == {"retrain"}
    assert store.stage_ids() == ["a1b2c3"]
    # Layout: one file per stage under sweeps/<sweep>/{stages,epochs}/.
    assert (tmp_path / "sweeps/s1/stages/a1b2c3.parquet").is_file()
    assert (tmp_path / "sweeps/s1/epochs/a1b2c3.parquet").is_file()
    # Files carry the exact schema.
    assert pq.read_schema(tmp_path / "sweeps/s1/stages/a1b2c3.parquet").equals(
        STAGES_SCHEMA, check_metadata=False
    )


def test_rerun_replaces_instead_of_duplicating(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "s1")
    store.write_stage(trial(status="failed", test_acc=None, error="boom"), epochs(5))
    store.write_stage(trial(test_acc=0.93), epochs(2, acc0=0.7))
    df = store.read_stages()
    assert len(df) == 1
    assert df.iloc[0]["status"] == "ok" and df.iloc[0]["test_acc"] == pytest.approx(0.93)
    ep = store.read_epochs()
    assert sorted(ep["epoch"]) == [0, 1]  # the 5 old epochs are gone
    assert sorted(ep["test_acc"]) == pytest.approx([0.7, 0.71])
    # A rerun with no epochs removes the stale epoch file too.
    store.write_stage(trial(stage_kind="prune", schedule=None, budget_epochs=None))
    assert store.read_epochs().empty
    assert store.read_stages().iloc[0]["stage_kind"] == "prune"


def test_bad_row_writes_nothing(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "s1")
    bad_epochs = [*epochs(2), {"epoch": 2, "test_acc": "high"}]
    with pytest.raises(SchemaError, match="'test_acc' expects double, got str 'high'"):
        store.write_stage(trial(), bad_epochs)
    with pytest.raises(SchemaError, match="unknown column 'colour'"):
        store.write_stage(trial(colour="red"), epochs(2))
    with pytest.raises(SchemaError, match="duplicate epoch 1"):
        store.write_stage(trial(), [*epochs(2), {"epoch": 1}])
    with pytest.raises(SchemaError, match="'stage_id' is 'zzz' but the stage row has 'a1b2c3'"):
        store.write_stage(trial(), [{"epoch": 0, "stage_id": "zzz"}])
    with pytest.raises(SchemaError, match="'sweep' is 'other'"):
        store.write_stage(trial(sweep="other"))
    assert store.stage_ids() == []
    assert not (tmp_path / "sweeps/s1/epochs").exists() or not any(
        (tmp_path / "sweeps/s1/epochs").iterdir()
    )


def test_crash_mid_write_leaves_previous_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SweepStore(tmp_path, "s1")
    store.write_stage(trial(test_acc=0.8), epochs(2))

    def torn_write(table: object, where: object, **kw: object) -> None:
        where.write(b"PAR1 half a file")  # type: ignore[attr-defined]
        raise OSError("disk vanished")

    monkeypatch.setattr(store_mod.pq, "write_table", torn_write)
    with pytest.raises(OSError, match="disk vanished"):
        store.write_stage(trial(test_acc=0.9), epochs(3))
    monkeypatch.undo()
    assert store.read_stages().iloc[0]["test_acc"] == pytest.approx(0.8)
    assert len(store.read_epochs()) == 2
    leftovers = [p.name for p in (tmp_path / "sweeps/s1").rglob("*.tmp")]
    assert leftovers == []


def test_readers_ignore_temporary_files(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "s1")
    store.write_stage(trial(), epochs(1))
    stages_dir = tmp_path / "sweeps/s1/stages"
    (stages_dir / ".a1b2c3.parquet.123abc.tmp").write_bytes(b"PAR1 torn")
    (stages_dir / ".hidden.parquet").write_bytes(b"PAR1 torn")
    assert store.stage_ids() == ["a1b2c3"]
    assert len(store.read_stages()) == 1
    # DuckDB's glob matches dot-files too: the store's own temporary names end in ".tmp".
    (stages_dir / ".hidden.parquet").unlink()
    # The documented DuckDB glob and a plain pandas directory read skip them as well.
    glob = f"{stages_dir}/*.parquet"
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall() == [(1,)]
    assert len(pd.read_parquet(stages_dir)) == 1


def test_many_stages_form_one_dataset(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "s1")
    for i in range(5):
        store.write_stage(trial(f"t{i}", seed=i, test_acc=0.8 + i / 100), epochs(i))
    df = store.read_stages()
    assert sorted(df["seed"]) == [0, 1, 2, 3, 4]
    assert len(store.read_epochs()) == 0 + 1 + 2 + 3 + 4
    glob = f"{tmp_path}/sweeps/s1/stages/*.parquet"
    mean = duckdb.sql(f"SELECT avg(test_acc) FROM read_parquet('{glob}')").fetchall()[0][0]
    assert mean == pytest.approx(0.82)


def test_empty_store_reads_typed_empty_frames(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "nothing")
    assert store.stage_ids() == []
    assert list(store.read_stages().columns) == STAGES_SCHEMA.names
    assert list(store.read_epochs().columns) == EPOCHS_SCHEMA.names


def test_file_uri_and_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    SweepStore(f"file://{tmp_path}", "s1").write_stage(trial())
    assert SweepStore(tmp_path, "s1").stage_ids() == ["a1b2c3"]
    monkeypatch.chdir(tmp_path)
    store = SweepStore("rel-root", "s2")
    assert store.root == str(tmp_path / "rel-root")  # made absolute
    store.write_stage(trial())
    assert (tmp_path / "rel-root/sweeps/s2/stages/a1b2c3.parquet").is_file()


def test_object_store_path_writes_directly(tmp_path: Path) -> None:
    # A non-local filesystem takes the single-PUT path (no temporary file, no rename).
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    store = SweepStore("bucket", "s1", filesystem=fs)
    assert not store.local
    store.write_stage(trial(), epochs(2))
    store.write_stage(trial(test_acc=0.95), epochs(1))
    assert store.read_stages()["test_acc"].tolist() == [0.95]
    assert len(store.read_epochs()) == 1
    assert (tmp_path / "bucket/sweeps/s1/stages/a1b2c3.parquet").is_file()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("..", "must not contain '..'"),
        ("a..b", "must not contain '..'"),
        ("../etc", "path separator"),
        ("a/b", "path separator"),
        ("/abs", "absolute path"),
        ("", "non-empty"),
        (".hidden", "must start with a letter or digit"),
        ("sp ace", "may only use"),
    ],
)
def test_sweep_names_cannot_escape_the_root(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SweepStore(tmp_path, name)


def test_stage_id_must_be_a_plain_file_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"stage_id name '\.\./x'"):
        SweepStore(tmp_path, "s1").write_stage(trial("../x"))


def test_check_writable(tmp_path: Path) -> None:
    root = tmp_path / "new" / "root"
    check_writable(root, min_free_gb=0)
    assert root.is_dir() and not any(root.iterdir())  # the probe file is cleaned up
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=f"storage root {blocker}/sub cannot be created"):
        check_writable(blocker / "sub")
    with pytest.raises(StorageError, match=rf"storage root {root} has .* GiB free, less than"):
        check_writable(root, min_free_gb=1e12)


def test_check_writable_reports_read_only_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: simulate what access(2) would say
        monkeypatch.setattr(store_mod.os, "access", lambda path, mode: False)
    else:
        ro.chmod(0o500)
    try:
        with pytest.raises(StorageError, match=f"storage root {ro} is not writable"):
            check_writable(ro, min_free_gb=0)
    finally:
        ro.chmod(0o700)


def test_epoch_rows_keys_are_filled_from_trial(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "s1")
    store.write_stage(trial(stage_kind="pretrain", pruner=None, structured=None), epochs(2))
    ep = store.read_epochs()
    assert set(ep["stage_kind"]) == {"pretrain"} and set(ep["sweep"]) == {"s1"}
    assert json.loads(store.read_stages().iloc[0]["overrides"]) == {"lr": 0.05}


def _file_read(root: Path, table: str) -> list[dict]:
    """Reference: every per-stage file read on its own with pyarrow, rows in stage order."""
    files = {f.name: f for f in (root / table).glob("*.parquet")}
    if table == "stages" and (root / "trials").is_dir():
        for f in (root / "trials").glob("*.parquet"):
            files.setdefault(f.name, f)
    rows = [row for name in sorted(files) for row in pq.read_table(files[name]).to_pylist()]
    for row in rows:
        if "trial_id" in row:
            row["stage_id"] = row.pop("trial_id")
    return sorted(rows, key=lambda r: (r["stage_id"], r.get("epoch", 0)))


def _same_rows(got: pd.DataFrame, want: list[dict]) -> None:
    """`got` holds `want`'s rows (columns added since a file was written read as null)."""
    table = pa.Table.from_pandas(got, preserve_index=False).to_pylist()
    assert len(table) == len(want)
    for have, row in zip(table, want, strict=True):
        assert {k: have[k] for k in row} == row
        assert all(have[k] is None for k in have.keys() - row.keys())


@pytest.fixture
def counted_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths the store opens (its one read function, counted)."""
    opened: list[str] = []
    real = store_mod.read_bytes

    def read_bytes(fs, path):
        opened.append(path)
        return real(fs, path)

    monkeypatch.setattr(store_mod, "read_bytes", read_bytes)
    return opened


def test_snapshot_plus_newer_stage_files_equals_the_stage_files(
    tmp_path: Path, counted_reads: list[str]
) -> None:
    store = SweepStore(tmp_path, "s1")
    sweep = tmp_path / "sweeps/s1"
    for i in range(3):
        store.write_stage(trial(f"t{i}", seed=i), epochs(2))
    store.compact()
    snap = pq.read_table(sweep / "stages.parquet")
    assert sorted(snap["stage_id"].to_pylist()) == ["t0", "t1", "t2"]
    assert pq.read_table(sweep / "epochs.parquet").num_rows == 6
    # The snapshot is a plain table: DuckDB reads it as the README shows.
    got = duckdb.sql(f"SELECT stage_id, seed FROM '{sweep}/stages.parquet' ORDER BY 1").fetchall()
    assert got == [("t0", 0), ("t1", 1), ("t2", 2)]

    # New, rewritten and removed stage files after the snapshot are all followed.
    store.write_stage(trial("t3", seed=3), epochs(1))
    store.write_stage(trial("t1", seed=1, test_acc=0.5), [])
    (sweep / "stages/t0.parquet").unlink()
    counted_reads.clear()
    fresh = SweepStore(tmp_path, "s1")  # another process: nothing in memory
    df = fresh.read_stages()
    assert sorted(df.stage_id) == ["t1", "t2", "t3"]
    assert df.set_index("stage_id").loc["t1", "test_acc"] == pytest.approx(0.5)
    _same_rows(df, _file_read(sweep, "stages"))
    ep = fresh.read_epochs()
    assert sorted(ep["stage_id"]) == ["t0", "t0", "t2", "t2", "t3"]  # t1's epochs were removed
    _same_rows(ep, _file_read(sweep, "epochs"))
    opened = sorted(p.removeprefix(f"{sweep}/") for p in counted_reads)
    # the snapshots, and only the per-stage files written since
    new = ["stages/t1.parquet", "stages/t3.parquet", "epochs/t3.parquet"]
    assert opened == sorted(["stages.parquet", "epochs.parquet", *new])

    # A compaction brings the snapshots up to date; then a read opens no per-stage file.
    fresh.compact()
    counted_reads.clear()
    again = SweepStore(tmp_path, "s1")
    pd.testing.assert_frame_equal(again.read_stages(), df)
    pd.testing.assert_frame_equal(again.read_epochs(), ep)
    assert sorted(p.removeprefix(f"{sweep}/") for p in counted_reads) == [
        "epochs.parquet",
        "stages.parquet",
    ]


def test_snapshot_that_is_corrupt_or_of_another_schema_is_ignored(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "s1")
    store.write_stage(trial("t0"), epochs(1))
    store.compact()
    snap = tmp_path / "sweeps/s1/stages.parquet"
    snap.write_bytes(b"not parquet")
    assert SweepStore(tmp_path, "s1").read_stages()["stage_id"].tolist() == ["t0"]
    SweepStore(tmp_path, "s1").compact()
    assert pq.read_table(snap).num_rows == 1  # rewritten
    # A snapshot of another shape (another schema version) is ignored as well.
    table = pq.read_table(snap)
    pq.write_table(table.drop_columns(["test_acc"]).replace_schema_metadata(
        table.schema.metadata), snap)  # fmt: skip
    assert SweepStore(tmp_path, "s1").read_stages()["test_acc"].tolist() == [pytest.approx(0.91)]


def test_a_large_read_writes_the_snapshot_and_replaces_the_old_cache(tmp_path: Path) -> None:
    import time

    store = SweepStore(tmp_path, "s1")
    old_cache = tmp_path / "sweeps/s1/.nptm-cache"
    old_cache.mkdir(parents=True)
    (old_cache / "stages.parquet").write_bytes(b"from an older nptm")
    n = store_mod.COMPACT_AFTER_FILES + 1
    for i in range(n):
        store.write_stage(trial(f"t{i:04d}", seed=i))
    started = time.perf_counter()
    first = SweepStore(tmp_path, "s1").read_stages()
    cold = time.perf_counter() - started
    assert (tmp_path / "sweeps/s1/stages.parquet").is_file()  # more than COMPACT_AFTER_FILES
    started = time.perf_counter()
    second = SweepStore(tmp_path, "s1").read_stages()
    warm = time.perf_counter() - started
    print(f"\nread {n} stages: {cold * 1000:.0f} ms from files, {warm * 1000:.0f} ms snapshot")
    pd.testing.assert_frame_equal(first, second)
    assert sorted(first.seed) == list(range(n))
    store.compact()
    assert not old_cache.exists()  # one mechanism: the hidden cache of older versions goes


def test_reads_a_sweep_written_with_schema_version_1(tmp_path: Path) -> None:
    # Version 1: stage rows under trials/, key column trial_id, no attempts column.

    def v1(table: pa.Table) -> pa.Table:
        table = table.drop_columns([c for c in ("attempts",) if c in table.column_names])
        names = ["trial_id" if n == "stage_id" else n for n in table.column_names]
        return table.rename_columns(names).set_column(
            0, "schema_version", pa.array([1] * table.num_rows, pa.int16())
        )

    sweep = tmp_path / "sweeps/old"
    (sweep / "trials").mkdir(parents=True)
    (sweep / "epochs").mkdir()
    for sid, acc in (("t0", 0.8), ("t1", 0.9)):
        row = {**trial(sid, test_acc=acc), "sweep": "old"}
        eps = [{**e, "sweep": "old", "stage_id": sid, "stage_kind": "retrain"} for e in epochs(2)]
        pq.write_table(v1(rows_to_table("stages", [row])), sweep / f"trials/{sid}.parquet")
        pq.write_table(v1(rows_to_table("epochs", eps)), sweep / f"epochs/{sid}.parquet")

    store = SweepStore(tmp_path, "old")
    assert store.stage_ids() == ["t0", "t1"]
    df = store.read_stages().set_index("stage_id")
    assert df.loc["t1", "test_acc"] == pytest.approx(0.9)
    assert df["attempts"].isna().all() and set(df["schema_version"]) == {1}
    assert sorted(store.read_epochs()["stage_id"]) == ["t0", "t0", "t1", "t1"]
    # A stage recorded again moves to the current layout; the other stays readable.
    store.write_stage(trial("t0", test_acc=0.85), epochs(1))
    assert not (sweep / "trials/t0.parquet").exists() and (sweep / "stages/t0.parquet").is_file()
    df = store.read_stages().set_index("stage_id")
    assert df.loc["t0", "test_acc"] == pytest.approx(0.85) and len(df) == 2
    assert df.loc["t0", "schema_version"] == SCHEMA_VERSION
    # Compacted, the version-1 rows read the same.
    before = (store.read_stages(), store.read_epochs())
    store.compact()
    again = SweepStore(tmp_path, "old")
    pd.testing.assert_frame_equal(again.read_stages(), before[0])
    pd.testing.assert_frame_equal(again.read_epochs(), before[1])
    _same_rows(again.read_stages(), _file_read(sweep, "stages"))


def test_the_drivers_periodic_compaction(tmp_path: Path, caplog) -> None:
    store = SweepStore(tmp_path, "s1")
    store.write_stage(trial("t0"), epochs(1))
    snapshot = tmp_path / "sweeps/s1/stages.parquet"
    store.compact_when_due(interval_s=3600)  # the store was made just now: not due
    assert not snapshot.exists()
    store.compact_when_due(interval_s=0)
    assert pq.read_table(snapshot)["stage_id"].to_pylist() == ["t0"]
    # A failed compaction is logged, never raised: the stage files already hold the rows.
    snapshot.unlink()
    snapshot.mkdir()
    store.write_stage(trial("t1"), epochs(1))
    store.compact_when_due(interval_s=0)
    assert "could not compact" in caplog.text
    assert sorted(store.read_stages().stage_id) == ["t0", "t1"]


# -- damaged files (the corpus on a real sweep: tests/test_corruption.py) ----------------------


def test_a_damaged_or_foreign_stage_file_costs_its_stage_only(tmp_path: Path, caplog) -> None:
    store = SweepStore(tmp_path, "s1")
    for i in range(4):
        store.write_stage(trial(f"t{i}", seed=i, test_acc=0.123456 * (i + 1)), epochs(2))
    store.compact()
    sweep = tmp_path / "sweeps/s1"
    truncated, foreign = sweep / "stages/t1.parquet", sweep / "epochs/t2.parquet"
    flipped = sweep / "stages/t3.parquet"
    truncated.write_bytes(truncated.read_bytes()[:100])
    foreign.write_bytes((sweep / "epochs/t0.parquet").read_bytes())  # another stage's epochs
    data = bytearray(flipped.read_bytes())
    data[data.find(struct.pack("<d", 0.123456 * 4))] ^= 0x01  # one bit of a value: CRC fails
    flipped.write_bytes(bytes(data))

    reader = SweepStore(tmp_path, "s1")
    assert reader.read_stages()["stage_id"].tolist() == ["t0", "t2"]
    assert sorted(set(reader.read_epochs()["stage_id"])) == ["t0", "t1", "t3"]
    skipped = {d.stage_id: d for d in reader.skipped}
    assert sorted(skipped) == ["t1", "t2", "t3"] and skipped["t2"].file == str(foreign)
    assert "holds the rows of stage t0, not of t2" in skipped["t2"].reason
    assert all(d.moved_to is None for d in reader.skipped)  # readers move nothing
    assert str(truncated) in caplog.text

    # The driver: sets them aside, keeps the one intact stage, then records the others again.
    driver = SweepStore(tmp_path, "s1")
    assert driver.intact_stage_ids() == ["t0"]
    assert not truncated.exists() and len(list(sweep.glob("stages/_t1.parquet.damaged-*"))) == 1
    # Set aside, out of pyarrow's way too (t2's row stays: only its epochs were foreign).
    assert sorted(pd.read_parquet(sweep / "stages").stage_id) == ["t0", "t2"]
    for i in (1, 2, 3):
        driver.write_stage(trial(f"t{i}", seed=i), epochs(2))
    assert SweepStore(tmp_path, "s1").intact_stage_ids() == ["t0", "t1", "t2", "t3"]


def test_rows_of_another_sweep_or_shape_are_refused(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "s1")
    store.write_stage(trial("t0"), epochs(1))
    SweepStore(tmp_path, "s2").write_stage(trial("t1"), epochs(1))
    sweep = tmp_path / "sweeps/s1"
    other = tmp_path / "sweeps/s2/stages/t1.parquet"
    (sweep / "stages/t1.parquet").write_bytes(other.read_bytes())
    pq.write_table(pa.table({"stage_id": ["t2"], "test_acc": [0.5]}), sweep / "stages/t2.parquet")
    reader = SweepStore(tmp_path, "s1")
    assert reader.read_stages()["stage_id"].tolist() == ["t0"]
    reasons = {d.stage_id: d.reason for d in reader.skipped}
    assert reasons["t1"] == "holds rows of sweep s2, not of s1"
    assert reasons["t2"].startswith("not the stages table's schema (no column sweep")
