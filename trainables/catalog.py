"""The built-in datasets, models, pruners, presets and schedules, registered by name, and which
combinations can work.

Every kind has one `Registry` (nptm.trainables.registry); grid validation, the planner, the stage
runner and `nptm inspect` all look names up there. Entries point at their code by import path,
so this module is free of torch imports and the planner can validate a grid of 100k trials
without loading any model code.
"""

from __future__ import annotations

from dataclasses import dataclass

from nptm.trainables.registry import Registry, UnknownName


class IncompatibleError(ValueError):
    """A model/dataset (or pruner/model) pair that cannot work, or an unknown name."""


# --- datasets --------------------------------------------------------------------------------


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
    # In memory: (info, root, download) -> (train, test) TensorSplits.
    # Otherwise: (info, root, val_fraction, split_seed, download) -> DataBundle.
    loader: str = ""
    # (info, root, download) -> None if the loader will find its data under `root` (root may
    # be None), else what is missing and how to get it; checked before a sweep starts
    # (nptm.trainables.data_check). "" for a dataset that needs no data root.
    check: str = ""


DATASETS: Registry[DatasetInfo] = Registry("dataset")
for _d in (
    # mean/std of the 1,437 training images after datasets.py's uint8 scaling, as fractions of 255.
    DatasetInfo(
        "digits", 1, 8, 10, 1437, 360, (0.3054,), (0.3760,), True, flip=False, crop_padding=1,
        loader="nptm.trainables.datasets:load_digits_splits",
    ),
    DatasetInfo(
        "cifar10", 3, 32, 10, 50_000, 10_000,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        True, flip=True, crop_padding=4, loader="nptm.trainables.datasets:load_cifar_splits",
        check="nptm.trainables.data_check:check_cifar",
    ),
    DatasetInfo(
        "cifar100", 3, 32, 100, 50_000, 10_000,
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        True, flip=True, crop_padding=4, loader="nptm.trainables.datasets:load_cifar_splits",
        check="nptm.trainables.data_check:check_cifar",
    ),
    DatasetInfo(
        "imagenet", 3, 224, 1000, 1_281_167, 50_000,
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
        False, flip=True, crop_padding=0, loader="nptm.trainables.datasets:load_imagenet_bundle",
        check="nptm.trainables.data_check:check_imagenet",
    ),
):  # fmt: skip
    DATASETS.register(_d.name, _d)


# --- models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # code base the architecture follows, e.g. "cifar_resnet", "torchvision"
    min_image_size: int  # smallest input whose spatial size survives every downsampling
    depth: int = 0
    # (info, in_channels, num_classes) -> nn.Module
    build: str = ""
    # (model, info) -> names of the convs whose filters can be removed
    prunable_convs: str = ""
    revision: int = 1  # see PrunerInfo.revision: bumped when what the name builds changes
    # (model) -> None: the code base's initialisation, applied to every layer at its own shape
    # (nptm.trainables.models.reinitialize, which scratch training runs on the pruned network
    # after each module's reset_parameters()); "" = PyTorch's defaults only.
    init: str = ""
    # The model this one differs from only in a parameter-free function (the same layers in the
    # same order): its presets apply. "" = none.
    variant_of: str = ""


MODELS: Registry[ModelInfo] = Registry("model")
_M = "nptm.trainables.models"
_RESNET_INIT, _TV_INIT = f"{_M}:init_cifar_resnet", f"{_M}:init_torchvision"
for _m in (
    # PFEC / rethinking l1-norm-pruning code base: BasicBlock ResNets, VGG with a 2-layer head.
    # Revision 2: the downsampling shortcut is the authors' AvgPool2d(2, 2) + zero channels
    # (revision 1 subsampled, which the `_subsample` variants keep).
    *(
        ModelInfo(f"resnet{d}", "cifar_resnet", 4, d, f"{_M}:build_cifar_resnet",
                  f"{_M}:basic_block_convs", revision=2, init=_RESNET_INIT)
        for d in (20, 32, 56, 110)
    ),
    *(
        ModelInfo(f"resnet{d}_subsample", "cifar_resnet", 4, d,
                  f"{_M}:build_cifar_resnet_subsample", f"{_M}:basic_block_convs",
                  init=_RESNET_INIT, variant_of=f"resnet{d}")
        for d in (20, 32, 56, 110)
    ),
    ModelInfo("vgg16", "cifar_vgg", 32, 16, f"{_M}:build_cifar_vgg", f"{_M}:all_convs",
              init=f"{_M}:init_cifar_vgg"),
    ModelInfo("vgg19", "cifar_vgg", 32, 19, f"{_M}:build_cifar_vgg", f"{_M}:all_convs",
              init=f"{_M}:init_cifar_vgg"),
    # Weight-level (unstructured) code base of the rethinking study, followed by Le & Hua's
    # weight-level experiments: Bottleneck ResNet-56, VGG-19-BN with one Linear layer.
    ModelInfo("resnet56_weightlevel", "weightlevel_resnet", 4, 56,
              f"{_M}:build_weightlevel_resnet", f"{_M}:bottleneck_convs", init=_RESNET_INIT),
    ModelInfo("vgg19_weightlevel", "weightlevel_vgg", 32, 19,
              f"{_M}:build_weightlevel_vgg", f"{_M}:all_convs",
              init=f"{_M}:init_weightlevel_vgg"),
    # torchvision ImageNet models: 5 stride-2 stages, meaningful from 64 px up.
    *(
        ModelInfo(f"resnet{d}", "torchvision", 64, d, f"{_M}:build_torchvision",
                  f"{_M}:torchvision_convs", init=_TV_INIT)
        for d in (18, 34, 50)
    ),
    ModelInfo("mobilenet_v2", "torchvision", 64, 0, f"{_M}:build_torchvision",
              f"{_M}:torchvision_convs", init=_TV_INIT),
):  # fmt: skip
    MODELS.register(_m.name, _m)


# --- pruners ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrunerInfo:
    name: str
    structured: bool
    needs_data: bool  # importance is computed from a few batches of training data
    # Training images the importance is computed on, and whether they are augmented as in
    # training (HRank's rank estimate: 640 augmented images); 0 = the stage runner's default.
    calibration_images: int = 0
    calibration_augmented: bool = False
    # Structured pruners: (model, conv names, batches, seed) -> one score per filter of each
    # conv, higher = keep. Unstructured pruners: the three of nptm.trainables.pruners.unstructured.
    importance: str = ""
    # Bumped when what the name computes changes, so stages computed under the old
    # definition are not reused (nptm.trainables.stage.StageSpec.identity).
    revision: int = 1
    # The mask is drawn at random (from the prune stage's seed), not computed from the
    # weights: with a shared pre-training each seed draws its own (`seeds.random_masks`).
    random_mask: bool = False


PRUNERS: Registry[PrunerInfo] = Registry("pruner")
_ST = "nptm.trainables.pruners.structured"
for _p in (
    PrunerInfo("magnitude", False, False),
    PrunerInfo("magnitude_layerwise", False, False),
    PrunerInfo("random", False, False, random_mask=True),
    PrunerInfo("l1_filter", True, False, importance=f"{_ST}:l1_importance"),
    PrunerInfo("random_filter", True, False, importance=f"{_ST}:random_importance",
               random_mask=True),
    PrunerInfo("hrank", True, True, calibration_images=640, calibration_augmented=True,
               importance=f"{_ST}:hrank_importance", revision=2),
    PrunerInfo("taylor_conv_oneshot", True, True, importance=f"{_ST}:taylor_importance"),
):  # fmt: skip
    PRUNERS.register(_p.name, _p)
PRUNERS.retire(
    "taylor",
    "was renamed 'taylor_conv_oneshot': it scores conv filters once on a few batches, which "
    "is not Molchanov et al.'s procedure (gates after BatchNorm, iterative global ranking); "
    "see docs/protocol.md",
)

# Options a grid's pruner entry may set, with their defaults (the authors' procedure).
# `layers`: which weights unstructured pruning considers ("conv" = Conv2d only, as the authors'
# weight-level code; "conv+linear" adds the Linear layers, classifier included).
# `min_keep`: share of every layer's weights always kept (0 = no floor: a global threshold may
# empty a layer, which the prune stage records).
UNSTRUCTURED_OPTIONS: dict[str, object] = {"layers": "conv", "min_keep": 0.0}
LAYER_CHOICES: tuple[str, ...] = ("conv", "conv+linear")


# --- presets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PresetInfo:
    name: str
    model: str
    source: str  # where the configuration is published
    # One of: stage ratios + skip list (CIFAR ResNets), a VGG cfg, or per-conv rates (HRank).
    stage_ratios: tuple[float, float, float] | None = None
    skip: frozenset[int] = frozenset()  # 1-based conv ids never pruned
    vgg_cfg: tuple[int | str, ...] | None = None
    conv_rates: tuple[float, ...] | None = None  # HRank's compress_rate, one per conv
    revision: int = 1  # see PrunerInfo.revision (C/D were nptm's heavier presets before 2)


_B56 = frozenset({16, 18, 20, 34, 38, 54})
_B110 = frozenset({36, 38, 74})
_PFEC = "Li et al. 2017 (PFEC)"
_LEHUA = "Le & Hua 2021, norm-pruning/cifar/l1-norm-pruning/{}prune.py"
# HRank (Lin et al. 2020) compress_rate of resnet_56, as the authors' hrank/scripts pass it:
# [0.1]+[0.60]*35+[0.0]*2+[0.6]*6+[0.4]*3+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]
HRANK_RESNET56_RATES: tuple[float, ...] = (
    (0.1,) + (0.6,) * 35 + (0.0,) * 2 + (0.6,) * 6 + (0.4,) * 3 + (0.1, 0.4) * 4
)
PRESETS: Registry[PresetInfo] = Registry("preset")
for _s in (
    PresetInfo("A", "resnet56", _PFEC, (0.1, 0.1, 0.1), frozenset({16, 20, 38, 54})),
    PresetInfo("B", "resnet56", _PFEC, (0.6, 0.3, 0.1), _B56),
    PresetInfo("C", "resnet56", _LEHUA.format("res56"), (0.6, 0.5, 0.4), _B56, revision=2),
    PresetInfo("D", "resnet56", _LEHUA.format("res56"), (0.6, 0.6, 0.6), _B56, revision=2),
    PresetInfo("nptm-heavy-1", "resnet56", "nptm", (0.7, 0.5, 0.3), _B56),
    PresetInfo("nptm-heavy-2", "resnet56", "nptm", (0.9, 0.7, 0.5), _B56),
    PresetInfo("hrank-paper", "resnet56", "Lin et al. 2020 (HRank), hrank/scripts",
               conv_rates=HRANK_RESNET56_RATES),
    PresetInfo("A", "resnet110", _PFEC, (0.5, 0.0, 0.0), frozenset({36})),
    PresetInfo("B", "resnet110", _PFEC, (0.5, 0.4, 0.3), _B110),
    PresetInfo("C", "resnet110", _LEHUA.format("res110"), (0.5, 0.5, 0.5), _B110, revision=2),
    PresetInfo("D", "resnet110", _LEHUA.format("res110"), (0.5, 0.6, 0.7), _B110, revision=2),
    PresetInfo("nptm-heavy-1", "resnet110", "nptm", (0.7, 0.5, 0.3), _B110),
    PresetInfo("nptm-heavy-2", "resnet110", "nptm", (0.9, 0.7, 0.5), _B110),
    PresetInfo("A", "vgg16", _PFEC,
               vgg_cfg=(32, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                        256, 256, 256, "M", 256, 256, 256)),
    PresetInfo("B", "vgg16", _LEHUA.format("vgg"),
               vgg_cfg=(32, 64, "M", 128, 128, "M", 196, 196, 196, "M",
                        196, 196, 256, "M", 256, 256, 256)),
    PresetInfo("C", "vgg16", _LEHUA.format("vgg"),
               vgg_cfg=(32, 64, "M", 64, 128, "M", 128, 128, 128, "M",
                        196, 196, 196, "M", 196, 196, 196)),
):  # fmt: skip
    PRESETS.register(f"{_s.model}/{_s.name}", _s)


def preset_model(model: str) -> str:
    """The model whose presets `model` uses: the one it is a variant of, else itself."""
    return (MODELS[model].variant_of or model) if model in MODELS else model


def presets_of(model: str) -> list[str]:
    """Preset names defined for `model` (or the model it is a variant of), in registration
    order."""
    base = preset_model(model)
    return [p.name for p in PRESETS.values() if p.model == base]


def find_preset(model: str, name: str) -> PresetInfo:
    known = presets_of(model)
    if name not in known:
        raise IncompatibleError(f"no preset {name!r} for model {model!r}; known: {known or 'none'}")
    return PRESETS[f"{preset_model(model)}/{name}"]


# --- schedules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    # (recipe, budget, steps_per_epoch, peak or None) -> lr per optimizer step
    lr: str
    rewinds: bool = False  # replays part of the pre-training run: budget <= its epochs
    # Starts from the pre-training's weights of epoch T - budget (wr), not the pruned ones.
    rewinds_weights: bool = False
    # Trains the pruned architecture from a fresh initialisation (Liu et al. 2019).
    from_scratch: bool = False
    # Its length is set by the recipe (and the pruned MACs), not by the budget axis.
    full_length: bool = False
    # See PrunerInfo.revision. clr 2: OneCycleLR with the paper's arguments. slr 2: the
    # authors' WarmupLR (per-epoch cosine warm-up, drops counted from its end). scratch*
    # 2: the pruned network initialised at its own (narrow) widths.
    revision: int = 1


SCHEDULES: Registry[ScheduleInfo] = Registry("schedule")
_S = "nptm.trainables.schedules"
for _c in (
    ScheduleInfo("ft", f"{_S}:ft_lr"),
    ScheduleInfo("lrw", f"{_S}:rewind_lr", rewinds=True),
    ScheduleInfo("wr", f"{_S}:rewind_lr", rewinds=True, rewinds_weights=True),
    ScheduleInfo("slr", f"{_S}:slr_lr", revision=2),
    ScheduleInfo("clr", f"{_S}:clr_lr", revision=2),
    ScheduleInfo("scratch", f"{_S}:scratch_lr", from_scratch=True, revision=2),
    ScheduleInfo("scratch_e", f"{_S}:stretched_lr", from_scratch=True, full_length=True,
                 revision=2),
    ScheduleInfo("scratch_b", f"{_S}:stretched_lr", from_scratch=True, full_length=True,
                 revision=2),
):  # fmt: skip
    SCHEDULES.register(_c.name, _c)
FULL_LENGTH_SCHEDULES: frozenset[str] = frozenset(n for n, s in SCHEDULES.items() if s.full_length)


# --- combinations ----------------------------------------------------------------------------


def _known(registry: Registry, name: str) -> None:
    if name not in registry:
        raise IncompatibleError(registry.unknown_reason(name))


def check_model_dataset(model: str, dataset: str) -> None:
    """Raise IncompatibleError with a readable reason if `model` cannot train on `dataset`."""
    _known(DATASETS, dataset)
    _known(MODELS, model)
    d, m = DATASETS[dataset], MODELS[model]
    if d.image_size < m.min_image_size:
        raise IncompatibleError(
            f"model {model!r} needs inputs of at least {m.min_image_size}x{m.min_image_size} "
            f"pixels but dataset {dataset!r} has {d.image_size}x{d.image_size}"
        )


def check_pruner_target(pruner: str, model: str, ratio: float | None, preset: str | None) -> None:
    """Raise IncompatibleError unless exactly one of ratio/preset is given and fits the pruner."""
    _known(PRUNERS, pruner)
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
        find_preset(model, preset)


def definition_revision(
    pruner: str | None = None,
    preset_model: str | None = None,
    preset: str | None = None,
    schedule: str | None = None,
    model: str | None = None,
) -> int:
    """Highest revision of the named model, pruner, preset and schedule definitions
    (1 = original)."""
    revs = [1]
    if model in MODELS:
        revs.append(MODELS[model].revision)
    if pruner in PRUNERS:
        revs.append(PRUNERS[pruner].revision)
    if preset is not None and preset_model is not None and preset in presets_of(preset_model):
        revs.append(find_preset(preset_model, preset).revision)
    if schedule in SCHEDULES:
        revs.append(SCHEDULES[schedule].revision)
    return max(revs)


def pruner_options(
    pruner: str, options: dict[str, object] | None
) -> tuple[tuple[str, object], ...]:
    """The options of an unstructured pruner, defaults filled in, sorted by name; () for
    structured pruners (which take none). Raises IncompatibleError naming a bad option."""
    options = dict(options or {})
    if PRUNERS[pruner].structured:
        if options:
            raise IncompatibleError(
                f"pruner {pruner!r} removes whole filters and takes no options "
                f"({', '.join(sorted(options))}); they apply to unstructured pruners"
            )
        return ()
    resolved = dict(UNSTRUCTURED_OPTIONS)
    for key, value in options.items():
        if key not in UNSTRUCTURED_OPTIONS:
            raise IncompatibleError(f"unknown pruner option {key!r}")
        resolved[key] = value
    if resolved["layers"] not in LAYER_CHOICES:
        raise IncompatibleError(
            f"layers {resolved['layers']!r} is not one of {', '.join(LAYER_CHOICES)}"
        )
    keep = resolved["min_keep"]
    if isinstance(keep, bool) or not isinstance(keep, int | float) or not 0.0 <= keep < 1.0:
        raise IncompatibleError(f"min_keep {keep!r} is outside [0, 1)")
    resolved["min_keep"] = float(keep)
    return tuple(sorted(resolved.items()))


__all__ = [
    "DATASETS",
    "MODELS",
    "PRESETS",
    "PRUNERS",
    "SCHEDULES",
    "IncompatibleError",
    "UnknownName",
]
