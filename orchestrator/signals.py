"""How SIGINT and SIGTERM stop a command: at once while it writes nothing
(`RaiseOnStopSignals`), and in order while a sweep runs (`StopSignals`: the Tune loop stops at
its next step, never in the middle of a stage's Parquet or MLflow write); Ray's own handlers
are kept out of the way."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from nptm.orchestrator.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_ABSL_ALARM_S = 3.0  # absl::FailureSignalHandlerOptions.alarm_on_failure_secs, the default
# The stop signal noted and not yet acted on (at most one): noted while Ray started, inside a
# deferring `RaiseOnStopSignals`, it is the orderly stop's (`StopSignals`) to act on.
_pending: list[int] = []


class RaiseOnStopSignals:
    """While inside, SIGINT and SIGTERM raise `Interrupted` at once: for the parts of a command
    that write nothing (reading the grid, planning), entered before the slow imports so that a
    signal at any moment ends the command with 128 + N and a message rather than Python's
    default or Ray's (a silent exit 15).

    Inside `deferring()` (Ray starting, a sweep running) the first signal is only noted: raising
    in the middle of ray.init leaves a half-made Ray that can abort the process as it exits.
    The orderly stop (`StopSignals`) acts on a noted signal as its own; one still noted when
    the block ends is raised then. A second signal raises at once. `install()` takes the
    handlers back from whatever replaced them. Outside the main thread signals cannot be
    caught: the context does nothing there."""

    _raised: type[Interrupted] = Interrupted
    # Left with SIGTERM's default, the interpreter's exit (Ray's and MLflow's atexit work,
    # seconds) would end silently, killed by the signal: it says so and exits 143 instead.
    _loud_exit = True

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._deferring = False

    def __enter__(self) -> RaiseOnStopSignals:
        self.install()
        return self

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            if self._loud_exit and sig == signal.SIGTERM and handler == signal.SIG_DFL:
                handler = _exit_on_signal
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """See the class: a first signal inside is noted, and raised when the block ends."""
        _pending.clear()
        self._deferring = True
        try:
            yield
        except BaseException:
            _pending.clear()
            raise
        finally:
            self._deferring = False
        if _pending:
            raise Interrupted(_pending.pop())

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Ray's C++ core (in this process once ray.init made it) catches SIGTERM first with
        # absl's failure handler, which hands the signal on to this one but sets a 3 s alarm
        # that aborts the process: the stop is orderly, so that alarm goes (a longer timer is
        # someone else's, such as pytest-timeout's, and stays).
        if 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= _ABSL_ALARM_S:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if not self._deferring or _pending:
            raise self._raised(signum)
        _pending.append(signum)
        print(
            f"\n[nptm] {signal.Signals(signum).name} received: stopping the sweep (send it "
            "again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def _exit_on_signal(signum: int, frame: object) -> None:
    """SIGTERM's default action, with a message and exit status 128 + N (not "killed")."""
    name = signal.Signals(signum).name
    print(f"nptm: INTERRUPTED by {name} while exiting", file=sys.stderr, flush=True)
    os._exit(128 + signum)


class SweepInterrupted(Interrupted):
    """SIGINT or SIGTERM reached the driver. A BaseException, like KeyboardInterrupt: it must
    pass through Tune's and nptm's `except Exception` handlers on its way out."""


class StopSignals(RaiseOnStopSignals):
    """While inside, SIGINT and SIGTERM ask the sweep to stop: the first (or one noted while
    Ray started) is noted, and the Tune loop raises `SweepInterrupted` at its next step
    (`check`, a tenth of a second), never in the middle of a stage's Parquet or MLflow write;
    a second signal raises it at once. Tune's own SIGINT handler (which would end the run as if
    complete and print a `Tuner.restore` hint: nptm resumes by rerunning its command) is
    switched off, as is Ray's SIGTERM handler (exit 15)."""

    _raised = SweepInterrupted
    _loud_exit = False  # a notebook's SIGTERM stays as it was
    _noted: int | None = None  # the signal the sweep ended on, once outside

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self.install()
        self._deferring = True
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._noted = self.signum
        _pending.clear()  # acted on: the sweep ended, interrupted

    @property
    def signum(self) -> int | None:
        """The stop signal noted (and, once outside, the one the sweep ended on), or None."""
        return _pending[-1] if _pending else self._noted

    def check(self) -> None:
        if _pending:
            raise SweepInterrupted(_pending[-1])


@contextlib.contextmanager
def ray_sigterm_handler_off() -> Iterator[None]:
    """Inside, ray.init leaves SIGTERM to nptm: it would install a handler that calls
    sys.exit(15) wherever the driver is, in the middle of ray.init itself too (a silent exit
    15, and a half-started Ray that can abort the process as it exits). nptm's own handlers
    (`StopSignals`, `RaiseOnStopSignals`) stop a sweep instead."""
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
