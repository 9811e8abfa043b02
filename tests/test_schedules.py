"""Retraining lr curves against hand-computed values and torch.optim.lr_scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nptm.trainables.catalog import SCHEDULES
from nptm.trainables.recipe import DEFAULT_RECIPES, Recipe
from nptm.trainables.schedules import (
    KNOWN_OVERRIDES,
    lr_schedule,
    momentum_schedule,
    pretrain_schedule,
    rewind_epoch,
    run_epochs,
    scratch_b_epochs,
)

CIFAR = DEFAULT_RECIPES["cifar10"]  # 160 epochs, lr 0.1, /10 at 80 and 120


def sched(name: str, budget: int, spe: int = 1, recipe: Recipe = CIFAR, **kw) -> np.ndarray:
    return lr_schedule(name, budget=budget, steps_per_epoch=spe, recipe=recipe, **kw)


def epoch_lrs(lr: np.ndarray, spe: int) -> np.ndarray:
    """One value per epoch, after checking the curve is constant within every epoch."""
    per_epoch = lr.reshape(-1, spe)
    assert (per_epoch == per_epoch[:, :1]).all()
    return per_epoch[:, 0]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(("budget", "spe"), [(1, 1), (40, 7), (160, 3)])
def test_length_and_dtype(name: str, budget: int, spe: int) -> None:
    lr = sched(name, budget, spe)
    assert lr.shape == (budget * spe,)
    assert lr.dtype == np.float64
    assert (lr > 0).all()


def test_ft_is_last_pretraining_lr() -> None:
    lr = sched("ft", 40, 11)
    # 0.1 * 0.1**2 in floating point, hence a relative tolerance
    assert np.allclose(lr, 0.001, rtol=1e-12, atol=0)
    assert np.all(lr == lr[0])
    assert np.all(sched("ft", 5, 2, overrides={"lr": 0.02}) == 0.02)


def test_lrw_replays_the_tail_of_pretraining() -> None:
    # t=40 replays epochs 120..159, all after the second drop: 0.1 * 0.1 * 0.1.
    assert np.allclose(epoch_lrs(sched("lrw", 40, 3), 3), 0.001, rtol=1e-12, atol=0)
    # t=60 replays epochs 100..159: 100..119 at 0.01, 120..159 at 0.001.
    e60 = epoch_lrs(sched("lrw", 60, 3), 3)
    assert np.allclose(e60[:20], 0.01, rtol=1e-12, atol=0)
    assert np.allclose(e60[20:], 0.001, rtol=1e-12, atol=0)
    # t=100 replays epochs 60..159: 60..79 at 0.1, 80..119 at 0.01, 120..159 at 0.001.
    e100 = epoch_lrs(sched("lrw", 100, 2), 2)
    assert np.allclose(e100[:20], 0.1, rtol=1e-12, atol=0)
    assert np.allclose(e100[20:60], 0.01, rtol=1e-12, atol=0)
    assert np.allclose(e100[60:], 0.001, rtol=1e-12, atol=0)
    # t=T is the whole pre-training run.
    assert np.array_equal(sched("lrw", 160, 4), pretrain_schedule(CIFAR, 4))


@pytest.mark.parametrize("budget", [1, 40, 60, 100, 160])
def test_wr_has_the_lrw_curve(budget: int) -> None:
    assert np.array_equal(sched("wr", budget, 5), sched("lrw", budget, 5))


def test_rewind_epoch() -> None:
    assert rewind_epoch(CIFAR, 40) == 120
    assert rewind_epoch(CIFAR, 160) == 0
    with pytest.raises(ValueError, match=r"budget 161.*160"):
        rewind_epoch(CIFAR, 161)
    for name in ("lrw", "wr"):
        with pytest.raises(ValueError, match=r"budget 200.*160"):
            sched(name, 200)


def test_lrw_override_scales_the_replayed_curve() -> None:
    lr = sched("lrw", 60, 2, overrides={"lr": 0.05})
    assert lr.max() == pytest.approx(0.05, rel=1e-12)
    # shape kept: 20 epochs at the max, then a 10x drop
    assert np.allclose(lr[:40], 0.05, rtol=1e-12, atol=0)
    assert np.allclose(lr[40:], 0.005, rtol=1e-12, atol=0)


def paper_one_cycle(peak: float, total: int) -> tuple[list[float], list[float]]:
    """lr and momentum of every step of torch's OneCycleLR built as the authors build it
    (norm-pruning/cifar/l1-norm-pruning/main_finetune.py: div_factor=100,
    final_div_factor=100, pct_start=0.1, otherwise OneCycleLR's defaults, SGD momentum 0.9),
    stepped once per batch as they step it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=peak, total_steps=total, pct_start=0.1, div_factor=100, final_div_factor=100
    )
    lrs, moms = [], []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        ref_sched.step()
    return lrs, moms


@pytest.mark.parametrize(("budget", "spe"), [(40, 10), (7, 13), (1, 37), (3, 4), (160, 2)])
@pytest.mark.parametrize("peak", [0.1, 0.37])
def test_clr_matches_the_authors_one_cycle_lr(budget: int, spe: int, peak: float) -> None:
    ref_lr, ref_momentum = paper_one_cycle(peak, budget * spe)
    ours = sched("clr", budget, spe, overrides={"lr": peak} if peak != CIFAR.lr else None)
    np.testing.assert_allclose(ours, np.array(ref_lr), rtol=1e-9, atol=0)
    momentum = momentum_schedule("clr", budget=budget, steps_per_epoch=spe, recipe=CIFAR)
    assert momentum is not None
    np.testing.assert_allclose(momentum, np.array(ref_momentum), rtol=1e-12, atol=0)


def test_clr_endpoints_are_figure_1d() -> None:
    # warm up from 0.001 (the lowest lr of the CIFAR recipe) to 0.1, cosine down to 1e-5
    lr = sched("clr", 40, 10)
    assert lr[0] == pytest.approx(0.001, rel=1e-12)
    assert lr.max() == pytest.approx(0.1, rel=1e-12)
    assert int(lr.argmax()) == 39  # pct_start 0.1 of 400 steps: the peak at step 40 - 1
    assert lr[-1] == pytest.approx(1e-5, rel=1e-12)
    momentum = momentum_schedule("clr", budget=40, steps_per_epoch=10, recipe=CIFAR)
    assert momentum is not None
    assert momentum[0] == pytest.approx(0.95) and momentum[-1] == pytest.approx(0.95)
    assert momentum.min() == pytest.approx(0.85) and int(momentum.argmin()) == 39


@pytest.mark.parametrize("name", ["ft", "lrw", "wr", "slr", "scratch"])
def test_other_schedules_keep_the_recipe_momentum(name: str) -> None:
    assert momentum_schedule(name, budget=40, steps_per_epoch=3, recipe=CIFAR) is None


def test_clr_zero_length_warmup_holds_start_value() -> None:
    # 10 steps at pct_start 0.1: OneCycleLR's warm-up phase is steps 0..0 (0/0 there);
    # step 0 holds the start value, then the cosine decay from step 0 to step 9.
    lr = sched("clr", 1, 10)
    assert lr[0] == pytest.approx(0.1 / 100, rel=1e-12)
    min_lr = 0.1 / 100 / 100
    for i in range(1, 10):
        expected = min_lr + (0.1 - min_lr) / 2 * (math.cos(math.pi * i / 9) + 1)
        assert lr[i] == pytest.approx(expected, rel=1e-12)


def authors_slr(budget: int, peak: float) -> list[float]:
    """The lr of every epoch of the authors' `--use_llr` retraining
    (norm-pruning/cifar/l1-norm-pruning/main_finetune.py, lines 99-101, 188-198 and the epoch
    loop of 292-309): torch's MultiStepLR at int(0.5 * 0.9 * t) and int(0.75 * 0.9 * t), gamma
    0.1, wrapped in WarmupLR(init_lr=0.001, num_warmup=int(0.1 * t), warmup_strategy="cos"),
    whose step() is transcribed from torch_warmup_lr/wrappers.py (github.com/lehduong/
    torch-warmup-lr), lines 49-87. Stepped once before the first epoch and after every epoch."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak, momentum=0.9)
    milestones = [int(0.5 * 0.9 * budget), int(0.75 * 0.9 * budget)]
    multistep = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    group = opt.param_groups[0]
    max_lr, init_lr, num_warmup = group["lr"], min(0.001, group["lr"]), int(0.1 * budget)
    step_count = 0

    def warmup_step() -> None:
        nonlocal step_count
        if step_count <= num_warmup:
            cos_out = math.cos(math.pi * step_count / num_warmup) + 1
            group["lr"] = max_lr + (init_lr - max_lr) / 2.0 * cos_out
            step_count += 1
        else:
            multistep.step()

    opt.step()
    warmup_step()
    lrs = []
    for _ in range(budget):
        lrs.append(group["lr"])
        opt.step()
        warmup_step()
    return lrs


def test_slr_budget_56_warms_up_per_epoch_and_drops_at_30_and_42() -> None:
    lr = epoch_lrs(sched("slr", 56, 10), 10)  # constant within every epoch
    # W = int(0.1 x 56) = 5 epochs of cosine warm-up from 0.001 to 0.1:
    # 0.1 - 0.099 / 2 x (cos(pi e / 5) + 1), cos(pi / 5) = (1 + sqrt 5) / 4,
    # cos(2 pi / 5) = (sqrt 5 - 1) / 4.
    c1, c2 = (1 + 5**0.5) / 4, (5**0.5 - 1) / 4
    warmup = [0.001] + [0.1 - 0.0495 * (1 + c) for c in (c1, c2, -c2, -c1)]
    assert lr[:5] == pytest.approx(warmup, rel=1e-12)
    # MultiStepLR milestones int(0.45 x 56) = 25 and int(0.675 x 56) = 37 epochs after the
    # warm-up: x0.1 from epoch 30 and from epoch 42.
    assert np.allclose(lr[5:30], 0.1, rtol=1e-12, atol=0)
    assert np.allclose(lr[30:42], 0.01, rtol=1e-12, atol=0)
    assert np.allclose(lr[42:], 0.001, rtol=1e-12, atol=0)


@pytest.mark.parametrize("budget", [10, 11, 19, 40, 56, 72, 88, 104, 120, 136, 152, 160])
@pytest.mark.parametrize("peak", [0.1, 0.37, 0.0005])
def test_slr_matches_the_authors_warmup_lr(budget: int, peak: float) -> None:
    ours = sched("slr", budget, 3, overrides={"lr": peak} if peak != CIFAR.lr else None)
    np.testing.assert_allclose(epoch_lrs(ours, 3), authors_slr(budget, peak), rtol=1e-9, atol=0)


def test_slr_without_warmup_below_ten_epochs() -> None:
    # budget 5: int(0.5) = 0 warm-up epochs (WarmupLR would divide by zero); drops at
    # int(0.45 x 5) = 2 and int(0.675 x 5) = 3.
    lr = epoch_lrs(sched("slr", 5, 2), 2)
    assert lr == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001], rel=1e-12)
    # digits recipe (30 epochs, drops at 15 and 23), budget 10: W = 1, drops 1 + int(4.5) = 5
    # and 1 + int(23 / 30 x 9) = 7.
    lr = epoch_lrs(sched("slr", 10, 1, recipe=DEFAULT_RECIPES["digits"]), 1)
    assert lr == pytest.approx([0.001] + [0.1] * 4 + [0.01] * 2 + [0.001] * 3, rel=1e-12)


def test_slr_override_sets_peak() -> None:
    # budget 40: W = 4, drops at 4 + 18 = 22 and 4 + 27 = 31.
    lr = epoch_lrs(sched("slr", 40, 10, overrides={"lr": 0.05}), 10)
    assert lr[0] == pytest.approx(0.001, rel=1e-12)
    assert lr[2] == pytest.approx((0.05 + 0.001) / 2, rel=1e-12)  # cos(pi / 2) = 0
    assert np.allclose(lr[4:22], 0.05, rtol=1e-12, atol=0)
    assert np.allclose(lr[22:31], 0.005, rtol=1e-12, atol=0)
    assert np.allclose(lr[31:], 0.0005, rtol=1e-12, atol=0)
    # a peak below the recipe's last lr: WarmupLR starts at min(init_lr, lr), so no warm-up
    low = epoch_lrs(sched("slr", 40, 1, overrides={"lr": 0.0002}), 1)
    assert np.allclose(low[:22], 0.0002, rtol=1e-12, atol=0)


def test_scratch_compresses_the_milestones() -> None:
    # budget 40 at 10 steps: drops at 80/160*400 = 200 and 120/160*400 = 300, no warm-up.
    lr = sched("scratch", 40, 10)
    assert np.allclose(lr[:200], 0.1, rtol=1e-12, atol=0)
    assert np.allclose(lr[200:300], 0.01, rtol=1e-12, atol=0)
    assert np.allclose(lr[300:], 0.001, rtol=1e-12, atol=0)
    # digits recipe, 30 epochs, milestones 15 and 23; budget 7 at 3 steps = 21 steps:
    # 15/30*21 = 10.5 -> 11 (half up), 23/30*21 = 16.1 -> 16.
    digits = DEFAULT_RECIPES["digits"]
    lr = sched("scratch", 7, 3, recipe=digits)
    assert np.allclose(lr[:11], 0.1, rtol=1e-12, atol=0)
    assert np.allclose(lr[11:16], 0.01, rtol=1e-12, atol=0)
    assert np.allclose(lr[16:], 0.001, rtol=1e-12, atol=0)
    # full budget equals pre-training
    assert np.allclose(sched("scratch", 160, 3), pretrain_schedule(CIFAR, 3), rtol=1e-12, atol=0)


def _main_b_epoch_lrs(epochs: int, lr: float = 0.1) -> list[float]:
    """The authors' main_B.py loop: lr *= 0.1 at epochs int(E * 0.5) and int(E * 0.75)."""
    out = []
    for epoch in range(epochs):
        if epoch in [int(epochs * 0.5), int(epochs * 0.75)]:
            lr *= 0.1
        out.append(lr)
    return out


def test_scratch_e_is_the_pretraining_run() -> None:
    assert run_epochs("scratch_e", 40, CIFAR) == 160  # the budget axis does not apply
    assert np.allclose(sched("scratch_e", 160, 3), pretrain_schedule(CIFAR, 3), rtol=1e-12, atol=0)
    np.testing.assert_allclose(epoch_lrs(sched("scratch_e", 160), 1), _main_b_epoch_lrs(160))


def test_scratch_b_epochs_and_curve_follow_main_b() -> None:
    # ResNet-56 on CIFAR (nptm's MACs, bias excluded): stem 442,368 + three stages of
    # 42,467,328 / 41,287,680 / 41,287,680 + fc 640 = 125,485,696. PFEC's ResNet-56-B removes
    # 7 blocks' worth of 2*(C-k)*C*9*HW per stage: 20,643,840 + 10,321,920 + 3,612,672
    # = 34,578,432, leaving 90,907,264. 160 * 125,485,696 / 90,907,264 = 220.86 -> 220.
    base, pruned = 125_485_696, 90_907_264
    assert scratch_b_epochs(CIFAR, base, pruned) == 220 == int(160 * (base / pruned))
    assert run_epochs("scratch_b", 40, CIFAR, base_macs=base, pruned_macs=pruned) == 220
    assert scratch_b_epochs(CIFAR, base, base) == 160
    # 220 epochs: drops at int(220 * 0.5) = 110 and int(220 * 0.75) = 165, as main_B.py
    lr = epoch_lrs(sched("scratch_b", 220, 2), 2)
    np.testing.assert_allclose(lr, _main_b_epoch_lrs(220), rtol=1e-12, atol=0)
    assert lr[109] == pytest.approx(0.1) and lr[110] == pytest.approx(0.01)
    assert lr[164] == pytest.approx(0.01) and lr[165] == pytest.approx(0.001)
    # an odd length: 221 -> drops at 110 and 165 (floor of 110.5 and 165.75)
    np.testing.assert_allclose(epoch_lrs(sched("scratch_b", 221), 1), _main_b_epoch_lrs(221))
    with pytest.raises(ValueError, match="scratch_b needs"):
        run_epochs("scratch_b", 40, CIFAR)
    with pytest.raises(ValueError, match="pruned_macs"):
        scratch_b_epochs(CIFAR, 10, 0)


@pytest.mark.parametrize("recipe", [CIFAR, DEFAULT_RECIPES["digits"], DEFAULT_RECIPES["imagenet"]])
def test_pretrain_schedule_matches_multistep_lr(recipe: Recipe) -> None:
    spe = 3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    ref_sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=list(recipe.milestones), gamma=recipe.gamma
    )
    ref = []
    for _ in range(recipe.epochs):
        ref.extend([opt.param_groups[0]["lr"]] * spe)
        opt.step()
        ref_sched.step()
    lr = pretrain_schedule(recipe, spe)
    assert lr.dtype == np.float64
    np.testing.assert_allclose(lr, ref, rtol=1e-12, atol=0)


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"unknown schedule 'cosine'; known: clr, ft, lrw"):
        sched("cosine", 10)
    with pytest.raises(ValueError, match=r"unknown schedule 'clrr'; did you mean 'clr'\?"):
        sched("clrr", 10)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=rf"budget.*{bad!r}"):
            sched("ft", bad)
        with pytest.raises(ValueError, match=rf"steps_per_epoch.*{bad!r}"):
            sched("ft", 10, bad)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        pretrain_schedule(CIFAR, 0)
    with pytest.raises(ValueError, match="'momentum'"):
        sched("slr", 10, overrides={"momentum": 0.5})
    for bad_lr in (0.0, -0.1, math.inf):
        with pytest.raises(ValueError, match="lr"):
            sched("clr", 10, overrides={"lr": bad_lr})
    assert "lr" in KNOWN_OVERRIDES
