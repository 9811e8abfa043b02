"""Which MLflow tracking store a sweep uses: the one named, else an embedded sqlite store in a
local storage root, else none (MLflow off)."""

from __future__ import annotations

import os
from pathlib import Path

from nptm.trainables.layout import Layout

# Conservative HTTP settings for the driver: an unreachable server must cost seconds, not the
# minutes of MLflow's defaults (7 retries, backoff factor 2, 120 s timeout). They are process-wide
# environment variables read by MLflow at each request; values already set by the user win.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def default_tracking_uri(storage: str | os.PathLike[str]) -> str:
    """Embedded sqlite store under a local storage root: ``sqlite:///<abs storage>/mlflow.db``."""
    layout = Layout(storage)
    if layout.mlflow_db is None:
        raise ValueError(
            f"storage {layout.storage!r} is not local, so it cannot hold an sqlite MLflow store; "
            "pass a tracking server URI (--mlflow-uri / MLFLOW_TRACKING_URI)"
        )
    os.makedirs(layout.root, exist_ok=True)
    return f"sqlite:///{layout.mlflow_db}"


def resolve_tracking_uri(storage: str | os.PathLike[str], uri: str | None) -> str | None:
    """`uri` if given; else the sqlite default for local storage; else None (MLflow off)."""
    if uri:
        return uri
    try:
        return default_tracking_uri(storage)
    except ValueError:
        return None


def artifact_location(uri: str) -> str | None:
    """Where an experiment of an sqlite store keeps artifacts: next to the database, not in
    the current directory; None (MLflow's choice) for any other store."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_absolute():
            db = Path("/" + str(db)) if uri.startswith("sqlite:////") else db.resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None
