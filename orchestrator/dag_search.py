"""A Tune `Searcher` that walks the stage DAG: a stage is suggested once its parents are done.

There is no barrier between kinds: a retrain starts as soon as its own prune is done, while
other pre-trainings still run, so the cluster stays busy while runnable work exists.

Of the runnable stages, the one with the longest remaining path of planned seconds (its own
plus the costliest chain of its descendants, `nptm.orchestrator.stage_cost`) goes first, ties
in plan order: a pre-training that two hundred retrains wait on starts before a retrain that
ends its branch. On the shipped grids this shortens the sweep against handing stages out in
the order they became runnable (`order="fifo"`; bench/makespan.py).

Every step costs O(1) in the size of the plan (thousands of stages; O(log) for the ready
heap), and the priorities are computed once, in O(stages): a trial's config is the
stage id only (`nptm.orchestrator.trial.stage_id_of`), and the counts of stages per kind and
state and the epochs still to train are kept as stages change state, never recounted.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any

from ray.tune.search import Searcher

from nptm.orchestrator.stage_cost import longest_paths, stage_costs
from nptm.orchestrator.trial import stage_config
from nptm.trainables.stage import StageOutcome, StageSpec, StageStatus


class StageState(StrEnum):
    """Where a stage is in this run of the DAG."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"  # finished: ok or diverged
    FAILED = "failed"
    SKIPPED = "skipped"


PENDING, RUNNING, DONE, FAILED, SKIPPED = StageState
_TO_TRAIN = (PENDING, RUNNING)  # states whose epochs are still ahead
# How a trial's stage ended, from its last result (None when it failed): ok, diverged or failed.
Resolver = Callable[[StageSpec, dict | None], StageOutcome]
# Told of every stage that ends or is skipped, with how it ended.
FinishHook = Callable[[StageSpec, StageOutcome], None]
ORDERS = ("critical_path", "fifo")


class ReadyQueue:
    """The runnable stages, the smallest rank first (a heap); `append`, `extend` and
    `popleft` as on the deque of `order="fifo"`."""

    def __init__(self, rank: Mapping[str, tuple[float, int]] | None = None) -> None:
        self._rank = {} if rank is None else rank
        self._heap: list[tuple[float, int, str]] = []

    def append(self, sid: str) -> None:
        heapq.heappush(self._heap, (*self._rank[sid], sid))

    def extend(self, sids: Iterable[str]) -> None:
        for sid in sids:
            self.append(sid)

    def popleft(self) -> str:
        return heapq.heappop(self._heap)[-1]

    def __len__(self) -> int:
        return len(self._heap)


class DagSearcher(Searcher):
    def __init__(
        self,
        stages: dict[str, StageSpec],
        done: set[str],
        resolve: Resolver,
        on_finish: FinishHook,
        outcomes: Mapping[str, StageOutcome] | None = None,
        cost: Mapping[str, float] | None = None,
        order: str = "critical_path",
    ) -> None:
        """`cost`: planned seconds per stage (default: `stage_costs` of the `train` executor
        on the shipped per-epoch figures); `order`: "critical_path", or "fifo" (the order the
        stages became runnable)."""
        super().__init__()  # no metric: the DAG, not a score, decides what runs next
        self.stages = stages
        self._resolve = resolve
        self._on_finish = on_finish
        # The outcome of every finished stage: what it read of its parents and holds for its
        # children (StageOutcome.read_current).
        self.outcomes: dict[str, StageOutcome] = dict(outcomes or {})
        # Read freely; written only through `_set`, which keeps the counters below in step.
        self.state: dict[str, StageState] = {
            sid: DONE if sid in done else PENDING for sid in stages
        }
        self._counts: Counter[tuple[str, StageState]] = Counter(
            (stages[sid].kind.value, st) for sid, st in self.state.items()
        )
        self._remaining_epochs = sum(
            stages[sid].epochs for sid, st in self.state.items() if st in _TO_TRAIN
        )
        self.children: dict[str, list[str]] = {sid: [] for sid in stages}
        for sid, spec in stages.items():
            for parent in spec.parents:
                if parent in self.children:
                    self.children[parent].append(sid)
        if order not in ORDERS:
            raise ValueError(f"order: {order!r} is not one of {ORDERS}")
        # Each stage's place in the order, smaller first: the longest remaining path, then
        # plan order (none in FIFO order).
        self._rank: dict[str, tuple[float, int]] = {}
        if order == "fifo":
            self.ready: deque[str] | ReadyQueue = deque()
        else:
            path = longest_paths(stages, stage_costs(stages).cost if cost is None else cost)
            self._rank = {sid: (-path[sid], i) for i, sid in enumerate(stages)}
            self.ready = ReadyQueue(self._rank)
        self.ready.extend(
            sid for sid in stages if self.state[sid] == PENDING and self._parents_done(sid)
        )
        self.trial_stage: dict[str, str] = {}
        self.epochs_done = 0
        self.started_at = time.time()
        self.stopped = False  # `stop`: no further stage is handed out

    # -- Tune's Searcher interface ---------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        while self.ready and not self.stopped:
            sid = self.ready.popleft()
            if self.state[sid] != PENDING:
                continue
            self._set(sid, RUNNING)
            self.trial_stage[trial_id] = sid
            return stage_config(sid)
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
        outcome = self._resolve(spec, None if error else result)
        if outcome.status.finished:
            if self._read_stale_parent(sid, outcome):
                return
            self.outcomes[sid] = outcome
            self._rerun_stale_children(sid, outcome)
        self._set(sid, DONE if outcome.status.finished else FAILED)
        self._on_finish(spec, outcome)
        if outcome.status == StageStatus.OK:
            self.ready.extend(c for c in self.children[sid] if self._parents_done(c))
        else:
            self._skip_descendants(
                sid, f"{outcome.status.value} ancestor {sid} ({spec.kind.value})"
            )

    def stop(self) -> None:
        """Hand out no further stage: the sweep ends once those handed out have ended (or
        been `withdraw`n); the stages never handed out stay pending, for a rerun."""
        self.stopped = True

    def withdraw(self, trial_id: str) -> None:
        """A handed-out stage whose trial never started goes back to pending, unrecorded
        (the trial is stopped next, and its completion is then ignored)."""
        sid = self.trial_stage.pop(trial_id, None)
        if sid is not None:
            self._set(sid, PENDING)

    def rank_of(self, trial_id: str) -> tuple[float, int] | None:
        """The place of a handed-out trial's stage in this searcher's order (smaller first);
        None in FIFO order or for a trial not handed out."""
        sid = self.trial_stage.get(trial_id)
        return None if sid is None else self._rank.get(sid)

    def in_flight(self) -> set[str]:
        """The stages handed out now (running, or waiting for a slot or a retry)."""
        return set(self.trial_stage.values())

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: a rerun rebuilds the DAG's state from the artifact store."""

    def restore(self, checkpoint_path: str) -> None:
        """See `save`."""

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its searcher with the Tuner's and the experiment's state, which nptm
        # never restores (a rerun rebuilds the DAG from the artifact store): the plan, the
        # per-stage states and the driver-side hooks (MLflow client, Parquet writer) stay
        # behind, so that snapshot does not grow with the sweep.
        state = self.__dict__.copy()
        for name in ("stages", "state", "children", "ready", "trial_stage", "_rank"):
            state[name] = type(state[name])()
        state["_resolve"] = state["_on_finish"] = None
        return state

    # -- bookkeeping -----------------------------------------------------------------------
    def count(self, state: StageState, kind: str | None = None) -> int:
        """Stages in `state` now (of `kind` only, when given)."""
        if kind is not None:
            return self._counts[(kind, state)]
        return sum(n for (_, st), n in self._counts.items() if st == state)  # a few kinds

    def remaining_epochs(self) -> int:
        """Training epochs of the stages not yet finished, failed or skipped."""
        return self._remaining_epochs

    def pace(self) -> tuple[float, float | None]:
        """(epochs per second since the searcher started, seconds left at that pace, or None
        while nothing was trained or nothing is left)."""
        rate = self.epochs_done / max(time.time() - self.started_at, 1e-9)
        left = self._remaining_epochs
        return rate, (left / rate if rate > 0 and left else None)

    def _set(self, sid: str, new: StageState) -> None:
        old = self.state[sid]
        if old == new:
            return
        self.state[sid] = new
        kind = self.stages[sid].kind.value
        self._counts[(kind, old)] -= 1
        self._counts[(kind, new)] += 1
        if (old in _TO_TRAIN) != (new in _TO_TRAIN):
            epochs = self.stages[sid].epochs
            self._remaining_epochs += epochs if new in _TO_TRAIN else -epochs

    def _parents_done(self, sid: str) -> bool:
        return all(self.state.get(p, DONE) == DONE for p in self.stages[sid].parents)

    def _skip_descendants(self, sid: str, reason: str) -> None:
        stack = list(self.children[sid])
        while stack:
            child = stack.pop()
            if self.state[child] == PENDING:
                self._set(child, SKIPPED)
                spec = self.stages[child]
                skipped = StageOutcome(child, spec.kind, StageStatus.SKIPPED, f"skipped: {reason}")
                self._on_finish(spec, skipped)
                stack.extend(self.children[child])

    def _read_stale_parent(self, sid: str, outcome: StageOutcome) -> bool:
        """A stage that read a payload its parent has replaced since runs again at once."""
        parents = self.stages[sid].parents
        if all(
            p not in self.outcomes or outcome.read_current(p, self.outcomes[p]) for p in parents
        ):
            return False
        self._set(sid, PENDING)
        if self._parents_done(sid):
            self.ready.append(sid)
        return True

    def _rerun_stale_children(self, sid: str, outcome: StageOutcome) -> None:
        """Children that finished on this stage's earlier payloads (a re-made pre-training
        that came out other than before) run again: no stage mixes two runs of its parent."""
        for child in self.children[sid]:
            if self.state[child] == DONE and not self.outcomes[child].read_current(sid, outcome):
                self._set(child, PENDING)

    def _requeue_producer(self, sid: str, producer: str) -> None:
        """A parent's artifact failed its checksum: recompute the parent, then this stage."""
        self._set(sid, PENDING)
        if producer not in self.stages[sid].parents:  # not a parent's: run this stage again
            self.ready.append(sid)
            return
        # Several children may find the same damaged artifact: the first requeues its producer,
        # the others wait for that recomputation instead of starting a second, concurrent one.
        if self.state.get(producer) == DONE:
            self._set(producer, PENDING)
            if self._parents_done(producer):
                self.ready.append(producer)
