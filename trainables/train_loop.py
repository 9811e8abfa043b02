"""The one SGD loop behind pre-training, retraining and training from scratch.

It runs single-process or as one worker of a DistributedDataParallel group (e.g. under Ray
Train): when `torch.distributed` is initialised with more than one process, the model is wrapped
in DDP (gloo on CPU, NCCL with `device_ids` on CUDA), each rank trains on its shard of every
batch (the loaders shard by rank), and all metrics are all-reduced (sums of loss * count, of
correct predictions and of counts), so every rank computes the same global numbers. Only rank 0
calls `checkpoint`; every rank then calls `on_epoch` with the same metrics, once per completed
epoch (Ray Train's `report` is a barrier that every rank must reach).

Reproducibility: `seed` fixes the data order and the augmentation (through the loaders) and the
global torch RNG, which is reseeded from (seed, epoch, rank) at the start of every epoch so that
dropout-like randomness is the same in an interrupted-and-resumed run as in a straight one, on
every rank. Model initialisation is the caller's business (build_model(seed=...)).

Pruned models: `torch.nn.utils.prune` keeps `weight_orig` as the parameter and `weight_mask` as
a buffer, and recomputes `weight = weight_orig * weight_mask` before every forward. Momentum
and weight decay may move pruned entries of `weight_orig`, but the mask zeroes them in the
weight the network uses, so a pruned weight never comes back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nptm.trainables.loaders import BatchLoader, Loaders
from nptm.trainables.recipe import Recipe
from nptm.trainables.stage import EpochMetrics

__all__ = ["Diverged", "EpochMetrics", "FitResult", "evaluate", "fit"]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")

# Finiteness of the loss is checked every this many steps (and at the end of the epoch); on the
# CPU every step, on accelerators in windows so that the check does not stall the queue.
_CHECK_EVERY = {"cpu": 1}
_CHECK_EVERY_DEFAULT = 16


class Diverged(RuntimeError):
    """The training loss became NaN or infinite.

    `epoch` is the 0-based index of the epoch in progress (= epochs completed before it),
    `step` the 0-based step within that epoch, `loss` the first non-finite loss.
    """

    def __init__(self, epoch: int, step: int, loss: float) -> None:
        super().__init__(
            f"training diverged: loss {loss} at step {step} of epoch {epoch} (0-based)"
        )
        self.epoch, self.step, self.loss = epoch, step, loss

    def __reduce__(self) -> tuple[type, tuple[int, int, float]]:  # picklable across processes
        return (Diverged, (self.epoch, self.step, self.loss))


@dataclass(frozen=True)
class FitResult:
    history: list[EpochMetrics]
    test_acc: float  # after the last epoch: the headline figure
    test_loss: float
    best_val_epoch: int | None  # epoch (1-based) of the best validation accuracy
    test_acc_at_best_val: float | None
    best_test_acc_over_epochs: float  # selected on test data: for diagnostics only
    train_seconds: float  # wall time of all epochs, evaluation included
    samples_per_second: float  # training samples / time in the training phases


def fit(
    model: nn.Module,
    loaders: Loaders,
    lr_per_step: np.ndarray,
    recipe: Recipe,
    *,
    epochs: int,
    device: torch.device | str,
    seed: int,
    start_epoch: int = 0,
    resume_state: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
    weight_decay: float | None = None,
    precision: str = "fp32",
    momentum_per_step: np.ndarray | None = None,
) -> FitResult:
    """Train `model` in place for epochs start_epoch..epochs-1 and evaluate after each.

    `lr_per_step` holds the lr of every optimizer step of the whole run (epochs *
    len(loaders.train) values); step s of epoch e uses lr_per_step[e * steps + s]. SGD momentum,
    nesterov and weight decay come from `recipe` (`weight_decay` overrides the latter);
    `momentum_per_step`, when given (the `clr` schedule's cycling), sets the momentum of every
    step the same way `lr_per_step` sets the lr.
    `precision` "fp32" (default) runs in full precision; "bf16" runs forward passes under
    bfloat16 autocast on the training device (training and evaluation alike).

    `checkpoint(epoch, state)` receives, after each epoch, state = {"model": state_dict,
    "optimizer": state_dict, "epoch": epochs completed, "rng": {"cpu": ..., ["cuda": ...]},
    "history": [EpochMetrics as dicts]}, copied to the CPU and safe for
    torch.save / torch.load(weights_only=True). Passing it back as `resume_state` continues the
    run (bit-identical to an uninterrupted run on the CPU); "rng" is a record only, the loop
    reseeds every epoch. Raises Diverged as soon as a loss is not finite.
    """
    device = torch.device(device)
    if not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs: {epochs!r} must be a positive integer")
    steps = len(loaders.train)
    if steps == 0:
        raise ValueError("loaders.train: yields no batch per epoch")
    lrs = np.asarray(lr_per_step, dtype=np.float64)
    if lrs.ndim != 1 or len(lrs) != epochs * steps:
        raise ValueError(
            f"lr_per_step: {lrs.size} values of shape {lrs.shape}, but epochs={epochs} x "
            f"{steps} steps per epoch needs {epochs * steps}"
        )
    if not np.isfinite(lrs).all() or (lrs < 0).any():
        raise ValueError("lr_per_step: every learning rate must be finite and >= 0")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {list(PRECISIONS)}")
    moms = None
    if momentum_per_step is not None:
        moms = np.asarray(momentum_per_step, dtype=np.float64)
        if moms.shape != lrs.shape:
            raise ValueError(
                f"momentum_per_step: shape {moms.shape}, but lr_per_step has {lrs.shape}"
            )
        if not np.isfinite(moms).all() or (moms < 0).any() or (moms >= 1).any():
            raise ValueError("momentum_per_step: every momentum must be in [0, 1)")
    rank, world = _dist_rank_world()
    _check_sharding(loaders, rank, world)

    history: list[EpochMetrics] = []
    first = start_epoch
    if resume_state is not None:
        first = int(resume_state["epoch"])
        if start_epoch not in (0, first):
            raise ValueError(
                f"start_epoch: {start_epoch} contradicts resume_state['epoch'] = {first}"
            )
        history = [EpochMetrics(**m) for m in resume_state.get("history", [])]
    if not 0 <= first <= epochs:
        raise ValueError(f"start_epoch: {first} is outside [0, epochs={epochs}]")

    cuda = device.type == "cuda"
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=float(lrs[0]),
        momentum=recipe.momentum,
        nesterov=recipe.uses_nesterov,
        weight_decay=recipe.weight_decay if weight_decay is None else weight_decay,
    )
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
    net: nn.Module = model
    if world > 1:
        ids = None
        if cuda:
            ids = [device.index if device.index is not None else torch.cuda.current_device()]
        net = DistributedDataParallel(model, device_ids=ids)
    check_every = _CHECK_EVERY.get(device.type, _CHECK_EVERY_DEFAULT)

    for epoch in range(first, epochs):
        t0 = time.perf_counter()
        loaders.train.set_epoch(epoch)
        torch.manual_seed(_epoch_seed(seed, epoch, rank))
        net.train()
        losses = torch.zeros(steps, dtype=torch.float32, device=device)
        counts = torch.zeros(steps, dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        checked = 0
        n_steps = 0
        for i, (x, y) in enumerate(loaders.train):
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[epoch * steps + i])
                if moms is not None:
                    group["momentum"] = float(moms[epoch * steps + i])
            x, y = _to_device(x, y, device)
            with _autocast(device, precision):
                out = net(x)
                loss = F.cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses[i] = loss.detach()
            counts[i] = len(y)
            correct += (out.argmax(1) == y).sum()
            n_steps = i + 1
            if n_steps - checked >= check_every:
                _raise_if_diverged(losses, checked, n_steps, epoch, world, device)
                checked = n_steps
        if n_steps != steps:
            raise RuntimeError(f"loaders.train: yielded {n_steps} batches, len() said {steps}")
        _raise_if_diverged(losses, checked, n_steps, epoch, world, device)
        train_sums = _all_reduce(
            torch.stack([(losses.double() * counts).sum(), correct, counts.sum()]), world
        )
        if cuda:
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - t0

        val = None if loaders.val is None else evaluate(model, loaders.val, device, precision)
        test = evaluate(model, loaders.test, device, precision)
        loss_sum, n_correct, n_seen = train_sums.tolist()
        metrics = EpochMetrics(
            epoch=epoch + 1,
            lr=float(lrs[(epoch + 1) * steps - 1]),
            train_loss=loss_sum / n_seen,
            train_acc=n_correct / n_seen,
            val_loss=None if val is None else val[0],
            val_acc=None if val is None else val[1],
            test_loss=test[0],
            test_acc=test[1],
            wall_s=time.perf_counter() - t0,
            samples=round(n_seen),
            train_s=train_s,
        )
        history.append(metrics)
        if rank == 0 and checkpoint is not None:
            checkpoint(epoch + 1, _state(model, optimizer, epoch + 1, history, device))
        if on_epoch is not None:
            on_epoch(metrics)

    if not history:
        raise ValueError(f"start_epoch: {first} = epochs, nothing to train and no history")
    return _result(history)


def evaluate(
    model: nn.Module, loader: BatchLoader, device: torch.device | str, precision: str = "fp32"
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` over the split behind `loader`.

    Under torch.distributed with several processes, each rank passes the plain module (not a
    DDP wrapper: no collectives run while ranks hold shards of different lengths) and its own
    shard, and the sums are all-reduced, so every rank returns the figures of the whole split.
    The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    _, world = _dist_rank_world()
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad(), _autocast(device, precision):
        for x, y in loader:
            x, y = _to_device(x, y, device)
            out = model(x)
            sums[0] += F.cross_entropy(out.float(), y, reduction="sum").double()
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += len(y)
    model.train(was_training)
    loss_sum, n_correct, n_seen = _all_reduce(sums, world).tolist()
    if n_seen == 0:
        raise ValueError("loader: yields no sample on any rank")
    return loss_sum / n_seen, n_correct / n_seen


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(
    x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _raise_if_diverged(
    losses: torch.Tensor, lo: int, hi: int, epoch: int, world: int, device: torch.device
) -> None:
    """Raise Diverged with the first non-finite loss among steps lo..hi-1 of any rank."""
    if hi <= lo:
        return
    bad = ~torch.isfinite(losses[lo:hi])
    sentinel = hi - lo
    first = torch.where(bad.any(), bad.int().argmax(), sentinel).to(torch.int64)
    # Every rank stops at the same step: each needs the others' verdict before the next
    # collective, or a rank that carried on would wait forever.
    first = _all_reduce(first.view(1), world, op=dist.ReduceOp.MIN)
    k = int(first.item())
    if k < sentinel:
        raise Diverged(epoch, lo + k, float(losses[lo + k].item()))


def _all_reduce(
    t: torch.Tensor, world: int, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t, op=op)
    return t


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_sharding(loaders: Loaders, rank: int, world: int) -> None:
    for name in ("train", "val", "test"):
        loader = getattr(loaders, name)
        if loader is None:
            continue
        got = (getattr(loader, "rank", 0), getattr(loader, "world_size", 1))
        if got != (rank, world):
            raise ValueError(
                f"loaders.{name}: built for rank {got[0]} of {got[1]}, but this process is "
                f"rank {rank} of {world}; pass rank and world_size to make_loaders"
            )


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, 0x5EED]).generate_state(1)[0])


def _cpu_copy(obj: Any) -> Any:
    """Deep copy with every tensor cloned to the CPU: the caller may keep the state while
    training goes on mutating the live tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: list[EpochMetrics],
    device: torch.device,
) -> dict[str, Any]:
    rng: dict[str, torch.Tensor] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {
        "model": _cpu_copy(model.state_dict()),
        "optimizer": _cpu_copy(optimizer.state_dict()),
        "epoch": epoch,
        "rng": rng,
        "history": [asdict(m) for m in history],
    }


def _result(history: list[EpochMetrics]) -> FitResult:
    last = history[-1]
    best_val_epoch = test_at_best_val = None
    with_val = [m for m in history if m.val_acc is not None]
    if with_val:
        # Highest validation accuracy; ties go to the lower validation loss, then the earlier.
        best = min(with_val, key=lambda m: (-m.val_acc, m.val_loss, m.epoch))  # type: ignore[operator]
        best_val_epoch, test_at_best_val = best.epoch, best.test_acc
    train_phase = sum(m.train_s for m in history)
    return FitResult(
        history=list(history),
        test_acc=last.test_acc,
        test_loss=last.test_loss,
        best_val_epoch=best_val_epoch,
        test_acc_at_best_val=test_at_best_val,
        best_test_acc_over_epochs=max(m.test_acc for m in history),
        train_seconds=sum(m.wall_s for m in history),
        samples_per_second=sum(m.samples for m in history) / train_phase if train_phase else 0.0,
    )
