"""Random masks under a shared pre-training (`seeds.random_masks`): one mask per seed by
default, as rerunning the authors' scripts draws, or one shared mask; and the report's
sentence on what a seed replicates, read from the stages a sweep shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from nptm.orchestrator.planner import build_plan
from nptm.results.analysis import final_round_retrain, seed_replication
from nptm.results.power import plan_stages
from nptm.search_spaces import load_grid

GRID = """\
name: masks
pretrain: {epochs: 4, milestones: [2, 3]}
seeds: {pretrain: shared, shared_seed: 5}
axes:
  dataset: digits
  model: resnet20
  pruner:
    - {name: magnitude, ratio: 0.5}
    - {name: random, ratio: 0.5}
    - {name: l1_filter, ratio: 0.5}
    - {name: random_filter, ratio: 0.5}
  schedule: [ft, clr]
  budget: 2
  seed: [0, 1, 2]
"""


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("masks") / "grid.yaml"
    path.write_text(GRID)
    return path


def _prunes(grid: Path, *overrides: str) -> set[tuple[str, int, int | None]]:
    plan = build_plan(load_grid(grid, overrides))
    return {
        (s.pruner, s.seed, s.split_seed) for s in plan.stages.values() if s.kind.value == "prune"
    }


def test_random_pruners_draw_a_mask_per_seed_on_the_shared_network(grid: Path) -> None:
    # the methodical pruners prune the shared network once, with its seed; each random pruner
    # prunes it once per retraining seed, on the shared network's split (split_seed 5)
    assert _prunes(grid) == {
        ("magnitude", 5, None),
        ("l1_filter", 5, None),
        *((p, s, 5) for p in ("random", "random_filter") for s in (0, 1, 2)),
    }
    one_mask = {(p, 5, None) for p in ("magnitude", "random", "l1_filter", "random_filter")}
    assert _prunes(grid, "seeds.random_masks=shared") == one_mask


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ((), "a random pruner draws its mask per seed (`seeds.random_masks: per_seed`)"),
        (("seeds.random_masks=shared",), "one mask per random pruner target too"),
        (("seeds.pretrain=per_trial",), "each seed pre-trains, prunes and retrains its own"),
        (
            ("axes.pruner=[{name: magnitude, ratio: 0.5}]",),
            "an interval covers retraining, conditional on the pre-trained networks and the "
            "methodical masks",
        ),
        (("axes.seed=[0]",), "one seed: no interval"),
    ],
)
def test_the_report_says_what_a_seed_replicates(grid: Path, overrides, says: str) -> None:
    stages = plan_stages(build_plan(load_grid(grid, overrides)))
    assert says in seed_replication(stages, final_round_retrain(stages))
