"""`stripes`: 12x12 grey images of one of four stripe orientations (-, |, /, \\) under noise,
generated from a fixed seed, so the dataset needs no download and no files."""

import numpy as np
import torch

from nptm.trainables.datasets import TensorSplit

TRAIN_SIZE, TEST_SIZE, SIZE, SEED = 800, 200, 12, 1234


def _generate() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    n = TRAIN_SIZE + TEST_SIZE
    labels = np.arange(n) % 4
    rng.shuffle(labels)
    y, x = np.mgrid[:SIZE, :SIZE]
    coordinate = np.stack([y, x, x + y, x - y])  # constant along each class's stripes
    period = rng.integers(3, 6, n)[:, None, None]
    phase = rng.integers(0, 6, n)[:, None, None]
    stripes = (coordinate[labels] + phase) % period == 0
    noise = rng.normal(0.0, 40.0, (n, SIZE, SIZE))
    images = np.clip(40.0 + 170.0 * stripes + noise, 0, 255).astype(np.uint8)
    return images[:, None], labels.astype(np.int64)  # (N, 1, H, W) uint8, (N,) int64


def _channel_stats() -> tuple[tuple[float], tuple[float]]:
    train = _generate()[0][:TRAIN_SIZE] / 255.0  # normalisation statistics: training split only
    return (round(float(train.mean()), 4),), (round(float(train.std()), 4),)


STRIPES_MEAN, STRIPES_STD = _channel_stats()


def load_stripes(_info: object, _root: object, _download: bool) -> tuple[TensorSplit, TensorSplit]:
    """(train, test) splits, as an in-memory dataset's loader returns them."""
    images, labels = (torch.from_numpy(a) for a in _generate())
    return (
        TensorSplit(images[:TRAIN_SIZE], labels[:TRAIN_SIZE]),
        TensorSplit(images[TRAIN_SIZE:], labels[TRAIN_SIZE:]),
    )
