"""Unstructured pruners against torch.nn.utils.prune and the authors' weight-level code
(norm-pruning/cifar/weight-level/cifar_prune.py: one global threshold over Conv2d weights, no
floor; random = the same threshold over random scores), plus the mask-through-training
pitfall."""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from nptm.trainables.pruners import apply_plan, compute_plan
from nptm.trainables.pruners.plan import PrunePlan
from nptm.trainables.pruners.unstructured import (
    apply_masks,
    emptied_layers,
    layer_sparsity,
    prunable_layers,
    sparsity,
    unstructured_plan,
)

CONVS = ("features.0", "features.3", "features.6")
LAYERS = (*CONVS, "classifier")
MIN_KEEP = 0.005  # the floor the tests set through the `min_keep` option


class SmallNet(nn.Module):
    """Conv-BN-ReLU x2, a 1x1 conv and a linear classifier: 4 prunable layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def make_net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet()


def n_weights(model: nn.Module, layers: str = "conv") -> int:
    return sum(m.weight.numel() for m in prunable_layers(model, layers).values())


def torch_global_masks(
    model: nn.Module, amount: int, layers: str = "conv"
) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model)
    layers = prunable_layers(ref, layers)
    prune.global_unstructured(
        [(m, "weight") for m in layers.values()],
        pruning_method=prune.L1Unstructured,
        amount=amount,
    )
    return {n: m.weight_mask.bool() for n, m in layers.items()}


def n_pruned(mask: torch.Tensor) -> int:
    return int((~mask).sum())


def test_prunable_layers_are_conv_by_default_and_linear_on_request() -> None:
    assert tuple(prunable_layers(make_net())) == CONVS
    assert tuple(prunable_layers(make_net(), "conv+linear")) == LAYERS


@pytest.mark.parametrize("layers", ["conv", "conv+linear"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6, 0.8, 0.9])
def test_global_magnitude_equals_torch_global_unstructured(ratio: float, layers: str) -> None:
    model = make_net()
    total = n_weights(model, layers)
    plan = unstructured_plan(model, "magnitude", ratio=ratio, seed=0, layers=layers)
    ref = torch_global_masks(model, round(ratio * total), layers)
    assert set(plan.masks) == set(prunable_layers(model, layers))
    for name, mask in plan.masks.items():
        assert mask.dtype == torch.bool
        assert torch.equal(mask, ref[name]), name


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_layerwise_magnitude_equals_torch_l1_unstructured(ratio: float) -> None:
    model = make_net()
    plan = unstructured_plan(model, "magnitude_layerwise", ratio=ratio, seed=0)
    assert set(plan.masks) == set(CONVS)
    ref = copy.deepcopy(model)
    for name, module in prunable_layers(ref).items():
        prune.l1_unstructured(module, "weight", amount=round(ratio * module.weight.numel()))
        assert torch.equal(plan.masks[name], module.weight_mask.bool()), name


def _model_with_a_tiny_layer() -> SmallNet:
    model = make_net()
    with torch.no_grad():  # features.6: 256 weights, all far below every other |w|
        model.features[6].weight.mul_(1e-6)
    return model


def test_global_threshold_empties_a_layer_by_default_and_says_so() -> None:
    # The authors' code applies the global threshold as it falls, emptied layers included
    # (cifar_prune.py only notes "There exists a layer with 0 parameters left.").
    model = _model_with_a_tiny_layer()
    target = round(0.5 * n_weights(model))
    plan = unstructured_plan(model, "magnitude", ratio=0.5, seed=0)
    ref = torch_global_masks(model, target)
    assert n_pruned(ref["features.6"]) == 256
    for name in CONVS:
        assert torch.equal(plan.masks[name], ref[name]), name
    apply_masks(model, plan.masks)
    assert emptied_layers(model) == ["features.6"]
    assert emptied_layers(make_net()) == []


def test_min_keep_floor_keeps_a_layer_alive() -> None:
    model = _model_with_a_tiny_layer()
    tiny = model.features[6]
    total, ratio = n_weights(model), 0.5
    target = round(ratio * total)
    plan = unstructured_plan(model, "magnitude", ratio=ratio, seed=0, min_keep=MIN_KEEP)
    n_tiny = tiny.weight.numel()
    floor = max(1, math.ceil(MIN_KEEP * n_tiny))
    kept = plan.masks["features.6"]
    assert int(kept.sum()) == floor
    # the floor keeps that layer's largest weights
    assert torch.equal(
        kept,
        prune.L1Unstructured(n_tiny - floor)
        .compute_mask(tiny.weight, torch.ones_like(tiny.weight))
        .bool(),
    )
    assert sum(n_pruned(m) for m in plan.masks.values()) == target

    # the rest is the global threshold over the other layers for what is left
    others = copy.deepcopy(model)
    other_layers = {n: m for n, m in prunable_layers(others).items() if n != "features.6"}
    assert len(other_layers) == 2
    prune.global_unstructured(
        [(m, "weight") for m in other_layers.values()],
        pruning_method=prune.L1Unstructured,
        amount=target - (n_tiny - floor),
    )
    for name, module in other_layers.items():
        assert torch.equal(plan.masks[name], module.weight_mask.bool()), name


def test_floor_binds_on_a_freshly_initialised_net_at_high_ratio() -> None:
    # features.3 has the smallest init scale (fan-in 72): a 90 % global threshold empties it
    model = make_net()
    total = n_weights(model)
    assert n_pruned(torch_global_masks(model, round(0.9 * total))["features.3"]) == 1152
    plan = unstructured_plan(model, "magnitude", ratio=0.9, seed=0, min_keep=MIN_KEEP)
    assert int(plan.masks["features.3"].sum()) == math.ceil(MIN_KEEP * 1152)
    assert sum(n_pruned(m) for m in plan.masks.values()) == round(0.9 * total)


def test_unreachable_ratio_under_the_floor_is_an_error() -> None:
    model = make_net()
    with pytest.raises(ValueError, match=r"ratio 0\.999.*min_keep"):
        unstructured_plan(model, "magnitude", ratio=0.999, seed=0, min_keep=MIN_KEEP)
    unstructured_plan(model, "magnitude", ratio=0.999, seed=0)  # no floor: reachable


@pytest.mark.parametrize("layers", ["conv", "conv+linear"])
def test_random_is_the_global_threshold_over_random_scores(layers: str) -> None:
    """The authors' random pruning: replace every considered weight by a uniform random score
    and run the magnitude threshold on those (cifar_prune.py --random_rank)."""
    model = make_net()
    plan = unstructured_plan(model, "random", ratio=0.6, seed=5, layers=layers)
    scored = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in prunable_layers(scored, layers).values():
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen))
    ref = torch_global_masks(scored, round(0.6 * n_weights(model, layers)), layers)
    assert set(plan.masks) == set(ref)
    for name, mask in ref.items():
        assert torch.equal(plan.masks[name], mask), name


@pytest.mark.parametrize("pruner", ["magnitude", "magnitude_layerwise", "random"])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.77, 0.95])
def test_sparsity_hits_the_target(pruner: str, ratio: float) -> None:
    model = make_net()
    total = n_weights(model)
    plan = unstructured_plan(model, pruner, ratio=ratio, seed=3)
    if pruner != "magnitude_layerwise":
        assert sum(n_pruned(m) for m in plan.masks.values()) == round(ratio * total)
    else:
        for mask in plan.masks.values():
            assert abs(n_pruned(mask) - ratio * mask.numel()) <= 0.5
    apply_masks(model, plan.masks)
    expected = sum(n_pruned(m) for m in plan.masks.values()) / total
    assert sparsity(model) == pytest.approx(expected, abs=0)
    assert abs(sparsity(model) - ratio) <= len(CONVS) / total
    per_layer = layer_sparsity(model)
    for name, mask in plan.masks.items():
        assert per_layer[name] == pytest.approx(n_pruned(mask) / mask.numel(), abs=0)


def test_random_is_seeded_and_leaves_the_global_rng_alone() -> None:
    model = make_net()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = unstructured_plan(model, "random", ratio=0.5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = unstructured_plan(model, "random", ratio=0.5, seed=7)
    c = unstructured_plan(model, "random", ratio=0.5, seed=8)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in CONVS)
    assert not all(torch.equal(a.masks[n], c.masks[n]) for n in CONVS)
    # random is not magnitude in disguise
    mag = unstructured_plan(model, "magnitude_layerwise", ratio=0.5, seed=7)
    assert not torch.equal(a.masks["features.3"], mag.masks["features.3"])


@pytest.mark.parametrize("pruner", ["magnitude", "magnitude_layerwise", "random"])
def test_iterative_masks_are_cumulative_and_never_revive(pruner: str) -> None:
    model = make_net()
    total = n_weights(model)
    first = unstructured_plan(model, pruner, ratio=0.5, seed=1)
    apply_masks(model, first.masks)
    # retraining moves the surviving weights; pruned slots of weight_orig get huge values,
    # which must not count: the effective weight there is 0
    with torch.no_grad():
        for name, module in prunable_layers(model).items():
            module.weight_orig.mul_(torch.empty_like(module.weight_orig).uniform_(0.5, 2.0))
            module.weight_orig[~first.masks[name]] = 1e3
    second = unstructured_plan(model, pruner, ratio=0.75, seed=2)
    for name in CONVS:
        old, new = first.masks[name], second.masks[name]
        assert not (new & ~old).any(), f"{name}: a pruned weight was revived"
        if pruner == "magnitude_layerwise":
            assert n_pruned(new) == round(0.75 * new.numel())
    if pruner != "magnitude_layerwise":
        assert sum(n_pruned(m) for m in second.masks.values()) == round(0.75 * total)

    # the second plan alone (cumulative) gives the same model as applying both in turn
    apply_masks(model, second.masks)
    for name, module in prunable_layers(model).items():
        assert torch.equal(module.weight_mask.bool(), second.masks[name])
    assert sparsity(model) == pytest.approx(
        sum(n_pruned(m) for m in second.masks.values()) / total, abs=0
    )

    # a lower target keeps every earlier mask
    third = unstructured_plan(model, pruner, ratio=0.3, seed=3)
    assert all(torch.equal(third.masks[n], second.masks[n]) for n in CONVS)


def test_global_magnitude_uses_the_effective_weight() -> None:
    """After a first round, magnitude ranks |weight_orig * mask|, not |weight_orig|."""
    model = make_net()
    total = n_weights(model)
    first = unstructured_plan(model, "magnitude", ratio=0.4, seed=0)
    apply_masks(model, first.masks)
    second = unstructured_plan(model, "magnitude", ratio=0.7, seed=0)
    # reference: the plain global threshold on a copy whose weights are the effective ones
    plain = make_net()
    with torch.no_grad():
        for m, src in zip(
            prunable_layers(plain).values(), prunable_layers(model).values(), strict=True
        ):
            m.weight.copy_(src.weight_orig * src.weight_mask)
    ref = torch_global_masks(plain, round(0.7 * total))
    for name in CONVS:
        assert torch.equal(second.masks[name], ref[name]), name


def test_rebuild_from_plan_and_state_dict() -> None:
    model = make_net(seed=4)
    plan = unstructured_plan(model, "magnitude", ratio=0.6, seed=0)
    apply_masks(model, plan.masks)
    with torch.no_grad():  # some retraining happened
        for module in prunable_layers(model).values():
            module.weight_orig.add_(0.01)
    state = model.state_dict()
    assert "features.0.weight_orig" in state and "features.0.weight_mask" in state

    # round-trip the plan and the state dict through the safe loader
    buf = io.BytesIO()
    torch.save({"plan": plan.to_payload(), "state": state}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    rebuilt = apply_masks(make_net(seed=99), PrunePlan.from_payload(saved["plan"]).masks)
    rebuilt.load_state_dict(saved["state"], strict=True)
    assert rebuilt.state_dict().keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))
    assert sparsity(rebuilt) == sparsity(model)


def test_compute_plan_dispatch_and_apply_plan() -> None:
    model = make_net()
    plan = compute_plan(model, "resnet20", "magnitude_layerwise", ratio=0.5)
    assert plan.pruner == "magnitude_layerwise"
    assert apply_plan(model, plan) is model
    assert sparsity(model) == pytest.approx(0.5, abs=len(CONVS) / n_weights(model))
    assert "classifier" not in plan.masks


def test_compute_plan_passes_the_pruner_options() -> None:
    model = make_net()
    plan = compute_plan(
        model, "resnet20", "magnitude", ratio=0.5, options={"layers": "conv+linear"}
    )
    assert set(plan.masks) == set(LAYERS)
    with pytest.raises(ValueError, match="layers 'all' is not one of conv, conv\\+linear"):
        compute_plan(model, "resnet20", "magnitude", ratio=0.5, options={"layers": "all"})
    with pytest.raises(ValueError, match="takes no options"):
        compute_plan(model, "resnet20", "l1_filter", ratio=0.5, options={"min_keep": 0.1})


def _train(model: nn.Module, steps: int = 20) -> None:
    """SGD with the CIFAR recipe's optimizer settings on random data."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    model.train()
    for _ in range(steps):
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("layers", ["conv", "conv+linear"])
def test_masked_weights_stay_zero_through_sgd_momentum_and_weight_decay(layers: str) -> None:
    torch.set_num_threads(1)
    model = make_net()
    plan = unstructured_plan(model, "magnitude", ratio=0.7, seed=0, layers=layers)
    assert ("classifier" in plan.masks) == (layers == "conv+linear")
    zeroed_once = copy.deepcopy(model)

    apply_masks(model, plan.masks)
    before = sparsity(model, layers)
    _train(model)
    assert sparsity(model, layers) == before
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))  # refreshes module.weight as the forward pass uses it
    for name, module in prunable_layers(model, layers).items():
        pruned = ~plan.masks[name]
        assert (module.weight.detach()[pruned] == 0).all(), name
        # the stored values did move (weight decay); the mask is what keeps them out
        assert (module.weight_orig.detach()[pruned] != 0).all(), name

    # The pitfall: zeroing the weights once without the reparametrisation does not survive
    # training; gradients, momentum and weight decay bring the pruned weights back.
    with torch.no_grad():
        for name, module in prunable_layers(zeroed_once, layers).items():
            module.weight.mul_(plan.masks[name])
    assert sparsity(zeroed_once, layers) == before
    _train(zeroed_once)
    assert sparsity(zeroed_once, layers) < 0.01
    revived = prunable_layers(zeroed_once)["features.3"].weight[~plan.masks["features.3"]]
    assert (revived != 0).all()


def test_bad_inputs_name_the_field() -> None:
    model = make_net()
    with pytest.raises(ValueError, match="'l1_filter'"):
        unstructured_plan(model, "l1_filter", ratio=0.5, seed=0)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"ratio {re.escape(str(bad))}"):
            unstructured_plan(model, "magnitude", ratio=bad, seed=0)
    with pytest.raises(ValueError, match=r"'features\.1'"):
        apply_masks(model, {"features.1": torch.ones(8, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"'classifier'.*\(10, 15\)"):
        apply_masks(model, {"classifier": torch.ones(10, 15, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no layer of kind 'conv'"):
        unstructured_plan(nn.Sequential(nn.ReLU()), "magnitude", ratio=0.5, seed=0)
    with pytest.raises(ValueError, match="layers 'fc' is not one of"):
        unstructured_plan(model, "magnitude", ratio=0.5, seed=0, layers="fc")


def test_classifier_stays_dense_at_95_percent_random_on_resnet56() -> None:
    # The issue's example: conv+linear left ResNet-56's fc with 32 of its 640 weights.
    from nptm.trainables.models import build_model

    model = build_model("resnet56", "cifar10", seed=0)
    plan = compute_plan(model, "resnet56", "random", ratio=0.95, seed=0)
    assert "fc" not in plan.masks
    apply_plan(model, plan)
    assert int(torch.count_nonzero(model.fc.weight)) == 640
    conv_total = n_weights(model)
    assert sum(n_pruned(m) for m in plan.masks.values()) == round(0.95 * conv_total)


def test_prune_stage_records_an_emptied_layer_and_keeps_the_classifier(tmp_path) -> None:
    """The stage runner applies the plan as it falls and reports the layer it emptied."""
    from nptm.trainables.artifacts import ArtifactStore
    from nptm.trainables.models import build_model
    from nptm.trainables.recipe import default_recipe
    from nptm.trainables.stage import StageOutcome, StageSpec
    from nptm.trainables.stage_runner import MODEL, WorkerEnv, model_payload, run_stage

    recipe = default_recipe("digits")
    pre = StageSpec("pretrain", "digits", "resnet20", 0, recipe)
    model = build_model("resnet20", "digits", seed=0)
    with torch.no_grad():  # a layer far below every other |w|: the threshold takes all of it
        model.layer2[1].conv1.weight.mul_(1e-6)
    store = ArtifactStore(str(tmp_path))
    store.save(pre.id, MODEL, model_payload(pre, model, []))
    store.write_outcome(StageOutcome(pre.id, "pretrain", "ok", test_acc=0.5))
    spec = StageSpec(
        "prune", "digits", "resnet20", 0, recipe, parents=(pre.id,), pruner="magnitude",
        ratio=0.5, pruner_options=(("layers", "conv"), ("min_keep", 0.0)),
    )  # fmt: skip
    outcome = run_stage(spec, WorkerEnv(storage=str(tmp_path)))
    assert outcome.status == "ok"
    assert outcome.emptied_layers == 1
    assert outcome.emptied_layer_names == ["layer2.1.conv1"]
    assert outcome.layer_density["fc"] == 1.0
    assert outcome.achieved_sparsity == pytest.approx(0.5, abs=1e-4)
