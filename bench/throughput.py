"""Training throughput (samples/s) of nptm's train loop against a paper-style reference loop.

nptm: `nptm.trainables.train_loop.fit` on `make_loaders` of a CIFAR-10 split loaded by
`nptm.trainables.datasets.load_dataset` (the in-memory path: uint8 tensors on the device, batched
crop + flip + normalise). Its figure is the training phase of each epoch (`EpochMetrics.train_s`,
evaluation excluded).

reference: what the paper's code does: `torchvision.datasets.CIFAR10` with the PIL transforms
RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize behind a shuffling
`torch.utils.data.DataLoader` (num_workers 2, as the paper's code, and 0), then a standard SGD
loop (forward, cross-entropy, zero_grad, backward, step, `loss.item()` every step). One epoch is
timed from creating the DataLoader iterator (worker start-up included, as in that code) to the
last step.

Both read the same CIFAR-10 files (written by tests/cifar_fixture.py in the official on-disk
format), train the same model from the same initialisation with the same optimiser (SGD,
momentum 0.9, nesterov, weight decay 1e-4), batch 128, the same intra-op thread count.
A third loop, `bare`, runs the bare SGD steps over batches made beforehand (no input pipeline,
no bookkeeping): the ceiling for any loop on this model and machine.
Variants run interleaved, one epoch at a time, round-robin with the order rotated each round,
so load from other processes hits all of them alike; figures are medians over rounds.
On CUDA the nptm loop uses channels_last + bf16 autocast (its normal CUDA path); the reference
stays fp32 NCHW with pinned memory, as the paper's code. Target: nptm >= 1.5x the reference
for ResNet-20 on CPU.

    .venv/bin/python bench/throughput.py [--quick] [--json] [--models resnet20,resnet56]
        [--n-train 1280] [--rounds 3] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

import _common
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TARGET_RATIO = 1.5  # nptm vs the paper's loop (2 workers), ResNet-20, CPU
BATCH = 128
PAPER_WORKERS = 2


def reference_loader(
    root: str, *, workers: int, device: torch.device, seed: int, batch: int = BATCH
) -> Any:
    """The paper's CIFAR-10 training pipeline: PIL transforms in DataLoader workers."""
    from torchvision import datasets
    from torchvision import transforms as T

    from nptm.trainables.catalog import DATASETS

    info = DATASETS["cifar10"]
    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(info.mean, info.std),
        ]
    )
    dataset = datasets.CIFAR10(root, train=True, transform=transform, download=False)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )


def reference_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, device: torch.device
) -> tuple[int, float, float]:
    """One training epoch the standard way: (samples, seconds, seconds to the first batch)."""
    model.train()
    seen, loss_sum, correct = 0, 0.0, 0
    t0 = time.perf_counter()
    first = None
    for x, y in loader:
        if first is None:
            first = time.perf_counter() - t0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
    _sync(device)
    return seen, time.perf_counter() - t0, first or 0.0


def nptm_epoch(
    model: nn.Module,
    loaders: Any,
    recipe: Any,
    device: torch.device,
    seed: int,
    precision: str = "fp32",
) -> tuple[int, float]:
    """One epoch of nptm.trainables.train_loop.fit: (samples, seconds of the training phase)."""
    from nptm.trainables.train_loop import fit

    steps = len(loaders.train)
    result = fit(
        model, loaders, np.full(steps, 0.1), recipe, epochs=1, device=device, seed=seed,
        precision=precision,
    )  # fmt: skip
    m = result.history[0]
    return m.samples, m.train_s


def bare_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list,
    device: torch.device,
    bf16: bool = False,
) -> tuple[int, float, float]:
    """Forward, loss, backward, step over batches already normalised on the device: no data
    pipeline, no bookkeeping. The ceiling any training loop of this model can reach.
    `bf16`: forward and loss under bfloat16 autocast."""
    model.train()
    seen = 0
    t0 = time.perf_counter()
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
    _sync(device)
    return seen, time.perf_counter() - t0, 0.0


def data_only(loader: Any, device: torch.device) -> float:
    """Samples/s of iterating `loader` for one epoch with no model (the input pipeline alone)."""
    t0 = time.perf_counter()
    n = 0
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        n += len(x)
    _sync(device)
    return n / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer(model: nn.Module, recipe: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(),
        lr=0.1,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
    )


def _warm_up(
    model: nn.Module,
    device: torch.device,
    channels_last: bool,
    batch: int = BATCH,
    bf16: bool | None = None,
) -> None:
    """Two steps on random data: one-off kernel and allocator set-up stays out of the timing.
    `bf16` (default: as `channels_last`, nptm's former CUDA path) warms the autocast kernels."""
    bf16 = channels_last if bf16 is None else bf16
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(2):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
    opt.zero_grad(set_to_none=True)
    _sync(device)


def measure(
    models: list[str],
    *,
    n_train: int,
    rounds: int,
    workers: list[int],
    device: torch.device,
    threads: int,
) -> dict[str, Any]:
    """Interleaved epochs of every variant for each model; medians per variant."""
    from nptm.trainables.datasets import load_dataset
    from nptm.trainables.loaders import make_loaders
    from nptm.trainables.models import build_model
    from nptm.trainables.recipe import default_recipe
    from tests.cifar_fixture import accept_checksums, write_cifar10

    torch.set_num_threads(threads)
    recipe = default_recipe("cifar10", batch_size=BATCH)
    out: dict[str, Any] = {"models": {}}
    with tempfile.TemporaryDirectory() as root:
        files = write_cifar10(root, n_train=n_train, n_test=BATCH, seed=0)
        with accept_checksums(files):  # torchvision checks md5s when a dataset is built
            bundle = load_dataset("cifar10", root)
            refs = {w: reference_loader(root, workers=w, device=device, seed=0) for w in workers}
        loaders = make_loaders(bundle, batch_size=BATCH, device=device, seed=0)

        # The input pipelines alone (no model), interleaved too.
        pipe: dict[str, list[float]] = {}
        for r in range(max(2, rounds)):
            loaders.train.set_epoch(r)
            pipe.setdefault("nptm", []).append(data_only(loaders.train, device))
            for w in workers:
                pipe.setdefault(f"ref-w{w}", []).append(data_only(refs[w], device))
        out["data_only"] = {k: _common.median(v) for k, v in pipe.items()}

        for name in models:
            runners: dict[str, Callable[[int], tuple[int, float, float]]] = {}
            nptm_model = build_model(name, "cifar10", seed=0).to(device)
            if device.type == "cuda":
                nptm_model = nptm_model.to(memory_format=torch.channels_last)
            _warm_up(nptm_model, device, channels_last=device.type == "cuda")

            def run_nptm(r: int, m: nn.Module = nptm_model) -> tuple[int, float, float]:
                n, s = nptm_epoch(m, loaders, recipe, device, seed=r)
                return n, s, 0.0

            runners["nptm"] = run_nptm
            bare_model = build_model(name, "cifar10", seed=0).to(device)
            _warm_up(bare_model, device, channels_last=False)
            bare_opt = _optimizer(bare_model, recipe)
            loaders.train.set_epoch(0)
            batches = list(loaders.train)  # materialised once: augmentation is not timed

            def run_bare(
                r: int, m: nn.Module = bare_model, o: Any = bare_opt, b: list = batches
            ) -> tuple[int, float, float]:
                return bare_epoch(m, o, b, device)

            runners["bare"] = run_bare
            for w in workers:
                ref_model = build_model(name, "cifar10", seed=0).to(device)
                _warm_up(ref_model, device, channels_last=False)
                opt = _optimizer(ref_model, recipe)

                def run_ref(
                    r: int, m: nn.Module = ref_model, o: Any = opt, loader: Any = refs[w]
                ) -> tuple[int, float, float]:
                    return reference_epoch(m, o, loader, device)

                runners[f"ref-w{w}"] = run_ref
            samples: dict[str, list[float]] = {k: [] for k in runners}
            first: dict[str, list[float]] = {k: [] for k in runners}
            order = list(runners)
            for r in range(rounds):
                k = r % len(order)
                for key in order[k:] + order[:k]:  # rotate: nobody always goes first
                    n, s, f = runners[key](r)
                    samples[key].append(n / s)
                    first[key].append(f)
            out["models"][name] = {
                key: {
                    "samples_per_s": _common.median(v),
                    "min": min(v),
                    "max": max(v),
                    "first_batch_s": _common.median(first[key]),
                }
                for key, v in samples.items()
            }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--n-train", type=int, default=1280, help="training images (default 1280)")
    p.add_argument("--rounds", type=int, default=3, help="epochs per variant (default 3)")
    p.add_argument("--workers", default=f"{PAPER_WORKERS},0", help="reference num_workers")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    n_train, rounds = args.n_train, args.rounds
    if args.quick:
        models, n_train, rounds = models[:1], 2 * BATCH, 1
    device = torch.device(args.device)
    workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(args.threads)
    info = _common.machine()
    res = measure(
        models, n_train=n_train, rounds=rounds, workers=workers, device=device,
        threads=args.threads,
    )  # fmt: skip
    print(_common.machine_line(info))
    print(
        f"device {device}, {args.threads} intra-op thread(s), batch {BATCH}, {n_train:,} "
        f"training images, {rounds} interleaved epoch(s) per variant (median)"
    )
    rows = []
    ratios: dict[str, dict[str, float]] = {}
    for name, variants in res["models"].items():
        base = variants["nptm"]["samples_per_s"]
        ratios[name] = {}
        for key, v in variants.items():
            ratio = base / v["samples_per_s"]
            if key != "nptm":
                ratios[name][key] = ratio
            rows.append(
                [name, key, v["samples_per_s"], v["min"], v["max"],
                 v["first_batch_s"] if key.startswith("ref") else float("nan"), ratio]
            )  # fmt: skip
    print(
        _common.table(["model", "loop", "samples/s", "min", "max", "1st batch s", "nptm x"], rows)
    )
    print(
        "bare = forward/backward/step over pre-made batches (no input pipeline): the ceiling; "
        "'nptm x' against it is the share of that ceiling nptm reaches"
    )
    d = res["data_only"]
    print(
        "input pipeline alone (samples/s): "
        + ", ".join(f"{k} {v:,.0f}" for k, v in d.items())
        + " | nptm x: "
        + ", ".join(f"{k} {d['nptm'] / v:.1f}" for k, v in d.items() if k != "nptm")
    )
    verdict = None
    paper = f"ref-w{PAPER_WORKERS}"
    if "resnet20" in ratios and paper in ratios["resnet20"] and device.type == "cpu":
        got = ratios["resnet20"][paper]
        verdict = got >= TARGET_RATIO
        _common.print_target(
            f"ResNet-20 on CPU, nptm >= {TARGET_RATIO:g}x the paper's loop "
            f"({PAPER_WORKERS} workers)",
            f"{got:.2f}x",
            verdict,
        )
    result = {
        "machine": info,
        "device": str(device),
        "threads": args.threads,
        "n_train": n_train,
        "rounds": rounds,
        **res,
        "ratios": ratios,
        "target_met": verdict,
    }
    _common.emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
