"""Models: architectures, shapes, compatibility errors, seeding and prunable-conv selection."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch_pruning as tp
from torch import nn

from nptm.trainables.catalog import DATASETS, MODELS, IncompatibleError
from nptm.trainables.models import (
    VGG_CFGS,
    BasicBlock,
    ShortcutA,
    WeightLevelBottleneck,
    build_model,
    build_torchvision,
    conv_names,
    prunable_convs,
)

CIFAR_PAIRS = [
    (m, d)
    for m in (
        "resnet20", "resnet32", "resnet56", "resnet110", "vgg16", "vgg19",
        "resnet56_weightlevel", "vgg19_weightlevel",
    )
    for d in ("cifar10", "cifar100")
] + [
    (m, "digits")
    for m in ("resnet20", "resnet32", "resnet56", "resnet110", "resnet56_weightlevel")
]  # fmt: skip
TORCHVISION = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")


@pytest.mark.parametrize(("name", "dataset"), CIFAR_PAIRS)
def test_forward_shape_on_dataset(name: str, dataset: str) -> None:
    info = DATASETS[dataset]
    model = build_model(name, dataset, seed=0).eval()
    assert model.input_shape == (info.in_channels, info.image_size, info.image_size)
    with torch.no_grad():
        y = model(torch.randn(2, *model.input_shape))
    assert y.shape == (2, info.num_classes)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_forward(name: str) -> None:
    # Built for ImageNet (1000 classes); a 64 px input keeps the test fast and is the
    # catalog's minimum image size for these models.
    model = build_model(name, "imagenet", seed=0).eval()
    assert model.input_shape == (3, 224, 224)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_first_conv_replaced_for_other_channel_counts(name: str) -> None:
    model = build_torchvision(MODELS[name], in_channels=1, num_classes=7).eval()
    assert next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize(("name", "dataset"), [("vgg16", "digits"), ("resnet50", "digits")])
def test_incompatible_pair_names_both(name: str, dataset: str) -> None:
    with pytest.raises(IncompatibleError) as err:
        build_model(name, dataset)
    assert name in str(err.value) and dataset in str(err.value)


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(IncompatibleError, match="unknown model 'resnet57'; did you mean"):
        build_model("resnet57", "cifar10")
    with pytest.raises(IncompatibleError, match="svhn"):
        build_model("resnet20", "svhn")


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_cifar_resnet_structure(depth: int) -> None:
    model = build_model(f"resnet{depth}", "cifar10")
    n = (depth - 2) // 6
    for stage, planes in zip((model.layer1, model.layer2, model.layer3), (16, 32, 64), strict=True):
        assert len(stage) == n
        assert all(isinstance(b, BasicBlock) for b in stage)
        assert all(b.conv1.out_channels == b.conv2.out_channels == planes for b in stage)
    # depth = stem + 2 convs per block + fc; option-A shortcuts add no conv
    assert len(conv_names(model)) == depth - 1
    assert model.conv1.out_channels == 16 and model.fc.in_features == 64


def test_option_a_shortcut_is_parameter_free_subsample_and_zero_pad() -> None:
    block = build_model("resnet20", "cifar10").layer2[0]
    assert isinstance(block.shortcut, ShortcutA)
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.equal(out[:, 16:], torch.zeros(2, 16, 4, 4))


def test_model_pickles_and_copies() -> None:
    model = build_model("resnet20", "cifar10", seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert torch.equal(clone.eval()(x), model(x))


@pytest.mark.parametrize("name", ["vgg16", "vgg19"])
def test_vgg_channels_follow_published_cfg(name: str) -> None:
    model = build_model(name, "cifar10")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [v for v in VGG_CFGS[name] if v != "M"]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(512, 512), (512, 10)]
    assert isinstance(model.classifier[1], nn.BatchNorm1d)


def test_seed_fixes_init_without_touching_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model("resnet20", "cifar10", seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model("resnet20", "cifar10", seed=7).state_dict()
    c = build_model("resnet20", "cifar10", seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def _other_conv_outputs_in_group(
    graph: tp.DependencyGraph, model: nn.Module, name: str
) -> list[nn.Conv2d]:
    """Convs besides `name` whose output channels torch-pruning removes with `name`'s."""
    conv = dict(model.named_modules())[name]
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, [0])
    return [
        dep.target.module
        for dep, _ in group
        if isinstance(dep.target.module, nn.Conv2d)
        and dep.target.module is not conv
        and graph.is_out_channel_pruning_fn(dep.handler)
    ]


def test_prunable_convs_cifar() -> None:
    r56 = build_model("resnet56", "cifar10")
    names = prunable_convs(r56, "resnet56")
    assert names == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(9)]
    assert prunable_convs(build_model("vgg16", "cifar10"), "vgg16") == conv_names(
        build_model("vgg16", "cifar10")
    )


@pytest.mark.parametrize(
    ("name", "count"), [("resnet18", 8), ("resnet50", 32), ("mobilenet_v2", 16)]
)
def test_prunable_convs_torchvision_avoid_residual_channels(name: str, count: int) -> None:
    # resnet18: one conv1 per BasicBlock (8 blocks); resnet50: conv1+conv2 of 16 bottlenecks;
    # mobilenet_v2: the expansion conv of the 16 inverted residuals with expand_ratio 6.
    model = build_model(name, "imagenet", seed=0)
    names = prunable_convs(model, name)
    assert len(names) == count
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=torch.zeros(1, 3, 64, 64), verbose=False
    )
    for n in names:
        others = _other_conv_outputs_in_group(graph, model, n)
        # Only MobileNetV2's depthwise conv shares the channels; nothing reaches a residual add.
        assert all(c.groups == c.out_channels for c in others), (n, others)
        assert len(others) == (1 if name == "mobilenet_v2" else 0)


def weightlevel_resnet56_params(classes: int) -> int:
    """Hand count of the weight-level code base's ResNet-56 (rethinking study,
    cifar/weight-level/models/cifar/resnet.py): stem, 3 stages of 9 Bottlenecks
    (1x1 p, 3x3 p, 1x1 4p, a BN after each), a 1x1 projection + BN in each stage's first block,
    Linear(256, classes)."""
    total = 3 * 16 * 9 + 2 * 16
    in_ch = 16
    for p in (16, 32, 64):
        for block in range(9):
            total += in_ch * p + 9 * p * p + p * 4 * p + 2 * (p + p + 4 * p)
            if block == 0:
                total += in_ch * 4 * p + 2 * 4 * p
            in_ch = 4 * p
    return total + 256 * classes + classes


def weightlevel_vgg19_params(classes: int) -> int:
    """Hand count of the weight-level VGG-19-BN (cifar/weight-level/models/cifar/vgg.py): convs
    with bias, a BN after each, one Linear(512, classes)."""
    cfg = [64, 64, 128, 128, 256, 256, 256, 256] + [512] * 8
    total, in_ch = 0, 3
    for out in cfg:
        total += in_ch * out * 9 + out + 2 * out
        in_ch = out
    return total + 512 * classes + classes


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_weightlevel_models_match_the_authors_architecture(dataset: str) -> None:
    classes = DATASETS[dataset].num_classes
    resnet = build_model("resnet56_weightlevel", dataset)
    vgg = build_model("vgg19_weightlevel", dataset)
    assert sum(p.numel() for p in resnet.parameters()) == weightlevel_resnet56_params(classes)
    assert sum(p.numel() for p in vgg.parameters()) == weightlevel_vgg19_params(classes)
    if dataset == "cifar10":
        # published: 20.04M for VGG-19 (BN) on CIFAR-10 (bearpaw/pytorch-classification README)
        assert round(weightlevel_vgg19_params(10) / 1e6, 2) == 20.04
    for stage in (resnet.layer1, resnet.layer2, resnet.layer3):
        assert len(stage) == 9 and all(isinstance(b, WeightLevelBottleneck) for b in stage)
        assert stage[0].downsample is not None
        assert all(b.downsample is None for b in stage[1:])
    assert resnet.fc.in_features == 256
    linears = [m for m in vgg.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 512
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16 and all(c.bias is not None for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.modules()) == 4


def test_weightlevel_resnet_prunable_convs_are_bottleneck_internal() -> None:
    model = build_model("resnet56_weightlevel", "cifar10")
    names = prunable_convs(model, "resnet56_weightlevel")
    assert len(names) == 2 * 27
    assert names[:2] == ["layer1.0.conv1", "layer1.0.conv2"]
    assert not any(n.endswith("conv3") or "downsample" in n for n in names)
