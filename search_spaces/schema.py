"""The structure of a grid file as pydantic models: keys, types and simple bounds.

Only the shape of the file is checked here. Everything that needs the catalog, the recipes or
more than one field at a time (names, presets, compatibility, rewinding budgets, ...) is
checked by `nptm.search_spaces.checks`, which can name the exact list element at fault.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from nptm.trainables.recipe import MAX_EPOCHS

DEFAULT_MAX_TRIALS = 5000

# --- bounds: every number a grid gives is one a run survives ---------------------------------
# (the recipe's own bounds, epochs and batch size among them, are in nptm.trainables.recipe)
# The most trials a grid may plan, --confirm-large or not; its axes multiply to at most this
# many before any exclude rule (so checking a grid costs at most this much).
MAX_TRIALS_LIMIT = 1_000_000
# Seeds: 0 <= seed < 2**32. A stage seeds torch with `seed * 2**20 + epoch` (the data order,
# nptm.trainables.loaders) and with `seed` itself; torch.manual_seed takes values below 2**64.
SEED_LIMIT = 2**32
MAX_ROUNDS = 100  # iterative.rounds: a prune and a retrain stage per round per trial
MAX_WORKERS = 1024  # resources.workers_per_trial
MAX_CPUS_PER_WORKER = 1024.0
MAX_GPUS_PER_WORKER = 64.0
MAX_CONCURRENT = 100_000
RESOURCE_STEP = 1e-4  # Ray's resource granularity: quantities are whole multiples of it
# A pruning ratio (and min_keep, data.val_fraction) is rounded to this many decimals, so two
# values that print alike are one stage chain, never two pooled as seeds in a report.
RATIO_DECIMALS = 6
# A learning-rate override is rounded to this many significant digits (same reason).
SIGNIFICANT_DIGITS = 6


def canonical_ratio(value: float) -> float:
    """`value` rounded to RATIO_DECIMALS decimals, -0.0 as 0.0."""
    return round(float(value), RATIO_DECIMALS) + 0.0


def canonical_real(value: float) -> float:
    """`value` rounded to SIGNIFICANT_DIGITS significant digits, -0.0 as 0.0."""
    return float(f"{float(value):.{SIGNIFICANT_DIGITS}g}") + 0.0


def _resource_quantity(value: float) -> float:
    """A Ray resource quantity: a whole multiple of RESOURCE_STEP (Ray refuses a finer one)."""
    steps = value / RESOURCE_STEP
    if not math.isclose(steps, round(steps), rel_tol=0, abs_tol=1e-6):
        raise ValueError(
            f"must be a multiple of {RESOURCE_STEP:g}, Ray's resource granularity "
            f"(at least {RESOURCE_STEP:g} where it is not 0)"
        )
    return round(round(steps) * RESOURCE_STEP, 4) + 0.0


def _fraction(value: float) -> float:
    """A share in [0, 1), as `canonical_ratio`; one that rounds to 0 is refused, not dropped."""
    rounded = canonical_ratio(value)
    if value > 0 and rounded == 0:
        raise ValueError(
            f"rounds to 0 at {RATIO_DECIMALS} decimals; write 0 for none, or a share of at "
            f"least {10.0**-RATIO_DECIMALS:g}"
        )
    if rounded >= 1:
        raise ValueError(f"rounds to 1 at {RATIO_DECIMALS} decimals; it must stay below 1")
    return rounded


# Keys of a trial: the axes, plus the two ways a pruner entry sets its target.
TRIAL_KEYS: tuple[str, ...] = (
    "dataset",
    "model",
    "pruner",
    "ratio",
    "preset",
    "schedule",
    "budget",
    "seed",
)


def _as_list(value: Any) -> Any:
    """Let an axis be written as one value: `seed: 0` means `seed: [0]`."""
    return value if isinstance(value, list) else [value]


def OneOrMany(item: Any) -> Any:  # a type factory, named like the types it builds
    return Annotated[list[item], BeforeValidator(_as_list), Field(min_length=1)]


Budget = Annotated[int, Field(gt=0, le=MAX_EPOCHS)]
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]


class _Section(BaseModel):
    # strict: YAML already gives native types, so "10" for an int is a mistake, not a cast.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _path_text(value: str) -> str:
    if "\0" in value:
        raise ValueError("holds a NUL character, which no path does")
    return value


class DataSection(_Section):
    # dataset root; the CLI's --data-root / NPTM_DATA override it
    root: Annotated[str, AfterValidator(_path_text)] | None = None
    # the paper: no hold-out
    val_fraction: Annotated[float, Field(ge=0, le=0.5), AfterValidator(_fraction)] = 0.0
    download: bool = False


class ResourcesSection(_Section):
    # train: a Ray Train DDP worker group per stage (clusters, GPU stages that run minutes);
    # inline: the train loop in the reused Tune trial actor (1 worker; stages of seconds)
    executor: Literal["inline", "train"] = "train"
    workers_per_trial: int = Field(default=1, ge=1, le=MAX_WORKERS)
    cpus_per_worker: Annotated[
        float, Field(gt=0, le=MAX_CPUS_PER_WORKER), AfterValidator(_resource_quantity)
    ] = 1.0
    gpus_per_worker: Annotated[
        float, Field(ge=0, le=MAX_GPUS_PER_WORKER), AfterValidator(_resource_quantity)
    ] = 0.0
    max_concurrent: int | None = Field(default=None, ge=1, le=MAX_CONCURRENT)
    # fp32: full precision (the paper's); bf16: bfloat16 autocast of forward passes, opt-in.
    precision: Literal["fp32", "bf16"] = "fp32"


class SeedsSection(_Section):
    # per_trial: every seed of axes.seed pre-trains and prunes its own network;
    # shared: one pre-trained and pruned network per (dataset, model, pruner target), made with
    # `shared_seed`, that every seed of axes.seed retrains (the paper's protocol).
    pretrain: Literal["per_trial", "shared"] = "per_trial"
    shared_seed: int = Field(default=0, ge=0, lt=SEED_LIMIT)
    # With `shared`: a random pruner (random, random_filter) draws one mask per seed of
    # axes.seed (per_seed), as rerunning the authors' scripts does (their random masks are
    # drawn unseeded every run), or one mask with `shared_seed` that every seed retrains.
    random_masks: Literal["per_seed", "shared"] = "per_seed"

    @model_validator(mode="after")
    def _masks_need_shared_pretraining(self) -> SeedsSection:
        if self.random_masks == "shared" and self.pretrain != "shared":
            raise ValueError(
                "random_masks: shared needs pretrain: shared (with per_trial every seed "
                "pre-trains and prunes its own network, so no mask can be shared)"
            )
        return self


class IterativeSection(_Section):
    rounds: int = Field(default=1, ge=1, le=MAX_ROUNDS)


class PrunerEntry(_Section):
    name: str
    ratio: OneOrMany(float) | None = None
    preset: OneOrMany(str) | None = None
    # Unstructured pruners only (nptm.trainables.catalog.UNSTRUCTURED_OPTIONS): which weights are
    # considered ("conv" by default, or "conv+linear") and the per-layer floor (0 = none).
    layers: str | None = None
    min_keep: Annotated[float, Field(ge=0, lt=1), AfterValidator(_fraction)] | None = None


class Axes(_Section):
    dataset: OneOrMany(str)
    model: OneOrMany(str)
    pruner: OneOrMany(PrunerEntry)
    schedule: OneOrMany(str)
    budget: OneOrMany(Budget)
    seed: OneOrMany(Seed)
    # Retraining-optimiser overrides swept as axes, e.g. {"lr": [0.1, 0.05]}.
    overrides: dict[str, OneOrMany(Any)] = Field(default_factory=dict)


class Grid(_Section):
    """The content of a grid file, as parsed; `nptm.search_spaces.load_grid` / `parse_grid` check it
    further and return a `nptm.search_spaces.checks.CheckedGrid`."""

    name: str
    max_trials: int = Field(default=DEFAULT_MAX_TRIALS, ge=1, le=MAX_TRIALS_LIMIT)
    # Modules imported before any name is looked up; importing one registers its models,
    # datasets, pruners and schedules (nptm.trainables.plugins, docs/plugins.md).
    plugins: list[str] = Field(default_factory=list)
    data: DataSection = Field(default_factory=DataSection)
    # Recipe-field overrides for every dataset, or under a dataset name for that dataset only.
    pretrain: dict[str, Any] = Field(default_factory=dict)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    seeds: SeedsSection = Field(default_factory=SeedsSection)
    iterative: IterativeSection = Field(default_factory=IterativeSection)
    axes: Axes
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    include: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def rounds(self) -> int:
        return self.iterative.rounds
