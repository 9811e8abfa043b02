"""nptm.results.sink: a stage's outcome lands in Parquet first, then in MLflow, each row once."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from nptm.results.sink import ResultSink
from nptm.results.store import SweepStore
from nptm.results.tracking import MlflowRecorder
from nptm.trainables.artifacts import ArtifactStore
from nptm.trainables.recipe import DEFAULT_RECIPES, Recipe
from nptm.trainables.stage import EpochMetrics, StageOutcome, StageSpec, StageStatus
from tests.ports import free_port
from tests.sweep_helpers import empty_mlflow_store

PRE = StageSpec("pretrain", "digits", "resnet20", 0, DEFAULT_RECIPES["digits"])
PRUNE = StageSpec(
    "prune", "digits", "resnet20", 0, DEFAULT_RECIPES["digits"], parents=(PRE.id,),
    pruner="l1_filter", ratio=0.5,
)  # fmt: skip
EPOCHS = tuple(
    EpochMetrics(e, 0.1, 1.0 / e, 0.5, None, None, 1.1, 0.4 + e / 100, 2.0, 64) for e in (1, 2)
)


def _outcome(spec: StageSpec, **kw: object) -> StageOutcome:
    return StageOutcome(
        spec.id, spec.kind, StageStatus.OK, started_at=1.7e9, ended_at=1.7e9 + 4, **kw
    )  # type: ignore[arg-type]


def _sink(storage: Path, uri: str | None, executor: str = "inline") -> ResultSink:
    recorder = MlflowRecorder(uri, "s1")
    recorder.start_sweep()
    return ResultSink(SweepStore(storage, "s1"), recorder, ArtifactStore(str(storage)), executor)


def test_outcome_to_rows_parquet_then_mlflow(tmp_path: Path) -> None:
    uri = empty_mlflow_store(tmp_path)
    sink = _sink(tmp_path, uri, executor="train")
    sink.record(PRE, _outcome(PRE, test_acc=0.4, attempts=2, epochs=EPOCHS))
    row = SweepStore(tmp_path, "s1").read_stages().iloc[0]
    assert row["stage_id"] == PRE.id and row["stage_kind"] == "pretrain" and row["status"] == "ok"
    assert row["test_acc"] == pytest.approx(0.4) and row["attempts"] == 2
    assert row["executor"] == "train" and row["ended_at"].timestamp() == pytest.approx(1.7e9 + 4)
    epochs = SweepStore(tmp_path, "s1").read_epochs()
    assert sorted(epochs["epoch"]) == [1, 2] and set(epochs["stage_id"]) == {PRE.id}
    # The row names its MLflow run, which carries the same numbers.
    run = MlflowClient(uri).get_run(row["mlflow_run_id"])
    assert run.data.tags["nptm.stage_id"] == PRE.id
    assert run.data.metrics["summary/test_acc"] == pytest.approx(0.4)
    # the digits recipe: Nesterov SGD at a fixed momentum 0.9
    assert row["nesterov"] and row["momentum_min"] == row["momentum_max"] == 0.9
    params = run.data.params
    assert (params["nesterov"], params["momentum_min"], params["momentum_max"]) == (
        "True", "0.9", "0.9",
    )  # fmt: skip
    assert sink.summary.counts == {"ok": 1} and sink.summary.executed == 1


def test_failed_and_skipped_stages(tmp_path: Path) -> None:
    sink = _sink(tmp_path, empty_mlflow_store(tmp_path), executor="train")
    ArtifactStore(str(tmp_path)).start_attempt(PRE.id)
    ArtifactStore(str(tmp_path)).start_attempt(PRE.id)
    sink.record(PRE, StageOutcome(PRE.id, PRE.kind, "failed", "RuntimeError: boom\ntraceback"))
    skipped = f"skipped: failed ancestor {PRE.id}"
    sink.record(PRUNE, StageOutcome(PRUNE.id, PRUNE.kind, "skipped", skipped))
    rows = SweepStore(tmp_path, "s1").read_stages().set_index("stage_id")
    assert rows.loc[PRE.id, "attempts"] == 2  # counted by the artifact store: no outcome
    assert rows.loc[PRUNE.id, "executor"] == "task"  # a prune stage of a train sweep
    assert rows.loc[PRUNE.id, "attempts"] == 0 and rows.loc[PRUNE.id, "status"] == "skipped"
    # Only the failure is a failure of the sweep; a skipped stage is counted, not blamed.
    assert sink.summary.failures == [(PRE.id, "pretrain", "RuntimeError: boom")]
    assert sink.summary.counts == {"failed": 1, "skipped": 1} and sink.summary.executed == 1


def test_parquet_is_written_when_mlflow_is_down(tmp_path: Path) -> None:
    sink = _sink(tmp_path, f"http://127.0.0.1:{free_port()}")
    sink.record(PRE, _outcome(PRE, test_acc=0.4), reused=True)
    row = SweepStore(tmp_path, "s1").read_stages().iloc[0]
    assert row["reused"] and pd.isna(row["mlflow_run_id"]) and row["test_acc"] == 0.4
    assert sink.recorder.degraded and sink.summary.executed == 0


def test_recipe_columns_are_what_each_schedule_runs() -> None:
    """The recipe fields of a stage row, against the paper's CIFAR recipe by hand: lr 0.1,
    /10 at epochs 80 and 120 of 160, batch 64, wd 1e-4, momentum 0.9."""
    from nptm.results.sink import recipe_columns

    cifar = DEFAULT_RECIPES["cifar10"]

    def retrain(schedule: str, budget: int, recipe: Recipe = cifar, **kw: object) -> StageSpec:
        return StageSpec(
            "retrain", "cifar10", "resnet56", 0, recipe, parents=("p",), pruner="l1_filter",
            preset="B", schedule=schedule, budget=budget, **kw,
        )  # type: ignore[arg-type]  # fmt: skip

    peaks = {
        ("ft", 40): 0.001,  # the last pre-training lr
        ("lrw", 40): 0.001,  # replays epochs 120-159
        ("lrw", 80): 0.01,  # replays epochs 80-159
        ("wr", 160): 0.1,  # replays the whole run
        ("slr", 40): 0.1,
        ("clr", 40): 0.1,
        ("scratch", 40): 0.1,
    }
    for (schedule, budget), peak in peaks.items():
        cols = recipe_columns(retrain(schedule, budget))
        assert cols["lr_peak"] == pytest.approx(peak), schedule
        assert cols["epochs"] == budget and cols["milestones"] == [80, 120]
        assert (cols["batch_size"], cols["weight_decay"], cols["momentum"]) == (64, 1e-4, 0.9)
    override = recipe_columns(retrain("clr", 40, overrides=(("lr", 0.05),)))
    assert override["lr_peak"] == pytest.approx(0.05)
    # What the optimizer runs with: clr cycles the momentum 0.95 -> 0.85 -> 0.95 (OneCycleLR's
    # defaults), every other schedule keeps the recipe's 0.9; Nesterov as the recipe says.
    for schedule, (low, high) in {"clr": (0.85, 0.95), "ft": (0.9, 0.9), "slr": (0.9, 0.9)}.items():
        cols = recipe_columns(retrain(schedule, 40))
        assert (cols["momentum_min"], cols["momentum_max"]) == pytest.approx((low, high))
        assert cols["momentum"] == 0.9 and cols["nesterov"] is True
    plain = cifar.model_copy(update={"nesterov": False})
    assert recipe_columns(retrain("ft", 40, recipe=plain))["nesterov"] is False
    no_momentum = cifar.model_copy(update={"momentum": 0.0})  # torch: no Nesterov without it
    assert recipe_columns(retrain("clr", 40, recipe=no_momentum))["nesterov"] is False
    pretrain = recipe_columns(PRE)  # the digits recipe: 30 epochs at lr 0.1, wd 5e-4
    assert (pretrain["epochs"], pretrain["lr_peak"], pretrain["weight_decay"]) == (30, 0.1, 5e-4)
    assert recipe_columns(PRUNE) == {"epochs": 0}  # pruning trains nothing
