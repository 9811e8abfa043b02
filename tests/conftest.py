"""Shared pytest setup: the session's Ray node, MLflow server and finished tiny sweep."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

# Before torch loads its OpenMP runtime, for this process and every process it starts: a
# waiting OpenMP thread sleeps instead of spinning. The session's own sweeps keep both cores
# busy, and spinning threads then burned several times the CPU their work needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout even without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from tests.background import Background  # noqa: E402
from tests.ray_cluster import use_test_ray_env  # noqa: E402

# Before anything imports Ray: one token, the loopback address and a private temp dir for
# every Ray process of the session (see tests/ray_cluster.py).
RAY_TMPDIR = use_test_ray_env()
# The session's own split cache (nptm.trainables.split_cache), inherited by every process it starts:
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


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """An S3-compatible server (moto) for one test module, with its dummy credentials in this
    process's environment meanwhile."""
    from tests.s3_server import S3Server

    with pytest.MonkeyPatch.context() as env:
        for key, value in S3Server.env.items():
            env.setenv(key, value)
        with S3Server(tmp_path_factory.mktemp("s3") / "moto.log") as server:
            yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One `mlflow server` over HTTP for the tests that do not kill it; each test uses its
    own sweep name, hence its own experiment. Started here, `wait()` before use."""
    from tests.sweep_helpers import MlflowServer

    tmp = tmp_path_factory.mktemp("mlflow")
    with MlflowServer(tmp / "mlflow.db", tmp / "server.log") as server:
        yield server


class _TinySweep(Background[tuple]):
    """`nptm sweep tiny.yaml` (see `tiny_sweep`), waited for on a thread of its own: the sweep
    is a subprocess, so it runs on the second core while the unit tests run on the first.
    Its result: (the CompletedProcess, a sweep_helpers.DashboardProbe)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__("tiny-sweep", self._sweep)
        from tests.sweep_helpers import write_grid

        self.tmp = tmp
        self.grid = write_grid(tmp / "tiny.yaml")
        self.storage = tmp / "runs"
        self.proc: subprocess.Popen | None = None

    def _sweep(self) -> tuple:
        from tests.sweep_helpers import nptm_probing_dashboard

        def started(proc: subprocess.Popen) -> None:
            self.proc = proc

        return nptm_probing_dashboard(
            # An override after an option, as a user may type it (it changes no stage).
            "sweep", str(self.grid), "--storage", "runs", "resources.max_concurrent=2",
            cwd=self.tmp, started=started,
        )  # fmt: skip

    def finished_storage(self) -> Path:
        """Its storage once it has ended (raises what it raised)."""
        self.result()
        return self.storage

    def stop(self) -> None:
        """End the sweep if it still runs (a session cut short): SIGTERM stops it cleanly."""
        if self.is_alive() and self.proc is not None:
            self.proc.terminate()
        self.join(timeout=60)


@pytest.fixture(scope="session", autouse=True)
def _tiny_sweep_started(request, tmp_path_factory):
    """Starts the tiny sweep at the session's first test if a selected test needs it: the
    slow tests, which use it, run last (`pytest_collection_modifyitems`)."""
    # tests.cluster_sweeps reuses its pre-training
    if not (_selected(request, "tiny_sweep") or _selected(request, "cluster_sweeps")):
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
    result, dashboard = sweep.result()
    return SimpleNamespace(
        grid=sweep.grid, storage=sweep.storage, result=result, dashboard=dashboard
    )


def _selected(request: pytest.FixtureRequest, fixture: str) -> bool:
    return any(fixture in item.fixturenames for item in request.session.items)


@pytest.fixture(scope="session", autouse=True)
def _cluster_sweeps_started(request, tmp_path_factory, _tiny_sweep_started):
    """Starts tests/test_services.py's two-node cluster and its sweeps (tests.cluster_sweeps)
    at the session's first test if a selected test needs them; they run while other tests do."""
    if not _selected(request, "cluster_sweeps"):
        yield None
        return
    from tests.cluster_sweeps import start_cluster_sweeps

    mlflow_server = request.getfixturevalue("mlflow_server")
    with contextlib.ExitStack() as stack:
        lane = start_cluster_sweeps(
            stack, tmp_path_factory.mktemp("cluster"), mlflow_server,
            _tiny_sweep_started.finished_storage,
        )  # fmt: skip
        yield lane
        lane.join(timeout=60)  # a session cut short: stopping the cluster ends the sweeps


@pytest.fixture(scope="session")
def cluster_sweeps(_cluster_sweeps_started):
    """tests.cluster_sweeps.ClusterSweeps: the finished sweeps on the two-node cluster."""
    return _cluster_sweeps_started.result()


@pytest.fixture(scope="session", autouse=True)
def _lane_started(request, tmp_path_factory, _tiny_sweep_started):
    """Starts the jobs of the selected tests marked with `tests.lane.lane`, one after another
    on a thread of their own, at the session's first test; they run while other tests do."""
    from tests.lane import Lane, lane_keys, needed_fixtures

    keys = lane_keys(request.session.items)
    if not keys:
        yield None
        return
    env = dict(os.environ)  # before any test changes it
    fixtures = {name: request.getfixturevalue(name) for name in needed_fixtures(keys)}
    after = _tiny_sweep_started.result if _tiny_sweep_started is not None else None
    lane = Lane(keys, tmp_path_factory.mktemp, env, fixtures, after)
    yield lane
    lane.close()


@pytest.fixture
def lane_result(request, _lane_started):
    """The value of the test's lane job (tests.lane), once it has run."""
    return _lane_started.result(request.node.get_closest_marker("lane").args[0])


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


@pytest.fixture
def one_thread():
    """One intra-op thread, as a 1-CPU trial has: on a shared 2-core machine, two OpenMP
    threads stall at every barrier as soon as another process takes a core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
