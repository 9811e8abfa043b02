"""Shared pytest setup: the session's Ray node, MLflow server and finished tiny sweep."""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout even without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from tests.ray_cluster import use_test_ray_env  # noqa: E402

# Before anything imports Ray: one token, the loopback address and a private temp dir for
# every Ray process of the session (see tests/ray_cluster.py).
RAY_TMPDIR = use_test_ray_env()
# The session's own split cache (trainables.split_cache), inherited by every process it starts:
# cold at the start, as on a new machine, and nothing written to the user's cache.
CACHE_DIR = tempfile.mkdtemp(prefix="nptm-cache-")
os.environ["NPTM_CACHE_DIR"] = CACHE_DIR

# The test machines have 2 cores; more intra-op threads only oversubscribe them.
if torch.get_num_threads() > 2:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ray_node():
    """One 2-CPU Ray node on 127.0.0.1 that sweeps join with `--address`: a local Ray per
    sweep costs 10-15 s of start-up on a 2-core machine. The default path, where `nptm sweep`
    starts its own local Ray, is exercised by `tiny_sweep`."""
    from tests.ray_cluster import ray_cluster

    with ray_cluster(cpus=(2,)) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One `mlflow server` over HTTP for the tests that do not kill it; each test uses its
    own sweep name, hence its own experiment. Started here, `wait()` before use."""
    from tests.sweep_helpers import MlflowServer

    tmp = tmp_path_factory.mktemp("mlflow")
    with MlflowServer(tmp / "mlflow.db", tmp / "server.log") as server:
        yield server


class _TinySweep(threading.Thread):
    """`nptm sweep tiny.yaml` (see `tiny_sweep`), waited for on a thread of its own: the sweep
    is a subprocess, so it runs on the second core while the unit tests run on the first."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(name="tiny-sweep", daemon=True)
        from tests.sweep_helpers import write_grid

        self.tmp = tmp
        self.grid = write_grid(tmp / "tiny.yaml")
        self.proc: subprocess.Popen | None = None
        self.outcome: tuple | BaseException | None = None

    def run(self) -> None:
        from tests.sweep_helpers import nptm_probing_dashboard

        def started(proc: subprocess.Popen) -> None:
            self.proc = proc

        try:
            self.outcome = nptm_probing_dashboard(
                "sweep", str(self.grid), "--storage", "runs", cwd=self.tmp, started=started
            )
        except BaseException as err:  # raised again in the tests that need the sweep
            self.outcome = err

    def stop(self) -> None:
        """End the sweep if it still runs (a session cut short): SIGTERM stops it cleanly."""
        if self.is_alive() and self.proc is not None:
            self.proc.terminate()
        self.join(timeout=60)


@pytest.fixture(scope="session", autouse=True)
def _tiny_sweep_started(request, tmp_path_factory):
    """Starts the tiny sweep at the session's first test if a selected test needs it: the
    slow tests, which use it, run last (`pytest_collection_modifyitems`)."""
    if not any("tiny_sweep" in item.fixturenames for item in request.session.items):
        yield None
        return
    sweep = _TinySweep(tmp_path_factory.mktemp("tiny"))
    sweep.start()
    yield sweep
    sweep.stop()


@pytest.fixture(scope="session")
def tiny_sweep(_tiny_sweep_started: _TinySweep) -> SimpleNamespace:
    """The README's path, once per session: `nptm sweep tiny.yaml` as a user runs it (the
    console entry point, in a fresh process that starts and stops its own local Ray), with a
    relative storage path. 9 stages: 1 pre-training, 2 prunes, 6 retrains. It starts with the
    session (`_tiny_sweep_started`); this waits for it to end.

    Tests that need a finished sweep copy its storage (`copy_storage`); sweeps of other grids
    start from its pre-training (`seed_stages`): stage ids are content hashes, so theirs is
    the same stage. `dashboard` (a sweep_helpers.DashboardProbe): the dashboard URL its
    start-up banner printed, and whether it answered while the sweep ran.
    """
    sweep = _tiny_sweep_started
    sweep.join()
    if isinstance(sweep.outcome, BaseException):
        raise sweep.outcome
    result, dashboard = sweep.outcome
    return SimpleNamespace(
        grid=sweep.grid, storage=sweep.tmp / "runs", result=result, dashboard=dashboard
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`bench` and `scale` tests belong to the slow tier, and the slow tier runs last (in the
    order collected): the unit tests run while the session's tiny sweep does."""
    for item in items:
        if item.get_closest_marker("bench") or item.get_closest_marker("scale"):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's Ray temp dir (logs of every cluster it started), once they are stopped,
    and its split cache."""
    if RAY_TMPDIR is not None:
        shutil.rmtree(RAY_TMPDIR, ignore_errors=True)
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
