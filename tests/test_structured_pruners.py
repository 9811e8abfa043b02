"""Filter pruners: per-layer counts, importance rankings, PFEC presets and the surgery."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nptm.trainables.macs import count_params_macs
from nptm.trainables.models import build_model, conv_names, prunable_convs
from nptm.trainables.pruners import apply_plan, compute_plan
from nptm.trainables.pruners.structured import (
    apply_structured,
    filter_counts,
    hrank_importance,
    structured_plan,
    taylor_importance,
)

STRUCTURED = ("l1_filter", "random_filter", "hrank", "taylor_conv_oneshot")


def batches(dataset: str = "digits", n: int = 2, size: int = 16, seed: int = 0):
    shape = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}[dataset]
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, *shape, generator=gen), torch.randint(0, 10, (size,), generator=gen))
        for _ in range(n)
    ]


def out_channels(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# targets


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9])
def test_ratio_removes_floor_of_every_prunable_conv(ratio: float) -> None:
    model = build_model("resnet20", "cifar10")
    plan = structured_plan(model, "resnet20", "l1_filter", ratio=ratio)
    expected = {}
    for name in prunable_convs(model, "resnet20"):
        out = dict(model.named_modules())[name].out_channels
        if math.floor(out * ratio) > 0:
            expected[name] = math.floor(out * ratio)
    assert {n: len(v) for n, v in plan.removed_channels.items()} == expected


def _resnet56_b_expected() -> dict[str, int]:
    """Hand-derived from res56prune.py: layer id 2k is the conv1 of overall block k-1."""
    expected = {}
    for stage, (planes, keep_ratio) in enumerate(((16, 0.4), (32, 0.7), (64, 0.9))):
        for b in range(9):
            layer_id = 2 * (stage * 9 + b + 1)
            if layer_id in (16, 18, 20, 34, 38, 54):
                continue
            expected[f"layer{stage + 1}.{b}.conv1"] = planes - int(planes * keep_ratio)
    return expected


def test_resnet56_b_counts() -> None:
    expected = _resnet56_b_expected()
    # 16 -> 6 kept, 32 -> 22 kept, 64 -> 57 kept
    assert set(expected.values()) == {10, 7}
    assert len(expected) == 27 - 6
    model = build_model("resnet56", "cifar10")
    assert filter_counts(model, "resnet56", ratio=None, preset="B") == expected


def test_vgg16_a_gives_published_cfg() -> None:
    model = build_model("vgg16", "cifar10", seed=0)
    plan = structured_plan(model, "vgg16", "l1_filter", preset="A")
    pruned = apply_structured(model, plan.removed_channels)
    assert list(out_channels(pruned).values()) == [
        32, 64, 128, 128, 256, 256, 256, 256, 256, 256, 256, 256, 256
    ]  # fmt: skip
    assert pruned.classifier[0].in_features == 256


# Li et al. 2017 (PFEC), Table 1: params, MACs ("FLOPs"), and their reductions in %.
PUBLISHED = [
    ("resnet56", "A", 7.7e5, 1.12e8, 9.4, 10.4),
    ("resnet56", "B", 7.3e5, 9.09e7, 13.7, 27.6),
    ("resnet110", "A", 1.68e6, 2.13e8, 2.3, 15.9),
    ("resnet110", "B", 1.16e6, 1.55e8, 32.4, 38.6),
    ("vgg16", "A", 5.4e6, 2.06e8, 64.0, 34.2),
]


@pytest.mark.parametrize(("name", "preset", "params", "macs", "dp", "dm"), PUBLISHED)
def test_presets_match_published_figures(
    name: str, preset: str, params: float, macs: float, dp: float, dm: float
) -> None:
    model = build_model(name, "cifar10", seed=0)
    base_p, base_m = count_params_macs(model, "cifar10")
    plan = structured_plan(model, name, "l1_filter", preset=preset)
    p, m = count_params_macs(apply_structured(model, plan.removed_channels), "cifar10")
    assert p == pytest.approx(params, rel=0.02)
    assert m == pytest.approx(macs, rel=0.02)
    assert 100 * (1 - p / base_p) == pytest.approx(dp, abs=0.1)
    assert 100 * (1 - m / base_m) == pytest.approx(dm, abs=0.1)


def _stage_preset_expected(
    depth: int, ratios: tuple[float, float, float], skip: set[int]
) -> dict[str, int]:
    """Filters removed per block conv1, hand-derived from res56prune.py / res110prune.py:
    layer id 2k is the conv1 of overall block k-1, stage ends at layer 18/36 (ResNet-56) or
    36/72 (ResNet-110), a pruned layer keeps int(out * (1 - p))."""
    n = (depth - 2) // 6
    expected = {}
    for stage, planes in enumerate((16, 32, 64)):
        for b in range(n):
            layer_id = 2 * (stage * n + b + 1)
            if layer_id in skip or ratios[stage] == 0:
                continue
            removed = planes - int(planes * (1 - ratios[stage]))
            if removed:
                expected[f"layer{stage + 1}.{b}.conv1"] = removed
    return expected


SKIP_B = {56: {16, 18, 20, 34, 38, 54}, 110: {36, 38, 74}}
# The authors' C and D (norm-pruning/cifar/l1-norm-pruning/res56prune.py, res110prune.py) and
# this project's own heavier presets, all with B's skip list.
STAGE_PRESETS = [
    (56, "C", (0.6, 0.5, 0.4)),
    (56, "D", (0.6, 0.6, 0.6)),
    (110, "C", (0.5, 0.5, 0.5)),
    (110, "D", (0.5, 0.6, 0.7)),
    (56, "nptm-heavy-1", (0.7, 0.5, 0.3)),
    (56, "nptm-heavy-2", (0.9, 0.7, 0.5)),
    (110, "nptm-heavy-1", (0.7, 0.5, 0.3)),
    (110, "nptm-heavy-2", (0.9, 0.7, 0.5)),
]


@pytest.mark.parametrize(("depth", "preset", "ratios"), STAGE_PRESETS)
def test_stage_ratio_presets_follow_the_authors_scripts(
    depth: int, preset: str, ratios: tuple[float, float, float]
) -> None:
    name = f"resnet{depth}"
    model = build_model(name, "cifar10")
    expected = _stage_preset_expected(depth, ratios, SKIP_B[depth])
    assert filter_counts(model, name, ratio=None, preset=preset) == expected


def test_resnet56_c_d_spot_values() -> None:
    model = build_model("resnet56", "cifar10")
    c = filter_counts(model, "resnet56", ratio=None, preset="C")
    d = filter_counts(model, "resnet56", ratio=None, preset="D")
    # C: 16 -> int(16 * 0.4) = 6 kept, 32 -> int(32 * 0.5) = 16, 64 -> int(64 * 0.6) = 38
    assert (c["layer1.0.conv1"], c["layer2.1.conv1"], c["layer3.1.conv1"]) == (10, 16, 26)
    # D: 0.6 everywhere -> 6, 12 (int(12.8)), 25 (int(25.6)) kept
    assert (d["layer1.0.conv1"], d["layer2.1.conv1"], d["layer3.1.conv1"]) == (10, 20, 39)
    assert "layer1.7.conv1" not in c and "layer3.8.conv1" not in d  # layer ids 16 and 54


@pytest.mark.parametrize(
    ("preset", "cfg"),
    [
        ("B", [32, 64, 128, 128, 196, 196, 196, 196, 196, 256, 256, 256, 256]),
        ("C", [32, 64, 64, 128, 128, 128, 128, 196, 196, 196, 196, 196, 196]),
    ],
)
def test_vgg16_b_c_give_the_authors_cfg(preset: str, cfg: list[int]) -> None:
    # vggprune.py: B = [32, 64, M, 128, 128, M, 196, 196, 196, M, 196, 196, 256, M, 256 x3],
    # C = [32, 64, M, 64, 128, M, 128 x3, M, 196 x3, M, 196 x3]
    model = build_model("vgg16", "cifar10", seed=0)
    plan = structured_plan(model, "vgg16", "l1_filter", preset=preset)
    pruned = apply_structured(model, plan.removed_channels)
    assert list(out_channels(pruned).values()) == cfg
    assert pruned.classifier[0].in_features == cfg[-1]


def test_hrank_paper_preset_applies_hranks_rates_to_block_convs() -> None:
    # compress_rate of the authors' hrank/scripts/*resnet56*.sh, one per conv in module order:
    # [0.1]+[0.60]*35+[0.0]*2+[0.6]*6+[0.4]*3+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]
    rates = [0.1] + [0.6] * 35 + [0.0] * 2 + [0.6] * 6 + [0.4] * 3 + [0.1, 0.4] * 4
    assert len(rates) == 55
    model = build_model("resnet56", "cifar10")
    convs = conv_names(model)
    expected = {}
    for name in prunable_convs(model, "resnet56"):  # block conv1s, layer ids 2, 4, ..., 54
        out = dict(model.named_modules())[name].out_channels
        removed = int(rates[convs.index(name)] * out)  # HRank: int(rate * filters) pruned
        if removed:
            expected[name] = removed
    got = filter_counts(model, "resnet56", ratio=None, preset="hrank-paper")
    assert got == expected
    assert got["layer1.0.conv1"] == 9 and got["layer2.8.conv1"] == 19  # 0.6 of 16 and of 32
    assert "layer3.0.conv1" not in got  # layer id 38: rate 0.0
    assert got["layer3.4.conv1"] == 25 and got["layer3.5.conv1"] == 6  # 0.4 and 0.1 of 64


def test_taylor_is_renamed_for_what_it_is() -> None:
    model = build_model("resnet20", "digits")
    with pytest.raises(ValueError, match="'taylor' was renamed 'taylor_conv_oneshot'"):
        compute_plan(model, "resnet20", "taylor", ratio=0.5, batches=batches())


def test_target_errors() -> None:
    model = build_model("resnet20", "digits")
    with pytest.raises(ValueError, match="exactly one"):
        structured_plan(model, "resnet20", "l1_filter")
    with pytest.raises(ValueError, match="preset 'A'"):
        structured_plan(model, "resnet20", "l1_filter", preset="A")
    with pytest.raises(ValueError, match="magnitude"):
        structured_plan(model, "resnet20", "magnitude", ratio=0.5)


# ---------------------------------------------------------------------------------------------
# rankings


def test_l1_removes_exactly_the_smallest_l1_filters() -> None:
    model = build_model("vgg16", "cifar10", seed=3)
    plan = structured_plan(model, "vgg16", "l1_filter", ratio=0.4)
    modules = dict(model.named_modules())
    for name in conv_names(model):
        w = modules[name].weight.detach().numpy()
        norms = np.abs(w).reshape(w.shape[0], -1).sum(axis=1)
        n = math.floor(w.shape[0] * 0.4)
        assert plan.removed_channels[name] == sorted(np.argsort(norms, kind="stable")[:n].tolist())


def test_random_filter_is_seeded_with_l1_counts() -> None:
    model = build_model("resnet56", "cifar10", seed=0)
    a = structured_plan(model, "resnet56", "random_filter", preset="B", seed=1)
    b = structured_plan(model, "resnet56", "random_filter", preset="B", seed=1)
    c = structured_plan(model, "resnet56", "random_filter", preset="B", seed=2)
    l1 = structured_plan(model, "resnet56", "l1_filter", preset="B")
    assert a.removed_channels == b.removed_channels
    assert a.removed_channels != c.removed_channels
    assert {k: len(v) for k, v in a.removed_channels.items()} == {
        k: len(v) for k, v in l1.removed_channels.items()
    }
    assert a.removed_channels != l1.removed_channels


@pytest.mark.parametrize("pruner", ["hrank", "taylor_conv_oneshot"])
def test_data_driven_pruners_need_batches(pruner: str) -> None:
    model = build_model("resnet20", "digits")
    with pytest.raises(ValueError, match="batches"):
        structured_plan(model, "resnet20", pruner, ratio=0.5)


@pytest.mark.parametrize("pruner", ["hrank", "taylor_conv_oneshot"])
def test_data_driven_pruners_remove_dead_filters(pruner: str) -> None:
    # Zeroed filters with BN shift 0 give an all-zero map whose rank is 0, and w = 0 makes the
    # Taylor score 0. BN statistics are calibrated on the data and every other filter gets a
    # BN shift of 3, so its map passes the ReLU (rank > 0) and its gradient flows (score > 0).
    model = build_model("resnet20", "digits", seed=0)
    gen = torch.Generator().manual_seed(5)
    dead = {}
    modules = dict(model.named_modules())
    for name in prunable_convs(model, "resnet20"):
        conv = modules[name]
        idx = torch.randperm(conv.out_channels, generator=gen)[: conv.out_channels // 4]
        bias = modules[name.replace("conv1", "bn1")].bias
        with torch.no_grad():
            conv.weight[idx] = 0
            bias.fill_(3.0)
            bias[idx] = 0
        dead[name] = sorted(idx.tolist())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        for x, _ in batches():
            model(x)
    plan = structured_plan(model, "resnet20", pruner, ratio=0.25, batches=batches())
    assert plan.removed_channels == dead


def _toy() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    )  # fmt: skip
    with torch.no_grad():  # non-trivial running statistics and BN affine parameters
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        net[0].weight[1] = 0  # its map is the constant relu(BN(bias)): rank <= 1
    return net


def test_hrank_scores_are_mean_ranks_of_post_activation_maps() -> None:
    net = _toy()
    data = [(torch.randn(4, 2, 7, 7), torch.randint(0, 3, (4,))) for _ in range(2)]
    scores = hrank_importance(net, ["0", "3"], data)
    net.eval()
    with torch.no_grad():
        for name, upto in (("0", 3), ("3", 6)):
            maps = np.concatenate([net[:upto](x).numpy() for x, _ in data])
            ranks = np.array(
                [[np.linalg.matrix_rank(maps[i, c]) for c in range(maps.shape[1])]
                 for i in range(maps.shape[0])]
            ).mean(axis=0)  # fmt: skip
            np.testing.assert_allclose(scores[name].numpy(), ranks)
    assert scores["0"][1] <= 1


def test_taylor_scores_match_backward_definition() -> None:
    net = _toy()
    data = [(torch.randn(4, 2, 7, 7), torch.randint(0, 3, (4,))) for _ in range(3)]
    scores = taylor_importance(net, ["0", "3"], data)
    ref = copy.deepcopy(net).eval()
    expected = {"0": torch.zeros(6, dtype=torch.float64), "3": torch.zeros(5, dtype=torch.float64)}
    for x, y in data:
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        for name in expected:
            w = ref.get_submodule(name).weight
            expected[name] += ((w * w.grad).sum(dim=(1, 2, 3)).double()) ** 2
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name])
    assert scores["0"][1] == 0


@pytest.mark.parametrize("pruner", STRUCTURED)
def test_plan_leaves_model_untouched(pruner: str) -> None:
    model = build_model("resnet20", "digits", seed=0).train()
    model.layer1[0].conv1.weight.requires_grad_(False)
    before = state(model)
    plan = structured_plan(model, "resnet20", pruner, ratio=0.5, batches=batches())
    assert plan.pruner == pruner and plan.removed_channels
    assert model.training
    assert not model.layer1[0].conv1.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "layer1.0.conv1.weight")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# surgery


@pytest.mark.parametrize("pruner", STRUCTURED)
def test_pruned_model_is_smaller_and_keeps_the_right_weights(pruner: str) -> None:
    model = build_model("resnet20", "digits", seed=0)
    original = copy.deepcopy(model)
    plan = compute_plan(model, "resnet20", pruner, ratio=0.5, batches=batches(), seed=0)
    pruned = apply_plan(model, plan)
    assert count_params_macs(pruned, "digits")[0] < count_params_macs(original, "digits")[0]
    base_out = out_channels(original)
    for name, out in out_channels(pruned).items():
        assert out == base_out[name] - len(plan.removed_channels.get(name, []))
    # the surviving filters, BN entries and next-conv input channels are the original ones
    block, orig_block = pruned.layer2[1], original.layer2[1]
    removed = set(plan.removed_channels["layer2.1.conv1"])
    kept = [i for i in range(32) if i not in removed]
    assert torch.equal(block.conv1.weight, orig_block.conv1.weight[kept])
    assert torch.equal(block.bn1.running_var, orig_block.bn1.running_var[kept])
    assert torch.equal(block.conv2.weight, orig_block.conv2.weight[:, kept])
    assert torch.equal(block.bn2.weight, orig_block.bn2.weight)  # residual channels untouched
    with torch.no_grad():
        assert pruned.eval()(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_zeroing_filters_equals_removing_them() -> None:
    # Independent check of the surgery: a block's conv1 filter whose BN output is forced to 0
    # contributes nothing to conv2, so removing it must not change the network's function.
    model = build_model("resnet20", "cifar10", seed=0).eval()
    removed = {"layer1.0.conv1": [1, 4], "layer3.2.conv1": [0, 63]}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, idx in removed.items():
            bn = reference.get_submodule(name.replace("conv1", "bn1"))
            bn.weight[idx] = 0
            bn.bias[idx] = 0
    pruned = apply_structured(copy.deepcopy(model), removed)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "dataset", "target"),
    [
        ("resnet20", "digits", {"ratio": 0.5}),
        ("resnet56", "cifar10", {"preset": "B"}),
        ("vgg16", "cifar10", {"preset": "A"}),
        # ImageNet-sized models take seconds each: the slow tier.
        pytest.param("resnet18", "imagenet", {"ratio": 0.3}, marks=pytest.mark.slow),
        pytest.param("mobilenet_v2", "imagenet", {"ratio": 0.3}, marks=pytest.mark.slow),
    ],
)
def test_rebuild_from_plan_and_state_dict_is_exact(name: str, dataset: str, target: dict) -> None:
    model = build_model(name, dataset, seed=0)
    plan = structured_plan(model, name, "l1_filter", **target)
    pruned = apply_structured(model, plan.removed_channels)
    with torch.no_grad():  # make every tensor distinct from a fresh model's
        for t in pruned.state_dict().values():
            if t.is_floating_point():
                t.add_(0.01)
    rebuilt = apply_structured(build_model(name, dataset, seed=1), plan.removed_channels)
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    assert out_channels(rebuilt) == out_channels(pruned)
    c, h, w = model.input_shape
    x = torch.randn(2, c, min(h, 64), min(w, 64))  # 64 px keeps the ImageNet models fast
    pruned.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned(x))


def test_plan_survives_payload_round_trip_and_second_round() -> None:
    model = build_model("resnet20", "digits", seed=0)
    first = structured_plan(model, "resnet20", "l1_filter", ratio=0.5)
    stored = type(first).from_payload(first.to_payload())
    apply_plan(model, stored)
    second = structured_plan(model, "resnet20", "l1_filter", ratio=0.5)
    assert len(second.removed_channels["layer1.0.conv1"]) == 4  # floor(8 * 0.5)
    apply_plan(model, second)
    rebuilt = apply_plan(apply_plan(build_model("resnet20", "digits"), stored), second)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert out_channels(rebuilt)["layer3.0.conv1"] == 16


def test_apply_structured_rejects_bad_plans() -> None:
    model = build_model("resnet20", "digits")
    with pytest.raises(ValueError, match=r"layer9\.conv1"):
        apply_structured(model, {"layer9.conv1": [0]})
    with pytest.raises(ValueError, match=r"layer1.0.conv1.*\[0, 16\)"):
        apply_structured(model, {"layer1.0.conv1": [16]})
    with pytest.raises(ValueError, match="at least one"):
        apply_structured(model, {"layer1.0.conv1": list(range(16))})
    with pytest.raises(ValueError, match="residual"):
        apply_structured(model, {"layer1.0.conv2": [0]})
    assert out_channels(model) == out_channels(build_model("resnet20", "digits"))
    bare = nn.Sequential(nn.Conv2d(1, 4, 3))
    with pytest.raises(ValueError, match="input_shape"):
        apply_structured(bare, {"0": [0]})


@pytest.mark.slow  # a Taylor plan and eight SGD steps
def test_pruned_model_still_trains() -> None:
    model = build_model("resnet20", "digits", seed=0)
    plan = structured_plan(model, "resnet20", "taylor_conv_oneshot", ratio=0.5, batches=batches())
    pruned = apply_structured(model, plan.removed_channels).train()
    x, y = batches(n=1, size=32, seed=9)[0]
    opt = torch.optim.SGD(pruned.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(pruned(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_hrank_ranks_on_640_augmented_images() -> None:
    from nptm.trainables.catalog import PRUNERS
    from nptm.trainables.stage_runner import CALIBRATION_BATCHES, calibration_sizes

    assert PRUNERS["hrank"].calibration_augmented
    assert calibration_sizes("hrank", 64) == (10, 64)  # the CIFAR recipe's batch
    assert calibration_sizes("hrank", 128) == (5, 128)  # HRank's own 5 batches of 128
    n, size = calibration_sizes("hrank", 100)  # 640 is no multiple: equal batches, <= 640
    assert size <= 100 and n * size <= 640 < (n + 1) * size
    assert calibration_sizes("taylor_conv_oneshot", 64) == (CALIBRATION_BATCHES, 64)
