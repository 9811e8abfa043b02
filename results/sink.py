"""The single writer of a sweep's results: each finished stage becomes one row of the `stages`
table and its epochs rows of `epochs` (results.schema), written to Parquet (the source of
truth) first and then mirrored to MLflow (best effort)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from results.schema import EPOCHS_SCHEMA, STAGES_SCHEMA
from results.store import SweepStore
from results.tracking import MlflowRecorder, epochs_by_stage
from trainables.artifacts import MODEL, ArtifactStore
from trainables.catalog import PRUNERS
from trainables.layout import EPOCHS_TABLE, STAGES_TABLE
from trainables.stage import EpochMetrics, StageKind, StageOutcome, StageSpec, StageStatus

# The outcome's and an epoch's fields that are columns of their own.
_OUTCOME_COLUMNS = tuple(
    f.name for f in dataclasses.fields(StageOutcome) if f.name in STAGES_SCHEMA.names
)
_EPOCH_COLUMNS = tuple(
    f.name for f in dataclasses.fields(EpochMetrics) if f.name in EPOCHS_SCHEMA.names
)


@dataclass
class SweepSummary:
    sweep: str
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (id, kind, error)
    executed: int = 0
    reused: int = 0
    wall_seconds: float = 0.0
    dashboard_url: str | None = None
    mlflow_uri: str | None = None
    mlflow_degraded: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures


class ResultSink:
    """Lands every stage of one sweep in Parquet, then MLflow, and keeps the sweep's tally."""

    def __init__(
        self,
        store: SweepStore,
        recorder: MlflowRecorder,
        artifacts: ArtifactStore,
        executor: str,
    ) -> None:
        self.store = store
        self.recorder = recorder
        self.artifacts = artifacts
        self.executor = executor
        self.summary = SweepSummary(store.sweep)

    def record(
        self,
        spec: StageSpec,
        status: StageStatus,
        outcome: StageOutcome | None,
        error: str | None,
        *,
        reused: bool = False,
    ) -> None:
        status = StageStatus(status)
        executor = self.executor
        if spec.kind == StageKind.PRUNE and executor == "train":
            executor = "task"
        attempts = outcome.attempts if outcome else self.artifacts.attempts(spec.id)
        row, epochs = stage_rows(
            self.store.sweep, spec, status, outcome, error, reused=reused, executor=executor
        )
        row["attempts"] = attempts
        stage_table, epoch_table = self.store.write_stage(row, epochs)  # validated here, once
        if outcome is not None and not reused:  # reused ones came from the index
            self.artifacts.index_outcome(outcome)
        self._record_run(stage_table, epoch_table.to_pylist())
        self._tally(spec, status, error, reused)
        self.store.compact_when_due()

    def record_missing_runs(self) -> int:
        """Give an MLflow run to every stored stage row that has none yet; returns how many.

        Parquet is written first, so a driver stopped between a stage's row and its run (or an
        MLflow outage) leaves rows without a run: a rerun fills them before it starts."""
        stages = self.store.read_table(STAGES_TABLE)
        missing = stages.filter(pc.is_null(stages["mlflow_run_id"]))
        if not missing.num_rows:
            return 0
        epochs_of = epochs_by_stage(self.store.read_table(EPOCHS_TABLE))
        for i in range(missing.num_rows):
            row = missing.slice(i, 1)
            self._record_run(row, epochs_of(row["stage_id"][0].as_py()))
        return missing.num_rows

    def _record_run(self, stage_table: pa.Table, epochs: list[dict[str, Any]]) -> None:
        """MLflow run of one stored stage row; the row then learns the run's id."""
        stored = stage_table.to_pylist()[0]
        model_path = None
        if stored["status"] == StageStatus.OK and stored["stage_kind"] == StageKind.RETRAIN:
            model_path = self.artifacts.model_path(stored["stage_id"], MODEL)
        run_id = self.recorder.record_stage(stored, epochs, model_path)
        if run_id is not None:
            # Parquet first: the row learns its MLflow run only once the run exists.
            self.store.link_mlflow_run(stage_table, run_id)

    def _tally(self, spec: StageSpec, status: StageStatus, error: str | None, reused: bool) -> None:
        summary = self.summary
        summary.counts[status.value] = summary.counts.get(status.value, 0) + 1
        if status == StageStatus.FAILED:
            summary.failures.append((spec.id, spec.kind.value, (error or "").splitlines()[0]))
        if not reused and status != StageStatus.SKIPPED:
            summary.executed += 1


def stage_rows(
    sweep: str,
    spec: StageSpec,
    status: StageStatus,
    outcome: StageOutcome | None,
    error: str | None,
    *,
    reused: bool,
    executor: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The `stages` row and the `epochs` rows of one stage (not yet validated)."""
    overrides = spec.override_dict
    measured = {k: getattr(outcome, k) for k in _OUTCOME_COLUMNS} if outcome else {}
    row: dict[str, Any] = {
        **measured,
        "sweep": sweep,
        "stage_id": spec.id,
        "stage_kind": spec.kind.value,
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
        "status": StageStatus(status).value,
        "error": error,
        "reused": reused,
        "executor": executor,
        "started_at": _timestamp(measured.get("started_at")),
        "ended_at": _timestamp(measured.get("ended_at")),
        **versions(),
    }
    epochs = [{k: getattr(e, k) for k in _EPOCH_COLUMNS} for e in outcome.epochs] if outcome else []
    return row, epochs


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
