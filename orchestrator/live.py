"""A sweep as it runs: each stage's MLflow run opened when it starts and fed every epoch, the
run record's progress.json, the start-up facts a user needs (where the dashboard and MLflow
are), and a prompt, orderly stop on SIGINT / SIGTERM.

Everything here runs in the driver (Tune callbacks run in the driver's Tune loop): MLflow keeps
its single writer, and the run record one writer per sweep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from nptm.orchestrator.errors import Interrupted, take_pending
from nptm.orchestrator.planner import stage_epochs
from nptm.orchestrator.trial import stage_id_of
from nptm.results.run_record import DriverState, Progress, RunningStage, RunRecord
from nptm.trainables.stage import StageSpec

if TYPE_CHECKING:
    from nptm.results.sink import ResultSink

PROGRESS_INTERVAL_S = 2.0  # progress.json is rewritten at most this often (and at the end)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SweepInterrupted(Interrupted):
    """SIGINT or SIGTERM reached the driver. A BaseException, like KeyboardInterrupt: it must
    pass through Tune's and nptm's `except Exception` handlers on its way out."""


class StopSignals:
    """While inside, SIGINT and SIGTERM ask the sweep to stop: the Tune loop raises
    `SweepInterrupted` at its next step (a tenth of a second), never in the middle of a
    stage's Parquet or MLflow write; a second signal raises it at once. Tune's own SIGINT
    handler (which would end the run as if complete and print a `Tuner.restore` hint: nptm
    resumes by rerunning its command) is switched off, as is Ray's SIGTERM handler (exit 15).
    Outside the main thread signals cannot be caught: the context does nothing there."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            # a signal noted while Ray started (nptm.orchestrator.errors.RaiseOnStopSignals)
            self.signum = take_pending()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = signum
        if not first:
            raise SweepInterrupted(signum)
        name = signal.Signals(signum).name
        print(
            f"\n[nptm] {name} received: stopping the sweep (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def check(self) -> None:
        if self.signum is not None:
            raise SweepInterrupted(self.signum)


@contextlib.contextmanager
def ray_sigterm_handler_off() -> Iterator[None]:
    """Inside, ray.init leaves SIGTERM to nptm: it would install a handler that calls
    sys.exit(15) wherever the driver is, in the middle of ray.init itself too (a silent exit
    15, and a half-started Ray that can abort the process as it exits). nptm's own handlers
    (StopSignals, nptm.orchestrator.errors.RaiseOnStopSignals) stop a sweep instead."""
    import ray._private.utils as ray_utils

    original = getattr(ray_utils, "set_sigterm_handler", None)
    if original is None:  # another Ray: nothing to switch off
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original


class LiveTracker(Callback):
    """Tune callback of a sweep's driver: opens each stage's MLflow run when its trial starts,
    logs each epoch when it arrives, keeps progress.json current, and stops the Tune loop when
    a stop signal came in. (The stage's row and the end of its run come from the result sink,
    when the DAG searcher learns the stage's outcome.)"""

    def __init__(
        self,
        stages: dict[str, StageSpec],
        sink: ResultSink,
        record: RunRecord,
        progress: Progress,
        stop: StopSignals,
        interval: float = PROGRESS_INTERVAL_S,
    ) -> None:
        self.stages = stages
        self.sink = sink
        self.record = record
        self.progress = progress
        self.stop = stop
        self.interval = interval
        self._written = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into its experiment state; nptm resumes from its own store.
        return {"interval": self.interval}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        spec = self.stages.get(stage_id_of(trial.config))
        if spec is None:
            return
        self.sink.start_stage(spec)
        self.progress.running[spec.id] = RunningStage(
            spec.kind.value, spec.label, stage_epochs(spec)
        )
        self.write()

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if not result.get("epoch_done") or "epoch" not in result:
            return
        sid = stage_id_of(trial.config)
        self.sink.recorder.log_epoch(sid, result)
        running = self.progress.running.get(sid)
        if running is not None:
            running.epoch = int(result["epoch"])
        self.progress.epochs_done += 1
        self.write()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.stop.check()
        self.write()

    def _ended(self, trial: Any) -> None:
        self.progress.running.pop(stage_id_of(trial.config), None)
        self.write()

    def write(self, *, force: bool = False) -> None:
        """progress.json, at most every `interval` seconds unless `force`d: an fsynced write
        per stage start and end cost the driver ~6 ms a stage (bench/scheduling.py), and
        Tune's loop calls `on_step_end` often enough to publish a change within `interval`."""
        now = time.time()
        if force or now - self._written >= self.interval:
            self._written = now
            self.progress.updated_at = now
            self.record.write_progress(self.progress)

    def finish(self, state: DriverState) -> None:
        """The driver's final state; stages still listed as running are not any more."""
        self.progress.state = state
        self.progress.running.clear()
        self.write(force=True)


def new_progress(sweep: str) -> Progress:
    now = time.time()
    return Progress(sweep=sweep, pid=os.getpid(), host=socket.gethostname(), started_at=now,
                    updated_at=now)  # fmt: skip


# -- what the start-up banner says ----------------------------------------------------------


@dataclass
class SweepStart:
    """Where a user watches the sweep that is starting (printed before its first stage)."""

    sweep: str
    storage: str  # the sweep's directory in storage
    run_record: str  # its run record (grid, plan, versions, progress)
    planned: dict[str, int]  # stages per kind
    to_run: int  # stages without a finished outcome yet
    dashboard_url: str | None = None  # where a browser opens it (NPTM_PUBLIC_DASHBOARD_URL)
    dashboard_local: bool = True  # nptm's own local Ray: gone when the sweep ends
    dashboard_answers: bool = False
    token_auth: bool = False
    token_source: str | None = None  # where the token comes from
    mlflow_uri: str | None = None
    experiment_name: str | None = None
    experiment_id: str | None = None
    mlflow_degraded: bool = False
    mlflow_public: str | None = None  # the UI where a browser opens it (NPTM_PUBLIC_MLFLOW_URL)
    grafana_url: str | None = None  # nptm's Grafana dashboard (NPTM_PUBLIC_GRAFANA_URL)
    notes: list[str] = field(default_factory=list)

    @property
    def mlflow_ui(self) -> str | None:
        """The MLflow UI's base URL, or None when it must be started first (`mlflow_command`)."""
        uri = self.mlflow_public or self.mlflow_uri or ""
        return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None

    @property
    def mlflow_command(self) -> str | None:
        """The command that serves the UI of a store without a server (sqlite, files)."""
        if not self.mlflow_uri or self.mlflow_ui:
            return None
        return f"mlflow ui --backend-store-uri {self.mlflow_uri} --host 127.0.0.1 --port 5000"

    @property
    def runs_url(self) -> str | None:
        """The experiment's runs table: MLflow 3's UI otherwise opens an experiment on its
        GenAI overview ("Traces: 0")."""
        if self.experiment_id is None or not self.mlflow_uri:
            return None
        base = self.mlflow_ui or "http://127.0.0.1:5000"
        return f"{base}/#/experiments/{self.experiment_id}/runs"


def url_answers(url: str, timeout: float = 10.0) -> bool:
    """Whether an HTTP server answers at `url` within `timeout` seconds; any status counts
    (a dashboard behind token auth answers 401 to a request without the token)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
