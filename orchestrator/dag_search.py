"""A Tune `Searcher` that walks the stage DAG: a stage is suggested once its parents are done.

There is no barrier between kinds: a retrain starts as soon as its own prune is done, while
other pre-trainings still run, so the cluster stays busy while runnable work exists.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from ray.tune.search import Searcher

from trainables.stage import StageKind, StageOutcome, StageSpec, StageStatus


class Progress(StrEnum):
    """Where a stage is in this run of the DAG."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"  # finished: ok or diverged
    FAILED = "failed"
    SKIPPED = "skipped"


PENDING, RUNNING, DONE, FAILED, SKIPPED = Progress
# How a finished stage ended, as the driver learned it: (status, outcome, error text).
StageResolution = tuple[StageStatus, StageOutcome | None, str | None]
# Told of every stage that ends or is skipped: (spec, status, outcome, error text).
FinishHook = Callable[[StageSpec, StageStatus, StageOutcome | None, str | None], None]


class DagSearcher(Searcher):
    def __init__(
        self,
        stages: dict[str, StageSpec],
        done: set[str],
        runtime: dict[str, Any],
        resolve: Callable[[StageSpec, dict | None, bool], StageResolution],
        on_finish: FinishHook,
    ) -> None:
        super().__init__()  # no metric: the DAG, not a score, decides what runs next
        self.stages = stages
        self.runtime = runtime
        self._resolve = resolve
        self._on_finish = on_finish
        self.state: dict[str, Progress] = {sid: DONE if sid in done else PENDING for sid in stages}
        self.children: dict[str, list[str]] = {sid: [] for sid in stages}
        for sid, spec in stages.items():
            for parent in spec.parents:
                if parent in self.children:
                    self.children[parent].append(sid)
        self.ready: deque[str] = deque(
            sid for sid in stages if self.state[sid] == PENDING and self._parents_done(sid)
        )
        self.trial_stage: dict[str, str] = {}
        self.epochs_done = 0
        self.started_at = time.time()

    # -- Tune's Searcher interface ---------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        while self.ready:
            sid = self.ready.popleft()
            if self.state[sid] != PENDING:
                continue
            self.state[sid] = RUNNING
            self.trial_stage[trial_id] = sid
            return {"stage": self.stages[sid].to_dict(), "runtime": self.runtime}
        return None if self.count(RUNNING) else Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if result.get("epoch_done"):
            self.epochs_done += 1

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        sid = self.trial_stage.pop(trial_id, None)
        if sid is None:
            return
        spec = self.stages[sid]
        if result and result.get("corrupt_parent"):
            self._requeue_producer(sid, result["corrupt_parent"])
            return
        status, outcome, detail = self._resolve(spec, result, error)
        status = StageStatus(status)
        self.state[sid] = DONE if status.finished else FAILED
        self._on_finish(spec, status, outcome, detail)
        if status == StageStatus.OK:
            self.ready.extend(c for c in self.children[sid] if self._parents_done(c))
        else:
            self._skip_descendants(sid, f"{status.value} ancestor {sid} ({spec.kind.value})")

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: a rerun rebuilds the DAG's state from the artifact store."""

    def restore(self, checkpoint_path: str) -> None:
        """See `save`."""

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its searcher into the experiment state; the driver-side hooks (MLflow
        # client, Parquet writer) stay behind: the artifact store is what resumes a sweep.
        state = self.__dict__.copy()
        state["_resolve"] = state["_on_finish"] = None
        return state

    # -- bookkeeping -----------------------------------------------------------------------
    def count(self, state: Progress) -> int:
        return sum(1 for s in self.state.values() if s == state)

    def remaining_epochs(self) -> int:
        return sum(
            _epochs(self.stages[sid]) for sid, st in self.state.items() if st in (PENDING, RUNNING)
        )

    def _parents_done(self, sid: str) -> bool:
        return all(self.state.get(p, DONE) == DONE for p in self.stages[sid].parents)

    def _skip_descendants(self, sid: str, reason: str) -> None:
        stack = list(self.children[sid])
        while stack:
            child = stack.pop()
            if self.state[child] == PENDING:
                self.state[child] = SKIPPED
                self._on_finish(self.stages[child], StageStatus.SKIPPED, None, f"skipped: {reason}")
                stack.extend(self.children[child])

    def _requeue_producer(self, sid: str, producer: str) -> None:
        """A parent's artifact failed its checksum: recompute the parent, then this stage."""
        self.state[sid] = PENDING
        # Several children may find the same damaged artifact: the first requeues its producer,
        # the others wait for that recomputation instead of starting a second, concurrent one.
        if self.state.get(producer) == DONE:
            self.state[producer] = PENDING
            if self._parents_done(producer):
                self.ready.append(producer)


def _epochs(spec: StageSpec) -> int:
    if spec.kind == StageKind.PRETRAIN:
        return spec.recipe.epochs
    return spec.budget or 0
