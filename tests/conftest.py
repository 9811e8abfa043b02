"""Shared pytest setup: the session's Ray node, MLflow server and finished tiny sweep."""

import shutil
import sys
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


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> SimpleNamespace:
    """The README's path, once per session: `nptm sweep tiny.yaml` as a user runs it (the
    console entry point, in a fresh process that starts and stops its own local Ray), with a
    relative storage path. 9 stages: 1 pre-training, 2 prunes, 6 retrains.

    Tests that need a finished sweep copy its storage (`copy_storage`); sweeps of other grids
    start from its pre-training (`seed_stages`): stage ids are content hashes, so theirs is
    the same stage. `dashboard` (a sweep_helpers.DashboardProbe): the dashboard URL its
    start-up banner printed, and whether it answered while the sweep ran.
    """
    from tests.sweep_helpers import nptm_probing_dashboard, write_grid

    tmp = tmp_path_factory.mktemp("tiny")
    grid = write_grid(tmp / "tiny.yaml")
    result, dashboard = nptm_probing_dashboard("sweep", str(grid), "--storage", "runs", cwd=tmp)
    return SimpleNamespace(grid=grid, storage=tmp / "runs", result=result, dashboard=dashboard)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`bench` and `scale` tests belong to the slow tier."""
    for item in items:
        if item.get_closest_marker("bench") or item.get_closest_marker("scale"):
            item.add_marker(pytest.mark.slow)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's Ray temp dir (logs of every cluster it started), once they are stopped."""
    if RAY_TMPDIR is not None:
        shutil.rmtree(RAY_TMPDIR, ignore_errors=True)
