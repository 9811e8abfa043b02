"""Content-addressed artifact store for stage outputs (checkpoints, pruned models, outcomes).

Layout under the storage root (a local path or any URI `pyarrow.fs` understands):

    stages/<stage_id>/<name>.pt          torch-serialised payload (tensors and plain types only)
    stages/<stage_id>/<name>.pt.sha256   its SHA-256, written after the payload
    stages/<stage_id>/outcome.json       the stage's result; written last, it marks completion

Every file is written to a temporary name and then moved into place, so a reader sees either
the old file or the new one, never a torn one. Every payload is verified against its checksum
on load: a truncated or corrupted artifact raises `CorruptArtifactError` naming the stage that
produced it, so the orchestrator can recompute that stage instead of propagating garbage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from trainables.storage import atomic_write_bytes, is_local_storage, read_bytes, resolve_storage

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


def rewind_name(epoch: int) -> str:
    """Name of the weights a pre-training keeps at `epoch` for weight rewinding (`wr`)."""
    return f"epoch-{epoch:04d}"


class ArtifactStore:
    def __init__(self, storage: str) -> None:
        self.storage = storage
        self.fs, self.root, _ = resolve_storage(storage)

    def _path(self, stage_id: str, name: str) -> str:
        if not stage_id.isalnum() or "/" in name or name.startswith("."):
            raise ValueError(f"invalid artifact address {stage_id!r}/{name!r}")
        return f"{self.root}/stages/{stage_id}/{name}"

    # -- tensors -------------------------------------------------------------------------
    def save(self, stage_id: str, name: str, payload: dict[str, Any]) -> str:
        """Serialise `payload` with torch.save and store it with its checksum; returns the sha."""
        import torch  # here, not at module level: the driver and Tune's trial actors import
        # this module and must start fast (see orchestrator.trial)

        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        atomic_write_bytes(self.fs, self._path(stage_id, f"{name}.pt"), data)
        atomic_write_bytes(self.fs, self._path(stage_id, f"{name}.pt.sha256"), digest.encode())
        return digest

    def load(self, stage_id: str, name: str, map_location: str | torch.device = "cpu") -> dict:
        """Load and verify a payload; never unpickles arbitrary objects (weights_only=True)."""
        data = read_bytes(self.fs, self._path(stage_id, f"{name}.pt"))
        expected = read_bytes(self.fs, self._path(stage_id, f"{name}.pt.sha256"))
        if data is None or expected is None:
            raise CorruptArtifactError(stage_id, name, "missing")
        if hashlib.sha256(data).hexdigest() != expected.decode().strip():
            raise CorruptArtifactError(stage_id, name, "checksum mismatch (truncated or altered)")
        import torch

        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as err:  # a verified file that still fails is hostile or foreign
            raise CorruptArtifactError(stage_id, name, f"refused by safe loader: {err}") from err

    def exists(self, stage_id: str, name: str) -> bool:
        info = self.fs.get_file_info(self._path(stage_id, f"{name}.pt.sha256"))
        return info.type == pafs.FileType.File

    def delete(self, stage_id: str, name: str) -> None:
        for suffix in (".pt", ".pt.sha256"):
            path = self._path(stage_id, name + suffix)
            if self.fs.get_file_info(path).type == pafs.FileType.File:
                self.fs.delete_file(path)

    # -- outcomes ------------------------------------------------------------------------
    def write_outcome(self, stage_id: str, outcome: dict[str, Any]) -> None:
        data = json.dumps(outcome, sort_keys=True, default=str).encode()
        atomic_write_bytes(self.fs, self._path(stage_id, "outcome.json"), data)

    def read_outcome(self, stage_id: str) -> dict[str, Any] | None:
        data = read_bytes(self.fs, self._path(stage_id, "outcome.json"))
        if data is None:
            return None
        try:
            outcome = json.loads(data)
        except ValueError:  # not JSON, or not even UTF-8 (UnicodeDecodeError)
            return None  # treated as not done: the stage is recomputed
        return outcome if isinstance(outcome, dict) else None

    def mark_execution(self, stage_id: str) -> None:
        """Record that a worker started executing `stage_id` (counted by `executions`)."""
        atomic_write_bytes(self.fs, self._path(stage_id, f"exec-{uuid.uuid4().hex}"), b"")

    def executions(self, stage_id: str) -> int:
        """How many times `stage_id` was started (first attempts, retries and resumes)."""
        selector = pafs.FileSelector(f"{self.root}/stages/{stage_id}", allow_not_found=True)
        return sum(1 for f in self.fs.get_file_info(selector) if f.base_name.startswith("exec-"))

    def write_error(self, stage_id: str, text: str) -> None:
        """Keep why the last attempt at `stage_id` failed, for the driver's records."""
        atomic_write_bytes(self.fs, self._path(stage_id, "error.txt"), text.encode())

    def read_error(self, stage_id: str) -> str | None:
        data = read_bytes(self.fs, self._path(stage_id, "error.txt"))
        return data.decode(errors="replace") if data is not None else None

    def invalidate(self, stage_id: str) -> None:
        """Forget a stage's outcome so that it runs again (its artifacts get overwritten)."""
        path = self._path(stage_id, "outcome.json")
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)


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
