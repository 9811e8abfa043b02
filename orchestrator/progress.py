"""A compact live summary of a running sweep on the terminal."""

from __future__ import annotations

import time
from typing import Any, TextIO

from ray.tune import Callback

from nptm.orchestrator.dag_search import DONE, FAILED, PENDING, RUNNING, SKIPPED


def pace(searcher: Any) -> tuple[float, float | None]:
    """(epochs per second since the driver started, seconds left at that pace or None while
    nothing was trained or nothing is left) of a `DagSearcher`."""
    rate = searcher.epochs_done / max(time.time() - searcher.started_at, 1e-9)
    remaining = searcher.remaining_epochs()
    return rate, (remaining / rate if rate > 0 and remaining else None)


class ProgressPrinter(Callback):
    """Prints one line every `interval` seconds: stages by state, epochs/s and an ETA.

    O(1) per line however large the sweep: the searcher keeps its counts, and the trials Ray
    is executing are counted as they start and end (never by scanning Tune's trial list).
    """

    def __init__(self, searcher: Any, stream: TextIO, interval: float = 10.0) -> None:
        self.searcher = searcher
        self.stream = stream
        self.interval = interval
        self._last = 0.0
        self._executing: set[str] = set()  # ids of the trials Ray is running now

    def __getstate__(self) -> dict[str, Any]:
        return {"interval": self.interval, "_last": 0.0, "searcher": None, "stream": None,
                "_executing": set()}  # fmt: skip

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._executing.add(trial.trial_id)  # also when a reused actor takes the trial

    def _ended(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._executing.discard(trial.trial_id)

    on_trial_complete = on_trial_error = on_trial_recover = _ended

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        if now - self._last >= self.interval:
            self._last = now
            print(self.line(len(self._executing)), file=self.stream, flush=True)

    def line(self, running: int | None = None) -> str:
        """`running`: trials Ray is executing now; the rest of those handed out wait for a slot."""
        s = self.searcher
        handed_out = s.count(RUNNING)
        running = handed_out if running is None else running
        rate, eta_s = pace(s)
        eta = "-" if eta_s is None else f"{eta_s / 60:.1f} min"
        return (
            f"[nptm] stages done {s.count(DONE)}  running {running}  "
            f"pending {s.count(PENDING) + handed_out - running}  failed {s.count(FAILED)}  "
            f"skipped {s.count(SKIPPED)}"
            f"  |  {rate:.2f} epochs/s  ETA {eta}"
        )

    def final(self) -> None:
        print(self.line(running=0), file=self.stream, flush=True)
