"""Ports on 127.0.0.1 for the servers the tests start, and for addresses nothing answers on."""

from __future__ import annotations

import contextlib
import socket


def free_port() -> int:
    """A port nothing listens on now (bound, then released). A server started on it later can
    lose it to another process, so a caller that starts one checks that it came up."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """`n` distinct ports nothing listens on now: each stays bound until all are drawn, so two
    servers of one cluster never get the same port (as `free_port` twice may give)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
