"""MLflow tracking of a sweep: a mirror of the Parquet store for browsing and comparing runs.

Single-writer design: only the sweep driver process writes to MLflow, through one
`MlflowRecorder` (workers never talk to MLflow; concurrent writers to an sqlite store are a
known source of "database is locked" errors). Inside the driver the recorder is thread-safe:
one lock serialises every MLflow call, and the client is `MlflowClient` (no global active run).

Layout in MLflow: one experiment per sweep, ``nptm/<sweep>``; one parent run for the sweep
(tag ``nptm.role=sweep``); one child run per stage, found again by its tag ``nptm.trial_id``.
Each child run also carries ``nptm.row_hash``, a fingerprint of the stored rows it mirrors, so
recording the same outcome twice changes nothing and a different outcome of the same stage
replaces the old run (the old one is deleted) instead of adding a duplicate.

MLflow is never on the critical path: if the tracking server is unreachable or errors, the
recorder logs one warning, marks itself degraded and turns every later call into a no-op;
`sync_mlflow` fills MLflow from Parquet afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from results.schema import PRUNE_OUTCOME_COLUMNS, validate_row
from results.store import SweepStore, check_name
from trainables.storage import resolve_storage

log = logging.getLogger(__name__)

EXPERIMENT_PREFIX = "nptm/"
# Conservative HTTP settings for the driver: an unreachable server must cost seconds, not the
# minutes of MLflow's defaults (7 retries, backoff factor 2, 120 s timeout). They are process-wide
# environment variables read by MLflow at each request; values already set by the user win.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
RUN_STATUS = {"ok": "FINISHED", "diverged": "FAILED", "failed": "FAILED", "skipped": "KILLED"}
SUMMARY_METRICS = (
    "test_acc",
    "test_loss",
    "test_acc_at_best_val",
    "best_test_acc_over_epochs",
    "best_val_epoch",
    *PRUNE_OUTCOME_COLUMNS,
    "epochs_run",
    "wall_seconds",
    "device_hours",
)
# epochs column -> metric key (step = epoch)
EPOCH_METRICS = {
    "lr": "lr",
    "train_loss": "train_loss",
    "train_acc": "train_acc",
    "val_loss": "val_loss",
    "val_acc": "val_acc",
    "test_loss": "test_loss",
    "test_acc": "test_acc",
    "wall_s": "epoch_wall_s",
    "samples": "epoch_samples",
}
PARAM_COLUMNS = {
    "stage_kind": "stage_kind",
    "dataset": "dataset",
    "model": "model",
    "pruner": "pruner",
    "structured": "structured",
    "ratio": "ratio",
    "preset": "preset",
    "schedule": "schedule",
    "budget_epochs": "budget",
    "seed": "seed",
    "round": "round",
    "val_fraction": "val_fraction",
    "precision": "precision",
    "lr_override": "lr_override",
    "overrides": "overrides",
    "pruner_options": "pruner_options",
}
_MAX_PARAM_LEN, _MAX_TAG_LEN = 6000, 8000  # mlflow.utils.validation limits
_MAX_METRICS, _MAX_PARAMS_TAGS = 1000, 100  # per log_batch


def experiment_name(sweep: str) -> str:
    return EXPERIMENT_PREFIX + check_name("sweep", sweep)


def default_tracking_uri(storage: str | os.PathLike[str]) -> str:
    """Embedded sqlite store under a local storage root: ``sqlite:///<abs storage>/mlflow.db``."""
    text = os.fspath(storage)
    if "://" in text and not text.startswith("file://"):
        raise ValueError(
            f"storage {text!r} is not local, so it cannot hold an sqlite MLflow store; pass a "
            "tracking server URI (--mlflow-uri / MLFLOW_TRACKING_URI)"
        )
    _, root, _ = resolve_storage(text)
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def resolve_tracking_uri(storage: str | os.PathLike[str], uri: str | None) -> str | None:
    """`uri` if given; else the sqlite default for local storage; else None (MLflow off)."""
    if uri:
        return uri
    try:
        return default_tracking_uri(storage)
    except ValueError:
        return None


def _artifact_location(uri: str) -> str | None:
    # Keep artifacts next to an sqlite store instead of in the current directory.
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_absolute():
            db = Path("/" + str(db)) if uri.startswith("sqlite:////") else db.resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


@dataclass
class _RunRef:
    run_id: str
    row_hash: str | None
    status: str


@dataclass(frozen=True)
class SyncResult:
    created: int
    updated: int
    unchanged: int


class MlflowRecorder:
    """Records a sweep and its stages in MLflow; see the module docstring for the design."""

    def __init__(
        self,
        uri: str | None,
        sweep: str,
        *,
        log_models: bool = False,
        artifact_location: str | None = None,
    ) -> None:
        """`uri=None` gives a recorder that records nothing (MLflow switched off)."""
        self.uri = uri
        self.sweep = check_name("sweep", sweep)
        self.experiment_name = experiment_name(sweep)
        self.log_models = log_models
        self._artifact_location = artifact_location or (uri and _artifact_location(uri))
        self._lock = threading.Lock()
        self._degraded = uri is None
        self._client: Any = None
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None
        self._runs: dict[str, _RunRef] | None = None
        self._model_warned = False
        if uri and urlparse(uri).scheme in ("http", "https"):
            for key, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)

    @property
    def degraded(self) -> bool:
        """True once MLflow failed (or was never configured): calls are no-ops from then on."""
        return self._degraded

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def parent_run_id(self) -> str | None:
        return self._parent_run_id

    # -- public, never raising on MLflow errors ----------------------------------------------

    def start_sweep(self, params: Mapping[str, Any] | None = None) -> str | None:
        """Create (or reopen, after a crash) the sweep's parent run; returns its id."""
        return self._guarded("start_sweep", lambda: self._start_sweep(params or {}))

    def record_stage(
        self,
        trial_row: Mapping[str, Any],
        epoch_rows: Iterable[Mapping[str, Any]] = (),
        model_path: str | os.PathLike[str] | None = None,
    ) -> str | None:
        """Mirror one stage as a child run; returns the run id (None when degraded).

        Rows are validated first: a row that does not fit the schema raises SchemaError, as it
        would in the store.
        """
        if self._degraded:
            return None
        row, epochs = self._normalise(trial_row, epoch_rows)
        result = self._guarded("record_stage", lambda: self._upsert(row, epochs, model_path))
        return result[0] if result else None

    def end_sweep(self, status: str = "FINISHED") -> None:
        """Close the parent run. `status`: FINISHED, FAILED, KILLED (or ok/failed/...)."""
        status = RUN_STATUS.get(status, status).upper()
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"end_sweep status must be FINISHED, FAILED or KILLED, got {status!r}")
        self._guarded("end_sweep", lambda: self._end_sweep(status))

    # -- internals ---------------------------------------------------------------------------

    def _guarded(self, what: str, fn: Any) -> Any:
        if self._degraded:
            return None
        with self._lock:
            if self._degraded:
                return None
            try:
                return fn()
            except Exception as err:
                self._degrade(what, err)
                return None

    def _degrade(self, what: str, err: BaseException) -> None:
        self._degraded = True
        message = str(err).splitlines()[0][:500] if str(err) else repr(err)
        log.warning(
            "MLflow at %s failed in %s (%s: %s); continuing without MLflow, every result is "
            "in Parquet (fill MLflow later with `nptm sync-mlflow`)",
            self.uri,
            what,
            type(err).__name__,
            message,
        )

    def _get_client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _ensure_experiment(self) -> str:
        if self._experiment_id is not None:
            return self._experiment_id
        from mlflow.exceptions import MlflowException

        client = self._get_client()
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            try:
                eid = client.create_experiment(
                    self.experiment_name,
                    artifact_location=self._artifact_location,
                    tags={"nptm.sweep": self.sweep},
                )
            except MlflowException as err:  # created meanwhile by another process
                exp = client.get_experiment_by_name(self.experiment_name)
                if exp is None:
                    raise err from None
                eid = exp.experiment_id
        else:
            eid = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(eid)
        self._experiment_id = eid
        self._load_runs()
        return eid

    def _load_runs(self) -> None:
        """Index the experiment's runs by trial id, deleting duplicates left by older crashes."""
        client = self._get_client()
        runs: dict[str, _RunRef] = {}
        parent: str | None = None
        token = None
        while True:
            page = client.search_runs(
                [self._experiment_id],
                max_results=1000,
                order_by=["attributes.start_time DESC"],
                page_token=token,
            )
            for run in page:
                tags = run.data.tags
                run_id = run.info.run_id
                if tags.get("nptm.role") == "sweep":
                    parent = parent or run_id
                    continue
                trial_id = tags.get("nptm.trial_id")
                if trial_id is None:
                    continue
                if trial_id in runs:  # newest first: this one is an older duplicate
                    client.delete_run(run_id)
                    continue
                runs[trial_id] = _RunRef(run_id, tags.get("nptm.row_hash"), run.info.status)
            token = page.token
            if not token:
                break
        self._runs = runs
        self._parent_run_id = self._parent_run_id or parent

    def _ensure_parent(self, *, reopen: bool) -> str:
        eid = self._ensure_experiment()
        client = self._get_client()
        if self._parent_run_id is None:
            run = client.create_run(
                eid,
                tags={"nptm.role": "sweep", "nptm.sweep": self.sweep},
                run_name=self.sweep,
            )
            self._parent_run_id = run.info.run_id
        elif reopen:
            client.update_run(self._parent_run_id, status="RUNNING")
        return self._parent_run_id

    def _start_sweep(self, params: Mapping[str, Any]) -> str:
        run_id = self._ensure_parent(reopen=True)
        client = self._get_client()
        existing = client.get_run(run_id).data.params
        flat = {k: v for k, v in _flatten(params).items() if k not in existing}
        from mlflow.entities import Param

        items = [Param(k[:250], _clip(v, _MAX_PARAM_LEN)) for k, v in sorted(flat.items())]
        for i in range(0, len(items), _MAX_PARAMS_TAGS):
            client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_TAGS], synchronous=True)
        return run_id

    def _end_sweep(self, status: str) -> None:
        if self._parent_run_id is not None:
            self._get_client().set_terminated(self._parent_run_id, status=status)

    def _normalise(
        self, trial_row: Mapping[str, Any], epoch_rows: Iterable[Mapping[str, Any]]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        row = validate_row("trials", {"sweep": self.sweep, **trial_row})
        keys = {k: row[k] for k in ("sweep", "trial_id", "stage_kind")}
        epochs = [validate_row("epochs", {**keys, **e}) for e in epoch_rows]
        epochs.sort(key=lambda e: e["epoch"])
        return row, epochs

    def _upsert(
        self,
        row: dict[str, Any],
        epochs: list[dict[str, Any]],
        model_path: str | os.PathLike[str] | None = None,
    ) -> tuple[str, str]:
        """Create, replace or keep the stage's child run: (run_id, created|updated|unchanged)."""
        parent = self._ensure_parent(reopen=False)
        assert self._runs is not None
        client = self._get_client()
        trial_id = row["trial_id"]
        digest = row_hash(row, epochs)
        status = RUN_STATUS[row["status"]]
        ref = self._runs.get(trial_id)
        if ref is not None and ref.row_hash == digest and ref.status == status:
            return ref.run_id, "unchanged"
        action = "created"
        if ref is not None:
            client.delete_run(ref.run_id)  # a different outcome replaces the old record
            del self._runs[trial_id]
            action = "updated"

        from mlflow.entities import Metric, Param, RunTag

        start_ms = _ms(row["started_at"]) or int(time.time() * 1000)
        run = client.create_run(
            self._experiment_id,
            start_time=start_ms,
            tags={"mlflow.parentRunId": parent, "nptm.trial_id": trial_id},
            run_name=run_name(row),
        )
        run_id = run.info.run_id
        params = [Param(k, _clip(v, _MAX_PARAM_LEN)) for k, v in stage_params(row).items()]
        tags = [RunTag(k, _clip(v, _MAX_TAG_LEN)) for k, v in stage_tags(row).items()]
        points = stage_metrics(row, epochs, start_ms)
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in points]
        # As few log_batch calls as MLflow's per-batch limits allow (usually exactly one).
        first = _MAX_METRICS - len(params) - len(tags)
        client.log_batch(
            run_id, metrics=metrics[:first], params=params, tags=tags, synchronous=True
        )
        for i in range(first, len(metrics), _MAX_METRICS):
            client.log_batch(run_id, metrics=metrics[i : i + _MAX_METRICS], synchronous=True)
        if model_path is not None and self.log_models:
            self._log_model(run_id, os.fspath(model_path))
        # The fingerprint goes last: a run without it (crash mid-way) is replaced next time.
        client.set_tag(run_id, "nptm.row_hash", digest)
        client.set_terminated(run_id, status=status, end_time=_ms(row["ended_at"]))
        self._runs[trial_id] = _RunRef(run_id, digest, status)
        return run_id, action

    def _log_model(self, run_id: str, path: str) -> None:
        client = self._get_client()
        client.set_tag(run_id, "nptm.model_path", _clip(path, _MAX_TAG_LEN))
        if "://" in path or not os.path.exists(path):
            # Remote or missing: the tag points at it; a local-only upload is not worth failing
            # the whole recorder for.
            if not self._model_warned:
                self._model_warned = True
                log.warning("model %s is not a local file; recorded its path only", path)
            return
        if os.path.isdir(path):
            client.log_artifacts(run_id, path, artifact_path="model")
        else:
            client.log_artifact(run_id, path, artifact_path="model")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= _flatten(value, name + ".")
        elif value is not None:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def _clip(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ms(ts: datetime | None) -> int | None:
    return None if ts is None else int(ts.timestamp() * 1000)


def row_hash(row: Mapping[str, Any], epochs: list[Mapping[str, Any]]) -> str:
    """Fingerprint of a stage's normalised rows (mlflow_run_id excluded: it points back)."""
    payload = {
        "trial": {k: v for k, v in row.items() if k != "mlflow_run_id"},
        "epochs": [dict(e) for e in epochs],
    }
    text = json.dumps(payload, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot fingerprint {type(value).__name__}")


def run_name(row: Mapping[str, Any]) -> str:
    target = f"r{row['ratio']:g}" if row["ratio"] is not None else row["preset"]
    budget = f"b{row['budget_epochs']}" if row["budget_epochs"] is not None else None
    parts = [row["model"], row["pruner"], target, row["schedule"], budget, f"s{row['seed']}"]
    return f"{row['stage_kind']}:" + "/".join(str(p) for p in parts if p is not None)


def stage_params(row: Mapping[str, Any]) -> dict[str, str]:
    params = {name: str(row[col]) for col, name in PARAM_COLUMNS.items() if row[col] is not None}
    if row["overrides"]:
        for key, value in json.loads(row["overrides"]).items():
            params[f"override.{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return params


def stage_tags(row: Mapping[str, Any]) -> dict[str, str]:
    tags = {
        "nptm.sweep": row["sweep"],
        "nptm.stage_kind": row["stage_kind"],
        "nptm.status": row["status"],
        "nptm.dataset": row["dataset"],
        "nptm.model": row["model"],
        "nptm.pruner": row["pruner"],
        "nptm.schedule": row["schedule"],
        "nptm.parent_ids": ",".join(row["parent_ids"]),
        "nptm.reused": str(row["reused"]).lower(),
        "nptm.node": row["node"],
        "nptm.executor": row["executor"],
        "nptm.error": row["error"][-4000:] if row["error"] else None,
    }
    if row["status"] == "diverged":
        tags["nptm.diverged"] = "true"
    return {k: v for k, v in tags.items() if v is not None and v != ""}


def stage_metrics(
    row: Mapping[str, Any], epochs: list[Mapping[str, Any]], start_ms: int
) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp ms, step) for the per-epoch series and the summary metrics.

    Summary metrics are logged at the last epoch's step, so where a series and a summary share
    a key (test_acc, test_loss) the summary is the run's latest value and no step is doubled.
    """
    points: dict[tuple[str, int], tuple[float, int]] = {}
    elapsed_s, ts = 0.0, start_ms - 1
    for e in epochs:
        elapsed_s += e["wall_s"] or 0.0
        ts = max(start_ms + int(elapsed_s * 1000), ts + 1)  # strictly increasing
        for col, key in EPOCH_METRICS.items():
            if e[col] is not None:
                points[(key, e["epoch"])] = (float(e[col]), ts)
    last_step = epochs[-1]["epoch"] if epochs else 0
    end_ms = max(_ms(row["ended_at"]) or 0, ts + 1)
    for key in SUMMARY_METRICS:
        if row[key] is not None:
            points[(key, last_step)] = (float(row[key]), end_ms)
    return [(k, v, t, step) for (k, step), (v, t) in points.items()]


def _epochs_by_trial(table: pa.Table) -> Callable[[str], list[dict[str, Any]]]:
    """Per-trial epoch rows, materialised one trial at a time (a sweep may hold millions)."""
    if table.num_rows == 0:
        return lambda trial_id: []
    table = table.sort_by([("trial_id", "ascending"), ("epoch", "ascending")])
    encoded = pc.dictionary_encode(table["trial_id"]).combine_chunks()
    codes = encoded.indices.to_numpy()
    starts = np.concatenate([[0], np.flatnonzero(np.diff(codes)) + 1])
    ends = np.append(starts[1:], len(codes))
    names = encoded.dictionary.to_pylist()
    spans = {names[codes[a]]: (int(a), int(b - a)) for a, b in zip(starts, ends, strict=True)}

    def epochs_of(trial_id: str) -> list[dict[str, Any]]:
        span = spans.get(trial_id)
        return [] if span is None else table.slice(*span).to_pylist()

    return epochs_of


def sync_mlflow(store: SweepStore, uri: str) -> SyncResult:
    """Fill MLflow from the store's Parquet tables; running it twice creates nothing new.

    Unlike the recorder, errors propagate: a sync was asked for explicitly. Run it when no
    sweep driver is writing the same experiment (single writer).
    """
    recorder = MlflowRecorder(uri, store.sweep)
    epochs_of = _epochs_by_trial(store.read_table("epochs"))
    counts = {"created": 0, "updated": 0, "unchanged": 0}
    with recorder._lock:
        recorder._ensure_experiment()
        had_parent = recorder._parent_run_id is not None
        parent = recorder._ensure_parent(reopen=False)
        if not had_parent:  # the sweep ran with MLflow down from the start
            recorder._get_client().set_terminated(parent, status="FINISHED")
        for trial in store.read_table("trials").to_pylist():
            row, epochs = recorder._normalise(trial, epochs_of(trial["trial_id"]))
            _, action = recorder._upsert(row, epochs)
            counts[action] += 1
    return SyncResult(**counts)
