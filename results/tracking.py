"""MLflow tracking of a sweep: a mirror of the Parquet store for browsing and comparing runs.

Single-writer design: only the sweep driver process writes to MLflow, through one
`MlflowRecorder` (workers never talk to MLflow; concurrent writers to an sqlite store are a
known source of "database is locked" errors). Inside the driver the recorder is thread-safe:
one lock serialises every MLflow call, and the client is `MlflowClient` (no global active run;
`mlflow.pytorch.log_model` alone goes through the process-wide tracking URI, set meanwhile).

Layout in MLflow: one experiment per sweep, ``nptm/<sweep>``, and every run at its top level:
one run per stage (tags ``nptm.role=stage``, ``nptm.sweep``, found again by ``nptm.stage_id``;
see nptm.results.mlflow_rows for what a run holds) and one run of the sweep itself (tag
``nptm.role=sweep``, named ``sweep/<sweep>``: the run record, the report, the headline
metrics). The sweep's run is not the stages' parent: MLflow's runs table folds child runs
under their parent, so a filter on the stages (``params.stage_kind = 'retrain'``) showed one
row, the parent, and the chart view compared the parent's bars instead of the stages' curves.
At the top level each stage is a row, filtered by its tags and metrics (``tags.nptm.role =
'stage' and metrics.ratio > 0.5``). Stage runs an earlier version nested under the sweep's run
are lifted to the top level when a recorder first reads the experiment.

Live: a stage's run is opened RUNNING when the stage starts (`start_stage`), its epochs are
logged as they arrive (`log_epoch`), and `record_stage` ends it with the stored outcome.
Each stage run also carries ``nptm.row_hash``, a fingerprint of the stored rows it mirrors, so
recording the same outcome twice changes nothing, and a different outcome of the same stage
updates its run in place: params it lacks, tags (a user's own tags and notes are kept), the
metric points it lacks (MLflow cannot delete points: a changed value is a newer point at the
same step, which MLflow then reports as the latest), and its status. Runs a killed driver
left RUNNING are ended as KILLED when the next driver of the sweep starts (`start_sweep`).

With `log_models`, a retrained stage's final network is also an MLflow logged model
(`mlflow.pytorch.log_model`): the output of its stage's run at the last epoch's step (so the
summary metrics there are the model's), tagged ``nptm.stage_id``, named after the stage; the
run's tag ``nptm.model_id`` names it, and a new outcome's network replaces it. It is the
nn.Module nptm evaluated, rebuilt from nptm's own file (nptm.results.sink.final_model) and
pickled (MLflow's ``serialization_format="pickle"``; its default, pt2, traces the network
through torch.export, seconds per model in the driver, into a graph that cannot be put in eval
mode): `mlflow.pytorch.load_model` returns it wherever nptm is importable.

MLflow is never on the critical path: if the tracking server is unreachable or errors, the
recorder logs one warning, marks itself degraded and turns every later call into a no-op;
`sync_mlflow` fills MLflow from Parquet afterwards, through the same `upsert_stage`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nptm.results import mlflow_uri
from nptm.results.mlflow_rows import (
    EXPERIMENT_TAGS,
    MAX_PARAM_LEN,
    MAX_TAG_LEN,
    MODEL_ID_TAG,
    OUTCOME_TAGS,
    ROLE_TAG,
    RUN_STATUS,
    RUNNING_STATUS_TAG,
    STAGE_ID_TAG,
    STAGE_ROLE,
    SWEEP_ROLE,
    axis_points,
    clip,
    epoch_points,
    experiment_name,
    flatten_params,
    ms,
    row_hash,
    run_name,
    stage_id_of,
    stage_metrics,
    stage_params,
    stage_tags,
    sweep_run_name,
)
from nptm.results.store import SweepStore
from nptm.trainables.layout import EPOCHS_TABLE, STAGES_TABLE, check_sweep_name
from nptm.trainables.redact import redact_text, redact_uri

log = logging.getLogger(__name__)

_MAX_METRICS, _MAX_PARAMS_TAGS = 1000, 100  # per log_batch
_PARENT_TAG = "mlflow.parentRunId"  # what nested a stage's run under the sweep's, before


@dataclass
class _RunRef:
    run_id: str
    row_hash: str | None
    status: str
    model_id: str | None = None


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
        self.sweep = check_sweep_name(sweep)
        self.experiment_name = experiment_name(sweep)
        self.log_models = log_models
        self._artifact_location = artifact_location or (uri and mlflow_uri.artifact_location(uri))
        self._lock = threading.Lock()
        self._degraded = uri is None
        self._client: Any = None
        self._experiment_id: str | None = None
        self._sweep_run_id: str | None = None
        self._runs: dict[str, _RunRef] | None = None
        self._open: set[str] = set()  # stages whose run this recorder opened and not ended
        # (key, step, value) of every metric point on a run, for the runs this recorder
        # created; other runs' points are read from the server when first needed.
        self._points: dict[str, set[tuple[str, int, float]]] = {}
        self._model_warned = False
        if uri and urlparse(uri).scheme in ("http", "https"):
            for key, value in mlflow_uri.HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
            # MLflow prints a "View run ... at" line for every run it ends on a server: one
            # per stage; the start-up banner gives the experiment's link once.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    @property
    def degraded(self) -> bool:
        """True once MLflow failed (or was never configured): calls are no-ops from then on."""
        return self._degraded

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def sweep_run_id(self) -> str | None:
        return self._sweep_run_id

    # -- public, never raising on MLflow errors ----------------------------------------------

    def start_sweep(self, params: Mapping[str, Any] | None = None) -> str | None:
        """Create (or reopen, after a crash) the sweep's own run; returns its id."""
        return self._guarded("start_sweep", lambda: self._start_sweep(params or {}))

    def record_stage(
        self,
        stage_row: Mapping[str, Any],
        epoch_rows: Iterable[Mapping[str, Any]] = (),
        model: Callable[[], Any] | None = None,
    ) -> str | None:
        """Mirror one stage as a run; returns the run id (None when degraded).

        The rows are as the store wrote them (`SweepStore.write_stage`): validated there.
        `model` builds the stage's final network (an nn.Module), logged with `log_models` only.
        """
        epochs = sorted(epoch_rows, key=lambda e: e["epoch"])
        result = self._guarded("record_stage", lambda: self._upsert(stage_row, epochs, model))
        return result[0] if result else None

    def start_stage(self, stage_row: Mapping[str, Any]) -> str | None:
        """Open the stage's run as RUNNING, with the params and tags of its row (as the store
        normalises it; its outcome columns empty): a new run, or the one an earlier attempt
        left. Returns the run id (None when degraded)."""
        return self._guarded("start_stage", lambda: self._start_stage(stage_row))

    def log_epoch(self, stage_id: str, epoch: Mapping[str, Any]) -> None:
        """Log one epoch's metrics (the `epochs` table's columns, `epoch` the step) on the
        stage's open run, as they arrive."""
        self._guarded("log_epoch", lambda: self._log_epoch(stage_id, epoch))

    def end_open_stages(self, status: str) -> int:
        """End every stage run opened here and not recorded since (an interrupted sweep:
        KILLED; a driver error: FAILED); returns how many."""
        status = _run_status(status)
        return self._guarded("end_open_stages", lambda: self._end_open(status)) or 0

    def end_sweep(
        self, status: str = "FINISHED", metrics: Mapping[str, float] | None = None
    ) -> None:
        """Close the sweep's run, with its summary `metrics`. `status`: FINISHED,
        FAILED, KILLED (or ok/failed/...)."""
        status = _run_status(status)
        self._guarded("end_sweep", lambda: self._end_sweep(status, metrics or {}))

    def log_sweep_metrics(self, metrics: Mapping[str, float]) -> None:
        """Summary metrics on the sweep's run (e.g. the report's headline)."""
        self._guarded("log_sweep_metrics", lambda: self._log_sweep_metrics(metrics))

    def log_sweep_artifacts(self, local_dir: str | os.PathLike[str], artifact_path: str) -> None:
        """The files under `local_dir` as artifacts of the sweep's run, under `artifact_path`."""
        self._guarded(
            "log_sweep_artifacts",
            lambda: self._get_client().log_artifacts(
                self._ensure_sweep_run(reopen=False), os.fspath(local_dir), artifact_path
            ),
        )

    def set_sweep_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags of the sweep's run (values that may change between runs of the sweep)."""
        from mlflow.entities import RunTag

        def set_tags() -> None:
            items = [RunTag(k, clip(v, MAX_TAG_LEN)) for k, v in tags.items() if v is not None]
            self._get_client().log_batch(
                self._ensure_sweep_run(reopen=False), tags=items, synchronous=True
            )

        self._guarded("set_sweep_tags", set_tags)

    # -- public, raising on MLflow errors (sync-mlflow) ---------------------------------------

    def adopt_sweep(self) -> None:
        """Find or create the sweep's experiment and its run. A sweep run created here (the
        sweep ran with MLflow down from the start) is closed as FINISHED at once."""
        with self._lock:
            self._ensure_experiment()
            had_run = self._sweep_run_id is not None
            run_id = self._ensure_sweep_run(reopen=False)
            if not had_run:
                self._get_client().set_terminated(run_id, status="FINISHED")

    def upsert_stage(
        self, stage_row: Mapping[str, Any], epoch_rows: Iterable[Mapping[str, Any]] = ()
    ) -> tuple[str, str]:
        """Create, replace or keep the stage's run: (run_id, created|updated|unchanged)."""
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
        # MLflow's errors name the request's URL: user-info and all.
        message = redact_text(str(err).splitlines()[0][:500] if str(err) else repr(err))
        log.warning(
            "MLflow at %s failed in %s (%s: %s); continuing without MLflow, every result is "
            "in Parquet (fill MLflow later with `nptm sync-mlflow`)",
            redact_uri(self.uri),
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
                    tags={"nptm.sweep": self.sweep, **EXPERIMENT_TAGS},
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
            for key, value in EXPERIMENT_TAGS.items():  # an experiment of an earlier version
                if key not in exp.tags:
                    client.set_experiment_tag(eid, key, value)
        self._experiment_id = eid
        self._load_runs()
        return eid

    def _load_runs(self) -> None:
        """Index the experiment's runs by stage id, deleting duplicates left by older crashes
        and lifting stage runs an earlier version nested under the sweep's run."""
        client = self._get_client()
        runs: dict[str, _RunRef] = {}
        sweep_run: str | None = None
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
                if tags.get(ROLE_TAG) == SWEEP_ROLE:
                    sweep_run = sweep_run or run_id
                    continue
                stage_id = stage_id_of(tags)
                if stage_id is None:
                    continue
                if stage_id in runs:  # newest first: this one is an older duplicate
                    client.delete_run(run_id)
                    continue
                if _PARENT_TAG in tags:
                    client.delete_tag(run_id, _PARENT_TAG)
                    client.set_tag(run_id, ROLE_TAG, STAGE_ROLE)
                runs[stage_id] = _RunRef(
                    run_id, tags.get("nptm.row_hash"), run.info.status, tags.get(MODEL_ID_TAG)
                )
            token = page.token
            if not token:
                break
        self._runs = runs
        self._sweep_run_id = self._sweep_run_id or sweep_run

    def _ensure_sweep_run(self, *, reopen: bool) -> str:
        eid = self._ensure_experiment()
        client = self._get_client()
        if self._sweep_run_id is None:
            run = client.create_run(
                eid,
                tags={ROLE_TAG: SWEEP_ROLE, "nptm.sweep": self.sweep},
                run_name=sweep_run_name(self.sweep),
            )
            self._sweep_run_id = run.info.run_id
        elif reopen:
            client.update_run(self._sweep_run_id, status="RUNNING")
        return self._sweep_run_id

    def _create_stage_run(self, row: Mapping[str, Any], start_ms: int | None = None) -> str:
        run = self._get_client().create_run(
            self._ensure_experiment(),
            start_time=start_ms,
            tags={STAGE_ID_TAG: row["stage_id"], ROLE_TAG: STAGE_ROLE},
            run_name=run_name(row),
        )
        return run.info.run_id

    def _start_sweep(self, params: Mapping[str, Any]) -> str:
        self._end_leftovers()
        run_id = self._ensure_sweep_run(reopen=True)
        client = self._get_client()
        existing = client.get_run(run_id).data.params
        flat = {k: v for k, v in flatten_params(params).items() if k not in existing}
        from mlflow.entities import Param

        items = [Param(k[:250], clip(v, MAX_PARAM_LEN)) for k, v in sorted(flat.items())]
        for i in range(0, len(items), _MAX_PARAMS_TAGS):
            client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_TAGS], synchronous=True)
        return run_id

    def _end_leftovers(self) -> None:
        """Runs left RUNNING by a driver that died (SIGKILL, a lost machine): KILLED."""
        self._ensure_experiment()
        assert self._runs is not None
        client = self._get_client()
        left = [sid for sid, ref in self._runs.items() if ref.status == "RUNNING"]
        for sid in left:
            client.set_terminated(self._runs[sid].run_id, status="KILLED")
            self._runs[sid].status = "KILLED"
        sweep_run = self._sweep_run_id
        if sweep_run is not None and client.get_run(sweep_run).info.status == "RUNNING":
            client.set_terminated(sweep_run, status="KILLED")
            left.append(sweep_run)
        if left:
            log.warning(
                "MLflow: ended %d run(s) an earlier driver of sweep %s left RUNNING as KILLED",
                len(left),
                self.sweep,
            )

    def _end_sweep(self, status: str, metrics: Mapping[str, float]) -> None:
        if self._sweep_run_id is not None:
            self._log_sweep_metrics(metrics)
            self._get_client().set_terminated(self._sweep_run_id, status=status)

    def _log_sweep_metrics(self, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        if not metrics:
            return
        run_id, now = self._ensure_sweep_run(reopen=False), int(time.time() * 1000)
        items = [Metric(k[:250], float(v), now, 0) for k, v in sorted(metrics.items())]
        for i in range(0, len(items), _MAX_METRICS):
            self._get_client().log_batch(
                run_id, metrics=items[i : i + _MAX_METRICS], synchronous=True
            )

    def _start_stage(self, row: Mapping[str, Any]) -> str:
        from mlflow.entities import Metric, Param, RunTag

        self._ensure_experiment()
        assert self._runs is not None
        client = self._get_client()
        stage_id = row["stage_id"]
        ref = self._runs.get(stage_id)
        if ref is None:
            run_id, have = self._create_stage_run(row), {}
            self._points[run_id] = set()
        else:  # an earlier attempt's run: its points are known, so none is logged twice
            run_id = ref.run_id
            client.update_run(run_id, status="RUNNING")
            data = client.get_run(run_id).data
            have = data.params
            self._points[run_id] = self._known_points(run_id, set(data.metrics))
        params = [
            Param(k, clip(v, MAX_PARAM_LEN)) for k, v in stage_params(row).items() if k not in have
        ]
        tags = stage_tags(row) | {"nptm.status": RUNNING_STATUS_TAG}
        items = [RunTag(k, clip(v, MAX_TAG_LEN)) for k, v in tags.items()]
        # The numeric axes now, so that a filter on them finds the stage while it runs.
        known, now = self._points[run_id], int(time.time() * 1000)
        points = [(k, step, v) for k, v, step in axis_points(row) if (k, step, v) not in known]
        metrics = [Metric(key, value, now, step) for key, step, value in points]
        client.log_batch(run_id, metrics=metrics, params=params, tags=items, synchronous=True)
        known.update(points)
        self._runs[stage_id] = _RunRef(run_id, None, "RUNNING", ref.model_id if ref else None)
        self._open.add(stage_id)
        return run_id

    def _log_epoch(self, stage_id: str, epoch: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        ref = (self._runs or {}).get(stage_id)
        if ref is None or stage_id not in self._open:
            return
        now = int(time.time() * 1000)
        known = self._points.setdefault(ref.run_id, set())
        points = [(k, step, v) for k, v, step in epoch_points(epoch) if (k, step, v) not in known]
        metrics = [Metric(key, value, now, step) for key, step, value in points]
        if metrics:
            self._get_client().log_batch(ref.run_id, metrics=metrics, synchronous=True)
        known.update(points)

    def _end_open(self, status: str) -> int:
        client, ended = self._get_client(), 0
        for stage_id in sorted(self._open):
            ref = (self._runs or {}).get(stage_id)
            if ref is not None:
                client.set_terminated(ref.run_id, status=status)
                ref.status = status
                ended += 1
        self._open.clear()
        return ended

    def _known_points(self, run_id: str, keys: set[str]) -> set[tuple[str, int, float]]:
        known = self._points.get(run_id)
        if known is None:
            client = self._get_client()
            known = {
                (m.key, m.step, m.value)
                for key in sorted(keys)
                for m in client.get_metric_history(run_id, key)
            }
        return known

    def _upsert(
        self,
        row: Mapping[str, Any],
        epochs: list[Mapping[str, Any]],
        model: Callable[[], Any] | None = None,
    ) -> tuple[str, str]:
        from mlflow.entities import Metric, Param, RunTag

        self._ensure_experiment()
        assert self._runs is not None
        client = self._get_client()
        stage_id = row["stage_id"]
        digest = row_hash(row, epochs)
        status = RUN_STATUS[row["status"]]
        ref = self._runs.get(stage_id)
        self._open.discard(stage_id)
        model = model if self.log_models else None
        same = ref is not None and ref.row_hash == digest and ref.status == status
        if same and (model is None or ref.model_id is not None):
            return ref.run_id, "unchanged"
        start_ms = ms(row["started_at"]) or int(time.time() * 1000)
        points = stage_metrics(row, epochs, start_ms)
        if ref is None:
            action, have_params, have_tags = "created", {}, {}
            run_id = self._create_stage_run(row, start_ms)
            known: set[tuple[str, int, float]] = set()
        else:  # updated in place: what a user added to the run stays
            action, run_id = "updated", ref.run_id
            data = client.get_run(run_id).data
            have_params, have_tags = data.params, data.tags
            known = self._known_points(run_id, {key for key, *_ in points})
        # A param keeps its first value (MLflow refuses changes); a stage's params are its
        # spec's, the same every time.
        params = [
            Param(k, clip(v, MAX_PARAM_LEN))
            for k, v in stage_params(row).items()
            if k not in have_params
        ]
        tag_values = stage_tags(row)
        tags = [RunTag(k, clip(v, MAX_TAG_LEN)) for k, v in tag_values.items()]
        for stale in OUTCOME_TAGS:
            if stale in have_tags and stale not in tag_values:
                client.delete_tag(run_id, stale)
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in points if (k, step, v) not in known]
        # As few log_batch calls as MLflow's per-batch limits allow (usually exactly one).
        first = _MAX_METRICS - len(params) - len(tags)
        client.log_batch(
            run_id, metrics=metrics[:first], params=params, tags=tags, synchronous=True
        )
        for i in range(first, len(metrics), _MAX_METRICS):
            client.log_batch(run_id, metrics=metrics[i : i + _MAX_METRICS], synchronous=True)
        model_id = ref.model_id if ref is not None else None
        if model is not None and (model_id is None or not same):  # new weights: a new model
            step = epochs[-1]["epoch"] if epochs else 0
            measured = [Metric(k, v, ts, s) for k, v, ts, s in points if s == step]
            model_id = self._log_model(run_id, row, model, measured)
            if model_id is not None and ref is not None and ref.model_id is not None:
                from mlflow.exceptions import MlflowException

                with contextlib.suppress(MlflowException):  # deleted by hand already
                    client.delete_logged_model(ref.model_id)
        # The fingerprint goes last: a run without it (crash mid-way) is updated next time.
        client.set_tag(run_id, "nptm.row_hash", digest)
        client.set_terminated(run_id, status=status, end_time=ms(row["ended_at"]))
        self._runs[stage_id] = _RunRef(run_id, digest, status, model_id)
        self._points.pop(run_id, None)
        return run_id, action

    def _log_model(
        self, run_id: str, row: Mapping[str, Any], build: Callable[[], Any], measured: list[Any]
    ) -> str | None:
        """The network `build()` gives as an MLflow logged model, the output of the stage's run
        at the step of `measured`, the run's metric points the model owns; returns its id. A
        network nptm cannot rebuild (a damaged file) is warned about once and left out: the
        run is recorded all the same."""
        import mlflow.pytorch
        from mlflow.entities import LoggedModelOutput, Metric

        try:
            network = build()
        except Exception as err:
            if not self._model_warned:
                self._model_warned = True
                log.warning("stage %s: no MLflow model, its network: %s", row["stage_id"], err)
            return None
        client = self._get_client()
        # Created here, in the sweep's experiment: log_model alone would put it in the
        # process's active experiment.
        logged = client.create_logged_model(
            self._experiment_id,
            name=re.sub(r"[/:.%\"']", "_", run_name(row)),  # characters a model name refuses
            source_run_id=run_id,
            params=stage_params(row),
            tags={STAGE_ID_TAG: row["stage_id"], "nptm.sweep": self.sweep},
        )
        # Pickled (see the module docstring); MLflow's warning about pickles would come once
        # per stage.
        with _tracking_uri(self.uri), _quiet("mlflow.pytorch"):
            mlflow.pytorch.log_model(
                network,
                model_id=logged.model_id,
                serialization_format="pickle",
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            )
        # Linked here rather than by log_model's run_id, which gives the model every point the
        # run has at that step: those of an earlier outcome too (MLflow cannot delete points).
        step = measured[0].step if measured else 0
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
        points = [Metric(m.key, m.value, m.timestamp, m.step, model_id=logged.model_id)
                  for m in measured]  # fmt: skip
        client.log_batch(run_id, metrics=points, synchronous=True)
        client.set_tag(run_id, MODEL_ID_TAG, logged.model_id)
        return logged.model_id


@contextlib.contextmanager
def _tracking_uri(uri: str | None) -> Iterator[None]:
    """MLflow's process-wide tracking URI (what log_model writes through) set to `uri`
    meanwhile. MLflow keeps it in MLFLOW_TRACKING_URI, which the user's may be: that value
    comes back after (resetting the URI unsets the variable)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # type: ignore[arg-type]
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """`logger`'s warnings left out meanwhile (its errors still shown)."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def _run_status(status: str) -> str:
    status = RUN_STATUS.get(status, status).upper()
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"a run ends FINISHED, FAILED or KILLED, got {status!r}")
    return status


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
    stages = store.read_table(STAGES_TABLE)
    for i, row in enumerate(stages.to_pylist()):
        run_id, action = recorder.upsert_stage(row, epochs_of(row["stage_id"]))
        counts[action] += 1
        if run_id and row.get("mlflow_run_id") != run_id:  # the row learns its run, as in a sweep
            store.link_mlflow_run(stages.slice(i, 1), run_id)
    return SyncResult(**counts)
