"""Can a structured pruner prune a model? Checked when a grid is, on the real model, so that an
architecture the surgery cannot handle (a prunable conv whose channels a residual add shares,
an operation torch-pruning cannot follow) is refused before any stage runs.

The check takes the prune stage's own path: the filter counts of the ratio or preset, the
pruner's plan, torch-pruning's surgery (`apply_structured`), then a forward pass of the pruned
model. Only the scores are cheap: which filters go does not change which layers are coupled,
so built-in pruners rank by weight norm here; a plugin pruner's own importance function runs
(on synthetic batches if it needs data), which also dry-calls it (nptm.trainables.plugin_checks).

Verdicts are kept for the process, per model and dataset definition and ratio or preset (and
plugin pruner): a grid of thousands of trials, or many grids, builds each model once.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from nptm.trainables.catalog import DATASETS, MODELS, PRUNERS
from nptm.trainables.models import build_model
from nptm.trainables.plugin_checks import PluginCheckError, check_scores, is_plugin
from nptm.trainables.pruners.structured import (
    apply_structured,
    filter_counts,
    l1_importance,
    lowest,
)

_verdicts: dict[tuple[Any, ...], str | None] = {}  # see `structured_problem`


def structured_problem(
    model: str,
    dataset: str,
    pruner: str,
    ratio: float | None,
    preset: str | None,
    built: dict[tuple[str, str], nn.Module] | None = None,
) -> str | None:
    """Why structured `pruner` cannot prune `model` (as built for `dataset`) at the ratio or
    preset, naming the layer at fault; None if it can. `built`: models built so far by the
    caller, by (model, dataset), reused and filled in (they are never changed here).

    Raises PluginCheckError for a plugin pruner's importance function that does not fit."""
    info = PRUNERS[pruner]
    own = info if is_plugin(info.importance) else None  # built-ins: one verdict for all
    key = (MODELS[model], DATASETS[dataset], ratio, preset, own)
    if key not in _verdicts:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # passes of one or two images: more threads only wait
        try:
            _verdicts[key] = _prune(model, dataset, pruner, ratio, preset, own, built)
        finally:
            torch.set_num_threads(threads)
    return _verdicts[key]


def _prune(
    model: str,
    dataset: str,
    pruner: str,
    ratio: float | None,
    preset: str | None,
    own: Any,
    built: dict[tuple[str, str], nn.Module] | None,
) -> str | None:
    built = {} if built is None else built
    if (model, dataset) not in built:
        built[model, dataset] = build_model(model, dataset, seed=0)
    base = built[model, dataset]
    target = f"ratio {ratio}" if ratio is not None else f"preset {preset!r}"
    head = f"pruner {pruner!r} ({target}) cannot prune model {model!r} built for {dataset!r}"
    try:
        counts = filter_counts(base, model, ratio=ratio, preset=preset)
    except ValueError as err:
        return f"{head}: {err}"
    if not counts:
        return None
    net = copy.deepcopy(base)
    names = list(counts)
    if own is None:
        scores = l1_importance(net, names)
    else:
        scores = _plugin_scores(own, net, names, model, dataset)
    removed = {n: lowest(torch.as_tensor(scores[n]), counts[n]) for n in names}
    fix = ""
    if is_plugin(MODELS[model].prunable_convs):
        fix = f"; leave such convs out of the model's {MODELS[model].prunable_convs!r}"
    try:
        apply_structured(net, removed)
    except ValueError as err:  # the layer whose channels are coupled, named by the surgery
        return f"{head}: {err}{fix}"
    except Exception as err:  # torch-pruning could not follow the architecture
        return f"{head}: torch-pruning's surgery failed: {type(err).__name__}: {err}{fix}"
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, *net.input_shape))
    except Exception as err:
        first = f"{type(err).__name__}: {err}".splitlines()[0]
        return f"{head}: the pruned model fails on an input: {first}{fix}"
    return None


def _plugin_scores(info: Any, net: nn.Module, names: list[str], model: str, dataset: str) -> dict:
    """A plugin pruner's own importance on the real model: its dry call."""
    from nptm.trainables.inspect import synthetic_batches
    from nptm.trainables.plugin_checks import IMPORTANCE, bound_function

    batches = synthetic_batches(dataset, seed=0) if info.needs_data else None
    fn = bound_function("pruner", info.name, info.importance, IMPORTANCE, (net, names, batches, 0))
    try:
        scores = fn(net, names, batches, 0)
    except Exception as err:
        what = f"on model {model!r} built for {dataset!r} it raised {type(err).__name__}: {err}"
        raise PluginCheckError(
            f"plugin pruner {info.name!r}: {info.importance!r} must be {IMPORTANCE}, but {what}"
        ) from None
    check_scores(info, scores, net, names)
    return scores
