"""Content-addressed artifact store for stage outputs (checkpoints, pruned models, outcomes).

Files of a stage's directory (`nptm.trainables.layout.Layout.stage_dir`) under the storage root (a
local path or any URI `pyarrow.fs` understands):

    <name>.pt          torch-serialised payload (tensors and plain types only)
    <name>.pt.sha256   its SHA-256, written after the payload
    attempts           how many times the stage was started (retries and resumes included)
    error.txt          why the last attempt failed
    outcome.json       the stage's `StageOutcome`; written last, it marks completion

and ``<root>/stages/_index/``, the index of outcomes (nptm.trainables.stage_index): the driver adds
each outcome it accepts (`index_outcome`, batched; `flush_index` at the end), and
`stored_outcomes` answers from it for every outcome.json that is unchanged since.

Every file is written to a temporary name and then moved into place, so a reader sees either
the old file or the new one, never a torn one. Every payload is verified against its checksum
on load: a truncated or corrupted artifact raises `CorruptArtifactError` naming the stage that
produced it, so the orchestrator can recompute that stage instead of propagating garbage.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from nptm.trainables.layout import Layout
from nptm.trainables.stage import StageOutcome
from nptm.trainables.stage_index import (
    OUTCOME_FILE,
    StageFiles,
    StageIndex,
    Stamp,
    check_outcome,
    outcome_json,
    read_outcomes,
    refuse_outcome,
)
from nptm.trainables.storage import Damaged, atomic_write_bytes, is_local_storage, read_bytes

if TYPE_CHECKING:
    import torch


class CorruptArtifactError(RuntimeError):
    """An artifact failed its checksum; `stage_id` names the stage that must be recomputed."""

    def __init__(self, stage_id: str, name: str, reason: str) -> None:
        super().__init__(f"corrupt artifact {name!r} of stage {stage_id}: {reason}")
        self.stage_id = stage_id
        self.name = name
        self.reason = reason

    def __reduce__(self) -> tuple:
        # Ray ships a worker's exception to the driver by pickling it; the default reduction
        # would call __init__ with the message alone, and unpickling would fail.
        return (type(self), (self.stage_id, self.name, self.reason))


MODEL = "model"  # final weights of a stage
RESUME = "resume"  # latest end-of-epoch training state of an unfinished stage


def checksum_name(name: str) -> str:
    """The file whose presence marks payload `name` as completely written."""
    return f"{name}.pt.sha256"


def rewind_name(epoch: int) -> str:
    """Name of the weights a pre-training keeps at `epoch` for weight rewinding (`wr`)."""
    return f"epoch-{epoch:04d}"


def is_output(name: str) -> bool:
    """Whether payload `name` is one a stage's children read (its model, a rewind checkpoint),
    as opposed to its own training state."""
    return name == MODEL or name.startswith("epoch-")


class ArtifactStore:
    def __init__(self, storage: str) -> None:
        self.storage = storage
        self.layout = Layout(storage)
        self.fs = self.layout.fs
        # SHA-256 of each payload this store object saved and loaded, by (stage id, name):
        # a stage's lineage (StageOutcome.artifacts / consumed).
        self.saved: dict[tuple[str, str], str] = {}
        self.loaded: dict[tuple[str, str], str] = {}
        # Stored files this store refused as damaged or foreign (outcomes, index files).
        self.damaged: list[Damaged] = []

    def _path(self, stage_id: str, name: str) -> str:
        return self.layout.stage_file(stage_id, name)

    def model_path(self, stage_id: str, name: str) -> str:
        """Where the payload `name` of `stage_id` is stored (for MLflow's model logging)."""
        return self._path(stage_id, f"{name}.pt")

    # -- tensors -------------------------------------------------------------------------
    def save(self, stage_id: str, name: str, payload: dict[str, Any]) -> str:
        """Serialise `payload` with torch.save and store it with its checksum; returns the sha."""
        import torch  # here, not at module level: the driver and Tune's trial actors import
        # this module and must start fast (see nptm.orchestrator.trial)

        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        atomic_write_bytes(self.fs, self._path(stage_id, f"{name}.pt"), data)
        atomic_write_bytes(self.fs, self._path(stage_id, checksum_name(name)), digest.encode())
        self.saved[stage_id, name] = digest
        return digest

    def load(self, stage_id: str, name: str, map_location: str | torch.device = "cpu") -> dict:
        """Load and verify a payload; never unpickles arbitrary objects (weights_only=True)."""
        data = read_bytes(self.fs, self._path(stage_id, f"{name}.pt"))
        expected = read_bytes(self.fs, self._path(stage_id, checksum_name(name)))
        if data is None or expected is None:
            raise CorruptArtifactError(stage_id, name, "missing")
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected.decode().strip():
            raise CorruptArtifactError(stage_id, name, "checksum mismatch (truncated or altered)")
        self.loaded[stage_id, name] = digest
        import torch

        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as err:  # a verified file that still fails is hostile or foreign
            raise CorruptArtifactError(stage_id, name, f"refused by safe loader: {err}") from err

    def exists(self, stage_id: str, name: str) -> bool:
        info = self.fs.get_file_info(self._path(stage_id, checksum_name(name)))
        return info.type == pafs.FileType.File

    def delete(self, stage_id: str, name: str) -> None:
        for suffix in (".pt", ".pt.sha256"):
            path = self._path(stage_id, name + suffix)
            if self.fs.get_file_info(path).type == pafs.FileType.File:
                self.fs.delete_file(path)

    # -- outcomes ------------------------------------------------------------------------
    def write_outcome(self, outcome: StageOutcome) -> None:
        data = outcome_json(outcome).encode()
        atomic_write_bytes(self.fs, self._path(outcome.stage_id, OUTCOME_FILE), data)

    def read_outcome(self, stage_id: str) -> StageOutcome | None:
        """The stored outcome; None when there is none or it cannot be used (the stage is then
        recomputed): one that does not parse, or that is another stage's, is set aside as
        ``_outcome.json.damaged-<ns>`` with a warning (`damaged` lists it)."""
        data = read_bytes(self.fs, self._path(stage_id, OUTCOME_FILE))
        if data is None:
            return None
        outcome, problem = check_outcome(data, stage_id)
        if outcome is None:
            refuse_outcome(self.layout, stage_id, problem or "refused", self.damaged)
        return outcome

    @cached_property
    def index(self) -> StageIndex:
        return StageIndex(self.layout, self.damaged)

    def stored_outcomes(
        self, stage_ids: Iterable[str] | Mapping[str, Any]
    ) -> tuple[dict[str, StageOutcome], StageFiles]:
        """The stored outcome of each of `stage_ids` that has one, from the index where its
        outcome.json is unchanged (else read, and indexed), and the listing of every stage's
        files they were checked against (`StageFiles.has`). Given the plan's stages (stage id
        -> `StageSpec`), an outcome of another kind than its planned stage is refused too;
        refused outcomes are set aside (`damaged` lists them)."""
        kinds = None
        if isinstance(stage_ids, Mapping):
            kinds = {
                sid: kind
                for sid, spec in stage_ids.items()
                if (kind := getattr(spec, "kind", None)) is not None
            }
        return read_outcomes(self.layout, self.index, stage_ids, kinds)

    def index_outcome(self, outcome: StageOutcome) -> None:
        """Add an outcome the driver accepted to the index (batched; see `flush_index`)."""
        sid = outcome.stage_id
        selector = pafs.FileSelector(self.layout.stage_dir(sid), allow_not_found=True)
        # A listing, not a HEAD: the stamp must read as the start-up listing will show it.
        for info in self.fs.get_file_info(selector):
            if info.base_name == OUTCOME_FILE and info.type == pafs.FileType.File:
                self.index.add(outcome, sid, Stamp.of(info))

    def flush_index(self) -> None:
        """Write the index entries still waiting in memory."""
        self.index.flush()

    def start_attempt(self, stage_id: str) -> int:
        """Count one more start of `stage_id` and return the count (1 on the first start).

        Only one attempt of a stage runs at a time (the driver's DAG searcher sees to it), so
        read-then-write cannot lose a count.
        """
        attempts = self.attempts(stage_id) + 1
        atomic_write_bytes(self.fs, self._path(stage_id, "attempts"), str(attempts).encode())
        return attempts

    def attempts(self, stage_id: str) -> int:
        """How many times `stage_id` was started (first attempts, retries and resumes)."""
        data = read_bytes(self.fs, self._path(stage_id, "attempts"))
        try:
            return int(data) if data is not None else 0
        except ValueError:
            return 0

    def write_error(self, stage_id: str, text: str) -> None:
        """Keep why the last attempt at `stage_id` failed, for the driver's records."""
        atomic_write_bytes(self.fs, self._path(stage_id, "error.txt"), text.encode())

    def read_error(self, stage_id: str) -> str | None:
        data = read_bytes(self.fs, self._path(stage_id, "error.txt"))
        return data.decode(errors="replace") if data is not None else None

    def invalidate(self, stage_id: str) -> None:
        """Forget a stage's outcome so that it runs again (its artifacts get overwritten)."""
        path = self._path(stage_id, OUTCOME_FILE)
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)
            self.index.drop(stage_id)


def node_local_path_warning(storage: str) -> str | None:
    """Why `storage` cannot serve a multi-node cluster, or None if it can."""
    if not is_local_storage(storage):
        return None
    if os.environ.get("NPTM_SHARED_FS") == "1":
        return None
    return (
        f"storage {storage!r} is a node-local path but the cluster has several nodes; use a URI "
        "every node can reach (s3://..., gs://...) or a shared filesystem mounted at the same "
        "path on every node and say so with NPTM_SHARED_FS=1"
    )
