"""A stage id holds exactly what determines the stage's output: each setting is changed in
turn, and the kinds whose ids change are those of a table written by hand (not derived from
`StageSpec.identity`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nptm.orchestrator.planner import build_plan
from nptm.search_spaces import load_grid
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


def _changed(grid: Path, *overrides: str) -> set[str]:
    base, changed = _ids_by_kind(grid), _ids_by_kind(grid, *overrides)
    return {kind for kind in ALL if base[kind] != changed[kind]}


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
