"""Static checks of the deployment: docker-compose.yml, .env.example, Dockerfile, deploy/.

No Docker engine is needed. When the `docker compose` CLI is installed, the compose file is also
rendered by Compose itself; the structural checks below always run, on the YAML as parsed by
PyYAML, with Compose's variable interpolation re-implemented for the forms the file uses.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"

NPTM_SERVICES = ("ray-head", "ray-worker")  # containers where the nptm CLI runs
EXPECTED_SERVICES = {"ray-head", "ray-worker", "mlflow", "postgres", "minio", "minio-init"}
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


def cli_env_vars() -> set[str]:
    """Names of the environment variables orchestrator/cli.py reads (os.environ.get("X"))."""
    import ast

    tree = ast.parse((ROOT / "orchestrator" / "cli.py").read_text())
    names = set()
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
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)[0]


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


def test_expected_services_exist(services: dict[str, Any]) -> None:
    assert set(services) >= EXPECTED_SERVICES, EXPECTED_SERVICES - set(services)


def test_published_ports_bind_loopback_unless_opted_in(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    published = 0
    for name, svc in services.items():
        assert svc.get("network_mode") != "host", f"{name} would bypass port binding"
        for spec in svc.get("ports", []):
            published += 1
            host_ip, _ = parse_port(spec, env_example)
            assert host_ip == "127.0.0.1", f"{name}: port {spec!r} binds to {host_ip or 'all'}"
            # The interface is the one opt-in variable, not a literal.
            opted_in, _ = parse_port(spec, {**env_example, "NPTM_BIND": "192.0.2.10"})
            assert opted_in == "192.0.2.10", f"{name}: port {spec!r} ignores NPTM_BIND"
    assert published >= 3  # dashboard, MLflow, MinIO at least
    assert "ports" not in services["postgres"]


def test_worker_has_gpu_reservation_and_scales(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    worker = services["ray-worker"]
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
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    used = [v for s in strings(compose) for v in variables(s)]
    assert used, "the compose file reads no variables?"
    for name, op, arg in used:
        if op in (":?", "?"):
            assert env_example.get(name), f"required ${{{name}}} has no value in .env.example"
            assert arg.strip(), f"${{{name}:?}} needs a message saying what to set"
        elif op not in (":-", "-", ":+", "+"):
            assert name in env_example, f"${{{name}}} has no default and is not in .env.example"
    # Rendering with .env.example alone must succeed, as `docker compose config` would.
    for s in strings(compose):
        interpolate(s, env_example)


def test_documented_defaults_match_compose(compose: dict[str, Any]) -> None:
    _, documented = read_env_file(ENV_EXAMPLE)
    defaults = {n: a for s in strings(compose) for n, op, a in variables(s) if op == ":-"}
    assert documented, ".env.example documents no optional setting"
    for name, value in documented.items():
        assert name in defaults, f".env.example documents {name}, which compose does not read"
        assert value == defaults[name], (
            f"{name}: .env.example says {value!r}, compose {defaults[name]!r}"
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


def test_ray_token_auth_is_always_on(services: dict[str, Any]) -> None:
    for name in NPTM_SERVICES:
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name  # a literal: .env cannot switch it off
        assert next(variables(env["RAY_AUTH_TOKEN"]))[:2] == ("RAY_AUTH_TOKEN", ":?"), name
    disabled = re.compile(r"RAY_AUTH_MODE\s*[:=]\s*[\"']?disabled", re.IGNORECASE)
    files = [COMPOSE, ENV_EXAMPLE, DOCKERFILE, *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]
    for path in files:
        assert not disabled.search(path.read_text()), f"{path.name} disables Ray authentication"


def test_image_built_from_dockerfile_pinned_to_ray_2_60(services: dict[str, Any]) -> None:
    for name in ("ray-head", "ray-worker", "mlflow"):
        build = services[name]["build"]
        assert build["dockerfile"] == "Dockerfile" and build["context"] == ".", name
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert len(froms) == 1, froms
    assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311-cu\d{3}", froms[0]), froms[0]
    constraints = (DEPLOY / "constraints.txt").read_text()
    assert re.search(r"^ray==2\.60\.0$", constraints, re.MULTILINE)
    # Clients must speak the cluster's Ray: the project environment pins the same release.
    assert importlib.metadata.version("ray") == "2.60.0"


def test_nptm_containers_set_exactly_what_the_cli_reads(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.cli import build_parser

    cli_vars = cli_env_vars()
    assert {"NPTM_STORAGE", "MLFLOW_TRACKING_URI", "NPTM_DATA", "RAY_ADDRESS"} <= cli_vars
    for name in NPTM_SERVICES:
        env = services[name]["environment"]
        nptm_like = {k for k in env if k.startswith("NPTM_") or k in cli_vars}
        assert nptm_like == cli_vars, f"{name}: sets {nptm_like ^ cli_vars} wrongly"
        assert env["MLFLOW_TRACKING_USERNAME"] and env["MLFLOW_TRACKING_PASSWORD"]
    # The container values reach the CLI's options (the parser reads the environment).
    env = services["ray-head"]["environment"]
    values = {k: interpolate(str(env[k]), {}) for k in cli_vars}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    args = build_parser().parse_args(["sweep", "grid.yaml"])
    assert args.address == values["RAY_ADDRESS"] == "ray-head:6379"
    assert args.storage == values["NPTM_STORAGE"] == "s3://nptm"
    assert args.mlflow_uri == values["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert args.data_root == values["NPTM_DATA"] == "/shared/data"


def test_start_up_order_follows_healthchecks(services: dict[str, Any]) -> None:
    def deps(name: str) -> dict[str, str]:
        return {d: c["condition"] for d, c in services[name].get("depends_on", {}).items()}

    assert deps("minio-init") == {"minio": "service_healthy"}
    assert deps("mlflow") == {
        "postgres": "service_healthy",
        "minio-init": "service_completed_successfully",
    }
    assert deps("ray-head")["mlflow"] == "service_healthy"
    assert deps("ray-worker") == {"ray-head": "service_healthy"}
    for name in services:
        for dep, condition in deps(name).items():
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s healthcheck"
    # The dependency graph has no cycle (Compose would refuse it): peel off ready services.
    pending = {n: set(deps(n)) for n in services}
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


def test_secrets_stay_out_of_image_and_files() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".git" in ignored
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    long_hex = re.compile(r"\b[0-9a-fA-F]{32,}\b")
    for path in [COMPOSE, DOCKERFILE, *DEPLOY.rglob("*")]:
        if path.is_file():
            assert not long_hex.search(path.read_text()), f"{path.name} holds a key-like string"


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


def test_minio_init_creates_the_buckets_compose_uses(
    tmp_path: Path, services: dict[str, Any]
) -> None:
    out = run_minio_init(tmp_path)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "log").read_text().splitlines()
    (mb,) = [c for c in calls if c.startswith("mb ")]
    buckets = {t.split("/", 1)[1] for t in mb.split() if "/" in t}
    assert "--ignore-existing" in mb.split() and buckets == {"mlflow", "nptm"}
    assert "admin user add nptm nptm s3-secret-123" in calls
    # Every S3 location the services use is one of those buckets, and the S3 user may use them.
    nptm_bucket = interpolate(services["ray-head"]["environment"]["NPTM_STORAGE"], {})
    mlflow_dest = services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"]
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
    assert set(mlflow_server.REQUIRED) <= set(env), "compose omits a variable the server needs"
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
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://mlflow/"
    assert "--serve-artifacts" in argv
    assert "mlflow:5000" in argv[argv.index("--allowed-hosts") + 1].split(",")
    assert real["POSTGRES_PASSWORD"] not in " ".join(argv)  # passed by environment, not argv


# ----------------------------------------------------------------------------- docker compose


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    cmd = docker_compose()
    if cmd is None:
        pytest.skip("docker compose v2 is not installed; the structural checks above still ran")
    return cmd


def render(
    cmd: list[str], *files: Path, env_file: Path = ENV_EXAMPLE, fmt: str = "yaml"
) -> subprocess.CompletedProcess[str]:
    # Compose prefers the shell's variables to the env file's: drop those the file reads.
    used = {n for s in strings(yaml.safe_load(COMPOSE.read_text())) for n, _, _ in variables(s)}
    clean = {k: v for k, v in os.environ.items() if k not in used}
    return subprocess.run(
        [
            *cmd,
            "--project-directory",
            str(ROOT),
            "--env-file",
            str(env_file),
            *(a for f in files for a in ("-f", str(f))),
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


def test_docker_compose_accepts_the_file(compose_cmd: list[str]) -> None:
    out = render(compose_cmd, COMPOSE, fmt="json")
    assert out.returncode == 0, out.stderr
    rendered = json.loads(out.stdout)["services"]
    for name, svc in rendered.items():
        for port in svc.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
    (device,) = rendered["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    cpu = render(compose_cmd, COMPOSE, DEPLOY / "docker-compose.cpu.yml")
    assert cpu.returncode == 0 and "nvidia" not in cpu.stdout, cpu.stderr


def test_docker_compose_fails_fast_without_the_token(
    compose_cmd: list[str], tmp_path: Path
) -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    env_file = tmp_path / "env"
    env_file.write_text("\n".join(ln for ln in lines if not ln.startswith("RAY_AUTH_TOKEN=")))
    out = render(compose_cmd, COMPOSE, env_file=env_file)
    assert out.returncode != 0 and "RAY_AUTH_TOKEN" in out.stderr
