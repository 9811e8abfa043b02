"""Tests whose work is processes of their own (a script that starts and stops a Ray, a sweep
in a fresh process), run one after another on a thread of their own from the session's first
test: they mostly wait on their processes, and the session's other tests fill the cores
meanwhile. Each test then asserts on what its job returned.

    def _dry_run(job: LaneJob) -> subprocess.CompletedProcess: ...  # the processes

    @pytest.mark.slow
    @lane(_dry_run)
    def test_dry_run(lane_result) -> None: ...  # the assertions, on _dry_run's value

A job gets a `LaneJob`: a temporary directory of its own and the environment its processes
must be given, the session's as it was before the first test (tests running meanwhile change
os.environ, and a process started on this thread would inherit their changes), plus the
session fixtures it names (`lane(job, needs=("mlflow_server",))`), set up before the lane
starts. Only the jobs of selected tests run, in the session's order, once the session's
tiny sweep has ended: the session's start (the unit tests, the tiny sweep, the cluster's
sweeps) already fills the cores, and a Ray started then on a loaded machine can miss Ray's own
start-up deadline.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_JOBS: dict[str, tuple[Callable[[LaneJob], Any], tuple[str, ...]]] = {}


@dataclass(frozen=True)
class LaneJob:
    tmp: Path
    env: dict[str, str]
    fixtures: dict[str, Any] = field(default_factory=dict)


def lane(job: Callable[[LaneJob], Any], needs: tuple[str, ...] = ()) -> pytest.MarkDecorator:
    """Marks a test whose `lane_result` fixture is `job`'s value (raises what it raised)."""
    key = f"{job.__module__}.{job.__qualname__}"
    _JOBS[key] = (job, needs)
    return pytest.mark.lane(key)


def lane_keys(items: list[pytest.Item]) -> list[str]:
    """The jobs of `items`, in their order, once each."""
    keys = [m.args[0] for item in items for m in item.iter_markers("lane")]
    return list(dict.fromkeys(keys))


def needed_fixtures(keys: list[str]) -> set[str]:
    return {name for key in keys for name in _JOBS[key][1]}


class Lane:
    """The jobs of `keys`, submitted at once to one worker thread."""

    def __init__(
        self,
        keys: list[str],
        tmp: Callable[[str], Path],
        env: dict[str, str],
        fixtures: dict,
        after: Callable[[], object] | None = None,
    ) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lane")
        self._futures: dict[str, concurrent.futures.Future] = {}
        if after is not None:  # what it raises is reported by the tests that use it
            self._pool.submit(after)
        for key in keys:
            job, needs = _JOBS[key]
            ctx = LaneJob(tmp(key.rsplit(".", 1)[-1]), dict(env), {n: fixtures[n] for n in needs})
            self._futures[key] = self._pool.submit(job, ctx)

    def result(self, key: str) -> Any:
        return self._futures[key].result()

    def close(self) -> None:
        """Drops the jobs not started (a session cut short) and waits for the running one:
        each bounds its processes with a timeout."""
        self._pool.shutdown(wait=True, cancel_futures=True)
