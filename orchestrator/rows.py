"""Turn a stage's outcome into rows of the results tables (see results.schema)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import cache
from typing import Any

from results.schema import PRUNE_OUTCOME_COLUMNS
from trainables.catalog import PRUNERS
from trainables.stage import StageSpec

# Outcome fields copied into the trial row as they are.
OUTCOME_FIELDS = (
    *PRUNE_OUTCOME_COLUMNS,
    "test_acc",
    "test_loss",
    "best_val_epoch",
    "test_acc_at_best_val",
    "best_test_acc_over_epochs",
    "epochs_run",
    "wall_seconds",
    "device_hours",
    "node",
    "workers",
)
EPOCH_FIELDS = (
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "test_loss",
    "test_acc",
    "wall_s",
    "samples",
)


@cache
def versions() -> dict[str, str]:
    import ray
    import torch

    from orchestrator import __version__

    return {
        "nptm_version": __version__,
        "torch_version": torch.__version__,
        "ray_version": ray.__version__,
    }


def _timestamp(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, tz=UTC) if isinstance(value, int | float) else None


def stage_rows(
    sweep: str,
    spec: StageSpec,
    status: str,
    outcome: dict[str, Any] | None,
    error: str | None,
    *,
    reused: bool,
    executor: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    outcome = outcome or {}
    overrides = spec.override_dict
    row: dict[str, Any] = {
        "sweep": sweep,
        "trial_id": spec.id,
        "stage_kind": spec.kind,
        "parent_ids": list(spec.parents),
        "round": spec.round,
        "dataset": spec.dataset,
        "model": spec.model,
        "pruner": spec.pruner,
        "structured": PRUNERS[spec.pruner].structured if spec.pruner else None,
        "ratio": spec.ratio,
        "preset": spec.preset,
        "pruner_options": json.dumps(dict(spec.pruner_options), sort_keys=True)
        if spec.pruner
        else None,
        "schedule": spec.schedule,
        "budget_epochs": spec.budget,
        "overrides": json.dumps(overrides, sort_keys=True),
        "lr_override": overrides.get("lr"),
        "val_fraction": spec.val_fraction,
        "precision": spec.precision,
        "seed": spec.seed,
        "status": status,
        "error": error,
        "reused": reused,
        "executor": executor,
        "mlflow_run_id": None,
        "started_at": _timestamp(outcome.get("started_at")),
        "ended_at": _timestamp(outcome.get("ended_at")),
        **{k: outcome.get(k) for k in OUTCOME_FIELDS},
        **versions(),
    }
    epochs = [
        {
            "sweep": sweep,
            "trial_id": spec.id,
            "stage_kind": spec.kind,
            **{k: e.get(k) for k in EPOCH_FIELDS},
        }
        for e in outcome.get("epoch_rows", [])
    ]
    return row, epochs
