"""Grid checks that run the code a grid names, once every name and combination has passed the
cheaper checks (nptm.search_spaces.checks):

- each plugin function the grid uses is dry-called on tiny inputs (its model built for each
  dataset it is paired with, its schedule evaluated, its loader's signature bound:
  nptm.trainables.plugin_checks);
- each (dataset, model, structured pruner target) the grid keeps, where a plugin defines the
  dataset, model or pruner, is pruned once on the real model, the way the prune stage prunes
  it (nptm.trainables.pruners.feasibility).

Each mistake is a GridIssue at the axis entry (or include trial) that brings it in. A grid of
nptm's own datasets, models and pruners runs nothing here (and imports no torch): the test
suite prunes every built-in model with the built-in pruners.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nptm.search_spaces.errors import GridIssue
from nptm.search_spaces.expand import DATASET, MODEL, SCHEDULE, TARGET, Space, TrialKey
from nptm.trainables import catalog
from nptm.trainables.plugin_checks import is_plugin
from nptm.trainables.recipe import Recipe


def dry_run(space: Space, includes: Sequence[TrialKey], recipes: Mapping[str, Recipe]) -> None:
    """Raise GridIssue for the first plugin function that does not fit its signature, or
    structured pruning that cannot prune a model of the grid."""
    dims = space.dims
    lr_dim = next((d for d in dims if d.name == "lr"), None)
    peaks = [None, *(lr_dim.values if lr_dim else ())]
    datasets = [(ds, dims[DATASET].paths[i]) for i, ds in enumerate(dims[DATASET].values)]
    pairs = [
        (dims[DATASET].values[di], dims[MODEL].values[mi], dims[MODEL].paths[mi])
        for di, mi in sorted(space.survivor_indices([DATASET, MODEL]))
    ]
    schedules = [
        (dims[DATASET].values[di], dims[SCHEDULE].values[si], dims[SCHEDULE].paths[si])
        for di, si in sorted(space.survivor_indices([DATASET, SCHEDULE]))
    ]
    targets = [
        (dims[DATASET].values[di], dims[MODEL].values[mi], dims[TARGET].values[ti],
         dims[TARGET].paths[ti])
        for di, mi, ti in sorted(space.survivor_indices([DATASET, MODEL, TARGET]))
    ]  # fmt: skip
    for i, key in enumerate(includes):
        where = f"include[{i}]"
        datasets.append((key.dataset, f"{where}.dataset"))
        pairs.append((key.dataset, key.model, f"{where}.model"))
        schedules.append((key.dataset, key.schedule, f"{where}.schedule"))
        target = (key.pruner, key.ratio, key.preset)
        targets.append((key.dataset, key.model, target, f"{where}.pruner"))
    _plugins(datasets, pairs, schedules, recipes, peaks)
    _structured(targets)


def _plugins(
    datasets: list[tuple[str, str]],
    pairs: list[tuple[str, str, str]],
    schedules: list[tuple[str, str, str]],
    recipes: Mapping[str, Recipe],
    peaks: list[Any],
) -> None:
    from nptm.trainables import plugin_checks as pc

    for ds, path in _once(datasets):
        info = catalog.DATASETS[ds]
        if is_plugin(info.loader) or is_plugin(info.check):
            _at(path, pc.check_dataset, ds)
    for ds, model, path in _once(pairs):
        info = catalog.MODELS[model]
        if is_plugin(info.build) or is_plugin(info.prunable_convs):
            _at(path, pc.check_model, model, ds)
    for ds, schedule, path in _once(schedules):
        if is_plugin(catalog.SCHEDULES[schedule].lr):
            _at(path, pc.check_schedule, schedule, recipes[ds], peaks)


def _structured(targets: list[tuple[str, str, Any, str]]) -> None:
    structured = [
        t for t in _once(targets)
        if catalog.PRUNERS[t[2][0]].structured and _plugin_involved(t[0], t[1], t[2][0])
    ]  # fmt: skip
    if not structured:
        return
    from nptm.trainables.pruners.feasibility import structured_problem

    built: dict[tuple[str, str], Any] = {}
    for ds, model, (pruner, ratio, preset, *_), path in structured:
        problem = _at(_entry(path), structured_problem, model, ds, pruner, ratio, preset, built)
        if problem is not None:
            raise GridIssue(
                path,
                f"{problem}; remove it or exclude {{model: {model}, pruner: {pruner}}}",
            )


def _plugin_involved(dataset: str, model: str, pruner: str) -> bool:
    """Whether a plugin defines the dataset, the model or the pruner. nptm's own models and
    pruners are pruned together by its test suite (tests/test_dry_run.py), for every preset
    and at a ratio: checking them again would make every `nptm validate` import torch."""
    m = catalog.MODELS[model]
    return any(
        is_plugin(ref)
        for ref in (
            catalog.DATASETS[dataset].loader, m.build, m.prunable_convs,
            catalog.PRUNERS[pruner].importance,
        )
    )  # fmt: skip


def _at(path: str, check: Any, *args: Any) -> Any:
    """`check(*args)`, with a plugin that does not fit reported at `path`."""
    from nptm.trainables.plugin_checks import PluginCheckError
    from nptm.trainables.plugins import ended_process

    try:
        return check(*args)
    except PluginCheckError as err:
        raise GridIssue(path, str(err)) from None
    except (SystemExit, KeyboardInterrupt) as err:  # never an exit status 0 for nothing done
        raise GridIssue(path, f"a plugin function it runs {ended_process(err)}") from None


def _entry(target_path: str) -> str:
    """The `name` of the pruner entry a ratio or preset path belongs to."""
    if not target_path.startswith("axes."):
        return target_path  # an include trial's pruner
    return target_path.rsplit(".", 1)[0] + ".name"


def _once(items: list[Any]) -> list[Any]:
    """Each item once, by everything but its path (the first path stays)."""
    seen: dict[Any, Any] = {}
    for item in items:
        seen.setdefault(item[:-1], item)
    return list(seen.values())
