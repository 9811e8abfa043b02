"""The batch loaders the train loop consumes.

Two paths behind one interface (`set_epoch`, `__iter__` yielding `(x, y)` on the training device,
`__len__` = batches per epoch for this rank, `rank`, `world_size`):

- In-memory (digits, CIFAR): the whole split lives as a uint8 NCHW tensor ON THE TRAINING DEVICE
  (`InMemoryLoader`). Batches are gathered, augmented (random crop after zero padding, horizontal
  flip) and normalised as whole-batch tensor ops; no per-sample Python or PIL work.
- torchvision (ImageNet): `ImageFolder` + the standard transforms behind a `DataLoader` with a
  `DistributedSampler` (`TorchvisionLoader`).

Data order. Training order of epoch `e` is `torch.randperm(N)` from a CPU `torch.Generator`
seeded with `order_seed(seed) + e`, identical on every rank; rank r takes positions r, r + W,
r + 2W, ... of it, after padding the permutation by wrapping around to a multiple of the world
size W (drop_last=False) or truncating it (drop_last=True). That is exactly what
`DistributedSampler(seed=order_seed(seed))` does, which the ImageNet path uses, so both paths
visit the same indices. `order_seed(seed) = seed * 2**20` keeps the per-epoch seeds of different
run seeds apart (DistributedSampler's plain `seed + epoch` would give seed 1 the order of seed 0
shifted by one epoch). With padding, up to W - 1 samples are seen twice per epoch, so every rank
runs the same number of steps, which DDP requires.

Batch size. `make_loaders` takes the recipe's batch size as the GLOBAL batch of one optimizer
step and gives each of the W ranks batch_size / W of it. Rank r's step k then holds positions
r, r + W, ... of the k-th block of batch_size positions of the (padded) permutation, so the W
ranks of step k together see exactly the samples a single process sees at step k, and the
number of steps per epoch is the same for any W that divides the batch.

Evaluation loaders neither shuffle nor augment nor pad: rank r takes indices r, r + W, ... of the
split, the ranks' shards partition it, and the train loop all-reduces sums of loss, correct
predictions and sample counts, so the reduced metrics are exactly those of the whole split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from nptm.trainables.catalog import DatasetInfo
from nptm.trainables.datasets import (
    Batch,
    DataBundle,
    Split,
    TensorSplit,
    channel_stats,
    check_positive,
    crop_flip,
    normalize_with,
)

_EPOCH_STRIDE = 1 << 20  # order_seed(seed) + epoch never collides across seeds below 2**20 epochs


def order_seed(seed: int) -> int:
    """Base seed of the data order: epoch `e` uses `order_seed(seed) + e`, as DistributedSampler."""
    return seed * _EPOCH_STRIDE


def _augmentation_seed(seed: int, epoch: int, rank: int) -> int:
    # Well-mixed and distinct per (seed, epoch, rank): each rank crops its own shard differently.
    return int(np.random.SeedSequence([seed, epoch, rank, 0xA0]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# Loaders


class BatchLoader(Protocol):
    rank: int
    world_size: int

    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...


def shard_positions(
    n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int,
    drop_last: bool = False, pad: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Dataset indices rank `rank` visits in epoch `epoch` (see the module docstring)."""
    if shuffle:
        gen = torch.Generator().manual_seed(order_seed(seed) + epoch)
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    if pad:
        if drop_last:
            total = (n // world_size) * world_size
            order = order[:total]
        else:
            total = math.ceil(n / world_size) * world_size
            reps = math.ceil(total / n)
            order = order.repeat(reps)[:total]  # wrap around, as DistributedSampler pads
    return order[rank::world_size]


@dataclass(frozen=True)
class Augmentation:
    offsets_y: torch.Tensor  # (n,) int64 in 0..2*padding
    offsets_x: torch.Tensor
    flips: torch.Tensor  # (n,) bool


class InMemoryLoader:
    """Batches of a uint8 split held on `device`, augmented and normalised there."""

    def __init__(
        self,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        train: bool,
        info: DatasetInfo,
        device: torch.device | str,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(
                f"images_uint8: expected a uint8 (N, C, H, W) tensor, got "
                f"{images_uint8.dtype} of shape {tuple(images_uint8.shape)}"
            )
        if images_uint8.shape[1] != info.in_channels:
            raise ValueError(
                f"images_uint8: {images_uint8.shape[1]} channels, dataset {info.name!r} has "
                f"{info.in_channels}"
            )
        if labels.shape != (len(images_uint8),):
            raise ValueError(
                f"labels: shape {tuple(labels.shape)} does not match {len(images_uint8)} images"
            )
        check_positive("batch_size", batch_size)
        _check_rank(rank, world_size)
        if seed < 0:
            raise ValueError(f"seed: {seed!r} must be >= 0")
        if len(labels) == 0 or (drop_last and train and len(labels) < world_size):
            raise ValueError(f"images_uint8: {len(labels)} samples are too few to shard")
        self.device = torch.device(device)
        self.images = images_uint8.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.train = train
        self.info = info
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last and train
        self.epoch = 0
        self._num_samples = len(self.positions())
        self._stats = channel_stats(info, self.device)  # made once, not per batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def positions(self) -> torch.Tensor:
        """Dataset indices (CPU) this rank visits this epoch, in order."""
        return shard_positions(
            len(self.labels), shuffle=self.train, seed=self.seed, epoch=self.epoch,
            rank=self.rank, world_size=self.world_size, drop_last=self.drop_last,
            pad=self.train,
        )  # fmt: skip

    def augmentation(self) -> Augmentation | None:
        """This rank's crop offsets and flips for this epoch (CPU), or None when not training."""
        p = self.info.crop_padding
        if not self.train or (p == 0 and not self.info.flip):
            return None
        gen = torch.Generator().manual_seed(_augmentation_seed(self.seed, self.epoch, self.rank))
        n = self._num_samples
        oy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        flips = torch.randint(0, 2, (n,), generator=gen).bool()
        if not self.info.flip:
            flips = torch.zeros(n, dtype=torch.bool)
        return Augmentation(oy, ox, flips)

    def __len__(self) -> int:
        if self.drop_last:
            return self._num_samples // self.batch_size
        return math.ceil(self._num_samples / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        idx = self.positions().to(self.device)
        aug = self.augmentation()
        if aug is not None:  # one host->device copy per epoch, not per batch
            aug = Augmentation(*(t.to(self.device) for t in (aug.offsets_y, aug.offsets_x,
                                                            aug.flips)))  # fmt: skip
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            images = self.images[idx[sl]]
            if aug is not None:
                images = crop_flip(
                    images, aug.offsets_y[sl], aug.offsets_x[sl], aug.flips[sl],
                    self.info.crop_padding,
                )  # fmt: skip
            yield normalize_with(images, *self._stats), self.labels[idx[sl]]


class _StridedShard(Sampler[int]):
    """Evaluation shard: indices rank, rank + W, ... without padding."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, n, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TorchvisionLoader:
    """DataLoader over a map-style dataset with the InMemoryLoader interface.

    Training uses DistributedSampler(seed=order_seed(seed)), so the order matches the in-memory
    path; augmentation happens in the dataset's transforms, in the worker processes.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        train: bool,
        device: torch.device | str,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        num_workers: int = 0,
    ) -> None:
        check_positive("batch_size", batch_size)
        _check_rank(rank, world_size)
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        n = len(dataset)  # type: ignore[arg-type]
        self.sampler: Sampler[int]
        if train:
            self.sampler = DistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=True,
                seed=order_seed(seed), drop_last=drop_last,
            )  # fmt: skip
        else:
            self.sampler = _StridedShard(n, rank, world_size)
        # Worker seeds come from this generator, not from the global RNG.
        gen = torch.Generator().manual_seed(_augmentation_seed(seed, 0, rank))
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", drop_last=drop_last and train,
            persistent_workers=num_workers > 0, generator=gen,
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for x, y in self.loader:
            yield (
                x.to(self.device, non_blocking=True),
                y.to(self.device, torch.int64, non_blocking=True),
            )


@dataclass(frozen=True)
class Loaders:
    train: BatchLoader
    val: BatchLoader | None
    test: BatchLoader


def make_loaders(
    bundle: DataBundle,
    *,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    eval_batch_size: int | None = None,
    num_workers: int | None = None,
) -> Loaders:
    """Train/val/test loaders of `bundle` for one rank; the path depends on the dataset.

    `batch_size` is the GLOBAL batch of one optimizer step: each of the `world_size` ranks
    takes `batch_size // world_size` samples per step (ValueError unless it divides), so the
    steps per epoch and the lr of each step do not depend on the number of workers, and an
    epoch is one pass over the data by all ranks together. `eval_batch_size` is per rank
    (default: the per-rank training batch). `num_workers` applies to the torchvision path only
    (default: min(8, CPUs / world_size)).
    """
    _check_rank(rank, world_size)
    check_positive("batch_size", batch_size)
    if batch_size % world_size:
        raise ValueError(
            f"batch_size: {batch_size} (the global batch of one optimizer step) does not split "
            f"evenly over world_size={world_size} workers"
        )
    batch_size //= world_size  # this rank's share of every step
    eval_bs = eval_batch_size or batch_size
    if bundle.in_memory:

        def mem(split: Split, train: bool) -> InMemoryLoader:
            assert isinstance(split, TensorSplit)
            return InMemoryLoader(
                split.images, split.labels, batch_size=batch_size if train else eval_bs,
                train=train, info=bundle.info, device=device, seed=seed, rank=rank,
                world_size=world_size,
            )  # fmt: skip

        val = mem(bundle.val, False) if bundle.val is not None else None
        return Loaders(mem(bundle.train, True), val, mem(bundle.test, False))

    workers = num_workers
    if workers is None:
        workers = min(8, max(1, (os.cpu_count() or 1) // world_size))

    def tv(split: Dataset, train: bool) -> TorchvisionLoader:
        return TorchvisionLoader(
            split, batch_size=batch_size if train else eval_bs, train=train, device=device,
            seed=seed, rank=rank, world_size=world_size, num_workers=workers,
        )  # fmt: skip

    val_loader = tv(bundle.val, False) if bundle.val is not None else None
    return Loaders(tv(bundle.train, True), val_loader, tv(bundle.test, False))


def _check_rank(rank: int, world_size: int) -> None:
    check_positive("world_size", world_size)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: {rank!r} is outside [0, world_size={world_size})")
