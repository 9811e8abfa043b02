"""The driver's one watcher of a running sweep: a Tune callback (run in Tune's loop, so MLflow
keeps its single writer and the run record one writer per sweep) that follows each stage's
trial and, from the stages it sees running and the DAG searcher's counts, keeps each view of
the sweep current at its own pace: the stage's MLflow run (opened at its start, fed every
epoch), progress.json (`nptm status`), the terminal's line and the Prometheus gauges
(nptm.orchestrator.metrics). It stops the Tune loop at its next step once a stop signal came
in. A step costs O(running stages), however large the plan."""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any, TextIO

from ray.tune import Callback

from nptm.orchestrator.dag_search import DagSearcher, StageState
from nptm.orchestrator.signals import StopSignals
from nptm.orchestrator.trial import stage_id_of
from nptm.results.run_record import DriverState, Progress, RunningStage, RunRecord

if TYPE_CHECKING:
    from nptm.orchestrator.metrics import SweepMetrics
    from nptm.results.sink import ResultSink

# progress.json is rewritten at most this often: an fsynced write per stage start and end cost
# the driver ~6 ms a stage (bench/scheduling.py). The terminal line: every 10 s.
PROGRESS_INTERVAL_S, LINE_INTERVAL_S = 2.0, 10.0


def progress_line(searcher: DagSearcher, running: int) -> str:
    """The terminal's line; `running`: trials Ray is executing now (the others handed out
    wait for a slot)."""
    s = searcher
    handed_out = s.count(StageState.RUNNING)
    rate, eta_s = s.pace()
    eta = "-" if eta_s is None else f"{eta_s / 60:.1f} min"
    return (
        f"[nptm] stages done {s.count(StageState.DONE)}  running {running}  "
        f"pending {s.count(StageState.PENDING) + handed_out - running}  "
        f"failed {s.count(StageState.FAILED)}  skipped {s.count(StageState.SKIPPED)}"
        f"  |  {rate:.2f} epochs/s  ETA {eta}"
    )


def new_progress(sweep: str) -> Progress:
    now = time.time()
    return Progress(sweep=sweep, pid=os.getpid(), host=socket.gethostname(), started_at=now,
                    updated_at=now)  # fmt: skip


class SweepMonitor(Callback):
    def __init__(
        self,
        searcher: DagSearcher,
        sink: ResultSink,
        record: RunRecord,
        stop: StopSignals,
        stream: TextIO,
        metrics: SweepMetrics | None = None,
    ) -> None:
        self.searcher = searcher
        self.sink = sink
        self.record = record
        self.stop = stop
        self.stream = stream
        self.metrics = metrics  # None: no Prometheus gauges (a driver without Ray metrics)
        self.progress = new_progress(sink.summary.sweep)
        self.running = self.progress.running  # the stages whose trials Ray is executing
        self._last = {"progress": 0.0, "line": 0.0, "metrics": 0.0}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into its experiment state, which nptm never restores.
        return {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        spec = self.searcher.stages[stage_id_of(trial.config)]
        self.sink.start_stage(spec)  # also when a reused actor or a retry takes the trial
        self.running[spec.id] = RunningStage(spec.kind.value, spec.label, spec.epochs)
        self.write_progress()

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if not result.get("epoch_done") or "epoch" not in result:
            return
        sid = stage_id_of(trial.config)
        self.sink.recorder.log_epoch(sid, result)
        stage = self.running.get(sid)
        if stage is not None:
            stage.epoch = int(result["epoch"])
            stage.test_acc = result.get("test_acc")
        self.write_progress()

    def _ended(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.pop(stage_id_of(trial.config), None)
        self.write_progress()

    on_trial_complete = on_trial_error = on_trial_recover = _ended

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.stop.check()
        self.write_progress()
        if self._due("line", LINE_INTERVAL_S):
            print(progress_line(self.searcher, len(self.running)), file=self.stream, flush=True)
        if self.metrics is not None and self._due("metrics", self.metrics.interval):
            self.metrics.publish(self.running)

    def write_progress(self, *, force: bool = False) -> None:
        """progress.json, at most every PROGRESS_INTERVAL_S unless `force`d: Tune's loop
        steps often enough to publish a change within that."""
        if force or self._due("progress", PROGRESS_INTERVAL_S):
            self.progress.updated_at = time.time()
            self.progress.epochs_done = self.searcher.epochs_done
            self.record.write_progress(self.progress)

    def finish(self, state: DriverState) -> None:
        """The driver's final state, everywhere: stages still listed as running are not."""
        self.running.clear()
        self.progress.state = state
        self.write_progress(force=True)
        print(progress_line(self.searcher, 0), file=self.stream, flush=True)
        if self.metrics is not None:
            self.metrics.publish(self.running)  # Ray exports the end state on disconnect

    def _due(self, view: str, interval: float) -> bool:
        now = time.time()
        if now - self._last[view] < interval:
            return False
        self._last[view] = now
        return True
