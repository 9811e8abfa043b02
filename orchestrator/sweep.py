"""`nptm sweep`: run a planned grid on Ray and land every stage in Parquet and MLflow."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune.progress_reporter import TrialProgressCallback

from nptm.orchestrator.cluster import (
    Cluster,
    check_fit,
    connect,
    disconnect,
    plugin_packages,
    stage_bundles,
)
from nptm.orchestrator.dag_search import DagSearcher, StageResolution
from nptm.orchestrator.errors import UsageError
from nptm.orchestrator.failure_guard import FailureGuard, FailureWatch
from nptm.orchestrator.lease import Hold, refuse_if_held, take
from nptm.orchestrator.live import (
    LiveTracker,
    StopSignals,
    SweepInterrupted,
    SweepStart,
    new_progress,
)
from nptm.orchestrator.metrics import SweepMetrics
from nptm.orchestrator.preflight import check_data_here, check_data_on_cluster, data_need, data_root
from nptm.orchestrator.progress import ProgressPrinter
from nptm.orchestrator.public_urls import PublicUrls
from nptm.orchestrator.stage_cost import stage_costs
from nptm.orchestrator.trial import SweepShared, ray_name, stage_id_of, stage_trial, trial_class
from nptm.orchestrator.trial_scheduler import NewestPendingFirst
from nptm.trainables.artifacts import (
    ArtifactStore,
    checksum_name,
    node_local_path_warning,
    rewind_name,
)
from nptm.trainables.redact import redact_uri, storage_credentials_error
from nptm.trainables.stage import StageOutcome, StageSpec, StageStatus
from nptm.trainables.storage import DEFAULT_MIN_FREE_GB, StorageError, check_writable

if TYPE_CHECKING:
    from nptm.results.sink import ResultSink, SweepSummary
    from nptm.results.store import SweepStore

log = logging.getLogger(__name__)


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
    grid: Any,
    plan: Any,
    opts: SweepOptions,
    on_start: Callable[[SweepStart], None] | None = None,
) -> SweepSummary:
    """Run every unfinished stage of `plan` (`nptm.orchestrator.planner.build_plan(grid)`) on Ray;
    resume whatever earlier runs left, reuse stages already in `opts.storage`.

    `grid` is the `nptm.search_spaces.CheckedGrid` the plan was built from. Every finished stage
    lands in the Parquet tables of ``<storage>/sweeps/<grid.name>/`` (open them with
    `nptm.results.api.load_sweep`) and in MLflow; the run record (grid, plan, versions, progress)
    under its ``run/``. `on_start` is told where to watch the sweep before its first stage.
    SIGINT / SIGTERM stop the sweep within seconds: the summary's `interrupted` says which
    (rerunning resumes). Returns the `nptm.results.sink.SweepSummary` (`.ok`, `.counts`,
    `.failures`, `.stopped` when one error kept failing stages: nptm.orchestrator.failure_guard).
    Raises `nptm.orchestrator.errors.UsageError` for a storage root, cluster or data root the
    sweep cannot use (the CLI's exit code 2): the data is checked where the stages will run,
    before Ray starts (local) or on every node (cluster), with nothing written
    (nptm.orchestrator.preflight); and, with nothing written, while another driver runs the
    same sweep (one driver per sweep: nptm.orchestrator.lease).
    """
    from nptm.results.mlflow_uri import resolve_tracking_uri
    from nptm.results.run_record import DriverState, RunRecord
    from nptm.results.sink import ResultSink
    from nptm.results.tracking import MlflowRecorder
    from nptm.trainables.layout import Layout

    started = time.time()
    public = PublicUrls.from_env()  # a setting that is no URL: refused before Ray starts
    opts = replace(opts, storage=_absolute(opts.storage))
    refused = storage_credentials_error(opts.storage)  # before Ray starts or anything is written
    if refused:
        raise UsageError(refused)
    need = data_need(grid, plan, opts.data_root)
    if opts.address is None:  # the stages run here: refuse before Ray starts, nothing written
        check_data_here(need)
        store = _open_store(opts, grid.name)
    plugins = list(grid.plugins)
    cluster = connect(opts.address, num_cpus=opts.num_cpus, py_modules=plugin_packages(plugins))
    live: LiveTracker | None = None
    recorder: MlflowRecorder | None = None
    lease: Hold | None = None
    try:
        with StopSignals() as stop:
            if opts.address is not None:  # on the nodes that run stages, before any write
                check_data_on_cluster(need)
                store = _open_store(opts, grid.name)
            _check_cluster(cluster, grid, plan, opts)
            lease = take(opts.storage, grid.name)  # LeaseHeld: another driver runs the sweep
            artifacts = ArtifactStore(opts.storage)
            uri = resolve_tracking_uri(opts.storage, opts.mlflow_uri)
            recorder = MlflowRecorder(uri, grid.name, log_models=opts.log_models)
            recorder.start_sweep(_sweep_params(grid, plan))
            sink = ResultSink(store, recorder, artifacts, grid.resources.executor)
            summary = sink.summary
            summary.dashboard_url = public.dashboard or cluster.dashboard_url
            summary.dashboard_local = cluster.started_here
            summary.mlflow_uri = uri
            summary.mlflow_public = public.mlflow
            summary.grafana_url = public.grafana_dashboard(grid.name)
            summary.planned = len(plan.stages)
            record = RunRecord(Layout(opts.storage), grid.name)
            _write_run_record(record, grid, plan, recorder)
            live = LiveTracker(plan.stages, sink, record, new_progress(grid.name), stop)
            live.write(force=True)
            done = _finished_stages(plan, artifacts)
            if on_start is not None:
                on_start(_start_info(grid, plan, cluster, recorder, record, len(done), public))
            # Rows that read back whole; a damaged or foreign row file is set aside, and its
            # stage recorded again below from its outcome (or run again).
            recorded = set(store.intact_stage_ids())
            sink.record_missing_runs()
            for sid, outcome in done.items():
                if sid not in recorded:
                    sink.record(
                        plan.stages[sid], outcome.status, outcome, outcome.error, reused=True
                    )
            summary.reused = len(done)
            stop.check()
            if len(done) < len(plan.stages):
                _tune(grid, plan, opts, cluster, artifacts, sink, done, live)
            stop.check()  # a signal after the last stage's step
    except SweepInterrupted as interrupt:
        if live is None or recorder is None:
            raise KeyboardInterrupt from interrupt  # before anything started: nothing to end
        sink.closed = True  # trials stopped on the way out are not outcomes
        summary.interrupted = interrupt.signum
        _end(recorder, live, summary, "KILLED", DriverState.INTERRUPTED)
    except BaseException:
        if live is not None and recorder is not None:
            sink.closed = True
            _end(recorder, live, summary, "FAILED", DriverState.FAILED)
        raise
    else:
        _persist(artifacts, store)
        _end(recorder, live, summary, "FINISHED" if summary.ok else "FAILED", DriverState.FINISHED)
    finally:
        disconnect()
        if lease is not None:  # after the trial actors are gone
            lease.release()
    summary.wall_seconds = time.time() - started
    return summary


def _open_store(opts: SweepOptions, sweep: str) -> SweepStore:
    """The sweep's result store, once the storage root proved writable (UsageError if not)."""
    from nptm.results.store import SweepStore

    try:
        check_writable(opts.storage, min_free_gb=opts.min_free_gb)
        refuse_if_held(opts.storage, sweep)  # before a local Ray starts (`take` decides)
        return SweepStore(opts.storage, sweep)
    except (OSError, ValueError, StorageError) as err:
        raise UsageError(str(err)) from err


def _end(recorder: Any, live: LiveTracker, summary: SweepSummary, status: str, state: Any) -> None:
    """Close the sweep's MLflow runs and progress.json: how the driver ended."""
    recorder.end_open_stages(status)
    summary.mlflow_experiment_id = recorder.experiment_id
    summary.mlflow_sweep_run_id = recorder.sweep_run_id
    metrics = {
        "stages_planned": summary.planned,
        "stages_executed": summary.executed,
        "stages_reused": summary.reused,
        "wall_seconds": time.time() - live.progress.started_at,
    }
    recorder.end_sweep(status, metrics)
    summary.mlflow_degraded = recorder.degraded
    live.finish(state)


def _write_run_record(record: Any, grid: Any, plan: Any, recorder: Any) -> None:
    """grid.yaml, plan.json and versions.json under the sweep's run/, also as artifacts
    (``run/``) and tags of the sweep's MLflow run."""
    import json
    import tempfile

    from nptm.orchestrator.planner import stage_epochs
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
        GRID_FILE: _grid_text(grid),
        OVERRIDES_FILE: json.dumps(list(grid.overrides), indent=1),
        PLAN_FILE: json.dumps(plan_record(grid.name, plan.stages, stage_epochs), indent=1),
        VERSIONS_FILE: json.dumps(versions, indent=1, sort_keys=True),
    }
    for name, text in files.items():
        record.write_bytes(name, text.encode())
    tags = {f"nptm.version.{k}": v for k, v in versions.items()}
    recorder.set_sweep_tags({**tags, "nptm.overrides": " ".join(grid.overrides) or None})
    with tempfile.TemporaryDirectory(prefix="nptm-run-") as tmp:
        for name, text in files.items():
            Path(tmp, name).write_text(text)
        recorder.log_sweep_artifacts(tmp, "run")


def _grid_text(grid: Any) -> str:
    """The grid file as given (a grid built in memory: its settings as YAML)."""
    source = getattr(grid, "source", None)
    if source and Path(source).is_file():
        return Path(source).read_text()
    import yaml

    return yaml.safe_dump(grid.grid.model_dump(mode="json"), sort_keys=False)


def _start_info(
    grid: Any,
    plan: Any,
    cluster: Cluster,
    recorder: Any,
    record: Any,
    done: int,
    public: PublicUrls,
) -> SweepStart:
    """What the banner says; the dashboard is checked where this driver reaches it, and
    shown where a browser does (`public`)."""
    from nptm.orchestrator.live import url_answers

    counts: dict[str, int] = {}
    for spec in plan.stages.values():
        counts[spec.kind.value] = counts.get(spec.kind.value, 0) + 1
    url = cluster.dashboard_url
    return SweepStart(
        sweep=grid.name,
        storage=record.layout.sweep_location(grid.name),
        run_record=record.location(),
        planned=counts,
        to_run=len(plan.stages) - done,
        dashboard_url=public.dashboard or url,
        dashboard_local=cluster.started_here,
        dashboard_answers=bool(url) and url_answers(url),
        token_auth=cluster.token_auth,
        token_source=cluster.token_source,
        mlflow_uri=redact_uri(recorder.uri),  # shown: never a password
        experiment_name=recorder.experiment_name,
        experiment_id=recorder.experiment_id,
        mlflow_degraded=recorder.degraded,
        mlflow_public=public.mlflow,
        grafana_url=public.grafana_dashboard(grid.name),
    )


def _check_cluster(cluster: Cluster, grid: Any, plan: Any, opts: SweepOptions) -> None:
    if cluster.multi_node:
        reason = node_local_path_warning(opts.storage)
        if reason:
            raise UsageError(reason)
    check_fit(cluster, grid.resources, {s.kind for s in plan.stages.values()})


def _finished_stages(plan: Any, artifacts: ArtifactStore) -> dict[str, StageOutcome]:
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


def _persist(artifacts: ArtifactStore, store: Any) -> None:
    """The outcome index entries still in memory, and the sweep's table snapshots."""
    artifacts.flush_index()
    store.compact()


def _tune(
    grid: Any,
    plan: Any,
    opts: SweepOptions,
    cluster: Cluster,
    artifacts: ArtifactStore,
    sink: ResultSink,
    done: dict[str, StageOutcome],
    live: LiveTracker,
) -> None:
    from ray import tune

    res = grid.resources
    runtime = {
        "storage": opts.storage,
        "ray_storage": artifacts.layout.ray_dir,
        "data_root": data_root(opts.data_root, grid),  # as the preflight check saw it
        "download": grid.data.download,
        "executor": res.executor,
        "workers_per_trial": res.workers_per_trial,
        "cpus_per_worker": res.cpus_per_worker,
        "gpus_per_worker": res.gpus_per_worker,
        # Imported by every worker before it builds anything (nptm.trainables.plugins).
        "plugins": list(grid.plugins),
    }

    def resolve(spec: StageSpec, result: dict | None, error: bool) -> StageResolution:
        outcome = None if error else artifacts.read_outcome(spec.id)
        if outcome is None:
            detail = artifacts.read_error(spec.id) or "the trial ended without an outcome"
            return StageStatus.FAILED, None, detail
        return outcome.status, outcome, outcome.error

    # Tune keeps only ONE trial pending when a custom searcher drives it, which runs the
    # stages one at a time however many CPUs are free; let it queue as many as can run.
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(_parallel_slots(cluster, res) + 2))
    # Tune snapshots its experiment state (every trial, the searcher, the callbacks) every
    # 10 s or more, for `Tuner.restore`. nptm resumes from its artifact store instead (a rerun
    # of the same command skips every stored stage), so the snapshot is written only when Tune
    # must (at the end, and on Ctrl-C): a snapshot grows with the trials, and rewriting it
    # every few seconds made the driver's cost per stage grow with the sweep.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "inf")
    # The longest remaining path of planned seconds first (nptm.orchestrator.stage_cost).
    cost = stage_costs(plan.stages, res).cost
    searcher = DagSearcher(plan.stages, set(done), resolve, sink.record, outcomes=done, cost=cost)
    progress = ProgressPrinter(searcher, stream=sys.stderr)
    metrics = SweepMetrics(grid.name, searcher, live.progress.running)  # Prometheus, Grafana
    guard = FailureGuard()
    watch = FailureWatch(guard, artifacts.read_error, searcher.in_flight, searcher.stop)
    _quiet_tune_errors()  # each stage's error is stored with it, and summed up at the end
    # The plan and the runtime settings reach each trial actor once, through the object store:
    # a trial's config is its stage id only, and Tune keeps every config for the whole sweep.
    shared = SweepShared.put(plan.stages, runtime)
    # Every kind asks for the same trial actor (see cluster.stage_bundles), so Tune reuses one
    # actor for stages of any kind.
    trial_bundle, _ = stage_bundles("retrain", res)
    trial_resources = tune.PlacementGroupFactory([{k: v for k, v in trial_bundle.items() if v}])
    names = _TrialNames(plan.stages)

    # nptm keeps results in its own store; Tune's per-trial result files are switched off
    # (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS), so its end-of-run metrics scan has nothing to say.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    tuner = tune.Tuner(
        trial_class(
            tune.with_resources(tune.with_parameters(stage_trial, shared=shared), trial_resources)
        ),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=NewestPendingFirst(searcher=searcher),  # nptm.orchestrator.trial_scheduler
            num_samples=-1,
            reuse_actors=True,
            max_concurrent_trials=_max_concurrent(cluster, res),
            trial_name_creator=names,
            trial_dirname_creator=names,
        ),
        run_config=tune.RunConfig(
            name=f"sweep-{grid.name}",
            storage_path=runtime["ray_storage"],
            verbose=0,
            callbacks=[progress, live, metrics, watch, _NoTrialPrints()],
            failure_config=tune.FailureConfig(max_failures=opts.max_retries),
        ),
    )
    tuner.fit()
    progress.final()
    metrics.publish()  # the end state: Ray exports it as the driver disconnects
    sink.summary.stopped = guard.trip


class _NoTrialPrints(TrialProgressCallback):
    """Stands in for the TrialProgressCallback Tune adds when none is given, which prints
    "Trial ... completed. Last result:" whatever the verbosity for a trial stopped before it
    reported (those a stopped sweep does not start). nptm prints its own progress."""

    def on_trial_result(self, *args: Any, **kwargs: Any) -> None:
        pass

    on_trial_error = on_trial_complete = on_trial_result


class _TuneFailureSummary(logging.Filter):
    """Drops Tune's closing "Trials did not complete: [...]": the sweep's summary names every
    failed stage, with its error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Trials did not complete")


def _quiet_tune_errors() -> None:
    """Tune logs every failed attempt with its whole traceback; nptm keeps each in the
    stage's error.txt and reports the failures once, grouped by error (and stops a sweep
    whose stages keep failing alike: nptm.orchestrator.failure_guard)."""
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    tune_log = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _TuneFailureSummary) for f in tune_log.filters):
        tune_log.addFilter(_TuneFailureSummary())


def _parallel_slots(cluster: Cluster, resources: Any) -> int:
    """How many retrain stages the cluster can run at once."""
    trial, workers = stage_bundles("retrain", resources)
    need = {r: trial.get(r, 0.0) + sum(w.get(r, 0.0) for w in workers) for r in ("CPU", "GPU")}
    slots = 0
    for node in cluster.nodes:
        fits = [node.get(r, 0.0) / amount for r, amount in need.items() if amount > 0]
        slots += int(min(fits, default=0) + 1e-9)
    return max(slots, 1)


def _max_concurrent(cluster: Cluster, resources: Any) -> int | None:
    """Tune's cap on the trials it holds at once (pending or running).

    Tune asks Ray for a new trial actor (a placement group, then a worker process) for every
    trial it holds and, with actor reuse, hands the trial an actor that frees up instead,
    killing the one that was starting for it. A trial actor of `executor: train` asks for
    0.1 CPU, so those placement groups are placed at once and each such request can start a
    worker process that nothing uses. On a local Ray, whose resources never change, Tune
    holds no more trials than can run at once: a trial is handed out when one ends, and takes
    over its actor. A cluster may grow (the autoscaler scales on pending placement
    groups), so there only the grid's `resources.max_concurrent` applies.
    """
    if not cluster.started_here:
        return resources.max_concurrent
    slots = _parallel_slots(cluster, resources)
    return min(slots, resources.max_concurrent or slots)


def _absolute(path: str | None) -> str | None:
    """Workers do not share the driver's working directory: relative paths are the driver's."""
    return str(Path(path).expanduser().resolve()) if path and "://" not in path else path


class _TrialNames:
    """Tune's trial name and directory name of a trial: its stage's `ray_name`
    (``retrain_digits_resnet20_magnitude_ratio=0.5_ft_b2_s0-1a2b3c``), what the Ray dashboard
    shows."""

    def __init__(self, stages: dict[str, StageSpec]) -> None:
        self._names = {sid: ray_name(spec) for sid, spec in stages.items()}

    def __call__(self, trial: Any) -> str:
        return self._names[stage_id_of(trial.config)]

    def __deepcopy__(self, memo: dict) -> _TrialNames:
        # Tune deep-copies its experiment spec, which holds this, for every new trial: a copy
        # of every name per trial would make a sweep quadratic. The names never change.
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Pickled only into Tune's experiment state (the Tuner's settings), which nptm never
        # restores: the plan's names stay behind.
        return {"_names": {}}


def _sweep_params(grid: Any, plan: Any) -> dict[str, Any]:
    summary = plan.summary()
    return {
        "sweep": grid.name,
        "trials": summary["trials"],
        "executor": grid.resources.executor,
        "workers_per_trial": grid.resources.workers_per_trial,
        **{f"stages_{k}": v for k, v in summary["stages"].items()},
    }
