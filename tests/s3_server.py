"""An S3-compatible server on 127.0.0.1 for tests and benchmarks: moto's server mode, in a
process of its own, that counts the requests it answers.

Storage URIs name it in their query (`S3Server.uri`), so every process that gets the URI (a
sweep's driver, Ray workers started before the server) reaches it, as Ray and pyarrow read
``endpoint_override``/``scheme`` there. moto accepts any credentials; `S3Server.env` holds the
dummy ones a test sets (AWS SDKs otherwise look for some, down to the EC2 metadata service).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import ClassVar

from tests.ports import free_port

_REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+" (\d+)')
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours the lines of errors


class S3Server:
    """`moto.server` on a free port of 127.0.0.1; `start()`, then `bucket(name)`."""

    env: ClassVar[dict[str, str]] = {
        "AWS_ACCESS_KEY_ID": "nptm-test",
        "AWS_SECRET_ACCESS_KEY": "nptm-test-secret",
        "AWS_EC2_METADATA_DISABLED": "true",
    }

    def __init__(self, log: Path) -> None:
        self.log = log
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._mark = 0

    def start(self, timeout: float = 60) -> S3Server:
        env: ClassVar[dict[str, str]] = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://{self.endpoint}/moto-api/", timeout=2).close()
                return self
            except OSError as err:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = self.log.read_text()
                    raise RuntimeError(f"moto server did not start: {log}") from err
                time.sleep(0.2)

    def bucket(self, name: str) -> str:
        """Create bucket `name`; returns it."""
        request = urllib.request.Request(f"http://{self.endpoint}/{name}", data=b"", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()
        return name

    def uri(self, path: str) -> str:
        """`s3://PATH` on this server (the region given: nothing asks AWS where a bucket is)."""
        query = f"endpoint_override={self.endpoint}&scheme=http&region=us-east-1"
        return f"s3://{path.strip('/')}?{query}"

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request answered since the last call."""
        lines = self.log.read_text(errors="replace").splitlines()
        new, self._mark = lines[self._mark :], len(lines)
        found = (_REQUEST.search(_COLOUR.sub("", line)) for line in new)
        return [
            (m.group(1), m.group(2))
            for m in found
            if m is not None and not m.group(2).startswith("/moto-api")
        ]

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)  # its own session: this server only
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
