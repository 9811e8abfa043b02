"""Secrets never leave the environment (issue #29): nptm's one redaction of URIs
(nptm.trainables.redact), its refusal of a storage URI that carries credentials, Ray Tune's
copy of the driver's AWS credentials into runtime environments (which Ray logs in clear)
switched off, and a local Ray that listens on the loopback only.

The slow test gives a canary secret every way a user can (environment variables, user-info
and a secret query parameter on --storage, user-info on --mlflow-uri), runs one small sweep
in a fresh process that starts its own local Ray, and then looks for every canary, as given
or encoded, in every file of the storage bucket, of that Ray's temp dir and of the MLflow
store, and in everything printed.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import secrets
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest

from nptm.orchestrator.cluster import LOOPBACK_SWITCH, keep_credentials_out_of_runtime_env
from nptm.trainables.redact import (
    redact_text,
    redact_uri,
    storage_credentials_error,
    uri_credentials,
)
from nptm.trainables.storage import StorageError, resolve_storage
from tests.lane import LaneJob, lane
from tests.ports import free_port
from tests.s3_server import S3Server
from tests.sweep_helpers import NPTM, ROOT, cli_in_process, restored_environ, write_grid

MOTO = "endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1"

REDACTED = [
    # Object stores: the user-info is a key and its secret, masked as a whole.
    ("s3://KEY:SECRET@bucket/runs", "s3://***@bucket/runs"),
    (f"s3://AKIA1:s3cr3t@bucket/runs?{MOTO}", f"s3://***@bucket/runs?{MOTO}"),
    ("s3://AKIA1@bucket/runs", "s3://***@bucket/runs"),
    ("s3://AKIA1:ab/cd+ef@bucket/runs", "s3://***@bucket/runs"),  # an unencoded '/' in it
    ("gs://token@bucket/runs", "gs://***@bucket/runs"),
    # Web URIs: a user with a password keeps the user; a user name alone may be a token.
    ("http://alice:PW@host", "http://alice:***@host"),
    ("http://alice:PW@127.0.0.1:5000/", "http://alice:***@127.0.0.1:5000/"),
    (
        "https://alice:p%40ss@mlflow.lab/#/experiments/1",
        "https://alice:***@mlflow.lab/#/experiments/1",
    ),
    ("https://ghp_abc123@mlflow.lab/api", "https://***@mlflow.lab/api"),
    # Databases: the user is shown, the password masked; a user name alone is no secret.
    ("postgresql://mlflow:PW@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("mysql+pymysql://u:p@db/ml?charset=utf8", "mysql+pymysql://u:***@db/ml?charset=utf8"),
    # Secret query parameters, whatever their case, next to options that stay.
    (
        f"s3://bucket/runs?{MOTO}&access_key=A&secret_key=S&session_token=T",
        f"s3://bucket/runs?{MOTO}&access_key=***&secret_key=***&session_token=***",
    ),
    ("s3://b/r?Secret=x&SECRET_ACCESS_KEY=y", "s3://b/r?Secret=***&SECRET_ACCESS_KEY=***"),
    (
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F1"
        "&X-Amz-Security-Token=T&X-Amz-Signature=abc&X-Amz-Expires=60",
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
        "&X-Amz-Security-Token=***&X-Amz-Signature=***&X-Amz-Expires=60",
    ),
    (
        "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sp=r&sig=ab%2Bc%3D",
        "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sp=r&sig=***",
    ),
    ("http://h/x?token=a;password=b&page=2", "http://h/x?token=***;password=***&page=2"),
    ("http://u:p@h/x?sig=1#frag", "http://u:***@h/x?sig=***#frag"),
]
UNCHANGED = [
    "runs",
    "/abs/runs",
    "./nptm-runs",
    "sqlite:////abs/mlflow.db",
    "file:///tmp/runs",
    "http://127.0.0.1:5000",
    f"s3://bucket/runs?{MOTO}",
    "s3://bucket/runs@v2",  # an '@' in the path, not user-info
    "gs://bucket/a:b",
    "hdfs://namenode:8020/runs?replication=2",
    "hdfs://alice@namenode:8020/runs",  # a user name alone is no secret there
    "",
    None,
]


@pytest.mark.parametrize(("uri", "shown"), REDACTED)
def test_redact_uri(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown
    assert redact_uri(shown) == shown  # redacting twice changes nothing
    assert uri_credentials(uri) != []


@pytest.mark.parametrize("uri", UNCHANGED)
def test_redact_uri_leaves_uris_without_credentials(uri: str | None) -> None:
    assert redact_uri(uri) == uri
    assert uri_credentials(uri) == []
    assert storage_credentials_error(uri) is None


def test_uri_credentials_names_each_without_its_value() -> None:
    found = uri_credentials("s3://K:S@b/r?region=x&secret_key=S2&X-Amz-Security-Token=T")
    assert found == [
        "user-info before '@'",
        "query parameter 'secret_key'",
        "query parameter 'X-Amz-Security-Token'",
    ]
    assert uri_credentials("hdfs://alice@nn/runs") == []  # a user name, no secret
    assert uri_credentials("http://alice@host") == ["user-info before '@'"]  # maybe a token


def test_redact_text() -> None:
    text = (
        "API request to http://alice:PW@127.0.0.1:5000/api/2.0/mlflow/runs/create failed "
        "(storage s3://K:S@b/p?token=T), and 'sqlite:////x/mlflow.db'."
    )
    assert redact_text(text) == (
        "API request to http://alice:***@127.0.0.1:5000/api/2.0/mlflow/runs/create failed "
        "(storage s3://***@b/p?token=***), and 'sqlite:////x/mlflow.db'."
    )
    assert redact_text("no uri here: key=value") == "no uri here: key=value"


@pytest.mark.parametrize(
    "storage",
    ["s3://AK:CNRYSECRETX@bkt/runs", f"s3://bkt/runs?{MOTO}&secret_key=CNRYSECRETX"],
)
def test_storage_with_credentials_is_refused(storage: str, tmp_path: Path) -> None:
    """By the storage layer (any reader or writer) and by every command, with exit 2: the
    message shows the URI redacted and says where credentials go instead."""
    with pytest.raises(StorageError) as err:
        resolve_storage(storage)
    assert "CNRYSECRETX" not in str(err.value) and "***" in str(err.value)
    assert "AWS_SECRET_ACCESS_KEY" in str(err.value)
    grid = write_grid(tmp_path / "g.yaml", name="refused")
    for argv in (
        ["sweep", str(grid), "--storage", storage],
        ["status", "refused", "--storage", storage],
        ["report", "refused", "--storage", storage],
    ):
        result = cli_in_process(argv)
        assert result.returncode == 2, result
        assert "carries credentials" in result.stderr, result.stderr
        assert "CNRYSECRETX" not in result.stdout + result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["g.yaml"]  # nothing written


def test_ray_tune_forwards_no_credentials() -> None:
    """Ray Tune copies the driver's AWS_* variables into every trial actor's runtime_env,
    which each node's runtime_env_agent.log writes out; nptm switches that off."""
    from ray.train.v2._internal import constants as train_constants
    from ray.tune.execution import class_cache

    keep_credentials_out_of_runtime_env()
    forwarded = class_cache.ENV_VARS_TO_PROPAGATE | train_constants.ENV_VARS_TO_PROPAGATE
    assert not {n for n in forwarded if n.startswith("AWS_") or "TOKEN" in n or "SECRET" in n}
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" in forwarded  # the settings still go


def test_mlflow_failure_warning_is_redacted(caplog: pytest.LogCaptureFixture) -> None:
    """MLflow's own errors name the request's URL, user-info included."""
    from nptm.results.tracking import MlflowRecorder

    uri = f"http://alice:CNRYMLPW@127.0.0.1:{free_port()}"  # nothing listens there
    with restored_environ(), caplog.at_level(logging.WARNING):
        recorder = MlflowRecorder(uri, "redacted")
        assert recorder.start_sweep() is None and recorder.degraded
    assert "alice:***@127.0.0.1" in caplog.text
    assert "CNRYMLPW" not in caplog.text


# -- end to end ------------------------------------------------------------------------------


def _encodings(secret: str) -> set[bytes]:
    """`secret` as bytes, percent-encoded, and in base64 at each alignment (the part of the
    encoding that the secret alone decides), plain and URL-safe."""
    raw = secret.encode()
    forms = {raw, quote(secret, safe="").encode()}
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            enc = encode(b"\0" * shift + raw)
            forms.add(enc[4 if shift else 0 : -4])
    return forms


def _leaks(canaries: dict[str, str], files: dict[str, bytes]) -> dict[str, list[str]]:
    """{file: [what leaked there]} for every canary found, in any of its encodings."""
    found: dict[str, list[str]] = {}
    for name, data in files.items():
        for what, secret in canaries.items():
            if any(form in data for form in _encodings(secret)):
                found.setdefault(name, []).append(what)
    return found


def _tree(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` (symlinks, sockets and unreadable files skipped)."""
    files = {}
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        with contextlib.suppress(OSError):
            files[str(path)] = path.read_bytes()
    return files


def _bucket(server: S3Server, bucket: str) -> dict[str, bytes]:
    import pyarrow.fs as pafs

    fs, root, _ = resolve_storage(server.uri(bucket))
    return {
        f"s3://{info.path}": fs.open_input_stream(info.path).read()
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if info.type == pafs.FileType.File
    }


def _is_loopback(ip: str) -> bool:
    return ip.removeprefix("::ffff:").startswith("127.") or ip == "::1"


class _ListenWatch(threading.Thread):
    """Every (address, port, process name) that the process `pid` or any of its descendants
    (the local Ray it starts: GCS, raylet, agents, workers) listens on while it runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="listen-watch", daemon=True)
        self.pid = pid
        self.seen: set[tuple[str, int, str]] = set()
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
                for conn in psutil.net_connections("inet"):
                    if conn.status == psutil.CONN_LISTEN and conn.pid in procs:
                        with contextlib.suppress(psutil.Error):
                            name = procs[conn.pid].name()
                            self.seen.add((conn.laddr.ip, conn.laddr.port, name))
            except psutil.Error:
                pass
            self.done.wait(0.5)


CANARIES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "RAY_AUTH_TOKEN",
    "--storage user-info",
    "--storage ?secret_key=",
    "--mlflow-uri user-info",
)


def _canary_sweep(job: LaneJob) -> SimpleNamespace:
    """A sweep in a fresh process that starts its own local Ray, as a user runs it, with a
    canary in every secret it is given; then every file it and its services wrote, and
    every socket its Ray listened on."""
    canaries = {what: f"cnry{i}{secrets.token_hex(12)}" for i, what in enumerate(CANARIES)}
    # Short: <dir>/ray/session_<date>_<pid>/sockets/plasma_store must fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="nptm-s-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    grid = write_grid(
        job.tmp / "secrets.yaml", name="secrets", pruners=("{name: magnitude, ratio: 0.5}",),
        schedules="[ft]", budget="1", pretrain_epochs=1, milestones="[]",
    )  # fmt: skip
    mlflow_server = job.fixtures["mlflow_server"]
    mlflow_uri = mlflow_server.wait().replace(
        "http://", f"http://alice:{canaries['--mlflow-uri user-info']}@"
    )
    try:
        with S3Server(job.tmp / "moto.log") as s3:
            bucket = s3.bucket("nptm-secrets")
            storage = s3.uri(f"{bucket}/runs")
            # Not the test session's loopback switch: nptm must set up its Ray alone.
            env = {k: v for k, v in job.env.items() if k not in ("RAY_ADDRESS", LOOPBACK_SWITCH)}
            env.update(S3Server.env)
            env.update(
                AWS_SECRET_ACCESS_KEY=canaries["AWS_SECRET_ACCESS_KEY"],
                AWS_SESSION_TOKEN=canaries["AWS_SESSION_TOKEN"],
                MLFLOW_TRACKING_USERNAME="bob",
                MLFLOW_TRACKING_PASSWORD=canaries["MLFLOW_TRACKING_PASSWORD"],
                RAY_AUTH_MODE="token",
                RAY_AUTH_TOKEN=canaries["RAY_AUTH_TOKEN"],
                RAY_TMPDIR=str(ray_tmp),
                PYTHONPATH=str(ROOT),
            )
            argv = ["sweep", str(grid), "--storage", storage, "--mlflow-uri", mlflow_uri,
                    "--no-report"]  # fmt: skip
            proc = subprocess.Popen(
                [*NPTM, *argv], env=env, cwd=job.tmp, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            watch = _ListenWatch(proc.pid)
            watch.start()
            try:
                stdout, stderr = proc.communicate(timeout=540)
            finally:
                watch.done.set()
                watch.join()
                if proc.poll() is None:
                    proc.kill()
            files = {"<sweep: stdout>": stdout.encode(), "<sweep: stderr>": stderr.encode()}
            files |= _bucket(s3, bucket)
            files |= _tree(ray_tmp)
            files |= _tree(Path(mlflow_server.db).parent)  # store, artifacts, server log
        (session,) = [p for p in (ray_tmp / "ray").glob("session_2*") if p.is_dir()]
        (port_file,) = session.glob("metrics_export_port_*")
        return SimpleNamespace(
            canaries=canaries, grid=grid, storage=storage, mlflow_uri=mlflow_uri,
            returncode=proc.returncode, stdout=stdout, stderr=stderr, files=files,
            seen=watch.seen, metrics_port=int(port_file.read_text()),
            targets=(session / "prom_metrics_service_discovery.json").read_text(),
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@lane(_canary_sweep, needs=("mlflow_server",))
def test_no_secret_leaves_the_environment(lane_result) -> None:
    run = lane_result
    canaries = run.canaries
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ok 3" in run.stdout, run.stdout
    assert "MLflow: http://alice:***@127.0.0.1" in run.stdout, run.stdout
    assert "note: --mlflow-uri http://alice:***@127.0.0.1" in run.stderr, run.stderr
    # Credentials in the storage URI: refused (exit 2) before anything runs.
    files = dict(run.files)
    with_userinfo = run.storage.replace(
        "s3://", f"s3://nptm-test:{canaries['--storage user-info']}@"
    )
    with_query = f"{run.storage}&secret_key={canaries['--storage ?secret_key=']}"
    for i, refused in enumerate((with_userinfo, with_query)):
        argv = ["sweep", str(run.grid), "--storage", refused, "--mlflow-uri", run.mlflow_uri]
        result = cli_in_process(argv, env=S3Server.env)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "carries credentials" in result.stderr
        files[f"<refused {i}: printed>"] = (result.stdout + result.stderr).encode()
    assert any("/_ray/" in name for name in files), "no Tune state under the storage"
    assert any("runtime_env_agent.log" in name for name in files), "no Ray logs"
    assert _leaks(canaries, files) == {}

    # Everything nptm's local Ray served, it served on the loopback: the metrics export
    # (0.0.0.0 by Ray's default) among them.
    assert run.seen, "saw no listening socket of the sweep's Ray"
    exposed = sorted(s for s in run.seen if not _is_loopback(s[0]))
    assert exposed == [], exposed
    assert run.metrics_port in {port for _, port, _ in run.seen}
    assert f"127.0.0.1:{run.metrics_port}" in run.targets, run.targets
