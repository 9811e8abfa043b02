"""The index of stored stage outcomes: what lets a sweep of 10,000 stages start without one
read of ``outcome.json`` per stage (one request each on an object store).

Files under ``<root>/stages/_index/`` (nptm.trainables.layout), each a small Parquet table of
entries ``(stage_id, at_ns, size, mtime_ns, outcome)``:

    part-<ns>-<hex>.parquet   entries written together (the driver batches them as stages end)
    base-<ns>-<hex>.parquet   several files merged into one (`consolidate`)

A file is written once (atomically) and never changed, so any number of processes may add
files at once; the newest entry of a stage (`at_ns`) wins, and an entry without an outcome
drops the stage (`ArtifactStore.invalidate`). `consolidate` merges the files it listed into a
new base and then deletes exactly those: a file written meanwhile survives it, and two
consolidations at once leave two bases that merge to the same entries.

What the index may skip, and what not: an entry stands for a stage only while the listing of
``stages/`` shows that stage's ``outcome.json`` with the size and modification time the entry
recorded (`Stamp`). A deleted outcome (missing from the listing) is never taken from the index;
a rewritten or garbled one (another size or time) is read again, as without an index. Payload
checksums are not verified at start, with or without the index: a damaged payload is found by
the stage that loads it, which has its producer recomputed (trial.py). A rewrite that keeps
both the size and the modification time (object stores keep times to the second or
millisecond) would go unnoticed.

Damaged and foreign files cost their stage, never the start. An index file that does not read
(truncated, empty, garbled: its pages carry CRC checksums) or is not an index file is set
aside as ``_<name>.damaged-<ns>`` with a warning, and its stages are read from their outcomes.
An outcome (indexed or read) is checked against the stage it is stored for: one that does not
parse, names another stage, or is of another kind than the plan's stage is refused; a refused
``outcome.json`` is set aside the same way, and its stage runs again.

Torch-free: the driver imports it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nptm.trainables.layout import STAGE_INDEX, Layout
from nptm.trainables.stage import StageOutcome
from nptm.trainables.storage import Damaged, atomic_write_bytes, read_bytes, set_aside

log = logging.getLogger(__name__)

OUTCOME_FILE = "outcome.json"
ENTRY_SCHEMA = pa.schema(
    [
        pa.field("stage_id", pa.string(), nullable=False),
        pa.field("at_ns", pa.int64(), nullable=False),  # when the entry was made
        pa.field("size", pa.int64()),  # of outcome.json; null: the stage was dropped
        pa.field("mtime_ns", pa.int64()),
        pa.field("outcome", pa.string()),  # the outcome as JSON (StageOutcome.to_dict)
    ]
)
FLUSH_ENTRIES = 256  # a batch of entries becomes one file at this size...
FLUSH_SECONDS = 60.0  # ...or this long after its first entry
CONSOLIDATE_FILES = 16  # more index files than this are merged into one
READ_THREADS = 16  # concurrent reads (object stores answer each in milliseconds)


@dataclass(frozen=True)
class Stamp:
    """Size and modification time of a stage's outcome.json, as a directory listing shows it."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, info: pafs.FileInfo) -> Stamp:
        return cls(info.size, info.mtime_ns or 0)


@dataclass(frozen=True)
class StageFiles:
    """One listing of ``stages/``: the stamp of every stored outcome, and every stage's files
    (as ``<stage_id>/<name>``)."""

    outcomes: dict[str, Stamp]
    files: frozenset[str]

    def has(self, stage_id: str, name: str) -> bool:
        return f"{stage_id}/{name}" in self.files


def list_stage_files(layout: Layout) -> StageFiles:
    """Every stage's files, from one recursive listing (paged: one request per 1,000 files
    on S3)."""
    top = layout.stages_dir
    selector = pafs.FileSelector(top, recursive=True, allow_not_found=True)
    outcomes: dict[str, Stamp] = {}
    files: set[str] = set()
    skip = len(top) + 1
    for info in layout.fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[skip:]
        stage_id, _, name = relative.partition("/")
        if stage_id == STAGE_INDEX or not name or "/" in name:
            continue
        files.add(relative)
        if name == OUTCOME_FILE:
            outcomes[stage_id] = Stamp(info.size, info.mtime_ns or 0)
    return StageFiles(outcomes, frozenset(files))


@dataclass(frozen=True)
class Entry:
    stage_id: str
    at_ns: int
    stamp: Stamp | None  # None: dropped
    outcome: str | None


class StageIndex:
    """Reads and adds to the index of one storage root. Entries wait in memory until `flush`
    (which `add` calls by itself every `FLUSH_ENTRIES` entries or `FLUSH_SECONDS`)."""

    def __init__(self, layout: Layout, damaged: list[Damaged] | None = None) -> None:
        """`damaged` collects the files refused by reads through this index: its own, and
        the outcomes `read_outcomes` reads."""
        self.layout = layout
        self._pending: list[Entry] = []
        self._first_pending = 0.0
        self.damaged: list[Damaged] = [] if damaged is None else damaged

    @property
    def fs(self) -> pafs.FileSystem:
        return self.layout.fs

    def add(self, outcome: StageOutcome | str, stage_id: str, stamp: Stamp) -> None:
        """Record that `stage_id`'s outcome.json, as stamped, holds `outcome`."""
        text = outcome if isinstance(outcome, str) else outcome_json(outcome)
        self._append(Entry(stage_id, time.time_ns(), stamp, text))

    def drop(self, stage_id: str) -> None:
        """Forget `stage_id`, in a file of its own written at once (a trial calls this; the
        driver, which batches and merges, may never hear of it)."""
        self._write("part", [Entry(stage_id, time.time_ns(), None, None)])

    def _append(self, entry: Entry) -> None:
        if not self._pending:
            self._first_pending = time.monotonic()
        self._pending.append(entry)
        if (
            len(self._pending) >= FLUSH_ENTRIES
            or time.monotonic() - self._first_pending >= FLUSH_SECONDS
        ):
            self.flush()

    def flush(self) -> None:
        """Write the waiting entries as one new file; merge the index when it has many."""
        if not self._pending:
            return
        entries, self._pending = self._pending, []
        self._write("part", entries)
        if len(self._files()) > CONSOLIDATE_FILES:
            self.consolidate()

    def entries(self) -> dict[str, Entry]:
        """The newest entry of every stage still indexed (flushed entries only)."""
        return _newest(self._read(self._files()))

    def consolidate(self) -> None:
        """Merge every index file into one and delete the merged files."""
        files = self._files()
        if len(files) < 2:
            return
        merged = _newest(self._read(files))
        self._write("base", list(merged.values()))
        for path in files:
            try:
                self.fs.delete_file(path)
            except FileNotFoundError:
                pass  # merged and deleted by another consolidation
            except OSError as err:
                if "not found" not in str(err).lower():
                    raise

    # -- files ------------------------------------------------------------------------------
    def _files(self) -> list[str]:
        selector = pafs.FileSelector(self.layout.stage_index_dir, allow_not_found=True)
        return sorted(
            i.path
            for i in self.fs.get_file_info(selector)
            if i.type == pafs.FileType.File
            and i.base_name.endswith(".parquet")
            and not i.base_name.startswith(".")
        )

    def _write(self, kind: str, entries: list[Entry]) -> None:
        table = pa.table(
            {
                "stage_id": [e.stage_id for e in entries],
                "at_ns": [e.at_ns for e in entries],
                "size": [e.stamp.size if e.stamp else None for e in entries],
                "mtime_ns": [e.stamp.mtime_ns if e.stamp else None for e in entries],
                "outcome": [e.outcome for e in entries],
            },
            schema=ENTRY_SCHEMA,
        )
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
        name = f"{kind}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        path = f"{self.layout.stage_index_dir}/{name}"
        atomic_write_bytes(self.fs, path, buf.getvalue().to_pybytes())

    def _read(self, files: list[str]) -> list[Entry]:
        def one(path: str) -> list[Entry]:
            data = read_bytes(self.fs, path)
            if data is None:
                return []  # merged away by a consolidation since the listing
            try:
                table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
                if not table.schema.equals(ENTRY_SCHEMA, check_metadata=False):
                    raise ValueError("not a stage index file (another schema)")
            except (pa.ArrowException, OSError, ValueError) as err:
                # Only a cache: its stages are read from their outcomes again.
                reason = f"unreadable ({_first_line(err)})"
                moved = set_aside(self.fs, path)
                name = path.rsplit("/", 1)[-1]
                self.damaged.append(
                    Damaged(self.layout.location("stages", STAGE_INDEX, name), reason, moved)
                )
                log.warning("stage index file %s set aside: %s", path, reason)
                return []
            return [
                Entry(
                    r["stage_id"],
                    r["at_ns"],
                    None if r["size"] is None else Stamp(r["size"], r["mtime_ns"]),
                    r["outcome"],
                )
                for r in table.to_pylist()
            ]

        with ThreadPoolExecutor(READ_THREADS) as pool:
            return [e for part in pool.map(one, files) for e in part]


def _newest(entries: Iterable[Entry]) -> dict[str, Entry]:
    newest: dict[str, Entry] = {}
    for e in entries:
        if e.stage_id not in newest or e.at_ns >= newest[e.stage_id].at_ns:
            newest[e.stage_id] = e
    return {sid: e for sid, e in newest.items() if e.stamp is not None}


def outcome_json(outcome: StageOutcome) -> str:
    """The one serialisation of an outcome (outcome.json and the index)."""
    return json.dumps(outcome.to_dict(), sort_keys=True, default=str)


def parse_outcome(data: bytes | str | None) -> StageOutcome | None:
    """The outcome in `data`; None when there is none or it is garbled (not JSON, not UTF-8 or
    not an outcome): the stage is then recomputed."""
    if data is None:
        return None
    try:
        return StageOutcome.from_dict(json.loads(data))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def check_outcome(
    data: bytes | str, stage_id: str, kind: str | None = None
) -> tuple[StageOutcome | None, str | None]:
    """The outcome in `data` if it is `stage_id`'s (and of `kind`, when given), else None and
    why not: garbled (not UTF-8, not JSON, not an outcome) or foreign (another stage's)."""
    outcome = parse_outcome(data)
    if outcome is None:
        return None, "garbled (not an outcome)" if data else "empty"
    if outcome.stage_id != stage_id:
        return None, f"the outcome of stage {outcome.stage_id}, not of {stage_id}"
    if kind is not None and outcome.kind != kind:
        return None, f"the outcome of a {outcome.kind.value} stage; {stage_id} is a {kind}"
    return outcome, None


def refuse_outcome(layout: Layout, stage_id: str, reason: str, damaged: list[Damaged]) -> None:
    """Set aside `stage_id`'s outcome.json, refused for `reason`, with a warning: the stage
    is then not done, and runs again."""
    path = layout.stage_file(stage_id, OUTCOME_FILE)
    moved = set_aside(layout.fs, path)
    refused = Damaged(layout.location("stages", stage_id, OUTCOME_FILE), reason, moved, stage_id)
    damaged.append(refused)
    then = "set aside" if moved else "ignored"
    log.warning("outcome of stage %s %s (the stage runs again): %s", stage_id, then, refused)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def read_outcomes(
    layout: Layout,
    index: StageIndex,
    stage_ids: Iterable[str],
    kinds: Mapping[str, str] | None = None,
) -> tuple[dict[str, StageOutcome], StageFiles]:
    """The stored outcome of each of `stage_ids` that has one, and the listing it was checked
    against. Indexed outcomes whose outcome.json is unchanged are taken from the index; the
    others are read (concurrently) and added to it. An outcome of another stage, or of another
    kind than `kinds` gives (stage id -> planned kind), is refused (`check_outcome`); a refused
    outcome.json is set aside (`refuse_outcome`)."""
    kinds = kinds or {}
    files = list_stage_files(layout)
    wanted = [sid for sid in stage_ids if sid in files.outcomes]
    indexed = index.entries() if wanted else {}
    found: dict[str, StageOutcome] = {}
    to_read: list[str] = []
    for sid in wanted:
        entry = indexed.get(sid)
        outcome = None
        if entry is not None and entry.stamp == files.outcomes[sid] and entry.outcome:
            outcome, problem = check_outcome(entry.outcome, sid, kinds.get(sid))
            if problem is not None:  # a damaged index: the file decides
                log.warning("stage index entry of %s not used: %s", sid, problem)
        if outcome is None:
            to_read.append(sid)
        else:
            found[sid] = outcome

    def read(sid: str) -> tuple[str, bytes | None]:
        return sid, read_bytes(layout.fs, layout.stage_file(sid, OUTCOME_FILE))

    with ThreadPoolExecutor(READ_THREADS) as pool:
        for sid, data in pool.map(read, to_read):
            if data is None:
                continue  # deleted since the listing
            outcome, problem = check_outcome(data, sid, kinds.get(sid))
            if outcome is None:
                refuse_outcome(layout, sid, problem or "refused", index.damaged)
                continue
            found[sid] = outcome
            # The listing's stamp: were the file rewritten since, the next start reads it again.
            index.add(outcome, sid, files.outcomes[sid])
    index.flush()
    return found, files
