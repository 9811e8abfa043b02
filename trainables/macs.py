"""Parameter and MAC counts, in the convention of PFEC's Table 1 (Li et al. 2017).

- params: every parameter of the model, counted once. A weight under
  torch.nn.utils.prune reparametrisation is the parameter `weight_orig` (its `weight_mask` is a
  buffer), so a masked model has as many params as its dense version.
- MACs ("FLOPs" in PFEC and most pruning papers): multiply-accumulates of Conv2d and Linear
  layers only, for one input image, one MAC per multiply-add, bias excluded. BatchNorm,
  activations, pooling and residual additions are not counted. A conv contributes
  out_elements * (in_channels / groups) * kh * kw, a Linear in_features * out_features per
  output row. MACs of a masked model are those of its dense architecture.
- nonzero params: like params, except the weights of Conv2d/Linear layers count only their
  non-zero effective entries (weight_orig * weight_mask for masked layers, or weights zeroed in
  place); BatchNorm parameters and biases count in full.

Counting runs one dummy forward pass (batch 1, eval mode, no grad) with forward hooks, so a
module called twice is counted twice and any architecture that runs is supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nptm.trainables.catalog import DATASETS

InputSpec = str | Sequence[int]


def input_shape(dataset_or_input_shape: InputSpec) -> tuple[int, int, int]:
    """(C, H, W) of a dataset name, or a given (C, H, W) shape checked and returned."""
    if isinstance(dataset_or_input_shape, str):
        if dataset_or_input_shape not in DATASETS:
            raise ValueError(
                f"unknown dataset {dataset_or_input_shape!r}; known: {sorted(DATASETS)}"
            )
        d = DATASETS[dataset_or_input_shape]
        return (d.in_channels, d.image_size, d.image_size)
    shape = tuple(int(s) for s in dataset_or_input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input shape must be (C, H, W) with positive sizes, got {shape}")
    return shape  # type: ignore[return-value]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    # Per image: the dummy batch has size 1, so output.numel() is the per-image output size.
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    assert isinstance(module, nn.Linear)
    return output.numel() * module.in_features


def count_macs(model: nn.Module, dataset_or_input_shape: InputSpec) -> int:
    shape = input_shape(dataset_or_input_shape)
    total = 0

    def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        total += _layer_macs(module, output)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was_training = model.training
    first = next(model.parameters(), None)
    x = torch.zeros(
        1,
        *shape,
        device=first.device if first is not None else "cpu",
        dtype=first.dtype if first is not None else torch.float32,
    )
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def count_params_macs(model: nn.Module, dataset_or_input_shape: InputSpec) -> tuple[int, int]:
    """(params, MACs) of `model` for one input of the dataset's (or the given (C, H, W)) shape."""
    return count_params(model), count_macs(model, dataset_or_input_shape)


def _effective_weight(module: nn.Module) -> torch.Tensor:
    # Computed from weight_orig and weight_mask: `module.weight` of a masked module is only
    # refreshed by the next forward pass.
    mask = getattr(module, "weight_mask", None)
    if mask is not None and hasattr(module, "weight_orig"):
        return module.weight_orig.detach() * mask
    return module.weight.detach()


def count_nonzero_params(model: nn.Module) -> int:
    """Params with Conv2d/Linear weights counted by their non-zero effective entries."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.Conv2d | nn.Linear) and name in ("weight", "weight_orig"):
                total += int(torch.count_nonzero(_effective_weight(module)))
            else:
                total += p.numel()
    return total
