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
)
from nptm.trainables.storage import atomic_write_bytes, read_bytes

log = logging.getLogger(__name__)

_KEYS = ("sweep", "stage_id", "stage_kind")  # what an epoch row shares with its stage row


class Source(NamedTuple):
    """A per-stage file of a table: its path inside the sweep directory, time and size."""

    file: str
    mtime_ns: int
    size: int


_Merged = tuple[pa.Table, dict[str, Source], bool]
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
        self.sweep = check_name("sweep", sweep)
        self.storage = self.layout.storage
        self.fs, self.root, self.local = self.layout.fs, self.layout.root, self.layout.local
        self.sweep_dir = self.layout.sweep_dir(sweep)
        self._snapshots: dict[str, tuple[tuple[int, int], tuple[pa.Table, dict[str, Source]]]] = {}
        self._last_compact = time.monotonic()

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
        pq.write_table(table, buf)
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
        """Ids of the stages with a stored outcome (from file names; nothing is read)."""
        return list(self._sources(STAGES_TABLE))

    def read_table(self, table: TableName) -> pa.Table:
        """The whole table as Arrow, with exactly the current schema, sorted by stage (and
        epoch).

        Read from the table's snapshot (``<sweep>/<table>.parquet``) plus every per-stage file
        that is newer than it; the per-stage files stay the source of truth (a snapshot row
        whose file changed or vanished is not used). A read that had to open more than
        `COMPACT_AFTER_FILES` per-stage files writes a new snapshot (best effort), so the next
        read does not open them again.
        """
        merged, fresh = self._merge(table)
        if fresh > COMPACT_AFTER_FILES:
            self._write_snapshot(table, merged, best_effort=True)
        return merged[0]

    def compact(self) -> None:
        """Bring both snapshots up to date with the per-stage files (one read of each file
        newer than the snapshot, one write of each snapshot that changed)."""
        for table in (STAGES_TABLE, EPOCHS_TABLE):
            merged, fresh = self._merge(table)
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

    def _merge(self, table: TableName) -> tuple[_Merged, int]:
        """(table, its sources, whether the snapshot had rows to drop) and how many per-stage
        files were read."""
        sources = self._sources(table)
        snapshot = self._read_snapshot(table)
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
            parts.append(self._read_files(table, fresh))
        schema = SCHEMAS[table]
        data = pa.concat_tables(parts) if parts else schema.empty_table()
        keys = [("stage_id", "ascending")] + (
            [("epoch", "ascending")] if table == EPOCHS_TABLE else []
        )
        return (data.sort_by(keys), sources, stale), len(fresh)

    def _read_files(self, table: TableName, sources: list[Source]) -> pa.Table:
        """The rows of these per-stage files, concurrently (object stores answer each read in
        milliseconds, one at a time)."""
        schema = SCHEMAS[table]

        def read(src: Source) -> pa.Table:
            data = read_bytes(self.fs, f"{self.sweep_dir}/{src.file}")
            if data is None:
                return schema.empty_table()  # removed since the listing
            return _current_layout(pq.read_table(pa.BufferReader(data)), schema)

        with ThreadPoolExecutor(READ_THREADS) as pool:
            parts = list(pool.map(read, sources))
        return pa.concat_tables(parts) if parts else schema.empty_table()

    def snapshot_path(self, table: TableName) -> str:
        return self.layout.snapshot_file(self.sweep, table)

    def _read_snapshot(self, table: TableName) -> tuple[pa.Table, dict[str, Source]] | None:
        """The snapshot's rows and the per-stage file behind each stage's rows; None when it is
        missing, unreadable or of another schema version. Kept in memory while the file is
        unchanged."""
        path = self.snapshot_path(table)
        info = self.fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return None
        stamp = (info.mtime_ns, info.size)
        memo = self._snapshots.get(table)
        if memo is not None and memo[0] == stamp:
            return memo[1]
        try:
            data = read_bytes(self.fs, path)
            if data is None:
                return None
            rows = pq.read_table(pa.BufferReader(data))
            meta = json.loads((rows.schema.metadata or {})[_SOURCES_KEY])
            sources = {sid: Source(*src) for sid, src in meta.items()}
        except (OSError, pa.ArrowException, KeyError, ValueError, TypeError) as err:
            log.debug("ignoring the snapshot %s: %s", path, err)
            return None  # rebuilt from the per-stage files by the next compaction
        if not rows.schema.equals(SCHEMAS[table], check_metadata=False):
            return None  # written by another schema version
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
