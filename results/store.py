"""The Parquet store: the source of truth of every sweep.

Layout under a storage root (a local path or a URI such as ``s3://bucket/prefix``; see
nptm.trainables.layout)::

    <storage>/sweeps/<sweep>/stages/<stage_id>.parquet   one row: the stage's outcome
    <storage>/sweeps/<sweep>/epochs/<stage_id>.parquet   one row per epoch of that stage

    <storage>/sweeps/<sweep>/stages.parquet              snapshot: all stage rows in one file
    <storage>/sweeps/<sweep>/epochs.parquet              snapshot: all epoch rows

One file per stage means a rerun of a stage replaces its file rather than appending, and workers
never contend for a file: it is the crash-safe write path and the source of truth. Opening one
file per stage is slow on object storage, so `compact` merges them into the snapshots (the
driver does so every few minutes and at the end of a sweep), and readers open the snapshot
plus the per-stage files newer than it. Once a sweep has ended, its snapshots are the tables:
``pandas.read_parquet('<storage>/sweeps/<sweep>/stages.parquet')`` or, in DuckDB,
``SELECT * FROM '<storage>/sweeps/<sweep>/stages.parquet'``; each per-stage directory is
also a Parquet dataset (``read_parquet('<storage>/sweeps/<sweep>/stages/*.parquet')``).
Files are written atomically (temporary name in the same directory, then a rename; on object
stores a single PUT is already atomic), and temporary names start with a dot and do not end in
``.parquet``, so every reader above skips them.

Sweeps written with schema version 1 (``trials/<trial_id>.parquet``, key column ``trial_id``)
are read as if they were current; a stage written again lands in the current layout.

Every file is checked as it is read; one that fails costs its stage, never the table. A
per-stage file that does not read (truncated, empty, garbled: pages carry CRC checksums), is
not a table of its kind, or holds another stage's or sweep's rows is skipped with a warning
and listed in `SweepStore.skipped`; readers leave it in place, while the driver (`compact`,
`intact_stage_ids`) sets it aside as ``_<name>.damaged-<ns>`` and records the stage again
from its outcome (nptm.orchestrator.sweep). A snapshot that fails its checks is skipped the same
way (its rows are read from the per-stage files) and replaced by the next compaction.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nptm.results.schema import LEGACY_KEY, SCHEMAS, SchemaError, TableName, rows_to_table
from nptm.trainables.layout import (
    EPOCHS_TABLE,
    LEGACY_READ_CACHE,
    LEGACY_STAGES_TABLE,
    STAGES_TABLE,
    Layout,
    check_name,
    check_sweep_name,
)
from nptm.trainables.storage import Damaged, atomic_write_bytes, read_bytes, set_aside

log = logging.getLogger(__name__)

_KEYS = ("sweep", "stage_id", "stage_kind")  # what an epoch row shares with its stage row


class Source(NamedTuple):
    """A per-stage file of a table: its path inside the sweep directory, time and size."""

    file: str
    mtime_ns: int
    size: int


_Merged = tuple[pa.Table, dict[str, Source], bool]
# Columns every version of a table has: a file without them is not a table of that kind.
_CORE = {
    STAGES_TABLE: ("sweep", "stage_kind", "status"),
    EPOCHS_TABLE: ("sweep", "stage_kind", "epoch"),
}
# What reading a Parquet file already in memory raises on bytes that are not one.
_UNREADABLE = (pa.ArrowException, OSError, ValueError, KeyError, TypeError, IndexError)
_SOURCES_KEY = b"nptm.sources"
COMPACT_INTERVAL_S = 300.0  # the driver's snapshots lag the per-stage files by at most this
COMPACT_AFTER_FILES = 64  # a read that opened more per-stage files writes a snapshot
READ_THREADS = 16


class SweepStore:
    """Reads and writes one sweep's `stages` and `epochs` tables."""

    def __init__(
        self,
        storage: str | os.PathLike[str],
        sweep: str,
        *,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        """`filesystem` replaces the one resolved from `storage` (tests, custom credentials)."""
        self.layout = Layout(storage, filesystem=filesystem)
        self.sweep = check_sweep_name(sweep)
        self.storage = self.layout.storage
        self.fs, self.root, self.local = self.layout.fs, self.layout.root, self.layout.local
        self.sweep_dir = self.layout.sweep_dir(sweep)
        self._snapshots: dict[str, tuple[tuple[int, int], tuple[pa.Table, dict[str, Source]]]] = {}
        self._last_compact = time.monotonic()
        self._skipped: dict[str, list[Damaged]] = {}  # by table: what its last read refused
        self._warned: set[tuple[str, int, int]] = set()  # (file, mtime, size): warn once each

    def __repr__(self) -> str:
        return f"SweepStore({self.storage!r}, {self.sweep!r})"

    def table_dir(self, table: TableName) -> str:
        return self.layout.table_dir(self.sweep, table)

    @property
    def local_dir(self) -> Path | None:
        """The sweep directory as a local path, or None on remote storage."""
        return Path(self.sweep_dir) if self.local else None

    # -- writing ---------------------------------------------------------------------------

    def write_stage(
        self, stage_row: Mapping[str, Any], epoch_rows: Iterable[Mapping[str, Any]] = ()
    ) -> tuple[pa.Table, pa.Table]:
        """Store one stage's outcome, replacing any earlier outcome of the same stage, and
        return the stage and epoch tables as stored.

        `sweep`, `stage_id` and `stage_kind` may be left out of the epoch rows (they are taken
        from the stage row). Everything is validated before anything is written.
        """
        stage = {"sweep": self.sweep, **stage_row}
        if stage["sweep"] != self.sweep:
            raise SchemaError(
                f"stages row: column 'sweep' is {stage['sweep']!r} but the store is for "
                f"sweep {self.sweep!r}"
            )
        stage_table = rows_to_table(STAGES_TABLE, [stage])
        keys = {k: stage_table[k][0].as_py() for k in _KEYS}
        stage_id = check_name("stage_id", keys["stage_id"])
        epochs = []
        seen: set[Any] = set()
        for i, row in enumerate(epoch_rows):
            row = {**keys, **row}
            for key, want in keys.items():
                if row[key] != want:
                    raise SchemaError(
                        f"epochs row {i}: column {key!r} is {row[key]!r} but the stage row "
                        f"has {want!r}"
                    )
            if row.get("epoch") in seen:
                raise SchemaError(f"epochs row {i}: duplicate epoch {row['epoch']!r}")
            seen.add(row.get("epoch"))
            epochs.append(row)
        epoch_table = rows_to_table(EPOCHS_TABLE, epochs)

        # Epochs first: a stage row on disk then always has its epochs next to it.
        epoch_path = self.layout.table_file(self.sweep, EPOCHS_TABLE, stage_id)
        if epoch_table.num_rows:
            self._write_atomic(epoch_table, epoch_path)
        else:
            self._delete_if_exists(epoch_path)
        self._write_atomic(stage_table, self.layout.table_file(self.sweep, STAGES_TABLE, stage_id))
        legacy = self.layout.table_file(self.sweep, LEGACY_STAGES_TABLE, stage_id)
        self._delete_if_exists(legacy)  # the current layout replaces a version-1 row
        return stage_table, epoch_table

    def link_mlflow_run(self, stage_table: pa.Table, run_id: str) -> None:
        """Rewrite a stage row `write_stage` returned with the id of its MLflow run."""
        column = stage_table.schema.get_field_index("mlflow_run_id")
        linked = stage_table.set_column(
            column, stage_table.schema.field(column), pa.array([run_id], pa.string())
        )
        stage_id = stage_table["stage_id"][0].as_py()
        self._write_atomic(linked, self.layout.table_file(self.sweep, STAGES_TABLE, stage_id))

    def _write_atomic(self, table: pa.Table, path: str) -> None:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, write_page_checksum=True)  # garbled pages fail to read
        atomic_write_bytes(self.fs, path, buf.getvalue().to_pybytes())

    def _delete_if_exists(self, path: str) -> None:
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_file(path)

    # -- reading ---------------------------------------------------------------------------

    def _sources(self, table: TableName) -> dict[str, Source]:
        """The table's per-stage files by stage id; for `stages`, version-1 files of stages not
        rewritten since."""
        dirs = [table] + ([LEGACY_STAGES_TABLE] if table == STAGES_TABLE else [])
        found: dict[str, Source] = {}
        for name in dirs:
            selector = pafs.FileSelector(self.table_dir(name), allow_not_found=True)
            for i in self.fs.get_file_info(selector):
                if (
                    i.type == pafs.FileType.File
                    and i.base_name.endswith(".parquet")
                    and not i.base_name.startswith((".", "_"))
                ):
                    sid = i.base_name.removesuffix(".parquet")
                    # the current layout first
                    found.setdefault(sid, Source(f"{name}/{i.base_name}", i.mtime_ns or 0, i.size))
        return dict(sorted(found.items()))

    def stage_ids(self) -> list[str]:
        """Ids of the stages with a stored outcome (from file names; nothing is read, so a
        damaged file still counts: see `intact_stage_ids`)."""
        return list(self._sources(STAGES_TABLE))

    def intact_stage_ids(self) -> list[str]:
        """Ids of the stages whose rows read back whole, for the driver at start: both tables
        are read (the snapshot plus the per-stage files newer than it), every damaged or
        foreign per-stage file is set aside, and a stage whose stage row or epoch rows were
        refused is left out: the driver records it again (from its outcome, or by running it).
        """
        ids: set[str] = set()
        refused: set[str] = set()
        for table in (STAGES_TABLE, EPOCHS_TABLE):
            merged, fresh = self._merge(table, set_aside=True)
            if fresh > COMPACT_AFTER_FILES:
                self._write_snapshot(table, merged, best_effort=True)
            if table == STAGES_TABLE:
                ids = set(merged[0]["stage_id"].to_pylist())
            refused |= {d.stage_id for d in self._skipped[table] if d.stage_id is not None}
        return sorted(ids - refused)

    @property
    def skipped(self) -> list[Damaged]:
        """The files the latest read of each table refused (damaged or foreign per-stage files,
        a damaged snapshot), each with why; what `nptm status` and `nptm report` list."""
        return [d for table in (STAGES_TABLE, EPOCHS_TABLE) for d in self._skipped.get(table, [])]

    def read_table(self, table: TableName) -> pa.Table:
        """The whole table as Arrow, with exactly the current schema, sorted by stage (and
        epoch).

        Read from the table's snapshot (``<sweep>/<table>.parquet``) plus every per-stage file
        that is newer than it; the per-stage files stay the source of truth (a snapshot row
        whose file changed or vanished is not used). A read that had to open more than
        `COMPACT_AFTER_FILES` per-stage files writes a new snapshot (best effort), so the next
        read does not open them again. A damaged or foreign file is skipped with a warning and
        left in place (`skipped` lists it).
        """
        merged, fresh = self._merge(table)
        if fresh > COMPACT_AFTER_FILES:
            self._write_snapshot(table, merged, best_effort=True)
        return merged[0]

    def compact(self) -> None:
        """Bring both snapshots up to date with the per-stage files (one read of each file
        newer than the snapshot, one write of each snapshot that changed). Damaged or foreign
        per-stage files are set aside (`skipped` lists them)."""
        for table in (STAGES_TABLE, EPOCHS_TABLE):
            merged, fresh = self._merge(table, set_aside=True)
            if fresh or merged[2]:
                self._write_snapshot(table, merged)
        self._last_compact = time.monotonic()
        self._remove_legacy_cache()

    def compact_when_due(self, interval_s: float = COMPACT_INTERVAL_S) -> None:
        """`compact` if the last one is `interval_s` old (the driver calls this as stages end);
        a failure is logged, never raised: the per-stage files are already safe."""
        if time.monotonic() - self._last_compact < interval_s:
            return
        try:
            self.compact()
        except (OSError, pa.ArrowException) as err:
            self._last_compact = time.monotonic()
            log.warning("could not compact the tables of %s: %s", self, err)

    def _merge(self, table: TableName, set_aside: bool = False) -> tuple[_Merged, int]:
        """(table, its sources, whether the snapshot had rows to drop) and how many per-stage
        files were read; `set_aside`: move the damaged ones out of the way (else only
        skipped)."""
        skipped: list[Damaged] = []
        self._skipped[table] = skipped
        sources = self._sources(table)
        snapshot = self._read_snapshot(table, skipped)
        kept_ids: list[str] = []
        stale = False
        if snapshot is not None:
            rows, had = snapshot
            kept_ids = [sid for sid, src in had.items() if sources.get(sid) == src]
            stale = len(kept_ids) < len(had)
            if stale:
                rows = rows.filter(pc.is_in(rows["stage_id"], pa.array(kept_ids, pa.string())))
            parts = [rows]
        else:
            parts = []
        kept = set(kept_ids)
        fresh = [src for sid, src in sources.items() if sid not in kept]
        if fresh:
            data, refused = self._read_files(table, fresh, set_aside)
            parts.append(data)
            for damaged in refused:
                skipped.append(damaged)
                sources.pop(damaged.stage_id or "", None)  # the snapshot does not stand for it
        schema = SCHEMAS[table]
        data = pa.concat_tables(parts) if parts else schema.empty_table()
        keys = [("stage_id", "ascending")] + (
            [("epoch", "ascending")] if table == EPOCHS_TABLE else []
        )
        return (data.sort_by(keys), sources, stale), len(fresh)

    def _read_files(
        self, table: TableName, sources: list[Source], set_aside: bool
    ) -> tuple[pa.Table, list[Damaged]]:
        """The rows of these per-stage files, concurrently (object stores answer each read in
        milliseconds, one at a time), and the files refused."""
        schema = SCHEMAS[table]

        def read(src: Source) -> pa.Table | Damaged:
            data = read_bytes(self.fs, f"{self.sweep_dir}/{src.file}")
            if data is None:
                return schema.empty_table()  # removed since the listing
            sid = src.file.rsplit("/", 1)[-1].removesuffix(".parquet")
            rows, problem = _checked_rows(table, data, sid, self.sweep)
            return rows if problem is None else self._refuse(src, sid, problem, set_aside)

        with ThreadPoolExecutor(READ_THREADS) as pool:
            results = list(pool.map(read, sources))
        parts = [r for r in results if isinstance(r, pa.Table)]
        refused = [r for r in results if isinstance(r, Damaged)]
        return (pa.concat_tables(parts) if parts else schema.empty_table()), refused

    def _refuse(self, src: Source, sid: str, problem: str, set_aside_: bool) -> Damaged:
        """Skip a per-stage file (and, for the driver, set it aside), with a warning."""
        path = f"{self.sweep_dir}/{src.file}"
        moved = set_aside(self.fs, path) if set_aside_ else None
        damaged = Damaged(self._location(src.file), problem, moved, sid)
        key = (src.file, src.mtime_ns, src.size)
        if moved is not None or key not in self._warned:
            self._warned.add(key)
            then = "set aside" if moved else "skipped"
            log.warning("%s: the stored rows of stage %s %s: %s", self, sid, then, damaged)
        return damaged

    def _location(self, relative: str) -> str:
        """A file of the sweep directory as a user names it (a URI keeps its scheme)."""
        return self.layout.location("sweeps", self.sweep, *relative.split("/"))

    def snapshot_path(self, table: TableName) -> str:
        return self.layout.snapshot_file(self.sweep, table)

    def _read_snapshot(
        self, table: TableName, skipped: list[Damaged] | None = None
    ) -> tuple[pa.Table, dict[str, Source]] | None:
        """The snapshot's rows and the per-stage file behind each stage's rows; None when it is
        missing, of another schema version, or fails its checks (then added to `skipped`, with
        a warning: the rows are read from the per-stage files, and the next compaction
        replaces it). Kept in memory while the file is unchanged."""
        path = self.snapshot_path(table)
        info = self.fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return None
        stamp = (info.mtime_ns, info.size)
        memo = self._snapshots.get(table)
        if memo is not None and memo[0] == stamp:
            return memo[1]
        data = read_bytes(self.fs, path)
        if data is None:
            return None
        try:
            rows = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
            problem, sources = _snapshot_problem(table, rows, self.sweep)
        except _UNREADABLE as err:
            problem, sources = f"unreadable ({_first_line(err)})", {}
        if problem == _OTHER_VERSION:
            log.debug("ignoring the snapshot %s: written by another schema version", path)
            return None
        if problem is not None:
            name = f"{table}.parquet"
            damaged = Damaged(self._location(name), f"{problem}; its rows are read from the "
                              f"per-stage files, and the next compaction replaces it")  # fmt: skip
            if skipped is not None:
                skipped.append(damaged)
            key = (name, info.mtime_ns or 0, info.size)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("%s: snapshot skipped: %s", self, damaged)
            return None
        snapshot = (rows.replace_schema_metadata(SCHEMAS[table].metadata), sources)
        self._snapshots[table] = (stamp, snapshot)
        return snapshot

    def _write_snapshot(self, table: TableName, merged: _Merged, best_effort: bool = False) -> None:
        rows, sources, _ = merged
        meta = {**(SCHEMAS[table].metadata or {})}
        meta[_SOURCES_KEY] = json.dumps({sid: list(src) for sid, src in sources.items()})
        path = self.snapshot_path(table)
        try:
            self._write_atomic(rows.replace_schema_metadata(meta), path)
        except (OSError, pa.ArrowException) as err:  # e.g. read-only storage: just slower
            if not best_effort:
                raise
            log.debug("cannot write the snapshot of %s: %s", self, err)
            return
        info = self.fs.get_file_info(path)  # what the next read will compare with
        self._snapshots[table] = ((info.mtime_ns, info.size), (rows, sources))

    def _remove_legacy_cache(self) -> None:
        path = f"{self.sweep_dir}/{LEGACY_READ_CACHE}"
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def read_stages(self) -> pd.DataFrame:
        return _to_pandas(self.read_table(STAGES_TABLE))

    def read_epochs(self) -> pd.DataFrame:
        return _to_pandas(self.read_table(EPOCHS_TABLE))


_OTHER_VERSION = "written by another schema version"


def _checked_rows(
    table: TableName, data: bytes, stage_id: str, sweep: str
) -> tuple[pa.Table, str | None]:
    """The rows of one per-stage file in the current schema, or why they are not `stage_id`'s
    rows of `table` in `sweep`."""
    schema = SCHEMAS[table]
    try:
        raw = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
    except _UNREADABLE as err:
        return schema.empty_table(), f"unreadable ({_first_line(err)})"
    problem = _foreign_rows(table, raw, stage_id, sweep)
    if problem is not None:
        return schema.empty_table(), problem
    try:
        rows = _current_layout(raw, schema)
    except _UNREADABLE as err:
        return schema.empty_table(), f"not the {table} table's schema ({_first_line(err)})"
    present = set(raw.column_names) | ({"stage_id"} if LEGACY_KEY in raw.column_names else set())
    nulls = [
        f.name for f in schema if not f.nullable and f.name in present and rows[f.name].null_count
    ]
    if nulls:
        return schema.empty_table(), f"not the {table} table's schema (nulls in {nulls[0]})"
    return rows, None


def _foreign_rows(table: TableName, raw: pa.Table, stage_id: str, sweep: str) -> str | None:
    """Why `raw` is not one stage's file of `table` (another table, stage or sweep), or None."""
    declared = (
        (raw.schema.metadata or {}).get(b"nptm.table", table.encode()).decode("utf-8", "replace")
    )
    if declared != table:
        return f"a file of the {declared} table, not of {table}"
    names = set(raw.column_names)
    key = LEGACY_KEY if LEGACY_KEY in names and "stage_id" not in names else "stage_id"
    missing = [c for c in (key, *_CORE[table]) if c not in names]
    if missing:
        return f"not the {table} table's schema (no column {', '.join(missing)})"
    if table == STAGES_TABLE and raw.num_rows != 1:
        return f"{raw.num_rows} rows where one stage has one"
    if not raw.num_rows:
        return "no rows"
    ids = sorted({str(v) for v in raw[key].to_pylist()})
    if ids != [stage_id]:
        return f"holds the rows of stage {', '.join(ids)}, not of {stage_id}"
    sweeps = sorted({str(v) for v in raw["sweep"].to_pylist()})
    if sweeps != [sweep]:
        return f"holds rows of sweep {', '.join(sweeps)}, not of {sweep}"
    if table == EPOCHS_TABLE and len(set(raw["epoch"].to_pylist())) != raw.num_rows:
        return "the same epoch twice"
    return None


def _snapshot_problem(
    table: TableName, rows: pa.Table, sweep: str
) -> tuple[str | None, dict[str, Source]]:
    """The per-stage file behind each stage's rows of a snapshot, or why it is not this
    sweep's snapshot of `table` (`_OTHER_VERSION`: a snapshot to ignore, not a damaged one)."""
    meta = rows.schema.metadata or {}
    schema = SCHEMAS[table]
    declared = meta.get(b"nptm.table", table.encode()).decode("utf-8", "replace")
    if declared != table:
        return f"a {declared} table, not the {table} snapshot", {}
    if _SOURCES_KEY not in meta:
        return "not a snapshot (no record of the per-stage files behind its rows)", {}
    version = meta.get(b"nptm.schema_version")
    if version is not None and version != (schema.metadata or {}).get(b"nptm.schema_version"):
        return _OTHER_VERSION, {}
    if not rows.schema.equals(schema, check_metadata=False):
        return f"not the schema of the {table} table", {}
    listed = json.loads(meta[_SOURCES_KEY])
    if not isinstance(listed, dict):
        return "not a snapshot (its record of per-stage files is not a mapping)", {}
    sources = {str(sid): Source(str(f), int(t), int(n)) for sid, (f, t, n) in listed.items()}
    ids = set(pc.unique(rows["stage_id"]).to_pylist())
    if not ids <= set(sources):
        return "rows of stages it names no per-stage file for", {}
    if rows.num_rows and pc.unique(rows["sweep"]).to_pylist() != [sweep]:
        return f"rows of another sweep than {sweep}", {}
    if table == STAGES_TABLE and len(ids) != rows.num_rows:
        return "the same stage twice", {}
    return None, sources


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _current_layout(data: pa.Table, schema: pa.Schema) -> pa.Table:
    """A stage file's rows in the current schema: version 1's key column renamed, columns
    added since then null."""
    if LEGACY_KEY in data.column_names:
        data = data.rename_columns(
            ["stage_id" if n == LEGACY_KEY else n for n in data.column_names]
        )
    columns = [
        data[f.name] if f.name in data.column_names else pa.nulls(data.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, names=schema.names).cast(schema)


_NULLABLE_DTYPES = {
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
}


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    # Nullable integer/bool dtypes keep a budget of 40 an integer even when some rows are null.
    return table.to_pandas(types_mapper=_NULLABLE_DTYPES.get)
