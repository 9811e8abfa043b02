"""Real Ray clusters on 127.0.0.1 for tests: `ray.cluster_utils.Cluster`, in this process.

`use_test_ray_env()` (conftest calls it before anything imports Ray) gives every Ray process of
the test session, in this process or in a subprocess, the same settings:
- one token for Ray 2.60's token authentication (a process reads it once, so every cluster
  of the session must use the same one), unless the machine already configures one;
- 127.0.0.1 as this machine's address: Ray otherwise rewrites a 127.0.0.1 address into the
  host's outward one, where nodes bound to 127.0.0.1 do not listen;
- a private Ray temp dir, so nothing is read from or written to other clusters' /tmp/ray
  (and within it, one per cluster `ray_cluster` starts);
- Ray Train's settings for a single machine (nptm.orchestrator.cluster.LOCAL_RAY_TRAIN_ENV).

The nodes are children of the test process, stopped by `Cluster.shutdown` (never `ray stop`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nptm.orchestrator.cluster import LOCAL_RAY_TRAIN_ENV, token_file
from tests.ports import free_ports
from tests.s3_server import S3Server

VENV_BIN = Path(sys.executable).parent


def use_test_ray_env() -> str | None:
    """Set this process's environment (inherited by every process it starts) for test Ray.
    Returns the Ray temp dir it made, if it made one (for the caller to remove at the end)."""
    os.environ.pop("RAY_ADDRESS", None)  # never attach to a Ray the environment points at
    os.environ["RAY_AUTH_MODE"] = "token"
    if not os.environ.get("RAY_AUTH_TOKEN") and not token_file().is_file():
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Ray's switch for "this machine's address is the loopback" (named after the platforms
    # where it is the default).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray Train as nptm sets it up on a local Ray it starts itself (the nodes of the test
    # clusters inherit this environment): one machine has nothing to preempt.
    for name, value in LOCAL_RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)
    # Ray starts its workers (stages, Tune's trial actors) at niceness 15, so that they yield
    # to its own daemons: on a test machine that other work keeps busy, they would then get a
    # few percent of a core and the session would run ten times longer. At 0 they take their
    # share like any other process; the order of events, not the timing, is what tests assert.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # A cluster node holds its own object-store credentials (nptm forwards none to workers):
    # the test nodes hold the dummy ones of the tests' S3 server (tests/s3_server.py).
    for name, value in S3Server.env.items():
        os.environ.setdefault(name, value)
    if "RAY_TMPDIR" not in os.environ:
        # Short: <dir>/ray/session_<date>_<pid>/sockets/plasma_store must fit in 107 bytes.
        tmp = tempfile.mkdtemp(prefix="nptm-ray-", dir="/tmp")
        os.makedirs(f"{tmp}/ray")
        os.environ["RAY_TMPDIR"] = tmp
        return tmp
    return None


def _token() -> str:
    """The token every Ray process of the session uses (see use_test_ray_env)."""
    return os.environ.get("RAY_AUTH_TOKEN") or token_file().read_text().strip()


def client_env() -> dict[str, str]:
    """Environment for a client process of a test cluster (a sweep, `ray job submit`)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


@dataclass(frozen=True)
class Raylet:
    pid: int
    node_id: str
    head: bool


@dataclass(frozen=True)
class RayCluster:
    """A cluster started by `ray_cluster`: where to reach it, and its nodes."""

    address: str  # GCS address, for `nptm sweep --address`
    dashboard_url: str | None  # for `ray job submit --address`
    env: dict[str, str]  # environment for client processes
    cluster: Any  # the ray.cluster_utils.Cluster

    def raylets(self) -> list[Raylet]:
        """The raylet of every node still alive."""
        found = []
        for node in self.cluster.list_all_nodes():
            (raylet,) = node.all_processes.get("raylet", [None])
            if raylet is not None and raylet.process.poll() is None:
                found.append(
                    Raylet(raylet.process.pid, node.node_id, node is self.cluster.head_node)
                )
        return found

    def dashboard_json(self, path: str) -> Any:
        """GET the dashboard's JSON API at `path` (what its pages show), with the token."""
        assert self.dashboard_url is not None, "a cluster started without its dashboard"
        request = urllib.request.Request(
            self.dashboard_url + path, headers={"Authorization": f"Bearer {_token()}"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)

    def kill_worker_raylet(self) -> None:
        """SIGKILL the raylet of the (one) worker node: the node is lost mid-work."""
        (worker,) = self.cluster.worker_nodes
        worker.kill_raylet()

    def stop(self) -> None:
        """Stop every node now, before `ray_cluster` ends (which then has none left to stop).
        Node by node: `Cluster.shutdown` also resets this process's Ray client state, which
        the sweep a test runs in this process, on another cluster, may be using meanwhile."""
        for node in [*self.cluster.worker_nodes, self.cluster.head_node]:
            if node is not None:
                self.cluster.remove_node(node)


def _node_ports(ports: Iterator[int]) -> dict[str, int]:
    """Free ports for a node's agents instead of Ray's fixed defaults, which another cluster
    on this machine may hold (then the dashboard agent, which Ray Jobs go through, never
    comes up)."""
    names = ("dashboard_agent_listen_port", "metrics_agent_port", "metrics_export_port",
             "runtime_env_agent_port")  # fmt: skip
    return {name: next(ports) for name in names}


# No log monitor on a node: it forwards workers' output to drivers, and every driver of the
# tests connects without it (nptm.orchestrator.cluster.connect: log_to_driver=False). Its
# polling of the log files would cost a few percent of a core for the whole session.
_QUIET = {"include_log_monitor": False}


@contextmanager
def ray_cluster(cpus: tuple[int, ...] = (1, 1), *, dashboard: bool = False) -> Iterator[RayCluster]:
    """A head node with `cpus[0]` CPUs and one more node per further entry, on 127.0.0.1.
    `dashboard`: start the head's dashboard (Ray Jobs need it)."""
    import ray._private.utils
    from ray.cluster_utils import Cluster

    use_test_ray_env()
    ports = iter(free_ports(2 + 4 * len(cpus)))  # distinct: Ray refuses a port given twice
    dashboard_port = next(ports)
    # A temp dir of its own, where the cluster's address is written as `ray start` writes it:
    # a Ray job's driver is pointed at the address found in its head's temp dir (else at any
    # GCS running on this machine, of which a test session has several).
    temp_dir = tempfile.mkdtemp(prefix="c", dir=os.environ.get("RAY_TMPDIR"))
    head = {
        "temp_dir": temp_dir,
        "num_cpus": cpus[0],
        "node_ip_address": "127.0.0.1",
        "gcs_server_port": next(ports),
        "include_dashboard": dashboard,
        "no_monitor": True,  # the autoscaler's: a fixed cluster has nothing to scale
        "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port,
        "object_store_memory": 200 * 1024**2,
        **_node_ports(ports),
        **_QUIET,
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        ray._private.utils.write_ray_address(cluster.address, temp_dir)
        for n in cpus[1:]:
            cluster.add_node(
                num_cpus=n,
                node_ip_address="127.0.0.1",
                object_store_memory=200 * 1024**2,
                **_node_ports(ports),
                **_QUIET,
            )
        cluster.wait_for_nodes()
        url = f"http://127.0.0.1:{dashboard_port}" if dashboard else None
        yield RayCluster(cluster.address, url, client_env(), cluster)
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
