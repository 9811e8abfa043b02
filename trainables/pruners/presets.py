"""Published filter-pruning configurations of PFEC (Li et al. 2017), as the rethinking code
base replicates them (cifar/l1-norm-pruning: res56prune.py, res110prune.py, vggprune.py).

Conv layers are numbered 1..N in module order; layer 1 is the stem conv. In the CIFAR ResNets
only even layer ids (the first conv of each BasicBlock) are pruned, except those in the preset's
skip list; the stage of a layer id sets its ratio p, and a pruned layer keeps
int(out_channels * (1 - p)) filters, exactly as in the reference scripts.

Presets A and B are PFEC's. C and D are this project's heavier variants for the retraining
study (Le & Hua 2021 use stronger pruning than PFEC): B's skip lists with stage ratios
C = [0.7, 0.5, 0.3] and D = [0.9, 0.7, 0.5], for ResNet-56 and ResNet-110 alike.

VGG-16 A prunes 50% of the filters of conv layer 1 and conv layers 8..13, which gives the
published cfg [32, 64, M, 128, 128, M, 256, 256, 256, M, 256, 256, 256, M, 256, 256, 256].
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from trainables.catalog import PRESETS


@dataclass(frozen=True)
class ResNetPreset:
    skip: frozenset[int]  # layer ids never pruned
    stage_ratios: tuple[float, float, float]  # fraction of filters removed, per stage


_B56 = frozenset({16, 18, 20, 34, 38, 54})
_B110 = frozenset({36, 38, 74})
RESNET_PRESETS: dict[str, dict[str, ResNetPreset]] = {
    "resnet56": {
        "A": ResNetPreset(frozenset({16, 20, 38, 54}), (0.1, 0.1, 0.1)),
        "B": ResNetPreset(_B56, (0.6, 0.3, 0.1)),
        "C": ResNetPreset(_B56, (0.7, 0.5, 0.3)),
        "D": ResNetPreset(_B56, (0.9, 0.7, 0.5)),
    },
    "resnet110": {
        "A": ResNetPreset(frozenset({36}), (0.5, 0.0, 0.0)),
        "B": ResNetPreset(_B110, (0.5, 0.4, 0.3)),
        "C": ResNetPreset(_B110, (0.7, 0.5, 0.3)),
        "D": ResNetPreset(_B110, (0.9, 0.7, 0.5)),
    },
}
# Last layer id of stages 0 and 1 (res56prune.py / res110prune.py).
STAGE_ENDS: dict[str, tuple[int, int]] = {"resnet56": (18, 36), "resnet110": (36, 72)}

# layer id -> fraction of filters removed
VGG_PRESETS: dict[str, dict[str, dict[int, float]]] = {
    "vgg16": {"A": {1: 0.5, **{i: 0.5 for i in range(8, 14)}}},
}


def layer_ratios(model_name: str, preset: str, num_convs: int) -> dict[int, float]:
    """Layer id (1-based conv index) -> pruning ratio, for the layers the preset prunes."""
    if preset not in PRESETS.get(model_name, ()):
        raise ValueError(
            f"no preset {preset!r} for model {model_name!r}; "
            f"known: {list(PRESETS.get(model_name, ())) or 'none'}"
        )
    if model_name in VGG_PRESETS:
        return dict(VGG_PRESETS[model_name][preset])
    spec, (end0, end1) = RESNET_PRESETS[model_name][preset], STAGE_ENDS[model_name]
    ratios = {}
    for layer_id in range(2, num_convs + 1, 2):
        if layer_id in spec.skip:
            continue
        stage = 0 if layer_id <= end0 else 1 if layer_id <= end1 else 2
        if spec.stage_ratios[stage] > 0:
            ratios[layer_id] = spec.stage_ratios[stage]
    return ratios


def preset_removals(model: nn.Module, model_name: str, preset: str) -> dict[str, int]:
    """Conv module name -> number of filters the preset removes from it (layers it prunes)."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    expected = {"resnet56": 55, "resnet110": 109, "vgg16": 13}.get(model_name)
    if expected is not None and len(convs) != expected:
        raise ValueError(
            f"preset {preset!r} is defined for the {model_name} of trainables.models "
            f"({expected} convs); this model has {len(convs)}"
        )
    removals = {}
    for layer_id, p in layer_ratios(model_name, preset, len(convs)).items():
        name, conv = convs[layer_id - 1]
        keep = max(int(conv.out_channels * (1 - p)), 1)  # the reference scripts' rounding
        if conv.out_channels > keep:
            removals[name] = conv.out_channels - keep
    return removals
