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
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING, Any

from trainables.artifacts import ArtifactStore, CorruptArtifactError
from trainables.stage import StageKind, StageSpec

if TYPE_CHECKING:
    from trainables.stage_runner import EpochReporter, WorkerEnv


def stage_trial(config: dict[str, Any]) -> None:
    """Tune function trainable. Its final report says how the stage ended; the outcome itself
    is in the artifact store, where the driver reads it."""
    from ray import tune

    spec = StageSpec.from_dict(config["stage"])
    runtime = config["runtime"]
    store = ArtifactStore(runtime["storage"])
    try:
        if runtime["executor"] == "inline":
            _run_inline(spec, runtime)
        elif spec.kind == StageKind.PRUNE:
            _run_prune_task(spec, runtime)
        else:
            _run_torch_trainer(spec, runtime)
    except BaseException as err:
        corrupt = _corrupt_cause(err)  # raised here, by a Ray Train rank or by a Ray task
        if corrupt is not None:
            # Not this stage's fault: the driver recomputes the producer, then retries this one.
            store.invalidate(corrupt.stage_id)
            tune.report({"corrupt_parent": corrupt.stage_id, "error": str(corrupt)})
            return
        text = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=20)}"
        store.write_error(spec.id, text)
        raise
    tune.report({"finished": 1})


def _run_inline(spec: StageSpec, runtime: dict[str, Any]) -> None:
    """The stage in this (reused) trial actor, which holds one worker's resources."""
    from ray import tune

    _run_in_this_process(spec, runtime, report=lambda m: tune.report({"epoch_done": 1, **m}))


def _run_prune_task(spec: StageSpec, runtime: dict[str, Any]) -> None:
    """A prune stage of a `train` sweep, as a Ray task that holds one worker's resources.

    Every trial of a `train` sweep then asks Tune for the same small trial actor, so Tune
    reuses actors between prune and training stages instead of starting a new one at each
    switch; the task runs in a pooled Ray worker that keeps its imports between prunes.
    """
    import ray

    task = ray.remote(_prune_task).options(
        num_cpus=float(runtime["cpus_per_worker"]),
        num_gpus=float(runtime["gpus_per_worker"]),
        scheduling_strategy="DEFAULT",  # not inside the trial's placement group (0.1 CPU)
        max_retries=0,  # Tune retries the trial
    )
    ray.get(task.remote(spec.to_dict(), runtime))


def _prune_task(stage: dict[str, Any], runtime: dict[str, Any]) -> None:
    _run_in_this_process(StageSpec.from_dict(stage), runtime)


def _run_in_this_process(
    spec: StageSpec, runtime: dict[str, Any], report: EpochReporter | None = None
) -> None:
    """One worker's share of the machine, on its device: an inline stage or a prune task."""
    from trainables.stage_runner import run_stage

    _limit_threads(runtime["cpus_per_worker"])
    run_stage(spec, _env(runtime, device=_inline_device(runtime)), report=report)


def _env(runtime: dict[str, Any], **kw: Any) -> WorkerEnv:
    from trainables.stage_runner import WorkerEnv

    return WorkerEnv(
        storage=runtime["storage"],
        data_root=runtime.get("data_root"),
        download=runtime.get("download", False),
        plugins=tuple(runtime.get("plugins", ())),
        **kw,
    )


def _limit_threads(cpus: float) -> None:
    """One intra-op thread per CPU the stage was given: oversubscribed threads stall at every
    synchronisation point when other trials share the node."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def _inline_device(runtime: dict[str, Any]) -> str:
    import torch

    return "cuda" if runtime["gpus_per_worker"] > 0 and torch.cuda.is_available() else "cpu"


def _run_torch_trainer(spec: StageSpec, runtime: dict[str, Any]) -> None:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    gpus = float(runtime["gpus_per_worker"])
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"stage": spec.to_dict(), "runtime": runtime},
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=int(runtime["workers_per_trial"]),
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": float(runtime["cpus_per_worker"]), "GPU": gpus},
        ),
        run_config=ray.train.RunConfig(
            name=f"stage-{spec.id}",
            storage_path=runtime["ray_storage"],
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


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
        links = (getattr(e, "cause", None), e.__cause__, e.__context__)  # cause: RayTaskError
        todo.extend(c for c in links if isinstance(c, BaseException))
    return None


def _train_worker(config: dict[str, Any]) -> None:
    """Body of every DDP rank: the process group is already set up by Ray Train."""
    import ray.train
    import ray.train.torch

    from trainables.stage_runner import run_stage

    ctx = ray.train.get_context()
    _limit_threads(config["runtime"]["cpus_per_worker"])
    spec = StageSpec.from_dict(config["stage"])
    env = _env(
        config["runtime"],
        device=str(ray.train.torch.get_device()),
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
    )
    # ray.train.report is a barrier: every rank reports every epoch.
    run_stage(spec, env, report=lambda m: ray.train.report({"epoch_done": 1, **m}))
