"""The unit of work the planner hands to a worker: one pretrain, prune or retrain stage."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal

from trainables.catalog import definition_revision
from trainables.recipe import Recipe

StageKind = Literal["pretrain", "prune", "retrain"]


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
    # Pre-training epochs whose end-of-epoch weights must be kept for weight rewinding.
    # Not part of the identity: it says what to keep, not what the stage computes.
    keep_epochs: tuple[int, ...] = field(default=(), compare=False)

    def identity(self) -> dict[str, Any]:
        """The settings that determine this stage's output, and nothing else."""
        ident: dict[str, Any] = {"kind": self.kind, "parents": list(self.parents)}
        if self.kind == "pretrain":
            ident |= {
                "dataset": self.dataset,
                "model": self.model,
                "seed": self.seed,
                "recipe": self.recipe.model_dump(mode="json"),
                "val_fraction": self.val_fraction,
            }
        elif self.kind == "prune":
            ident |= {
                "pruner": self.pruner,
                "ratio": self.ratio,
                "preset": self.preset,
                "seed": self.seed,
                "round": self.round,
            }
            if self.pruner_options:
                ident["pruner_options"] = dict(self.pruner_options)
            revision = definition_revision(
                pruner=self.pruner, preset_model=self.model, preset=self.preset
            )
            if revision > 1:  # the name's definition changed: never reuse the old stage
                ident["revision"] = revision
        else:
            ident |= {
                "schedule": self.schedule,
                "budget": self.budget,
                "overrides": dict(self.overrides),
                "seed": self.seed,
            }
            revision = definition_revision(schedule=self.schedule)
            if revision > 1:
                ident["revision"] = revision
        # Named only when not the default, so stages of earlier grids keep their ids.
        if self.split_seed is not None:
            ident["split_seed"] = self.split_seed
        if self.precision != "fp32" and self.kind != "prune":
            ident["precision"] = self.precision
        return ident

    @property
    def data_split_seed(self) -> int:
        """Seed of the train/validation split this stage trains (or calibrates) on."""
        return self.seed if self.split_seed is None else self.split_seed

    @cached_property
    def id(self) -> str:
        return stage_hash(self.identity())

    @property
    def override_dict(self) -> dict[str, Any]:
        return dict(self.overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
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


def stage_hash(identity: dict[str, Any]) -> str:
    """Stable content hash: canonical JSON (sorted keys, no whitespace), SHA-256, 16 hex chars."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
