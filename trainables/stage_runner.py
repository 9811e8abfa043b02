"""Run one stage (pretrain, prune or retrain) on a worker.

The same code runs inline in a Tune trial actor and on every rank of a Ray Train DDP worker
group; only rank 0 writes artifacts. Models travel between stages as
`{"model", "dataset", "plans", "state_dict"}`: the base architecture plus the ordered pruning
plans that turn it into the stored network, so a rebuild always re-applies masks and structure.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nptm.trainables import schedules, start_weights
from nptm.trainables.artifacts import (
    MODEL,
    RESUME,
    ArtifactStore,
    CorruptArtifactError,
    is_output,
    rewind_name,
)
from nptm.trainables.catalog import PRUNERS, SCHEDULES
from nptm.trainables.datasets import DataBundle, load_dataset
from nptm.trainables.loaders import Loaders, make_loaders
from nptm.trainables.macs import count_nonzero_params, count_params_macs
from nptm.trainables.models import build_model, reinitialize
from nptm.trainables.plugins import load_plugins
from nptm.trainables.pruners import PrunePlan, apply_plan, compute_plan
from nptm.trainables.pruners.unstructured import layer_density, sparsity
from nptm.trainables.stage import EpochMetrics, StageKind, StageOutcome, StageSpec, StageStatus
from nptm.trainables.train_loop import Diverged, evaluate, fit

# Fields run_stage sets for every run; a re-used outcome does not carry them over.
_RUN_FIELDS = (
    "stage_id", "kind", "started_at", "ended_at", "wall_seconds", "device_hours", "node",
    "workers", "attempts",
)  # fmt: skip
# What a retrain stage reports of the pruning it continues from.
_FROM_PRUNE = ("acc_before_prune", "acc_after_prune", "emptied_layers", "pretrain_id", "structured")
# A pre-training keeps its full training state (weights, optimizer, epoch) at this many evenly
# spaced epochs, so a rewind checkpoint a later grid asks for is re-made from the nearest
# earlier state (at most T / STATE_CHECKPOINTS epochs of training), not from epoch 0.
STATE_CHECKPOINTS = 20
# Batches that data-driven pruners look at unless their registry entry names a number of
# images (HRank: 640 augmented training images, as its rank estimate uses).
CALIBRATION_BATCHES = 4

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerEnv:
    storage: str
    data_root: str | None = None
    download: bool = False
    device: str = "cpu"
    rank: int = 0
    world_size: int = 1
    plugins: tuple[str, ...] = ()  # the grid's plugin modules (nptm.trainables.plugins)


EpochReporter = Callable[[dict[str, Any]], None]


def run_stage(spec: StageSpec, env: WorkerEnv, report: EpochReporter | None = None) -> StageOutcome:
    """Run `spec` to completion (resuming if a checkpoint exists) and return its outcome."""
    load_plugins(env.plugins)  # this worker may know none of the grid's plugin names yet
    store = ArtifactStore(env.storage)
    started = time.time()
    # Rank 0 counts the start; every rank reads the same count back at the end.
    attempts = store.start_attempt(spec.id) if env.rank == 0 else None
    runner = {
        StageKind.PRETRAIN: _pretrain,
        StageKind.PRUNE: _prune,
        StageKind.RETRAIN: _retrain,
    }[spec.kind]
    fields: dict[str, Any] = {"status": StageStatus.OK}
    try:
        fields |= runner(spec, env, store, report)
    except Diverged as err:
        fields |= {"status": StageStatus.DIVERGED, "error": str(err), "epochs_run": err.epoch}
    fields |= _lineage(spec, store, fields.get("artifacts"))
    ended = time.time()
    outcome = StageOutcome(
        stage_id=spec.id,
        kind=spec.kind,
        started_at=started,
        ended_at=ended,
        wall_seconds=ended - started,
        device_hours=(ended - started) * env.world_size / 3600.0,
        node=_node_id(),
        workers=env.world_size,
        attempts=attempts,
        **fields,
    )
    if env.rank == 0:
        store.write_outcome(outcome)
        if outcome.status == StageStatus.OK:
            store.delete(spec.id, RESUME)
    return outcome


def _lineage(spec: StageSpec, store: ArtifactStore, kept: dict[str, str] | None) -> dict:
    """What this stage holds for its children (`kept`: payloads an earlier run of it stored)
    and which bytes of its parents it read (StageOutcome.artifacts / consumed)."""
    held = dict(kept or {}) | {
        name: sha for (sid, name), sha in store.saved.items() if sid == spec.id and is_output(name)
    }
    consumed = {
        f"{sid}/{name}": sha for (sid, name), sha in store.loaded.items() if sid in spec.parents
    }
    return {"artifacts": held or None, "consumed": consumed or None}


def _check_read(store: ArtifactStore, parent_id: str, parent: StageOutcome | None) -> None:
    """Refuse parent payloads other than those the parent's outcome recorded (a payload and its
    checksum file both replaced, say by another stage's): the parent is then re-made."""
    held = (parent.artifacts if parent is not None else None) or {}
    for (sid, name), sha in store.loaded.items():
        if sid == parent_id and held.get(name, sha) != sha:
            raise CorruptArtifactError(sid, name, "not the payload its stage's outcome recorded")


def state_name(epoch: int) -> str:
    """Name of the full training state a pre-training keeps at `epoch`."""
    return f"state-{epoch:04d}"


def kept_state_epochs(epochs: int) -> tuple[int, ...]:
    """Epochs (0 < e < T) at which a pre-training of T epochs keeps its full training state:
    every ceil(T / STATE_CHECKPOINTS) epochs (every 8th of the 160-epoch CIFAR recipe)."""
    step = max(1, math.ceil(epochs / STATE_CHECKPOINTS))
    return tuple(range(step, epochs, step))


# -- model (de)serialisation --------------------------------------------------------------
def model_payload(spec: StageSpec, model: nn.Module, plans: list[PrunePlan]) -> dict:
    return {
        "model": spec.model,
        "dataset": spec.dataset,
        "plans": [p.to_payload() for p in plans],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def load_model(store: ArtifactStore, stage_id: str, name: str = MODEL) -> tuple[nn.Module, list]:
    """Rebuild a stored model: base architecture -> every pruning plan -> stored weights."""
    payload = store.load(stage_id, name)
    plans = [PrunePlan.from_payload(p) for p in payload["plans"]]
    model = build_model(payload["model"], payload["dataset"])
    for plan in plans:
        model = apply_plan(model, plan)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model, plans


def _architecture(spec: StageSpec, plans: list[PrunePlan], init_seed: int) -> nn.Module:
    model = build_model(spec.model, spec.dataset, seed=init_seed)
    for plan in plans:
        model = apply_plan(model, plan)
    return model


# -- shared training driver ---------------------------------------------------------------
def _train(
    spec: StageSpec,
    env: WorkerEnv,
    store: ArtifactStore,
    model: nn.Module,
    lr_for: Callable[[int], Any],
    epochs: int,
    report: EpochReporter | None,
    keep_epochs: tuple[int, ...] = (),
    state_epochs: tuple[int, ...] = (),
    momentum_for: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    device = torch.device(env.device)
    loaders = _loaders(spec, env)
    lr_per_step = lr_for(len(loaders.train))
    momentum_per_step = None if momentum_for is None else momentum_for(len(loaders.train))
    resume = _load_resume(store, spec.id, env.rank, state_epochs)
    if resume is not None:
        model.load_state_dict(resume["model"])
    elif env.rank == 0 and 0 in keep_epochs:
        store.save(spec.id, rewind_name(0), {"state_dict": model.state_dict()})

    def checkpoint(epoch: int, state: dict) -> None:
        if env.rank != 0:
            return
        store.save(spec.id, RESUME, state)
        if epoch in keep_epochs:
            store.save(spec.id, rewind_name(epoch), {"state_dict": state["model"]})
        if epoch in state_epochs:
            store.save(spec.id, state_name(epoch), state)

    def on_epoch(m: EpochMetrics) -> None:
        if report is not None:
            report({k: v for k, v in vars(m).items() if v is not None})

    model.to(device)
    result = fit(
        model,
        loaders,
        lr_per_step,
        spec.recipe,
        epochs=epochs,
        device=device,
        seed=spec.seed,
        start_epoch=resume["epoch"] if resume else 0,
        resume_state=resume,
        on_epoch=on_epoch,
        checkpoint=checkpoint,
        weight_decay=spec.override_dict.get("weight_decay"),
        precision=spec.precision,
        momentum_per_step=momentum_per_step,
    )
    return {
        "test_acc": result.test_acc,
        "test_loss": result.test_loss,
        "best_val_epoch": result.best_val_epoch,
        "test_acc_at_best_val": result.test_acc_at_best_val,
        "best_test_acc_over_epochs": result.best_test_acc_over_epochs,
        "epochs_run": epochs,
        "resumed_from_epoch": resume["epoch"] if resume else 0,
        "samples_per_second": result.samples_per_second,
        "epochs": tuple(result.history),
    }


def _bundle(spec: StageSpec, env: WorkerEnv) -> DataBundle:
    """The stage's dataset with the train/validation split its lineage trains on."""
    return load_dataset(
        spec.dataset,
        env.data_root,
        val_fraction=spec.val_fraction,
        split_seed=spec.data_split_seed,
        download=env.download,
    )


def _loaders(spec: StageSpec, env: WorkerEnv) -> Loaders:
    return make_loaders(
        _bundle(spec, env),
        batch_size=spec.recipe.batch_size,
        device=torch.device(env.device),
        seed=spec.seed,
        rank=env.rank,
        world_size=env.world_size,
    )


def _load_resume(
    store: ArtifactStore, stage_id: str, rank: int, state_epochs: tuple[int, ...] = ()
) -> dict | None:
    """This stage's own resume checkpoint, else its latest kept training state (a pre-training
    whose model was lost is re-made from there, not from epoch 0), or None to start at 0.

    A damaged checkpoint of the stage itself is discarded, not reported: reporting it as a
    corrupt parent would requeue this very stage, which would find the same file again.
    """
    kept = [state_name(e) for e in sorted(state_epochs, reverse=True)]
    for name in (RESUME, *kept):
        if not store.exists(stage_id, name):
            continue
        try:
            return store.load(stage_id, name)
        except CorruptArtifactError as err:
            log.warning("%s; training stage %s from an earlier state", err, stage_id)
            if rank == 0:
                store.delete(stage_id, name)
    return None


def _size_fields(model: nn.Module, spec: StageSpec) -> dict[str, Any]:
    base_params, base_macs = count_params_macs(build_model(spec.model, spec.dataset), spec.dataset)
    params, macs = count_params_macs(model, spec.dataset)
    return {
        "params": params,
        "macs": macs,
        "nonzero_params": count_nonzero_params(model),
        "base_params": base_params,
        "base_macs": base_macs,
        "params_reduction": 1 - params / base_params,
        "macs_reduction": 1 - macs / base_macs,
        "achieved_sparsity": sparsity(model, dict(spec.pruner_options).get("layers", "conv")),
    }


# -- the three stage kinds ----------------------------------------------------------------
def _pretrain(spec: StageSpec, env: WorkerEnv, store: ArtifactStore, report) -> dict:
    previous = store.read_outcome(spec.id)
    if previous and previous.status == StageStatus.OK and store.exists(spec.id, MODEL):
        # A finished pre-training asked for rewind checkpoints it did not keep (a later grid
        # added a `wr` budget): re-make just those, and keep what the run measured.
        remade = _remake_rewind_checkpoints(spec, env, store)
        return {k: v for k, v in previous.to_dict().items() if k not in _RUN_FIELDS} | {
            "epochs": previous.epochs,
            "rewind_epochs_remade": remade,
        }
    if not spec.trains:
        return _load_start_weights(spec, env, store)
    model = build_model(spec.model, spec.dataset, seed=spec.seed)
    fields = _train(
        spec,
        env,
        store,
        model,
        lambda steps: schedules.pretrain_schedule(spec.recipe, steps),
        spec.recipe.epochs,
        report,
        keep_epochs=spec.keep_epochs,
        state_epochs=kept_state_epochs(spec.recipe.epochs),
    )
    if env.rank == 0:
        store.save(spec.id, MODEL, model_payload(spec, model, []))
    return fields | _size_fields(model, spec) | {"pretrain_id": spec.id}


def _load_start_weights(spec: StageSpec, env: WorkerEnv, store: ArtifactStore) -> dict:
    """A pretrain stage of existing weights (`pretrain.from`): load them, record their test
    (and validation) accuracy, store them as this stage's model. No epoch is trained."""
    assert spec.start_from is not None
    data = start_weights.read_source(spec.start_from, spec.model)
    model = build_model(spec.model, spec.dataset)
    model.load_state_dict(start_weights.load_state_dict(data, spec.start_sha256), strict=True)
    device = torch.device(env.device)
    model.to(device)
    loaders = _loaders(spec, env)
    test_loss, test_acc = evaluate(model, loaders.test, device, spec.precision)
    if env.rank == 0:
        store.save(spec.id, MODEL, model_payload(spec, model.cpu(), []))
    return {
        "test_acc": test_acc,
        "test_loss": test_loss,
        "epochs_run": 0,
        "pretrain_id": spec.id,
    } | _size_fields(model, spec)


def _remake_rewind_checkpoints(spec: StageSpec, env: WorkerEnv, store: ArtifactStore) -> list:
    """Re-make the missing `keep_epochs` weights of a finished pre-training.

    Each is trained from the latest kept state at or before it (the initial weights if none):
    the same epochs with the same data order, augmentation, seeds and lr as the original run,
    so on the CPU the weights are bit-identical to those the run would have kept (on GPUs as
    reproducible as a resumed run).
    """
    missing = [e for e in spec.keep_epochs if not store.exists(spec.id, rewind_name(e))]
    loaders = None
    for epoch in missing:
        start = max(
            (k for k in kept_state_epochs(spec.recipe.epochs) if k <= epoch
             and store.exists(spec.id, state_name(k))),
            default=0,
        )  # fmt: skip
        model = build_model(spec.model, spec.dataset, seed=spec.seed)
        resume = store.load(spec.id, state_name(start)) if start else None
        if start == epoch:
            assert resume is not None or epoch == 0
            weights = resume["model"] if resume is not None else model.state_dict()
        else:
            loaders = loaders or _loaders(spec, env)
            steps = len(loaders.train)
            lr = schedules.pretrain_schedule(spec.recipe, steps)[: epoch * steps]
            fit(
                model, loaders, lr, spec.recipe, epochs=epoch, device=env.device, seed=spec.seed,
                start_epoch=start, resume_state=resume, precision=spec.precision,
            )  # fmt: skip
            weights = model.state_dict()
        if env.rank == 0:
            store.save(spec.id, rewind_name(epoch), {"state_dict": weights})
    return missing


def calibration_sizes(pruner: str, recipe_batch_size: int) -> tuple[int, int]:
    """(batches, batch size) a data-driven pruner ranks filters on: its registry entry's
    number of images in batches of at most the recipe's size (HRank: 640 = 10 x 64 for the
    CIFAR recipe), else CALIBRATION_BATCHES batches of the recipe's size."""
    images = PRUNERS[pruner].calibration_images
    if not images:
        return CALIBRATION_BATCHES, recipe_batch_size
    n_batches = math.ceil(images / recipe_batch_size)
    return n_batches, images // n_batches


def _prune(spec: StageSpec, env: WorkerEnv, store: ArtifactStore, report) -> dict:
    parent_id = spec.parents[0]
    parent = store.read_outcome(parent_id)  # None only if garbled since it finished
    model, plans = load_model(store, parent_id)
    _check_read(store, parent_id, parent)
    bundle = _bundle(spec, env)
    batches = None
    info = PRUNERS[spec.pruner]
    if info.needs_data:
        n_batches, batch_size = calibration_sizes(spec.pruner, spec.recipe.batch_size)
        batches = bundle.calibration_batches(
            n_batches, batch_size, spec.seed, augmented=info.calibration_augmented
        )
    plan = compute_plan(
        model,
        spec.model,
        spec.pruner,
        ratio=spec.ratio,
        preset=spec.preset,
        batches=batches,
        seed=spec.seed,
        options=dict(spec.pruner_options),
    )
    model = apply_plan(model, plan)
    # A global threshold may cut a layer off entirely; say so, never repair it silently.
    density = layer_density(model)
    emptied = [name for name, d in density.items() if d == 0.0]
    loaders = make_loaders(bundle, batch_size=256, device=torch.device("cpu"), seed=spec.seed)
    acc_after = evaluate(model, loaders.test, torch.device("cpu"))[1]
    if env.rank == 0:
        store.save(spec.id, MODEL, model_payload(spec, model, [*plans, plan]))
    return _size_fields(model, spec) | {
        "acc_before_prune": getattr(parent, "test_acc", None),
        "acc_after_prune": acc_after,
        "test_acc": acc_after,
        "pretrain_id": getattr(parent, "pretrain_id", None),
        "structured": PRUNERS[spec.pruner].structured,
        "emptied_layers": len(emptied),
        "emptied_layer_names": emptied,
        "layer_density": density,
    }


def _retrain(spec: StageSpec, env: WorkerEnv, store: ArtifactStore, report) -> dict:
    # parents[0] is the model to start from; `wr` also names the pretrain it rewinds to.
    parent_id = spec.parents[0]
    parent = store.read_outcome(parent_id)  # None only if garbled since it finished
    model, plans = load_model(store, parent_id)
    _check_read(store, parent_id, parent)
    budget = spec.budget
    assert budget is not None and spec.schedule is not None
    info = SCHEDULES[spec.schedule]
    if info.rewinds_weights:
        epoch = schedules.rewind_epoch(spec.recipe, budget)
        rewound = store.load(spec.parents[1], rewind_name(epoch))
        _check_read(store, spec.parents[1], store.read_outcome(spec.parents[1]))
        model = _architecture(spec, [], spec.seed)
        model.load_state_dict(rewound["state_dict"], strict=True)
        for plan in plans:
            model = apply_plan(model, plan)
    elif info.from_scratch:
        # A fresh initialisation: a seed unrelated to the pre-training's, so scratch never
        # inherits the pre-trained network's initial weights; drawn at the pruned network's
        # own widths (masks of unstructured pruning kept), as main_B.py builds it.
        init_seed = int(spec.id[:8], 16)
        model = reinitialize(_architecture(spec, plans, init_seed), spec.model, seed=init_seed)
    fields = _train(
        spec,
        env,
        store,
        model,
        lambda steps: schedules.lr_schedule(
            spec.schedule,
            budget=budget,
            steps_per_epoch=steps,
            recipe=spec.recipe,
            overrides={k: v for k, v in spec.overrides if k == "lr"},
        ),
        budget,
        report,
        momentum_for=lambda steps: schedules.momentum_schedule(
            spec.schedule, budget=budget, steps_per_epoch=steps, recipe=spec.recipe
        ),
    )
    if env.rank == 0:
        store.save(spec.id, MODEL, model_payload(spec, model, plans))
    return fields | _size_fields(model, spec) | {k: getattr(parent, k, None) for k in _FROM_PRUNE}


def _node_id() -> str:
    """The Ray node this stage ran on (the host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return socket.gethostname()
