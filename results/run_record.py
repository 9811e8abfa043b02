"""The record of what a sweep ran, under ``<storage>/sweeps/<sweep>/run/`` (nptm.trainables.layout).

    grid.yaml      the grid file as given
    overrides.json the command line's key.path=value overrides of it, in order ([] if none)
    plan.json      the resolved plan: every stage with its label, parents and planned epochs
    versions.json  nptm (package version and git commit), python, torch, ray, mlflow
    progress.json  the driver's live view: stages running now and their epochs, rewritten
                   every few seconds while the sweep runs, and its final state at the end

`nptm sweep` writes them; `nptm status` reads them. Every file is written whole (an atomic
replace), so a reader never sees half of one. Torch-free.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import pyarrow.fs as pafs

from nptm.trainables.layout import Layout, check_name
from nptm.trainables.stage import StageSpec
from nptm.trainables.storage import atomic_write_bytes

GRID_FILE, OVERRIDES_FILE, PLAN_FILE, VERSIONS_FILE, PROGRESS_FILE = (
    "grid.yaml",
    "overrides.json",
    "plan.json",
    "versions.json",
    "progress.json",
)
FORMAT = 1  # of plan.json and progress.json


class DriverState(StrEnum):
    """How the sweep's driver stands, as its last progress.json says."""

    RUNNING = "running"
    FINISHED = "finished"  # every stage was tried; some may have failed
    INTERRUPTED = "interrupted"  # SIGINT / SIGTERM: rerunning the same command resumes
    FAILED = "failed"  # the driver itself raised


@dataclass(frozen=True)
class PlannedStage:
    kind: str
    label: str  # nptm.trainables.stage.StageSpec.label
    parents: tuple[str, ...]
    epochs: int  # training epochs planned (prune: 0)


def plan_record(sweep: str, stages: dict[str, StageSpec], epochs_of: Any) -> dict[str, Any]:
    """plan.json's content; `epochs_of(spec)` is the planner's count of a stage's epochs."""
    planned = {
        sid: PlannedStage(spec.kind.value, spec.label, tuple(spec.parents), int(epochs_of(spec)))
        for sid, spec in stages.items()
    }
    counts: dict[str, int] = {}
    for stage in planned.values():
        counts[stage.kind] = counts.get(stage.kind, 0) + 1
    return {
        "format": FORMAT,
        "sweep": sweep,
        "written_at": time.time(),
        "counts": counts,
        "stages": {sid: asdict(stage) for sid, stage in planned.items()},
    }


def planned_stages(record: dict[str, Any]) -> dict[str, PlannedStage]:
    """The stages of a plan.json as read back."""
    return {
        sid: PlannedStage(s["kind"], s["label"], tuple(s["parents"]), int(s["epochs"]))
        for sid, s in record["stages"].items()
    }


@dataclass
class RunningStage:
    kind: str
    label: str
    epochs: int  # planned
    epoch: int = 0  # epochs finished so far
    started_at: float = field(default_factory=time.time)


@dataclass
class Progress:
    """progress.json's content."""

    sweep: str
    pid: int
    host: str
    started_at: float
    updated_at: float
    state: DriverState = DriverState.RUNNING
    running: dict[str, RunningStage] = field(default_factory=dict)
    epochs_done: int = 0  # epochs finished by this run of the driver
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        d = dict(d)
        d["state"] = DriverState(d["state"])
        d["running"] = {sid: RunningStage(**s) for sid, s in d.get("running", {}).items()}
        return cls(**d)


class RunRecord:
    """Reads and writes the files of one sweep's run record."""

    def __init__(self, layout: Layout, sweep: str) -> None:
        self.layout = layout
        self.sweep = sweep

    def path(self, name: str) -> str:
        return self.layout.run_file(self.sweep, name)

    def location(self, *names: str) -> str:
        """The run record's directory, or a file in it, as a user names it (a URI keeps its
        scheme and its query at the end: `Layout.location`)."""
        return self.layout.location("sweeps", check_name("sweep", self.sweep), "run", *names)

    def write_bytes(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.layout.fs, self.path(name), data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1, sort_keys=True).encode())

    def read_bytes(self, name: str) -> bytes | None:
        try:
            with self.layout.fs.open_input_stream(self.path(name)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_json(self, name: str) -> Any | None:
        data = self.read_bytes(name)
        return None if data is None else json.loads(data)

    def write_progress(self, progress: Progress) -> None:
        self.write_json(PROGRESS_FILE, progress.to_dict())

    def read_progress(self) -> Progress | None:
        d = self.read_json(PROGRESS_FILE)
        return None if d is None else Progress.from_dict(d)

    def exists(self, name: str) -> bool:
        return self.layout.fs.get_file_info(self.path(name)).type == pafs.FileType.File
