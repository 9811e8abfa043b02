"""The storage root of artifacts and results: a local path or a URI (s3://, gs://, hdfs://,
file://) through pyarrow.fs; the check, before any work, that it can be written; and writes
into it that readers never see half done.

Torch-free: the driver, Tune's trial actors and the results package import it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from nptm.trainables.redact import redact_uri, storage_credentials_error

log = logging.getLogger(__name__)

DEFAULT_MIN_FREE_GB = 1.0
# Object stores: one PUT is atomic (and a "rename" is a copy). Elsewhere: temporary + rename.
_OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})


class StorageError(RuntimeError):
    """The storage root cannot be used (not writable, not enough free space)."""


def resolve_storage(storage: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, root path inside it, is_local) for a local path or a URI.

    A relative path is the caller's working directory, made absolute here: Ray runs workers
    elsewhere. A URI that carries credentials is refused (StorageError; see
    nptm.trainables.redact.storage_credentials_error).
    """
    storage = os.fspath(storage)
    if "://" not in storage:
        storage = os.path.abspath(os.path.expanduser(storage))
    refused = storage_credentials_error(storage)
    if refused:
        raise StorageError(refused)
    fs, root = pafs.FileSystem.from_uri(storage)
    return fs, root.rstrip("/") or root, fs.type_name == "local"


def is_local_storage(storage: str) -> bool:
    return "://" not in storage or storage.startswith("file://")


def atomic_write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn
    one, and a failed write (disk full, I/O error) leaves no stray temporary behind.

    Temporary names start with a dot and end in `.tmp`, so Parquet dataset readers and
    `*.parquet` globs skip them.
    """
    directory, name = path.rsplit("/", 1)
    tmp = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(directory, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the rename must not publish unwritten blocks
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    if fs.type_name in _OBJECT_STORES:
        # One PUT is atomic; an object store has no directories to create (pyarrow would
        # probe and mark every level of the path: requests for nothing).
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    fs.create_dir(directory, recursive=True)
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def replace_dir(source: str | os.PathLike[str], fs: pafs.FileSystem, path: str) -> None:
    """Make `path` in `fs` a copy of the local directory `source` (files of an earlier copy
    that `source` no longer has are removed)."""
    source = os.path.abspath(source)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.abspath(path) == source:
        return
    fs.create_dir(path, recursive=True)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    pafs.copy_files(
        source, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The file's bytes, or None if it does not exist."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as err:  # pyarrow reports some missing files as generic OSErrors
        if "not found" in str(err).lower() or "no such file" in str(err).lower():
            return None
        raise


@dataclass(frozen=True)
class Damaged:
    """A stored file a reader refused: unreadable (truncated, empty, garbled), of another
    shape, or foreign (another stage's or sweep's). `file` names it as a user would (under
    the storage as given); `moved_to` is where it was set aside, None when it was left in place
    for the next write to replace (a snapshot, the run record)."""

    file: str
    reason: str
    moved_to: str | None = None
    stage_id: str | None = None  # the stage whose data it held, when it held one stage's

    def __str__(self) -> str:
        if self.moved_to is None:
            return f"{self.file}: {self.reason}"
        return f"{self.file}: {self.reason} (set aside as {self.moved_to.rsplit('/', 1)[-1]})"

    def to_dict(self) -> dict[str, str | None]:
        return {
            "file": self.file,
            "reason": self.reason,
            "moved_to": self.moved_to,
            "stage_id": self.stage_id,
        }


DAMAGED_MARK = ".damaged-"  # _<name>.damaged-<ns>: a refused file, kept for a human to see


def set_aside(fs: pafs.FileSystem, path: str) -> str | None:
    """Move a damaged file out of every reader's way, to ``_<name>.damaged-<ns>`` beside it,
    and return where; None when it could not be moved (gone already, read-only storage):
    readers then keep skipping it. No reader of nptm opens such a name, and the leading
    underscore keeps Parquet dataset readers (pyarrow, pandas, DuckDB's globs, Spark) from
    taking it for part of a table."""
    directory, name = path.rsplit("/", 1)
    aside = f"{directory}/_{name}{DAMAGED_MARK}{time.time_ns()}"
    try:
        fs.move(path, aside)
    except (OSError, pa.ArrowException) as err:
        log.warning("could not set aside the damaged file %s: %s", path, err)
        return None
    return aside


def check_writable(
    storage: str | os.PathLike[str], *, min_free_gb: float = DEFAULT_MIN_FREE_GB
) -> None:
    """Raise StorageError unless `storage` can be written (and, if local, has enough space).

    Called before any training so a sweep does not discover a read-only or full disk hours in.
    """
    fs, root, local = resolve_storage(storage)
    shown = root if local else redact_uri(os.fspath(storage))
    if local:
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as err:
            raise StorageError(f"storage root {shown} cannot be created: {err}") from err
        if not os.access(root, os.W_OK | os.X_OK):
            raise StorageError(f"storage root {shown} is not writable")
        free_gb = shutil.disk_usage(root).free / 2**30
        if free_gb < min_free_gb:
            raise StorageError(
                f"storage root {shown} has {free_gb:.2f} GiB free, less than the required "
                f"{min_free_gb:g} GiB"
            )
    probe = f"{root}/.nptm-write-probe-{uuid.uuid4().hex}"
    try:
        if not local:
            fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except (OSError, pa.ArrowException) as err:
        raise StorageError(f"storage root {shown} is not writable: {err}") from err
