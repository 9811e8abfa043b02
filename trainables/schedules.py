"""Learning-rate curves of the retraining schedules compared by Le & Hua (ICLR 2021).

Every function here is pure: it maps a pre-training `Recipe` and a retraining budget to the
learning rate of every optimizer step, as a float64 array. The train loop just writes
``lr[step]`` into the optimizer before each step, so there is no scheduler state to checkpoint,
and a curve can be plotted or tested without building an optimizer.

Notation: T = ``recipe.epochs`` (pre-training epochs), t = ``budget`` (retraining epochs),
S = ``steps_per_epoch``, N = t * S (optimizer steps of the retraining run), ``peak`` =
``recipe.lr`` unless overridden, ``gamma`` = ``recipe.gamma``.

Schedules (registered in ``nptm.trainables.catalog.SCHEDULES``, which names the function of each):

``ft``
    Fine-tuning: constant at the last pre-training lr, ``recipe.final_lr``
    (0.001 for the CIFAR recipe 0.1, /10 at epochs 80 and 120 of 160).
``lrw``
    Learning-rate rewinding (Renda et al. 2020): replay the last t epochs of pre-training, so
    retraining epoch e uses ``recipe.lr_at_epoch(T - t + e)``, constant within the epoch.
    Requires t <= T.
``wr``
    Weight rewinding: the same lr curve as ``lrw``. The weights are rewound to the end of
    pre-training epoch ``rewind_epoch(recipe, budget)`` = T - t (0 = the initial weights);
    restoring them is the stage runner's job.
``slr``
    Scaled learning-rate restarting, as the authors run it (``--use_llr`` of
    norm-pruning/cifar/l1-norm-pruning/main_finetune.py, lines 99-101 and 188-198, stepping
    ``WarmupLR`` of github.com/lehduong/torch-warmup-lr, torch_warmup_lr/wrappers.py, lines
    49-87, once per epoch around a ``MultiStepLR``), constant within an epoch. With
    p = ``recipe.warmup_fraction``: a cosine warm-up over W = floor(p * t) epochs, epoch e < W
    at ``peak + (start - peak) / 2 * (cos(pi * e / W) + 1)`` from start = min(``final_lr``,
    ``peak``) (``WarmupLR``'s ``init_lr``, 0.001, capped at the lr), ``peak`` from epoch W on;
    the ``MultiStepLR`` milestones floor(m / T * (1 - p) * t) (``int(0.5 * 0.9 * t)``,
    ``int(0.75 * 0.9 * t)`` for the CIFAR recipe) count the epochs after the warm-up, so the
    lr is multiplied by ``gamma`` from epoch W + floor(m / T * (1 - p) * t) on (budget 56:
    W = 5, drops at epochs 30 and 42). Below t = 1 / p there is no warm-up (``WarmupLR``
    would divide by zero); ``peak`` holds from epoch 0.
``clr``
    Cyclic learning-rate restarting (Figure 1(d) of Le & Hua): the 1-cycle policy with exactly
    the semantics of ``torch.optim.lr_scheduler.OneCycleLR(max_lr=peak, total_steps=N,
    pct_start=recipe.warmup_fraction, anneal_strategy="cos", div_factor=100,
    final_div_factor=100, three_phase=False, cycle_momentum=True, base_momentum=0.85,
    max_momentum=0.95)`` stepped once per optimizer step, as the authors' main_finetune.py
    steps it after every batch: cosine from peak/100 (0.001 for the CIFAR recipe, its lowest
    pre-training lr) up to peak until step pct_start*N - 1, then cosine down to
    peak/100/100 (1e-5) at step N - 1. ``momentum_schedule`` gives OneCycleLR's momentum
    for the same steps: cosine from 0.95 down to 0.85 while the lr rises, then back to 0.95;
    the train loop writes it into the optimizer before each step, like the lr.
    Where OneCycleLR divides 0 by 0 (a warm-up phase of zero length, pct_start*N == 1) the
    phase's start value is used.
``scratch``
    Training the re-initialised pruned architecture (Liu et al. 2019) for the retraining budget
    t, so that it costs what the other schedules cost (nptm's budget-matched baseline): the
    pre-training schedule compressed to the budget, ``peak`` from step 0 (no warm-up),
    multiplied by ``gamma`` at step round(m / T * N) for every milestone m.
``scratch_e``
    Scratch-E of Liu et al. (2019): the re-initialised pruned architecture trained for the
    pre-training recipe's own T epochs with its own schedule. Its length is
    ``run_epochs("scratch_e", ...)`` = T whatever the budget axis says; the curve is that of
    ``scratch_b`` for E = T, i.e. ``pretrain_schedule``.
``scratch_b``
    Scratch-B of Liu et al. (2019) and the authors' ``norm-pruning/cifar/l1-norm-pruning/
    main_B.py``: the same computation budget as pre-training the dense network, i.e.
    E = ``scratch_b_epochs`` = floor(T * base MACs / pruned MACs) epochs (main_B.py:
    ``int(epochs * flops_std / flops_small)``), with the pre-training schedule stretched to E
    epochs the way main_B.py does it: ``peak``, multiplied by ``gamma`` from epoch
    floor(m / T * E) on for every milestone m (main_B.py: ``int(epochs * 0.5)`` and
    ``int(epochs * 0.75)``), constant within an epoch. ``budget`` is E.

Milestone rounding (``scratch``): a compressed milestone lands on the nearest optimizer step,
halves rounded up (``floor(x + 0.5)``), computed in exact integer arithmetic from m, T and the
step count, so no floating-point error can move a drop by one step. ``slr`` truncates to whole
epochs with the authors' floating-point expressions, ``int(p * t)`` and ``int(m / T * (1 - p)
* t)``, so its epochs are theirs.

Overrides (``KNOWN_OVERRIDES``): ``{"lr": x}`` sets ``peak`` = x for ``slr``, ``clr`` and
the three ``scratch`` schedules and the constant for ``ft``; for ``lrw``/``wr`` it scales the
replayed curve so that its maximum equals x (the shape of the replayed segment is kept).

Momentum: every schedule except ``clr`` keeps the recipe's fixed SGD momentum
(``momentum_schedule`` returns None for them).

``pretrain_schedule(recipe, S)`` is the pre-training run itself: ``recipe.lr_at_epoch(e)``
for every step of epoch e, which is what ``MultiStepLR`` stepped once per epoch produces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np

from nptm.trainables.catalog import SCHEDULES
from nptm.trainables.recipe import Recipe
from nptm.trainables.registry import resolve

__all__ = [
    "KNOWN_OVERRIDES",
    "check_override",
    "lr_schedule",
    "momentum_schedule",
    "pretrain_schedule",
    "rewind_epoch",
    "run_epochs",
    "scratch_b_epochs",
]

KNOWN_OVERRIDES: frozenset[str] = frozenset({"lr"})

# OneCycleLR settings the `clr` schedule is defined with (the authors' main_finetune.py
# defaults; momentum bounds are OneCycleLR's own defaults, which the authors keep).
CLR_DIV_FACTOR = 100.0
CLR_FINAL_DIV_FACTOR = 100.0
CLR_BASE_MOMENTUM = 0.85
CLR_MAX_MOMENTUM = 0.95


def lr_schedule(
    schedule: str,
    *,
    budget: int,
    steps_per_epoch: int,
    recipe: Recipe,
    overrides: Mapping[str, float] | None = None,
) -> np.ndarray:
    """The lr of every optimizer step of a retraining run: float64 array of length budget*S."""
    if schedule not in SCHEDULES:
        raise ValueError(SCHEDULES.unknown_reason(schedule))
    _check_positive_int("budget", budget)
    _check_positive_int("steps_per_epoch", steps_per_epoch)
    peak = _peak_override(overrides)
    return resolve(SCHEDULES[schedule].lr)(recipe, budget, steps_per_epoch, peak)


def momentum_schedule(
    schedule: str, *, budget: int, steps_per_epoch: int, recipe: Recipe
) -> np.ndarray | None:
    """SGD momentum of every optimizer step, or None where the recipe's fixed momentum holds."""
    if schedule not in SCHEDULES:
        raise ValueError(SCHEDULES.unknown_reason(schedule))
    _check_positive_int("budget", budget)
    _check_positive_int("steps_per_epoch", steps_per_epoch)
    if schedule != "clr":
        return None
    return _one_cycle(
        CLR_MAX_MOMENTUM,
        CLR_BASE_MOMENTUM,
        CLR_MAX_MOMENTUM,
        budget * steps_per_epoch,
        recipe.warmup_fraction,
    )


# -- the lr curves the schedule registry names: (recipe, budget, S, peak override or None) --


def ft_lr(recipe: Recipe, budget: int, steps_per_epoch: int, peak: float | None) -> np.ndarray:
    lr = recipe.final_lr if peak is None else peak
    return np.full(budget * steps_per_epoch, lr, dtype=np.float64)


def rewind_lr(recipe: Recipe, budget: int, steps_per_epoch: int, peak: float | None) -> np.ndarray:
    first = rewind_epoch(recipe, budget)
    per_epoch = np.array([recipe.lr_at_epoch(first + e) for e in range(budget)], dtype=np.float64)
    if peak is not None:
        per_epoch *= peak / per_epoch.max()
    return np.repeat(per_epoch, steps_per_epoch)


def scratch_lr(recipe: Recipe, budget: int, steps_per_epoch: int, peak: float | None) -> np.ndarray:
    return _compressed_steps(recipe, recipe.lr if peak is None else peak, budget * steps_per_epoch)


def slr_lr(recipe: Recipe, budget: int, steps_per_epoch: int, peak: float | None) -> np.ndarray:
    peak = recipe.lr if peak is None else peak
    start = min(recipe.final_lr, peak)  # WarmupLR._format_param: min(init_lr, lr)
    fraction = recipe.warmup_fraction
    warmup = int(fraction * budget)  # main_finetune.py: int(pct_start * epochs)
    per_epoch = np.full(budget, peak, dtype=np.float64)
    # WarmupLR._warmup_cos at pct = e / W, the operations in its order
    pct = np.arange(warmup, dtype=np.float64) / max(warmup, 1)
    per_epoch[:warmup] = peak + (start - peak) / 2.0 * (np.cos(math.pi * pct) + 1)
    for m in recipe.milestones:
        # main_finetune.py: int(0.5 * 0.9 * epochs), MultiStepLR counting from the warm-up's end
        per_epoch[warmup + int(m / recipe.epochs * (1 - fraction) * budget) :] *= recipe.gamma
    return np.repeat(per_epoch, steps_per_epoch)


def clr_lr(recipe: Recipe, budget: int, steps_per_epoch: int, peak: float | None) -> np.ndarray:
    peak = recipe.lr if peak is None else peak
    initial = peak / CLR_DIV_FACTOR
    return _one_cycle(
        initial,
        peak,
        initial / CLR_FINAL_DIV_FACTOR,
        budget * steps_per_epoch,
        recipe.warmup_fraction,
    )


def stretched_lr(
    recipe: Recipe, budget: int, steps_per_epoch: int, peak: float | None
) -> np.ndarray:
    """scratch_e / scratch_b: the recipe's step curve stretched to `budget` epochs."""
    peak = recipe.lr if peak is None else peak
    return np.repeat(_stretched_epochs(recipe, peak, budget), steps_per_epoch)


def scratch_b_epochs(recipe: Recipe, base_macs: int, pruned_macs: int) -> int:
    """Scratch-B's epochs: floor(T * base_macs / pruned_macs), in exact integer arithmetic."""
    _check_positive_int("base_macs", base_macs)
    _check_positive_int("pruned_macs", pruned_macs)
    if pruned_macs > base_macs:
        raise ValueError(f"pruned_macs {pruned_macs} exceeds base_macs {base_macs}")
    return recipe.epochs * base_macs // pruned_macs


def run_epochs(
    schedule: str,
    budget: int,
    recipe: Recipe,
    *,
    base_macs: int | None = None,
    pruned_macs: int | None = None,
) -> int:
    """Epochs a retraining run of `schedule` trains: `budget`, except T for scratch_e and
    `scratch_b_epochs` for scratch_b (which needs the base and pruned MACs)."""
    if schedule == "scratch_e":
        return recipe.epochs
    if schedule == "scratch_b":
        if base_macs is None or pruned_macs is None:
            raise ValueError("scratch_b needs base_macs and pruned_macs")
        return scratch_b_epochs(recipe, base_macs, pruned_macs)
    _check_positive_int("budget", budget)
    return budget


def pretrain_schedule(recipe: Recipe, steps_per_epoch: int) -> np.ndarray:
    """The lr of every optimizer step of the pre-training run (constant within an epoch)."""
    _check_positive_int("steps_per_epoch", steps_per_epoch)
    per_epoch = np.array([recipe.lr_at_epoch(e) for e in range(recipe.epochs)], dtype=np.float64)
    return np.repeat(per_epoch, steps_per_epoch)


def rewind_epoch(recipe: Recipe, budget: int) -> int:
    """Pre-training epochs completed by the weights `wr` restores: T - budget (0 = initial)."""
    _check_positive_int("budget", budget)
    if budget > recipe.epochs:
        raise ValueError(
            f"budget {budget} exceeds the pre-training run (T = recipe.epochs = {recipe.epochs}): "
            "lrw/wr can only replay epochs that pre-training had"
        )
    return recipe.epochs - budget


def _compressed_steps(recipe: Recipe, peak: float, n_steps: int) -> np.ndarray:
    """`peak` with a `gamma` drop at each milestone fraction of `n_steps` (nearest step)."""
    lr = np.full(n_steps, peak, dtype=np.float64)
    for m in recipe.milestones:
        # nearest step to m / T * n_steps, halves up, in integer arithmetic
        drop = (2 * m * n_steps + recipe.epochs) // (2 * recipe.epochs)
        lr[drop:] *= recipe.gamma
    return lr


def _stretched_epochs(recipe: Recipe, peak: float, epochs: int) -> np.ndarray:
    """One lr per epoch: `peak`, times `gamma` from epoch floor(m / T * epochs) on."""
    lr = np.full(epochs, peak, dtype=np.float64)
    for m in recipe.milestones:
        lr[m * epochs // recipe.epochs :] *= recipe.gamma
    return lr


def _one_cycle(
    start: float, peak: float, end: float, total_steps: int, pct_start: float
) -> np.ndarray:
    """Closed form of OneCycleLR (cos anneal, two phases) at steps 0..total_steps-1: `start`
    to `peak` until step pct_start*total_steps - 1, then to `end` at the last step. The lr
    runs (max_lr/div, max_lr, max_lr/div/final_div), the momentum (max, base, max)."""
    up_end = float(pct_start * total_steps) - 1  # OneCycleLR's end_step of phase 1
    down_end = float(total_steps - 1)
    step = np.arange(total_steps, dtype=np.float64)
    in_up = step <= up_end

    out = np.empty(total_steps, dtype=np.float64)
    out[in_up] = _cos_anneal(start, peak, _pct(step[in_up], 0.0, up_end))
    out[~in_up] = _cos_anneal(peak, end, _pct(step[~in_up], up_end, down_end))
    return out


def _pct(step: np.ndarray, start: float, end: float) -> np.ndarray:
    # A zero-length phase holds its start value (OneCycleLR would divide 0 by 0 here).
    if end == start:
        return np.zeros_like(step)
    return (step - start) / (end - start)


def _cos_anneal(start: float, end: float, pct: np.ndarray) -> np.ndarray:
    # Same operation order as OneCycleLR._annealing_cos, so results agree to the last bits.
    cos_out = np.cos(math.pi * pct) + 1
    return end + (start - end) / 2.0 * cos_out


def _check_positive_int(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")


def check_override(name: str, value: object) -> float:
    """The value of schedule override `name`, normalised; ValueError if it is not valid."""
    if name not in KNOWN_OVERRIDES:
        raise ValueError(f"unknown schedule override {name!r}; known: {sorted(KNOWN_OVERRIDES)}")
    # lr, the only override: a positive finite number
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"override lr must be a positive finite number, got {value!r}")
    return float(value)


def _peak_override(overrides: Mapping[str, float] | None) -> float | None:
    if not overrides:
        return None
    checked = {key: check_override(key, value) for key, value in overrides.items()}
    return checked.get("lr")
