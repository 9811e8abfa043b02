"""A compact live summary of a running sweep on the terminal."""

from __future__ import annotations

import time
from typing import Any, TextIO

from ray.tune import Callback

from orchestrator.dag_search import DONE, FAILED, PENDING, RUNNING, SKIPPED


class ProgressPrinter(Callback):
    """Prints one line every `interval` seconds: stages by state, epochs/s and an ETA."""

    def __init__(self, searcher: Any, stream: TextIO, interval: float = 10.0) -> None:
        self.searcher = searcher
        self.stream = stream
        self.interval = interval
        self._last = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {"interval": self.interval, "_last": 0.0, "searcher": None, "stream": None}

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        if now - self._last >= self.interval:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        s = self.searcher
        elapsed = max(time.time() - s.started_at, 1e-9)
        rate = s.epochs_done / elapsed
        remaining = s.remaining_epochs()
        eta = f"{remaining / rate / 60:.1f} min" if rate > 0 and remaining else "-"
        return (
            f"[nptm] stages done {s.count(DONE)}  running {s.count(RUNNING)}  "
            f"pending {s.count(PENDING)}  failed {s.count(FAILED)}  skipped {s.count(SKIPPED)}"
            f"  |  {rate:.2f} epochs/s  ETA {eta}"
        )

    def final(self) -> None:
        print(self.line(), file=self.stream, flush=True)
