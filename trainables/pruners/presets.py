"""Published filter-pruning configurations, defined in nptm.trainables.catalog.PRESETS.

Conv layers are numbered 1..N in module order; layer 1 is the stem conv. Three kinds:

- Stage ratios + skip list (CIFAR ResNets; PFEC's A/B and Le & Hua's C/D, as the authors'
  norm-pruning/cifar/l1-norm-pruning/res56prune.py and res110prune.py define them): only even
  layer ids (the first conv of each BasicBlock) are pruned, except those in the skip list; the
  stage of a layer id sets its ratio p, and a pruned layer keeps int(out_channels * (1 - p))
  filters, exactly as in those scripts. Stage ends: layer 18/36 (ResNet-56), 36/72
  (ResNet-110). `nptm-heavy-1`/`nptm-heavy-2` are this project's own heavier variants (B's
  skip lists, stage ratios [0.7, 0.5, 0.3] and [0.9, 0.7, 0.5]).
- A VGG cfg (vggprune.py's A, B, C): conv i keeps the cfg's i-th channel count.
- Per-conv rates (HRank's compress_rate, `hrank-paper`): a prunable conv with layer id L loses
  int(rate[L - 1] * out_channels) filters, HRank's rounding. Only block-internal convs can be
  removed physically here (nptm.trainables.models.prunable_convs), so the rates of the stem and of
  each block's second conv, which HRank applies as masks, are not applied (docs/protocol.md).
"""

from __future__ import annotations

from torch import nn

from nptm.trainables.catalog import IncompatibleError, find_preset, preset_model
from nptm.trainables.models import prunable_convs

# Last layer id of stages 0 and 1 (res56prune.py / res110prune.py).
STAGE_ENDS: dict[str, tuple[int, int]] = {"resnet56": (18, 36), "resnet110": (36, 72)}
EXPECTED_CONVS: dict[str, int] = {"resnet56": 55, "resnet110": 109, "vgg16": 13}


def layer_keep(model_name: str, preset: str, out_channels: list[int]) -> dict[int, int]:
    """Layer id (1-based conv index) -> filters kept, for the layers the preset prunes."""
    try:
        spec = find_preset(model_name, preset)
    except IncompatibleError as err:
        raise ValueError(str(err)) from None
    if spec.vgg_cfg is not None:
        cfg = [c for c in spec.vgg_cfg if c != "M"]
        return {i + 1: int(c) for i, c in enumerate(cfg) if c != out_channels[i]}
    if spec.conv_rates is not None:
        return {
            i + 1: out_channels[i] - int(rate * out_channels[i])
            for i, rate in enumerate(spec.conv_rates)
            if rate > 0
        }
    assert spec.stage_ratios is not None
    end0, end1 = STAGE_ENDS[preset_model(model_name)]
    keep = {}
    for layer_id in range(2, len(out_channels) + 1, 2):
        if layer_id in spec.skip:
            continue
        stage = 0 if layer_id <= end0 else 1 if layer_id <= end1 else 2
        p = spec.stage_ratios[stage]
        if p > 0:
            keep[layer_id] = int(out_channels[layer_id - 1] * (1 - p))  # the scripts' rounding
    return keep


def preset_removals(model: nn.Module, model_name: str, preset: str) -> dict[str, int]:
    """Conv module name -> number of filters the preset removes from it (layers it prunes)."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    expected = EXPECTED_CONVS.get(preset_model(model_name))
    if expected is not None and len(convs) != expected:
        raise ValueError(
            f"preset {preset!r} is defined for the {model_name} of nptm.trainables.models "
            f"({expected} convs); this model has {len(convs)}"
        )
    prunable = set(prunable_convs(model, model_name))
    removals = {}
    for layer_id, keep in layer_keep(
        model_name, preset, [m.out_channels for _, m in convs]
    ).items():
        name, conv = convs[layer_id - 1]
        if name not in prunable:
            continue  # rates of convs that feed a residual add (HRank's masks) are not applied
        keep = max(keep, 1)
        if conv.out_channels > keep:
            removals[name] = conv.out_channels - keep
    return removals
