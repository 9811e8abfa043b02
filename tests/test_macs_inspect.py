"""Param/MAC counting against formulas and published figures, and `inspect_model`."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from nptm.orchestrator.render import render_inspect
from nptm.trainables.catalog import IncompatibleError
from nptm.trainables.inspect import inspect_model
from nptm.trainables.macs import count_macs, count_nonzero_params, count_params_macs
from nptm.trainables.models import build_model


def test_toy_conv_linear_by_formula() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 10x10 out
        nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2, bias=False),  # 5x5 out
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 5),
    )
    params = (8 * 3 * 9 + 8) + (6 * 4 * 9) + 2 * 6 + (150 * 5 + 5)
    macs = 8 * 10 * 10 * (3 * 9) + 6 * 5 * 5 * (4 * 9) + 150 * 5
    assert count_params_macs(net, (3, 10, 10)) == (params, macs)


def test_linear_on_sequence_counts_every_row() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.flatten(2).transpose(1, 2))  # (1, H*W, C) rows

    assert count_macs(Seq(), (4, 2, 5)) == 10 * 4 * 3


def cifar_resnet_by_formula(depth: int, classes: int, size: int = 32) -> tuple[int, int]:
    """(params, MACs) of a CIFAR ResNet with option-A shortcuts, in closed form."""
    n = (depth - 2) // 6
    params = 3 * 16 * 9 + 2 * 16
    macs = 3 * 16 * 9 * size * size
    in_planes = 16
    for stage, planes in enumerate((16, 32, 64)):
        m = size // 2**stage
        first = in_planes * planes * 9
        rest = (2 * n - 1) * planes * planes * 9
        params += first + rest + 2 * n * 2 * planes
        macs += (first + rest) * m * m
        in_planes = planes
    return params + 64 * classes + classes, macs + 64 * classes


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_resnets_match_formula(depth: int, dataset: str) -> None:
    classes = 10 if dataset == "cifar10" else 100
    model = build_model(f"resnet{depth}", dataset)
    assert count_params_macs(model, dataset) == cifar_resnet_by_formula(depth, classes)


@pytest.mark.parametrize(
    ("name", "params", "macs"),
    [
        ("resnet20", 0.27e6, 4.1e7),  # He et al. 2016 Table 6; 41 MMACs
        ("resnet56", 8.5e5, 1.25e8),  # PFEC Table 1
        ("resnet110", 1.72e6, 2.53e8),  # PFEC Table 1
        ("vgg16", 1.5e7, 3.13e8),  # PFEC Table 1
    ],
)
def test_published_baseline_counts(name: str, params: float, macs: float) -> None:
    p, m = count_params_macs(build_model(name, "cifar10"), "cifar10")
    # published figures have 2-3 significant digits (40.55M MACs is "41M")
    assert p == pytest.approx(params, rel=0.02)
    assert m == pytest.approx(macs, rel=0.02)


def test_vgg16_reproduces_pfec_to_published_digits() -> None:
    p, m = count_params_macs(build_model("vgg16", "cifar10"), "cifar10")
    assert (f"{p:.1e}", f"{m:.2e}") == ("1.5e+07", "3.13e+08")  # PFEC Table 1


@pytest.mark.parametrize(
    ("name", "params", "gmacs"),
    # torchvision model documentation (params exact, GFLOPS = GMACs at 224 px, 2 decimals)
    [
        ("resnet18", 11_689_512, 1.81),
        ("resnet50", 25_557_032, 4.09),
        ("mobilenet_v2", 3_504_872, 0.30),
    ],
)
def test_torchvision_published_counts(name: str, params: int, gmacs: float) -> None:
    p, m = count_params_macs(build_model(name, "imagenet"), "imagenet")
    assert p == params
    assert round(m / 1e9, 2) == gmacs


def test_masked_model_counts_weight_once_and_nonzero_by_mask() -> None:
    model = build_model("resnet20", "cifar10", seed=0)
    params, macs = count_params_macs(model, "cifar10")
    conv = model.layer1[0].conv1
    prune.l1_unstructured(conv, "weight", amount=100)
    assert {n for n, _ in conv.named_parameters()} == {"weight_orig"}
    assert count_params_macs(model, "cifar10") == (params, macs)
    assert count_nonzero_params(model) == params - 100
    # A training step moves weight_orig; the mask still zeroes the same 100 entries.
    with torch.no_grad():
        conv.weight_orig.add_(1.0)
    assert count_nonzero_params(model) == params - 100


def test_nonzero_counts_in_place_zeros_of_weights_only() -> None:
    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        net[0].weight[0].zero_()  # 2 weights
        net[0].bias.zero_()  # biases count in full
        net[3].weight[:, 1] = 0  # 3 weights
    total = sum(p.numel() for p in net.parameters())
    assert count_nonzero_params(net) == total - 5


def test_counting_leaves_model_state_alone() -> None:
    model = build_model("resnet20", "cifar10", seed=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_params_macs(model, "cifar10")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_input_shape_is_named() -> None:
    model = build_model("resnet20", "cifar10")
    with pytest.raises(ValueError, match="mnist"):
        count_params_macs(model, "mnist")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        count_params_macs(model, (32, 32))


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_base_only() -> None:
    r = inspect_model("cifar10", "resnet56")
    assert r["pruned"] is None
    params, macs = count_params_macs(build_model("resnet56", "cifar10"), "cifar10")
    assert r["base"] == {"params": params, "macs": macs}
    assert len(r["layers"]) == 56  # 55 convs + fc
    assert "resnet56" in render_inspect(r)


def test_inspect_shows_the_shortcut_and_the_subsample_variant_counts_the_same() -> None:
    r = inspect_model("cifar10", "resnet56")
    assert r["shortcuts"] == [
        {"name": f"layer{s}.0.shortcut", "kind": "avgpool", "stride": 2, "zero_channels": z}
        for s, z in ((2, 16), (3, 32))
    ]
    text = render_inspect(r)
    assert "shortcut layer2.0.shortcut: AvgPool2d(2, 2) + 16 zero channels" in text
    # parameter- and MAC-free either way: the variant's base and preset-B counts are resnet56's
    sub = inspect_model("cifar10", "resnet56_subsample", pruner="l1_filter", preset="B")
    b = inspect_model("cifar10", "resnet56", pruner="l1_filter", preset="B")
    assert (sub["base"], sub["pruned"]) == (b["base"], b["pruned"])
    assert {sc["kind"] for sc in sub["shortcuts"]} == {"subsample"}
    assert "x[:, :, ::2, ::2] + 32 zero channels" in render_inspect(sub)
    assert inspect_model("cifar10", "vgg16")["shortcuts"] == []


def test_inspect_structured_preset() -> None:
    r = inspect_model("cifar10", "resnet56", pruner="l1_filter", preset="B")
    pruned = r["pruned"]
    assert pruned["macs"] == pytest.approx(9.09e7, rel=0.01)  # PFEC Table 1
    assert pruned["macs_reduction"] == pytest.approx(0.276, abs=0.002)
    assert pruned["params_reduction"] == pytest.approx(1 - pruned["params"] / r["base"]["params"])
    assert pruned["nonzero_params"] == pruned["params"] and pruned["sparsity"] == 0
    layers = {layer["name"]: layer for layer in r["layers"]}
    assert layers["layer1.0.conv1"]["out_channels_pruned"] == int(16 * 0.4)
    assert layers["layer1.7.conv1"]["out_channels_pruned"] == 16  # layer id 16: skipped
    assert layers["layer1.0.conv2"]["out_channels_pruned"] == 16  # residual channels kept
    assert r["importance_data"] is None
    text = render_inspect(r)
    assert f"{pruned['macs']:,}" in text and "27.6%" in text


@pytest.mark.parametrize("pruner", ["hrank", "taylor_conv_oneshot"])
def test_inspect_data_driven_uses_synthetic_batches(pruner: str) -> None:
    r = inspect_model("cifar10", "resnet20", pruner=pruner, ratio=0.5)
    assert r["importance_data"] == "synthetic"
    # same architecture as L1 with the same target: counts do not depend on the ranking
    l1 = inspect_model("cifar10", "resnet20", pruner="l1_filter", ratio=0.5)
    assert (r["pruned"]["params"], r["pruned"]["macs"]) == (
        l1["pruned"]["params"],
        l1["pruned"]["macs"],
    )
    assert "synthetic" in render_inspect(r)


def test_inspect_unstructured_magnitude() -> None:
    r = inspect_model("cifar10", "resnet20", pruner="magnitude", ratio=0.5)
    model = build_model("resnet20", "cifar10")
    n_prunable = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    pruned = r["pruned"]
    assert (pruned["params"], pruned["macs"]) == (r["base"]["params"], r["base"]["macs"])
    assert pruned["nonzero_params"] == r["base"]["params"] - round(0.5 * n_prunable)
    assert pruned["sparsity"] == pytest.approx(round(0.5 * n_prunable) / r["base"]["params"])
    assert all(layer["out_channels_pruned"] == layer["out_channels_base"] for layer in r["layers"])


@pytest.mark.parametrize("pruner", ["magnitude", "random", "magnitude_layerwise"])
def test_inspect_shows_a_dense_classifier_by_default(pruner: str) -> None:
    r = inspect_model("cifar10", "resnet56", pruner=pruner, ratio=0.95)
    layers = {layer["name"]: layer for layer in r["layers"]}
    assert layers["fc"]["weight_density"] == 1.0
    assert layers["layer2.3.conv1"]["weight_density"] < 0.5
    fc_row = next(line for line in render_inspect(r).splitlines() if line.startswith("fc "))
    assert "100.0%" in fc_row
    with_linear = inspect_model(
        "cifar10", "resnet56", pruner=pruner, ratio=0.95, options={"layers": "conv+linear"}
    )
    assert {la["name"]: la for la in with_linear["layers"]}["fc"]["weight_density"] < 1.0


# ---------------------------------------------------------------------------------------------
# presets: params and MACs against a hand computation from the pruned channel counts


def resnet_by_formula(
    depth: int, keep: dict[int, int], classes: int = 10, size: int = 32
) -> tuple[int, int]:
    """(params, MACs) of a CIFAR ResNet whose block with 1-based conv layer id 2k keeps
    keep[2k] filters in its first conv (all others: the stage's width), by hand."""
    n = (depth - 2) // 6
    params, macs = 3 * 16 * 9 + 2 * 16, 3 * 16 * 9 * size * size
    in_planes, layer_id = 16, 2
    for stage, planes in enumerate((16, 32, 64)):
        m = size // 2**stage  # output map of every conv of the stage
        for _ in range(n):
            k = keep.get(layer_id, planes)
            conv = in_planes * k * 9 + k * planes * 9
            params += conv + 2 * k + 2 * planes
            macs += conv * m * m
            in_planes, layer_id = planes, layer_id + 2
    return params + 64 * classes + classes, macs + 64 * classes


def vgg16_by_formula(cfg: list[int], classes: int = 10) -> tuple[int, int]:
    """(params, MACs) of the PFEC-code-base VGG-16 with conv widths `cfg`: convs without bias,
    BN after each, max-pools after convs 2, 4, 7, 10, Linear(last, 512)+BN1d+Linear(512, C)."""
    params = macs = 0
    in_ch, size = 3, 32
    for i, out in enumerate(cfg):
        params += in_ch * out * 9 + 2 * out
        macs += in_ch * out * 9 * size * size
        in_ch = out
        if i in (1, 3, 6, 9):
            size //= 2
    params += in_ch * 512 + 512 + 2 * 512 + 512 * classes + classes
    return params, macs + in_ch * 512 + 512 * classes


def stage_keep(depth: int, ratios: tuple[float, ...], skip: set[int]) -> dict[int, int]:
    n = (depth - 2) // 6
    keep = {}
    for layer_id in range(2, 6 * n + 2, 2):
        stage = (layer_id - 2) // (2 * n)
        planes = (16, 32, 64)[stage]
        if layer_id not in skip and ratios[stage] > 0:
            keep[layer_id] = int(planes * (1 - ratios[stage]))
    return keep


SKIP = {
    ("resnet56", "A"): {16, 20, 38, 54},
    ("resnet110", "A"): {36},
    **{("resnet56", p): {16, 18, 20, 34, 38, 54} for p in "BCD"},
    **{("resnet110", p): {36, 38, 74} for p in "BCD"},
    **{("resnet56", p): {16, 18, 20, 34, 38, 54} for p in ("nptm-heavy-1", "nptm-heavy-2")},
    **{("resnet110", p): {36, 38, 74} for p in ("nptm-heavy-1", "nptm-heavy-2")},
}
RATIOS = {
    ("resnet56", "A"): (0.1, 0.1, 0.1),
    ("resnet56", "B"): (0.6, 0.3, 0.1),
    ("resnet56", "C"): (0.6, 0.5, 0.4),
    ("resnet56", "D"): (0.6, 0.6, 0.6),
    ("resnet110", "A"): (0.5, 0.0, 0.0),
    ("resnet110", "B"): (0.5, 0.4, 0.3),
    ("resnet110", "C"): (0.5, 0.5, 0.5),
    ("resnet110", "D"): (0.5, 0.6, 0.7),
    **{(m, "nptm-heavy-1"): (0.7, 0.5, 0.3) for m in ("resnet56", "resnet110")},
    **{(m, "nptm-heavy-2"): (0.9, 0.7, 0.5) for m in ("resnet56", "resnet110")},
}
HRANK_RATES = [0.1] + [0.6] * 35 + [0.0] * 2 + [0.6] * 6 + [0.4] * 3 + [0.1, 0.4] * 4
VGG_CFGS_PRUNED = {
    "A": [32, 64, 128, 128, 256, 256, 256, 256, 256, 256, 256, 256, 256],
    "B": [32, 64, 128, 128, 196, 196, 196, 196, 196, 256, 256, 256, 256],
    "C": [32, 64, 64, 128, 128, 128, 128, 196, 196, 196, 196, 196, 196],
}


@pytest.mark.parametrize(("model", "preset"), sorted(RATIOS))
def test_inspect_resnet_presets_match_a_hand_computation(model: str, preset: str) -> None:
    depth = int(model.removeprefix("resnet"))
    r = inspect_model("cifar10", model, pruner="l1_filter", preset=preset)
    expected = resnet_by_formula(
        depth, stage_keep(depth, RATIOS[model, preset], SKIP[model, preset])
    )
    assert (r["pruned"]["params"], r["pruned"]["macs"]) == expected
    text = render_inspect(r)
    assert f"{expected[0]:,}" in text and f"{expected[1]:,}" in text


def test_inspect_hrank_paper_preset_matches_a_hand_computation() -> None:
    keep = {lid: 16 * 2 ** ((lid - 2) // 18) for lid in range(2, 56, 2)}
    keep = {lid: w - int(HRANK_RATES[lid - 1] * w) for lid, w in keep.items()}
    r = inspect_model("cifar10", "resnet56", pruner="hrank", preset="hrank-paper")
    assert (r["pruned"]["params"], r["pruned"]["macs"]) == resnet_by_formula(56, keep)


@pytest.mark.parametrize("preset", ["A", "B", "C"])
def test_inspect_vgg16_presets_match_a_hand_computation(preset: str) -> None:
    r = inspect_model("cifar10", "vgg16", pruner="l1_filter", preset=preset)
    assert (r["pruned"]["params"], r["pruned"]["macs"]) == vgg16_by_formula(VGG_CFGS_PRUNED[preset])


def test_formulas_reproduce_the_published_pfec_figures() -> None:
    # PFEC Table 1 (Li et al. 2017): the hand formulas above, not nptm's counter.
    published = {
        ("resnet56", "A"): (7.7e5, 1.12e8),
        ("resnet56", "B"): (7.3e5, 9.09e7),
        ("resnet110", "A"): (1.68e6, 2.13e8),
        ("resnet110", "B"): (1.16e6, 1.55e8),
    }
    for (model, preset), (params, macs) in published.items():
        depth = int(model.removeprefix("resnet"))
        p, m = resnet_by_formula(
            depth, stage_keep(depth, RATIOS[model, preset], SKIP[model, preset])
        )
        assert p == pytest.approx(params, rel=0.02) and m == pytest.approx(macs, rel=0.01)
    p, m = vgg16_by_formula(VGG_CFGS_PRUNED["A"])
    assert p == pytest.approx(5.4e6, rel=0.02) and m == pytest.approx(2.06e8, rel=0.01)


def test_inspect_bad_targets() -> None:
    with pytest.raises(IncompatibleError, match="exactly one"):
        inspect_model("cifar10", "resnet20", pruner="l1_filter")
    with pytest.raises(ValueError, match="without a 'pruner'"):
        inspect_model("cifar10", "resnet20", ratio=0.5)
    with pytest.raises(IncompatibleError, match="preset 'B'"):
        inspect_model("cifar10", "resnet20", pruner="l1_filter", preset="B")
    with pytest.raises(IncompatibleError, match="digits"):
        inspect_model("digits", "vgg16")
