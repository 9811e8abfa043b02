"""The structure of a grid file as pydantic models: keys, types and simple bounds.

Only the shape of the file is checked here. Everything that needs the catalog, the recipes or
more than one field at a time (names, presets, compatibility, rewinding budgets, ...) is
checked by `search_spaces.checks`, which can name the exact list element at fault.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr

from trainables.recipe import Recipe

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
    val_fraction: float = Field(default=0.1, ge=0, le=0.5)
    download: bool = False


class ResourcesSection(_Section):
    # train: a Ray Train DDP worker group per stage (clusters, GPU stages that run minutes);
    # inline: the train loop in the reused Tune trial actor (1 worker; stages of seconds)
    executor: Literal["inline", "train"] = "train"
    workers_per_trial: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    max_concurrent: int | None = Field(default=None, ge=1)


class IterativeSection(_Section):
    rounds: int = Field(default=1, ge=1)


class PrunerEntry(_Section):
    name: str
    ratio: OneOrMany(float) | None = None
    preset: OneOrMany(str) | None = None
    # Unstructured pruners only (trainables.catalog.UNSTRUCTURED_OPTIONS): which weights are
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
    """A validated grid. Build it with `search_spaces.load_grid` / `parse_grid`."""

    name: str
    max_trials: int = Field(default=DEFAULT_MAX_TRIALS, ge=1)
    data: DataSection = Field(default_factory=DataSection)
    # Recipe-field overrides for every dataset, or under a dataset name for that dataset only.
    pretrain: dict[str, Any] = Field(default_factory=dict)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    iterative: IterativeSection = Field(default_factory=IterativeSection)
    axes: Axes
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    include: list[dict[str, Any]] = Field(default_factory=list)

    # Filled by `search_spaces.checks.check_grid`: the file it came from, the resolved
    # pre-training recipe of each dataset, the product space and the include trials.
    _source: str = PrivateAttr(default="<grid>")
    _recipes: dict[str, Recipe] = PrivateAttr(default_factory=dict)
    _space: Any = PrivateAttr(default=None)  # search_spaces.expand.Space
    _includes: list[Any] = PrivateAttr(default_factory=list)  # include trials (TrialKey)
    _checked: bool = PrivateAttr(default=False)

    @property
    def source(self) -> str:
        return self._source

    def recipe(self, dataset: str) -> Recipe:
        """The pre-training recipe of `dataset`: its default with the grid's `pretrain` applied."""
        return self._recipes[dataset]

    @property
    def rounds(self) -> int:
        return self.iterative.rounds
