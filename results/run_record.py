"""The record of what a sweep ran, under ``<storage>/sweeps/<sweep>/run/`` (nptm.trainables.layout).

    grid.yaml      the grid file as given
    overrides.json the command line's key.path=value overrides of it, in order ([] if none)
    plan.json      the resolved plan: every stage with its label, parents and planned epochs
    versions.json  nptm (package version and git commit), python, torch, ray, mlflow
    progress.json  the driver's live view: stages running now and their epochs, rewritten
                   every few seconds while the sweep runs, and its final state at the end
    looks.json     `nptm sweep --until-conclusive` only: the group-sequential design and every
                   look so far (nptm.results.adaptive), rewritten after each look
    lease.json     while a driver runs the sweep: which one, until when (one driver per
                   sweep: nptm.orchestrator.lease)

`nptm sweep` writes them; `nptm status` reads them. Every file is written whole (an atomic
replace), so a reader never sees half of one. A file that is damaged anyway (truncated, empty,
garbled), of another shape, or another sweep's is skipped with a warning and listed in
`RunRecord.damaged`; it is left in place, and the next `nptm sweep` writes it anew. Torch-free.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import pyarrow.fs as pafs

from nptm.trainables.layout import Layout, check_sweep_name
from nptm.trainables.stage import StageSpec
from nptm.trainables.storage import Damaged, atomic_write_bytes

log = logging.getLogger(__name__)

GRID_FILE, OVERRIDES_FILE, PLAN_FILE, VERSIONS_FILE, PROGRESS_FILE = (
    "grid.yaml",
    "overrides.json",
    "plan.json",
    "versions.json",
    "progress.json",
)
LOOKS_FILE = "looks.json"
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


def plan_record(sweep: str, stages: dict[str, StageSpec]) -> dict[str, Any]:
    """plan.json's content."""
    planned = {
        sid: PlannedStage(spec.kind.value, spec.label, tuple(spec.parents), spec.epochs)
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
    test_acc: float | None = None  # after the latest epoch


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


def _check_numbers(*values: Any) -> None:
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{value!r} where a number belongs")


class RunRecord:
    """Reads and writes the files of one sweep's run record."""

    def __init__(self, layout: Layout, sweep: str) -> None:
        self.layout = layout
        self.sweep = sweep
        self.damaged: list[Damaged] = []  # files the reads refused, each with why

    def path(self, name: str) -> str:
        return self.layout.run_file(self.sweep, name)

    def location(self, *names: str) -> str:
        """The run record's directory, or a file in it, as a user names it (a URI keeps its
        scheme and its query at the end: `Layout.location`)."""
        return self.layout.location("sweeps", check_sweep_name(self.sweep), "run", *names)

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
        """The file's JSON; None when it is missing, or not JSON (then `refuse`d)."""
        data = self.read_bytes(name)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as err:  # not UTF-8 either
            self.refuse(name, "empty" if not data else f"not JSON ({str(err)[:120]})")
            return None

    def refuse(self, name: str, reason: str) -> None:
        """Skip the file `name`, with a warning; the next sweep writes it anew."""
        self.damaged.append(Damaged(self.location(name), reason))
        log.warning("%s of sweep %s skipped: %s", name, self.sweep, reason)

    def write_progress(self, progress: Progress) -> None:
        self.write_json(PROGRESS_FILE, progress.to_dict())

    def read_progress(self) -> Progress | None:
        """progress.json as written; None when it is missing or refused (damaged, of another
        shape or another sweep's)."""
        d = self._read_own(PROGRESS_FILE)
        if d is None:
            return None
        try:
            progress = Progress.from_dict(d)
            _check_numbers(
                progress.started_at, progress.updated_at, progress.epochs_done,
                *(v for r in progress.running.values() for v in (r.epoch, r.epochs, r.started_at)),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            self.refuse(PROGRESS_FILE, f"not a progress record ({type(err).__name__}: {err})")
            return None
        return progress

    def read_plan(self) -> dict[str, PlannedStage] | None:
        """plan.json's stages; None when it is missing or refused (damaged, of another shape or
        another sweep's)."""
        d = self._read_own(PLAN_FILE)
        if d is None:
            return None
        try:
            planned = planned_stages(d)
            for stage in planned.values():
                if not isinstance(stage.kind, str) or not isinstance(stage.label, str):
                    raise TypeError(f"a stage of kind {stage.kind!r}, label {stage.label!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            self.refuse(PLAN_FILE, f"not a plan ({type(err).__name__}: {err})")
            return None
        return planned

    def read_looks(self) -> dict[str, Any] | None:
        """looks.json (nptm.results.adaptive.looks_record); None when the sweep added no seeds
        adaptively, or the file is refused (damaged, of another shape or another sweep's)."""
        d = self._read_own(LOOKS_FILE)
        if d is None:
            return None
        looks = d.get("looks")
        shaped = isinstance(d.get("design"), dict) and isinstance(looks, list)
        if not shaped or not all(isinstance(x, dict) and "tests" in x for x in looks):
            self.refuse(LOOKS_FILE, "not a record of looks (no design, or looks without tests)")
            return None
        return d

    def _read_own(self, name: str) -> dict[str, Any] | None:
        """A JSON object written for this sweep (its `sweep` is this one)."""
        d = self.read_json(name)
        if d is None:
            return None
        if not isinstance(d, dict):
            self.refuse(name, f"not a JSON object but a {type(d).__name__}")
            return None
        if d.get("sweep", self.sweep) != self.sweep:
            self.refuse(name, f"the file of sweep {d.get('sweep')!r}, not of {self.sweep!r}")
            return None
        return d

    def exists(self, name: str) -> bool:
        return self.layout.fs.get_file_info(self.path(name)).type == pafs.FileType.File
