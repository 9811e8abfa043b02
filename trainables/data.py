"""Datasets and the batch loaders the train loop consumes.

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

import copy
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from trainables.catalog import DATASETS, DatasetInfo
from trainables.registry import resolve

Batch = tuple[torch.Tensor, torch.Tensor]

# Part of the digits dataset definition, not a knob: the 1,797 images split 1,437 / 360.
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0
_EPOCH_STRIDE = 1 << 20  # order_seed(seed) + epoch never collides across seeds below 2**20 epochs


def order_seed(seed: int) -> int:
    """Base seed of the data order: epoch `e` uses `order_seed(seed) + e`, as DistributedSampler."""
    return seed * _EPOCH_STRIDE


def _augmentation_seed(seed: int, epoch: int, rank: int) -> int:
    # Well-mixed and distinct per (seed, epoch, rank): each rank crops its own shard differently.
    return int(np.random.SeedSequence([seed, epoch, rank, 0xA0]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# Dataset bundles


@dataclass(frozen=True)
class TensorSplit:
    """An in-memory split: uint8 images (N, C, H, W) and int64 labels (N,), on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> TensorSplit:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return TensorSplit(self.images[idx].contiguous(), self.labels[idx].contiguous())


Split = TensorSplit | Dataset


@dataclass(frozen=True)
class DataBundle:
    """The splits of one dataset. `val` is None when no validation split was requested."""

    info: DatasetInfo
    train: Split
    val: Split | None
    test: Split
    # torchvision path only: the training split with evaluation transforms (calibration data).
    train_plain: Dataset | None = None

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, TensorSplit)

    def calibration_batches(
        self, n_batches: int, batch_size: int, seed: int, *, augmented: bool = False
    ) -> list[Batch]:
        """`n_batches` normalised training batches (CPU) for data-driven pruners, un-augmented,
        or with the training augmentation (random crop and flip) when `augmented`.

        Samples are drawn without replacement from a permutation seeded by `seed`; if more are
        asked for than the split holds, further fresh permutations are appended. Crop offsets
        and flips come from the same seeded generator.
        """
        _check_positive("n_batches", n_batches)
        _check_positive("batch_size", batch_size)
        source = self.train if self.in_memory or augmented else self.train_plain
        assert source is not None
        n = len(source)
        gen = torch.Generator().manual_seed(seed)
        need = n_batches * batch_size
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(need / n))])
        order = order[:need]
        batches: list[Batch] = []
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            if isinstance(source, TensorSplit):
                images = source.images[idx]
                if augmented:
                    p, b = self.info.crop_padding, len(idx)
                    oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
                    ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
                    flips = torch.randint(0, 2, (b,), generator=gen).bool() & self.info.flip
                    images = crop_flip(images, oy, ox, flips, p)
                x = normalize(images, self.info)
                y = source.labels[idx]
            else:
                samples = [source[int(i)] for i in idx]
                x = torch.stack([s[0] for s in samples])
                y = torch.tensor([int(s[1]) for s in samples], dtype=torch.int64)
            batches.append((x, y))
        return batches


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None,
    *,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    download: bool = False,
) -> DataBundle:
    """Load dataset `name` (a key of catalog.DATASETS) from `root`.

    `val_fraction` of the training split is held out as `bundle.val` (stratified by class where
    every class can contribute, seeded by `split_seed`); the rest stays in `bundle.train`.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown name {name!r}; known: {sorted(DATASETS)}")
    if not isinstance(val_fraction, int | float) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: {val_fraction!r} is outside [0, 1)")
    info = DATASETS[name]
    if not info.in_memory:
        return resolve(info.loader)(info, root, val_fraction, split_seed, download)
    train, test = resolve(info.loader)(info, root, download)
    val = None
    if val_fraction > 0:
        keep, held = split_indices(train.labels.numpy(), val_fraction, split_seed)
        train, val = train.subset(keep), train.subset(held)
    return DataBundle(info, train, val, test)


def split_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of positions 0..N-1 into (kept, held out), each sorted.

    The held-out part has round(fraction * N) samples, stratified by label when every class has
    at least two samples and both parts can hold one of each class; otherwise a plain seeded
    random subset.
    """
    from sklearn.model_selection import train_test_split

    n = len(labels)
    n_held = round(fraction * n)
    if not 0 < n_held < n:
        raise ValueError(
            f"val_fraction: {fraction!r} of {n} training samples leaves {n_held} for validation "
            f"and {n - n_held} for training; both must be at least 1"
        )
    positions = np.arange(n)
    _, counts = np.unique(labels, return_counts=True)
    stratify = labels if counts.min() >= 2 and min(n_held, n - n_held) >= len(counts) else None
    keep, held = train_test_split(positions, test_size=n_held, random_state=seed, stratify=stratify)
    return np.sort(keep), np.sort(held)


def load_digits_splits(
    _info: DatasetInfo, _root: object, _download: bool
) -> tuple[TensorSplit, TensorSplit]:
    return _load_digits()


def load_cifar_splits(
    info: DatasetInfo, root: str | os.PathLike[str] | None, download: bool
) -> tuple[TensorSplit, TensorSplit]:
    return _load_cifar(info.name, root, download)


def _load_digits() -> tuple[TensorSplit, TensorSplit]:
    """scikit-learn's 8x8 digits as 1x8x8 uint8 images.

    Pixel values v in 0..16 become round(v * 255 / 16), computed exactly as
    (v * 255 + 8) // 16: 0 -> 0, 8 -> 128, 16 -> 255. The split is stratified, seeded by the
    fixed DIGITS_SPLIT_SEED, 1,437 training and 360 test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    values = digits.images.astype(np.int64)  # exact small integers stored as float64
    images = torch.from_numpy(((values * 255 + 8) // 16).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_SIZE,
        random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    whole = TensorSplit(images.contiguous(), labels)
    return whole.subset(np.sort(train_idx)), whole.subset(np.sort(test_idx))


def download_lock_path(root: str | os.PathLike[str], name: str) -> Path:
    """The lock file that serialises downloads of `name` into `root` across processes."""
    return Path(root) / f".nptm-download-{name}.lock"


def _load_cifar(
    name: str, root: str | os.PathLike[str] | None, download: bool
) -> tuple[TensorSplit, TensorSplit]:
    from filelock import FileLock
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    if root is None:
        raise ValueError(f"root: dataset {name!r} needs a data root directory, got None")
    root = Path(root)
    folder = root / cls.base_folder
    wanted = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in wanted if not (folder / f).is_file()]
    if missing and not download:
        raise FileNotFoundError(
            f"dataset {name!r}: files not found under root {str(root)!r}: missing "
            f"{', '.join(f'{cls.base_folder}/{f}' for f in missing)}. Put the extracted "
            f"{cls.base_folder!r} folder of {cls.url} into {str(root)!r}, or allow the download "
            "(download=True; in a grid, data.download: true)."
        )

    def build(train: bool) -> TensorSplit:
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise RuntimeError(
                f"dataset {name!r} under root {str(root)!r} failed torchvision's checksum check "
                f"({err}); delete {str(folder)!r} and download it again"
            ) from err
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
        return TensorSplit(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64))

    if not download:
        return build(True), build(False)
    root.mkdir(parents=True, exist_ok=True)
    # Trials sharing a node share the root: one downloads, the others wait, then find the files.
    lock = FileLock(str(download_lock_path(root, name)))
    try:
        lock.acquire()
    except OSError:
        if missing:
            raise
        # E.g. a read-only shared root that already holds the files: nothing to guard.
        return build(True), build(False)
    try:
        return build(True), build(False)
    finally:
        lock.release()


def imagenet_transforms(info: DatasetInfo) -> tuple[object, object]:
    """torchvision's reference transforms: (train, evaluation)."""
    from torchvision import transforms as T

    normalize_t = T.Normalize(info.mean, info.std)
    size = info.image_size
    train = T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize_t]
    )
    evaluate = T.Compose(
        [T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(), normalize_t]
    )
    return train, evaluate


def load_imagenet_bundle(
    info: DatasetInfo,
    root: str | os.PathLike[str] | None,
    val_fraction: float,
    split_seed: int,
    download: bool,
) -> DataBundle:
    from torchvision import datasets

    if download:
        raise ValueError(
            f"download: dataset {info.name!r} cannot be downloaded automatically; put its "
            "train/ and val/ class folders under the data root"
        )
    if root is None:
        raise ValueError(f"root: dataset {info.name!r} needs a data root directory, got None")
    root = Path(root)
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise FileNotFoundError(
                f"dataset {info.name!r}: no {part!r} folder under root {str(root)!r}; expected "
                f"{str(root / part)!r} with one sub-folder of images per class"
            )
    train_tf, eval_tf = imagenet_transforms(info)
    train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    # Same file list, evaluation transforms: shallow copy instead of a second directory scan.
    plain = copy.copy(train)
    plain.transform = eval_tf
    test = datasets.ImageFolder(str(root / "val"), transform=eval_tf)
    if test.classes != train.classes:
        raise ValueError(
            f"dataset {info.name!r}: class folders of {str(root / 'val')!r} differ from "
            f"those of {str(root / 'train')!r}"
        )
    if val_fraction == 0:
        return DataBundle(info, train, None, test, train_plain=plain)
    keep, held = split_indices(np.asarray(train.targets), val_fraction, split_seed)
    return DataBundle(
        info,
        Subset(train, keep.tolist()),
        Subset(plain, held.tolist()),
        test,
        train_plain=Subset(plain, keep.tolist()),
    )


# --------------------------------------------------------------------------------------------
# Batch-level augmentation and normalisation


def normalize(images_uint8: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ((x / 255) - mean) / std per channel, on the same device."""
    return _normalize(images_uint8, *_channel_stats(info, images_uint8.device))


def _channel_stats(info: DatasetInfo, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(info.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def _normalize(images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images_uint8.to(torch.float32) / 255.0 - mean) / std


def crop_flip(
    images: torch.Tensor,
    offsets_y: torch.Tensor,
    offsets_x: torch.Tensor,
    flips: torch.Tensor,
    padding: int,
) -> torch.Tensor:
    """Per-sample random crop and horizontal flip of a batch, in one gather.

    Sample i is zero-padded by `padding` on every side, cropped back to (H, W) at top-left
    (offsets_y[i], offsets_x[i]) of the padded image (each in 0..2*padding), then mirrored if
    flips[i]: torchvision's RandomCrop(padding=p) followed by RandomHorizontalFlip.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = offsets_y.to(dev).view(b, 1) + torch.arange(h, device=dev)  # (B, H)
    cols = offsets_x.to(dev).view(b, 1) + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(flips.to(dev).view(b, 1), cols.flip(1), cols)
    return padded[
        torch.arange(b, device=dev).view(b, 1, 1, 1),
        torch.arange(c, device=dev).view(1, c, 1, 1),
        rows.view(b, 1, h, 1),
        cols.view(b, 1, 1, w),
    ]


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
        _check_positive("batch_size", batch_size)
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
        self._stats = _channel_stats(info, self.device)  # made once, not per batch

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
            yield _normalize(images, *self._stats), self.labels[idx[sl]]


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
        _check_positive("batch_size", batch_size)
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
    _check_positive("batch_size", batch_size)
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


def _check_positive(field: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field}: {value!r} must be a positive integer")


def _check_rank(rank: int, world_size: int) -> None:
    _check_positive("world_size", world_size)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: {rank!r} is outside [0, world_size={world_size})")
