"""Start the MLflow tracking server of the nptm cluster (entrypoint of the `mlflow` service).

Run metadata goes to PostgreSQL, artifacts are proxied by the server to
MLFLOW_ARTIFACTS_DESTINATION (a volume by default, ``s3://mlflow/`` on MinIO with the `minio`
profile; clients never need storage credentials for MLflow), and every request needs HTTP basic
auth (MLflow's ``basic-auth`` app). Steps:

1. refuse missing or placeholder secrets, naming the variable;
2. create the basic-auth user database beside the tracking database if it does not exist;
3. run ``mlflow db upgrade`` on the tracking database: it creates the schema of an empty
   database and migrates one written by an older MLflow, which ``mlflow server`` would refuse;
4. write the basic-auth config file (it holds a database password: mode 0600, private dir);
5. exec ``mlflow server --app-name basic-auth``; the admin user is created on first start from
   MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD (the basic-auth app migrates its own
   database when it starts).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Mapping
from urllib.parse import quote

PLACEHOLDER_PREFIX = "CHANGEME"
SECRETS = (
    "POSTGRES_PASSWORD",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "AWS_SECRET_ACCESS_KEY",
)
REQUIRED = (
    "POSTGRES_USER",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "POSTGRES_PASSWORD",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)
REQUIRED_FOR_S3 = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # artifacts on s3://
DEFAULT_ALLOWED_HOSTS = "mlflow:5000,localhost:*,127.0.0.1:*"
DEFAULT_ARTIFACTS = "/mlflow/artifacts"


class ConfigError(ValueError):
    """A variable of the service's environment is missing or unusable."""


def required_variables(env: Mapping[str, str]) -> tuple[str, ...]:
    destination = env.get("MLFLOW_ARTIFACTS_DESTINATION", DEFAULT_ARTIFACTS)
    return REQUIRED + (REQUIRED_FOR_S3 if destination.startswith("s3://") else ())


def check_env(env: Mapping[str, str]) -> None:
    for name in required_variables(env):
        value = env.get(name, "")
        if not value:
            raise ConfigError(f"{name} is empty; set it in .env (see .env.example)")
        if name in SECRETS and value.startswith(PLACEHOLDER_PREFIX):
            raise ConfigError(f"{name} is still the .env.example placeholder {value!r}")
    if len(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) < 12:
        raise ConfigError("MLFLOW_AUTH_ADMIN_PASSWORD must have at least 12 characters")


def postgres_uri(env: Mapping[str, str], database: str) -> str:
    """SQLAlchemy URI of `database`; user and password are percent-encoded, so anything goes."""
    user = quote(env["POSTGRES_USER"], safe="")
    password = quote(env["POSTGRES_PASSWORD"], safe="")
    host = env.get("POSTGRES_HOST", "postgres")
    port = env.get("POSTGRES_PORT", "5432")
    return f"postgresql+psycopg2://{user}:{password}@{host}:{port}/{database}"


def auth_config_text(database_uri: str, default_permission: str = "READ") -> str:
    """The basic-auth ini. MLflow reads it with configparser's interpolation: '%' must be '%%'."""
    escaped = database_uri.replace("%", "%%")
    return (
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {escaped}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )


def server_argv(env: Mapping[str, str]) -> list[str]:
    return [
        "mlflow",
        "server",
        "--app-name",
        "basic-auth",
        "--host",
        "0.0.0.0",  # inside the container; docker-compose.yml publishes it on 127.0.0.1
        "--port",
        "5000",
        "--workers",
        env.get("MLFLOW_WORKERS", "2"),
        "--serve-artifacts",
        "--artifacts-destination",
        env.get("MLFLOW_ARTIFACTS_DESTINATION", DEFAULT_ARTIFACTS),
        "--allowed-hosts",
        env.get("MLFLOW_SERVER_ALLOWED_HOSTS") or DEFAULT_ALLOWED_HOSTS,
    ]


def ensure_database(env: Mapping[str, str], name: str, attempts: int = 30) -> None:
    """Create database `name` unless it exists (the postgres image creates only POSTGRES_DB)."""
    import psycopg2
    from psycopg2 import sql

    params = {
        "host": env.get("POSTGRES_HOST", "postgres"),
        "port": int(env.get("POSTGRES_PORT", "5432")),
        "user": env["POSTGRES_USER"],
        "password": env["POSTGRES_PASSWORD"],
        "dbname": env.get("POSTGRES_DB", "mlflow"),
    }
    for attempt in range(attempts):
        try:
            conn = psycopg2.connect(**params)
            break
        except psycopg2.OperationalError as err:
            if attempt == attempts - 1:
                raise ConfigError(f"cannot reach PostgreSQL at {params['host']}: {err}") from err
            time.sleep(2)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()


def upgrade_schema(database_uri: str) -> None:
    """`mlflow db upgrade DATABASE_URI`, run in this process so that the URI (and the password
    in it) never shows in a process list."""
    from mlflow.db import commands

    commands.main(["upgrade", database_uri], prog_name="mlflow db", standalone_mode=False)


def main() -> int:
    env = dict(os.environ)
    try:
        check_env(env)
        auth_db = env.get("MLFLOW_AUTH_DB", "mlflow_auth")
        ensure_database(env, auth_db)
    except ConfigError as err:
        print(f"mlflow_server: {err}", file=sys.stderr)
        return 64
    backend_uri = postgres_uri(env, env.get("POSTGRES_DB", "mlflow"))
    upgrade_schema(backend_uri)
    conf_dir = tempfile.mkdtemp(prefix="mlflow-auth-")  # mode 0700
    conf_path = os.path.join(conf_dir, "basic_auth.ini")
    fd = os.open(conf_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(auth_config_text(postgres_uri(env, auth_db)))
    env["MLFLOW_AUTH_CONFIG_PATH"] = conf_path
    # Through the environment, not argv, so the password does not show in `ps`.
    env["MLFLOW_BACKEND_STORE_URI"] = backend_uri
    argv = server_argv(env)
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
