"""The single writer of a sweep's results: each finished stage becomes one row of the `stages`
table and its epochs rows of `epochs` (nptm.results.schema), written to Parquet (the source of
truth) first and then mirrored to MLflow (best effort)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from nptm.results.schema import EPOCHS_SCHEMA, STAGES_SCHEMA, rows_to_table
from nptm.results.store import SweepStore
from nptm.results.tracking import MlflowRecorder, epochs_by_stage
from nptm.trainables.artifacts import MODEL, ArtifactStore
from nptm.trainables.catalog import PRUNERS
from nptm.trainables.layout import EPOCHS_TABLE, STAGES_TABLE
from nptm.trainables.stage import EpochMetrics, StageKind, StageOutcome, StageSpec, StageStatus

# The outcome's and an epoch's fields that are columns of their own.
_OUTCOME_COLUMNS = tuple(
    f.name for f in dataclasses.fields(StageOutcome) if f.name in STAGES_SCHEMA.names
)
_EPOCH_COLUMNS = tuple(
    f.name for f in dataclasses.fields(EpochMetrics) if f.name in EPOCHS_SCHEMA.names
)


@dataclass
class Trip:
    """Why the sweep stopped (nptm.orchestrator.failure_guard): `error` (as the first stage
    reported it) failed `stages`."""

    error: str
    stages: list[str] = field(default_factory=list)  # ids, in the order they failed


@dataclass
class SweepSummary:
    sweep: str
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (id, kind, error)
    executed: int = 0
    reused: int = 0
    wall_seconds: float = 0.0
    dashboard_url: str | None = None  # where a browser opens it (NPTM_PUBLIC_DASHBOARD_URL)
    dashboard_local: bool = True  # nptm's own local Ray: the dashboard ends with the sweep
    mlflow_uri: str | None = None
    mlflow_public: str | None = None  # the UI where a browser opens it (NPTM_PUBLIC_MLFLOW_URL)
    grafana_url: str | None = None  # nptm's Grafana dashboard (NPTM_PUBLIC_GRAFANA_URL)
    mlflow_degraded: bool = False
    mlflow_experiment_id: str | None = None
    mlflow_sweep_run_id: str | None = None
    planned: int = 0  # stages in the plan
    interrupted: int | None = None  # the signal that stopped the sweep (SIGINT, SIGTERM)
    # Set when one error kept failing stages and the sweep stopped handing them out: the
    # error and the stages it failed (nptm.orchestrator.failure_guard.Trip).
    stopped: Trip | None = None

    @property
    def ok(self) -> bool:
        return not self.failures and self.interrupted is None and self.stopped is None

    @property
    def landed(self) -> int:
        """Stages with a stored row: finished, failed or skipped."""
        return sum(self.counts.values())


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
        self._landed: dict[str, StageStatus] = {}  # each recorded stage's latest status
        # Set when the sweep is interrupted: trials Tune stops on the way out are not outcomes.
        self.closed = False

    def start_stage(self, spec: StageSpec) -> None:
        """Open the stage's MLflow run as RUNNING, with the params and tags of its row."""
        if self.closed:
            return
        not_yet = StageOutcome(spec.id, spec.kind, StageStatus.SKIPPED)  # no measurement yet
        row, _ = stage_rows(self.store.sweep, spec, not_yet, reused=False,
                            executor=self._executor(spec))  # fmt: skip
        row["attempts"] = self.artifacts.attempts(spec.id)
        # Normalised as the store will write it: MLflow params cannot change value later.
        (stored,) = rows_to_table(STAGES_TABLE, [row]).to_pylist()
        self.recorder.start_stage(stored)

    def record(self, spec: StageSpec, outcome: StageOutcome, *, reused: bool = False) -> None:
        """Land how `spec` ended: its rows in Parquet, then its MLflow run; `reused`: the
        outcome of an earlier run, found in storage."""
        if self.closed:
            return
        row, epochs = stage_rows(
            self.store.sweep, spec, outcome, reused=reused, executor=self._executor(spec)
        )
        ran = outcome.status.finished  # a failed or skipped stage's outcome is the driver's
        row["attempts"] = outcome.attempts if ran else self.artifacts.attempts(spec.id)
        stage_table, epoch_table = self.store.write_stage(row, epochs)  # validated here, once
        if ran and not reused:  # reused ones came from the index
            self.artifacts.index_outcome(outcome)
        self._record_run(stage_table, epoch_table.to_pylist())
        self._tally(spec, outcome, reused)
        self.store.compact_when_due()

    def _executor(self, spec: StageSpec) -> str:
        if spec.kind == StageKind.PRUNE and self.executor == "train":
            return "task"
        return self.executor

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
        model = None
        if stored["status"] == StageStatus.OK and stored["stage_kind"] == StageKind.RETRAIN:
            model = partial(final_model, self.artifacts, stored["stage_id"])
        run_id = self.recorder.record_stage(stored, epochs, model)
        if run_id is not None:
            # Parquet first: the row learns its MLflow run only once the run exists.
            self.store.link_mlflow_run(stage_table, run_id)

    def _tally(self, spec: StageSpec, outcome: StageOutcome, reused: bool) -> None:
        summary, status = self.summary, outcome.status
        earlier = self._landed.get(spec.id)
        if earlier is not None:  # ran again (a parent was re-made): counted as it ended last
            summary.counts[earlier.value] -= 1
        self._landed[spec.id] = status
        summary.counts[status.value] = summary.counts.get(status.value, 0) + 1
        if status == StageStatus.FAILED:
            first_line = (outcome.error or "").splitlines()[0]
            summary.failures.append((spec.id, spec.kind.value, first_line))
        if not reused and status != StageStatus.SKIPPED:
            summary.executed += 1


def final_model(artifacts: ArtifactStore, stage_id: str) -> Any:
    """A stage's final network as it computes, for MLflow: rebuilt from nptm's own file
    (base architecture, every pruning plan, the weights), unstructured masks multiplied into
    the weights (pruned weights are zeros of a plain nn.Module), in eval mode."""
    from torch.nn.utils import prune

    from nptm.trainables.stage_runner import load_model

    model, _ = load_model(artifacts, stage_id, MODEL)
    for module in model.modules():
        if hasattr(module, "weight_mask"):
            prune.remove(module, "weight")
    return model.eval()


def stage_rows(
    sweep: str,
    spec: StageSpec,
    outcome: StageOutcome,
    *,
    reused: bool,
    executor: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The `stages` row and the `epochs` rows of one stage (not yet validated)."""
    overrides = spec.override_dict
    measured = {k: getattr(outcome, k) for k in _OUTCOME_COLUMNS}
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
        "target": spec.target,
        **recipe_columns(spec),
        "status": outcome.status.value,
        "reused": reused,
        "executor": executor,
        "started_at": _timestamp(measured.get("started_at")),
        "ended_at": _timestamp(measured.get("ended_at")),
        **versions(),
    }
    epochs = [{k: getattr(e, k) for k in _EPOCH_COLUMNS} for e in outcome.epochs]
    return row, epochs


def recipe_columns(spec: StageSpec) -> dict[str, Any]:
    """The recipe a stage trains with, as its schedule resolves it (nptm.results.schema)."""
    epochs = spec.epochs
    if not epochs:  # a prune, or a pre-training that loads its weights
        return {"epochs": epochs}
    recipe = spec.recipe
    momentum_min, momentum_max = _momentum_range(spec, epochs)
    return {
        "epochs": epochs,
        "lr_peak": _peak_lr(spec, epochs),
        "milestones": list(recipe.milestones),
        "batch_size": recipe.batch_size,
        "weight_decay": recipe.weight_decay,
        "momentum": recipe.momentum,
        "momentum_min": momentum_min,
        "momentum_max": momentum_max,
        "nesterov": recipe.uses_nesterov,
    }


def _peak_lr(spec: StageSpec, epochs: int) -> float:
    if spec.kind == StageKind.PRETRAIN:
        return spec.recipe.lr
    from nptm.trainables import schedules

    # Any steps-per-epoch shows each curve's peak; 100 puts every phase boundary on a step.
    curve = schedules.lr_schedule(
        spec.schedule,
        budget=epochs,
        steps_per_epoch=100,
        recipe=spec.recipe,
        overrides={k: v for k, v in spec.overrides if k == "lr"},
    )
    return float(curve.max())


def _momentum_range(spec: StageSpec, epochs: int) -> tuple[float, float]:
    """Lowest and highest SGD momentum of the stage's steps: the recipe's, unless the schedule
    sets it per step (clr)."""
    curve = None
    if spec.kind != StageKind.PRETRAIN:
        from nptm.trainables import schedules

        curve = schedules.momentum_schedule(
            spec.schedule, budget=epochs, steps_per_epoch=100, recipe=spec.recipe
        )
    if curve is None:
        return spec.recipe.momentum, spec.recipe.momentum
    return float(curve.min()), float(curve.max())


@cache
def versions() -> dict[str, str | None]:
    """The code-version columns of every stage row."""
    v = code_versions()
    return {
        "nptm_version": v["nptm"],
        "git_commit": v["git_commit"],
        "torch_version": v["torch"],
        "ray_version": v["ray"],
    }


@cache
def code_versions() -> dict[str, Any]:
    """nptm's version and git commit, and the versions it runs on (run/versions.json).

    An editable install reports the same package version for every commit: the commit of
    the checkout nptm is imported from, when it is one, says which code ran."""
    import platform

    import mlflow
    import ray
    import torch

    from nptm.trainables import __version__

    commit, dirty = _git_state(Path(__file__).resolve().parents[1])
    return {
        "nptm": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "mlflow": mlflow.__version__,
    }


def _git_state(root: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, uncommitted changes?) of the git checkout at `root`; (None, None) if the
    package is not in one (a wheel install) or git is missing."""
    if not (root / ".git").exists():
        return None, None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        changes = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head or None, bool(changes)


def _timestamp(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, tz=UTC) if isinstance(value, int | float) else None
