"""The Python API as docs/api.md shows it, called as a notebook would: load a grid, plan it,
run it, open the sweep's tables, build a report from a DataFrame."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from nptm.orchestrator.planner import build_plan
from nptm.orchestrator.sweep import SweepOptions, run_sweep
from nptm.results.api import Sweep, load_sweep
from nptm.results.report import build_report_from_stages
from nptm.results.store import SweepStore
from nptm.search_spaces import GridError, load_grid, parse_grid
from tests.sweep_helpers import restored_environ

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "api.md"

GRID = """\
name: notebook
pretrain: {epochs: 2, milestones: [1]}
resources: {executor: inline}
axes:
  dataset: digits
  model: resnet20
  pruner:
    - {name: magnitude, ratio: 0.5}
    - {name: l1_filter, ratio: 0.5}
  schedule: [ft, clr]
  budget: 1
  seed: [0, 1]
"""


def test_load_validate_and_plan(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    grid = load_grid(path)
    assert grid.name == "notebook" and grid.recipe("digits").epochs == 2
    plan = build_plan(grid)
    kinds = pd.Series([s.kind for s in plan.stages.values()]).value_counts()
    # per_trial seeds: one pre-training per seed, one prune per (pruner, seed), one retrain per
    # (pruner, schedule, seed).
    assert kinds.to_dict() == {"retrain": 2 * 2 * 2, "prune": 2 * 2, "pretrain": 2}
    assert len(plan.trials) == 2 * 2 * 2
    with pytest.raises(GridError, match=r"axes\.budget\[0\]"):
        parse_grid({**_yaml(GRID), "axes": {**_yaml(GRID)["axes"], "budget": [0]}}, "nb")


def _yaml(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def _stage(stage_id: str, kind: str, **kw: object) -> dict:
    row = {
        "stage_id": stage_id,
        "stage_kind": kind,
        "round": 1,
        "dataset": "digits",
        "model": "resnet20",
        "seed": 0,
        "reused": False,
        "status": "ok",
    }
    return row | kw


def test_load_sweep_and_report_from_a_dataframe(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, "nb")
    store.write_stage(_stage("pre", "pretrain", parent_ids=[], test_acc=0.9))
    store.write_stage(
        _stage("pr", "prune", parent_ids=["pre"], pruner="magnitude", ratio=0.5, structured=False)
    )
    accs = [0.80, 0.83, 0.89]
    for seed, acc in enumerate(accs):
        epochs = [{"epoch": e, "lr": 0.1 / (e + 1), "test_acc": acc} for e in (0, 1)]
        store.write_stage(
            _stage(
                f"rt{seed}", "retrain", parent_ids=["pr"], seed=seed, pruner="magnitude",
                ratio=0.5, structured=False, schedule="ft", budget_epochs=2, overrides="{}",
                test_acc=acc,
            ),
            epochs,
        )  # fmt: skip

    sweep = load_sweep(tmp_path, "nb")

    assert isinstance(sweep, Sweep) and sweep.name == "nb"
    assert isinstance(sweep.stages, pd.DataFrame) and isinstance(sweep.stages_table, pa.Table)
    assert sorted(sweep.stages["stage_id"]) == ["pr", "pre", "rt0", "rt1", "rt2"]
    assert sweep.stages_table.num_rows == 5
    assert sweep.stages_table.column("stage_id").to_pylist() == list(sweep.stages["stage_id"])
    assert len(sweep.epochs) == 6 and sweep.epochs_table.num_rows == 6
    assert sweep.epochs.query("stage_id == 'rt1' and epoch == 1")["lr"].item() == 0.05

    # A notebook filters the DataFrame, then builds the report from what is left.
    kept = sweep.stages[sweep.stages["seed"] != 0]
    report = build_report_from_stages(kept, tmp_path / "report", sweep="nb", epochs=sweep.epochs)
    assert report.markdown_path.is_file()
    cell = report.tables["headline"].query("pruner == 'magnitude' and sched == 'ft'")
    assert cell["mean"].item() == pytest.approx(statistics.mean(accs[1:]))
    assert cell["n"].item() == 2

    with pytest.raises(FileNotFoundError, match="no results for sweep 'other'"):
        load_sweep(tmp_path, "other")
    with pytest.raises(ValueError, match="sweep"):
        load_sweep(tmp_path, "../escape")


def test_api_guide_names_what_exists() -> None:
    """Every `module.function` the guide imports exists (the guide cannot drift from the code)."""
    text = GUIDE.read_text()
    imports = re.findall(r"^from ([\w.]+) import ([\w, ]+)$", text, re.M)
    assert imports
    for module, names in imports:
        mod = __import__(module, fromlist=["_"])
        for name in names.split(","):
            assert hasattr(mod, name.strip()), f"{module}.{name.strip()}"


@pytest.mark.slow
def test_run_then_load_in_a_notebook(tmp_path: Path, ray_node) -> None:
    """`run_sweep` on the session's Ray node (a notebook passes its cluster's address), then
    the sweep's tables as the guide opens them."""
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.replace("schedule: [ft, clr]", "schedule: [ft]").replace("[0, 1]", "0"))
    grid = load_grid(path)
    plan = build_plan(grid)
    # run_sweep sets process-wide Ray/Tune defaults; a notebook session would keep them.
    with restored_environ():
        summary = run_sweep(plan, SweepOptions(str(tmp_path / "runs"), ray_node.address))
    assert summary.ok
    sweep = load_sweep(tmp_path / "runs", "notebook")
    assert set(sweep.stages["stage_id"]) == set(plan.stages)
    assert set(sweep.stages["status"]) == {"ok"}
    retrains = sweep.stages[sweep.stages["stage_kind"] == "retrain"]
    assert len(sweep.epochs.merge(retrains[["stage_id"]])) == len(retrains) * 1  # budget 1
