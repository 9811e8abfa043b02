"""The networks of the study, built by name for a dataset.

CIFAR ResNets and VGGs follow the code base of Liu et al. 2019 ("Rethinking the value of network
pruning", cifar/l1-norm-pruning/models), which is the one PFEC's published configurations
(nptm.trainables.pruners.presets) are defined against:

- ResNet-20/32/56/110 (He et al. 2016, CIFAR variant): stem conv3x3(16)+BN+ReLU, three stages of
  n = (depth-2)/6 BasicBlocks with 16/32/64 channels, option-A (parameter-free) shortcuts,
  global average pooling and one Linear layer. Where a block downsamples, its shortcut is the
  authors' AvgPool2d(2, 2) followed by zero channels (norm-pruning/cifar/l1-norm-pruning/
  models/resnet.py, `downsample_basic_block`, lines 51-60). `resnet20_subsample` ...
  `resnet110_subsample` keep He et al.'s option A instead, x[:, :, ::2, ::2] plus zero
  channels. Both are parameter- and MAC-free, so the counts are identical; the functions are
  not.
- VGG-16/19 with BatchNorm, conv bias off. The code base's cfg has four 'M' entries; VGG's fifth
  max-pool is replaced by a final nn.AvgPool2d(2) on the 2x2 map of a 32 px input. We use
  nn.AdaptiveAvgPool2d(1), which is the same operation at 32 px and also fits larger inputs.
  Classifier: Linear(512, 512)+BN1d+ReLU+Linear(512, classes).
- resnet56_weightlevel / vgg19_weightlevel: the models of the weight-level (unstructured)
  code base that Le & Hua's weight-level experiments use (the rethinking study's
  cifar/weight-level/models/cifar, after bearpaw's pytorch-classification): a ResNet-56 of
  Bottleneck blocks (9 per stage, 4x expansion, projection shortcuts) and VGG-19-BN with conv
  bias and a single Linear classifier.
- torchvision resnet18/34/50 and mobilenet_v2, untrained (weights=None).

Which builder makes which name is the model registry's business (nptm.trainables.catalog.MODELS).

Every model built here carries `input_shape` (C, H, W) of its dataset, which MAC counting and
the structured-pruning surgery use for their dummy forward pass.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from nptm.trainables.catalog import DATASETS, MODELS, ModelInfo, check_model_dataset
from nptm.trainables.registry import resolve

VGG_CFGS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512,
    ],
}  # fmt: skip


# How an option-A shortcut downsamples: "avgpool" (the authors' code, the default) or
# "subsample" (He et al. 2016).
SHORTCUT_KINDS: tuple[str, ...] = ("avgpool", "subsample")


class ShortcutA(nn.Module):
    """Option-A shortcut: parameter-free spatial downsampling, then zero channels appended
    after the input's channels up to the block's output width.

    kind "avgpool": average pooling over stride x stride windows, AvgPool2d(2, 2) in every
    CIFAR ResNet, as the authors' `downsample_basic_block` (norm-pruning/cifar/l1-norm-pruning/
    models/resnet.py, lines 51-60). `ceil_mode` only matters on a map of odd size, which the
    authors' networks never see: there the last window averages the pixels it covers, so the
    output matches the strided conv's ceil(H / 2). (Their code also cuts the shortcut out of
    the autograd graph, `Variable(torch.cat([x.data, zero_pads]))`; here gradients flow
    through it.)
    kind "subsample": every stride-th pixel, x[:, :, ::2, ::2] (He et al. 2016's option A).

    Only block-internal convs are ever pruned (nptm.trainables.models.prunable_convs), so the
    input and output widths of a shortcut never change."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, kind: str = "avgpool") -> None:
        super().__init__()
        if kind not in SHORTCUT_KINDS:
            raise ValueError(f"shortcut kind {kind!r} is not one of {list(SHORTCUT_KINDS)}")
        self.stride = stride
        self.extra_channels = out_planes - in_planes
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            if self.kind == "avgpool":
                x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
            else:
                x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            # (W left, W right, H top, H bottom, C front, C back): zeros after the old channels.
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def extra_repr(self) -> str:
        return f"kind={self.kind}, stride={self.stride}, zero_channels={self.extra_channels}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU. `conv1`'s output channels are internal to
    the block (they feed only bn1 and conv2), so they can be pruned without touching the
    residual channels."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str = "avgpool") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ShortcutA(in_planes, planes, stride, shortcut)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _CifarResNetTrunk(nn.Module):
    """The CIFAR ResNet layout both code bases share: a 3x3 stem of 16 channels, three stages
    of n blocks at 16/32/64 planes (stride 2 at the start of the second and third), global
    average pooling and one Linear classifier; He-normal convs (fan-out), BN at (1, 0)."""

    def __init__(
        self,
        n: int,
        in_channels: int,
        num_classes: int,
        block: Callable[[int, int, int], nn.Module],
        expansion: int,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes * expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # AvgPool2d(8) on the 8x8 map of a 32 px input
        self.fc = nn.Linear(in_planes, num_classes)
        init_cifar_resnet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _depth_blocks(depth: int, what: str) -> int:
    if (depth - 2) % 6:
        raise ValueError(f"{what} depth must be 6n+2, got depth={depth}")
    return (depth - 2) // 6


class CifarResNet(_CifarResNetTrunk):
    """The PFEC code base's CIFAR ResNet: depth 6n+2 names n BasicBlocks per stage, whose
    downsampling shortcuts are of kind `shortcut` (SHORTCUT_KINDS)."""

    def __init__(
        self, depth: int, in_channels: int, num_classes: int, shortcut: str = "avgpool"
    ) -> None:
        n = _depth_blocks(depth, "CIFAR ResNet")
        block = functools.partial(BasicBlock, shortcut=shortcut)
        super().__init__(n, in_channels, num_classes, block, 1)


def _vgg_features(
    cfg: list[int | str], in_channels: int, conv_bias: bool
) -> tuple[nn.Sequential, int]:
    """VGG's feature extractor: conv3x3 + BN + ReLU per number of `cfg`, a 2x2 max-pool per
    "M"; returns it with the channels it ends with."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            assert isinstance(v, int)
            layers += [
                nn.Conv2d(in_channels, v, 3, padding=1, bias=conv_bias),
                nn.BatchNorm2d(v),
                nn.ReLU(inplace=True),
            ]
            in_channels = v
    return nn.Sequential(*layers), in_channels


class CifarVGG(nn.Module):
    def __init__(self, cfg: list[int | str], in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features, in_channels = _vgg_features(cfg, in_channels, conv_bias=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        init_cifar_vgg(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


class WeightLevelBottleneck(nn.Module):
    """1x1 (planes) - 3x3 (planes, stride) - 1x1 (4 planes), BN after each, projection
    shortcut (1x1 conv + BN) where the shape changes."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class WeightLevelResNet(_CifarResNetTrunk):
    """The CIFAR ResNet of the weight-level code base (models/cifar/resnet.py of the rethinking
    study, after bearpaw's pytorch-classification): depth 6n+2 names n Bottleneck blocks per
    stage (16/32/64 planes, 4x expansion), so ResNet-56 has 9 blocks per stage and a Linear(256)
    classifier."""

    def __init__(self, depth: int, in_channels: int, num_classes: int) -> None:
        n = _depth_blocks(depth, "weight-level ResNet")
        expansion = WeightLevelBottleneck.expansion
        super().__init__(n, in_channels, num_classes, WeightLevelBottleneck, expansion)


class WeightLevelVGG(nn.Module):
    """VGG-BN of the weight-level code base (models/cifar/vgg.py of the rethinking study):
    conv3x3 with bias + BN + ReLU, four max-pools, a 2x2 average pool and one Linear layer."""

    def __init__(self, cfg: list[int | str], in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features, in_channels = _vgg_features(cfg, in_channels, conv_bias=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # AvgPool2d(2) on the 2x2 map of a 32 px input
        self.classifier = nn.Linear(in_channels, num_classes)
        init_weightlevel_vgg(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _torchvision_models() -> ModuleType:
    """torchvision.models, imported on first use: importing it costs seconds (it pulls in
    torch._dynamo), which every trial process would otherwise pay for the CIFAR models."""
    import torchvision.models

    return torchvision.models


def build_torchvision(info: ModelInfo, in_channels: int, num_classes: int) -> nn.Module:
    name = info.name
    model = getattr(_torchvision_models(), name)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        if name == "mobilenet_v2":
            old = model.features[0][0]
            model.features[0][0] = nn.Conv2d(in_channels, old.out_channels, 3, 2, 1, bias=False)
        else:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


def build_cifar_resnet(info: ModelInfo, in_channels: int, num_classes: int) -> nn.Module:
    return CifarResNet(info.depth, in_channels, num_classes, shortcut="avgpool")


def build_cifar_resnet_subsample(info: ModelInfo, in_channels: int, num_classes: int) -> nn.Module:
    return CifarResNet(info.depth, in_channels, num_classes, shortcut="subsample")


def build_cifar_vgg(info: ModelInfo, in_channels: int, num_classes: int) -> nn.Module:
    return CifarVGG(VGG_CFGS[info.name], in_channels, num_classes)


def build_weightlevel_resnet(info: ModelInfo, in_channels: int, num_classes: int) -> nn.Module:
    return WeightLevelResNet(info.depth, in_channels, num_classes)


def build_weightlevel_vgg(info: ModelInfo, in_channels: int, num_classes: int) -> nn.Module:
    return WeightLevelVGG(VGG_CFGS["vgg19"], in_channels, num_classes)


# --- initialisation ---------------------------------------------------------------------------
# A model entry's `init` (nptm.trainables.catalog.ModelInfo) is its code base's rule, applied to
# every layer at the layer's own shape. The constructors call it; `reinitialize` calls it on a
# pruned network, whose narrow layers then get the scale of their own width.


def init_cifar_resnet(model: nn.Module) -> None:
    """Both CIFAR ResNet code bases: convs from normal(0, sqrt(2 / (k * k * out_channels)))
    (He-normal, fan-out; the authors' norm-pruning/cifar/l1-norm-pruning/models/resnet.py,
    lines 92-98), BatchNorm (1, 0); the Linear layer keeps PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_cifar_vgg(model: nn.Module) -> None:
    """The rethinking code base's VGG: He-normal convs (fan-out), BatchNorm2d (0.5, 0), Linear
    from normal(0, 0.01) with zero bias; BatchNorm1d keeps PyTorch's default (1, 0)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def init_weightlevel_vgg(model: nn.Module) -> None:
    """The weight-level code base's VGG: convs from normal(0, sqrt(2 / (k * k * in_channels)))
    (He-normal, fan-in) with zero bias, BatchNorm (1, 0), Linear normal(0, 0.01), zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def init_torchvision(model: nn.Module) -> None:
    """torchvision's constructors: He-normal convs (fan-out) with zero bias, BatchNorm and
    GroupNorm (1, 0); MobileNetV2 also draws its Linear from normal(0, 0.01) with zero bias,
    the ResNets keep PyTorch's default Linear."""
    normal_linear = isinstance(model, _torchvision_models().MobileNetV2)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif normal_linear and isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def reinitialize(model: nn.Module, model_name: str, *, seed: int | None = None) -> nn.Module:
    """Draw every weight of `model`, a network of entry `model_name` (pruned or not), afresh
    at its layers' actual shapes, in place; returns `model`.

    Each module's `reset_parameters()` (PyTorch's default, which the constructors start from;
    BatchNorm's running statistics included), then the entry's `init` rule, under `seed`. A
    pruned conv thus gets the init scale of its narrow width, as in the authors' main_B.py,
    which builds the pruned cfg and initialises it (Liu et al. 2019's scratch training).
    Unstructured masks stay: the weights under them are drawn afresh and the masks applied
    again. For an unpruned model of this module's classes this draws exactly the weights
    `build_model(model_name, dataset, seed=seed)` draws."""
    if model_name not in MODELS:
        raise ValueError(MODELS.unknown_reason(model_name))
    init = MODELS[model_name].init
    masks = {}
    for m in model.modules():
        if hasattr(m, "weight_orig") and hasattr(m, "weight_mask"):
            masks[m] = m.weight_mask.detach().clone()
            prune.remove(m, "weight")  # weight becomes a plain parameter again
    with _seeded(seed):
        for m in model.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
        if init:
            resolve(init)(model)
    for m, mask in masks.items():
        prune.custom_from_mask(m, "weight", mask)
    return model


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed the CPU generator inside the block only; the caller's RNG state is restored."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(name: str, dataset: str, *, seed: int | None = None) -> nn.Module:
    """Model `name` sized for `dataset` (input channels, classes), on CPU, in training mode."""
    check_model_dataset(name, dataset)
    info, data = MODELS[name], DATASETS[dataset]
    with _seeded(seed):
        model: nn.Module = resolve(info.build)(info, data.in_channels, data.num_classes)
    model.input_shape = (data.in_channels, data.image_size, data.image_size)
    return model


def conv_names(model: nn.Module) -> list[str]:
    """Names of every Conv2d, in module registration order (= forward order for our models)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def prunable_convs(model: nn.Module, model_name: str) -> list[str]:
    """Convs whose output channels (filters) can be removed without touching residual channels
    (the model entry's `prunable_convs` function decides):

    - CIFAR ResNets: conv1 of every BasicBlock (PFEC practice; conv2 feeds the residual add).
    - weight-level ResNet: conv1 and conv2 of every Bottleneck (conv3 feeds the residual add).
    - VGGs: every conv.
    - torchvision ResNets: every conv inside a block except the block's last one (conv2 of a
      BasicBlock, conv3 of a Bottleneck) and the downsample conv, which feed the residual add.
    - MobileNetV2: the 1x1 expansion conv of every inverted residual block that has one. Its
      channels are shared with the block's depthwise conv, which the surgery prunes along; the
      projection conv feeds the residual add (or the next block) and is kept.
    Stems and the final 1x1 conv of MobileNetV2 are not pruned.
    """
    if model_name not in MODELS:
        raise ValueError(MODELS.unknown_reason(model_name))
    return resolve(MODELS[model_name].prunable_convs)(model)


def basic_block_convs(model: nn.Module) -> list[str]:
    return [f"{n}.conv1" for n, m in model.named_modules() if isinstance(m, BasicBlock)]


def bottleneck_convs(model: nn.Module) -> list[str]:
    return [
        f"{n}.{c}"
        for n, m in model.named_modules()
        if isinstance(m, WeightLevelBottleneck)
        for c in ("conv1", "conv2")
    ]


def all_convs(model: nn.Module) -> list[str]:
    return conv_names(model)


def torchvision_convs(model: nn.Module) -> list[str]:
    names: list[str] = []
    tv = _torchvision_models()
    for name, m in model.named_modules():
        if isinstance(m, tv.resnet.BasicBlock):
            names.append(f"{name}.conv1")
        elif isinstance(m, tv.resnet.Bottleneck):
            names += [f"{name}.conv1", f"{name}.conv2"]
        elif isinstance(m, tv.mobilenetv2.InvertedResidual) and len(m.conv) == 4:
            # [expand Conv-BN-ReLU6, depthwise Conv-BN-ReLU6, project conv, BN]
            names.append(f"{name}.conv.0.0")
    return names
