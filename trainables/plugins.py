"""Plugins: models, datasets, pruners and schedules defined outside nptm, registered in the same
registries as the built-ins (nptm.trainables.catalog), so grids, the planner, the stage runner and
`nptm inspect` treat them alike.

Two ways in (docs/plugins.md walks through both):

- a grid's ``plugins: [module, ...]``: importing each module registers its entries, by calling
  the `register_*` functions below at import time;
- Python entry points of an installed distribution, in the groups of `ENTRY_POINT_GROUPS`
  (``nptm.models``, ``nptm.datasets``, ``nptm.pruners``, ``nptm.schedules``): each entry point
  names a function that takes no arguments and registers one entry under the entry point's
  name, e.g. ``tiny_cnn = "my_lab.models:register_tiny_cnn"`` in ``nptm.models``.

Every process that looks names up calls `load_plugins` first: the grid check on the driver,
each stage on its Ray worker (the plugin modules travel in the trial's runtime settings), and
`nptm inspect`. Registering the same entry twice (a module imported by both ways) is a no-op;
a different entry under a taken name is refused.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

from nptm.trainables.catalog import (
    DATASETS,
    MODELS,
    PRUNERS,
    SCHEDULES,
    DatasetInfo,
    ModelInfo,
    PrunerInfo,
    ScheduleInfo,
)
from nptm.trainables.recipe import DEFAULT_RECIPES, Recipe
from nptm.trainables.registry import Registry

__all__ = [
    "ENTRY_POINT_GROUPS",
    "PluginError",
    "import_plugin_modules",
    "load_entry_points",
    "load_plugins",
    "register_dataset",
    "register_model",
    "register_pruner",
    "register_schedule",
]

ENTRY_POINT_GROUPS: dict[str, Registry[Any]] = {
    "nptm.models": MODELS,
    "nptm.datasets": DATASETS,
    "nptm.pruners": PRUNERS,
    "nptm.schedules": SCHEDULES,
}


class PluginError(ValueError):
    """A plugin that cannot be loaded or registers something invalid. `index` is the position
    of the failing module in a grid's `plugins` list (None for an entry point)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message if index is None else f"plugins[{index}]: {message}")
        self.index, self.detail = index, message


def _register(registry: Registry[Any], name: str, entry: Any) -> None:
    if registry.get(name) == entry:  # the same module loaded a second way
        return
    try:
        registry.register(name, entry)
    except ValueError as err:
        raise PluginError(str(err)) from None


def register_model(info: ModelInfo) -> ModelInfo:
    """Register a model. `info.build` names a function (info, in_channels, num_classes) ->
    nn.Module; `info.prunable_convs` one (model) -> names of the convs whose filters
    structured pruners may remove."""
    if not info.build or not info.prunable_convs:
        raise PluginError(f"model {info.name!r}: build and prunable_convs must name functions")
    _register(MODELS, info.name, info)
    return info


def register_dataset(info: DatasetInfo, recipe: Recipe) -> DatasetInfo:
    """Register a dataset with its default pre-training recipe (a grid's `pretrain` section
    overrides it as for the built-ins). `info.loader` names the loading function (see
    catalog.DatasetInfo)."""
    if not info.loader:
        raise PluginError(f"dataset {info.name!r}: loader must name a function")
    if info.name in DEFAULT_RECIPES and DEFAULT_RECIPES[info.name] != recipe:
        raise PluginError(f"dataset {info.name!r} already has a different default recipe")
    _register(DATASETS, info.name, info)
    DEFAULT_RECIPES[info.name] = recipe
    return info


def register_pruner(info: PrunerInfo) -> PrunerInfo:
    """Register a structured pruner: `info.importance` names a function (model, conv names,
    batches, seed) -> {conv name: one score per filter}, higher = keep. Unstructured pruning
    is the three built-in criteria."""
    if not info.structured or not info.importance:
        raise PluginError(
            f"pruner {info.name!r}: a plugin pruner is structured and names its importance function"
        )
    _register(PRUNERS, info.name, info)
    return info


def register_schedule(info: ScheduleInfo) -> ScheduleInfo:
    """Register a retraining schedule: `info.lr` names a function (recipe, budget,
    steps_per_epoch, peak or None) -> the lr of each optimizer step. Rewinding, from-scratch
    and full-length schedules need the built-ins' special handling and are refused."""
    if info.rewinds or info.rewinds_weights or info.from_scratch or info.full_length:
        raise PluginError(
            f"schedule {info.name!r}: rewinds, rewinds_weights, from_scratch and full_length "
            "are reserved for the built-in schedules"
        )
    _register(SCHEDULES, info.name, info)
    return info


_loaded_entry_points: set[tuple[str, str, str]] = set()
# sys.path of the last complete scan: installed distributions are found through it, so an
# unchanged path means nothing new to load (every stage of a worker calls load_plugins).
_scanned_path: tuple[str, ...] | None = None


def load_entry_points() -> list[str]:
    """Call every installed nptm entry point not called yet in this process; return
    "group:name" of each one called. Raises PluginError naming a failing entry point."""
    global _scanned_path
    if _scanned_path == tuple(sys.path):
        return []
    installed = entry_points()  # one scan of the installed distributions for every group
    called = []
    for group, registry in ENTRY_POINT_GROUPS.items():
        for ep in installed.select(group=group):
            key = (group, ep.name, ep.value)
            if key in _loaded_entry_points:
                continue
            where = f"entry point {ep.name!r} = {ep.value!r} of group {group!r}"
            try:
                ep.load()()
            except PluginError as err:
                raise PluginError(f"{where}: {err}") from None
            except Exception as err:
                raise PluginError(f"{where} failed: {type(err).__name__}: {err}") from err
            except (SystemExit, KeyboardInterrupt) as err:
                raise PluginError(f"{where} {ended_process(err)}") from None
            if ep.name not in registry:
                raise PluginError(f"{where} registered no {registry.kind} named {ep.name!r}")
            _loaded_entry_points.add(key)
            called.append(f"{group}:{ep.name}")
    _scanned_path = tuple(sys.path)
    return called


def import_plugin_modules(modules: Iterable[str]) -> None:
    """Import each module (which registers its entries). Raises PluginError naming the
    position and module of the first that fails."""
    for i, module in enumerate(modules):
        try:
            importlib.import_module(module)
        except Exception as err:
            raise PluginError(
                f"module {module!r} cannot be imported: {type(err).__name__}: {err}",
                index=i,
            ) from err
        except (SystemExit, KeyboardInterrupt) as err:
            raise PluginError(
                f"module {module!r} {ended_process(err)} when imported", index=i
            ) from None


def ended_process(err: SystemExit | KeyboardInterrupt) -> str:
    """What a plugin that tried to end the process did, for a usage error (nptm never lets a
    plugin end a command, least of all with exit status 0)."""
    what = f"SystemExit({err.code!r})" if isinstance(err, SystemExit) else "KeyboardInterrupt"
    return f"raised {what}: a plugin must not end the process"


def load_plugins(modules: Iterable[str] = ()) -> None:
    """Entry points first, then the named modules: what a process runs before looking up
    names."""
    load_entry_points()
    import_plugin_modules(modules)
