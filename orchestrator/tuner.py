"""The Tune run of a sweep: its trials, one per stage the DAG searcher hands out, on the
connected Ray, with the driver's monitor and failure watch as callbacks."""

from __future__ import annotations

import logging
import os
from typing import Any

from ray.tune.progress_reporter import TrialProgressCallback

from nptm.orchestrator.cluster import Cluster, stage_bundles
from nptm.orchestrator.dag_search import DagSearcher
from nptm.orchestrator.failure_guard import FailureGuard, FailureWatch
from nptm.orchestrator.monitor import SweepMonitor
from nptm.orchestrator.trial import (
    StageRuntime,
    SweepShared,
    ray_name,
    stage_id_of,
    stage_trial,
    trial_class,
)
from nptm.orchestrator.trial_scheduler import NewestPendingFirst
from nptm.results.sink import Trip
from nptm.search_spaces.schema import ResourcesSection
from nptm.trainables.artifacts import ArtifactStore
from nptm.trainables.stage import StageSpec


def run_trials(
    name: str,
    searcher: DagSearcher,
    monitor: SweepMonitor,
    runtime: StageRuntime,
    resources: ResourcesSection,
    cluster: Cluster,
    artifacts: ArtifactStore,
    max_retries: int,
) -> Trip | None:
    """Run every stage `searcher` hands out as a Tune trial of the experiment `sweep-<name>`;
    returns the failure guard's trip when one error kept failing stages (else None)."""
    from ray import tune

    # Tune keeps only ONE trial pending when a custom searcher drives it, which runs the
    # stages one at a time however many CPUs are free; let it queue as many as can run.
    os.environ.setdefault(
        "TUNE_MAX_PENDING_TRIALS_PG", str(_parallel_slots(cluster, resources) + 2)
    )
    # Tune snapshots its experiment state (every trial, the searcher, the callbacks) every
    # 10 s or more, for `Tuner.restore`. nptm resumes from its artifact store instead (a rerun
    # of the same command skips every stored stage), so the snapshot is written only when Tune
    # must (at the end, and on Ctrl-C): a snapshot grows with the trials, and rewriting it
    # every few seconds made the driver's cost per stage grow with the sweep.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "inf")
    guard = FailureGuard()
    watch = FailureWatch(guard, artifacts.read_error, searcher.in_flight, searcher.stop)
    _quiet_tune_errors()  # each stage's error is stored with it, and summed up at the end
    # The plan and the runtime settings reach each trial actor once, through the object store:
    # a trial's config is its stage id only, and Tune keeps every config for the whole sweep.
    shared = SweepShared.put(searcher.stages, runtime)
    # Every kind asks for the same trial actor (see cluster.stage_bundles), so Tune reuses one
    # actor for stages of any kind.
    trial_bundle, _ = stage_bundles("retrain", resources)
    trial_resources = tune.PlacementGroupFactory([{k: v for k, v in trial_bundle.items() if v}])
    names = _TrialNames(searcher.stages)
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
            max_concurrent_trials=_max_concurrent(cluster, resources),
            trial_name_creator=names,
            trial_dirname_creator=names,
        ),
        run_config=tune.RunConfig(
            name=f"sweep-{name}",
            storage_path=runtime.ray_storage,
            verbose=0,
            callbacks=[monitor, watch, _NoTrialPrints()],
            failure_config=tune.FailureConfig(max_failures=max_retries),
        ),
    )
    tuner.fit()
    return guard.trip


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


def _parallel_slots(cluster: Cluster, resources: ResourcesSection) -> int:
    """How many retrain stages the cluster can run at once."""
    trial, workers = stage_bundles("retrain", resources)
    need = {r: trial.get(r, 0.0) + sum(w.get(r, 0.0) for w in workers) for r in ("CPU", "GPU")}
    slots = 0
    for node in cluster.nodes:
        fits = [node.get(r, 0.0) / amount for r, amount in need.items() if amount > 0]
        slots += int(min(fits, default=0) + 1e-9)
    return max(slots, 1)


def _max_concurrent(cluster: Cluster, resources: ResourcesSection) -> int | None:
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
