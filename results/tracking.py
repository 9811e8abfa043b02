"""MLflow tracking of a sweep: a mirror of the Parquet store for browsing and comparing runs.

Single-writer design: only the sweep driver process writes to MLflow, through one
`MlflowRecorder` (workers never talk to MLflow; concurrent writers to an sqlite store are a
known source of "database is locked" errors). Inside the driver the recorder is thread-safe:
one lock serialises every MLflow call, and the client is `MlflowClient` (no global active run).

Layout in MLflow: one experiment per sweep, ``nptm/<sweep>``; one parent run for the sweep
(tag ``nptm.role=sweep``); one child run per stage, found again by its tag ``nptm.stage_id``
(see results.mlflow_rows for what a run holds).
Each child run also carries ``nptm.row_hash``, a fingerprint of the stored rows it mirrors, so
recording the same outcome twice changes nothing and a different outcome of the same stage
replaces the old run (the old one is deleted) instead of adding a duplicate.

MLflow is never on the critical path: if the tracking server is unreachable or errors, the
recorder logs one warning, marks itself degraded and turns every later call into a no-op;
`sync_mlflow` fills MLflow from Parquet afterwards, through the same `upsert_stage`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from results import mlflow_uri
from results.mlflow_rows import (
    MAX_PARAM_LEN,
    MAX_TAG_LEN,
    RUN_STATUS,
    STAGE_ID_TAG,
    clip,
    experiment_name,
    flatten_params,
    ms,
    row_hash,
    run_name,
    stage_id_of,
    stage_metrics,
    stage_params,
    stage_tags,
)
from results.store import SweepStore
from trainables.layout import EPOCHS_TABLE, STAGES_TABLE, check_name

log = logging.getLogger(__name__)

_MAX_METRICS, _MAX_PARAMS_TAGS = 1000, 100  # per log_batch


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
        self._artifact_location = artifact_location or (uri and mlflow_uri.artifact_location(uri))
        self._lock = threading.Lock()
        self._degraded = uri is None
        self._client: Any = None
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None
        self._runs: dict[str, _RunRef] | None = None
        self._model_warned = False
        if uri and urlparse(uri).scheme in ("http", "https"):
            for key, value in mlflow_uri.HTTP_ENV_DEFAULTS.items():
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
        stage_row: Mapping[str, Any],
        epoch_rows: Iterable[Mapping[str, Any]] = (),
        model_path: str | os.PathLike[str] | None = None,
    ) -> str | None:
        """Mirror one stage as a child run; returns the run id (None when degraded).

        The rows are as the store wrote them (`SweepStore.write_stage`): validated there.
        """
        epochs = sorted(epoch_rows, key=lambda e: e["epoch"])
        result = self._guarded("record_stage", lambda: self._upsert(stage_row, epochs, model_path))
        return result[0] if result else None

    def end_sweep(self, status: str = "FINISHED") -> None:
        """Close the parent run. `status`: FINISHED, FAILED, KILLED (or ok/failed/...)."""
        status = RUN_STATUS.get(status, status).upper()
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"end_sweep status must be FINISHED, FAILED or KILLED, got {status!r}")
        self._guarded("end_sweep", lambda: self._end_sweep(status))

    # -- public, raising on MLflow errors (sync-mlflow) ---------------------------------------

    def adopt_sweep(self) -> None:
        """Find or create the sweep's experiment and parent run. A parent run created here
        (the sweep ran with MLflow down from the start) is closed as FINISHED at once."""
        with self._lock:
            self._ensure_experiment()
            had_parent = self._parent_run_id is not None
            parent = self._ensure_parent(reopen=False)
            if not had_parent:
                self._get_client().set_terminated(parent, status="FINISHED")

    def upsert_stage(
        self, stage_row: Mapping[str, Any], epoch_rows: Iterable[Mapping[str, Any]] = ()
    ) -> tuple[str, str]:
        """Create, replace or keep the stage's child run: (run_id, created|updated|unchanged)."""
        epochs = sorted(epoch_rows, key=lambda e: e["epoch"])
        with self._lock:
            return self._upsert(stage_row, epochs)

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
        """Index the experiment's runs by stage id, deleting duplicates left by older crashes."""
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
                stage_id = stage_id_of(tags)
                if stage_id is None:
                    continue
                if stage_id in runs:  # newest first: this one is an older duplicate
                    client.delete_run(run_id)
                    continue
                runs[stage_id] = _RunRef(run_id, tags.get("nptm.row_hash"), run.info.status)
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
        flat = {k: v for k, v in flatten_params(params).items() if k not in existing}
        from mlflow.entities import Param

        items = [Param(k[:250], clip(v, MAX_PARAM_LEN)) for k, v in sorted(flat.items())]
        for i in range(0, len(items), _MAX_PARAMS_TAGS):
            client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_TAGS], synchronous=True)
        return run_id

    def _end_sweep(self, status: str) -> None:
        if self._parent_run_id is not None:
            self._get_client().set_terminated(self._parent_run_id, status=status)

    def _upsert(
        self,
        row: Mapping[str, Any],
        epochs: list[Mapping[str, Any]],
        model_path: str | os.PathLike[str] | None = None,
    ) -> tuple[str, str]:
        parent = self._ensure_parent(reopen=False)
        assert self._runs is not None
        client = self._get_client()
        stage_id = row["stage_id"]
        digest = row_hash(row, epochs)
        status = RUN_STATUS[row["status"]]
        ref = self._runs.get(stage_id)
        if ref is not None and ref.row_hash == digest and ref.status == status:
            return ref.run_id, "unchanged"
        action = "created"
        if ref is not None:
            client.delete_run(ref.run_id)  # a different outcome replaces the old record
            del self._runs[stage_id]
            action = "updated"

        from mlflow.entities import Metric, Param, RunTag

        start_ms = ms(row["started_at"]) or int(time.time() * 1000)
        run = client.create_run(
            self._experiment_id,
            start_time=start_ms,
            tags={"mlflow.parentRunId": parent, STAGE_ID_TAG: stage_id},
            run_name=run_name(row),
        )
        run_id = run.info.run_id
        params = [Param(k, clip(v, MAX_PARAM_LEN)) for k, v in stage_params(row).items()]
        tags = [RunTag(k, clip(v, MAX_TAG_LEN)) for k, v in stage_tags(row).items()]
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
        client.set_terminated(run_id, status=status, end_time=ms(row["ended_at"]))
        self._runs[stage_id] = _RunRef(run_id, digest, status)
        return run_id, action

    def _log_model(self, run_id: str, path: str) -> None:
        client = self._get_client()
        client.set_tag(run_id, "nptm.model_path", clip(path, MAX_TAG_LEN))
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


def epochs_by_stage(table: pa.Table) -> Callable[[str], list[dict[str, Any]]]:
    """Per-stage epoch rows, materialised one stage at a time (a sweep may hold millions)."""
    if table.num_rows == 0:
        return lambda stage_id: []
    table = table.sort_by([("stage_id", "ascending"), ("epoch", "ascending")])
    encoded = pc.dictionary_encode(table["stage_id"]).combine_chunks()
    codes = encoded.indices.to_numpy()
    starts = np.concatenate([[0], np.flatnonzero(np.diff(codes)) + 1])
    ends = np.append(starts[1:], len(codes))
    names = encoded.dictionary.to_pylist()
    spans = {names[codes[a]]: (int(a), int(b - a)) for a, b in zip(starts, ends, strict=True)}

    def epochs_of(stage_id: str) -> list[dict[str, Any]]:
        span = spans.get(stage_id)
        return [] if span is None else table.slice(*span).to_pylist()

    return epochs_of


def sync_mlflow(store: SweepStore, uri: str) -> SyncResult:
    """Fill MLflow from the store's Parquet tables; running it twice creates nothing new.

    Unlike the recorder, errors propagate: a sync was asked for explicitly. Run it when no
    sweep driver is writing the same experiment (single writer).
    """
    recorder = MlflowRecorder(uri, store.sweep)
    epochs_of = epochs_by_stage(store.read_table(EPOCHS_TABLE))
    counts = {"created": 0, "updated": 0, "unchanged": 0}
    recorder.adopt_sweep()
    for row in store.read_table(STAGES_TABLE).to_pylist():
        _, action = recorder.upsert_stage(row, epochs_of(row["stage_id"]))
        counts[action] += 1
    return SyncResult(**counts)
