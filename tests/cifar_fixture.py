"""Small CIFAR-10/100 files in the exact on-disk layout of the official python versions.

The official archives were pickled by Python 2: dict keys and strings are Python 2 `str`
objects, which Python 3 reads as `str` with `encoding="latin1"` (what torchvision does) and as
`bytes` with `encoding="bytes"` (what the dataset's web page shows, hence keys like b"data").
`_Py2Pickler` reproduces that by writing every `bytes` object with the Python 2 string opcodes,
so both readers see what they would see on the real files.

torchvision's constructors always compare each file's md5 against the checksums of the real
archives, which no small file can match. `accept_checksums(files)` swaps the expected checksums
on the torchvision classes for those of the files just written, for the current process only;
everything else (file discovery, unpickling, reshaping, the meta file) runs unchanged.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
from torchvision import datasets as tv_datasets

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR100_COARSE = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)  # fmt: skip
CIFAR100_FINE = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar",
    "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile",
    "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster",
    "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm",
)  # fmt: skip
assert len(CIFAR10_CLASSES) == 10 and len(CIFAR100_COARSE) == 20 and len(CIFAR100_FINE) == 100


@dataclass(frozen=True)
class CifarFiles:
    """What a `write_cifar*` call put on disk, for comparing against what a loader returns."""

    root: Path
    dataset: str  # "cifar10" | "cifar100"
    train_images: np.ndarray  # (N, 32, 32, 3) uint8, HWC like torchvision's `.data`
    train_labels: np.ndarray  # (N,) int64 (fine labels for CIFAR-100)
    test_images: np.ndarray
    test_labels: np.ndarray
    md5: dict[str, str] = field(default_factory=dict)  # file name -> md5 of the written file


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is a dict
    """Protocol-2 pickler writing `bytes` the way Python 2 wrote `str`."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + struct.pack("<B", len(obj)) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2(obj: object) -> object:
    """Turn the str keys/values of a batch dict into bytes, i.e. Python 2 strings on disk."""
    if isinstance(obj, str):
        return obj.encode("latin1")
    if isinstance(obj, dict):
        return {_py2(k): _py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_py2(v) for v in obj]
    return obj


def _dump(path: Path, obj: dict) -> str:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(_py2(obj))
    path.write_bytes(buf.getvalue())
    return hashlib.md5(buf.getvalue()).hexdigest()


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _rows(images_hwc: np.ndarray) -> np.ndarray:
    """The official row layout: 3072 uint8 per image, the 1024 red, then green, then blue."""
    return np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072))


def _filenames(labels: np.ndarray, names: tuple[str, ...], start: int) -> list[str]:
    return [f"{names[y]}_s_{start + i:06d}.png" for i, y in enumerate(labels)]


def write_cifar10(
    root: str | Path, *, n_train: int = 50, n_test: int = 20, seed: int = 0
) -> CifarFiles:
    """Write `cifar-10-batches-py/` (5 training batches, test batch, batches.meta) under root."""
    if n_train < 5:
        raise ValueError(f"n_train={n_train}: CIFAR-10 has 5 training batch files, need >= 5")
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_x, test_x = _images(rng, n_train), _images(rng, n_test)
    train_y = rng.integers(0, 10, n_train).astype(np.int64)
    test_y = rng.integers(0, 10, n_test).astype(np.int64)
    md5: dict[str, str] = {}
    start = 0
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        md5[f"data_batch_{i}"] = _dump(
            folder / f"data_batch_{i}",
            {
                "batch_label": f"training batch {i} of 5",
                "labels": [int(y) for y in train_y[part]],
                "data": _rows(train_x[part]),
                "filenames": _filenames(train_y[part], CIFAR10_CLASSES, start),
            },
        )
        start += len(part)
    md5["test_batch"] = _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [int(y) for y in test_y],
            "data": _rows(test_x),
            "filenames": _filenames(test_y, CIFAR10_CLASSES, 0),
        },
    )
    md5["batches.meta"] = _dump(
        folder / "batches.meta",
        {
            "num_cases_per_batch": int(np.ceil(n_train / 5)),
            "label_names": list(CIFAR10_CLASSES),
            "num_vis": 3072,
        },
    )
    return CifarFiles(Path(root), "cifar10", train_x, train_y, test_x, test_y, md5)


def write_cifar100(
    root: str | Path, *, n_train: int = 50, n_test: int = 20, seed: int = 0
) -> CifarFiles:
    """Write `cifar-100-python/` (train, test, meta) under root."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    md5: dict[str, str] = {}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, n, label in (("train", n_train, "training"), ("test", n_test, "testing")):
        images = _images(rng, n)
        fine = rng.integers(0, 100, n).astype(np.int64)
        coarse = rng.integers(0, 20, n).astype(np.int64)
        md5[split] = _dump(
            folder / split,
            {
                "filenames": _filenames(fine, CIFAR100_FINE, 0),
                "batch_label": f"{label} batch 1 of 1",
                "fine_labels": [int(y) for y in fine],
                "coarse_labels": [int(y) for y in coarse],
                "data": _rows(images),
            },
        )
        out[split] = (images, fine)
    md5["meta"] = _dump(
        folder / "meta",
        {"fine_label_names": list(CIFAR100_FINE), "coarse_label_names": list(CIFAR100_COARSE)},
    )
    return CifarFiles(Path(root), "cifar100", *out["train"], *out["test"], md5)


@contextmanager
def accept_checksums(files: CifarFiles) -> Iterator[None]:
    """Make torchvision's integrity check expect the md5s of `files` (this process only)."""
    cls = {"cifar10": tv_datasets.CIFAR10, "cifar100": tv_datasets.CIFAR100}[files.dataset]
    with ExitStack() as stack:
        for attr in ("train_list", "test_list"):
            expected = [[name, files.md5[name]] for name, _ in getattr(cls, attr)]
            stack.enter_context(mock.patch.object(cls, attr, expected))
        meta = dict(cls.meta, md5=files.md5[cls.meta["filename"]])
        stack.enter_context(mock.patch.object(cls, "meta", meta))
        yield
