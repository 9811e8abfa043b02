"""Stop a sweep whose stages keep failing with the same error.

A cause that every stage shares (data that vanished from a node, a plugin that breaks on the
workers, a GPU driver gone) would otherwise fail every stage of the sweep, each after its
retries. `FailureGuard` counts the distinct stages each error has failed, by a signature that
ignores what differs between stages (numbers, ids, paths); once one error has failed
`STAGES_TO_STOP` stages, or at least two and every stage in flight, the sweep stops handing
out stages: the ones running finish, stages waiting for a retry or a free slot do not start,
and the driver prints one message naming the error (`Trip`). Nothing that did not finish is
marked finished, so rerunning the same command resumes.

`FailureWatch` is the Tune callback that feeds the guard every failed attempt of a stage (the
retried ones too) with the error the trial stored (nptm.orchestrator.trial.stage_trial).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any, TextIO

from ray.tune import Callback

from nptm.orchestrator.trial import stage_id_of
from nptm.results.sink import Trip

STAGES_TO_STOP = 3  # distinct stages one error must fail before the sweep stops
NO_ERROR_TEXT = "the trial ended without an error report (its process may have been killed)"

# What differs between stages that fail for one reason: paths, hexadecimal ids, numbers.
_PATH = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*://|~|\.{0,2}/)[^\s'\",:;()\[\]]*")
_HEX = re.compile(r"\b(?=[0-9a-f]*\d)[0-9a-f]{6,}\b", re.I)
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", re.I)


def error_line(text: str | None) -> str:
    """The `Type: message` line a stored error starts with."""
    lines = (text or "").strip().splitlines()
    return lines[0].strip() if lines else NO_ERROR_TEXT


def signature(line: str) -> str:
    """`line` (`Type: message`) with paths, ids and numbers replaced: equal for two stages
    that failed for the same reason."""
    line = _PATH.sub("<path>", line)
    line = _HEX.sub("<id>", line)
    return _NUMBER.sub("<n>", line)


class FailureGuard:
    """Counts the distinct stages each error signature failed; trips once (see module)."""

    def __init__(self, threshold: int = STAGES_TO_STOP) -> None:
        self.threshold = threshold
        self.trip: Trip | None = None
        self._hits: dict[str, Trip] = {}  # signature -> its first error and failed stages

    def failed(self, stage_id: str, error: str, in_flight: set[str]) -> Trip | None:
        """Record one failed attempt of `stage_id`; `in_flight`: the stages handed out now
        (this one included while Tune retries it). Returns the Trip when this one trips."""
        line = error_line(error)
        hit = self._hits.setdefault(signature(line), Trip(line))
        if stage_id not in hit.stages:
            hit.stages.append(stage_id)
        if self.trip is not None:
            return None
        hit_all = len(hit.stages) >= 2 and in_flight <= set(hit.stages)
        if len(hit.stages) >= self.threshold or hit_all:
            self.trip = hit
            return hit
        return None


class FailureWatch(Callback):
    """Tune callback of the driver: every failed attempt of a stage goes to the guard; when
    it trips, `stop()` (the DAG searcher's) ends the handing out of stages, and one line on
    `stream` says so (the error itself is named once, by the sweep's closing summary)."""

    def __init__(
        self,
        guard: FailureGuard,
        read_error: Callable[[str], str | None],
        in_flight: Callable[[], set[str]],
        stop: Callable[[], None],
        stream: TextIO | None = None,  # None: sys.stderr at the time
    ) -> None:
        self.guard = guard
        self.read_error = read_error
        self.in_flight = in_flight
        self.stop = stop
        self.stream = stream

    def __getstate__(self) -> dict[str, Any]:
        # Pickled only into Tune's experiment state, which nptm never restores.
        return {}

    def _failed(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        sid = stage_id_of(trial.config)
        flying = self.in_flight() | {sid}  # a retried stage is still the guard's business
        trip = self.guard.failed(sid, self.read_error(sid) or NO_ERROR_TEXT, flying)
        if trip is None:
            return
        self.stop()
        print(
            f"[nptm] {len(trip.stages)} stages failed with the same error: starting no further "
            "stage; those running finish first",
            file=self.stream or sys.stderr,
            flush=True,
        )

    on_trial_recover = on_trial_error = _failed


def failure_lines(summary: Any, layout: Any) -> list[str]:
    """The failures of a sweep's summary (nptm.results.sink.SweepSummary), one entry per
    error however many stages it failed, each naming where a full traceback is (`layout`:
    the storage's nptm.trainables.layout.Layout); then, if the sweep stopped early, why."""
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for sid, kind, error in summary.failures:
        groups.setdefault(signature(error), []).append((sid, kind, error))
    stopped = summary.stopped
    lines = []
    for key, failed in groups.items():
        if stopped is not None and key == signature(stopped.error):
            continue  # named once, below
        sid, kind, error = failed[0]
        if len(failed) == 1:
            lines.append(f"  FAILED {kind} {sid}: {error}")
            continue
        stages = ", ".join(f"{k} {s}" for s, k, _ in failed)
        lines.append(
            f"  FAILED {len(failed)} stages with the same error: {error}\n"
            f"    stages: {stages}\n    traceback: {_error_file(layout, sid)}"
        )
    if stopped is not None:
        not_run = summary.planned - summary.reused - summary.executed
        kinds = {sid: f"{kind} " for sid, kind, _ in summary.failures}  # a retry may have won
        stages = ", ".join(f"{kinds.get(s, '')}{s}" for s in stopped.stages)
        lines.append(
            f"sweep {summary.sweep} STOPPED: {len(stopped.stages)} stages failed with the same "
            f"error, so no further stage was started:\n  {stopped.error}\n"
            f"    stages: {stages}\n"
            f"    traceback: {_error_file(layout, stopped.stages[0])}\n"
            f"  {not_run} of {summary.planned} stages did not run: fix the cause, then rerun "
            "the same command to resume (finished stages are kept)"
        )
    return lines


def _error_file(layout: Any, stage_id: str) -> str:
    """Where the stage's last error is stored, with its whole traceback."""
    return layout.location("stages", stage_id, "error.txt")
