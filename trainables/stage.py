"""The unit of work the planner hands to a worker (`StageSpec`: one pretrain, prune or retrain
stage) and what the worker hands back (`StageOutcome`, with its `EpochMetrics`).

Torch-free: the driver and Tune's trial actors import it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from nptm.trainables.catalog import definition_revision
from nptm.trainables.recipe import Recipe


class StageKind(StrEnum):
    """What a stage does. The values are what Parquet and MLflow store."""

    PRETRAIN = "pretrain"
    PRUNE = "prune"
    RETRAIN = "retrain"


class StageStatus(StrEnum):
    """How a stage ended. The values are what Parquet and MLflow store."""

    OK = "ok"
    DIVERGED = "diverged"  # training produced a non-finite loss; its numbers are kept
    FAILED = "failed"  # the stage raised (after its retries)
    SKIPPED = "skipped"  # not run: an ancestor did not finish ok

    @property
    def finished(self) -> bool:
        """The stage ran to its end: its outcome stands and a rerun does not repeat it."""
        return self in (StageStatus.OK, StageStatus.DIVERGED)


@dataclass(frozen=True)
class StageSpec:
    """Everything a worker needs to run one stage.

    `id` is a content hash of exactly the settings that determine the stage's output (see
    `identity()`), so equal stages from different grids or machines share one artifact.
    """

    kind: StageKind
    dataset: str
    model: str
    seed: int
    recipe: Recipe  # the pre-training recipe every schedule is defined against
    val_fraction: float = 0.0  # share of the training set held out for model selection
    parents: tuple[str, ...] = ()
    pruner: str | None = None
    ratio: float | None = None  # target sparsity (unstructured) or filter ratio (structured)
    preset: str | None = None
    # An unstructured pruner's options, defaults filled in (layers, min_keep), sorted by name.
    pruner_options: tuple[tuple[str, Any], ...] = ()
    schedule: str | None = None
    budget: int | None = None  # retraining epochs
    overrides: tuple[tuple[str, Any], ...] = ()  # e.g. (("lr", 0.05),) sorted by key
    round: int = 1  # iterative pruning round, 1-based
    # Seed of the train/validation split when it is not `seed`: a retraining seed of a shared
    # pre-training keeps the split the shared network was trained on.
    split_seed: int | None = None
    precision: str = "fp32"  # fp32 | bf16 (autocast of forward passes)
    # Pretrain only: load these weights (a grid's `pretrain.from`) instead of training;
    # the stage is then identified by the file's SHA-256, not by a seed and a recipe.
    start_from: str | None = None
    start_sha256: str | None = None
    # Pre-training epochs whose end-of-epoch weights must be kept for weight rewinding.
    # Not part of the identity: it says what to keep, not what the stage computes.
    keep_epochs: tuple[int, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", StageKind(self.kind))

    def identity(self) -> dict[str, Any]:
        """The settings that determine this stage's output, and nothing else: the fields
        `IDENTITY` lists for its kind, its parents' ids (which carry everything upstream) and
        the revision of the definitions it runs. A setting at its default is left out, so
        stages stored before that setting existed keep their ids."""
        ident: dict[str, Any] = {"kind": self.kind.value, "parents": list(self.parents)}
        kind = "pretrain_from" if self.start_sha256 is not None else self.kind.value
        for name in IDENTITY[kind]:
            value = self._identity_value(name)
            if value != IDENTITY_DEFAULTS.get(name, _ALWAYS):
                ident[name] = value
        return ident

    def _identity_value(self, name: str) -> Any:
        match name:
            case "recipe":
                return self.recipe.model_dump(mode="json")
            case "weights_sha256":
                return self.start_sha256
            case "pruner_options" | "overrides":
                return dict(getattr(self, name))
            case "revision":
                if self.kind == StageKind.PRUNE:
                    return definition_revision(
                        pruner=self.pruner, preset_model=self.model, preset=self.preset
                    )
                if self.kind == StageKind.RETRAIN:
                    return definition_revision(schedule=self.schedule)
                return definition_revision(model=self.model)
            case _:
                return getattr(self, name)

    @property
    def trains(self) -> bool:
        """False for a pretrain stage that loads existing weights (0 epochs)."""
        return self.start_sha256 is None

    @property
    def epochs(self) -> int:
        """Training epochs the stage runs (prune, and a pre-training that loads weights: 0)."""
        if self.kind == StageKind.PRETRAIN:
            return self.recipe.epochs if self.trains else 0
        if self.kind == StageKind.RETRAIN:
            return self.budget or 0
        return 0

    @property
    def data_split_seed(self) -> int:
        """Seed of the train/validation split this stage trains (or calibrates) on."""
        return self.seed if self.split_seed is None else self.split_seed

    @cached_property
    def id(self) -> str:
        return stage_hash(self.identity())

    @property
    def target(self) -> str | None:
        """What the pruner aims at, as one label: ``ratio=0.5`` or ``preset=B``."""
        return target_label(self.ratio, self.preset)

    @property
    def label(self) -> str:
        """``kind/dataset/model/pruner/target/schedule/budget/seed``, the parts that apply."""
        return stage_label(
            kind=self.kind,
            dataset=self.dataset,
            model=self.model,
            pruner=self.pruner,
            target=self.target,
            schedule=self.schedule,
            budget=self.budget,
            seed=self.seed,
        )

    @property
    def display_name(self) -> str:
        """`label` plus a short hash of the id: unique, and short enough for the Ray dashboard."""
        return f"{self.label}-{self.id[:6]}"

    @property
    def override_dict(self) -> dict[str, Any]:
        return dict(self.overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["recipe"] = self.recipe.model_dump(mode="json")
        d["overrides"] = dict(self.overrides)
        d["pruner_options"] = dict(self.pruner_options)
        d["id"] = self.id
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageSpec:
        d = dict(d)
        d.pop("id", None)
        d["recipe"] = Recipe.model_validate(d["recipe"])
        d["overrides"] = tuple(sorted(d.get("overrides", {}).items()))
        d["pruner_options"] = tuple(sorted(d.get("pruner_options", {}).items()))
        for key in ("parents", "keep_epochs"):
            d[key] = tuple(d.get(key, ()))
        return cls(**d)


# What each kind of stage computes from, besides its parents' ids. A pre-training that loads
# existing weights (`pretrain.from`) is identified by the file's SHA-256 instead of a seed, and
# still by the recipe: every retraining schedule is defined against it (ft's lr, the weight
# decay, Nesterov), so two grids that state different recipes for one file never share a
# retraining. `revision`: of the model, pruner/preset or schedule definition the stage runs.
IDENTITY: dict[str, tuple[str, ...]] = {
    "pretrain": ("dataset", "model", "seed", "recipe", "val_fraction", "precision", "revision"),
    "pretrain_from": ("dataset", "model", "weights_sha256", "recipe", "val_fraction", "precision",
                      "revision"),
    "prune": ("pruner", "ratio", "preset", "pruner_options", "seed", "round", "split_seed",
              "revision"),
    "retrain": ("schedule", "budget", "overrides", "seed", "split_seed", "precision", "revision"),
}  # fmt: skip
_ALWAYS = object()  # no default: always part of the identity
# Values left out of the identity (the defaults stages were identified without).
IDENTITY_DEFAULTS: dict[str, Any] = {
    "pruner_options": {},
    "split_seed": None,
    "precision": "fp32",
    "revision": 1,
}


def target_label(ratio: float | None, preset: str | None) -> str | None:
    """The one label of a pruning target; a stage has a ratio or a preset, never both."""
    if ratio is not None:
        return f"ratio={ratio:g}"
    return f"preset={preset}" if preset is not None else None


def stage_label(
    *,
    kind: str,
    dataset: str,
    model: str,
    pruner: str | None,
    target: str | None,
    schedule: str | None,
    budget: int | None,
    seed: int,
) -> str:
    """A stage in words, e.g. ``retrain/cifar10/resnet56/l1_filter/preset=B/clr/b40/s1``."""
    budget_part = f"b{budget}" if budget is not None else None
    parts = [StageKind(kind).value, dataset, model, pruner, target, schedule, budget_part]
    parts.append(f"s{seed}")
    return "/".join(str(p) for p in parts if p is not None)


def stage_hash(identity: dict[str, Any]) -> str:
    """Stable content hash: canonical JSON (sorted keys, no whitespace), SHA-256, 16 hex chars."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch of a training stage, as the train loop measured it."""

    epoch: int  # epochs completed, 1-based
    lr: float  # lr of the last step of the epoch
    train_loss: float  # mean over the epoch's training samples, with the augmentation used
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    test_loss: float
    test_acc: float
    wall_s: float  # whole epoch: training and evaluation
    samples: int  # training samples processed, all ranks together
    train_s: float = 0.0  # the training phase of the epoch alone


@dataclass(frozen=True)
class StageOutcome:
    """What one run of a stage produced; `run_stage` returns it and the artifact store keeps
    it as ``outcome.json``. Fields a stage kind does not produce stay None."""

    stage_id: str
    kind: StageKind
    status: StageStatus
    error: str | None = None
    # accuracy (fractions in [0, 1]); test_acc after the final epoch is the headline
    test_acc: float | None = None
    test_loss: float | None = None
    best_val_epoch: int | None = None
    test_acc_at_best_val: float | None = None
    best_test_acc_over_epochs: float | None = None
    acc_before_prune: float | None = None
    acc_after_prune: float | None = None
    # size of the network the stage produced, and of its unpruned architecture
    params: int | None = None
    macs: int | None = None
    nonzero_params: int | None = None
    base_params: int | None = None
    base_macs: int | None = None
    params_reduction: float | None = None
    macs_reduction: float | None = None
    achieved_sparsity: float | None = None
    # layers a global threshold left with no weight (recorded, never repaired), and the share
    # of weights each pruned layer keeps
    emptied_layers: int | None = None
    emptied_layer_names: list[str] | None = None
    layer_density: dict[str, float] | None = None
    structured: bool | None = None
    pretrain_id: str | None = None  # the pre-training at the root of the lineage
    # the run itself
    epochs_run: int | None = None
    resumed_from_epoch: int | None = None
    samples_per_second: float | None = None
    started_at: float | None = None  # Unix time
    ended_at: float | None = None
    wall_seconds: float | None = None
    device_hours: float | None = None
    node: str | None = None
    workers: int | None = None
    attempts: int | None = None  # times the stage was started, this run included
    # rewind checkpoints a finished pre-training re-made for a later grid (see stage_runner)
    rewind_epochs_remade: list[int] | None = None
    # Lineage: the SHA-256 of each payload this stage holds for its children ({name: sha}),
    # and of each parent payload it read ({"<parent id>/<name>": sha}). None: written before
    # nptm recorded lineage. See `read_current`.
    artifacts: dict[str, str] | None = None
    consumed: dict[str, str] | None = None
    epochs: tuple[EpochMetrics, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", StageKind(self.kind))
        object.__setattr__(self, "status", StageStatus(self.status))

    def read_current(self, parent_id: str, parent: StageOutcome) -> bool:
        """Whether every payload of `parent_id` this stage read is the one `parent` holds now.

        A parent re-made since (a pre-training trained again after its model was lost, on a
        GPU whose runs differ) holds other bytes: this stage then ran on another network and
        must run again. Payloads either side did not record count as current, so stages
        stored before lineage was recorded are kept."""
        held = parent.artifacts or {}
        prefix = f"{parent_id}/"
        return all(
            held.get(key.removeprefix(prefix), sha) == sha
            for key, sha in (self.consumed or {}).items()
            if key.startswith(prefix)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: enums as their values, epochs as dicts."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["kind"], d["status"] = self.kind.value, self.status.value
        d["epochs"] = [asdict(e) for e in self.epochs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageOutcome:
        """Inverse of `to_dict`; also reads the untyped layout written before StageOutcome
        (``trial_id``, ``stage_kind``, ``epoch_rows``), so older artifact stores resume."""
        d = dict(d)
        if "trial_id" in d:
            d["stage_id"] = d.pop("trial_id")
            d["kind"] = d.pop("stage_kind")
            d["epochs"] = d.pop("epoch_rows", [])
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["epochs"] = tuple(EpochMetrics(**e) for e in d.get("epochs") or ())
        return cls(**d)
