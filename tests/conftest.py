"""Shared pytest setup."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout even without `pip install -e .`
    sys.path.insert(0, str(ROOT))

# The test machines have 2 cores; more intra-op threads only oversubscribe them.
if torch.get_num_threads() > 2:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ray_node(tmp_path_factory):
    """One 2-CPU Ray node on 127.0.0.1 that sweeps join with `--address`: a local Ray per
    sweep costs 10-15 s of start-up on a 2-core machine. The default path, where `nptm sweep`
    starts its own local Ray, is exercised by test_sweep_e2e's first test."""
    from tests.ray_cluster import ray_cluster

    with ray_cluster(tmp_path_factory.mktemp("ray"), cpus=(2,)) as cluster:
        yield cluster
