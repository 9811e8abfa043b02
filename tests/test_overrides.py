"""Command-line overrides (`nptm validate|plan|sweep GRID key.path=value ...`): YAML-typed,
nested, checked by the grid's own schema with its field-path errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nptm.orchestrator.cli import main, parse_args
from nptm.orchestrator.planner import build_plan
from nptm.search_spaces import GridError, load_grid
from tests.sweep_helpers import ROOT, write_grid

QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    return write_grid(tmp_path / "g.yaml", seeds="[0]", budget="[2]")


def test_values_are_yaml_typed_and_nested(grid: Path) -> None:
    checked = load_grid(
        grid,
        [
            "axes.seed=[0,1,2,3,4]",
            "resources.cpus_per_worker=0.25",
            "pretrain.digits.lr=0.05",  # a section the file does not have
            "axes.pruner[1].ratio=[0.3, 0.7]",  # an element of a list
            "data.download=true",
            "name=tiny-5seeds",
        ],
    )
    assert list(checked.grid.axes.seed) == [0, 1, 2, 3, 4]
    assert checked.resources.cpus_per_worker == 0.25
    assert checked.recipe("digits").lr == 0.05
    assert list(checked.grid.axes.pruner[1].ratio) == [0.3, 0.7]
    assert checked.grid.axes.pruner[0].name == "magnitude"  # the other entry untouched
    assert checked.data.download is True
    assert checked.name == "tiny-5seeds"
    assert checked.source == str(grid)
    assert checked.overrides[0] == "axes.seed=[0,1,2,3,4]" and len(checked.overrides) == 6


def test_a_later_override_wins_and_none_leaves_the_grid_as_the_file(grid: Path) -> None:
    assert load_grid(grid, ["axes.seed=[1]", "axes.seed=[7, 8]"]).grid.axes.seed == [7, 8]
    plain = load_grid(grid)
    assert plain.overrides == () and plain.grid == load_grid(grid, []).grid


def test_an_override_changes_the_plan_exactly_like_the_same_edit_in_the_file(
    grid: Path, tmp_path: Path
) -> None:
    edited = tmp_path / "edited.yaml"
    data = yaml.safe_load(grid.read_text())
    data["axes"]["seed"] = [0, 1, 2]
    edited.write_text(yaml.safe_dump(data))
    by_override = build_plan(load_grid(grid, ["axes.seed=[0,1,2]"]))
    by_edit = build_plan(load_grid(edited))
    assert list(by_override.stages) == list(by_edit.stages)  # the same stage ids, in order
    # 2 pruners x 3 schedules x 3 seeds retrains; per-trial seeds: 3 pre-trainings, 6 prunes.
    assert len(by_override.trials) == 18
    assert len(by_override.stages) == 3 + 6 + 18


@pytest.mark.parametrize(
    ("override", "field", "message"),
    [
        ("axes.sede=[0,1]", "axes.sede", "unknown key; did you mean 'seed'?"),
        ("resources.exector=inline", "resources.exector", "did you mean 'executor'?"),
        ("axes.seed=[-1]", "axes.seed[0]", "-1"),
        ("axes.seed", "override 'axes.seed'", "expected KEY.PATH=VALUE"),
        ("=3", "override '=3'", "expected KEY.PATH=VALUE"),
        (".axes.seed=1", "override '.axes.seed=1'", "is not a key path"),
        ("axes..seed=1", "override 'axes..seed=1'", "is not a key path"),
        ("[0]=1", "override '[0]=1'", "is not a key path"),
        ("name.first=x", "name", "is not a mapping; cannot set 'first'"),
        ("axes.seed[0].x=1", "axes.seed[0]", "is not a mapping"),
        ("axes.pruner[5].ratio=0.5", "axes.pruner[5]", "past the list's 2 entries"),
        ("axes.model[0]=resnet20", "axes.model", "is not a list"),
    ],
)
def test_mistakes_name_the_field(grid: Path, override: str, field: str, message: str) -> None:
    with pytest.raises(GridError) as err:
        load_grid(grid, [override])
    assert err.value.field == field
    assert message in str(err.value)
    assert str(err.value).startswith(str(grid))


@pytest.mark.parametrize(
    ("value", "message"),
    [("[0,", "invalid YAML"), ("!!python/object/apply:os.system [ls]", "is not allowed")],
)
def test_a_value_is_read_as_a_grid_is(grid: Path, value: str, message: str) -> None:
    with pytest.raises(GridError, match=message) as err:
        load_grid(grid, [f"axes.seed={value}"])
    assert "override axes.seed" in str(err.value)


def test_the_cli_takes_overrides_before_and_after_options(grid: Path, capsys) -> None:
    assert main(["plan", str(grid), "axes.seed=[0,1]", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert main(["plan", str(grid), "--json", "axes.seed=[0,1]"]) == 0
    assert json.loads(capsys.readouterr().out) == before
    assert before["trials"] == 2 * 6
    args = parse_args(["sweep", str(grid), "a=1", "--storage", "s3://b/x?k=v", "b.c[0]=2"])
    assert args.overrides == ["a=1", "b.c[0]=2"] and args.storage == "s3://b/x?k=v"


def test_the_cli_refuses_a_bad_override_with_exit_2(grid: Path, capsys) -> None:
    assert main(["validate", str(grid), "axes.sede=[0]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nptm validate: error: ")
    assert "axes.sede: unknown key; did you mean 'seed'?" in err
    # Commands that take no grid take no overrides: argparse's own refusal (exit 2).
    with pytest.raises(SystemExit) as exit_:
        main(["report", "quickstart", "axes.seed=[0]"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: axes.seed=[0]" in capsys.readouterr().err


def test_quickstart_with_two_seeds_plans_two_seeds(capsys) -> None:
    assert main(["plan", str(QUICKSTART), "axes.seed=[0,1]", "--json"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert main(["plan", str(QUICKSTART), "--json"]) == 0
    three = json.loads(capsys.readouterr().out)
    assert two["trials"] * 3 == three["trials"] * 2
