"""The datasets nptm trains on, loaded into splits (`DataBundle`): digits and CIFAR as uint8
tensors held in memory, ImageNet as torchvision `ImageFolder`s; their channel normalisation;
and the calibration batches data-driven pruners rank filters on. nptm.trainables.loaders turns a
bundle into the batches of one rank.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from nptm.trainables import split_cache
from nptm.trainables.catalog import DATASETS, DatasetInfo
from nptm.trainables.registry import resolve

Batch = tuple[torch.Tensor, torch.Tensor]

# Part of the digits dataset definition, not a knob: the 1,797 images split 1,437 / 360.
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0

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
        check_positive("n_batches", n_batches)
        check_positive("batch_size", batch_size)
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
    random subset. Kept in nptm.trainables.split_cache.
    """
    n = len(labels)
    n_held = round(fraction * n)
    if not 0 < n_held < n:
        raise ValueError(
            f"val_fraction: {fraction!r} of {n} training samples leaves {n_held} for validation "
            f"and {n - n_held} for training; both must be at least 1"
        )

    def compute() -> split_cache.Arrays:
        from sklearn.model_selection import train_test_split

        positions = np.arange(n)
        _, counts = np.unique(labels, return_counts=True)
        enough = counts.min() >= 2 and min(n_held, n - n_held) >= len(counts)
        keep, held = train_test_split(
            positions, test_size=n_held, random_state=seed, stratify=labels if enough else None
        )
        return {"keep": np.sort(keep), "held": np.sort(held)}

    key = {"labels": split_cache.labels_digest(labels), "held": n_held, "seed": seed}
    arrays = split_cache.cached("split", key, compute)
    return arrays["keep"], arrays["held"]


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
    fixed DIGITS_SPLIT_SEED, 1,437 training and 360 test images. Kept in
    nptm.trainables.split_cache.
    """
    key = {"test_size": DIGITS_TEST_SIZE, "seed": DIGITS_SPLIT_SEED}
    arrays = split_cache.cached("digits", key, _digits_arrays)
    whole = TensorSplit(
        torch.from_numpy(arrays["images"]).contiguous(), torch.from_numpy(arrays["labels"])
    )
    return whole.subset(arrays["train"]), whole.subset(arrays["test"])


def _digits_arrays() -> split_cache.Arrays:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    values = digits.images.astype(np.int64)  # exact small integers stored as float64
    images = ((values * 255 + 8) // 16).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_SIZE,
        random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    return {"images": images, "labels": labels, "train": np.sort(train_idx),
            "test": np.sort(test_idx)}  # fmt: skip


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


def normalize(images_uint8: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ((x / 255) - mean) / std per channel, on the same device."""
    return normalize_with(images_uint8, *channel_stats(info, images_uint8.device))


def channel_stats(info: DatasetInfo, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(info.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def normalize_with(
    images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    return (images_uint8.to(torch.float32) / 255.0 - mean) / std


def check_positive(field: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field}: {value!r} must be a positive integer")
