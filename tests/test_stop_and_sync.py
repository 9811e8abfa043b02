"""`nptm sweep` stopped by SIGTERM at any moment exits 143 and says so; `nptm sync-mlflow`
links the rows it filled to their MLflow runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nptm.orchestrator.cli import main
from nptm.results.store import SweepStore
from nptm.trainables.layout import STAGES_TABLE
from tests.lane import LaneJob, lane
from tests.sweep_helpers import empty_mlflow_store
from tests.test_bounds import BASE
from tests.test_tracking import child_runs, sqlite_uri, stage

ROOT = Path(__file__).resolve().parents[1]
GRID = BASE.replace("name: bounds", "name: stopped")


def _catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGTERM (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(
        int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt")
    )
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def _sigterm_at_two_moments(job: LaneJob) -> list[tuple[float, int, str]]:
    """(delay, exit code, stderr) of a sweep signalled `delay` s after its handler is in."""
    grid = job.tmp / "grid.yaml"
    grid.write_text(GRID)
    env = {**job.env, "PYTHONPATH": str(ROOT)}
    ended = []
    for delay in (0.0, 4.0):  # in the imports; in Ray's start
        proc = subprocess.Popen(
            [sys.executable, "-m", "nptm.orchestrator", "sweep", str(grid), "--storage",
             str(job.tmp / f"runs-{delay}"), "--no-report"],
            cwd=job.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not _catches_sigterm(proc.pid) and proc.poll() is None:
                assert time.monotonic() < deadline, "no SIGTERM handler within 120 s"
                time.sleep(0.005)
            time.sleep(delay)
            assert proc.poll() is None, f"ended before the signal: {proc.communicate()}"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        ended.append((delay, proc.returncode, err))
    return ended


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@lane(_sigterm_at_two_moments)
def test_sigterm_at_any_moment_exits_143_with_the_message(lane_result) -> None:
    """From the moment the handler can be installed (nptm's first lines), through the imports,
    the grid check and Ray's start (where Ray's own handler exited 15 silently), to the sweep."""
    for delay, returncode, err in lane_result:
        assert returncode == 143, (delay, returncode, err[-3000:])
        assert "INTERRUPTED by SIGTERM" in err, (delay, err[-3000:])
        assert "Traceback" not in err, (delay, err[-3000:])


def test_sync_mlflow_fills_the_run_id_of_the_rows_it_filled(tmp_path: Path, capsys) -> None:
    storage = tmp_path
    empty_mlflow_store(storage)
    store = SweepStore(storage, "s1")
    for i in range(3):
        store.write_stage(*stage(f"t{i}", seed=i))  # MLflow was down: no run ids
    assert store.read_table(STAGES_TABLE)["mlflow_run_id"].null_count == 3

    uri = sqlite_uri(storage)
    argv = ["sync-mlflow", "s1", "--storage", str(storage), "--mlflow-uri", uri]
    assert main(argv) == 0, capsys.readouterr().err
    assert "created 3, updated 0, unchanged 0" in capsys.readouterr().out
    runs = {r.data.tags["nptm.stage_id"]: r.info.run_id for r in child_runs(uri, "s1")}
    rows = store.read_table(STAGES_TABLE).to_pylist()
    assert {r["stage_id"]: r["mlflow_run_id"] for r in rows} == runs

    # linking changes no run: a second sync has nothing to do
    assert main(argv) == 0
    assert "created 0, updated 0, unchanged 3" in capsys.readouterr().out


def test_stop_signals_raise_at_once_or_are_noted_while_deferring(capsys) -> None:
    """The handler `nptm sweep` sets first: outside `deferring` a signal raises at once (the
    grid check, the plan: nothing to finish); inside, the first is noted, for the sweep's own
    orderly stop to take (ray.init is never cut in half), and raised at the block's end."""
    from nptm.orchestrator.errors import Interrupted
    from nptm.orchestrator.signals import (
        RaiseOnStopSignals,
        StopSignals,
        SweepInterrupted,
        _exit_on_signal,
    )

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with RaiseOnStopSignals() as stop:
            with pytest.raises(Interrupted) as raised:
                os.kill(os.getpid(), signal.SIGTERM)
            assert raised.value.signum == signal.SIGTERM
            with pytest.raises(Interrupted) as raised, stop.deferring():
                os.kill(os.getpid(), signal.SIGINT)  # noted: the block goes on
                assert "SIGINT received: stopping the sweep" in capsys.readouterr().err
            assert raised.value.signum == signal.SIGINT  # raised as the block ended
            with pytest.raises(Interrupted), stop.deferring():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)  # a second one: at once
                pytest.fail("not raised")
            # the sweep's orderly stop takes a noted signal as its own
            with pytest.raises(SweepInterrupted), stop.deferring():
                os.kill(os.getpid(), signal.SIGTERM)
                with StopSignals() as orderly:
                    assert orderly.signum == signal.SIGTERM
                    orderly.check()
            # absl's 3 s abort alarm (Ray's C++ core) goes; a longer timer is not ours
            previous_alarm = signal.signal(signal.SIGALRM, lambda *_: None)
            try:
                for seconds, kept in ((2.5, False), (30.0, True)):
                    signal.setitimer(signal.ITIMER_REAL, seconds)
                    with pytest.raises(Interrupted):
                        os.kill(os.getpid(), signal.SIGTERM)
                    assert (signal.getitimer(signal.ITIMER_REAL)[0] > 0) == kept
                    signal.setitimer(signal.ITIMER_REAL, 0)
            finally:
                signal.signal(signal.SIGALRM, previous_alarm)
        # SIGTERM's default (the interpreter's exit is left) becomes an exit 143 with a message
        assert signal.getsignal(signal.SIGTERM) is (
            _exit_on_signal if before[signal.SIGTERM] == signal.SIG_DFL else before[signal.SIGTERM]
        )
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
