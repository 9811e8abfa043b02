"""Start and stop real Ray clusters on 127.0.0.1 for tests, cleaned up by PID."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=180
    )


def _descendants_of_session(temp_dir: str) -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return procs


@contextmanager
def two_node_cluster(tmp: Path, cpus_per_node: int = 1):
    """A head and a second raylet on 127.0.0.1. Yields (address, env for clients)."""
    temp_dir = str(tmp / "ray")
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    head = _ray(
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus_per_node}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={free_port()}",
        env=env,
    )
    address = f"127.0.0.1:{port}"
    try:
        assert head.returncode == 0, head.stdout + head.stderr
        worker = _ray(
            "start",
            f"--address={address}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus_per_node}",
            env=env,
        )
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield address, env
    finally:
        stop_session(temp_dir, port)


def stop_session(temp_dir: str, port: int) -> None:
    """Kill exactly the processes of this cluster: those naming its temp dir or GCS port."""
    marker = f"127.0.0.1:{port}"
    procs = {p.pid: p for p in _descendants_of_session(temp_dir)}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
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
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    time.sleep(0.5)


def ray_processes() -> set[int]:
    """PIDs of the Ray processes running now (raylets, GCS, workers, dashboards)."""
    pids = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any("ray" in part and "site-packages" in part for part in p.info["cmdline"] or []):
                pids.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def kill_new_ray_processes(before: set[int]) -> None:
    """Kill the Ray processes started since `before` was taken (tests run one at a time)."""
    _kill([psutil.Process(pid) for pid in ray_processes() - before if psutil.pid_exists(pid)])
