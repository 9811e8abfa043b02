"""Start and stop real Ray clusters on 127.0.0.1 for tests, cleaned up by PID."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent
# <temp dir>/session_<date>_<pid>/sockets/plasma_store must stay under the 107-byte limit.
_MAX_TEMP_DIR = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Ports of a node's agents, free ones instead of Ray's fixed defaults: with the defaults
    a second cluster on this machine (another test's, or a sweep's own local Ray) finds them
    taken, and its dashboard agent, which Ray Jobs go through, never comes up."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def _ray(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=180
    )


@dataclass(frozen=True)
class Raylet:
    pid: int
    node_id: str
    head: bool


@dataclass(frozen=True)
class RayCluster:
    """A cluster started by `ray_cluster`: where to reach it and how to find its processes."""

    address: str  # GCS address, for `nptm sweep --address`
    dashboard_url: str  # for `ray job submit --address`
    env: dict[str, str]  # environment for clients (token auth switched on)
    temp_dir: str
    port: int

    def raylets(self) -> list[Raylet]:
        """The raylet of every node, found by the cluster's temp dir on its command line.

        (Not by the GCS address: raylets name the GCS by the host's address, not 127.0.0.1.)
        """
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = p.info["cmdline"] or []
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if not cmd or not cmd[0].endswith("/raylet"):
                continue
            if f"--temp_dir={self.temp_dir}" not in cmd:
                continue
            node = next(a.split("=", 1)[1] for a in cmd if a.startswith("--node_id="))
            found.append(Raylet(p.pid, node, "--head" in cmd))
        return found


def _client_env() -> dict[str, str]:
    """os.environ for `ray` commands and clients: no inherited address, token auth on.

    Ray 2.60 clusters require a token; without ~/.ray/auth_token (or RAY_AUTH_TOKEN[_PATH])
    the cluster gets a fresh one through the environment.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    token_file = Path(env.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if not env.get("RAY_AUTH_TOKEN") and not token_file.is_file():
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return env


@contextmanager
def two_node_cluster(tmp: Path, cpus_per_node: int = 1):
    """A head and a second raylet on 127.0.0.1. Yields (address, env for clients)."""
    with ray_cluster(tmp, cpus=(cpus_per_node, cpus_per_node)) as cluster:
        yield cluster.address, cluster.env


@contextmanager
def ray_cluster(tmp: Path, cpus: tuple[int, ...] = (1, 1)):
    """A head node with `cpus[0]` CPUs and one more raylet per further entry, on 127.0.0.1."""
    temp_dir = str(tmp / "ray")
    own_temp = len(temp_dir) > _MAX_TEMP_DIR
    if own_temp:  # Ray's unix socket paths under the temp dir must fit in 107 bytes
        temp_dir = tempfile.mkdtemp(prefix="nptm-ray-")
    port = free_port()
    dashboard_port = free_port()
    env = _client_env()
    head = _ray(
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus[0]}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
        *_node_ports(),
        env=env,
    )
    address = f"127.0.0.1:{port}"
    try:
        assert head.returncode == 0, head.stdout + head.stderr
        for n in cpus[1:]:
            worker = _ray(
                "start",
                f"--address={address}",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={n}",
                *_node_ports(),
                env=env,
            )
            assert worker.returncode == 0, worker.stdout + worker.stderr
        yield RayCluster(address, f"http://127.0.0.1:{dashboard_port}", env, temp_dir, port)
    finally:
        stop_session(temp_dir, port)
        if own_temp:
            shutil.rmtree(temp_dir, ignore_errors=True)


def stop_session(temp_dir: str, port: int | None = None) -> None:
    """Kill exactly the processes of this cluster: those naming its temp dir (or GCS port).

    A driver that started its own local Ray with RAY_TMPDIR=<temp_dir> is stopped the same
    way, by its temp dir alone.
    """
    markers = [temp_dir] if port is None else [temp_dir, f"127.0.0.1:{port}"]
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(m in part for m in markers for part in (p.info["cmdline"] or [])):
                procs[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    me = psutil.Process()
    for pid in [me.pid, *(a.pid for a in me.parents())]:
        procs.pop(pid, None)
    for p in list(procs.values()):
        try:
            for child in p.children(recursive=True):
                procs.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    _kill(list(procs.values()))


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    time.sleep(0.5)
