"""Pruners: compute a `PrunePlan` from a trained model, then apply it.

A plan is the single description of what pruning did. Applying it to a model of the base
architecture reproduces the pruned network, which is how a pruned model is rebuilt from
storage, how weight rewinding re-applies the pruning to earlier weights, and how the
`scratch` baseline gets its architecture. Masks therefore never get lost in a rebuild.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from nptm.trainables.catalog import PRUNERS, IncompatibleError, check_pruner_target, pruner_options
from nptm.trainables.pruners.plan import PrunePlan

__all__ = ["PrunePlan", "apply_plan", "compute_plan"]

Batch = tuple[torch.Tensor, torch.Tensor]


def compute_plan(
    model: nn.Module,
    model_name: str,
    pruner: str,
    *,
    ratio: float | None = None,
    preset: str | None = None,
    batches: Iterable[Batch] | None = None,
    seed: int = 0,
    options: Mapping[str, object] | None = None,
) -> PrunePlan:
    """Decide what to prune. `batches` are needed by data-driven pruners (hrank,
    taylor_conv_oneshot); `options` are an unstructured pruner's `layers` / `min_keep`
    (nptm.trainables.catalog.UNSTRUCTURED_OPTIONS)."""
    check_pruner_target(pruner, model_name, ratio, preset)
    try:
        resolved = dict(pruner_options(pruner, dict(options or {})))
    except IncompatibleError as err:
        raise ValueError(str(err)) from None
    if PRUNERS[pruner].structured:
        from nptm.trainables.pruners.structured import structured_plan

        return structured_plan(
            model, model_name, pruner, ratio=ratio, preset=preset, batches=batches, seed=seed
        )
    from nptm.trainables.pruners.unstructured import unstructured_plan

    assert ratio is not None
    return unstructured_plan(model, pruner, ratio=ratio, seed=seed, **resolved)


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Apply `plan` to `model` (base architecture, or already pruned by earlier rounds)."""
    if plan.removed_channels:
        from nptm.trainables.pruners.structured import apply_structured

        model = apply_structured(model, plan.removed_channels)
    if plan.masks:
        from nptm.trainables.pruners.unstructured import apply_masks

        model = apply_masks(model, plan.masks)
    return model
