"""The Parquet store: the source of truth of every sweep.

Layout under a storage root (a local path or a URI such as ``s3://bucket/prefix``; see
trainables.layout)::

    <storage>/sweeps/<sweep>/stages/<stage_id>.parquet   one row: the stage's outcome
    <storage>/sweeps/<sweep>/epochs/<stage_id>.parquet   one row per epoch of that stage

One file per stage means a rerun of a stage replaces its file rather than appending, and workers
never contend for a file. Each directory is a Parquet dataset:
``pandas.read_parquet('<dir>')``, ``pyarrow.dataset.dataset('<dir>')`` or, in DuckDB,
``SELECT * FROM read_parquet('<storage>/sweeps/<sweep>/stages/*.parquet')``.
Files are written atomically (temporary name in the same directory, then a rename; on object
stores a single PUT is already atomic), and temporary names start with a dot and do not end in
``.parquet``, so every reader above skips them.

Sweeps written with schema version 1 (``trials/<trial_id>.parquet``, key column ``trial_id``)
are read as if they were current; a stage written again lands in the current layout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from results.schema import LEGACY_KEY, SCHEMAS, SchemaError, TableName, rows_to_table
from trainables.layout import EPOCHS_TABLE, LEGACY_STAGES_TABLE, STAGES_TABLE, Layout, check_name
from trainables.storage import atomic_write_bytes

log = logging.getLogger(__name__)

_KEYS = ("sweep", "stage_id", "stage_kind")  # what an epoch row shares with its stage row


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

    def _file_infos(self, table: TableName) -> list[pafs.FileInfo]:
        """The table's stage files; for `stages`, version-1 files of stages not rewritten since."""
        dirs = [table] + ([LEGACY_STAGES_TABLE] if table == STAGES_TABLE else [])
        found: dict[str, pafs.FileInfo] = {}
        for name in dirs:
            selector = pafs.FileSelector(self.table_dir(name), allow_not_found=True)
            for i in self.fs.get_file_info(selector):
                if (
                    i.type == pafs.FileType.File
                    and i.base_name.endswith(".parquet")
                    and not i.base_name.startswith((".", "_"))
                ):
                    found.setdefault(i.base_name, i)  # the current layout first
        return [found[name] for name in sorted(found)]

    def stage_ids(self) -> list[str]:
        """Ids of the stages with a stored outcome (from file names; nothing is read)."""
        return [i.base_name.removesuffix(".parquet") for i in self._file_infos(STAGES_TABLE)]

    def read_table(self, table: TableName) -> pa.Table:
        """The whole table as Arrow, with exactly the current schema.

        Opening one small file costs milliseconds, so a consolidated copy of what was read
        is kept in ``<sweep>/.nptm-cache/<table>.parquet`` together with each file's size and
        modification time; later reads only open the stage files that are new or changed.
        The per-stage files stay the source of truth: the cache is rebuilt from them whenever
        it is missing, unreadable or out of date.
        """
        infos = self._file_infos(table)
        schema = SCHEMAS[table]
        if not infos:
            return schema.empty_table()
        current = {self._key(i): (i.mtime_ns, i.size) for i in infos}
        cached = self._read_cache(table)
        if cached is not None:
            stamps = zip(
                cached[_FILE].to_pylist(),
                cached[_MTIME].to_pylist(),
                cached[_SIZE].to_pylist(),
                strict=True,
            )
            valid = [current.get(f) == (m, z) for f, m, z in stamps]
            kept = cached.filter(pa.array(valid, pa.bool_()))
            have = set(kept[_FILE].to_pylist())
        else:
            kept, have = None, set()
        fresh = [i for i in infos if self._key(i) not in have]
        parts = [kept] if kept is not None else []
        if fresh:
            parts.append(self._read_files(table, fresh))
        combined = pa.concat_tables(parts) if parts else _cache_schema(schema).empty_table()
        if fresh or (cached is not None and kept is not None and kept.num_rows != cached.num_rows):
            self._write_cache(table, combined)
        return combined.drop_columns([_FILE, _MTIME, _SIZE]).cast(schema)

    def _key(self, info: pafs.FileInfo) -> str:
        """A file's name in the cache: its path inside the sweep directory."""
        return info.path.removeprefix(self.sweep_dir + "/")

    def _read_files(self, table: TableName, infos: list[pafs.FileInfo]) -> pa.Table:
        schema = SCHEMAS[table]
        cache_schema = _cache_schema(schema)
        stamp = {i.path: (self._key(i), i.mtime_ns, i.size) for i in infos}
        dataset = ds.dataset(list(stamp), format="parquet", filesystem=self.fs)
        parts = []
        for fragment in dataset.get_fragments():
            data = _current_layout(fragment.to_table(), schema)
            name, mtime, size = stamp[fragment.path]
            n = data.num_rows
            extra = [
                pa.array([name] * n, pa.string()),
                pa.array([mtime] * n, pa.int64()),
                pa.array([size] * n, pa.int64()),
            ]
            parts.append(pa.Table.from_arrays([*data.columns, *extra], schema=cache_schema))
        return pa.concat_tables(parts) if parts else cache_schema.empty_table()

    def _cache_path(self, table: TableName) -> str:
        return self.layout.read_cache(self.sweep, table)

    def _read_cache(self, table: TableName) -> pa.Table | None:
        try:
            cached = pq.read_table(self._cache_path(table), filesystem=self.fs)
        except (OSError, pa.ArrowException):
            return None  # missing or unreadable: rebuild from the stage files
        if not cached.schema.equals(_cache_schema(SCHEMAS[table]), check_metadata=False):
            return None  # written by another schema version
        return cached

    def _write_cache(self, table: TableName, data: pa.Table) -> None:
        try:
            self._write_atomic(data, self._cache_path(table))
        except (OSError, pa.ArrowException) as err:  # e.g. read-only storage: just slower
            log.debug("cannot write the read cache of %s: %s", self, err)

    def read_stages(self) -> pd.DataFrame:
        return _to_pandas(self.read_table(STAGES_TABLE))

    def read_epochs(self) -> pd.DataFrame:
        return _to_pandas(self.read_table(EPOCHS_TABLE))


_FILE, _MTIME, _SIZE = "__file", "__mtime_ns", "__size"


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


def _cache_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema(
        [
            *schema,
            pa.field(_FILE, pa.string()),
            pa.field(_MTIME, pa.int64()),
            pa.field(_SIZE, pa.int64()),
        ]
    )


_NULLABLE_DTYPES = {
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
}


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    # Nullable integer/bool dtypes keep a budget of 40 an integer even when some rows are null.
    return table.to_pandas(types_mapper=_NULLABLE_DTYPES.get)
