"""A stage id holds exactly what determines the stage's output: each setting is changed in
turn, and the kinds whose ids change are those of a table written by hand (not derived from
`StageSpec.identity`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nptm.orchestrator.planner import build_plan
from nptm.search_spaces import GridError, load_grid
from nptm.trainables.models import build_model

BASE = """\
name: ids
pretrain: {epochs: 4, milestones: [2, 3]}
resources: {executor: inline}
axes:
  dataset: digits
  model: resnet20
  pruner: [{name: magnitude, ratio: 0.5}, {name: l1_filter, ratio: 0.5}]
  schedule: [ft, clr]
  budget: 2
  seed: 0
"""
ALL = {"pretrain", "prune", "retrain"}
DOWNSTREAM_OF_PRUNE = {"prune", "retrain"}

# (override, kinds whose stage ids change). A stage's id includes its parents' ids, so a
# change reaches every kind below the first stage it changes.
TRAINED = [
    # The pre-training recipe: what every stage downstream trains or is defined against.
    ("pretrain.lr=0.05", ALL),
    ("pretrain.weight_decay=0.001", ALL),
    ("pretrain.nesterov=false", ALL),
    ("pretrain.momentum=0.8", ALL),
    ("pretrain.batch_size=32", ALL),
    ("pretrain.epochs=5", ALL),
    # The data split and the seed.
    ("data.val_fraction=0.2", ALL),
    ("axes.seed=1", ALL),
    # Numerics of training (a prune stage runs no forward pass of its own precision, but its
    # parent changed).
    ("resources.precision=bf16", ALL),
    # The pruner and its target: the prune stage and what retrains it.
    ("axes.pruner[0].ratio=0.6", DOWNSTREAM_OF_PRUNE),
    ("axes.pruner[0].name=random", DOWNSTREAM_OF_PRUNE),
    ("axes.pruner[0].min_keep=0.01", DOWNSTREAM_OF_PRUNE),
    # The retraining alone.
    ("axes.budget=3", {"retrain"}),
    ("axes.schedule=[ft, lrw]", {"retrain"}),
    ("axes.overrides.lr=[0.05]", {"retrain"}),
    # Shared pre-training at the seed the trials already use: the same stages.
    ("seeds.pretrain=shared", set()),
    # Where and how stages run, and what the sweep is called: no stage changes.
    ("name=other", set()),
    ("max_trials=100", set()),
    ("data.download=true", set()),
    ("resources.executor=train", set()),
    ("resources.cpus_per_worker=0.5", set()),
    ("resources.max_concurrent=1", set()),
]


def _ids_by_kind(grid: Path, *overrides: str) -> dict[str, set[str]]:
    plan = build_plan(load_grid(grid, overrides))
    out: dict[str, set[str]] = {kind: set() for kind in ALL}
    for sid, spec in plan.stages.items():
        out[spec.kind.value].add(sid)
    return out


def _changed(grid: Path, *overrides: str, base: tuple[str, ...] = ()) -> set[str]:
    before, after = _ids_by_kind(grid, *base), _ids_by_kind(grid, *base, *overrides)
    return {kind for kind in ALL if before[kind] != after[kind]}


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ids") / "grid.yaml"
    path.write_text(BASE)
    return path


@pytest.mark.parametrize(("override", "changes"), TRAINED)
def test_each_setting_changes_exactly_the_stages_it_determines(
    grid: Path, override: str, changes: set[str]
) -> None:
    assert _changed(grid, override) == changes


def test_shared_pretraining_at_another_seed_changes_every_stage(grid: Path) -> None:
    assert _changed(grid, "seeds.pretrain=shared", "seeds.shared_seed=1") == ALL


# A shared pre-training with a random and a methodical pruner, seeds 0 and 1. A random pruner
# draws one mask per seed by default (`seeds.random_masks: per_seed`), so in this mode a seed
# is part of the random pruner's prune stage: (override, kinds whose ids change).
SHARED_BASE = ("seeds.pretrain=shared", "axes.pruner[0].name=random", "axes.seed=[0, 1]")
SHARED = [
    ("axes.seed=[0, 2]", DOWNSTREAM_OF_PRUNE),  # seed 2 draws a mask of its own
    ("seeds.random_masks=shared", DOWNSTREAM_OF_PRUNE),  # seed 1 retrains seed 0's mask
    ("seeds.shared_seed=1", ALL),
    ("axes.budget=3", {"retrain"}),
]


@pytest.mark.parametrize(("override", "changes"), SHARED)
def test_shared_pretraining_draws_a_random_mask_per_seed(
    grid: Path, override: str, changes: set[str]
) -> None:
    assert _changed(grid, override, base=SHARED_BASE) == changes


def test_one_shared_random_mask_makes_the_seed_a_retraining_setting(grid: Path) -> None:
    base = (*SHARED_BASE, "seeds.random_masks=shared")
    assert _changed(grid, "axes.seed=[0, 2]", base=base) == {"retrain"}
    by_kind = _ids_by_kind(grid, *base)
    assert len(by_kind["prune"]) == 2  # one per pruner target; per_seed: 3 (random x 2 seeds)
    assert len(_ids_by_kind(grid, *SHARED_BASE)["prune"]) == 3


def test_a_shared_random_mask_needs_a_shared_pretraining(grid: Path) -> None:
    with pytest.raises(GridError, match="random_masks: shared needs pretrain: shared"):
        load_grid(grid, ["seeds.random_masks=shared"])


@pytest.fixture(scope="module")
def from_file(tmp_path_factory) -> Path:
    """The grid pre-trained elsewhere: `pretrain.from` a state_dict file."""
    tmp = tmp_path_factory.mktemp("from")
    weights = tmp / "resnet20-digits.pt"
    torch.save(build_model("resnet20", "digits", seed=5).state_dict(), weights)
    path = tmp / "grid.yaml"
    path.write_text(
        BASE.replace("{epochs: 4,", f"{{from: {weights}, epochs: 4,").replace(
            "schedule: [ft, clr]", "schedule: [ft, lrw]"
        )
    )
    return path


# With `pretrain.from` the recipe states how the weights were trained, and every retraining
# schedule is defined against it: two grids that state different recipes for one file share
# no stage (the reported defect: weight decay and Nesterov were ignored, all stages reused).
FROM_FILE = [
    ("pretrain.weight_decay=0.001", ALL),
    ("pretrain.nesterov=false", ALL),
    ("pretrain.lr=0.05", ALL),
    ("axes.seed=1", DOWNSTREAM_OF_PRUNE),  # the file is the network, whatever the seed
    ("axes.budget=3", {"retrain"}),
    ("resources.cpus_per_worker=0.5", set()),
]


@pytest.mark.parametrize(("override", "changes"), FROM_FILE)
def test_weights_from_a_file_keep_the_recipe_in_the_ids(
    from_file: Path, override: str, changes: set[str]
) -> None:
    assert _changed(from_file, override) == changes


def test_other_bytes_in_the_weights_file_change_every_stage(from_file: Path) -> None:
    weights = next(from_file.parent.glob("*.pt"))
    other = from_file.parent / "other.pt"
    torch.save(build_model("resnet20", "digits", seed=6).state_dict(), other)
    moved = from_file.parent / "moved.yaml"
    moved.write_text(from_file.read_text().replace(str(weights), str(other)))
    assert not any(
        a & b
        for a, b in zip(_ids_by_kind(from_file).values(), _ids_by_kind(moved).values(), strict=True)
    )
