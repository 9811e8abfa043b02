"""The Parquet store: the source of truth of every sweep.

Layout under a storage root (a local path or a URI such as ``s3://bucket/prefix``)::

    <storage>/sweeps/<sweep>/trials/<trial_id>.parquet   one row: the stage's outcome
    <storage>/sweeps/<sweep>/epochs/<trial_id>.parquet   one row per epoch of that stage

One file per stage means a rerun of a stage replaces its file rather than appending, and workers
never contend for a file. Each directory is a Parquet dataset:
``pandas.read_parquet('<dir>')``, ``pyarrow.dataset.dataset('<dir>')`` or, in DuckDB,
``SELECT * FROM read_parquet('<storage>/sweeps/<sweep>/trials/*.parquet')``.
Files are written atomically (temporary name in the same directory, then a rename; on object
stores a single PUT is already atomic), and temporary names start with a dot and do not end in
``.parquet``, so every reader above skips them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from results.schema import SCHEMAS, SchemaError, TableName, rows_to_table
from trainables.storage import atomic_write_bytes, resolve_storage

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_name(kind: str, name: str) -> str:
    """Reject names that could escape the storage root or make awkward paths."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
    if name.startswith(("/", "\\")) or os.path.isabs(name):
        raise ValueError(f"{kind} name {name!r} must not be an absolute path")
    if "/" in name or "\\" in name:
        raise ValueError(f"{kind} name {name!r} must not contain a path separator")
    if ".." in name:
        raise ValueError(f"{kind} name {name!r} must not contain '..'")
    if not _NAME_RE.match(name):
        raise ValueError(
            f"{kind} name {name!r} may only use letters, digits, '.', '_' and '-', "
            "and must start with a letter or digit"
        )
    return name


def list_sweeps(storage: str | os.PathLike[str]) -> list[str]:
    """Names of the sweeps stored under `storage`."""
    fs, root, _ = resolve_storage(storage)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/sweeps", allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


class SweepStore:
    """Reads and writes one sweep's `trials` and `epochs` tables."""

    def __init__(
        self,
        storage: str | os.PathLike[str],
        sweep: str,
        *,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        """`filesystem` replaces the one resolved from `storage` (tests, custom credentials)."""
        self.sweep = check_name("sweep", sweep)
        self.storage = os.fspath(storage)
        if filesystem is None:
            self.fs, self.root, self.local = resolve_storage(storage)
        else:
            self.fs, self.root = filesystem, self.storage.rstrip("/")
            self.local = filesystem.type_name == "local"
        self.sweep_dir = f"{self.root}/sweeps/{self.sweep}"

    def __repr__(self) -> str:
        return f"SweepStore({self.storage!r}, {self.sweep!r})"

    def table_dir(self, table: TableName) -> str:
        return f"{self.sweep_dir}/{table}"

    @property
    def local_dir(self) -> Path | None:
        """The sweep directory as a local path, or None on remote storage."""
        return Path(self.sweep_dir) if self.local else None

    # -- writing ---------------------------------------------------------------------------

    def write_stage(
        self, trial_row: Mapping[str, Any], epoch_rows: Iterable[Mapping[str, Any]] = ()
    ) -> None:
        """Store one stage's outcome, replacing any earlier outcome of the same stage.

        `sweep`, `trial_id` and `stage_kind` may be left out of the epoch rows (they are taken
        from the trial row). Everything is validated before anything is written.
        """
        trial = dict(trial_row)
        trial.setdefault("sweep", self.sweep)
        if trial["sweep"] != self.sweep:
            raise SchemaError(
                f"trials row: column 'sweep' is {trial['sweep']!r} but the store is for "
                f"sweep {self.sweep!r}"
            )
        trial_table = rows_to_table("trials", [trial])
        trial_id = check_name("trial_id", trial_table["trial_id"][0].as_py())
        kind = trial_table["stage_kind"][0].as_py()
        epochs = []
        seen: set[Any] = set()
        for i, row in enumerate(epoch_rows):
            row = {"sweep": self.sweep, "trial_id": trial_id, "stage_kind": kind, **row}
            for key, want in (("sweep", self.sweep), ("trial_id", trial_id), ("stage_kind", kind)):
                if row[key] != want:
                    raise SchemaError(
                        f"epochs row {i}: column {key!r} is {row[key]!r} but the trial row "
                        f"has {want!r}"
                    )
            if row.get("epoch") in seen:
                raise SchemaError(f"epochs row {i}: duplicate epoch {row['epoch']!r}")
            seen.add(row.get("epoch"))
            epochs.append(row)
        epoch_table = rows_to_table("epochs", epochs)

        # Epochs first: a trial row on disk then always has its epochs next to it.
        epoch_path = self._path("epochs", trial_id)
        if epoch_table.num_rows:
            self._write_atomic(epoch_table, epoch_path)
        else:
            self._delete_if_exists(epoch_path)
        self._write_atomic(trial_table, self._path("trials", trial_id))

    def _path(self, table: TableName, trial_id: str) -> str:
        return f"{self.table_dir(table)}/{trial_id}.parquet"

    def _write_atomic(self, table: pa.Table, path: str) -> None:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        atomic_write_bytes(self.fs, path, buf.getvalue().to_pybytes())

    def _delete_if_exists(self, path: str) -> None:
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_file(path)

    # -- reading ---------------------------------------------------------------------------

    def _file_infos(self, table: TableName) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info(
            pafs.FileSelector(self.table_dir(table), allow_not_found=True)
        )
        return sorted(
            (
                i
                for i in infos
                if i.type == pafs.FileType.File
                and i.base_name.endswith(".parquet")
                and not i.base_name.startswith((".", "_"))
            ),
            key=lambda i: i.base_name,
        )

    def trial_ids(self) -> list[str]:
        """Ids of the stages with a stored outcome (from file names; nothing is read)."""
        return [i.base_name.removesuffix(".parquet") for i in self._file_infos("trials")]

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
        current = {i.base_name: (i.mtime_ns, i.size) for i in infos}
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
        fresh = [i for i in infos if i.base_name not in have]
        parts = [kept] if kept is not None else []
        if fresh:
            parts.append(self._read_files(table, fresh))
        combined = pa.concat_tables(parts) if parts else _cache_schema(schema).empty_table()
        if fresh or (cached is not None and kept is not None and kept.num_rows != cached.num_rows):
            self._write_cache(table, combined)
        return combined.drop_columns([_FILE, _MTIME, _SIZE]).cast(schema)

    def _read_files(self, table: TableName, infos: list[pafs.FileInfo]) -> pa.Table:
        schema = SCHEMAS[table]
        cache_schema = _cache_schema(schema)
        stamp = {i.path: (i.base_name, i.mtime_ns, i.size) for i in infos}
        dataset = ds.dataset(list(stamp), schema=schema, format="parquet", filesystem=self.fs)
        batches = []
        for tagged in dataset.scanner().scan_batches():  # each batch knows its file
            batch = tagged.record_batch
            name, mtime, size = stamp[tagged.fragment.path]
            n = batch.num_rows
            extra = [
                pa.array([name] * n, pa.string()),
                pa.array([mtime] * n, pa.int64()),
                pa.array([size] * n, pa.int64()),
            ]
            batches.append(
                pa.RecordBatch.from_arrays([*batch.columns, *extra], schema=cache_schema)
            )
        return pa.Table.from_batches(batches, schema=cache_schema)

    def _cache_path(self, table: TableName) -> str:
        return f"{self.sweep_dir}/{_CACHE_DIR}/{table}.parquet"

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

    def read_trials(self) -> pd.DataFrame:
        return _to_pandas(self.read_table("trials"))

    def read_epochs(self) -> pd.DataFrame:
        return _to_pandas(self.read_table("epochs"))


_CACHE_DIR = ".nptm-cache"
_FILE, _MTIME, _SIZE = "__file", "__mtime_ns", "__size"


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
