"""Unstructured (weight-level) pruning with `torch.nn.utils.prune` masks.

Prunable weights are the ``weight`` tensors of every ``nn.Conv2d`` and ``nn.Linear`` module
(subclasses included), the final classifier too; biases and normalisation layers are never
pruned. Pruners, all computing a boolean keep-mask per prunable module:

``magnitude``
    Global magnitude pruning (Han et al. 2015): remove the round(ratio * N) weights of
    smallest |w| over all N prunable weights. A global threshold can empty a layer whose
    weights are all small, which disconnects the network, so every layer keeps at least
    ``max(1, ceil(MIN_KEEP * n_layer))`` weights (``MIN_KEEP`` = 0.5 %); pruning a capped
    layer would have removed is taken from the other layers, smallest |w| first, so the total
    still equals the target. When no layer reaches its floor the result is exactly
    ``prune.global_unstructured(..., pruning_method=prune.L1Unstructured, amount=round(ratio*N))``.
``magnitude_layerwise``
    Every layer loses its round(ratio * n_layer) smallest |w| (``prune.l1_unstructured`` per
    layer), keeping at least one weight.
``random``
    Every layer loses round(ratio * n_layer) weights chosen uniformly at random (at least one
    kept), from a ``torch.Generator`` seeded with ``seed`` (never the global RNG).

Iterative pruning: a model that already carries masks (``weight_orig`` + ``weight_mask``) is
pruned cumulatively: ``ratio`` is the target sparsity of the effective weights
(``weight_orig * weight_mask``), already-pruned weights count as pruned and are always the first
to go, so a new mask only ever removes more weights (it is contained in the old keep-mask).
Where earlier rounds already pruned more than the new target, nothing is revived and the
sparsity stays above the target. Because masks are cumulative, the last round's plan alone
rebuilds the pruned model.

``apply_masks`` uses ``prune.custom_from_mask``: the parameter becomes ``weight_orig`` and the
forward pass uses ``weight_orig * weight_mask``, so pruned weights stay exactly zero through
retraining with momentum and weight decay (their gradient through the mask is zero and whatever
``weight_orig`` drifts to is multiplied by 0). Build the optimizer *after* applying masks: the
parameter to optimise is then ``weight_orig``.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn
from torch.nn.utils import prune

from trainables.catalog import PRUNERS
from trainables.pruners.plan import PrunePlan

__all__ = [
    "MIN_KEEP",
    "UNSTRUCTURED_PRUNERS",
    "apply_masks",
    "effective_weight",
    "layer_sparsity",
    "prunable_layers",
    "sparsity",
    "unstructured_plan",
]

# Share of every layer's weights that global magnitude pruning always keeps.
MIN_KEEP = 0.005
UNSTRUCTURED_PRUNERS: tuple[str, ...] = tuple(n for n, p in PRUNERS.items() if not p.structured)
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)

# Score given to already-pruned weights: below every |w|, so they are always pruned first.
_PRUNED_SCORE = -1.0


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear modules by qualified name, in `named_modules` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the forward pass uses: ``weight_orig * weight_mask`` when masked.

    Computed from the parameter and the buffer rather than read from ``module.weight``, which
    torch only refreshes in the next forward pass.
    """
    if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
        return module.weight_orig.detach() * module.weight_mask
    return module.weight.detach()


def _existing_keep(module: nn.Module) -> torch.Tensor:
    mask = getattr(module, "weight_mask", None)
    if mask is None:
        return torch.ones_like(module.weight, dtype=torch.bool)
    return mask.detach() != 0


def unstructured_plan(
    model: nn.Module, pruner: str, *, ratio: float, seed: int, min_keep: float = MIN_KEEP
) -> PrunePlan:
    """Keep-masks reaching sparsity `ratio` over the prunable weights (cumulative)."""
    if pruner not in UNSTRUCTURED_PRUNERS:
        raise ValueError(f"unknown unstructured pruner {pruner!r}; known: {UNSTRUCTURED_PRUNERS}")
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio {ratio!r} is outside [0, 1)")
    if not 0.0 <= min_keep < 1.0:
        raise ValueError(f"min_keep {min_keep!r} is outside [0, 1)")
    layers = prunable_layers(model)
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no Conv2d or Linear layer to prune")

    keeps = {name: _existing_keep(m) for name, m in layers.items()}
    with torch.no_grad():
        if pruner == "random":
            gen = torch.Generator().manual_seed(seed)
            # one draw per layer in a fixed order, independent of the masks: reproducible
            scores = {n: torch.rand(m.weight.shape, generator=gen) for n, m in layers.items()}
        else:
            scores = {n: effective_weight(m).abs().cpu() for n, m in layers.items()}
        for name, keep in keeps.items():
            scores[name] = scores[name].masked_fill(~keep.cpu(), _PRUNED_SCORE)

        if pruner == "magnitude":
            counts = _global_prune_counts(scores, keeps, ratio, min_keep)
        else:  # per-layer target, at least one weight kept
            counts = {
                n: max(min(round(ratio * s.numel()), s.numel() - 1), _n_pruned(keeps[n]))
                for n, s in scores.items()
            }
        masks = {n: _keep_mask(scores[n], counts[n]) for n in layers}
    return PrunePlan(pruner=pruner, masks=masks)


def _n_pruned(keep: torch.Tensor) -> int:
    return int(keep.numel() - keep.sum())


def _keep_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Bool keep-mask removing the `n_prune` lowest scores (the topk call L1Unstructured uses)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if n_prune:
        keep[torch.topk(scores.reshape(-1), k=n_prune, largest=False).indices] = False
    return keep.view(scores.shape)


def _global_prune_counts(
    scores: dict[str, torch.Tensor],
    keeps: dict[str, torch.Tensor],
    ratio: float,
    min_keep: float,
) -> dict[str, int]:
    """Pruned weights per layer under one global threshold, capped at every layer's floor.

    Layers whose share of the global selection exceeds their cap are fixed at the cap and the
    selection is repeated over the others for what is left. Raising the threshold only adds
    weights to a layer, so a capped layer stays capped and this equals walking the global
    |w| order once and skipping layers that are full.
    """
    total = sum(s.numel() for s in scores.values())
    already = {n: _n_pruned(k) for n, k in keeps.items()}
    # a layer pruned beyond its floor by earlier rounds keeps its mask (nothing is revived)
    caps = {
        n: max(s.numel() - max(1, math.ceil(min_keep * s.numel())), already[n])
        for n, s in scores.items()
    }
    target = max(round(ratio * total), sum(already.values()))
    if target > sum(caps.values()):
        raise ValueError(
            f"ratio {ratio} would prune {target} of {total} weights, but keeping at least "
            f"min_keep={min_keep} of every layer allows at most {sum(caps.values())}"
        )

    counts: dict[str, int] = {}
    free = list(scores)
    remaining = target
    while free and remaining:
        flat = torch.cat([scores[n].reshape(-1) for n in free])
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[torch.topk(flat, k=remaining, largest=False).indices] = True
        sizes = [scores[n].numel() for n in free]
        share = dict(zip(free, (int(c.sum()) for c in chosen.split(sizes)), strict=True))
        over = [n for n in free if share[n] > caps[n]]
        if not over:
            counts |= share
            remaining = 0
            break
        for n in over:
            counts[n] = caps[n]
            remaining -= caps[n]
            free.remove(n)
    for n in scores:
        counts.setdefault(n, 0)
    return counts


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Mask the named modules' weights in place (combined with existing masks); returns model."""
    layers = prunable_layers(model)
    for name, mask in masks.items():
        module = layers.get(name)
        if module is None:
            raise ValueError(f"mask for {name!r}, which is not a Conv2d/Linear module of the model")
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(mask.shape)}, "
                f"but its weight has shape {tuple(module.weight.shape)}"
            )
        device_mask = mask.to(device=module.weight.device, dtype=module.weight.dtype)
        prune.custom_from_mask(module, "weight", device_mask)
    return model


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Share of exactly-zero effective weights of every prunable layer."""
    return {
        name: float((effective_weight(m) == 0).sum()) / m.weight.numel()
        for name, m in prunable_layers(model).items()
    }


def sparsity(model: nn.Module) -> float:
    """Share of exactly-zero effective weights over all prunable weights."""
    layers = prunable_layers(model).values()
    zeros = sum(int((effective_weight(m) == 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    return zeros / total if total else 0.0
