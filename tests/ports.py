"""Ports on 127.0.0.1 for the servers the tests start, and for addresses nothing answers on."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now (bound, then released). A server started on it later can
    lose it to another process, so a caller that starts one checks that it came up."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
