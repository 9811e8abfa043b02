"""Every GPU check of nptm in one time-boxed run (at most ~8 minutes on one GPU).

    python3 bench/gpu.py OUT_DIR [--dry-run] [--write-figures] [--budget-s 390]

Checks, in this order (the most important first; each has a budget of seconds and stops
measuring when it is spent; the whole run has `--budget-s`, and a check that would start after
it is recorded as skipped):

1. throughput: training samples/s of CIFAR ResNet-56 on 50,000 generated 32x32 images written
   in the real on-disk CIFAR-10 format. `nptm` = `nptm.trainables.train_loop.fit` at its default
   precision (fp32, the paper's; channels_last on CUDA) on `nptm.trainables.loaders` with the
   split resident on the GPU; `nptm-bf16` = the same with `precision: bf16` (bf16 autocast,
   the grid's opt-in); `nptm-host-data` = fp32 with the loaders on the CPU (augmentation on the
   host, one copy per batch); `ref-w2` = the paper's loop (torchvision CIFAR10 + PIL transforms
   + DataLoader, 2 workers), all from bench/throughput.py, interleaved epochs, medians.
   The `bare` rows are bare SGD steps over ready batches (no input pipeline): fp32 NCHW,
   bf16 + channels_last, and bf16 + channels_last + torch.compile (in its own process,
   compile time reported; nptm has no torch.compile option), i.e. what each option is worth.
   Target: nptm >= 3x ref-w2.
2. epoch_seconds: seconds per training epoch of every (model, dataset) of the shipped grids at
   the grid's batch size, through `fit` on synthetic GPU-resident inputs, timed over a fixed
   number of steps (median of repeats) and extrapolated to ceil(train_size / batch) steps.
   For ImageNet this is model compute only (the real path decodes JPEGs in DataLoader workers).
   These figures are what `nptm plan` turns into GPU-hours (orchestrator/gpu_figures.json).
3. packing: the same retrain stage (ResNet-56, magnitude 50%, `ft`, 1 epoch over the 50,000
   images) run through the inline executor's in-process path (`nptm.orchestrator.trial.
   _run_in_this_process`) by 1 process, then by 4 concurrent processes on the one GPU
   (process-level packing, what `gpus_per_worker: 0.25` gives under Ray, not through
   `nptm sweep`), stages/hour both ways, GPU utilisation sampled every 0.5 s (NVML, else
   nvidia-smi).
4. ddp: a 1-rank process group (NCCL on the GPU, gloo in the dry run) on 127.0.0.1, one retrain
   stage through `nptm.trainables.stage_runner.run_stage` as a `train`-executor rank runs it (time
   outside the train loop), then an all-reduce and a DistributedDataParallel step.
   Ray Train's own per-stage overhead needs Ray and is reported as not measured without it.

Writes OUT_DIR/gpu.json, OUT_DIR/gpu.md and OUT_DIR/gpu_figures.json (with --write-figures also
orchestrator/gpu_figures.json); prints the Markdown summary last. Exits 2 at once when no
CUDA device is visible, unless --dry-run (CPU, tiny sizes, same code paths, < 1 minute).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib.util
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _common
import numpy as np
import throughput
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from nptm.orchestrator.trial import StageRuntime

TARGET_RATIO = 3.0  # nptm vs the paper's loop (2 workers), ResNet-56, GPU
PACKED = 4  # stages sharing the GPU: gpus_per_worker 0.25
FIGURES = _common.ROOT / "orchestrator" / "gpu_figures.json"
BUDGET_S = 390.0  # seconds for all checks; with GRACE_S and start-up the run stays < 8 min
GRACE_S = 45.0
CHECKS = ("throughput", "epoch_seconds", "packing", "ddp", "compile")
_T0 = time.monotonic()


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each check is; the dry run shrinks everything but the code paths."""

    n_train: int = 50_000
    n_test: int = 1_000
    model: str = "resnet56"
    batch: int = throughput.BATCH  # of the throughput check, every loop alike
    ref_workers: int = throughput.PAPER_WORKERS
    throughput_s: float = 60.0
    max_rounds: int = 3
    bare_steps: int = 50
    bare_batch: int = throughput.BATCH
    pairs: tuple[tuple[str, str], ...] | None = None  # None: every pair of the shipped grids
    epoch_steps: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"imagenet": 10, "default": 30}
    )
    epoch_s: float = 60.0
    epoch_batch: int | None = None  # None: each grid's batch size
    packed: int = PACKED
    packing_window_s: float = 25.0  # each process starts stages until this has passed
    packing_s: float = 150.0  # both runs, process start-up included
    ddp_timeout_s: float = 90.0
    compile_timeout_s: float = 150.0
    compile_backend: str = "inductor"
    repeats: int = 3

    @classmethod
    def dry(cls) -> Sizes:
        return cls(
            n_train=64, n_test=32, model="resnet20", batch=8, ref_workers=0, throughput_s=2.0,
            max_rounds=1, bare_steps=2, bare_batch=8, pairs=(("resnet20", "cifar10"),),
            epoch_steps={"imagenet": 1, "default": 2}, epoch_s=5.0, epoch_batch=4, packed=2,
            packing_window_s=0.0, ddp_timeout_s=60.0, compile_timeout_s=120.0, packing_s=120.0,
            compile_backend="eager", repeats=1,
        )  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s {dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def _checksums_only(files: Any) -> Any:
    """The fixture record without its arrays: all `accept_checksums` needs, cheap to pickle."""
    return dataclasses.replace(
        files, train_images=None, train_labels=None, test_images=None, test_labels=None
    )


# -- running a function in its own process, with a timeout ----------------------------------
def _child(fn: Callable[..., Any], kwargs: dict[str, Any], queue: Any) -> None:
    try:
        queue.put(("ok", fn(**kwargs)))
    except BaseException:  # the parent records whatever went wrong
        queue.put(("error", traceback.format_exc(limit=8)))


def run_isolated(fn: Callable[..., Any], timeout: float, **kwargs: Any) -> Any:
    """fn(**kwargs) in a spawned process (a fresh CUDA context); raises on error or timeout.
    Without CUDA (the dry run) there is no context to keep apart: fn runs in this process,
    which saves the dry run a process start and its imports per check."""
    if not torch.cuda.is_available():
        return fn(**kwargs)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, kwargs, queue))
    proc.start()
    try:
        status, value = queue.get(timeout=max(1.0, timeout))
    except Exception as err:  # queue.Empty
        raise TimeoutError(f"no result within {timeout:.0f} s") from err
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    if status == "error":
        raise RuntimeError(value)
    return value


# -- GPU utilisation ------------------------------------------------------------------------
class UtilSampler(threading.Thread):
    """GPU utilisation (%) of device 0 every `period` seconds: NVML, else nvidia-smi."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.samples: list[float] = []
        self.source: str | None = None
        self._halt = threading.Event()
        self._read = self._reader()

    def _reader(self) -> Callable[[], float] | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.source = "nvml"
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # no NVML library or no driver: try nvidia-smi
            pass
        if shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            return lambda: float(subprocess.check_output(cmd, text=True).splitlines()[0])
        return None

    def run(self) -> None:
        while self._read is not None and not self._halt.is_set():
            with contextlib.suppress(Exception):  # a failed sample is just missing
                self.samples.append(self._read())
            self._halt.wait(self.period)

    def summary(self) -> dict[str, Any]:
        self._halt.set()
        if self.ident is not None:  # started
            self.join(5)
        if not self.samples:
            return {"source": self.source or "unavailable", "samples": 0}
        return {
            "source": self.source,
            "samples": len(self.samples),
            "mean_pct": float(np.mean(self.samples)),
            "median_pct": _common.median(self.samples),
            "max_pct": max(self.samples),
        }


# -- 1. throughput ----------------------------------------------------------------------------
def check_throughput(sizes: Sizes, files: Any, device: torch.device, budget: Deadline) -> dict:
    from nptm.trainables.datasets import load_dataset
    from nptm.trainables.loaders import make_loaders
    from nptm.trainables.models import build_model
    from nptm.trainables.recipe import default_recipe
    from tests.cifar_fixture import accept_checksums

    recipe = default_recipe("cifar10", batch_size=sizes.batch)
    with accept_checksums(files):
        bundle = load_dataset("cifar10", files.root)
        ref = throughput.reference_loader(
            str(files.root), workers=sizes.ref_workers, device=device, seed=0, batch=sizes.batch
        )
    on_device = make_loaders(bundle, batch_size=sizes.batch, device=device, seed=0)
    on_host = make_loaders(bundle, batch_size=sizes.batch, device="cpu", seed=0)
    cuda = device.type == "cuda"

    def model(nptm: bool, bf16: bool = False) -> torch.nn.Module:
        m = build_model(sizes.model, "cifar10", seed=0).to(device)
        # nptm's loop runs channels_last on CUDA; precision is the grid's `resources.precision`
        throughput._warm_up(m, device, channels_last=cuda and nptm, batch=sizes.batch, bf16=bf16)
        return m

    ref_model = model(nptm=False)
    ref_opt = throughput._optimizer(ref_model, recipe)
    runners: dict[str, Callable[[int], tuple[int, float]]] = {}
    # nptm = the default (fp32, the paper's precision); nptm-bf16 = `precision: bf16`
    for name, loaders, precision in (
        ("nptm", on_device, "fp32"),
        ("nptm-bf16", on_device, "bf16"),
        ("nptm-host-data", on_host, "fp32"),
    ):
        m = model(nptm=True, bf16=precision == "bf16")
        runners[name] = lambda r, m=m, ld=loaders, p=precision: throughput.nptm_epoch(
            m, ld, recipe, device, r, precision=p
        )
    ref_key = f"ref-w{sizes.ref_workers}"
    runners[ref_key] = lambda r: throughput.reference_epoch(ref_model, ref_opt, ref, device)[:2]

    rates: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for r in range(sizes.max_rounds):
        if r and budget.left() <= 0:
            break
        k = r % len(order)
        for key in order[k:] + order[:k]:  # rotated: nobody always goes first
            n, s = runners[key](r)
            rates[key].append(n / s)
            log(f"throughput round {r + 1}: {key} {n / s:,.0f} samples/s")
    out: dict[str, Any] = {
        "model": sizes.model,
        "n_train": sizes.n_train,
        "batch": sizes.batch,
        "rounds": len(rates["nptm"]),
        "samples_per_s": {k: _common.median(v) for k, v in rates.items()},
        "all_samples_per_s": rates,
        "reference": ref_key,
        "nptm_cuda_path": "fp32 (default) or bf16 autocast (precision: bf16), channels_last, "
        "split resident on the GPU"
        if cuda
        else "fp32 / bf16 autocast on the CPU",
        "not_in_nptm": ["torch.compile"],
    }
    sps = out["samples_per_s"]
    out["ratio"] = sps["nptm"] / sps[ref_key]
    out["target_ratio"] = TARGET_RATIO
    out["met"] = out["ratio"] >= TARGET_RATIO
    out["bare"] = {}
    for label, bf16, cl in (("fp32", False, False), ("bf16+channels_last", True, cuda)):
        out["bare"][label] = bare_rate(
            sizes.model, device=str(device), batch=sizes.bare_batch, steps=sizes.bare_steps,
            repeats=sizes.repeats, bf16=bf16, channels_last=cl, compile_backend=None,
        )  # fmt: skip
        log(f"bare {label}: {out['bare'][label]['samples_per_s']:,.0f} samples/s")
    return out


def bare_rate(
    model_name: str,
    *,
    device: str,
    batch: int,
    steps: int,
    repeats: int,
    bf16: bool,
    channels_last: bool,
    compile_backend: str | None,
) -> dict[str, Any]:
    """Samples/s of bare SGD steps (throughput.bare_epoch) over `steps` ready CIFAR batches."""
    from nptm.trainables.models import build_model
    from nptm.trainables.recipe import default_recipe

    dev = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(model_name, "cifar10", seed=0).to(dev, memory_format=fmt)
    opt = throughput._optimizer(model, default_recipe("cifar10"))
    gen = torch.Generator(device=dev).manual_seed(0)
    batches = [
        (
            torch.randn(batch, 3, 32, 32, device=dev, generator=gen).contiguous(memory_format=fmt),
            torch.randint(0, 10, (batch,), device=dev, generator=gen),
        )
        for _ in range(steps)
    ]
    t0 = time.perf_counter()
    net = torch.compile(model, backend=compile_backend) if compile_backend else model
    throughput.bare_epoch(net, opt, batches[:3], dev, bf16=bf16)  # warm-up (and compilation)
    warm_s = time.perf_counter() - t0
    rates = [
        n / s
        for n, s, _ in (throughput.bare_epoch(net, opt, batches, dev, bf16=bf16)
                        for _ in range(repeats))
    ]  # fmt: skip
    return {"samples_per_s": _common.median(rates), "steps": steps, "warmup_s": warm_s}


# -- 2. seconds per epoch ----------------------------------------------------------------------
def grid_pairs() -> dict[tuple[str, str], int]:
    """(model, dataset) -> batch size of every pair the shipped grids train."""
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import load_grid

    pairs: dict[tuple[str, str], int] = {}
    for path in sorted((_common.ROOT / "search_spaces").glob("*.yaml")):
        plan = build_plan(load_grid(path), confirm_large=True)
        for t in plan.trials:
            pairs[(t.model, t.dataset)] = plan.grid.recipe(t.dataset).batch_size
    return pairs


def epoch_seconds(
    model_name: str, dataset: str, batch: int, steps: int, repeats: int, device: torch.device
) -> dict[str, Any]:
    """Seconds of one training epoch of `fit`, from `steps` timed steps (median of repeats)."""
    from nptm.trainables.catalog import DATASETS
    from nptm.trainables.loaders import InMemoryLoader, Loaders
    from nptm.trainables.models import build_model
    from nptm.trainables.recipe import default_recipe
    from nptm.trainables.train_loop import fit

    info = DATASETS[dataset]
    gen = torch.Generator().manual_seed(0)
    shape = (info.in_channels, info.image_size, info.image_size)

    def loader(n: int, train: bool) -> InMemoryLoader:
        images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=gen)
        labels = torch.randint(0, info.num_classes, (n,), generator=gen)
        return InMemoryLoader(
            images, labels, batch_size=batch, train=train, info=info, device=device, seed=0
        )

    test = loader(batch, train=False)
    model = build_model(model_name, dataset, seed=0)
    recipe = default_recipe(dataset, batch_size=batch)

    def timed(n_steps: int) -> float:
        loaders = Loaders(loader(n_steps * batch, train=True), None, test)
        lrs = np.full(n_steps, 0.01)  # small: random labels must not diverge
        return fit(model, loaders, lrs, recipe, epochs=1, device=device, seed=0).history[0].train_s

    timed(2)  # warm-up: kernels, allocator, autotuning
    per_step = _common.median([timed(steps) / steps for _ in range(repeats)])
    steps_per_epoch = math.ceil(info.train_size / batch)
    return {
        "model": model_name,
        "dataset": dataset,
        "batch": batch,
        "steps_timed": steps,
        "steps_per_epoch": steps_per_epoch,
        "seconds_per_epoch": per_step * steps_per_epoch,
        "samples_per_s": batch / per_step,
    }


def check_epoch_seconds(sizes: Sizes, device: torch.device, budget: Deadline) -> dict:
    batches = grid_pairs()
    pairs = sizes.pairs or tuple(sorted(batches, key=lambda p: (p[1], p[0])))
    rows, skipped = [], []
    for model_name, dataset in pairs:
        if rows and budget.left() <= 0:
            skipped.append(f"{model_name}@{dataset}")
            continue
        steps = sizes.epoch_steps.get(dataset, sizes.epoch_steps["default"])
        batch = sizes.epoch_batch or batches[(model_name, dataset)]
        row = epoch_seconds(model_name, dataset, batch, steps, sizes.repeats, device)
        rows.append(row)
        log(f"epoch {model_name}@{dataset} batch {batch}: {row['seconds_per_epoch']:.1f} s")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "method": "fit() over a fixed number of steps on synthetic GPU-resident inputs, median "
        "of repeats, extrapolated to ceil(train_size / batch) steps; training phase only",
        "rows": rows,
        "skipped_for_time": skipped,
    }


# -- 3. packing -------------------------------------------------------------------------------
def _retrain_spec(parent_id: str, model_name: str, seed: int) -> dict[str, Any]:
    from nptm.trainables.recipe import default_recipe
    from nptm.trainables.stage import StageSpec

    return StageSpec(
        kind="retrain", dataset="cifar10", model=model_name, seed=seed,
        recipe=default_recipe("cifar10"), parents=(parent_id,), schedule="ft", budget=1,
    ).to_dict()  # fmt: skip


def prepare_parent(storage: str, model_name: str) -> str:
    """A pruned model in `storage` for retrain stages to start from; returns its stage id."""
    from nptm.trainables.artifacts import ArtifactStore
    from nptm.trainables.models import build_model
    from nptm.trainables.pruners import apply_plan, compute_plan
    from nptm.trainables.recipe import default_recipe
    from nptm.trainables.stage import StageSpec
    from nptm.trainables.stage_runner import MODEL, model_payload

    spec = StageSpec(
        kind="prune", dataset="cifar10", model=model_name, seed=0,
        recipe=default_recipe("cifar10"), parents=("gpu-bench",), pruner="magnitude", ratio=0.5,
    )  # fmt: skip
    model = build_model(model_name, "cifar10", seed=0)
    plan = compute_plan(model, model_name, "magnitude", ratio=0.5, seed=0)
    model = apply_plan(model, plan)
    ArtifactStore(storage).save(spec.id, MODEL, model_payload(spec, model, [plan]))
    return spec.id


def _stage_record(storage: str, stage_id: str, started: float, ended: float) -> dict[str, Any]:
    from nptm.trainables.artifacts import ArtifactStore

    outcome = ArtifactStore(storage).read_outcome(stage_id)
    return {
        "started": started,
        "ended": ended,
        "call_s": ended - started,
        "stage_wall_s": outcome.wall_seconds if outcome else None,
        "loop_s": sum(e.wall_s for e in outcome.epochs) if outcome else 0.0,
        "status": outcome.status.value if outcome else None,
    }


def packing_worker(
    index: int, runtime: StageRuntime, parent_id: str, model_name: str, window_s: float,
    checksums: Any, barrier: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """One trial actor's share: warm up, wait for the others, run stages until the window ends."""
    from nptm.orchestrator.trial import _run_in_this_process
    from nptm.trainables.stage import StageSpec
    from tests.cifar_fixture import accept_checksums

    if torch.cuda.is_available():
        torch.ones(1, device="cuda").sum().item()  # CUDA context before the clock starts
    barrier.wait()
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    with accept_checksums(checksums):
        for i in range(1000):
            if rows and time.time() - t0 >= window_s:
                break
            spec = StageSpec.from_dict(_retrain_spec(parent_id, model_name, 1000 * index + i))
            start = time.time()
            _run_in_this_process(spec, runtime)
            rows.append(_stage_record(runtime.storage, spec.id, start, time.time()))
    return rows


def packed_run(
    n: int, gpus: float, sizes: Sizes, storage: str, parent_id: str, checksums: Any,
    timeout: float,
) -> dict[str, Any]:  # fmt: skip
    from nptm.orchestrator.trial import StageRuntime

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n + 1)
    queue = ctx.Queue()
    cpus = max(1, (os.cpu_count() or 1) // PACKED)  # the same CPU share either way
    runtime = StageRuntime(
        storage=storage, ray_storage=storage, data_root=str(checksums.root), download=False,
        executor="inline", workers_per_trial=1, cpus_per_worker=cpus, gpus_per_worker=gpus,
        plugins=(),
    )  # fmt: skip
    common = dict(
        runtime=runtime,
        parent_id=parent_id,
        model_name=sizes.model,
        window_s=sizes.packing_window_s,
        checksums=checksums,
        barrier=barrier,
    )
    procs = [
        ctx.Process(target=_child, args=(packing_worker, {"index": i, **common}, queue))
        for i in range(n)
    ]  # fmt: skip
    for p in procs:
        p.start()
    sampler = UtilSampler()
    try:
        barrier.wait(timeout=timeout)
        t0 = time.time()
        sampler.start()
        results = [queue.get(timeout=max(1.0, timeout - (time.time() - t0))) for _ in procs]
    finally:
        util = sampler.summary()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    errors = [v for status, v in results if status == "error"]
    if errors:
        raise RuntimeError(errors[0])
    rows = [r for _, worker_rows in results for r in worker_rows]
    window = max(r["ended"] for r in rows) - t0
    outside = [r["stage_wall_s"] - r["loop_s"] for r in rows if r["stage_wall_s"] is not None]
    return {
        "processes": n,
        "gpus_per_worker": gpus,
        "cpus_per_worker": cpus,
        "stages": len(rows),
        "window_s": window,
        "stages_per_hour": len(rows) / window * 3600,
        "median_stage_s": _common.median([r["call_s"] for r in rows]),
        "median_loop_s": _common.median([r["loop_s"] for r in rows]),
        "median_outside_loop_s": _common.median(outside),
        "all_ok": all(r["status"] == "ok" for r in rows),
        "gpu_util": util,
    }


def check_packing(sizes: Sizes, files: Any, budget: Deadline, work: Path) -> dict:
    storage = str(work / "packing-store")
    parent_id = prepare_parent(storage, sizes.model)
    checksums = _checksums_only(files)
    out: dict[str, Any] = {
        "what": f"process-level packing: {sizes.packed} OS processes each running the inline "
        "executor's in-process stage path on one GPU (what gpus_per_worker 0.25 gives under "
        "Ray), not through `nptm sweep`",
        "stage": f"retrain {sizes.model} cifar10 magnitude 0.5, ft, 1 epoch of {sizes.n_train}",
        "ray": "installed (not used by this script)"
        if importlib.util.find_spec("ray")
        else "ray not installed",
    }
    for key, n, gpus in (("alone", 1, 1.0), ("packed", sizes.packed, 1 / PACKED)):
        if key == "packed" and budget.left() <= 0:
            out[key] = {"skipped": "time budget spent"}
            continue
        timeout = sizes.packing_window_s * 2 + 90
        out[key] = packed_run(n, gpus, sizes, storage, parent_id, checksums, timeout)
        log(f"packing {key}: {out[key]['stages_per_hour']:,.0f} stages/h, "
            f"util {out[key]['gpu_util']}")  # fmt: skip
    if "stages_per_hour" in out.get("packed", {}):
        out["packed_over_alone"] = out["packed"]["stages_per_hour"] / out["alone"][
            "stages_per_hour"]  # fmt: skip
    return out


# -- 4. a 1-rank DDP stage --------------------------------------------------------------------
def ddp_worker(storage: str, parent_id: str, model_name: str, checksums: Any) -> dict[str, Any]:
    """What a `train`-executor rank does once Ray Train has set up its process group."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from nptm.trainables.models import build_model
    from nptm.trainables.stage import StageSpec
    from nptm.trainables.stage_runner import WorkerEnv, run_stage
    from tests.cifar_fixture import accept_checksums

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"  # as Ray Train's TorchConfig in orchestrator/trial.py
    device = torch.device("cuda:0" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    t = time.time()
    # A TCP store as Ray Train's, bound to a port the OS picks (no port chosen in advance that
    # another process could take first).
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    out: dict[str, Any] = {"backend": backend, "init_s": time.time() - t}
    try:
        spec = StageSpec.from_dict(_retrain_spec(parent_id, model_name, seed=99))
        env = WorkerEnv(storage=storage, data_root=str(checksums.root), device=str(device))
        start = time.time()
        with accept_checksums(checksums):
            run_stage(spec, env)
        out["stage"] = _stage_record(storage, spec.id, start, time.time())
        x = torch.full((4,), 3.0, device=device)
        dist.all_reduce(x)
        out["all_reduce_ok"] = bool((x == 3.0).all())  # one rank: the sum is the input
        # fit() wraps in DDP only with more than one rank; one rank shows NCCL + DDP work here.
        model = build_model(model_name, "cifar10", seed=0).to(device)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        loss = F.cross_entropy(ddp(torch.randn(8, 3, 32, 32, device=device)),
                               torch.zeros(8, dtype=torch.long, device=device))  # fmt: skip
        loss.backward()
        out["ddp_step_ok"] = all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()
    return out


def check_ddp(sizes: Sizes, files: Any, budget: Deadline, work: Path) -> dict:
    storage = str(work / "ddp-store")
    parent_id = prepare_parent(storage, sizes.model)
    out = run_isolated(
        ddp_worker, budget.left(), storage=storage, parent_id=parent_id, model_name=sizes.model,
        checksums=_checksums_only(files),
    )  # fmt: skip
    s = out["stage"]
    out["outside_loop_s"] = (s["stage_wall_s"] or 0.0) - s["loop_s"]
    out["ray_train_overhead"] = (
        "not measured: ray not installed"
        if importlib.util.find_spec("ray") is None
        else "not measured by this script (see bench/overhead.py)"
    )
    return out


def check_compile(sizes: Sizes, device: torch.device, budget: Deadline) -> dict:
    return run_isolated(
        bare_rate, budget.left(), model_name=sizes.model, device=str(device),
        batch=sizes.bare_batch, steps=sizes.bare_steps, repeats=sizes.repeats, bf16=True,
        channels_last=device.type == "cuda", compile_backend=sizes.compile_backend,
    ) | {"backend": sizes.compile_backend}  # fmt: skip


# -- report -----------------------------------------------------------------------------------
def figures(results: dict[str, Any]) -> dict[str, Any]:
    """What `nptm plan` reads (orchestrator/gpu_figures.json)."""
    rows = results.get("epoch_seconds", {}).get("rows", [])
    return {
        "gpu": results["machine"].get("gpu"),
        "measured_on": results["date"],
        "torch": results["machine"].get("torch"),
        "method": results.get("epoch_seconds", {}).get("method"),
        "seconds_per_epoch": [
            {k: r[k] for k in ("model", "dataset", "batch", "seconds_per_epoch")} for r in rows
        ],
    }


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    dry = " (DRY RUN)" if results["dry_run"] else ""
    lines = [
        f"GPU checks{dry}: {m.get('gpu', 'no GPU')}, torch {m.get('torch')}, "
        f"{results['date']}, {results['wall_s']:.0f} s",
        "",
        "| check | what | figure |",
        "|---|---|---:|",
    ]

    def row(check: str, what: str, figure: str) -> None:
        lines.append(f"| {check} | {what} | {figure} |")

    for name in CHECKS:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r or "skipped" in r:
            row(name, "FAILED" if "error" in r else "skipped", r.get("skipped", "see gpu.json"))
            continue
        if name == "throughput":
            for k, v in r["samples_per_s"].items():
                row(name, f"{r['model']} {k}, samples/s", f"{v:,.0f}")
            for k, v in r["bare"].items():
                row(name, f"bare steps {k}, samples/s", f"{v['samples_per_s']:,.0f}")
            verdict = "met" if r["met"] else "MISSED"
            row(name, f"nptm / {r['reference']} (target >= {TARGET_RATIO:g}x)",
                f"{r['ratio']:.2f}x {verdict}")  # fmt: skip
        elif name == "epoch_seconds":
            for e in r["rows"]:
                row("s/epoch", f"{e['model']}@{e['dataset']} batch {e['batch']}",
                    f"{e['seconds_per_epoch']:,.1f}")  # fmt: skip
        elif name == "packing":
            for k in ("alone", "packed"):
                p = r.get(k, {})
                if "stages_per_hour" in p:
                    util = p["gpu_util"].get("mean_pct")
                    util_s = "n/a" if util is None else f"{util:.0f}%"
                    row(name, f"{k} ({p['processes']} proc), stages/h; mean GPU util",
                        f"{p['stages_per_hour']:,.0f}; {util_s}")  # fmt: skip
            if "packed_over_alone" in r:
                row(name, "packed / alone", f"{r['packed_over_alone']:.2f}x")
            row(name, "ray", r["ray"])
        elif name == "ddp":
            ok = r["all_reduce_ok"] and r["ddp_step_ok"]
            row(
                name,
                f"1-rank {r['backend']} stage: time outside the loop",
                f"{r['outside_loop_s']:.2f} s; collectives {'ok' if ok else 'FAILED'}",
            )
            row(name, "Ray Train overhead", r["ray_train_overhead"])
        elif name == "compile":
            row("throughput", f"bare steps bf16+channels_last+compile ({r['backend']}), "
                "samples/s; warm-up incl. compile", f"{r['samples_per_s']:,.0f}; "
                f"{r['warmup_s']:.0f} s")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory for gpu.json, gpu.md, gpu_figures.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, same code paths")
    p.add_argument(
        "--write-figures",
        action="store_true",
        help=f"also write the per-epoch figures to {FIGURES.relative_to(_common.ROOT)}",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"seconds for all checks (default {BUDGET_S:g}, dry run 3600); "
        "later checks are skipped once spent",
    )
    p.add_argument(
        "--checks",
        default=",".join(CHECKS),
        help=f"comma-separated subset of {','.join(CHECKS)} (default: all, in that order)",
    )
    args = p.parse_args(argv)
    wanted = [c for c in args.checks.split(",") if c]
    unknown = sorted(set(wanted) - set(CHECKS))
    if unknown or not wanted:
        print(f"--checks: {args.checks!r} names no check or unknown ones {unknown}; "
              f"choose from {','.join(CHECKS)}", file=sys.stderr)  # fmt: skip
        return 2
    if args.write_figures and "epoch_seconds" not in wanted:
        print("--write-figures: needs the epoch_seconds check", file=sys.stderr)
        return 2
    if args.dry_run and args.write_figures:
        print("--write-figures: not with --dry-run (CPU figures are no GPU figures)",
              file=sys.stderr)  # fmt: skip
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device is visible (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or pass --dry-run to exercise it on the CPU",
              file=sys.stderr)  # fmt: skip
        return 2
    sizes = Sizes.dry() if args.dry_run else Sizes()
    if args.budget_s is None:  # the dry run exercises every check, however slow the CPU
        args.budget_s = 3600.0 if args.dry_run else BUDGET_S
    device = torch.device("cpu" if args.dry_run else "cuda:0")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    whole = Deadline(args.budget_s)
    results: dict[str, Any] = {
        "machine": _common.machine(),
        "date": dt.date.today().isoformat(),
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
    }
    log(_common.machine_line(results["machine"]))
    from tests.cifar_fixture import write_cifar10

    with tempfile.TemporaryDirectory(prefix="nptm-gpu-") as tmp:
        work = Path(tmp)
        files = write_cifar10(work / "data", n_train=sizes.n_train, n_test=sizes.n_test, seed=0)
        log(f"wrote {sizes.n_train:,} CIFAR-10 images in the on-disk format")
        checks: list[tuple[str, float, Callable[[Deadline], dict]]] = [
            ("throughput", sizes.throughput_s, lambda d: check_throughput(sizes, files, device, d)),
            ("epoch_seconds", sizes.epoch_s, lambda d: check_epoch_seconds(sizes, device, d)),
            ("packing", sizes.packing_s, lambda d: check_packing(sizes, files, d, work)),
            ("ddp", sizes.ddp_timeout_s, lambda d: check_ddp(sizes, files, d, work)),
            ("compile", sizes.compile_timeout_s, lambda d: check_compile(sizes, device, d)),
        ]
        for name, seconds, check in checks:
            if name not in wanted:
                continue
            if whole.left() <= 0:
                results[name] = {"skipped": "the run's --budget-s was spent"}
                log(f"{name}: skipped (budget spent)")
                continue
            log(f"{name}: start (budget {seconds:.0f} s, {whole.left():.0f} s left in the run)")
            try:
                # A check may run GRACE_S past the run's budget: the last one still gets a go.
                results[name] = check(Deadline(min(seconds, whole.left() + GRACE_S)))
            except Exception:  # one broken check must not cost the others
                results[name] = {"error": traceback.format_exc(limit=8)}
                log(f"{name}: FAILED\n{results[name]['error']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results["wall_s"] = time.monotonic() - started
    fig = figures(results)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.out / "gpu_figures.json").write_text(json.dumps(fig, indent=1) + "\n")
    if args.write_figures:
        FIGURES.write_text(json.dumps(fig, indent=1) + "\n")
    md = markdown(results)
    (args.out / "gpu.md").write_text(md + "\n")
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    log(f"done in {results['wall_s']:.0f} s; failed checks: {failed or 'none'}")
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
