"""Unstructured (weight-level) pruning with `torch.nn.utils.prune` masks.

Which weights are considered is the pruner entry's ``layers`` option: ``"conv"`` (default) =
the ``weight`` of every ``nn.Conv2d``, as the authors' weight-level code prunes
(norm-pruning/cifar/weight-level/cifar_prune.py); ``"conv+linear"`` adds every ``nn.Linear``,
the classifier included. Biases and normalisation layers are never pruned. Pruners, all
computing a boolean keep-mask per considered module:

``magnitude``
    Global magnitude pruning (Han et al. 2015): remove the round(ratio * N) weights of
    smallest |w| over all N considered weights, one threshold for the whole network, exactly
    ``prune.global_unstructured(..., pruning_method=prune.L1Unstructured, amount=round(ratio*N))``.
    A global threshold can empty a layer whose weights are all small. By default nothing
    stops it (the authors' code does not either; it only notes it): the prune stage records
    the emptied layers and the report flags them. The ``min_keep`` option sets a per-layer
    floor instead: every layer keeps at least ``max(1, ceil(min_keep * n_layer))`` weights,
    and what pruning a capped layer would have removed is taken from the other layers,
    smallest |w| first, so the total still equals the target.
``random``
    The authors' random weight pruning: every considered weight gets a uniform random score
    and the same global selection as ``magnitude`` removes the round(ratio * N) lowest, so
    every layer loses about ``ratio`` of its weights (the count varies by chance). Scores come
    from a ``torch.Generator`` seeded with ``seed`` (never the global RNG), one draw per layer
    in a fixed order. ``min_keep`` applies as for ``magnitude``.
``magnitude_layerwise``
    Every layer loses its round(ratio * n_layer) smallest |w| (``prune.l1_unstructured`` per
    layer), keeping at least one weight (or the ``min_keep`` floor).

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

from nptm.trainables.catalog import PRUNERS
from nptm.trainables.pruners.plan import PrunePlan

__all__ = [
    "UNSTRUCTURED_PRUNERS",
    "apply_masks",
    "effective_weight",
    "emptied_layers",
    "layer_density",
    "layer_sparsity",
    "prunable_layers",
    "sparsity",
    "unstructured_plan",
]

UNSTRUCTURED_PRUNERS: tuple[str, ...] = tuple(n for n, p in PRUNERS.items() if not p.structured)
# Module types whose weights each `layers` option considers.
LAYER_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv2d,),
    "conv+linear": (nn.Conv2d, nn.Linear),
}
MASKABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)

# Score given to already-pruned weights: below every |w| and every random score, so they are
# always pruned first.
_PRUNED_SCORE = -1.0


def prunable_layers(model: nn.Module, layers: str = "conv") -> dict[str, nn.Module]:
    """The modules `layers` ("conv" or "conv+linear") considers, by name, in module order."""
    if layers not in LAYER_TYPES:
        raise ValueError(f"layers {layers!r} is not one of {', '.join(LAYER_TYPES)}")
    types = LAYER_TYPES[layers]
    return {name: m for name, m in model.named_modules() if isinstance(m, types)}


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


def _floor(n: int, min_keep: float) -> int:
    """Weights a layer of `n` always keeps: none without a floor, else at least one."""
    return max(1, math.ceil(min_keep * n)) if min_keep > 0 else 0


def unstructured_plan(
    model: nn.Module,
    pruner: str,
    *,
    ratio: float,
    seed: int,
    layers: str = "conv",
    min_keep: float = 0.0,
) -> PrunePlan:
    """Keep-masks reaching sparsity `ratio` over the considered weights (cumulative)."""
    if pruner not in UNSTRUCTURED_PRUNERS:
        raise ValueError(f"unknown unstructured pruner {pruner!r}; known: {UNSTRUCTURED_PRUNERS}")
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio {ratio!r} is outside [0, 1)")
    if not 0.0 <= min_keep < 1.0:
        raise ValueError(f"min_keep {min_keep!r} is outside [0, 1)")
    considered = prunable_layers(model, layers)
    if not considered:
        raise ValueError(f"model {type(model).__name__} has no layer of kind {layers!r} to prune")

    keeps = {name: _existing_keep(m) for name, m in considered.items()}
    with torch.no_grad():
        if pruner == "random":
            gen = torch.Generator().manual_seed(seed)
            # one draw per layer in a fixed order, independent of the masks: reproducible
            scores = {n: torch.rand(m.weight.shape, generator=gen) for n, m in considered.items()}
        else:
            scores = {n: effective_weight(m).abs().cpu() for n, m in considered.items()}
        for name, keep in keeps.items():
            scores[name] = scores[name].masked_fill(~keep.cpu(), _PRUNED_SCORE)

        if pruner == "magnitude_layerwise":  # per-layer target, at least one weight kept
            counts = {
                n: max(
                    min(round(ratio * s.numel()), s.numel() - max(1, _floor(s.numel(), min_keep))),
                    _n_pruned(keeps[n]),
                )
                for n, s in scores.items()
            }
        else:  # magnitude, random: one global selection
            counts = _global_prune_counts(scores, keeps, ratio, min_keep)
        masks = {n: _keep_mask(scores[n], counts[n]) for n in considered}
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
    """Pruned weights per layer under one global threshold, capped at every layer's floor
    (no cap without a floor: then this is the plain global selection).

    Layers whose share of the global selection exceeds their cap are fixed at the cap and the
    selection is repeated over the others for what is left. Raising the threshold only adds
    weights to a layer, so a capped layer stays capped and this equals walking the global
    |w| order once and skipping layers that are full.
    """
    total = sum(s.numel() for s in scores.values())
    already = {n: _n_pruned(k) for n, k in keeps.items()}
    # a layer pruned beyond its floor by earlier rounds keeps its mask (nothing is revived)
    caps = {n: max(s.numel() - _floor(s.numel(), min_keep), already[n]) for n, s in scores.items()}
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
    maskable = {n: m for n, m in model.named_modules() if isinstance(m, MASKABLE_TYPES)}
    for name, mask in masks.items():
        module = maskable.get(name)
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


def layer_density(model: nn.Module) -> dict[str, float]:
    """Share of non-zero effective weights of every Conv2d and Linear layer."""
    return {
        name: float(torch.count_nonzero(effective_weight(m))) / m.weight.numel()
        for name, m in prunable_layers(model, "conv+linear").items()
    }


def layer_sparsity(model: nn.Module, layers: str = "conv") -> dict[str, float]:
    """Share of exactly-zero effective weights of every layer `layers` considers."""
    return {
        name: float((effective_weight(m) == 0).sum()) / m.weight.numel()
        for name, m in prunable_layers(model, layers).items()
    }


def emptied_layers(model: nn.Module) -> list[str]:
    """Conv2d/Linear layers whose effective weights are all zero (cut off by pruning)."""
    return [name for name, density in layer_density(model).items() if density == 0.0]


def sparsity(model: nn.Module, layers: str = "conv") -> float:
    """Share of exactly-zero effective weights over all weights `layers` considers."""
    considered = prunable_layers(model, layers).values()
    zeros = sum(int((effective_weight(m) == 0).sum()) for m in considered)
    total = sum(m.weight.numel() for m in considered)
    return zeros / total if total else 0.0
