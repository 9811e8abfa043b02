"""The structure of a grid file as pydantic models: keys, types and simple bounds.

Only the shape of the file is checked here. Everything that needs the catalog, the recipes or
more than one field at a time (names, presets, compatibility, rewinding budgets, ...) is
checked by `nptm.search_spaces.checks`, which can name the exact list element at fault.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

SWEEP_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
DEFAULT_MAX_TRIALS = 5000

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


PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    # strict: YAML already gives native types, so "10" for an int is a mistake, not a cast.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DataSection(_Section):
    root: str | None = None  # dataset root; the CLI's --data-root / NPTM_DATA override it
    val_fraction: float = Field(default=0.0, ge=0, le=0.5)  # the paper: no hold-out
    download: bool = False


class ResourcesSection(_Section):
    # train: a Ray Train DDP worker group per stage (clusters, GPU stages that run minutes);
    # inline: the train loop in the reused Tune trial actor (1 worker; stages of seconds)
    executor: Literal["inline", "train"] = "train"
    workers_per_trial: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    max_concurrent: int | None = Field(default=None, ge=1)
    # fp32: full precision (the paper's); bf16: bfloat16 autocast of forward passes, opt-in.
    precision: Literal["fp32", "bf16"] = "fp32"


class SeedsSection(_Section):
    # per_trial: every seed of axes.seed pre-trains and prunes its own network;
    # shared: one pre-trained and pruned network per (dataset, model, pruner target), made with
    # `shared_seed`, that every seed of axes.seed retrains (the paper's protocol).
    pretrain: Literal["per_trial", "shared"] = "per_trial"
    shared_seed: int = Field(default=0, ge=0)


class IterativeSection(_Section):
    rounds: int = Field(default=1, ge=1)


class PrunerEntry(_Section):
    name: str
    ratio: OneOrMany(float) | None = None
    preset: OneOrMany(str) | None = None
    # Unstructured pruners only (nptm.trainables.catalog.UNSTRUCTURED_OPTIONS): which weights are
    # considered ("conv" by default, or "conv+linear") and the per-layer floor (0 = none).
    layers: str | None = None
    min_keep: float | None = Field(default=None, ge=0, lt=1)


class Axes(_Section):
    dataset: OneOrMany(str)
    model: OneOrMany(str)
    pruner: OneOrMany(PrunerEntry)
    schedule: OneOrMany(str)
    budget: OneOrMany(PositiveInt)
    seed: OneOrMany(NonNegativeInt)
    # Retraining-optimiser overrides swept as axes, e.g. {"lr": [0.1, 0.05]}.
    overrides: dict[str, OneOrMany(Any)] = Field(default_factory=dict)


class Grid(_Section):
    """The content of a grid file, as parsed; `nptm.search_spaces.load_grid` / `parse_grid` check it
    further and return a `nptm.search_spaces.checks.CheckedGrid`."""

    name: str
    max_trials: int = Field(default=DEFAULT_MAX_TRIALS, ge=1)
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
