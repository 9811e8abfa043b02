"""Adaptive seeds (`nptm sweep GRID --until-conclusive`): which runs get the next seeds for a
hand-made table of runs, a look's decisions against the boundary formula, and one small sweep
on digits from start to report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats as sps

from nptm.results.adaptive import Design, arm_cells, open_tests, take_look
from nptm.results.sequential import spent
from tests.sweep_helpers import cli_in_process, seed_stages, sweep_on, trials, write_grid

COLUMNS = ["structure", "dataset", "model", "target", "budget", "pruner", "schedule"]


def _runs(rows: list[tuple], seeds=(0, 1)) -> pd.DataFrame:
    """Final retrain rows as the analysis reads them: (structure, target, budget, pruner,
    schedule[, seeds]) on digits / resnet20, test accuracy 0.9."""
    out = []
    for row in rows:
        structure, target, budget, pruner, schedule, *own = row
        for seed in own[0] if own else seeds:
            out.append({
                "structure": structure, "dataset": "digits", "model": "resnet20",
                "target": target, "budget": budget, "pruner": pruner, "schedule": schedule,
                "variant": "", "seed": seed, "test_acc": 0.9,
                "stage_id": f"{pruner}/{target}/{schedule}/b{budget}/s{seed}",
            })  # fmt: skip
    return pd.DataFrame(out)


OK = _runs([
    ("structured", "ratio=0.5", 1, "l1_filter", "ft"),
    ("structured", "ratio=0.5", 1, "l1_filter", "lrw"),
    ("structured", "ratio=0.5", 1, "l1_filter", "clr"),
    ("structured", "ratio=0.5", 2, "l1_filter", "ft"),
    ("structured", "ratio=0.5", 2, "l1_filter", "lrw"),
    ("structured", "ratio=0.5", 2, "l1_filter", "clr"),
    ("structured", "ratio=0.5", 1, "random_filter", "ft"),
    ("structured", "ratio=0.5", 1, "random_filter", "clr"),  # no random_filter at budget 2
    ("unstructured", "ratio=0.9", 1, "magnitude", "ft"),
    ("unstructured", "ratio=0.9", 1, "magnitude", "clr"),
    ("unstructured", "ratio=0.9", 1, "magnitude", "lrw", (0,)),  # lrw − ft: one seed
    ("unstructured", "ratio=0.9", 1, "magnitude_layerwise", "ft"),
    ("unstructured", "ratio=0.9", 1, "magnitude_layerwise", "clr", (0,)),  # a cell short of a seed
    ("unstructured", "ratio=0.9", 1, "random", "ft"),
    ("unstructured", "ratio=0.9", 1, "random", "clr"),
])  # fmt: skip


def _tests(*names: tuple[str, str, str]) -> pd.DataFrame:
    return pd.DataFrame(names, columns=["claim", "structure", "comparison"])


def test_new_seeds_go_to_both_arms_of_the_open_tests_cells_only() -> None:
    open_ = _tests(
        ("claim 1", "unstructured", "clr − ft"),
        ("claim 2", "structured", "random_filter + clr − l1_filter + ft"),
    )
    got = arm_cells(OK, open_)[COLUMNS]
    expected = pd.DataFrame(
        [
            # claim 2, structured: l1_filter + ft against random_filter + clr where both ran
            # (budget 1); not random_filter + ft, nor budget 2, nor lrw
            ("structured", "digits", "resnet20", "ratio=0.5", 1, "l1_filter", "ft"),
            ("structured", "digits", "resnet20", "ratio=0.5", 1, "random_filter", "clr"),
            # claim 1 clr − ft, unstructured: both arms of each cell in both seeds; not
            # magnitude_layerwise, whose clr lacks seed 1, nor lrw
            ("unstructured", "digits", "resnet20", "ratio=0.9", 1, "magnitude", "clr"),
            ("unstructured", "digits", "resnet20", "ratio=0.9", 1, "magnitude", "ft"),
            ("unstructured", "digits", "resnet20", "ratio=0.9", 1, "random", "clr"),
            ("unstructured", "digits", "resnet20", "ratio=0.9", 1, "random", "ft"),
        ],
        columns=COLUMNS,
    )
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    structured_lrw = arm_cells(OK, _tests(("claim 1", "structured", "lrw − ft")))
    assert sorted(zip(structured_lrw["budget"], structured_lrw["schedule"], strict=True)) == [
        (1, "ft"), (1, "lrw"), (2, "ft"), (2, "lrw"),
    ]  # fmt: skip
    assert arm_cells(OK, _tests(("claim 1", "unstructured", "slr − ft"))).empty  # no such test


def _one_cell(diffs: dict[str, list[float]]) -> pd.DataFrame:
    """One structured cell: ft at 0.5 and each schedule at 0.5 + its per-seed difference."""
    rows = []
    n = len(next(iter(diffs.values())))
    for seed in range(n):
        rows.append(("ft", seed, 0.5))
        rows += [(sched, seed, 0.5 + d[seed]) for sched, d in diffs.items()]
    frame = _runs([("structured", "ratio=0.5", 1, "l1_filter", s, (seed,)) for s, seed, _ in rows])
    return frame.assign(test_acc=[acc for *_, acc in rows])


def test_a_look_decides_by_the_boundary_of_each_tests_holm_level() -> None:
    design = Design(first=4, max_seeds=5)
    clr = [0.10, 0.11, 0.12, 0.10]  # |t| = 22.5: decided at the first look
    lrw = [0.01, -0.01, 0.02, -0.02]  # |t| = 0: open
    first = take_look(_one_cell({"lrw": lrw, "clr": clr}), design, [])
    by = {t["comparison"]: t for t in first["tests"]}
    # the family of two: clr − ft is tested at alpha/2, rejects, and lifts lrw − ft to alpha;
    # at 4 of 5 seeds each may spend 2 - 2 Phi(z_{1 - level/2} / sqrt(0.8)) of its level
    expected = [("clr − ft", 0.025, "supported"), ("lrw − ft", 0.05, "inconclusive")]
    for name, level, verdict in expected:
        z = sps.norm.isf(level / 2) / math.sqrt(4 / 5)
        share = 2 * sps.norm.sf(z)
        assert share == pytest.approx(spent(0.8, level))
        assert by[name]["critical"] == pytest.approx(sps.t.isf(share / 2, 3))
        assert (by[name]["level"], by[name]["verdict"], by[name]["looks"]) == (level, verdict, [4])
    assert by["clr − ft"]["decided_at"] == 1 and by["lrw − ft"]["decided_at"] is None
    assert list(open_tests(first)["comparison"]) == ["lrw − ft"]
    json.dumps(first, allow_nan=False)  # strict JSON: looks.json
    # seed 4 for lrw and ft only: clr − ft keeps its first look; lrw − ft is looked at again
    runs = _one_cell({"lrw": [*lrw, 0.0], "clr": [*clr, 0.3]})
    runs = runs[~((runs["schedule"] == "clr") & (runs["seed"] == 4))]
    second = take_look(runs, design, [first])
    by_2 = {t["comparison"]: t for t in second["tests"]}
    assert by_2["clr − ft"] == by["clr − ft"]
    assert by_2["lrw − ft"]["seeds"] == 5 and by_2["lrw − ft"]["looks"] == [4, 5]
    assert by_2["lrw − ft"]["verdict"] == "inconclusive"


def _adaptive_grid(path: Path) -> Path:
    """Two claim-1 tests on one structured cell of digits (l1_filter at 0.7, budget 1, the
    tiny sweep's shared pre-training): clr − ft, a gain of about 25 points with a few points
    of seed sd, and lrw − ft, where lrw at budget 1 replays the recipe's last epoch, whose lr
    is ft's: the two arms train alike, so the difference is 0 at every seed and never
    decided."""
    return write_grid(
        path, name="adaptive", pruners=("{name: l1_filter, ratio: 0.7}",),
        schedules="[ft, lrw, clr]", budget="1", seeds="[0, 1, 2, 3]",
        extra="seeds: {pretrain: shared, shared_seed: 0}\n",
    )  # fmt: skip


@pytest.mark.slow
def test_until_conclusive_adds_seeds_only_to_the_open_test(
    tiny_sweep, ray_node, tmp_path: Path
) -> None:
    """Hand-worked: look 1 at 4 of at most 5 seeds decides clr − ft (|t| about 10 against
    5.44 at alpha/2), not lrw − ft (no difference), so seed 4 goes to the cell's lrw and ft
    runs only (2 retrains, nothing else); look 2, at 5 seeds, is the design's last: lrw − ft
    stays inconclusive. The report states the design, both looks and each run's seeds."""
    grid = _adaptive_grid(tmp_path / "adaptive.yaml")
    storage = tmp_path / "runs"
    seed_stages(tiny_sweep.storage, storage, grid)  # the shared pre-training
    result = sweep_on(ray_node, grid, storage, "--until-conclusive", "--max-seeds", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "look 1:" in result.stdout and "look 2:" in result.stdout
    rows = trials(storage, "adaptive")
    retrain = rows[rows["stage_kind"] == "retrain"]
    seeds = retrain.groupby("schedule")["seed"].agg(lambda s: sorted(s))
    assert seeds.to_dict() == {"clr": [0, 1, 2, 3], "ft": [0, 1, 2, 3, 4], "lrw": [0, 1, 2, 3, 4]}
    looks = json.loads((storage / "sweeps/adaptive/run/looks.json").read_text())
    assert looks["design"]["max_seeds"] == 5 and len(looks["looks"]) == 2
    first, last = looks["looks"]
    verdicts = {t["comparison"]: (t["verdict"], t["decided_at"]) for t in last["tests"]}
    assert verdicts == {"lrw − ft": ("inconclusive", None), "clr − ft": ("supported", 1)}
    assert (first["added"]["seeds"], first["added"]["runs"], "added" in last) == ([4], 2, False)
    added = first["added"]["trials"]
    assert sorted((t["pruner"], t["ratio"], t["schedule"], t["budget"]) for t in added) == [
        ("l1_filter", 0.7, "ft", 1), ("l1_filter", 0.7, "lrw", 1),
    ]  # fmt: skip
    # the design cannot change once it has looked
    other = cli_in_process(["sweep", str(grid), "--storage", str(storage), "--until-conclusive"])
    assert other.returncode == 2 and "has looked under another design" in other.stderr
    # the report a user asks for later reads the looks
    assert cli_in_process(["report", "adaptive", "--storage", str(storage)]).returncode == 0
    report = (storage / "sweeps/adaptive/report/report.md").read_text()
    assert "--until-conclusive" in report and "### Looks" in report
    assert "| 1 | 2 | 4 | claim 1 clr − ft (structured): supported | 4 | 2 |" in report
    assert "| 2 | 1 | 5 | – | – | 0 |" in report
    assert "| digits | resnet20 | structured | l1_filter | clr | 1 | 4 |" in report
    assert "| digits | resnet20 | structured | l1_filter | lrw | 1 | 5 |" in report


@pytest.mark.parametrize(
    ("args", "grid_extra", "message"),
    [
        (["--max-seeds", "5"], "", "--max-seeds and --seeds-per-look need --until-conclusive"),
        (["--until-conclusive", "--max-seeds", "3"], "", "between the grid's 4 seeds and 50"),
        # 12 trials + the 3 runs of the tests' arms (ft, lrw, clr) x 4 seeds more (K = 8)
        (["--until-conclusive"], "max_trials: 13\n", "may grow to 24 trials"),
        (["--until-conclusive"], "exclude: [{schedule: ft}]\n", "makes no confirmatory test"),
    ],
)
def test_until_conclusive_refuses_a_design_before_anything_runs(
    tmp_path: Path, args: list[str], grid_extra: str, message: str
) -> None:
    grid = _adaptive_grid(tmp_path / "adaptive.yaml")
    grid.write_text(grid.read_text() + grid_extra)
    storage = tmp_path / "runs"
    result = cli_in_process(["sweep", str(grid), "--storage", str(storage), *args])
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not storage.exists()
