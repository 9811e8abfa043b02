"""The names a grid may use, and which combinations can work.

This module is deliberately free of torch imports so the planner can validate a grid of
100k trials without loading any model code.
"""

from __future__ import annotations

from dataclasses import dataclass


class IncompatibleError(ValueError):
    """A model/dataset (or pruner/model) pair that cannot work."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    image_size: int
    num_classes: int
    train_size: int
    test_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_memory: bool  # small enough to hold as a uint8 tensor on the training device
    flip: bool  # horizontal flip is a label-preserving augmentation
    crop_padding: int  # random-crop padding used by the standard augmentation


DATASETS: dict[str, DatasetInfo] = {
    # mean/std of the 1,437 training images after datasets.py's uint8 scaling, as fractions of 255.
    "digits": DatasetInfo(
        "digits", 1, 8, 10, 1437, 360, (0.3054,), (0.3760,), True, flip=False, crop_padding=1
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        3,
        32,
        10,
        50_000,
        10_000,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        True,
        flip=True,
        crop_padding=4,
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        3,
        32,
        100,
        50_000,
        10_000,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        True,
        flip=True,
        crop_padding=4,
    ),
    "imagenet": DatasetInfo(
        "imagenet",
        3,
        224,
        1000,
        1_281_167,
        50_000,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        False,
        flip=True,
        crop_padding=0,
    ),
}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # "cifar_resnet" | "cifar_vgg" | "torchvision"
    min_image_size: int  # smallest input whose spatial size survives every downsampling
    depth: int = 0


MODELS: dict[str, ModelInfo] = {
    **{f"resnet{d}": ModelInfo(f"resnet{d}", "cifar_resnet", 4, d) for d in (20, 32, 56, 110)},
    "vgg16": ModelInfo("vgg16", "cifar_vgg", 32, 16),
    "vgg19": ModelInfo("vgg19", "cifar_vgg", 32, 19),
    # torchvision ImageNet models: 5 stride-2 stages, meaningful from 64 px up.
    "resnet18": ModelInfo("resnet18", "torchvision", 64, 18),
    "resnet34": ModelInfo("resnet34", "torchvision", 64, 34),
    "resnet50": ModelInfo("resnet50", "torchvision", 64, 50),
    "mobilenet_v2": ModelInfo("mobilenet_v2", "torchvision", 64),
}


@dataclass(frozen=True)
class PrunerInfo:
    name: str
    structured: bool
    needs_data: bool  # importance is computed from a few batches of training data


PRUNERS: dict[str, PrunerInfo] = {
    "magnitude": PrunerInfo("magnitude", False, False),
    "magnitude_layerwise": PrunerInfo("magnitude_layerwise", False, False),
    "random": PrunerInfo("random", False, False),
    "l1_filter": PrunerInfo("l1_filter", True, False),
    "random_filter": PrunerInfo("random_filter", True, False),
    "hrank": PrunerInfo("hrank", True, True),
    "taylor": PrunerInfo("taylor", True, True),
}

# Published configurations (PFEC, Li et al. 2017; C/D are NPTM's heavier variants).
PRESETS: dict[str, tuple[str, ...]] = {
    "resnet56": ("A", "B", "C", "D"),
    "resnet110": ("A", "B", "C", "D"),
    "vgg16": ("A",),
}

SCHEDULES: tuple[str, ...] = ("ft", "lrw", "wr", "slr", "clr", "scratch")
# Schedules that replay part of the pre-training run and so need its checkpoints.
REWINDING_SCHEDULES: frozenset[str] = frozenset({"lrw", "wr"})


def check_model_dataset(model: str, dataset: str) -> None:
    """Raise IncompatibleError with a readable reason if `model` cannot train on `dataset`."""
    if dataset not in DATASETS:
        raise IncompatibleError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    if model not in MODELS:
        raise IncompatibleError(f"unknown model {model!r}; known: {sorted(MODELS)}")
    d, m = DATASETS[dataset], MODELS[model]
    if d.image_size < m.min_image_size:
        raise IncompatibleError(
            f"model {model!r} needs inputs of at least {m.min_image_size}x{m.min_image_size} "
            f"pixels but dataset {dataset!r} has {d.image_size}x{d.image_size}"
        )


def check_pruner_target(pruner: str, model: str, ratio: float | None, preset: str | None) -> None:
    """Raise IncompatibleError unless exactly one of ratio/preset is given and fits the pruner."""
    if pruner not in PRUNERS:
        raise IncompatibleError(f"unknown pruner {pruner!r}; known: {sorted(PRUNERS)}")
    if (ratio is None) == (preset is None):
        raise IncompatibleError(f"pruner {pruner!r} needs exactly one of 'ratio' or 'preset'")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise IncompatibleError(f"ratio {ratio!r} is outside [0, 1)")
    if preset is not None:
        if not PRUNERS[pruner].structured:
            raise IncompatibleError(
                f"preset {preset!r} is a filter-pruning configuration; pruner {pruner!r} "
                "is unstructured, use 'ratio'"
            )
        known = PRESETS.get(model, ())
        if preset not in known:
            raise IncompatibleError(
                f"no preset {preset!r} for model {model!r}; known: {list(known) or 'none'}"
            )
