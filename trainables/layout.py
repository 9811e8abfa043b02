"""Where everything lives under a storage root, and the one rule for names used in paths.

    <root>/stages/<stage_id>/<file>          a stage's artifacts and outcome (.artifacts)
    <root>/stages/_index/*.parquet           the index of stored outcomes (.stage_index)
    <root>/sweeps/<sweep>/stages/<id>.parquet  one row per stage (nptm.results.store): the
                                             crash-safe write path and the source of truth
    <root>/sweeps/<sweep>/epochs/<id>.parquet  one row per epoch of that stage
    <root>/sweeps/<sweep>/stages.parquet     snapshot: every stage row in one file, compacted
    <root>/sweeps/<sweep>/epochs.parquet     at the end of a sweep and every few minutes of it
    <root>/sweeps/<sweep>/report/            `nptm report`'s output (any storage)
    <root>/sweeps/<sweep>/run/               the record of what ran: grid file, plan.json,
                                             versions; progress.json while a sweep runs
    <root>/mlflow.db                         embedded MLflow store (local storage)
    <root>/_ray                              Ray Tune / Ray Train storage

The stage index (`stages/_index/`) lets a sweep start without reading one ``outcome.json``
per stage: it holds every outcome the driver accepted, each with the size and modification
time its ``outcome.json`` had. At start one listing of ``stages/`` (one request per 1,000
files on an object store) shows which outcomes exist and whether they changed since; only new
or changed ones are read. It is a cache of the outcomes: deleting it costs one read per stage
at the next start, after which it is whole again. Its files are written once and never
changed: small ``part-*`` files as stages finish, merged now and then into one ``base-*``.

The snapshots (``stages.parquet``, ``epochs.parquet``) are what to open with pandas or
DuckDB once a sweep has ended; while it runs they lag the per-stage files by a few minutes,
and nptm's readers (`nptm.results.store.SweepStore`) add whatever is newer. Their Parquet
metadata names the per-stage file (and its size and time) behind each stage's rows.

Sweeps written before schema version 2 keep their stage rows in ``sweeps/<sweep>/trials/``;
`LEGACY_STAGES_TABLE` names that directory for readers.

A URI may carry options in its query (``s3://bucket/root?endpoint_override=host:9000&
scheme=http``); paths built from the storage as given keep the query at the end.

Torch-free: the driver, Tune's trial actors and the results package import it.
"""

from __future__ import annotations

import os
import re
from functools import cached_property

import pyarrow.fs as pafs

from nptm.trainables.storage import is_local_storage, resolve_storage

STAGES_TABLE, EPOCHS_TABLE = "stages", "epochs"
LEGACY_STAGES_TABLE = "trials"  # schema version 1
LEGACY_READ_CACHE = ".nptm-cache"  # the hidden read cache the snapshots replaced
STAGE_INDEX = "_index"  # under stages/; never a stage id (those start with a letter or digit)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A sweep's name names its directory, MLflow experiment and Ray run (a grid's `name`).
SWEEP_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
SWEEP_NAME_RULE = "1-64 lowercase letters, digits, '_' or '-', starting with a letter or digit"


def check_name(kind: str, name: str) -> str:
    """`name` if it is safe as one path component (stage id, artifact), else ValueError.

    Letters, digits, '.', '_' and '-', starting with a letter or digit, no '..': nothing that
    could escape the storage root or hide from a directory listing.
    """
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


def check_sweep_name(name: str) -> str:
    """`name` if it is a sweep name (`SWEEP_NAME_RE`), else ValueError saying why not."""
    if isinstance(name, str) and SWEEP_NAME_RE.fullmatch(name):
        return name
    check_name("sweep", name)  # an unsafe path component: say what makes it unsafe
    raise ValueError(f"sweep name {name!r} is not valid: use {SWEEP_NAME_RULE}")


class Layout:
    """The paths of one storage root: `storage` as given, `root` the path inside `fs`.

    The filesystem is resolved on first use: deciding where MLflow or Ray live needs no
    connection to an object store.
    """

    def __init__(
        self, storage: str | os.PathLike[str], *, filesystem: pafs.FileSystem | None = None
    ) -> None:
        """`filesystem` replaces the one resolved from `storage` (tests, custom credentials)."""
        self.storage = os.fspath(storage)
        if filesystem is not None:
            local = filesystem.type_name == "local"
            self.__dict__["_resolved"] = (filesystem, self.storage.rstrip("/"), local)

    @cached_property
    def _resolved(self) -> tuple[pafs.FileSystem, str, bool]:
        return resolve_storage(self.storage)

    @property
    def fs(self) -> pafs.FileSystem:
        return self._resolved[0]

    @property
    def root(self) -> str:
        return self._resolved[1]

    @property
    def local(self) -> bool:
        return self._resolved[2]

    # -- stages ----------------------------------------------------------------------------
    @property
    def stages_dir(self) -> str:
        return f"{self.root}/stages"

    @property
    def stage_index_dir(self) -> str:
        return f"{self.stages_dir}/{STAGE_INDEX}"

    def stage_dir(self, stage_id: str) -> str:
        return f"{self.stages_dir}/{check_name('stage id', stage_id)}"

    def stage_file(self, stage_id: str, name: str) -> str:
        return f"{self.stage_dir(stage_id)}/{check_name('artifact', name)}"

    # -- sweeps ----------------------------------------------------------------------------
    def sweep_dir(self, sweep: str) -> str:
        return f"{self.root}/sweeps/{check_sweep_name(sweep)}"

    def sweep_location(self, sweep: str) -> str:
        """The sweep directory as a user names it: under the storage as given, so a URI keeps
        its scheme and options and nothing is resolved."""
        return self.location("sweeps", check_sweep_name(sweep))

    def location(self, *parts: str) -> str:
        """`parts` under the storage as given (a URI's query stays at the end)."""
        base, sep, query = self.storage.partition("?")
        return "/".join([base.rstrip("/"), *parts]) + sep + query

    def table_dir(self, sweep: str, table: str) -> str:
        return f"{self.sweep_dir(sweep)}/{table}"

    def table_file(self, sweep: str, table: str, stage_id: str) -> str:
        return f"{self.table_dir(sweep, table)}/{check_name('stage_id', stage_id)}.parquet"

    def snapshot_file(self, sweep: str, table: str) -> str:
        """The compacted copy of a table: all its per-stage files in one."""
        return f"{self.sweep_dir(sweep)}/{table}.parquet"

    def run_dir(self, sweep: str) -> str:
        """The record of what ran (written by `nptm sweep`, read by `nptm status`)."""
        return f"{self.sweep_dir(sweep)}/run"

    def run_file(self, sweep: str, name: str) -> str:
        return f"{self.run_dir(sweep)}/{check_name('run record', name)}"

    def report_dir(self, sweep: str) -> str:
        """Where `nptm report` writes, beside the sweep's tables (a path inside `fs`)."""
        return f"{self.sweep_dir(sweep)}/report"

    def report_location(self, sweep: str) -> str:
        """`report_dir` as a user names it (see `sweep_location`)."""
        return self.location("sweeps", check_sweep_name(sweep), "report")

    # -- services --------------------------------------------------------------------------
    @property
    def mlflow_db(self) -> str | None:
        """The embedded MLflow sqlite file, or None when the storage is not local."""
        return f"{self.root}/mlflow.db" if is_local_storage(self.storage) else None

    @property
    def ray_dir(self) -> str:
        """Ray's storage path: a local path, or a URI that Ray resolves itself."""
        if "://" in self.storage:
            return self.location("_ray")
        return f"{self.root}/_ray"
