"""`nptm sweep`: run a planned grid on Ray and land every stage in Parquet and MLflow.

A stage's one way through the driver: the DAG searcher hands it out when its parents are done
(nptm.orchestrator.dag_search), Tune runs it as a trial (nptm.orchestrator.tuner, .trial), the
monitor follows it while it runs (nptm.orchestrator.monitor), and it ends as a `StageOutcome`
(ok, diverged, failed or skipped) that the result sink lands (nptm.results.sink).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nptm.orchestrator.banner import SweepStart, sweep_start
from nptm.orchestrator.cluster import Cluster, check_fit, connect, disconnect, plugin_packages
from nptm.orchestrator.dag_search import DagSearcher, Resolver
from nptm.orchestrator.errors import UsageError
from nptm.orchestrator.lease import Hold, refuse_if_held, take
from nptm.orchestrator.metrics import SweepMetrics
from nptm.orchestrator.monitor import SweepMonitor
from nptm.orchestrator.preflight import check_data_here, check_data_on_cluster, data_need, data_root
from nptm.orchestrator.public_urls import PublicUrls
from nptm.orchestrator.signals import StopSignals, SweepInterrupted
from nptm.orchestrator.stage_cost import stage_costs
from nptm.orchestrator.trial import StageRuntime, outcome_of
from nptm.orchestrator.tuner import run_trials
from nptm.trainables.artifacts import (
    ArtifactStore,
    checksum_name,
    node_local_path_warning,
    rewind_name,
)
from nptm.trainables.redact import storage_credentials_error
from nptm.trainables.stage import StageOutcome, StageSpec, StageStatus
from nptm.trainables.storage import DEFAULT_MIN_FREE_GB, StorageError, check_writable

if TYPE_CHECKING:
    from nptm.orchestrator.planner import Plan
    from nptm.results.run_record import DriverState, RunRecord
    from nptm.results.sink import ResultSink, SweepSummary
    from nptm.results.store import SweepStore
    from nptm.results.tracking import MlflowRecorder
    from nptm.search_spaces.checks import CheckedGrid


@dataclass
class SweepOptions:
    """How `run_sweep` runs a plan; each field is the `nptm sweep` option of the same name."""

    storage: str  # storage root: a local path, or a URI such as s3://bucket/prefix
    address: str | None = None  # Ray cluster to join; None starts a local Ray for the sweep
    mlflow_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else a store under `storage`
    data_root: str | None = None  # overrides the grid's data.root
    log_models: bool = False  # each retrained network also as an MLflow logged model
    max_retries: int = 2  # retries of a failed stage
    num_cpus: int | None = None  # local Ray only
    min_free_gb: float = DEFAULT_MIN_FREE_GB  # of a local storage root, checked at start


def run_sweep(
    plan: Plan,
    opts: SweepOptions,
    on_start: Callable[[SweepStart], None] | None = None,
) -> SweepSummary:
    """Run every unfinished stage of `plan` (`nptm.orchestrator.planner.build_plan(grid)`) on Ray;
    resume whatever earlier runs left, reuse stages already in `opts.storage`.

    Every finished stage lands in the Parquet tables of ``<storage>/sweeps/<plan.name>/`` (open
    them with `nptm.results.api.load_sweep`) and in MLflow; the run record (grid, plan,
    versions, progress) under its ``run/``. `on_start` is told where to watch the sweep before
    its first stage. SIGINT / SIGTERM stop the sweep within seconds: the summary's
    `interrupted` says which (rerunning resumes). Returns the `nptm.results.sink.SweepSummary`
    (`.ok`, `.counts`, `.failures`, `.stopped` when one error kept failing stages:
    nptm.orchestrator.failure_guard). Raises `nptm.orchestrator.errors.UsageError` for a
    storage root, cluster or data root the sweep cannot use (the CLI's exit code 2): the data
    is checked where the stages will run, before Ray starts (local) or on every node
    (cluster), with nothing written (nptm.orchestrator.preflight); and, with nothing written,
    while another driver runs the same sweep (one driver per sweep: nptm.orchestrator.lease).
    """
    from nptm.results.mlflow_uri import resolve_tracking_uri
    from nptm.results.run_record import DriverState, RunRecord
    from nptm.results.sink import ResultSink
    from nptm.results.tracking import MlflowRecorder
    from nptm.trainables.layout import Layout

    started = time.time()
    grid = plan.grid
    public = PublicUrls.from_env()  # a setting that is no URL: refused before Ray starts
    opts = replace(opts, storage=_absolute(opts.storage))
    refused = storage_credentials_error(opts.storage)  # before Ray starts or anything is written
    if refused:
        raise UsageError(refused)
    need = data_need(grid, plan, opts.data_root)
    if opts.address is None:  # the stages run here: refuse before Ray starts, nothing written
        check_data_here(need)
        store = _open_store(opts, plan.name)
    modules = plugin_packages(list(grid.plugins))
    cluster = connect(opts.address, num_cpus=opts.num_cpus, py_modules=modules)
    sink: ResultSink | None = None
    monitor: SweepMonitor | None = None
    lease: Hold | None = None
    try:
        with StopSignals() as stop:
            if opts.address is not None:  # on the nodes that run stages, before any write
                check_data_on_cluster(need)
                store = _open_store(opts, plan.name)
            _check_cluster(cluster, plan, opts.storage)
            lease = take(opts.storage, plan.name)  # LeaseHeld: another driver runs the sweep
            artifacts = ArtifactStore(opts.storage)
            uri = resolve_tracking_uri(opts.storage, opts.mlflow_uri)
            recorder = MlflowRecorder(uri, plan.name, log_models=opts.log_models)
            recorder.start_sweep(_sweep_params(plan))
            sink = ResultSink(store, recorder, artifacts, grid.resources.executor)
            summary = sink.summary
            summary.dashboard_url = public.dashboard or cluster.dashboard_url
            summary.dashboard_local = cluster.started_here
            summary.mlflow_uri = uri
            summary.mlflow_public = public.mlflow
            summary.grafana_url = public.grafana_dashboard(plan.name)
            summary.planned = len(plan.stages)
            record = RunRecord(Layout(opts.storage), plan.name)
            _write_run_record(record, plan, recorder)
            done = _finished_stages(plan, artifacts)
            cost = stage_costs(plan.stages, grid.resources).cost  # longest remaining path first
            searcher = DagSearcher(
                plan.stages, set(done), _resolver(artifacts), sink.record, outcomes=done, cost=cost
            )
            metrics = SweepMetrics(plan.name, searcher)  # Prometheus, Grafana
            monitor = SweepMonitor(searcher, sink, record, stop, sys.stderr, metrics)
            monitor.write_progress(force=True)
            if on_start is not None:
                on_start(sweep_start(plan, cluster, recorder, record, len(done), public))
            # Rows that read back whole; a damaged or foreign row file is set aside, and its
            # stage recorded again below from its outcome (or run again).
            recorded = set(store.intact_stage_ids())
            sink.record_missing_runs()
            for sid, outcome in done.items():
                if sid not in recorded:
                    sink.record(plan.stages[sid], outcome, reused=True)
            summary.reused = len(done)
            stop.check()
            if len(done) < len(plan.stages):
                runtime = _runtime(plan, opts, artifacts)
                summary.stopped = run_trials(
                    plan.name, searcher, monitor, runtime, grid.resources, cluster, artifacts,
                    opts.max_retries,
                )  # fmt: skip
            stop.check()  # a signal after the last stage's step
    except SweepInterrupted as interrupt:
        if sink is None:
            raise KeyboardInterrupt from interrupt  # before anything started: nothing to end
        sink.closed = True  # trials stopped on the way out are not outcomes
        summary.interrupted = interrupt.signum
        _end(sink, monitor, "KILLED", DriverState.INTERRUPTED, started)
    except BaseException:
        if sink is not None:
            sink.closed = True
            _end(sink, monitor, "FAILED", DriverState.FAILED, started)
        raise
    else:
        _persist(artifacts, store)
        state = "FINISHED" if summary.ok else "FAILED"
        _end(sink, monitor, state, DriverState.FINISHED, started)
    finally:
        disconnect()
        if lease is not None:  # after the trial actors are gone
            lease.release()
    summary.wall_seconds = time.time() - started
    return summary


def _resolver(artifacts: ArtifactStore) -> Resolver:
    """How the driver learns the way a trial's stage ended: from the outcome in its last
    result; a trial that failed reported none, and left its error in the artifact store."""

    def resolve(spec: StageSpec, result: dict | None) -> StageOutcome:
        outcome = outcome_of(spec, result)
        if outcome is not None:
            return outcome
        error = artifacts.read_error(spec.id) or "the trial ended without an outcome"
        return StageOutcome(spec.id, spec.kind, StageStatus.FAILED, error)

    return resolve


def _runtime(plan: Plan, opts: SweepOptions, artifacts: ArtifactStore) -> StageRuntime:
    res = plan.grid.resources
    return StageRuntime(
        storage=opts.storage,
        ray_storage=artifacts.layout.ray_dir,
        data_root=data_root(opts.data_root, plan.grid),  # as the preflight check saw it
        download=plan.grid.data.download,
        executor=res.executor,
        workers_per_trial=res.workers_per_trial,
        cpus_per_worker=float(res.cpus_per_worker),
        gpus_per_worker=float(res.gpus_per_worker),
        plugins=plan.grid.plugins,
    )


def _open_store(opts: SweepOptions, sweep: str) -> SweepStore:
    """The sweep's result store, once the storage root proved writable (UsageError if not)."""
    from nptm.results.store import SweepStore

    try:
        check_writable(opts.storage, min_free_gb=opts.min_free_gb)
        refuse_if_held(opts.storage, sweep)  # before a local Ray starts (`take` decides)
        return SweepStore(opts.storage, sweep)
    except (OSError, ValueError, StorageError) as err:
        raise UsageError(str(err)) from err


def _end(
    sink: ResultSink,
    monitor: SweepMonitor | None,
    status: str,
    state: DriverState,
    started: float,
) -> None:
    """Close the sweep's MLflow runs and progress.json: how the driver ended."""
    recorder, summary = sink.recorder, sink.summary
    recorder.end_open_stages(status)
    summary.mlflow_experiment_id = recorder.experiment_id
    summary.mlflow_sweep_run_id = recorder.sweep_run_id
    metrics = {
        "stages_planned": summary.planned,
        "stages_executed": summary.executed,
        "stages_reused": summary.reused,
        "wall_seconds": time.time() - started,
    }
    recorder.end_sweep(status, metrics)
    summary.mlflow_degraded = recorder.degraded
    if monitor is not None:
        monitor.finish(state)


def _write_run_record(record: RunRecord, plan: Plan, recorder: MlflowRecorder) -> None:
    """grid.yaml, plan.json and versions.json under the sweep's run/, also as artifacts
    (``run/``) and tags of the sweep's MLflow run."""
    from nptm.results.run_record import (
        GRID_FILE,
        OVERRIDES_FILE,
        PLAN_FILE,
        VERSIONS_FILE,
        plan_record,
    )
    from nptm.results.sink import code_versions

    versions = code_versions()
    files = {
        GRID_FILE: _grid_text(plan.grid),
        OVERRIDES_FILE: json.dumps(list(plan.grid.overrides), indent=1),
        PLAN_FILE: json.dumps(plan_record(plan.name, plan.stages), indent=1),
        VERSIONS_FILE: json.dumps(versions, indent=1, sort_keys=True),
    }
    for name, text in files.items():
        record.write_bytes(name, text.encode())
    tags = {f"nptm.version.{k}": v for k, v in versions.items()}
    recorder.set_sweep_tags({**tags, "nptm.overrides": " ".join(plan.grid.overrides) or None})
    with tempfile.TemporaryDirectory(prefix="nptm-run-") as tmp:
        for name, text in files.items():
            Path(tmp, name).write_text(text)
        recorder.log_sweep_artifacts(tmp, "run")


def _grid_text(grid: CheckedGrid) -> str:
    """The grid file as given (a grid built in memory: its settings as YAML)."""
    source = grid.source
    if source and Path(source).is_file():
        return Path(source).read_text()
    import yaml

    return yaml.safe_dump(grid.grid.model_dump(mode="json"), sort_keys=False)


def _check_cluster(cluster: Cluster, plan: Plan, storage: str) -> None:
    if cluster.multi_node:
        reason = node_local_path_warning(storage)
        if reason:
            raise UsageError(reason)
    check_fit(cluster, plan.grid.resources, {s.kind for s in plan.stages.values()})


def _finished_stages(plan: Plan, artifacts: ArtifactStore) -> dict[str, StageOutcome]:
    """Stages with a finished stored outcome that ran on what their parents hold now (and,
    for pre-training, that keep every checkpoint children need), with that outcome.

    A child stays finished while its parent is re-made (a pre-training asked for a rewind
    checkpoint it did not keep, or whose outcome was lost): the DAG searcher runs it again
    only if the re-made parent holds other bytes than the child read (`read_current`).
    One listing of the artifact store and its outcome index answer for every stage whose
    outcome.json is unchanged since it was indexed; only the others are read
    (nptm.trainables.stage_index says what the index may skip)."""
    outcomes, files = artifacts.stored_outcomes(plan.stages)
    done: dict[str, StageOutcome] = {}
    for sid, spec in plan.stages.items():
        outcome = outcomes.get(sid)
        if outcome is None or not outcome.status.finished:
            continue
        if not all(_ran_on_current(outcome, p, outcomes.get(p)) for p in spec.parents):
            continue
        if not all(files.has(sid, checksum_name(rewind_name(e))) for e in spec.keep_epochs):
            continue
        done[sid] = outcome
    return done


def _ran_on_current(child: StageOutcome, parent_id: str, parent: StageOutcome | None) -> bool:
    if parent is None or not parent.status.finished:
        # The parent runs again: a child that recorded what it read is checked then; one
        # stored before lineage was recorded runs again, as it always did.
        return child.consumed is not None
    return child.read_current(parent_id, parent)


def _persist(artifacts: ArtifactStore, store: SweepStore) -> None:
    """The outcome index entries still in memory, and the sweep's table snapshots."""
    artifacts.flush_index()
    store.compact()


def _absolute(path: str | None) -> str | None:
    """Workers do not share the driver's working directory: relative paths are the driver's."""
    return str(Path(path).expanduser().resolve()) if path and "://" not in path else path


def _sweep_params(plan: Plan) -> dict[str, Any]:
    summary = plan.summary()
    resources = plan.grid.resources
    return {
        "sweep": plan.name,
        "trials": summary["trials"],
        "executor": resources.executor,
        "workers_per_trial": resources.workers_per_trial,
        **{f"stages_{k}": v for k, v in summary["stages"].items()},
    }
