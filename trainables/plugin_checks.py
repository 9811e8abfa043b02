"""Dry calls of a plugin's functions when a grid that names it is checked, so a function that
does not fit its kind's signature is refused with a message (`PluginCheckError`) before a
stage fails on it on a worker.

- a model's `build` is called for each dataset the grid pairs it with, and what it builds must
  map a batch of two zero images of that dataset to (2, classes) logits; its `prunable_convs`
  must name Conv2d modules of that model;
- a pruner's `importance` is called by the structured-pruning check on each real model
  (nptm.trainables.pruners.feasibility), and must score every filter of every conv it is given;
- a schedule's `lr` is evaluated for a 2-epoch budget of 3 steps per epoch;
- a dataset's `loader` (and `check`) must accept the arguments the stage passes; they are not
  called: loading needs the data, which `nptm sweep` checks where the stages run.

Built-in entries (import paths under `nptm.`) are not dry-called: the test suite runs them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nptm.trainables.catalog import DATASETS, MODELS, SCHEDULES, DatasetInfo, PrunerInfo
from nptm.trainables.recipe import Recipe
from nptm.trainables.registry import resolve

# What each function must be, as the messages state it.
BUILD = "build(info, in_channels, num_classes) -> nn.Module"
PRUNABLE_CONVS = "prunable_convs(model) -> [names of the model's Conv2d modules]"
IMPORTANCE = "importance(model, conv_names, batches, seed) -> {conv name: one score per filter}"
LR = "lr(recipe, budget, steps_per_epoch, peak) -> [lr of each of budget x steps_per_epoch steps]"
LOADER_IN_MEMORY = "loader(info, root, download) -> (train, test) TensorSplits"
LOADER = "loader(info, root, val_fraction, split_seed, download) -> DataBundle"
CHECK = "check(info, root, download) -> None, or what is missing"


class PluginCheckError(ValueError):
    """A plugin function that does not fit its signature; `str(err)` names the plugin's kind
    and name, the function's import path, the signature and what went wrong."""


def is_plugin(ref: str) -> bool:
    """Whether an entry's import path is a plugin's (the built-ins live under `nptm.`)."""
    return bool(ref) and not ref.startswith("nptm.")


def _error(kind: str, name: str, ref: str, signature: str, what: str) -> PluginCheckError:
    return PluginCheckError(f"plugin {kind} {name!r}: {ref!r} must be {signature}, but {what}")


def _raised(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def bound_function(
    kind: str, name: str, ref: str, signature: str, args: Sequence[Any]
) -> Callable[..., Any]:
    """The function `ref` names, once it is known to accept `args` (positionally, as nptm
    passes them)."""
    try:
        fn = resolve(ref)
    except Exception as err:
        raise _error(kind, name, ref, signature, f"it cannot be imported: {_raised(err)}") from err
    if not callable(fn):
        raise _error(kind, name, ref, signature, f"it is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind(*args)
    except TypeError as err:
        what = f"it cannot be called with the {len(args)} arguments nptm passes: {err}"
        raise _error(kind, name, ref, signature, what) from None
    except ValueError:  # no signature to inspect (a builtin): the call itself will tell
        pass
    return fn


def check_model(name: str, dataset: str) -> Any:
    """Build plugin model `name` for `dataset`, run two zero images through it and list its
    prunable convs; returns the model (None for a built-in model, which is not dry-called)."""
    import torch
    from torch import nn

    info, data = MODELS[name], DATASETS[dataset]
    if not (is_plugin(info.build) or is_plugin(info.prunable_convs)):
        return None
    args = (info, data.in_channels, data.num_classes)
    build = bound_function("model", name, info.build, BUILD, args)
    what = f"dataset {dataset!r} ({data.in_channels} channels, {data.num_classes} classes)"
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build(*args)
    except Exception as err:
        what = f"for {what} it raised {_raised(err)}"
        raise _error("model", name, info.build, BUILD, what) from None
    if not isinstance(model, nn.Module):
        got = f"for {what} it returned a {type(model).__name__}"
        raise _error("model", name, info.build, BUILD, got)
    shape = (2, data.in_channels, data.image_size, data.image_size)
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except Exception as err:
        what = f"the model it builds for {what} fails on images of shape {shape}: {_raised(err)}"
        raise _error("model", name, info.build, BUILD, what) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, data.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        what = f"on images of shape {shape} its model returns {got}, not (2, {data.num_classes})"
        raise _error("model", name, info.build, BUILD, what)
    model.train()
    model.input_shape = shape[1:]
    _check_prunable_convs(name, info.prunable_convs, model)
    return model


def _check_prunable_convs(name: str, ref: str, model: Any) -> None:
    from torch import nn

    fn = bound_function("model", name, ref, PRUNABLE_CONVS, (model,))
    try:
        names = fn(model)
    except Exception as err:
        raise _error("model", name, ref, PRUNABLE_CONVS, f"it raised {_raised(err)}") from None
    if isinstance(names, str) or not isinstance(names, Sequence):
        got = f"it returned a {type(names).__name__}"
        raise _error("model", name, ref, PRUNABLE_CONVS, got)
    modules = dict(model.named_modules())
    bad = [n for n in names if not isinstance(modules.get(n), nn.Conv2d)]
    if bad:
        what = f"{', '.join(map(repr, bad[:3]))} {'is' if len(bad) == 1 else 'are'} no Conv2d"
        raise _error("model", name, ref, PRUNABLE_CONVS, f"{what} of the model")


def check_scores(info: PrunerInfo, scores: Any, model: Any, names: Sequence[str]) -> None:
    """What a plugin pruner's importance function returned for `names` of `model`: one finite
    score per filter of each conv."""
    import torch

    def fail(what: str) -> PluginCheckError:
        return _error("pruner", info.name, info.importance, IMPORTANCE, what)

    if not isinstance(scores, Mapping):
        raise fail(f"it returned a {type(scores).__name__}")
    modules = dict(model.named_modules())
    for n in names:
        if n not in scores:
            raise fail(f"it returned no scores for conv {n!r}")
        try:
            score = torch.as_tensor(scores[n], dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise fail(f"the scores of conv {n!r} are not numbers: {_raised(err)}") from None
        filters = modules[n].out_channels
        if tuple(score.shape) != (filters,):
            raise fail(
                f"conv {n!r} has {filters} filters and got scores of shape {tuple(score.shape)}"
            )
        if not torch.isfinite(score).all():
            raise fail(f"the scores of conv {n!r} are not all finite")


def check_schedule(name: str, recipe: Recipe, peaks: Sequence[float | None] = (None,)) -> None:
    """Evaluate plugin schedule `name` for 2 epochs of 3 steps under `recipe`, with each of
    `peaks` (the grid's lr overrides; None: the schedule's own)."""
    import numpy as np

    info = SCHEDULES[name]
    if not is_plugin(info.lr):
        return
    budget, steps = 2, 3
    for peak in peaks:
        args = (recipe, budget, steps, peak)
        fn = bound_function("schedule", name, info.lr, LR, args)
        try:
            lrs = np.asarray(fn(*args), dtype=np.float64)
        except Exception as err:
            raise _error("schedule", name, info.lr, LR, f"it raised {_raised(err)}") from None
        if lrs.shape != (budget * steps,):
            what = f"for {budget} epochs of {steps} steps it returned shape {lrs.shape}"
            raise _error("schedule", name, info.lr, LR, what)
        if not all(math.isfinite(v) and v >= 0 for v in lrs):
            raise _error("schedule", name, info.lr, LR, "not every lr is finite and >= 0")


def check_dataset(name: str) -> None:
    """Whether plugin dataset `name`'s loader and check accept what nptm passes them (they
    are not called: that needs the data)."""
    info: DatasetInfo = DATASETS[name]
    if is_plugin(info.loader):
        if info.in_memory:
            bound_function("dataset", name, info.loader, LOADER_IN_MEMORY, (info, None, False))
        else:
            bound_function("dataset", name, info.loader, LOADER, (info, None, 0.0, 0, False))
    if is_plugin(info.check):
        bound_function("dataset", name, info.check, CHECK, (info, None, False))
