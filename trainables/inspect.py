"""`nptm inspect`: params and MACs of a model before and after pruning, without any data.

Counts follow nptm.trainables.macs (PFEC's convention: MACs of Conv2d/Linear, bias excluded).
"shortcuts" lists the parameter-free (option-A) shortcuts of a CIFAR ResNet, which the layer
list (Conv2d/Linear) does not show: how each downsamples ("avgpool", the authors' AvgPool2d,
or "subsample") and the zero channels it appends.
Data-driven pruners (hrank, taylor_conv_oneshot) rank filters on two seeded batches of
random-normal images with random labels, so no dataset is needed; the result says so
("importance_data": "synthetic"). The architecture they produce (channel counts, params,
MACs) is the one a preset or ratio defines and does not depend on the data; which filters go
does.

In "pruned": `params_reduction` and `macs_reduction` compare the physical (dense) counts with
the base model; `sparsity` is the share of the pruned model's own parameters that are zero
(masked) in its Conv2d/Linear weights, i.e. 1 - nonzero_params / params. Structured pruning
therefore shows up in the reductions, unstructured pruning in the sparsity.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from nptm.trainables.catalog import DATASETS, PRUNERS, check_model_dataset, check_pruner_target
from nptm.trainables.macs import count_nonzero_params, count_params_macs
from nptm.trainables.models import ShortcutA, build_model
from nptm.trainables.pruners import apply_plan, compute_plan

SYNTHETIC_BATCHES = 2


def synthetic_batches(dataset: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded random-normal images and uniform labels shaped like `dataset`'s samples.

    Two batches of 8 images, or of 2 above 64 px: HRank's SVDs of 112x112 maps would
    otherwise make inspecting an ImageNet model take half a minute on a CPU.
    """
    info = DATASETS[dataset]
    size = 8 if info.image_size <= 64 else 2
    gen = torch.Generator().manual_seed(seed)
    shape = (size, info.in_channels, info.image_size, info.image_size)
    return [
        (
            torch.randn(shape, generator=gen),
            torch.randint(0, info.num_classes, (size,), generator=gen),
        )
        for _ in range(SYNTHETIC_BATCHES)
    ]


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def _out(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _shortcuts(model: nn.Module) -> list[dict[str, Any]]:
    return [
        {"name": n, "kind": m.kind, "stride": m.stride, "zero_channels": m.extra_channels}
        for n, m in model.named_modules()
        if isinstance(m, ShortcutA)
    ]


def _density(m: nn.Module) -> float:
    mask = getattr(m, "weight_mask", None)
    w = m.weight_orig.detach() * mask if mask is not None else m.weight.detach()
    return int(torch.count_nonzero(w)) / w.numel()


def inspect_model(
    dataset: str,
    model: str,
    pruner: str | None = None,
    ratio: float | None = None,
    preset: str | None = None,
    seed: int = 0,
    options: dict[str, object] | None = None,
) -> dict[str, Any]:
    """Base and pruned counts plus per-layer output channels; "pruned" is None without pruner.
    `options` are an unstructured pruner's (layers, min_keep); by default only Conv2d weights
    are pruned, so the classifier's density is 1.0."""
    check_model_dataset(model, dataset)
    if pruner is None and (ratio is not None or preset is not None):
        raise ValueError("'ratio'/'preset' given without a 'pruner'")
    if pruner is not None:
        check_pruner_target(pruner, model, ratio, preset)
    net = build_model(model, dataset, seed=seed)
    params, macs = count_params_macs(net, dataset)
    result: dict[str, Any] = {
        "dataset": dataset,
        "model": model,
        "pruner": pruner,
        "ratio": ratio,
        "preset": preset,
        "seed": seed,
        "importance_data": None,
        "base": {"params": params, "macs": macs},
        "pruned": None,
        "shortcuts": _shortcuts(net),
    }
    base_layers = _layers(net)
    if pruner is None:
        result["layers"] = [
            {"name": n, "type": type(m).__name__, "out_channels_base": _out(m),
             "out_channels_pruned": None}
            for n, m in base_layers.items()
        ]  # fmt: skip
        return result

    batches = None
    if PRUNERS[pruner].needs_data:
        batches = synthetic_batches(dataset, seed)
        result["importance_data"] = "synthetic"
    plan = compute_plan(
        net, model, pruner, ratio=ratio, preset=preset, batches=batches, seed=seed, options=options
    )
    pruned = apply_plan(copy.deepcopy(net), plan)
    p_params, p_macs = count_params_macs(pruned, dataset)
    nonzero = count_nonzero_params(pruned)
    result["pruned"] = {
        "params": p_params,
        "macs": p_macs,
        "nonzero_params": nonzero,
        "sparsity": 1 - nonzero / p_params,
        "params_reduction": 1 - p_params / params,
        "macs_reduction": 1 - p_macs / macs,
    }
    pruned_layers = _layers(pruned)
    result["layers"] = [
        {
            "name": n,
            "type": type(m).__name__,
            "out_channels_base": _out(m),
            "out_channels_pruned": _out(pruned_layers[n]),
            "weight_density": _density(pruned_layers[n]),
        }
        for n, m in base_layers.items()
    ]
    return result
