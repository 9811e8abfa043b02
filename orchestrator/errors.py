"""Exit statuses of `nptm`, the error that ends a command with status 2, and the stop by a
signal that ends it with 128 + N."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input or an environment that cannot run the command; nothing has been written."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM ended a command: its exit status is 128 + `signum` (130, 143). A
    BaseException, like KeyboardInterrupt: no `except Exception` on the way out catches it."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_ABSL_ALARM_S = 3.0  # absl::FailureSignalHandlerOptions.alarm_on_failure_secs, the default
# A stop signal noted while a deferring `RaiseOnStopSignals` was in charge, for the orderly stop
# to take (`take_pending`): at most one.
_pending: list[int] = []


def take_pending() -> int | None:
    """The stop signal noted but not acted on yet (and forget it), or None."""
    return _pending.pop() if _pending else None


class RaiseOnStopSignals:
    """While inside, SIGINT and SIGTERM raise `Interrupted` at once: for the parts of a command
    that write nothing (reading the grid, planning), entered before the slow imports so that a
    signal at any moment ends the command with 128 + N and a message rather than Python's
    default or Ray's (a silent exit 15).

    Inside `deferring()` (Ray starting, a sweep running) the first signal is only noted: raising
    in the middle of ray.init leaves a half-made Ray that can abort the process as it exits.
    The orderly stop (nptm.orchestrator.live.StopSignals) takes a noted signal as its own when
    it starts; one still noted when the block ends is raised then. A second signal raises at
    once. `install()` takes the handlers back from whatever replaced them. Outside the main
    thread signals cannot be caught: the context does nothing there."""

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self._deferring = False

    def __enter__(self) -> RaiseOnStopSignals:
        self.install()
        return self

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self._previous.items():
            if sig == signal.SIGTERM and handler == signal.SIG_DFL:
                # What is left is the interpreter's exit (Ray's and MLflow's atexit work,
                # seconds): the default would end it silently, killed by the signal.
                handler = _exit_on_signal
            signal.signal(sig, handler)  # type: ignore[arg-type]
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
        signum = take_pending()
        if signum is not None:
            raise Interrupted(signum)

    def _handle(self, signum: int, frame: object) -> None:
        import signal
        import sys

        # Ray's C++ core (in this process once ray.init made it) catches SIGTERM first with
        # absl's failure handler, which hands the signal on to this one but sets a 3 s alarm
        # that aborts the process: the stop is orderly, so that alarm goes (a longer timer is
        # someone else's, such as pytest-timeout's, and stays).
        if 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= _ABSL_ALARM_S:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if not self._deferring or _pending:
            raise Interrupted(signum)
        _pending.append(signum)
        print(
            f"\n[nptm] {signal.Signals(signum).name} received: stopping the sweep (send it "
            "again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def _exit_on_signal(signum: int, frame: object) -> None:
    """SIGTERM's default action, with a message and exit status 128 + N (not "killed")."""
    import os
    import signal
    import sys

    name = signal.Signals(signum).name
    print(f"nptm: INTERRUPTED by {name} while exiting", file=sys.stderr, flush=True)
    os._exit(128 + signum)
