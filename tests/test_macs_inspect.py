"""Param/MAC counting against formulas and published figures, and `inspect_model`."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from orchestrator.render import render_inspect
from trainables.catalog import IncompatibleError
from trainables.inspect import inspect_model
from trainables.macs import count_macs, count_nonzero_params, count_params_macs
from trainables.models import build_model


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


@pytest.mark.parametrize("pruner", ["hrank", "taylor"])
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
    n_prunable = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    )
    pruned = r["pruned"]
    assert (pruned["params"], pruned["macs"]) == (r["base"]["params"], r["base"]["macs"])
    assert pruned["nonzero_params"] == r["base"]["params"] - round(0.5 * n_prunable)
    assert pruned["sparsity"] == pytest.approx(round(0.5 * n_prunable) / r["base"]["params"])
    assert all(layer["out_channels_pruned"] == layer["out_channels_base"] for layer in r["layers"])


def test_inspect_bad_targets() -> None:
    with pytest.raises(IncompatibleError, match="exactly one"):
        inspect_model("cifar10", "resnet20", pruner="l1_filter")
    with pytest.raises(ValueError, match="without a 'pruner'"):
        inspect_model("cifar10", "resnet20", ratio=0.5)
    with pytest.raises(IncompatibleError, match="preset 'B'"):
        inspect_model("cifar10", "resnet20", pruner="l1_filter", preset="B")
    with pytest.raises(IncompatibleError, match="digits"):
        inspect_model("digits", "vgg16")
