"""Static checks of the deployment: the compose files, .env.example, both Dockerfiles and their
locks, deploy/ (scripts, KubeRay manifest).

No Docker engine is needed. When the `docker compose` CLI (v2) is installed, every compose file
is also rendered by Compose itself; the structural checks below always run, on the YAML as
parsed by PyYAML, with Compose's variable interpolation re-implemented for the forms the files
use.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
MLFLOW_DOCKERFILE = DEPLOY / "mlflow.Dockerfile"
LOCK = DEPLOY / "constraints.txt"
MLFLOW_LOCK = DEPLOY / "mlflow-constraints.txt"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
MINIO_OVERRIDE = DEPLOY / "docker-compose.minio.yml"
MULTI_HOST = DEPLOY / "docker-compose.multi-host.yml"
WORKER_HOST = DEPLOY / "docker-compose.worker.yml"
# Every compose file, and the -f lists a user combines them in (deploy/README.md, multi-host.md).
COMPOSE_FILES = [COMPOSE, *sorted(DEPLOY.glob("docker-compose.*.yml"))]
STACKS = {
    "default": ([COMPOSE], []),
    "minio": ([COMPOSE, MINIO_OVERRIDE], ["minio"]),
    "multi-host head": ([COMPOSE, MULTI_HOST], []),
    "multi-host head, minio": ([COMPOSE, MINIO_OVERRIDE, MULTI_HOST], ["minio"]),
    "worker host": ([WORKER_HOST], []),
    "worker host, minio": ([WORKER_HOST, DEPLOY / "docker-compose.worker-minio.yml"], []),
}
# Files for several hosts, where Ray nodes must use the host network (an explicit opt-in).
HOST_NETWORK_FILES = {MULTI_HOST, WORKER_HOST}

NPTM_SERVICES = ("ray-head", "ray-worker")  # containers where the nptm CLI runs
DEFAULT_SERVICES = {"ray-head", "ray-worker", "mlflow", "postgres", "prometheus", "grafana"}
MINIO_SERVICES = {"minio", "minio-init"}
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET")
PLACEHOLDER = "CHANGEME"
# Compose interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err},
# ${VAR:+alt}, ${VAR+alt} and bare $VAR; "$$" is a literal dollar sign.
VAR_RE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
ESCAPED_DOLLAR = "\x00"


# ----------------------------------------------------------------------------- helpers


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's substitution of the variable forms above into `value`."""

    def sub(m: re.Match[str]) -> str:
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        is_set, non_empty = name in env, bool(env.get(name))
        if op == ":-":
            return env[name] if non_empty else arg
        if op == "-":
            return env[name] if is_set else arg
        if op in (":?", "?"):
            if not (non_empty if op == ":?" else is_set):
                raise KeyError(f"required variable {name} is missing: {arg}")
            return env[name]
        if op == ":+":
            return arg if non_empty else ""
        if op == "+":
            return arg if is_set else ""
        return env.get(name, "")

    return VAR_RE.sub(sub, value.replace("$$", ESCAPED_DOLLAR)).replace(ESCAPED_DOLLAR, "$")


def variables(value: str) -> Iterator[tuple[str, str | None, str]]:
    for m in VAR_RE.finditer(value.replace("$$", ESCAPED_DOLLAR)):
        yield m.group("braced") or m.group("bare"), m.group("op"), m.group("arg") or ""


def strings(node: Any) -> Iterator[str]:
    """Every string scalar of a parsed YAML document (comments are already gone)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def read_env_file(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(assignments, commented-out `# NAME=value` lines that document optional defaults)."""
    active: dict[str, str] = {}
    documented: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        m = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line)
        if m:
            (documented if m.group(1) else active)[m.group(2)] = m.group(3)
    return active, documented


def env_vars_read(*modules: str) -> set[str]:
    """Names of the environment variables the given source files read (os.environ.get("X"))."""
    names = set()
    for module in modules:
        tree = ast.parse((ROOT / module).read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and ast.unparse(node.func.value) == "os.environ"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names.add(node.args[0].value)
    return names


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Compose's merge tags, read as the value they set: `!reset []`
    is an empty list, `!override {...}` the mapping given."""


def _compose_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _compose_tag)


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader: no Python objects


def resolved_images(doc: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """{service: image reference after interpolation} of one compose file."""
    return {
        name: interpolate(svc["image"], env)
        for name, svc in doc.get("services", {}).items()
        if "image" in svc
    }


def pinned_tag(image: str) -> str | None:
    """The tag of `repo[:tag][@digest]`, None when there is none (the registry port is no tag)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def dockerfile_froms(path: Path) -> list[str]:
    return re.findall(r"^FROM\s+(\S+)", path.read_text(), re.MULTILINE)


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of a pip constraints file holding only `name==version` lines."""
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!_-]+)", line)
        assert m, f"{path.name}: {raw!r} is not a `name==version` pin"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{path.name} pins {name} twice"
        pins[name] = m.group(2)
    return pins


def cuda_tag_of(image: str) -> str:
    m = re.search(r"-(cu\d+)$", image.split("@", 1)[0])
    assert m, f"{image} names no CUDA build"
    return m.group(1)


def parse_port(spec: str | dict[str, Any], env: Mapping[str, str]) -> tuple[str | None, str]:
    """(host ip, container port) of one `ports:` entry after interpolation."""
    if isinstance(spec, dict):
        host_ip = spec.get("host_ip")
        return (interpolate(host_ip, env) if host_ip else None), str(spec["target"])
    parts = interpolate(spec, env).split(":")
    if len(parts) == 3:
        return parts[0], parts[2]
    return None, parts[-1]  # "8265" or "8265:8265": every interface of the host


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)[0]


@pytest.fixture(scope="module")
def docs() -> dict[Path, dict[str, Any]]:
    return {path: load_yaml(path) for path in COMPOSE_FILES}


def load_deploy_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, DEPLOY / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def docker_compose() -> list[str] | None:
    """The Compose v2 command line, if installed (`docker compose` or a v2 `docker-compose`)."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(cmd[0]):
            continue
        try:
            out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.search(r"\bv?2\.\d+", out.stdout):
            return cmd
    return None


# ----------------------------------------------------------------------------- structure


def test_default_profile_is_one_gpu_server_and_minio_is_opt_in(services: dict[str, Any]) -> None:
    default = {n for n, s in services.items() if not s.get("profiles")}
    assert default == DEFAULT_SERVICES
    for name in MINIO_SERVICES:
        assert services[name]["profiles"] == ["minio"], name
    # S3 settings belong to the profile: no default service carries any.
    for name in DEFAULT_SERVICES:
        text = json.dumps(services[name])
        assert not re.search(r"AWS_|S3_|MINIO|minio", text), f"{name} carries S3 settings"
    # The override that points nptm and MLflow at MinIO needs the profile's minio-init.
    override = load_yaml(MINIO_OVERRIDE)["services"]
    assert set(override) == {"mlflow", "ray-head", "ray-worker"}
    for name in ("mlflow", "ray-head"):
        assert override[name]["depends_on"] == {
            "minio-init": {"condition": "service_completed_successfully"}
        }
    for name in NPTM_SERVICES:
        assert override[name]["environment"]["NPTM_STORAGE"] == "s3://nptm"
    assert override["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow/"


def test_every_compose_file_parses_as_a_mapping_of_services(
    docs: dict[Path, dict[str, Any]],
) -> None:
    assert len(docs) >= 5, sorted(p.name for p in docs)  # main, minio, multi-host, worker(s)
    for path, doc in docs.items():
        assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), path.name
        for name, svc in doc["services"].items():
            assert isinstance(svc, dict), f"{path.name}: {name}"


def test_datasets_are_read_only_bind_mounts_and_storage_is_shared(
    docs: dict[Path, dict[str, Any]], env_example: dict[str, str]
) -> None:
    checked = 0
    for path, doc in docs.items():
        for name, svc in doc["services"].items():
            mounts = {m["target"]: m for m in svc.get("volumes", []) if isinstance(m, dict)}
            if "/data" not in mounts:
                continue
            checked += 1
            data, storage = mounts["/data"], mounts["/storage"]
            for mount, var in ((data, "NPTM_DATA_DIR"), (storage, "NPTM_STORAGE_DIR")):
                assert mount["type"] == "bind", f"{path.name}: {name}"
                assert next(variables(mount["source"]))[:2] == (var, ":?"), f"{path.name}: {name}"
                # A missing host path is an error, not a fresh root-owned directory.
                assert mount["bind"]["create_host_path"] is False, f"{path.name}: {name}"
            assert data["read_only"] is True, f"{path.name}: {name} mounts datasets writable"
            assert not storage.get("read_only"), f"{path.name}: {name}"
    assert checked >= 3  # head and worker here, the worker of other hosts
    # The head and the workers see one storage directory, at the path nptm is told.
    main = docs[COMPOSE]["services"]
    for name in NPTM_SERVICES:
        env = main[name]["environment"]
        targets = {m["target"] for m in main[name]["volumes"] if isinstance(m, dict)}
        assert env["NPTM_STORAGE"] in targets and env["NPTM_DATA"] in targets, name
        assert env["NPTM_SHARED_FS"] == "1", f"{name}: nptm would refuse a node-local path"
    # The same bind mounts (the head also keeps Ray's Grafana dashboards in a volume).
    head_binds = [m for m in main["ray-head"]["volumes"] if isinstance(m, dict)]
    assert head_binds == main["ray-worker"]["volumes"]


def test_every_image_is_pinned_by_tag(
    docs: dict[Path, dict[str, Any]], env_example: dict[str, str]
) -> None:
    seen = 0
    for path, doc in docs.items():
        for name, image in resolved_images(doc, env_example).items():
            seen += 1
            tag = pinned_tag(image)
            assert tag and tag != "latest", f"{path.name}: {name} uses {image!r}"
            svc = doc["services"][name]
            if tag == "local":  # built here, never pulled
                assert "build" in svc, f"{path.name}: {name} would pull {image!r}"
    assert seen >= 7
    for dockerfile in (DOCKERFILE, MLFLOW_DOCKERFILE):
        for image in dockerfile_froms(dockerfile):
            tag = pinned_tag(image)
            assert tag and tag != "latest", f"{dockerfile.name}: FROM {image}"


def test_published_ports_bind_loopback_unless_opted_in(
    docs: dict[Path, dict[str, Any]], env_example: dict[str, str]
) -> None:
    published = 0
    for path, doc in docs.items():
        for name, svc in doc["services"].items():
            if path not in HOST_NETWORK_FILES:
                assert svc.get("network_mode") != "host", f"{path.name}: {name} bypasses ports"
            for spec in svc.get("ports", []):
                published += 1
                host_ip, _ = parse_port(spec, env_example)
                assert host_ip == "127.0.0.1", f"{name}: port {spec!r} binds to {host_ip or 'all'}"
                # The interface is the one opt-in variable, not a literal.
                opted_in, _ = parse_port(spec, {**env_example, "NPTM_BIND": "192.0.2.10"})
                assert opted_in == "192.0.2.10", f"{name}: port {spec!r} ignores NPTM_BIND"
    assert published >= 4  # dashboard, MLflow, MinIO API and console
    assert "ports" not in docs[COMPOSE]["services"]["postgres"]
    # On the host network nothing is published, and the head's dashboard stays on loopback.
    head = docs[MULTI_HOST]["services"]["ray-head"]
    assert head["network_mode"] == "host" and head["ports"] == []
    assert head["environment"]["RAY_DASHBOARD_HOST"] == "127.0.0.1"
    assert "ports" not in docs[WORKER_HOST]["services"]["ray-worker"]


def test_no_container_is_privileged(docs: dict[Path, dict[str, Any]]) -> None:
    for path, doc in docs.items():
        for name, svc in doc["services"].items():
            for key in ("privileged", "cap_add", "pid", "ipc", "devices", "security_opt"):
                assert key not in svc, f"{path.name}: {name} sets {key}"


def test_secrets_come_only_from_required_env_variables(
    docs: dict[Path, dict[str, Any]], env_example: dict[str, str]
) -> None:
    secrets_seen = set()
    for path, doc in docs.items():
        for name, svc in doc["services"].items():
            env = svc.get("environment", {})
            assert isinstance(env, dict), f"{path.name}: {name}: use the mapping form"
            for key, value in env.items():
                if not SECRET_NAME.search(key) or key == "RAY_AUTH_MODE":
                    continue
                used = list(variables(str(value)))
                assert len(used) == 1 and used[0][1] == ":?", (
                    f"{path.name}: {name}.{key} must be exactly ${{VAR:?message}}"
                )
                assert str(value) == f"${{{used[0][0]}:?{used[0][2]}}}", f"{path.name}: {key}"
                secrets_seen.add(used[0][0])
    assert {"RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "S3_SECRET_KEY"} <= (
        secrets_seen
    )


def test_worker_has_gpu_reservation_and_scales(
    docs: dict[Path, dict[str, Any]], env_example: dict[str, str]
) -> None:
    for path in (COMPOSE, WORKER_HOST):
        worker = docs[path]["services"]["ray-worker"]
        for key in ("container_name", "hostname", "ports"):
            assert key not in worker, f"ray-worker sets {key}: `--scale ray-worker=N` would collide"
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d["capabilities"]]
        assert len(gpu) == 1, devices
        (device,) = gpu
        assert ("count" in device) != ("device_ids" in device), "exactly one of count / device_ids"
        if "count" in device:
            count = interpolate(str(device["count"]), env_example)
            assert count == "all" or int(count) >= 1, count


def test_every_variable_is_defined_or_defaulted(
    docs: dict[Path, dict[str, Any]], env_example: dict[str, str]
) -> None:
    for path, doc in docs.items():
        used = [v for s in strings(doc) for v in variables(s)]
        assert used or path.name == "docker-compose.cpu.yml", f"{path.name} reads no variables?"
        for name, op, arg in used:
            if op in (":?", "?"):
                assert env_example.get(name), f"required ${{{name}}} has no value in .env.example"
                assert arg.strip(), f"${{{name}:?}} needs a message saying what to set"
            elif op not in (":-", "-", ":+", "+"):
                assert name in env_example, f"${{{name}}} has no default, not in .env.example"
        # Rendering with .env.example alone must succeed, as `docker compose config` would.
        for s in strings(doc):
            interpolate(s, env_example)


def test_documented_defaults_match_compose(docs: dict[Path, dict[str, Any]]) -> None:
    _, documented = read_env_file(ENV_EXAMPLE)
    defaults: dict[str, set[str]] = {}
    for doc in docs.values():
        for s in strings(doc):
            for n, op, a in variables(s):
                if op == ":-":
                    defaults.setdefault(n, set()).add(a)
    assert documented, ".env.example documents no optional setting"
    for name, value in documented.items():
        assert name in defaults, f".env.example documents {name}, which compose does not read"
        assert defaults[name] == {value}, (
            f"{name}: .env.example {value!r}, compose {defaults[name]}"
        )


def test_env_example_holds_placeholders_only(env_example: dict[str, str]) -> None:
    secrets_ = {k: v for k, v in env_example.items() if SECRET_NAME.search(k)}
    assert {"RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"} <= set(secrets_)
    for key, value in secrets_.items():
        assert value.startswith(PLACEHOLDER), f"{key} must be a {PLACEHOLDER} placeholder"
    for key, value in env_example.items():
        assert not re.search(r"[0-9a-fA-F]{20,}|[A-Za-z0-9+/]{24,}", value), (
            f"{key} looks like a real secret"
        )
    assert env_example.get("RAY_AUTH_MODE", "token") == "token"


def test_ray_token_auth_is_always_on(docs: dict[Path, dict[str, Any]]) -> None:
    ray_nodes = [
        (path, name, svc)
        for path, doc in docs.items()
        for name, svc in doc["services"].items()
        if "ray-node.sh" in " ".join(svc.get("command", []))
    ]
    assert len(ray_nodes) == 3  # head and worker here, the worker of other hosts
    for _, name, svc in ray_nodes:
        env = svc["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name  # a literal: .env cannot switch it off
        assert next(variables(env["RAY_AUTH_TOKEN"]))[:2] == ("RAY_AUTH_TOKEN", ":?"), name
    disabled = re.compile(
        r"(RAY_AUTH_MODE\s*[:=]\s*[\"']?disabled|mode:\s*[\"']?disabled)", re.IGNORECASE
    )
    files = [COMPOSE, ENV_EXAMPLE, DOCKERFILE, *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]
    for path in files:
        assert not disabled.search(path.read_text()), f"{path.name} disables Ray authentication"


def test_images_built_from_their_dockerfiles(services: dict[str, Any]) -> None:
    for name in NPTM_SERVICES:
        build = services[name]["build"]
        assert build["dockerfile"] == "Dockerfile" and build["context"] == ".", name
    assert services["mlflow"]["build"] == {"context": ".", "dockerfile": "deploy/mlflow.Dockerfile"}
    froms = dockerfile_froms(DOCKERFILE)
    assert len(froms) == 1, froms
    assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311-cu\d{3}", froms[0]), froms[0]
    assert read_lock(LOCK)["ray"] == "2.60.0"
    # Clients must speak the cluster's Ray: the project environment pins the same release.
    assert importlib.metadata.version("ray") == "2.60.0"
    # The MLflow server is a slim Python image, not the multi-GB GPU one.
    (mlflow_from,) = dockerfile_froms(MLFLOW_DOCKERFILE)
    assert re.fullmatch(r"python:3\.11[.\d]*-slim(-\w+)?(@sha256:[0-9a-f]{64})?", mlflow_from)
    assert not {"torch", "ray"} & set(read_lock(MLFLOW_LOCK))


def test_nptm_containers_set_exactly_what_nptm_reads(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nptm.orchestrator.cli import build_parser
    from nptm.orchestrator.public_urls import ENV as PUBLIC_URL_VARS

    cli_vars = env_vars_read("orchestrator/cli.py")
    nptm_vars = cli_vars | env_vars_read("trainables/artifacts.py") | set(PUBLIC_URL_VARS.values())
    assert {"NPTM_STORAGE", "MLFLOW_TRACKING_URI", "NPTM_DATA", "RAY_ADDRESS"} <= cli_vars
    assert "NPTM_SHARED_FS" in nptm_vars
    for name in NPTM_SERVICES:
        env = services[name]["environment"]
        nptm_like = {k for k in env if k.startswith("NPTM_") or k in nptm_vars}
        assert nptm_like == nptm_vars, f"{name}: sets {nptm_like ^ nptm_vars} wrongly"
        assert env["MLFLOW_TRACKING_USERNAME"] and env["MLFLOW_TRACKING_PASSWORD"]
    # The container values reach the CLI's options (the parser reads the environment).
    env = services["ray-head"]["environment"]
    values = {k: interpolate(str(env[k]), {}) for k in cli_vars}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    args = build_parser().parse_args(["sweep", "grid.yaml"])
    assert args.address == values["RAY_ADDRESS"] == "ray-head:6379"
    assert args.storage == values["NPTM_STORAGE"] == "/storage"
    assert args.mlflow_uri == values["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert args.data_root == values["NPTM_DATA"] == "/data"
    # And nptm accepts the local storage path on a multi-node cluster because of NPTM_SHARED_FS.
    from nptm.trainables.artifacts import node_local_path_warning

    monkeypatch.delenv("NPTM_SHARED_FS", raising=False)
    assert node_local_path_warning(args.storage) is not None
    monkeypatch.setenv("NPTM_SHARED_FS", env["NPTM_SHARED_FS"])
    assert node_local_path_warning(args.storage) is None


def test_start_up_order_follows_healthchecks(services: dict[str, Any]) -> None:
    minio = load_yaml(MINIO_OVERRIDE)["services"]

    def deps(name: str, with_minio: bool) -> dict[str, str]:
        own = services[name].get("depends_on", {})
        extra = minio.get(name, {}).get("depends_on", {}) if with_minio else {}
        return {d: c["condition"] for d, c in {**own, **extra}.items()}

    assert deps("mlflow", False) == {"postgres": "service_healthy"}
    assert deps("ray-head", False) == {"mlflow": "service_healthy"}
    assert deps("ray-worker", False) == {"ray-head": "service_healthy"}
    assert deps("minio-init", True) == {"minio": "service_healthy"}
    assert deps("mlflow", True)["minio-init"] == "service_completed_successfully"
    for with_minio in (False, True):
        names = [n for n, s in services.items() if with_minio or not s.get("profiles")]
        for name in names:
            for dep, condition in deps(name, with_minio).items():
                assert dep in names, f"{name} waits on {dep}, which is not started"
                if condition == "service_healthy":
                    assert "healthcheck" in services[dep], f"{name} waits on {dep}'s healthcheck"
        # The dependency graph has no cycle (Compose would refuse it): peel off ready services.
        pending = {n: set(deps(n, with_minio)) for n in names}
        while pending:
            ready = [n for n, d in pending.items() if not d & set(pending)]
            assert ready, f"dependency cycle among {sorted(pending)}"
            for n in ready:
                del pending[n]


def test_dashboard_port_matches_head_script(services: dict[str, Any]) -> None:
    script = (DEPLOY / "ray-node.sh").read_text()
    port = re.search(r"--dashboard-port=(\d+)", script).group(1)
    assert [parse_port(p, {})[1] for p in services["ray-head"]["ports"]] == [port]
    assert f"127.0.0.1:{port}/api/gcs_healthz" in " ".join(
        services["ray-head"]["healthcheck"]["test"]
    )


def published_url(spec: str, env: Mapping[str, str]) -> str:
    """The http:// address on the host of one `ports:` entry "ip:host port:container port"."""
    host_ip, host_port, _ = interpolate(spec, env).split(":")
    return f"http://{host_ip}:{host_port}"


def test_prometheus_and_grafana_serve_the_dashboards_charts_behind_a_login(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    """Ray's metrics setup: the head queries Prometheus and Grafana on the compose network and
    the browser loads Grafana's panels from its published port; Grafana asks for a login."""
    head = services["ray-head"]["environment"]
    grafana, prometheus = services["grafana"], services["prometheus"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    password = next(variables(env["GF_SECURITY_ADMIN_PASSWORD"]))
    assert password[:2] == ("GRAFANA_ADMIN_PASSWORD", ":?")  # required, from .env
    assert env["GF_SECURITY_ALLOW_EMBEDDING"] == "true"  # the Ray dashboard frames its panels
    assert "ports" not in prometheus  # only Grafana and the head query it
    (grafana_port,) = grafana["ports"]
    assert head["RAY_PROMETHEUS_HOST"] == "http://prometheus:9090"
    assert head["RAY_GRAFANA_HOST"] == f"http://grafana:{parse_port(grafana_port, {})[1]}"
    # What a browser reaches, as published (NPTM_BIND included): Grafana for the dashboard's
    # frames, and every address nptm's banner prints.
    shown = {
        "RAY_GRAFANA_IFRAME_HOST": grafana_port,
        "NPTM_PUBLIC_GRAFANA_URL": grafana_port,
        "NPTM_PUBLIC_DASHBOARD_URL": services["ray-head"]["ports"][0],
        "NPTM_PUBLIC_MLFLOW_URL": services["mlflow"]["ports"][0],
    }
    for bind in ({}, {"NPTM_BIND": "192.0.2.10"}):
        values = {**env_example, **bind}
        for name, port in shown.items():
            assert interpolate(head[name], values) == published_url(port, values), name
    assert services["ray-worker"]["environment"]["NPTM_PUBLIC_MLFLOW_URL"]  # the same anchor


def test_prometheus_scrapes_every_ray_node_and_grafana_provisions_the_dashboards(
    services: dict[str, Any],
) -> None:
    def mounted(service: str, target: str) -> str:
        """The source of `service`'s short-form volume mounted at `target`."""
        found = [v.split(":") for v in services[service]["volumes"] if isinstance(v, str)]
        (source,) = [v[0] for v in found if v[1] == target]
        return source

    config = yaml.safe_load(
        (ROOT / mounted("prometheus", "/etc/prometheus/prometheus.yml")).read_text()
    )
    (ray_job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ray"]
    (dns,) = ray_job["dns_sd_configs"]
    nodes = {n for n, s in services.items() if "ray-node.sh" in " ".join(s.get("command", []))}
    assert set(dns["names"]) == nodes == {"ray-head", "ray-worker"}
    script = (DEPLOY / "ray-node.sh").read_text()
    assert str(dns["port"]) == re.search(r"--metrics-export-port=(\d+)", script).group(1)

    # Ray's own default, read from its source (importing Ray's dashboard takes seconds).
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    head_module = (ray_dir / "dashboard" / "modules" / "metrics" / "metrics_head.py").read_text()
    (default_name,) = re.findall(r'^DEFAULT_PROMETHEUS_NAME = "([^"]+)"', head_module, re.M)
    provisioning = ROOT / mounted("grafana", "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    head = services["ray-head"]["environment"]
    # Ray's dashboards and the dashboard's frames ask for the data source by this name.
    assert source["name"] == default_name and "RAY_PROMETHEUS_NAME" not in head
    assert source["url"] == head["RAY_PROMETHEUS_HOST"] and source["isDefault"] is True
    providers = yaml.safe_load((provisioning / "dashboards/dashboards.yml").read_text())
    paths = {p["name"]: p["options"]["path"] for p in providers["providers"]}
    # The head writes its dashboards to <RAY_METRICS_OUTPUT_ROOT>/grafana/dashboards, in a
    # volume that Grafana reads at the same path.
    root = head["RAY_METRICS_OUTPUT_ROOT"]
    assert paths["Ray"] == f"{root}/grafana/dashboards"
    assert f"ray-metrics:{root}" in services["ray-head"]["volumes"]
    assert f"ray-metrics:{root}:ro" in services["grafana"]["volumes"]
    assert re.search(
        rf"mkdir -p [^\n]*{root}\b[^\n]*&& chown -R ray [^\n]*{root}\b", DOCKERFILE.read_text()
    )
    dashboard = ROOT / mounted("grafana", f"{paths['nptm']}/nptm.json")
    assert dashboard == DEPLOY / "grafana" / "nptm.json"


def test_firewall_list_names_every_fixed_ray_port() -> None:
    script = (DEPLOY / "ray-node.sh").read_text()
    ports = set(re.findall(r"--[a-z-]*port=(\d+)", script))
    low, high = (re.search(rf"--{b}-worker-port=(\d+)", script).group(1) for b in ("min", "max"))
    assert {"6379", "6380", "6381", "8265", "52365"} <= ports
    doc = (DEPLOY / "multi-host.md").read_text()
    for port in ports - {low, high}:
        assert re.search(rf"\b{port}\b", doc), f"deploy/multi-host.md does not list port {port}"
    assert f"{low}-{high}" in doc, "deploy/multi-host.md does not list the worker port range"


def test_job_submission_is_the_documented_path() -> None:
    readme = (DEPLOY / "README.md").read_text()
    joined = re.sub(r"\s*\\\n\s*", " ", readme)  # shell line continuations
    m = re.search(
        r"ray job submit --submission-id \"nptm-[^\"]+\" (.*?) -- nptm sweep (\S+)", joined
    )
    assert m, "deploy/README.md shows no `ray job submit --submission-id nptm-... -- nptm sweep`"
    assert "--address http://127.0.0.1:8265" in m.group(1) and "--working-dir ." in m.group(1)
    assert (ROOT / m.group(2)).is_file(), m.group(2)
    assert "export RAY_AUTH_MODE=token" in readme and "export RAY_AUTH_TOKEN=" in readme


def test_secrets_stay_out_of_image_and_files() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".git" in ignored
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    long_hex = re.compile(r"\b[0-9a-fA-F]{32,}\b")
    for path in [COMPOSE, DOCKERFILE, *DEPLOY.rglob("*")]:
        if path.is_file():
            assert not long_hex.search(path.read_text()), f"{path.name} holds a key-like string"


# ----------------------------------------------------------------------------- locked images


def pip_installs(dockerfile: Path) -> list[str]:
    """The `pip install ...` commands of a Dockerfile's RUN lines (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    return [m.group(0) for m in re.finditer(r"pip install [^&\n]*", text)]


def test_nptm_image_installs_through_its_lock() -> None:
    installs = pip_installs(DOCKERFILE)
    assert len(installs) == 2, installs  # dependencies, then the package with --no-deps
    for cmd in installs:
        assert re.search(r"(-c|--constraint)\s+deploy/constraints\.txt\b", cmd), cmd
    text = DOCKERFILE.read_text()
    assert re.search(r"COPY\s+(--chown=\S+\s+)?deploy/constraints\.txt\b", text)
    # torch comes from PyTorch's index for the base image's CUDA, and the build checks it.
    cuda = cuda_tag_of(dockerfile_froms(DOCKERFILE)[0])
    index = re.search(r"ARG TORCH_INDEX_URL=(\S+)", text).group(1)
    assert index == f"https://download.pytorch.org/whl/{cuda}"
    assert '--extra-index-url "${TORCH_INDEX_URL}"' in installs[0]
    version = f"{cuda[2:-1]}.{cuda[-1]}"  # cu128 -> 12.8
    assert f"torch.version.cuda == '{version}'" in text


def test_lock_pins_the_dependency_closure_of_pyproject() -> None:
    lock = read_lock(LOCK)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cuda = cuda_tag_of(dockerfile_froms(DOCKERFILE)[0])
    # Every direct dependency is pinned, within pyproject's range.
    for line in project["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in lock, f"the lock does not pin {name}"
        public = lock[name].split("+")[0]
        assert req.specifier.contains(public, prereleases=True), f"{name}=={lock[name]} vs {req}"
    # torch and torchvision are the CUDA build of the base image; its CUDA libraries are left
    # to the torch wheel's exact pins, so no other CUDA build of them can sneak in.
    for name in ("torch", "torchvision"):
        assert lock[name].endswith(f"+{cuda}"), f"{name}=={lock[name]} is not the {cuda} build"
    assert not [n for n in lock if n.startswith("nvidia-") or n == "triton"]
    # Closed under requirements: for every pinned package installed here at the pinned version
    # (so with the same metadata), each of its requirements on Linux/Python 3.11 is pinned too.
    # Extras are followed from pyproject's own requirements (ray[default,train,tune]).
    direct = [Requirement(r) for r in project["dependencies"]]
    extras = {canonicalize_name(r.name): r.extras for r in direct}
    compared = 0
    for name, version in lock.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        compared += 1
        wanted = [{"extra": e} for e in extras.get(name, ())] or [{"extra": ""}]
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate(env) for env in wanted):
                sub_name = canonicalize_name(sub.name)
                if name in ("torch", "torchvision") and (
                    sub_name.startswith("nvidia-") or sub_name == "triton"
                ):
                    continue
                assert sub_name in lock, f"{name} requires {sub}, which the lock does not pin"
                assert sub.specifier.contains(lock[sub_name].split("+")[0], prereleases=True), (
                    f"{name} requires {sub}, the lock has {lock[sub_name]}"
                )
    assert compared >= len(lock) // 2, "the lock is far from this environment: regenerate it"


def test_lock_generator_pins_cuda_builds_and_drops_their_libraries() -> None:
    lock_py = load_deploy_module("lock")
    pins = {"numpy": "2.4.6", "torch": "2.14.1", "torchvision": "0.29.1+cpu", "triton": "3.8.0"}
    pins["nvidia-cudnn-cu13"] = "9.24.0.43"
    assert lock_py.lock_lines(pins, "cu128") == [
        "numpy==2.4.6",
        "torch==2.14.1+cu128",
        "torchvision==0.29.1+cu128",
    ]
    assert lock_py.base_image_cuda_tag() == cuda_tag_of(dockerfile_froms(DOCKERFILE)[0])
    # The committed lock is what the generator writes for some environment: its header and
    # every pin's form (read_lock rejects anything but `name==version`).
    assert "deploy/lock.py" in LOCK.read_text().splitlines()[1]
    assert read_lock(LOCK)


def test_mlflow_image_installs_pinned_versions_through_its_lock() -> None:
    (cmd,) = pip_installs(MLFLOW_DOCKERFILE)
    assert re.search(r"(-c|--constraint)\s+\S*constraints\.txt\b", cmd), cmd
    assert "deploy/mlflow-constraints.txt" in MLFLOW_DOCKERFILE.read_text()
    requested = dict(re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', cmd))
    assert set(requested) == {"mlflow", "psycopg2-binary", "boto3"}, requested
    lock = read_lock(MLFLOW_LOCK)
    for name, version in requested.items():
        assert lock[canonicalize_name(name)] == version, name
    assert "flask-wtf" in lock  # mlflow[auth]: the basic-auth app's dependency
    # The server runs the MLflow release of the clients.
    assert requested["mlflow"] == read_lock(LOCK)["mlflow"]
    # It runs unprivileged.
    assert re.search(r"^USER\s+(?!root)\S+", MLFLOW_DOCKERFILE.read_text(), re.MULTILINE)


# ----------------------------------------------------------------------------- deploy scripts


def fake_tool(tmp_path: Path, name: str, body: str) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    tool = bindir / name
    tool.write_text("#!/bin/sh\n" + body)
    tool.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log")}


RAY_FAKE = """printf '%s\\n' "$@" > "$FAKE_LOG"
printf 'RAY_ADDRESS=%s\\n' "${RAY_ADDRESS-<unset>}" >> "$FAKE_LOG"
"""


@pytest.mark.parametrize("role", ["head", "worker"])
def test_ray_node_starts_an_authenticated_node(tmp_path: Path, role: str) -> None:
    env = fake_tool(tmp_path, "ray", RAY_FAKE)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0123456789abcdef" * 4, RAY_ADDRESS="x:1")
    out = subprocess.run(["bash", str(DEPLOY / "ray-node.sh"), role], env=env, timeout=30)
    assert out.returncode == 0
    argv = (tmp_path / "log").read_text().splitlines()
    assert argv[0] == "start" and "--block" in argv
    assert argv[-1] == "RAY_ADDRESS=<unset>"  # `ray start` must not mistake it for --address
    if role == "head":
        assert {"--head", "--dashboard-host=0.0.0.0", "--port=6379"} <= set(argv)
    else:
        assert "--address=ray-head:6379" in argv and "--head" not in argv
    assert not [a for a in argv if a.startswith("--node-ip-address")]


@pytest.mark.parametrize("role", ["head", "worker"])
def test_ray_start_accepts_every_argument_of_the_node_script(tmp_path: Path, role: str) -> None:
    from ray.scripts.scripts import start  # the `ray start` command of this Ray (the image's)

    env = fake_tool(tmp_path, "ray", RAY_FAKE)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN="0123456789abcdef" * 4,
        RAY_NODE_IP_ADDRESS="192.0.2.10",
        RAY_WORKER_NUM_CPUS="8",
    )
    assert subprocess.run(["bash", str(DEPLOY / "ray-node.sh"), role], env=env).returncode == 0
    argv = (tmp_path / "log").read_text().splitlines()[:-1]  # less the RAY_ADDRESS line
    assert argv[0] == "start"
    params = start.make_context("start", argv[1:]).params  # raises on an unknown option
    assert params["node_manager_port"] == 6380 and params["node_ip_address"] == "192.0.2.10"
    assert params["min_worker_port"] < params["max_worker_port"]


@pytest.mark.parametrize("role", ["head", "worker"])
def test_ray_node_on_the_host_network_uses_the_given_addresses(tmp_path: Path, role: str) -> None:
    # The environment that deploy/docker-compose.{multi-host,worker}.yml give the node.
    files = {"head": MULTI_HOST, "worker": WORKER_HOST}
    service = load_yaml(files[role])["services"][f"ray-{role}"]
    env_example = read_env_file(ENV_EXAMPLE)[0]
    node_env = {
        k: interpolate(str(v), env_example)
        for k, v in service["environment"].items()
        if k.startswith("RAY_") and k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")
    }
    env = fake_tool(tmp_path, "ray", RAY_FAKE)
    env.update(node_env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0123456789abcdef" * 4)
    out = subprocess.run(["bash", str(DEPLOY / "ray-node.sh"), role], env=env, timeout=30)
    assert out.returncode == 0
    argv = set((tmp_path / "log").read_text().splitlines())
    ip = env_example["NPTM_HEAD_IP" if role == "head" else "NPTM_NODE_IP"]
    assert f"--node-ip-address={ip}" in argv
    if role == "head":
        assert "--dashboard-host=127.0.0.1" in argv  # the host network: loopback only
    else:
        assert f"--address={env_example['NPTM_HEAD_IP']}:6379" in argv


@pytest.mark.parametrize(
    ("mode", "token", "complaint"),
    [
        ("disabled", "0123456789abcdef" * 4, "RAY_AUTH_MODE"),
        (None, "0123456789abcdef" * 4, "RAY_AUTH_MODE"),
        ("token", "", "empty"),
        ("token", "CHANGEME-ray-auth-token", "placeholder"),
        ("token", "short-token", "at least 32"),
    ],
)
def test_ray_node_refuses_without_a_real_token(
    tmp_path: Path, mode: str | None, token: str, complaint: str
) -> None:
    env = fake_tool(tmp_path, "ray", RAY_FAKE)
    env["RAY_AUTH_TOKEN"] = token
    if mode is not None:
        env["RAY_AUTH_MODE"] = mode
    out = subprocess.run(
        ["bash", str(DEPLOY / "ray-node.sh"), "head"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 64 and complaint in out.stderr, out.stderr
    assert not (tmp_path / "log").exists(), "ray was started anyway"


MC_FAKE = """echo "$*" >> "$FAKE_LOG"
case "$*" in
  "admin policy attach"*) exit "${ATTACH_RC:-0}" ;;
  "admin user info"*) echo "PolicyName: ${ATTACHED:-}" ;;
esac
"""
MINIO_ENV = {
    "MINIO_ROOT_USER": "root-user",
    "MINIO_ROOT_PASSWORD": "root-password-123",
    "S3_ACCESS_KEY": "nptm",
    "S3_SECRET_KEY": "s3-secret-123",
}


def run_minio_init(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = fake_tool(tmp_path, "mc", MC_FAKE)
    env.update(MINIO_ENV, MINIO_POLICY_FILE=str(DEPLOY / "minio-policy.json"), **extra)
    return subprocess.run(
        ["sh", str(DEPLOY / "minio-init.sh")], env=env, capture_output=True, text=True, timeout=30
    )


def test_minio_init_creates_the_buckets_compose_uses(tmp_path: Path) -> None:
    out = run_minio_init(tmp_path)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "log").read_text().splitlines()
    (mb,) = [c for c in calls if c.startswith("mb ")]
    buckets = {t.split("/", 1)[1] for t in mb.split() if "/" in t}
    assert "--ignore-existing" in mb.split() and buckets == {"mlflow", "nptm"}
    assert "admin user add nptm nptm s3-secret-123" in calls
    # Every S3 location of the minio override is one of those buckets, and the S3 user may use
    # them.
    override = load_yaml(MINIO_OVERRIDE)["services"]
    nptm_bucket = override["ray-head"]["environment"]["NPTM_STORAGE"]
    mlflow_dest = override["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"]
    for uri in (nptm_bucket, mlflow_dest):
        assert uri.startswith("s3://") and uri[5:].split("/")[0] in buckets, uri
    policy = json.loads((DEPLOY / "minio-policy.json").read_text())
    arns = {r for st in policy["Statement"] for r in st["Resource"]}
    assert arns == {f"arn:aws:s3:::{b}{s}" for b in buckets for s in ("", "/*")}


def test_minio_init_accepts_an_already_attached_policy_only(tmp_path: Path) -> None:
    assert run_minio_init(tmp_path, ATTACH_RC="1", ATTACHED="nptm-buckets").returncode == 0
    failed = run_minio_init(tmp_path, ATTACH_RC="1", ATTACHED="readonly")
    assert failed.returncode == 64 and "nptm-buckets" in failed.stderr


def test_minio_init_refuses_placeholders(tmp_path: Path) -> None:
    out = run_minio_init(tmp_path, S3_SECRET_KEY="CHANGEME-s3-secret-key")
    assert out.returncode == 64 and "S3_SECRET_KEY" in out.stderr
    assert not (tmp_path / "log").exists(), "mc ran with a placeholder secret"


# ----------------------------------------------------------------------------- MLflow entrypoint


@pytest.fixture(scope="module")
def mlflow_server() -> Any:
    return load_deploy_module("mlflow_server")


def test_mlflow_uri_survives_any_password(mlflow_server: Any, tmp_path: Path) -> None:
    from sqlalchemy.engine import make_url

    password = "p@ss:w/rd%41 #?"
    env = {"POSTGRES_USER": "ml flow", "POSTGRES_PASSWORD": password, "POSTGRES_HOST": "pg"}
    uri = mlflow_server.postgres_uri(env, "mlflow_auth")
    url = make_url(uri)
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "ml flow",
        password,
        "pg",
        5432,
        "mlflow_auth",
    )
    # MLflow reads the basic-auth file with a default ConfigParser (mlflow/server/auth/config.py),
    # whose interpolation would choke on the '%' of the encoded password unless escaped.
    path = tmp_path / "basic_auth.ini"
    path.write_text(mlflow_server.auth_config_text(uri))
    parser = configparser.ConfigParser()
    parser.read(path)
    assert parser["mlflow"]["database_uri"] == uri
    assert parser["mlflow"]["default_permission"] in {"READ", "EDIT", "MANAGE", "NO_PERMISSIONS"}


def test_mlflow_entrypoint_checks_its_environment(
    mlflow_server: Any, services: dict[str, Any], env_example: dict[str, str]
) -> None:
    env = {
        k: interpolate(str(v), env_example) for k, v in services["mlflow"]["environment"].items()
    }
    assert set(mlflow_server.required_variables(env)) <= set(env), "compose omits a variable"
    with pytest.raises(mlflow_server.ConfigError, match="placeholder"):
        mlflow_server.check_env(env)  # .env.example values are placeholders
    real = {k: ("x" * 16 if v.startswith("CHANGEME") else v) for k, v in env.items()}
    mlflow_server.check_env(real)
    with pytest.raises(mlflow_server.ConfigError, match="12 characters"):
        mlflow_server.check_env({**real, "MLFLOW_AUTH_ADMIN_PASSWORD": "short"})
    with pytest.raises(mlflow_server.ConfigError, match="POSTGRES_USER"):
        mlflow_server.check_env({**real, "POSTGRES_USER": ""})
    argv = mlflow_server.server_argv(real)
    assert argv[:2] == ["mlflow", "server"]
    assert argv[argv.index("--app-name") + 1] == "basic-auth"
    assert argv[argv.index("--artifacts-destination") + 1] == "/mlflow/artifacts"
    assert "/mlflow/artifacts" in {v.split(":")[1] for v in services["mlflow"]["volumes"]}
    assert "--serve-artifacts" in argv
    assert "mlflow:5000" in argv[argv.index("--allowed-hosts") + 1].split(",")
    assert real["POSTGRES_PASSWORD"] not in " ".join(argv)  # passed by environment, not argv
    # With the minio override, artifacts go to S3 and the S3 credentials become required.
    minio_env = load_yaml(MINIO_OVERRIDE)["services"]["mlflow"]["environment"]
    s3 = {**real, **{k: interpolate(str(v), env_example) for k, v in minio_env.items()}}
    assert s3["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow/"
    with pytest.raises(mlflow_server.ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        mlflow_server.check_env(s3)  # S3_SECRET_KEY is a placeholder in .env.example
    mlflow_server.check_env({**s3, "AWS_SECRET_ACCESS_KEY": "y" * 16})
    with pytest.raises(mlflow_server.ConfigError, match="AWS_ACCESS_KEY_ID"):
        mlflow_server.check_env({**s3, "AWS_SECRET_ACCESS_KEY": "y" * 16, "AWS_ACCESS_KEY_ID": ""})


def called_names(func: ast.FunctionDef) -> list[str]:
    """Names of the functions `func` calls, in source order."""
    calls = [n for n in ast.walk(func) if isinstance(n, ast.Call)]
    calls.sort(key=lambda n: (n.lineno, n.col_offset))
    return [ast.unparse(n.func) for n in calls]


def test_mlflow_entrypoint_upgrades_the_schema_before_serving() -> None:
    tree = ast.parse((DEPLOY / "mlflow_server.py").read_text())
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    order = called_names(funcs["main"])
    assert "upgrade_schema" in order and "os.execvpe" in order, order
    assert order.index("upgrade_schema") < order.index("os.execvpe")
    assert order.index("check_env") < order.index("upgrade_schema")
    # upgrade_schema runs MLflow's own `mlflow db upgrade` command.
    upgrade = ast.unparse(funcs["upgrade_schema"])
    assert "from mlflow.db import commands" in upgrade and "'upgrade'" in upgrade
    # The image's entrypoint is this script.
    assert '"/opt/mlflow/mlflow_server.py"' in MLFLOW_DOCKERFILE.read_text().split("ENTRYPOINT")[1]


@pytest.mark.slow
def test_mlflow_schema_upgrade_creates_and_keeps_the_current_schema(
    mlflow_server: Any, tmp_path: Path
) -> None:
    import sqlite3

    import mlflow.store.db_migrations
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory(os.path.dirname(mlflow.store.db_migrations.__file__)).get_heads()
    db = tmp_path / "mlflow.db"
    for _ in range(2):  # an empty database, then one already at the current schema
        mlflow_server.upgrade_schema(f"sqlite:///{db}")
        with sqlite3.connect(db) as conn:
            (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert [revision] == heads
        assert {"experiments", "runs", "metrics"} <= tables


# ----------------------------------------------------------------------------- KubeRay RayJob


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return load_yaml(RAYJOB)


def pod_specs(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        specs[f"worker {group['groupName']}"] = group["template"]["spec"]
    specs["submitter"] = rayjob["spec"]["submitterPodTemplate"]["spec"]
    return specs


def test_rayjob_runs_an_nptm_sweep(rayjob: dict[str, Any]) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    argv = spec["entrypoint"].split()
    assert argv[:2] == ["nptm", "sweep"], argv
    # The grid comes from a ConfigMap mounted on the head (tests/test_deploy.py checks it).
    assert spec["submissionMode"] == "K8sJobMode"
    # No command of its own: KubeRay then gives the submitter `ray job submit ... -- entrypoint`.
    (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
    assert "command" not in submitter and "args" not in submitter
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["rayVersion"] == read_lock(LOCK)["ray"]


def test_rayjob_workers_have_gpus_and_the_head_does_not_train(rayjob: dict[str, Any]) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        assert group["replicas"] >= 1
        for container in group["template"]["spec"]["containers"]:
            for kind in ("requests", "limits"):
                assert int(container["resources"][kind]["nvidia.com/gpu"]) >= 1, group["groupName"]


def test_rayjob_token_and_secrets_come_from_kubernetes_secrets(rayjob: dict[str, Any]) -> None:
    for pod, spec in pod_specs(rayjob).items():
        for container in spec["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", pod
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"], pod
            for name, entry in env.items():
                if SECRET_NAME.search(name) and name != "RAY_AUTH_MODE":
                    assert "value" not in entry, f"{pod}: {name} is a literal"
                    assert "secretKeyRef" in entry["valueFrom"], f"{pod}: {name}"
    assert "authOptions" not in rayjob["spec"]["rayClusterSpec"]  # the token is the Secret's


def test_rayjob_is_pinned_unprivileged_and_mounts_datasets_read_only(
    rayjob: dict[str, Any],
) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for pod, spec in pod_specs(rayjob).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, pod
        for container in spec["containers"]:
            assert pinned_tag(container["image"]) == version, f"{pod}: {container['image']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, pod
            assert not context.get("privileged"), pod
            assert context["capabilities"]["drop"] == ["ALL"], pod
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            if "/data" in mounts:
                assert mounts["/data"]["readOnly"] is True, pod
        volumes = spec.get("volumes", [])
        claims = [v["persistentVolumeClaim"] for v in volumes if "persistentVolumeClaim" in v]
        for claim in claims:
            if claim["claimName"] == "nptm-datasets":
                assert claim["readOnly"] is True, pod
    (head,) = pod_specs(rayjob)["head"]["containers"]
    head_env = {e["name"]: e.get("value") for e in head["env"]}
    assert head_env["NPTM_STORAGE"] == "/storage" and head_env["NPTM_SHARED_FS"] == "1"
    assert head_env["NPTM_DATA"] == "/data"


def test_rayjob_banner_links_to_the_ports_the_doc_forwards(rayjob: dict[str, Any]) -> None:
    doc = (DEPLOY / "kuberay" / "README.md").read_text()
    forwards = re.findall(r"kubectl (?:-n \S+ )?port-forward (\S+) (\d+):(\d+)", doc)
    local = {target: port for target, port, _ in forwards}
    (head,) = pod_specs(rayjob)["head"]["containers"]
    env = {e["name"]: e.get("value") for e in head["env"]}
    dashboard = local['"svc/${CLUSTER}-head-svc"']
    assert env["NPTM_PUBLIC_DASHBOARD_URL"] == f"http://127.0.0.1:{dashboard}"
    assert env["NPTM_PUBLIC_MLFLOW_URL"] == f"http://127.0.0.1:{local['svc/mlflow']}"


# ----------------------------------------------------------------------------- docker compose


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    cmd = docker_compose()
    if cmd is None:
        pytest.skip("docker compose v2 is not installed; the structural checks above still ran")
    return cmd


def render(
    cmd: list[str],
    *files: Path,
    profiles: list[str] | None = None,
    env_file: Path = ENV_EXAMPLE,
    fmt: str = "yaml",
) -> subprocess.CompletedProcess[str]:
    # Compose prefers the shell's variables to the env file's: drop those the files read.
    used = {n for f in COMPOSE_FILES for s in strings(load_yaml(f)) for n, _, _ in variables(s)}
    clean = {k: v for k, v in os.environ.items() if k not in used and not k.startswith("COMPOSE_")}
    return subprocess.run(
        [
            *cmd,
            "--project-directory",
            str(ROOT),
            "--env-file",
            str(env_file),
            *(a for f in files for a in ("-f", str(f))),
            *(a for p in profiles or [] for a in ("--profile", p)),
            "config",
            "--format",
            fmt,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean,
        cwd=ROOT,
    )


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_docker_compose_accepts_every_stack(compose_cmd: list[str], stack: str) -> None:
    files, profiles = STACKS[stack]
    out = render(compose_cmd, *files, profiles=profiles, fmt="json")
    assert out.returncode == 0, out.stderr
    rendered = json.loads(out.stdout)["services"]
    for name, svc in rendered.items():
        for port in svc.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
        for mount in svc.get("volumes", []):
            if mount["target"] == "/data" and name in NPTM_SERVICES:
                assert mount["type"] == "bind" and mount["read_only"] is True, name
        assert not svc.get("privileged"), name
    expected = set(rendered)
    if "worker host" in stack:
        assert expected == {"ray-worker"}
    else:
        assert expected == DEFAULT_SERVICES | (MINIO_SERVICES if profiles else set())
    if "ray-worker" in rendered and rendered["ray-worker"].get("scale", 1) != 0:
        (device,) = rendered["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_docker_compose_cpu_override_drops_the_gpu(compose_cmd: list[str]) -> None:
    cpu = render(compose_cmd, COMPOSE, DEPLOY / "docker-compose.cpu.yml")
    assert cpu.returncode == 0 and "nvidia" not in cpu.stdout, cpu.stderr


def test_docker_compose_minio_override_needs_the_profile(compose_cmd: list[str]) -> None:
    out = render(compose_cmd, COMPOSE, MINIO_OVERRIDE)
    assert out.returncode != 0 and "minio-init" in out.stderr


@pytest.mark.parametrize("variable", ["RAY_AUTH_TOKEN", "NPTM_DATA_DIR", "NPTM_STORAGE_DIR"])
def test_docker_compose_fails_fast_without_a_required_setting(
    compose_cmd: list[str], tmp_path: Path, variable: str
) -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    env_file = tmp_path / "env"
    env_file.write_text("\n".join(ln for ln in lines if not ln.startswith(f"{variable}=")))
    out = render(compose_cmd, COMPOSE, env_file=env_file)
    assert out.returncode != 0 and variable in out.stderr
