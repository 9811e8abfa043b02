"""Models: architectures, shapes, compatibility errors, seeding and prunable-conv selection."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch_pruning as tp
from torch import nn

from trainables.catalog import DATASETS, IncompatibleError
from trainables.models import (
    VGG_CFGS,
    BasicBlock,
    ShortcutA,
    _torchvision_model,
    build_model,
    conv_names,
    prunable_convs,
)

CIFAR_PAIRS = [
    (m, d)
    for m in ("resnet20", "resnet32", "resnet56", "resnet110", "vgg16", "vgg19")
    for d in ("cifar10", "cifar100")
] + [(m, "digits") for m in ("resnet20", "resnet32", "resnet56", "resnet110")]
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
    model = _torchvision_model(name, in_channels=1, num_classes=7).eval()
    assert next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize(("name", "dataset"), [("vgg16", "digits"), ("resnet50", "digits")])
def test_incompatible_pair_names_both(name: str, dataset: str) -> None:
    with pytest.raises(IncompatibleError) as err:
        build_model(name, dataset)
    assert name in str(err.value) and dataset in str(err.value)


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(IncompatibleError, match="resnet57"):
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
