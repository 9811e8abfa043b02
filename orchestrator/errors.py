"""Exit statuses of `nptm`, the error that ends a command with status 2, and the stop by a
signal that ends it with 128 + N (how signals stop a command: nptm.orchestrator.signals)."""

from __future__ import annotations

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
