"""The Tune trainable: run one stage inline in the trial actor, or as a Ray Train DDP group.

`inline` runs the train loop inside the (reused) Tune trial actor: start-up costs a fraction
of a second, which matters for stages that train for seconds. `train` starts a `TorchTrainer`
worker group per stage: several seconds of start-up, negligible for a GPU stage that trains for
minutes, and the only way to use several DDP workers; its prune stages, which need no DDP, run
as a Ray task.

This module is what a new trial actor imports before it counts as started, so it imports
neither torch nor the train loop at module level (that costs seconds): Tune, with actor reuse,
hands a pending trial to any actor that frees up and kills the one still starting for it, so
an actor that starts slower than a stage runs never starts at all, and short stages would run
one at a time however many CPUs are free.

A trial's config is its stage id only (`stage_config`, `stage_id_of`): Tune keeps every
trial's config for the whole sweep and copies it into each snapshot of its experiment state.
The plan's stages and the sweep's runtime settings (`SweepShared`) reach a trial actor once,
through Ray's object store (`tune.with_parameters`), and stay cached in that process.

A stage's outcome goes back to the driver with its trial's last result (`OUTCOME`, read by
`outcome_of`); a trial that fails reports nothing, so its error is kept in the artifact store,
where the driver reads it.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nptm.trainables.artifacts import MODEL, ArtifactStore, CorruptArtifactError
from nptm.trainables.stage import StageKind, StageOutcome, StageSpec
from nptm.trainables.stage_index import check_outcome, outcome_json

if TYPE_CHECKING:
    from nptm.trainables.stage_runner import EpochReporter, WorkerEnv


_STAGE_ID = "stage_id"
# The key of a trial's last result that holds its stage's outcome, as outcome.json's text:
# Tune flattens nested result dicts.
OUTCOME = "outcome_json"


def stage_config(stage_id: str) -> dict[str, str]:
    """The config of the trial that runs stage `stage_id` (what the DAG searcher suggests)."""
    return {_STAGE_ID: stage_id}


def stage_id_of(config: dict[str, Any]) -> str:
    """The stage id a trial's config (`trial.config`, or the config a trainable gets) names."""
    return config[_STAGE_ID]


def ray_name(spec: StageSpec) -> str:
    """`StageSpec.display_name` as a Tune trial, its directory and a Ray Train run are named:
    Ray uses the name as a directory name, where '/' would nest directories."""
    return spec.display_name.replace("/", "_")


TRIAL_ACTOR = "NptmStage"


def trial_class(trainable: Any) -> type:
    """Tune's class for the function trainable `trainable`, named `TRIAL_ACTOR`: the class of
    every trial actor on the Ray dashboard's Actors page, and of their tasks on the Tasks page
    (`NptmStage.train`), where Tune would name it `ImplicitFunc`. The stage is not in that
    name: Tune reuses an actor for stage after stage, and Ray names an actor once, as it
    starts. The stage shows as the trial's name, a prune task's and a Ray Train run's."""
    from ray.tune.trainable import wrap_function

    cls = wrap_function(trainable)  # a new class at each call: renaming it changes no other
    cls.__name__ = cls.__qualname__ = TRIAL_ACTOR  # Ray takes the class name from __qualname__
    return cls


@dataclass(frozen=True)
class StageRuntime:
    """Where and how every stage of a sweep runs, besides what its spec says."""

    storage: str  # the storage root, absolute
    ray_storage: str  # where Tune and Ray Train keep their run directories
    data_root: str | None  # as the preflight check saw it
    download: bool
    executor: str  # "inline" or "train" (nptm.search_spaces.schema.Resources)
    workers_per_trial: int
    cpus_per_worker: float
    gpus_per_worker: float
    plugins: tuple[str, ...]  # imported by every worker before it builds anything

    def worker_env(self, device: str, rank: int = 0, world_size: int = 1) -> WorkerEnv:
        from nptm.trainables.stage_runner import WorkerEnv

        return WorkerEnv(self.storage, self.data_root, self.download, device, rank, world_size,
                         self.plugins)  # fmt: skip


@dataclass(frozen=True)
class SweepShared:
    """What every trial of a sweep reads besides its stage id: the plan's stages, as an object
    in Ray's object store (fetched once per process, `spec`), and the runtime settings."""

    stages: Any  # ray.ObjectRef of {stage id: StageSpec.to_dict()}
    runtime: StageRuntime

    @classmethod
    def put(cls, stages: dict[str, StageSpec], runtime: StageRuntime) -> SweepShared:
        """Put `stages` in the object store of the connected Ray (the driver keeps it alive)."""
        import ray

        return cls(ray.put({sid: spec.to_dict() for sid, spec in stages.items()}), runtime)

    def spec(self, stage_id: str) -> StageSpec:
        return StageSpec.from_dict(_stage_dicts(self.stages)[stage_id])


_fetched: dict[str, dict[str, dict[str, Any]]] = {}  # object id -> stage dicts, this process


def _stage_dicts(ref: Any) -> dict[str, dict[str, Any]]:
    """The plan's stage dicts behind `ref`, fetched at the first trial of this process only:
    a reused trial actor runs many stages of one sweep."""
    import ray

    key = ref.hex()
    if key not in _fetched:
        _fetched.clear()  # a process serves one sweep at a time: keep one plan
        _fetched[key] = ray.get(ref)
    return _fetched[key]


def stage_trial(config: dict[str, Any], shared: SweepShared) -> None:
    """Tune function trainable (`shared` comes through `tune.with_parameters`). Its last
    report holds the stage's outcome (`OUTCOME`)."""
    from ray import tune

    spec = shared.spec(stage_id_of(config))
    runtime = shared.runtime
    try:
        if runtime.executor == "inline":
            outcome = _run_inline(spec, runtime)
        elif spec.kind == StageKind.PRUNE:
            outcome = _run_prune_task(spec, runtime)
        else:
            _run_torch_trainer(spec, runtime)  # its ranks report the outcome (`_train_worker`)
            return
    except BaseException as err:
        store = ArtifactStore(runtime.storage)
        corrupt = _corrupt_cause(err)  # raised here, by a Ray Train rank or by a Ray task
        if corrupt is not None:
            # Not this stage's fault: the driver recomputes the producer, then retries this one.
            # A lost rewind checkpoint is re-made alone from the producer's kept state (its
            # outcome and model stay); a lost model re-makes the stage, and its children run
            # again only if the bytes differ (StageOutcome.read_current).
            if corrupt.name == MODEL:
                store.invalidate(corrupt.stage_id)
            else:
                store.delete(corrupt.stage_id, corrupt.name)
            tune.report({"corrupt_parent": corrupt.stage_id, "error": str(corrupt)})
            return
        # The stored error starts with what went wrong, not with the wrapper a Ray Train
        # worker group or a Ray task puts around it (failure_guard compares these lines).
        root = _root_cause(err)
        text = f"{type(root).__name__}: {root}\n{traceback.format_exc(limit=20)}"
        store.write_error(spec.id, text)
        raise
    tune.report({OUTCOME: outcome})


def outcome_of(spec: StageSpec, result: dict[str, Any] | None) -> StageOutcome | None:
    """The outcome a trial of `spec` reported last; None if it reported none."""
    text = (result or {}).get(OUTCOME)
    return check_outcome(text, spec.id)[0] if text else None


def _run_inline(spec: StageSpec, runtime: StageRuntime) -> str:
    """The stage in this (reused) trial actor, which holds one worker's resources."""
    from ray import tune

    def report(metrics: dict[str, Any]) -> None:
        tune.report({"epoch_done": 1, **metrics})

    return _run_in_this_process(spec, runtime, report)


def _run_prune_task(spec: StageSpec, runtime: StageRuntime) -> str:
    """A prune stage of a `train` sweep, as a Ray task that holds one worker's resources.

    Every trial of a `train` sweep then asks Tune for the same small trial actor, so Tune
    reuses actors between prune and training stages instead of starting a new one at each
    switch; the task runs in a pooled Ray worker that keeps its imports between prunes.
    """
    import ray

    task = ray.remote(_prune_task).options(
        name=ray_name(spec),  # the dashboard's Tasks page, as the trial and Train runs are named
        num_cpus=runtime.cpus_per_worker,
        num_gpus=runtime.gpus_per_worker,
        scheduling_strategy="DEFAULT",  # not inside the trial's placement group (0.1 CPU)
        max_retries=0,  # Tune retries the trial
    )
    return ray.get(task.remote(spec.to_dict(), runtime))


def _prune_task(stage: dict[str, Any], runtime: StageRuntime) -> str:
    return _run_in_this_process(StageSpec.from_dict(stage), runtime)


def _run_in_this_process(
    spec: StageSpec, runtime: StageRuntime, report: EpochReporter | None = None
) -> str:
    """One worker's share of the machine, on its device: an inline stage or a prune task;
    returns the outcome's text."""
    import torch

    from nptm.trainables.stage_runner import run_stage

    _limit_threads(runtime.cpus_per_worker)
    gpu = runtime.gpus_per_worker > 0 and torch.cuda.is_available()
    return outcome_json(run_stage(spec, runtime.worker_env("cuda" if gpu else "cpu"), report))


def _limit_threads(cpus: float) -> None:
    """One intra-op thread per CPU the stage was given: oversubscribed threads stall at every
    synchronisation point when other trials share the node."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def _run_torch_trainer(spec: StageSpec, runtime: StageRuntime) -> None:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    # The dashboard's Train page lists only the runs Ray Train tracks (off by default); this
    # process reads the switch when the trainer starts. Off where the user turned it off.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    gpus = runtime.gpus_per_worker
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"stage": spec.to_dict(), "runtime": runtime},
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=runtime.workers_per_trial,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": runtime.cpus_per_worker, "GPU": gpus},
        ),
        run_config=ray.train.RunConfig(
            name=ray_name(spec),  # the dashboard's Train runs and the run's directory
            storage_path=runtime.ray_storage,
            callbacks=[TuneReportCallback()],  # each rank-0 report becomes the trial's
        ),
    )
    trainer.fit()


def _root_cause(err: BaseException) -> BaseException:
    """The exception behind Ray's wrappers: the first failed rank's of a Ray Train worker group
    (WorkerGroupError.worker_failures), the original of a Ray task's error (RayTaskError.cause),
    else `err` itself."""
    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        return _root_cause(failures[min(failures)])
    cause = getattr(err, "cause", None)
    return _root_cause(cause) if isinstance(cause, BaseException) else err


def _corrupt_cause(err: BaseException) -> CorruptArtifactError | None:
    """The CorruptArtifactError behind `err`, if any: `err` itself, one a Ray Train rank
    reported (WorkerGroupError.worker_failures), or the original inside a Ray task's error
    (not Ray's wrapper class that also subclasses it)."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is CorruptArtifactError:
            return e
        todo.extend((getattr(e, "worker_failures", None) or {}).values())
        # Not __context__: a CorruptArtifactError handled on the way (a stage's own damaged
        # resume file, discarded) is not what made a later error.
        links = (getattr(e, "cause", None), e.__cause__)  # cause: RayTaskError
        todo.extend(c for c in links if isinstance(c, BaseException))
    return None


def _train_worker(config: dict[str, Any]) -> None:
    """Body of every DDP rank: the process group is already set up by Ray Train."""
    import ray.train
    import ray.train.torch

    from nptm.trainables.stage_runner import run_stage

    ctx = ray.train.get_context()
    runtime: StageRuntime = config["runtime"]
    _limit_threads(runtime.cpus_per_worker)
    spec = StageSpec.from_dict(config["stage"])
    env = runtime.worker_env(
        str(ray.train.torch.get_device()), ctx.get_world_rank(), ctx.get_world_size()
    )
    # ray.train.report is a barrier: every rank reports every epoch, and the outcome at the
    # end (rank 0's is the one the trial reports).
    outcome = run_stage(spec, env, report=lambda m: ray.train.report({"epoch_done": 1, **m}))
    ray.train.report({OUTCOME: outcome_json(outcome)})
