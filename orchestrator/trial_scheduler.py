"""Which pending Tune trial takes a trial actor that frees up.

Tune (with `reuse_actors`) asks Ray for a new actor, with its own placement group, for every
pending trial, and hands an actor that frees up to the OLDEST pending trial. That trial's own
new actor, the one whose placement group Ray placed first, is then killed while it is still
starting. When stages take less time than a new actor takes to start (a no-op stage in the
benchmark, a prune, a short retrain on a loaded machine), the second actor never starts: Ray
starts and kills a worker process (`ray::IDLE`) every few seconds while one actor does all
the work. Handing the freed actor to the NEWEST pending trial instead lets the oldest one's
actor finish starting; once every slot has a live actor, no placement group of a pending
trial can be placed and no process is started at all. `patience` bounds how long a stage may
wait behind newer ones (the DAG may be waiting on it). On a local Ray, Tune holds no more
trials than can run at once (`nptm.orchestrator.tuner._max_concurrent`), so no actor is started
for a trial that takes over another's; this order matters on a cluster, where it may.

`FIFOScheduler.choose_trial_to_run` also scans every trial of the experiment at every step of
Tune's loop (O(trials) per step, quadratic over a sweep of thousands of stages); this one
looks at the live trials only, a few per slot.

Of the newest pending trials, those Tune took from the searcher together (within
`SAME_BATCH_S` of the newest: their actors were asked for together, so none is further along
than the others), the one first in the searcher's order takes the actor
(`DagSearcher.rank_of`: the longest remaining path first). Taking the newest alone would hand
it to the LAST of a batch, e.g. to the shortest of the retrains a prune has just released,
while the one on the critical path waits for an actor to start.

Once the DAG searcher is stopped (nptm.orchestrator.failure_guard: stages keep failing with
the same error), no pending trial starts: Tune starts every pending trial it holds, so each
is stopped here instead. One that never ran is first withdrawn from the searcher (its stage
stays pending, unrecorded); one waiting for a retry ends as the failure it was.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler

DEFAULT_PATIENCE_S = 30.0  # well above a trial actor's start-up on a busy node
SAME_BATCH_S = 1.0  # trials added this close together: well under an actor's start-up


class NewestPendingFirst(FIFOScheduler):
    def __init__(self, patience: float = DEFAULT_PATIENCE_S, searcher: Any = None) -> None:
        super().__init__()
        self.patience = patience
        self.searcher = searcher  # a DagSearcher: while it is stopped, nothing pending starts
        self._added: dict[str, float] = {}  # id of a live trial -> when it was added

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._added[trial.trial_id] = time.monotonic()

    def _forget(self, tune_controller: Any, trial: Trial, *args: Any) -> None:
        self._added.pop(trial.trial_id, None)

    on_trial_complete = on_trial_error = on_trial_remove = _forget

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        pending = [t for t in tune_controller.get_live_trials() if t.status == Trial.PENDING]
        if not pending:
            return None
        if self.searcher is not None and self.searcher.stopped:
            for trial in pending:
                if not trial.run_metadata.num_failures:
                    self.searcher.withdraw(trial.trial_id)
                tune_controller.stop_trial(trial)
            return None
        # A retried trial was forgotten when it failed: it counts as the oldest.
        pending.sort(key=self._added_at)
        oldest, newest = pending[0], self._added_at(pending[-1])
        if time.monotonic() - self._added_at(oldest) >= self.patience:
            return oldest
        batch = [t for t in pending if newest - self._added_at(t) <= SAME_BATCH_S]
        return min(batch, key=lambda t: (self._rank(t), -self._added_at(t)))

    def _added_at(self, trial: Trial) -> float:
        return self._added.get(trial.trial_id, -math.inf)

    def _rank(self, trial: Trial) -> tuple[float, int]:
        """The searcher's order (smaller first); last where it gives none."""
        rank = self.searcher.rank_of(trial.trial_id) if self.searcher is not None else None
        return (math.inf, 0) if rank is None else rank
