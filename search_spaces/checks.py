"""Checks that need the catalog, the recipes or several fields at once.

`check_grid` runs after the pydantic schema accepted the file's shape. It raises `GridIssue`
(field path + what is wrong with which value) for the first mistake, and on success returns a
`CheckedGrid`: the grid with what planning needs, the resolved pre-training recipes, the
product `Space` with its compiled exclude rules, and the `include` trials.

Compatibility is checked on the combinations that survive `exclude`, so a grid can cross
models with presets that only some of them have and exclude the rest, e.g.
`exclude: [{model: vgg16, preset: B}]`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nptm.search_spaces.dry_run import dry_run
from nptm.search_spaces.errors import GridIssue, did_you_mean, field_path, pydantic_issues, show
from nptm.search_spaces.expand import (
    BUDGET,
    DATASET,
    MODEL,
    SCHEDULE,
    TARGET,
    TARGET_KEYS,
    Dim,
    Rule,
    Space,
    Target,
    TrialKey,
)
from nptm.search_spaces.schema import (
    MAX_TRIALS_LIMIT,
    RATIO_DECIMALS,
    SEED_LIMIT,
    SIGNIFICANT_DIGITS,
    TRIAL_KEYS,
    DataSection,
    Grid,
    ResourcesSection,
    SeedsSection,
    canonical_ratio,
    canonical_real,
)
from nptm.trainables import catalog
from nptm.trainables.layout import SWEEP_NAME_RE, SWEEP_NAME_RULE
from nptm.trainables.plugins import PluginError, load_plugins
from nptm.trainables.recipe import DEFAULT_RECIPES, MAX_EPOCHS, MAX_LR, MAX_STEPS, Recipe
from nptm.trainables.registry import Registry
from nptm.trainables.schedules import KNOWN_OVERRIDES, check_override, rewind_epoch
from nptm.trainables.start_weights import (
    TORCHVISION,
    StartWeights,
    load_state_dict,
    read_source,
    sha256,
)


@dataclass(frozen=True)
class CheckedGrid:
    """A grid that passed every check, with what planning needs resolved.

    Built only by `check_grid` (through `nptm.search_spaces.load_grid` / `parse_grid`), and the one
    thing `nptm.orchestrator.planner.build_plan` takes.
    """

    grid: Grid  # the file's content, as the schema parsed it
    source: str  # the file it came from, for error messages
    recipes: Mapping[str, Recipe]  # each dataset's pre-training recipe, overrides applied
    space: Space  # the product of the axes, with the compiled exclude rules
    includes: tuple[TrialKey, ...]  # the include trials
    # `pretrain.from`: existing weights every trial starts from instead of pre-training
    start_weights: StartWeights | None = None
    overrides: tuple[str, ...] = ()  # the command line's key.path=value, as given

    @property
    def name(self) -> str:
        return self.grid.name

    @property
    def max_trials(self) -> int:
        return self.grid.max_trials

    @property
    def data(self) -> DataSection:
        return self.grid.data

    @property
    def resources(self) -> ResourcesSection:
        return self.grid.resources

    @property
    def seeds(self) -> SeedsSection:
        return self.grid.seeds

    @property
    def rounds(self) -> int:
        return self.grid.iterative.rounds

    @property
    def plugins(self) -> tuple[str, ...]:
        """The plugin modules every process imports before looking names up."""
        return tuple(self.grid.plugins)

    def recipe(self, dataset: str) -> Recipe:
        """The pre-training recipe of `dataset`: its default with the grid's `pretrain` applied."""
        return self.recipes[dataset]


def check_grid(grid: Grid, raw: dict[str, Any], source: str = "<grid>") -> CheckedGrid:
    """Validate `grid` (parsed from `raw`) beyond its shape; see the module docstring."""
    _check_name(grid.name)
    _check_size(grid, raw)  # arithmetic, before any list or rule is walked
    _load_plugins(grid, raw)
    _check_resources(grid)
    axes = grid.axes
    for axis, known in (
        ("dataset", catalog.DATASETS),
        ("model", catalog.MODELS),
        ("schedule", catalog.SCHEDULES),
    ):
        values = getattr(axes, axis)
        for i, value in enumerate(values):
            if value not in known:
                raise GridIssue(
                    _at(raw, "axes", axis, i),
                    _not_known(axis, value, known),
                )
        _check_unique(raw, ("axes", axis), values)
    _check_unique(raw, ("axes", "budget"), axes.budget)
    _check_unique(raw, ("axes", "seed"), axes.seed)
    start = _start_weights(grid, raw)
    targets, target_paths = _pruner_targets(grid, raw)
    overrides = _override_dims(grid, raw)

    datasets = dict.fromkeys(axes.dataset)
    for entry in grid.include:
        ds = entry.get("dataset") if isinstance(entry, dict) else None
        if isinstance(ds, str) and ds in catalog.DATASETS:
            datasets.setdefault(ds)
    recipes = _recipes({k: v for k, v in grid.pretrain.items() if k != "from"}, datasets)
    _check_batch_split(grid, recipes)
    _check_run_lengths(grid, raw, recipes)

    space = Space(
        [
            Dim("dataset", tuple(axes.dataset), _paths(raw, "dataset", len(axes.dataset))),
            Dim("model", tuple(axes.model), _paths(raw, "model", len(axes.model))),
            Dim("target", tuple(targets), tuple(target_paths)),
            Dim("schedule", tuple(axes.schedule), _paths(raw, "schedule", len(axes.schedule))),
            Dim("budget", tuple(axes.budget), _paths(raw, "budget", len(axes.budget))),
            Dim("seed", tuple(axes.seed), _paths(raw, "seed", len(axes.seed))),
            *overrides,
        ]
    )
    space.rules = [_compile_exclude(space, rule, i) for i, rule in enumerate(grid.exclude)]
    includes = [_include_trial(entry, i) for i, entry in enumerate(grid.include)]

    _check_product(grid, recipes, space)
    for i, key in enumerate(includes):
        _check_trial(grid, recipes, key, f"include[{i}]")
    if space.count() == 0 and not includes:
        raise GridIssue("exclude", "the exclude rules remove every trial of the axes")
    dry_run(space, includes, recipes)  # plugin functions and structured pruning, run once
    return CheckedGrid(grid, source, MappingProxyType(recipes), space, tuple(includes), start)


# --- single fields ----------------------------------------------------------------------------


def _not_known(kind: str, value: Any, known: Registry) -> str:
    """Why a name is refused: the registry's note for a retired name, else the closest one."""
    reason = known.unknown_reason(value)
    if f"{kind} {value!r} " in reason and "unknown" not in reason:  # retired: names successor
        return f"{show(value)}: {reason}"
    return f"{show(value)} is not a known {kind}" + did_you_mean(value, known)


def _load_plugins(grid: Grid, raw: dict[str, Any]) -> None:
    """Installed entry points, then the grid's plugin modules, so their names are known."""
    for i, module in enumerate(grid.plugins):
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module):
            raise GridIssue(_at(raw, "plugins", i), f"{show(module)} is not a module name")
    _check_unique(raw, ("plugins",), grid.plugins)
    try:
        load_plugins(grid.plugins)
    except PluginError as err:
        at = "plugins" if err.index is None else _at(raw, "plugins", err.index)
        raise GridIssue(at, err.detail) from None


def _start_weights(grid: Grid, raw: dict[str, Any]) -> StartWeights | None:
    """`pretrain.from`: one (dataset, model) pair, no `wr`, weights that load into the model."""
    if "from" not in grid.pretrain:
        return None
    source, axes = grid.pretrain["from"], grid.axes
    if not isinstance(source, str) or not source:
        raise GridIssue("pretrain.from", f"{show(source)} is not a path, URI or 'torchvision'")
    if source != TORCHVISION and "://" not in source:  # workers run in other directories
        source = os.path.abspath(os.path.expanduser(source))
    named = {(e.get("dataset"), e.get("model")) for e in grid.include if isinstance(e, dict)}
    pairs = {(d, m) for d in axes.dataset for m in axes.model} | named
    if len(pairs) != 1:
        raise GridIssue(
            "pretrain.from",
            f"existing weights are one model trained on one dataset, but the grid names "
            f"{len(pairs)} (dataset, model) pairs; sweep each pair with its own grid",
        )
    ((dataset, model),) = pairs
    if source == TORCHVISION and catalog.MODELS[model].family != "torchvision":
        raise GridIssue("pretrain.from", f"model {model!r} is not a torchvision model")
    for i, schedule in enumerate(axes.schedule):
        if catalog.SCHEDULES[schedule].rewinds_weights:
            raise GridIssue(
                _at(raw, "axes", "schedule", i),
                f"{show(schedule)} rewinds to the pre-training's weights of epoch T - budget, "
                "which weights loaded with pretrain.from do not come with; use lrw, ft or clr",
            )
    for i, entry in enumerate(grid.include):
        schedule = entry.get("schedule") if isinstance(entry, dict) else None
        if schedule in catalog.SCHEDULES and catalog.SCHEDULES[schedule].rewinds_weights:
            raise GridIssue(
                f"include[{i}].schedule", f"{show(schedule)} cannot rewind loaded weights"
            )
    try:
        data = read_source(source, model)
        state = load_state_dict(data)
        from nptm.trainables.models import build_model

        build_model(model, dataset).load_state_dict(state, strict=True)
    except Exception as err:  # StartWeightsError, or whatever loading them raised
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GridIssue("pretrain.from", f"{show(source)}: {detail}") from None
    return StartWeights(source, sha256(data))


def _check_name(name: str) -> None:
    if not SWEEP_NAME_RE.fullmatch(name):
        raise GridIssue(
            "name",
            f"{show(name)} is not a valid sweep name: use {SWEEP_NAME_RULE} "
            "(it names the sweep's directory)",
        )


def _check_size(grid: Grid, raw: dict[str, Any]) -> None:
    """The axes' product, counted before any exclude rule from the lists' lengths alone: at
    most MAX_TRIALS_LIMIT, the most one grid may plan (--confirm-large or not). It bounds what
    checking and planning the grid cost, whatever its exclude rules."""
    axes = grid.axes
    targets = sum(len(e.ratio or e.preset or ()) for e in axes.pruner)
    lengths = {
        "dataset": len(axes.dataset),
        "model": len(axes.model),
        "pruner target": targets,
        "schedule": len(axes.schedule),
        "budget": len(axes.budget),
        "seed": len(axes.seed),
        **{f"overrides.{k}": len(v) for k, v in sorted(axes.overrides.items())},
    }
    size = math.prod(lengths.values()) + len(grid.include)
    if size > MAX_TRIALS_LIMIT:
        factors = " x ".join(f"{n:,} {name}" for name, n in lengths.items())
        extra = f" + {len(grid.include):,} include" if grid.include else ""
        raise GridIssue(
            "axes",
            f"the axes multiply to {size:,} trials before any exclude rule ({factors}{extra}), "
            f"more than max_trials = {grid.max_trials:,} and more than the "
            f"{MAX_TRIALS_LIMIT:,} trials one grid may plan even with --confirm-large; "
            "split it into smaller grids",
        )


def run_length_problem(
    recipe: Recipe, dataset: str, epochs: int, val_fraction: float
) -> str | None:
    """Why a run of `epochs` epochs of `dataset` under `recipe` is more than a run survives
    (more than MAX_EPOCHS epochs, or MAX_STEPS optimizer steps: every per-step lr curve is an
    array of them); None if it is not."""
    if epochs > MAX_EPOCHS:
        return f"{epochs:,} epochs, more than the {MAX_EPOCHS:,} one run may train"
    n = catalog.DATASETS[dataset].train_size
    kept = n - round(val_fraction * n)
    steps = epochs * math.ceil(kept / recipe.batch_size) if kept > 0 else epochs
    if steps > MAX_STEPS:
        return (
            f"{epochs:,} epochs of {math.ceil(kept / recipe.batch_size):,} steps "
            f"({kept:,} training samples of dataset {dataset!r} in batches of "
            f"{recipe.batch_size}) is {steps:,} optimizer steps, more than the {MAX_STEPS:,} "
            "one run may take; lower it, or raise pretrain.batch_size"
        )
    return None


def _check_run_lengths(grid: Grid, raw: dict[str, Any], recipes: dict[str, Recipe]) -> None:
    """Each dataset's hold-out leaves samples on both sides, and its pre-training and its
    longest retraining are runs a worker survives (`run_length_problem`)."""
    fraction = grid.data.val_fraction
    budgets = {i: b for i, b in enumerate(grid.axes.budget)}
    for ds, recipe in recipes.items():
        n = catalog.DATASETS[ds].train_size
        held = round(fraction * n)
        if fraction > 0 and not 0 < held < n:
            raise GridIssue(
                "data.val_fraction",
                f"{fraction!r} of the {n:,} training samples of dataset {ds!r} holds out "
                f"{held:,}; both the held-out and the training part need at least one sample",
            )
        problem = run_length_problem(recipe, ds, recipe.epochs, fraction)
        if problem is not None:
            own = isinstance(grid.pretrain.get(ds), dict) and "epochs" in grid.pretrain[ds]
            path = f"pretrain.{ds}.epochs" if own else "pretrain.epochs"
            raise GridIssue(path, f"the pre-training of dataset {ds!r}: {problem}")
        for i, budget in budgets.items():
            problem = run_length_problem(recipe, ds, budget, fraction)
            if problem is not None:
                raise GridIssue(_at(raw, "axes", "budget", i), f"{budget}: {problem}")


def _check_resources(grid: Grid) -> None:
    res = grid.resources
    if res.executor == "inline" and res.workers_per_trial > 1:
        raise GridIssue(
            "resources.workers_per_trial",
            f"{res.workers_per_trial} workers need executor 'train' (DDP); "
            "executor 'inline' runs a trial in one process, so use 1",
        )
    gpus = res.gpus_per_worker
    if gpus > 1 and gpus != int(gpus):
        raise GridIssue(
            "resources.gpus_per_worker",
            f"{gpus} is neither a fraction of one GPU nor a whole number of GPUs",
        )
    if res.executor == "train" and res.workers_per_trial > 1 and 0 < gpus < 1:
        # Ray may place several ranks of one trial on the same GPU; NCCL refuses two ranks
        # on one device when the process group starts.
        raise GridIssue(
            "resources.gpus_per_worker",
            f"{gpus} (a fraction of a GPU) with workers_per_trial {res.workers_per_trial}: "
            "the DDP ranks of one trial could share a GPU, which NCCL refuses; use a whole "
            "GPU per worker, or workers_per_trial 1 to pack trials",
        )


def _check_batch_split(grid: Grid, recipes: dict[str, Recipe]) -> None:
    """A recipe's batch is the global batch of one step: the DDP workers must split it evenly."""
    workers = grid.resources.workers_per_trial
    for ds, recipe in recipes.items():
        if recipe.batch_size % workers:
            own = isinstance(grid.pretrain.get(ds), dict) and "batch_size" in grid.pretrain[ds]
            given = own or "batch_size" in grid.pretrain
            field = (
                (f"pretrain.{ds}.batch_size" if own else "pretrain.batch_size")
                if given
                else "resources.workers_per_trial"
            )
            raise GridIssue(
                field,
                f"{recipe.batch_size if given else workers}: the batch_size {recipe.batch_size} "
                f"of dataset {ds!r} is the global batch of one optimizer step and must split "
                f"evenly over workers_per_trial = {workers} DDP workers; choose a batch_size "
                "divisible by the number of workers",
            )


def _check_unique(raw: dict[str, Any], where: tuple[str, ...], values: list[Any]) -> None:
    first: dict[Any, int] = {}
    for i, value in enumerate(values):
        if value in first:
            raise GridIssue(
                _at(raw, *where, i),
                f"{show(value)} is listed twice (also at {_at(raw, *where, first[value])})",
            )
        first[value] = i


def _pruner_targets(grid: Grid, raw: dict[str, Any]) -> tuple[list[Target], list[str]]:
    """Expand the pruner entries into one Target per ratio/preset, with its field path."""
    targets: list[Target] = []
    paths: list[str] = []
    seen: dict[Target, str] = {}
    for i, entry in enumerate(grid.axes.pruner):
        base = _at(raw, "axes", "pruner", i)
        if entry.name not in catalog.PRUNERS:
            raise GridIssue(
                f"{base}.name",
                _not_known("pruner", entry.name, catalog.PRUNERS),
            )
        if (entry.ratio is None) == (entry.preset is None):
            both = "both" if entry.ratio is not None else "neither"
            raise GridIssue(
                base, f"pruner {entry.name!r} has {both} of 'ratio' and 'preset'; give exactly one"
            )
        structured = catalog.PRUNERS[entry.name].structured
        given: dict[str, Any] = {
            k: getattr(entry, k) for k in ("layers", "min_keep") if getattr(entry, k) is not None
        }
        try:
            opts = catalog.pruner_options(entry.name, given)
        except catalog.IncompatibleError as err:
            key = next((k for k in sorted(given) if k in str(err)), "name")
            raise GridIssue(f"{base}.{key}", str(err)) from None
        if entry.ratio is not None:
            for j, r in enumerate(entry.ratio):
                if not 0.0 <= r < 1.0:
                    raise GridIssue(
                        _at(raw, "axes", "pruner", i, "ratio", j), f"{show(r)} is outside [0, 1)"
                    )
            items = [
                (Target(entry.name, canonical_ratio(r), None, opts), "ratio", j)
                for j, r in enumerate(entry.ratio)
            ]
        else:
            items = [
                (Target(entry.name, None, p, opts), "preset", j)
                for j, p in enumerate(entry.preset or [])
            ]
        for target, key, j in items:
            path = _at(raw, "axes", "pruner", i, key, j)
            written = entry.ratio[j] if key == "ratio" and entry.ratio else None
            if key == "ratio" and not target.ratio < 1.0:  # type: ignore[operator]
                raise GridIssue(
                    path,
                    f"{show(written)} rounds to {target.ratio} at {RATIO_DECIMALS} decimals, "
                    "outside [0, 1)",
                )
            if key == "preset" and not structured:
                raise GridIssue(
                    path,
                    f"{show(target.preset)} is a filter-pruning preset but "
                    f"pruner {entry.name!r} is unstructured; give a 'ratio'",
                )
            if target in seen:
                value = show(written if key == "ratio" else target.preset)
                if key == "ratio" and written != target.ratio:
                    value += f" (rounded to {RATIO_DECIMALS} decimals: {target.ratio})"
                raise GridIssue(
                    path,
                    f"{value} for pruner {entry.name!r} is listed twice (also at "
                    f"{seen[target]}); ratios are compared at {RATIO_DECIMALS} decimals",
                )
            seen[target] = path
            targets.append(target)
            paths.append(path)
    return targets, paths


def _override_dims(grid: Grid, raw: dict[str, Any]) -> list[Dim]:
    dims = []
    where = ("axes", "overrides")
    for name in sorted(grid.axes.overrides):
        if name not in KNOWN_OVERRIDES:
            raise GridIssue(
                f"axes.overrides.{name}", "unknown override" + did_you_mean(name, KNOWN_OVERRIDES)
            )
        values = [
            _override_value(name, v, _at(raw, *where, name, j))
            for j, v in enumerate(grid.axes.overrides[name])
        ]
        first: dict[Any, int] = {}
        for j, v in enumerate(values):
            if v in first:
                written = grid.axes.overrides[name][j]
                raise GridIssue(
                    _at(raw, *where, name, j),
                    f"{show(written)} is listed twice (also at "
                    f"{_at(raw, *where, name, first[v])}); values are compared at "
                    f"{SIGNIFICANT_DIGITS} significant digits, {show(v)}",
                )
            first[v] = j
        paths = tuple(_at(raw, *where, name, j) for j in range(len(values)))
        dims.append(Dim(name, tuple(values), paths))
    return dims


def _override_value(name: str, value: Any, path: str) -> Any:
    """Validate one override value with the schedules' own rule; ints become floats, rounded
    to SIGNIFICANT_DIGITS significant digits (values that print alike are one value)."""
    try:
        checked = check_override(name, value)
    except ValueError as err:
        raise GridIssue(path, f"{show(value)} is not a valid {name}: {err}") from None
    rounded = canonical_real(checked)
    if name == "lr" and not 0 < rounded <= MAX_LR:
        raise GridIssue(
            path,
            f"{show(value)} is not a valid lr: it must lie in (0, {MAX_LR:g}] at "
            f"{SIGNIFICANT_DIGITS} significant digits",
        )
    return rounded


def _recipes(pretrain: dict[str, Any], datasets: dict[str, None]) -> dict[str, Recipe]:
    """Each dataset's default recipe with the grid's common, then per-dataset, overrides."""
    fields = set(Recipe.model_fields)
    common: dict[str, Any] = {}
    specific: dict[str, dict[str, Any]] = {}
    for key, value in pretrain.items():
        if key in fields:
            common[key] = value
        elif key in catalog.DATASETS:
            if not isinstance(value, dict):
                raise GridIssue(
                    f"pretrain.{key}",
                    f"{show(value)} should be a mapping of recipe fields for dataset " + repr(key),
                )
            for sub in value:
                if sub not in fields:
                    raise GridIssue(
                        f"pretrain.{key}.{sub}", "unknown key" + did_you_mean(sub, fields)
                    )
            specific[key] = value
        else:
            raise GridIssue(
                f"pretrain.{key}", "unknown key" + did_you_mean(key, fields | set(catalog.DATASETS))
            )
    recipes: dict[str, Recipe] = {}
    for ds in [*datasets, *(d for d in specific if d not in datasets)]:
        given = {**common, **specific.get(ds, {})}
        merged = {**DEFAULT_RECIPES[ds].model_dump(), **given}
        if isinstance(merged["milestones"], list):  # strict mode wants the tuple type
            merged["milestones"] = tuple(merged["milestones"])
        try:
            # strict: the YAML gives native types, so `epochs: "30"` is a mistake, not a cast
            recipes[ds] = Recipe.model_validate(merged, strict=True)
        except ValidationError as exc:
            _raise_recipe_error(exc, ds, given, specific.get(ds, {}))
    return recipes


def _raise_recipe_error(
    exc: ValidationError, ds: str, given: dict[str, Any], own: dict[str, Any]
) -> None:
    err = exc.errors()[0]
    if err["loc"]:
        field = str(err["loc"][0])
        prefix = ("pretrain", ds) if field in own else ("pretrain",)
        path, detail = pydantic_issues(exc, Recipe, None, prefix)[0]
        raise GridIssue(path, f"{detail} (recipe of dataset {ds!r})")
    # The recipe's cross-field check: milestones must lie inside the run.
    recipe = {**DEFAULT_RECIPES[ds].model_dump(), **given}
    path = "pretrain.milestones" if "milestones" in given else "pretrain.epochs"
    value = given.get("milestones", given.get("epochs"))
    raise GridIssue(
        path,
        f"{show(value)}: dataset {ds!r} would train {recipe['epochs']} epochs "
        f"with lr milestones {list(recipe['milestones'])}, which must be increasing "
        f"and inside (0, {recipe['epochs']}); set pretrain.milestones to match",
    )


# --- exclude / include ------------------------------------------------------------------------


def _rule_keys(space: Space) -> list[str]:
    return [*TRIAL_KEYS, *space.override_names]


def _rule_value(space: Space, key: str, value: Any) -> Any:
    """A rule's value as the axes hold it: a ratio or an override rounded like theirs."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value):
        return value
    if key == "ratio":
        return canonical_ratio(value)
    if key in space.override_names:
        return canonical_real(value)
    return value


def _compile_exclude(space: Space, rule: dict[str, Any], i: int) -> Rule:
    where = f"exclude[{i}]"
    if not rule:
        raise GridIssue(where, "{} is an empty rule; it would exclude every trial")
    allowed = _rule_keys(space)
    for key in rule:
        if key not in allowed:
            raise GridIssue(f"{where}.{key}", "unknown key" + did_you_mean(key, allowed))
    rule = {key: _rule_value(space, key, value) for key, value in rule.items()}
    for key, value in rule.items():
        if not space.matching(key, value):
            d = space.dim_index(key)
            assert d is not None  # every allowed key has a dimension
            dim = space.dims[d]
            have = (
                sorted({t[TARGET_KEYS[key]] for t in dim.values} - {None}, key=str)
                if dim.name == "target"
                else list(dim.values)
            )
            hint = (
                "; a rule takes one value per key, write one rule per value"
                if isinstance(value, list)
                else ""
            )
            raise GridIssue(
                f"{where}.{key}",
                f"{show(value)} matches no trial (the axes have {key} {have}){hint}",
            )
    compiled = space.compile_rule(rule)
    for _dim, ok in compiled.matches:
        if not ok:
            keys = {k: v for k, v in rule.items() if k in TARGET_KEYS}
            raise GridIssue(where, f"no pruner entry of axes.pruner has {keys}")
    return compiled


class _IncludeEntry(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    dataset: str
    model: str
    pruner: str
    ratio: float | None = None
    preset: str | None = None
    schedule: str
    budget: int = Field(gt=0, le=MAX_EPOCHS)
    seed: int = Field(ge=0, lt=SEED_LIMIT)


def _include_trial(entry: dict[str, Any], i: int) -> TrialKey:
    where = f"include[{i}]"
    allowed = [*TRIAL_KEYS, *sorted(KNOWN_OVERRIDES)]
    for key in entry:
        if key not in allowed:  # before "missing": a misspelt key is the likelier mistake
            raise GridIssue(f"{where}.{key}", "unknown key" + did_you_mean(key, allowed))
    try:
        inc = _IncludeEntry.model_validate(entry)
    except ValidationError as exc:
        path, detail = pydantic_issues(exc, _IncludeEntry, None, ("include", i))[0]
        raise GridIssue(path, detail) from None
    overrides = []
    for key, value in sorted((inc.model_extra or {}).items()):
        overrides.append((key, _override_value(key, value, f"{where}.{key}")))
    for key, known in (
        ("dataset", catalog.DATASETS),
        ("model", catalog.MODELS),
        ("pruner", catalog.PRUNERS),
        ("schedule", catalog.SCHEDULES),
    ):
        value = getattr(inc, key)
        if value not in known:
            raise GridIssue(f"{where}.{key}", _not_known(key, value, known))
    if (inc.ratio is None) == (inc.preset is None):
        raise GridIssue(
            where, f"give exactly one of 'ratio' and 'preset' for pruner {inc.pruner!r}"
        )
    ratio = None if inc.ratio is None else canonical_ratio(inc.ratio)
    if inc.ratio is not None and (inc.ratio < 0 or ratio >= 1):  # type: ignore[operator]
        raise GridIssue(
            f"{where}.ratio", f"{show(inc.ratio)} is outside [0, 1) at {RATIO_DECIMALS} decimals"
        )
    return TrialKey(
        inc.dataset,
        inc.model,
        inc.pruner,
        ratio,
        inc.preset,
        inc.schedule,
        inc.budget,
        inc.seed,
        tuple(overrides),
        catalog.pruner_options(inc.pruner, {}),
    )


# --- combinations -----------------------------------------------------------------------------


def _check_product(grid: Grid, recipes: dict[str, Recipe], space: Space) -> None:
    """Compatibility of every combination that survives exclusion, naming the axis entry."""
    dims = space.dims
    for di, mi in sorted(space.survivor_indices([DATASET, MODEL])):
        ds, model = dims[DATASET].values[di], dims[MODEL].values[mi]
        try:
            catalog.check_model_dataset(model, ds)
        except catalog.IncompatibleError as err:
            raise GridIssue(
                dims[MODEL].paths[mi],
                f"{show(model)} cannot train on dataset "
                f"{ds!r}: {err}; remove it or exclude {{dataset: {ds}, model: {model}}}",
            ) from None
    for mi, ti in sorted(space.survivor_indices([MODEL, TARGET])):
        model, t = dims[MODEL].values[mi], dims[TARGET].values[ti]
        try:
            catalog.check_pruner_target(t.pruner, model, t.ratio, t.preset)
        except catalog.IncompatibleError as err:
            raise GridIssue(
                dims[TARGET].paths[ti],
                f"{show(t.preset)} cannot be used with "
                f"model {model!r}: {err}; remove it or exclude "
                f"{{model: {model}, preset: {t.preset}}}",
            ) from None
    for di, si, bi in sorted(space.survivor_indices([DATASET, SCHEDULE, BUDGET])):
        ds, sched, budget = (
            dims[DATASET].values[di],
            dims[SCHEDULE].values[si],
            dims[BUDGET].values[bi],
        )
        _check_rewind(recipes[ds], ds, sched, budget, dims[BUDGET].paths[bi])
    if grid.rounds > 1:
        for (ti,) in sorted(space.survivor_indices([TARGET])):
            t = dims[TARGET].values[ti]
            if catalog.PRUNERS[t.pruner].structured:
                raise GridIssue(
                    "iterative.rounds",
                    _iterative_msg(grid.rounds, t.pruner, dims[TARGET].paths[ti]),
                )


def _check_trial(grid: Grid, recipes: dict[str, Recipe], key: TrialKey, where: str) -> None:
    try:
        catalog.check_model_dataset(key.model, key.dataset)
    except catalog.IncompatibleError as err:
        raise GridIssue(
            f"{where}.model", f"{show(key.model)} cannot train on dataset {key.dataset!r}: {err}"
        ) from None
    try:
        catalog.check_pruner_target(key.pruner, key.model, key.ratio, key.preset)
    except catalog.IncompatibleError as err:
        field = "preset" if key.preset is not None else "pruner"
        raise GridIssue(f"{where}.{field}", f"{show(getattr(key, field))}: {err}") from None
    _check_rewind(recipes[key.dataset], key.dataset, key.schedule, key.budget, f"{where}.budget")
    if grid.rounds > 1 and catalog.PRUNERS[key.pruner].structured:
        raise GridIssue("iterative.rounds", _iterative_msg(grid.rounds, key.pruner, where))


def _check_rewind(recipe: Recipe, ds: str, schedule: str, budget: int, path: str) -> None:
    if not catalog.SCHEDULES[schedule].rewinds:
        return
    try:
        rewind_epoch(recipe, budget)
    except ValueError:
        raise GridIssue(
            path,
            f"{budget} is more than the {recipe.epochs} pre-training epochs "
            f"of dataset {ds!r}, which schedule {schedule!r} replays; lower it, "
            "raise pretrain.epochs, or exclude "
            f"{{schedule: {schedule}, budget: {budget}}}",
        ) from None


def _iterative_msg(rounds: int, pruner: str, where: str) -> str:
    return (
        f"{rounds} rounds need unstructured pruners, but {where} uses structured pruner "
        f"{pruner!r} (a pruned filter cannot be pruned again toward a cumulative ratio); "
        "use rounds: 1 or exclude it"
    )


# --- paths ------------------------------------------------------------------------------------


def _at(raw: dict[str, Any], *loc: str | int) -> str:
    """Field path of `loc`, dropping the index of an axis written as a single value."""
    return field_path(loc, raw)


def _paths(raw: dict[str, Any], axis: str, n: int) -> tuple[str, ...]:
    return tuple(_at(raw, "axes", axis, i) for i in range(n))
