"""Models: architectures, shapes, compatibility errors, seeding and prunable-conv selection."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch_pruning as tp
from torch import nn

from nptm.trainables.catalog import (
    DATASETS,
    MODELS,
    IncompatibleError,
    definition_revision,
    presets_of,
)
from nptm.trainables.models import (
    VGG_CFGS,
    BasicBlock,
    ShortcutA,
    WeightLevelBottleneck,
    build_model,
    build_torchvision,
    conv_names,
    prunable_convs,
    reinitialize,
)
from nptm.trainables.pruners import apply_plan, compute_plan

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


def _hand_shortcut(x: torch.Tensor, out_channels: int, pick) -> torch.Tensor:
    """A downsampling option-A shortcut by hand: every 2x2 window of each channel reduced by
    `pick`, then zero channels up to `out_channels`."""
    n, c, h, w = x.shape
    out = torch.zeros(n, out_channels, h // 2, w // 2)
    for b in range(n):
        for ch in range(c):
            for i in range(h // 2):
                for j in range(w // 2):
                    out[b, ch, i, j] = pick(x[b, ch, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2])
    return out


def _residual_branch_off(block: BasicBlock) -> BasicBlock:
    """The block with bn2 scaled to 0, so its output is relu(shortcut(x)); in eval mode."""
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    return block.eval()


@pytest.mark.parametrize(
    ("name", "kind", "pick"),
    [
        ("resnet20", "avgpool", lambda w: (w[0, 0] + w[0, 1] + w[1, 0] + w[1, 1]) / 4),
        ("resnet20_subsample", "subsample", lambda w: w[0, 0]),
    ],
)
def test_downsampling_shortcut_forward_equals_a_hand_computation(name, kind, pick) -> None:
    # The authors' downsample_basic_block (l1-norm-pruning/models/resnet.py): AvgPool2d(2, 2),
    # then zeros after the 16 input channels; `_subsample` keeps x[:, :, ::2, ::2].
    block = build_model(name, "cifar10", seed=0).layer2[0]
    assert isinstance(block.shortcut, ShortcutA) and block.shortcut.kind == kind
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    x = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(1))
    expected = _hand_shortcut(x, 32, pick)
    with torch.no_grad():
        assert torch.allclose(block.shortcut(x), expected, rtol=0, atol=1e-6)
        # one forward of the whole block: relu(residual + shortcut) with the residual at 0
        out = _residual_branch_off(block)(x)
    assert out.shape == (2, 32, 2, 3)
    assert torch.allclose(out, expected.clamp(min=0), rtol=0, atol=1e-6)
    assert torch.equal(out[:, 16:], torch.zeros(2, 16, 2, 3))


def test_avgpool_is_the_default_and_subsample_keeps_the_old_function() -> None:
    x = torch.randn(1, 16, 8, 8)
    avg = build_model("resnet56", "cifar10", seed=0).layer3[0].shortcut
    sub = build_model("resnet56_subsample", "cifar10", seed=0).layer3[0].shortcut
    assert (avg.kind, sub.kind) == ("avgpool", "subsample")
    assert not torch.allclose(avg(x), sub(x))
    assert torch.equal(sub(x)[:, :16], x[:, :, ::2, ::2])  # revision 1's function
    # The shortcut changed what resnet20..110 compute: revision 2, which the pretrain stage
    # id hashes; the variants are new names of the old function.
    for d in (20, 32, 56, 110):
        assert definition_revision(model=f"resnet{d}") == 2
        assert MODELS[f"resnet{d}_subsample"].revision == 1
        assert presets_of(f"resnet{d}_subsample") == presets_of(f"resnet{d}")
    assert definition_revision(model="resnet56_weightlevel") == 1  # projection shortcuts
    with pytest.raises(ValueError, match="shortcut kind 'max'"):
        ShortcutA(16, 32, 2, kind="max")


def test_avgpool_shortcut_on_an_odd_map_matches_the_strided_conv() -> None:
    # 5x5 -> 3x3 like conv3x3(stride 2, padding 1); the last row/column averages what it covers.
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    out = ShortcutA(1, 2, 2)(x)
    assert out.shape == (1, 2, 3, 3)
    assert out[0, 0, 0, 0] == (0 + 1 + 5 + 6) / 4 and out[0, 0, 2, 2] == 24
    assert out[0, 0, 0, 2] == (4 + 9) / 2 and torch.equal(out[0, 1], torch.zeros(3, 3))


@pytest.mark.parametrize("name", ["resnet20", "resnet20_subsample"])
def test_filter_pruning_keeps_the_shortcut_padding_to_the_block_width(name: str) -> None:
    model = build_model(name, "cifar10", seed=0)
    plan = compute_plan(model, name, "l1_filter", ratio=0.5)
    pruned = apply_plan(copy.deepcopy(model), plan).eval()
    for block in (pruned.layer2[0], pruned.layer3[0]):
        assert block.conv1.out_channels == block.conv2.in_channels == block.conv2.out_channels // 2
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        # the shortcut appends zeros up to the block's (unpruned) output width
        assert block.shortcut(x).shape[1] == block.bn2.num_features == block.conv2.out_channels
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


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


# --- scratch training: the pruned network initialised at its own widths ----------------------


def _std(weights: list[torch.Tensor]) -> float:
    return float(torch.cat([w.detach().flatten() for w in weights]).std())


def test_scratch_init_of_resnet56_b_is_drawn_at_the_narrow_width() -> None:
    """PFEC's ResNet-56-B keeps int(16 x 0.4) = 6 filters of the layer-1 convs it prunes (ids
    2..14). The authors' main_B.py builds that narrow network, whose He-normal (fan-out) init
    draws normal(0, sqrt(2 / (3 * 3 * 6))) = 0.192; the wide network's filters have
    sqrt(2 / (3 * 3 * 16)) = 0.118."""
    narrow, wide = math.sqrt(2 / (9 * 6)), math.sqrt(2 / (9 * 16))
    model = build_model("resnet56", "cifar10", seed=0)
    pruned = apply_plan(model, compute_plan(model, "resnet56", "l1_filter", preset="B"))
    convs = [b.conv1 for b in pruned.layer1 if b.conv1.out_channels == 6]
    assert len(convs) == 7 and pruned.layer1[0].conv1.out_channels == 6
    # Filters removed from the wide init: its scale (a little above it, as l1_filter keeps the
    # filters of largest L1 norm).
    assert _std([c.weight for c in convs]) == pytest.approx(wide, rel=0.1)
    reinitialize(pruned, "resnet56", seed=1)
    # 7 x 864 weights: the sample std is within ~1 % (one standard error) of the rule's
    assert _std([c.weight for c in convs]) == pytest.approx(narrow, rel=0.05)
    assert _std([pruned.layer1[0].conv1.weight]) == pytest.approx(narrow, rel=0.12)
    # an unpruned conv keeps its fan-out, so its scale
    assert _std([b.conv2.weight for b in pruned.layer1]) == pytest.approx(wide, rel=0.05)
    bn = pruned.layer1[0].bn1
    assert torch.equal(bn.weight, torch.ones(6)) and torch.equal(bn.running_var, torch.ones(6))


def test_scratch_init_of_the_weight_level_vgg_follows_its_fan_in_rule() -> None:
    # weight-level VGG: normal(0, sqrt(2 / (3 * 3 * in_channels))); halving every conv halves
    # the second conv's input channels, 64 -> 32.
    model = build_model("vgg19_weightlevel", "cifar10", seed=0)
    pruned = apply_plan(model, compute_plan(model, "vgg19_weightlevel", "l1_filter", ratio=0.5))
    reinitialize(pruned, "vgg19_weightlevel", seed=1)
    second = pruned.features[3]
    assert second.in_channels == 32
    assert _std([second.weight]) == pytest.approx(math.sqrt(2 / (9 * 32)), rel=0.05)
    assert torch.equal(second.bias, torch.zeros(32))


@pytest.mark.parametrize(
    "name", ["resnet20", "resnet20_subsample", "vgg16", "resnet56_weightlevel", "vgg19_weightlevel"]
)
def test_reinitializing_an_unpruned_model_draws_what_its_constructor_draws(name: str) -> None:
    built = build_model(name, "cifar10", seed=3).state_dict()
    redrawn = reinitialize(build_model(name, "cifar10", seed=5), name, seed=3).state_dict()
    assert built.keys() == redrawn.keys()
    assert all(torch.equal(built[k], redrawn[k]) for k in built)


def test_unstructured_scratch_keeps_the_masks_after_redrawing() -> None:
    model = build_model("resnet20", "cifar10", seed=0)
    plan = compute_plan(model, "resnet20", "magnitude", ratio=0.5)
    masked = reinitialize(apply_plan(model, plan), "resnet20", seed=7)
    fresh = build_model("resnet20", "cifar10", seed=7)
    conv, ref = masked.layer2[1].conv1, fresh.layer2[1].conv1
    assert torch.equal(conv.weight_mask, plan.masks["layer2.1.conv1"].float())
    assert torch.equal(conv.weight_orig, ref.weight)  # widths unchanged: the same draw
    assert torch.equal(conv.weight, ref.weight * conv.weight_mask)


def test_the_scratch_stage_trains_the_narrow_initialisation(tmp_path, monkeypatch) -> None:
    """run_stage's scratch retraining starts from reinitialize(pruned architecture): a
    resnet20 pruned by half keeps 8 of 16 layer-1 filters, drawn at sqrt(2 / (9 * 8))."""
    from nptm.trainables import stage_runner
    from nptm.trainables.artifacts import ArtifactStore
    from nptm.trainables.recipe import default_recipe
    from nptm.trainables.stage import StageOutcome, StageSpec

    seen: list[tuple[str, int, float]] = []

    def spy(model: nn.Module, name: str, *, seed: int | None = None) -> nn.Module:
        reinitialize(model, name, seed=seed)
        assert seed is not None
        seen.append((name, seed, _std([b.conv1.weight for b in model.layer1])))
        return model

    monkeypatch.setattr(stage_runner, "reinitialize", spy)
    recipe = default_recipe("digits")
    pre = StageSpec("pretrain", "digits", "resnet20", 0, recipe)
    store = ArtifactStore(str(tmp_path))
    model = build_model("resnet20", "digits", seed=0)
    store.save(pre.id, stage_runner.MODEL, stage_runner.model_payload(pre, model, []))
    store.write_outcome(StageOutcome(pre.id, "pretrain", "ok", test_acc=0.5))
    env = stage_runner.WorkerEnv(storage=str(tmp_path))
    prune = StageSpec(
        "prune", "digits", "resnet20", 0, recipe, parents=(pre.id,), pruner="l1_filter", ratio=0.5
    )
    assert stage_runner.run_stage(prune, env).status == "ok"
    retrain = StageSpec(
        "retrain", "digits", "resnet20", 0, recipe, parents=(prune.id,), pruner="l1_filter",
        ratio=0.5, schedule="scratch", budget=1,
    )  # fmt: skip
    assert stage_runner.run_stage(retrain, env).status == "ok"
    ((name, seed, std),) = seen
    assert (name, seed) == ("resnet20", int(retrain.id[:8], 16))
    assert std == pytest.approx(math.sqrt(2 / (9 * 8)), rel=0.1)  # 3 x 1,152 weights
