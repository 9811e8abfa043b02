"""Grid files: the shipped grids validate, and every malformed grid is refused with its field."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from nptm.search_spaces import CheckedGrid, Grid, GridError, load_grid, parse_grid
from nptm.search_spaces import loader as loader_module
from nptm.trainables import schedules
from nptm.trainables.recipe import DEFAULT_RECIPES

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))
MALFORMED = sorted((Path(__file__).parent / "malformed_grids").glob("*.yaml"))

MINIMAL = """\
name: ok
axes:
  dataset: [digits]
  model: [resnet20]
  pruner:
    - {name: magnitude, ratio: [0.5, 0.9]}
    - {name: l1_filter, ratio: 0.5}
  schedule: [ft, lrw, wr]
  budget: [10]
  seed: [0]
"""


def write(tmp_path: Path, text: str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def expectation(path: Path) -> tuple[str, str]:
    """The `# expect-field:` / `# expect-value:` header of a corpus file."""
    meta = {}
    for line in path.read_text().splitlines()[:2]:
        key, _, value = line.removeprefix("# ").partition(": ")
        meta[key] = value
    return meta["expect-field"], meta["expect-value"]


def test_corpus_is_large_enough() -> None:
    assert len(MALFORMED) >= 20
    # every file declares what it expects
    for path in MALFORMED:
        field, value = expectation(path)
        assert field and value, path


@pytest.mark.parametrize("path", MALFORMED, ids=lambda p: p.stem)
def test_malformed_grid_names_field_and_value(path: Path) -> None:
    from nptm.orchestrator.planner import build_plan

    field, value = expectation(path)
    with pytest.raises(GridError) as info:
        build_plan(load_grid(path))  # max_trials is checked when planning
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert field in message, message
    assert value in message, message
    # translated, never pydantic's raw report
    assert "validation error" not in message.lower()
    assert "errors.pydantic.dev" not in message
    assert "Traceback" not in message


def test_python_object_tag_is_refused_and_nothing_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    monkeypatch.chdir(tmp_path)
    source = Path(__file__).parent / "malformed_grids" / "python_object_tag.yaml"
    path = write(tmp_path, source.read_text())
    with pytest.raises(GridError, match=r"tag '!!python/object/apply:os.system'"):
        load_grid(path)
    assert calls == []
    assert not (tmp_path / "nptm-pwned-marker").exists()


@pytest.mark.parametrize(
    "text",
    [
        "name: !!python/name:os.system\n",
        "name: x\naxes: !custom {dataset: [digits]}\n",
        "name: !!binary aGVsbG8=\n",
    ],
)
def test_other_non_core_tags_are_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(GridError, match="is not allowed: a grid is plain YAML"):
        load_grid(write(tmp_path, text))


def test_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    with pytest.raises(GridError, match="YAML nodes"):
        load_grid(write(tmp_path, "\n".join(lines) + "\n"))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(GridError) as info:
        load_grid(path)
    assert str(info.value) == f"{path}: no such file"


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(GridError, match=r"grid.yaml: is empty"):
        load_grid(write(tmp_path, "# nothing here\n"))


def test_grid_error_is_a_value_error_with_field() -> None:
    assert issubclass(GridError, ValueError)
    assert loader_module.GridError is GridError
    with pytest.raises(GridError) as info:
        parse_grid({"name": "ok", "axes": {}}, "mem.yaml")
    assert info.value.field.startswith("axes.")
    assert str(info.value).startswith("mem.yaml: axes.")


def test_several_shape_errors_are_all_reported(tmp_path: Path) -> None:
    text = MINIMAL + "resources: {exector: train, cpus_per_worker: 0}\n"
    with pytest.raises(GridError) as info:
        load_grid(write(tmp_path, text))
    lines = str(info.value).splitlines()
    assert any("resources.exector: unknown key; did you mean 'executor'?" in x for x in lines)
    assert any("resources.cpus_per_worker: 0 should be greater than 0" in x for x in lines)
    assert all(line.startswith(f"{tmp_path / 'grid.yaml'}: ") for line in lines)


def test_minimal_grid_defaults(tmp_path: Path) -> None:
    grid = load_grid(write(tmp_path, MINIMAL))
    assert grid.name == "ok"
    assert grid.max_trials == 5000
    assert grid.data.val_fraction == 0.0  # the paper trains on the whole training set
    assert grid.resources.executor == "train"  # Ray Train unless a grid says otherwise
    assert grid.rounds == 1
    assert grid.source == str(tmp_path / "grid.yaml")


def test_checks_return_a_checked_grid_and_leave_the_parsed_one_alone(tmp_path: Path) -> None:
    checked = load_grid(write(tmp_path, MINIMAL))
    assert isinstance(checked, CheckedGrid) and isinstance(checked.grid, Grid)
    assert not checked.grid.__pydantic_private__  # nothing written onto the frozen grid
    assert checked.recipe("digits") == DEFAULT_RECIPES["digits"]
    assert checked.space.count() == 3 * 3 and checked.includes == ()  # targets x schedules


def test_lr_override_is_checked_without_computing_a_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_schedule(*args: object, **kwargs: object) -> None:
        raise AssertionError("validating an override computed a schedule")

    monkeypatch.setattr(schedules, "lr_schedule", no_schedule)
    text = MINIMAL.replace("seed: [0]", "seed: [0]\n  overrides: {lr: [0.05, 1]}")
    checked = load_grid(write(tmp_path, text))
    assert checked.space.dims[-1].values == (0.05, 1.0)  # ints become floats
    with pytest.raises(GridError, match=r"axes\.overrides\.lr\[1\]: -0\.1 is not a valid lr"):
        load_grid(write(tmp_path, text.replace("[0.05, 1]", "[0.05, -0.1]"), "b.yaml"))


def test_scalar_axis_means_one_value(tmp_path: Path) -> None:
    a = load_grid(write(tmp_path, MINIMAL, "a.yaml"))
    b = load_grid(
        write(tmp_path, MINIMAL.replace("[digits]", "digits").replace("[0]", "0"), "b.yaml")
    )
    assert a.grid.axes == b.grid.axes


def test_pretrain_common_and_per_dataset_overrides(tmp_path: Path) -> None:
    text = MINIMAL.replace("dataset: [digits]", "dataset: [digits, cifar10]") + textwrap.dedent(
        """\
        pretrain:
          weight_decay: 0.001
          cifar10: {lr: 0.05, epochs: 100, milestones: [50, 75]}
        """
    )
    grid = load_grid(write(tmp_path, text))
    digits, cifar = grid.recipe("digits"), grid.recipe("cifar10")
    assert (digits.epochs, digits.lr, digits.weight_decay) == (30, 0.1, 0.001)
    assert (cifar.epochs, cifar.lr, cifar.milestones, cifar.weight_decay) == (
        100,
        0.05,
        (50, 75),
        0.001,
    )


def test_pretrain_unknown_dataset_section_key(tmp_path: Path) -> None:
    text = MINIMAL + "pretrain:\n  digits: {epoch: 10}\n"
    with pytest.raises(
        GridError,
        match=r"pretrain\.digits\.epoch: unknown key; did you mean "
        r"'epochs'\?",
    ):
        load_grid(write(tmp_path, text))


def test_exclude_makes_a_partial_preset_grid_valid(tmp_path: Path) -> None:
    text = """\
    name: pfec
    axes:
      dataset: cifar10
      model: [resnet56, vgg16]
      pruner: [{name: l1_filter, preset: [A, D]}]
      schedule: [ft]
      budget: [40]
      seed: [0]
    """
    with pytest.raises(GridError, match=r"axes\.pruner\[0\]\.preset\[1\]: 'D'"):
        load_grid(write(tmp_path, text))
    load_grid(write(tmp_path, text + "exclude: [{model: vgg16, preset: D}]\n"))


def test_rewind_budget_can_be_excluded(tmp_path: Path) -> None:
    text = MINIMAL.replace("budget: [10]", "budget: [10, 40]")
    with pytest.raises(GridError, match=r"axes\.budget\[1\]: 40 is more than the 30"):
        load_grid(write(tmp_path, text))
    # ft may retrain longer than pre-training; only lrw/wr replay it
    load_grid(
        write(
            tmp_path,
            text + "exclude:\n  - {schedule: lrw, budget: 40}\n  - {schedule: wr, budget: 40}\n",
        )
    )


def test_include_is_checked_like_the_axes(tmp_path: Path) -> None:
    inc = (
        "include:\n  - {dataset: digits, model: resnet20, pruner: random, ratio: 0.9, "
        "schedule: wr, budget: 45, seed: 0}\n"
    )
    with pytest.raises(GridError, match=r"include\[0\]\.budget: 45 is more than the 30"):
        load_grid(write(tmp_path, MINIMAL + inc))
    with pytest.raises(GridError, match=r"include\[0\]\.model: 'vgg16' cannot train on dataset"):
        load_grid(write(tmp_path, MINIMAL + inc.replace("resnet20", "vgg16")))


def test_exclude_rule_must_not_be_empty_or_match_nothing(tmp_path: Path) -> None:
    with pytest.raises(GridError, match=r"exclude\[0\]: \{\} is an empty rule"):
        load_grid(write(tmp_path, MINIMAL + "exclude: [{}]\n"))
    with pytest.raises(GridError, match=r"exclude\[0\]: no pruner entry"):
        load_grid(write(tmp_path, MINIMAL + "exclude: [{pruner: l1_filter, ratio: 0.9}]\n"))
    with pytest.raises(
        GridError,
        match=r"exclude\[0\]\.seed: \[0, 1\] matches no trial.*one "
        r"rule per value",
    ):
        load_grid(write(tmp_path, MINIMAL + "exclude: [{seed: [0, 1]}]\n"))


def test_excluding_everything_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(GridError, match=r"exclude: the exclude rules remove every trial"):
        load_grid(write(tmp_path, MINIMAL + "exclude: [{seed: 0}]\n"))


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    with pytest.raises(GridError, match=r"axes\.seed\[0\]: True should be a valid integer"):
        load_grid(write(tmp_path, MINIMAL.replace("seed: [0]", "seed: [true]")))


def test_nan_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("ratio: 0.5}", "ratio: .nan}")
    with pytest.raises(GridError, match=r"axes\.pruner\[1\]\.ratio: nan should be a finite"):
        load_grid(write(tmp_path, text))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_grid_validates_and_plans(path: Path) -> None:
    from nptm.orchestrator.planner import build_plan

    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), "every shipped grid starts with a comment saying its study"
    grid = load_grid(path)
    assert grid.name == path.stem  # the sweep directory matches the file name
    plan = build_plan(grid)
    summary = plan.summary()
    assert summary["trials"] == len(plan.trials) > 0
    assert summary["epochs"]["planned"] <= summary["epochs"]["naive"]


def test_shipped_grid_set() -> None:
    names = {p.stem for p in SHIPPED}
    assert {
        "quickstart",
        "paper_cifar_pfec",
        "paper_cifar_cd",
        "paper_cifar_unstructured",
        "paper_cifar100",
        "paper_cifar100_filters",
        "paper_hrank_taylor",
        "paper_imagenet_resnet50",
    } <= names
    assert load_grid(ROOT / "search_spaces" / "quickstart.yaml").resources.executor == "inline"
    for name in names - {"quickstart"}:
        grid = load_grid(ROOT / "search_spaces" / f"{name}.yaml")
        assert grid.resources.executor == "train"
        assert grid.resources.gpus_per_worker > 0
        # the paper's protocol: one shared pre-training per model; no hold-out except in the
        # appendix's validation-split grid
        assert grid.seeds.pretrain == "shared", name
        assert (grid.data.val_fraction > 0) == (name == "paper_cifar_valsplit"), name


@pytest.mark.parametrize(
    ("executor", "workers", "gpus", "refused"),
    [
        ("train", 2, 0.5, True),  # two ranks of one trial may land on one GPU: NCCL refuses
        ("train", 4, 0.25, True),
        ("train", 2, 1, False),
        ("train", 2, 0, False),  # CPU: gloo ranks may share a node
        ("train", 1, 0.25, False),  # one rank per trial: packing trials is fine
        ("inline", 1, 0.25, False),
    ],
)
def test_fractional_gpu_with_several_ddp_workers(
    executor: str, workers: int, gpus: float, refused: bool
) -> None:
    raw = {
        "name": "ok",
        "resources": {
            "executor": executor, "workers_per_trial": workers, "gpus_per_worker": gpus,
        },
        "axes": {"dataset": "digits", "model": "resnet20",
                 "pruner": [{"name": "magnitude", "ratio": 0.5}], "schedule": "ft",
                 "budget": 1, "seed": 0},
    }  # fmt: skip
    if not refused:
        assert parse_grid(raw).resources.gpus_per_worker == gpus
        return
    with pytest.raises(GridError) as info:
        parse_grid(raw)
    message = str(info.value)
    assert "resources.gpus_per_worker" in message
    assert f"{gpus} (a fraction of a GPU) with workers_per_trial {workers}" in message


def test_unstructured_pruner_options_on_the_entry(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "- {name: magnitude, ratio: [0.5, 0.9]}",
        "- {name: magnitude, ratio: [0.5, 0.9], layers: conv+linear, min_keep: 0.005}",
    )
    grid = load_grid(write(tmp_path, text))
    pruner = grid.grid.axes.pruner[0]
    assert pruner.layers == "conv+linear" and pruner.min_keep == 0.005


@pytest.mark.parametrize(
    ("entry", "field", "message"),
    [
        (
            "{name: l1_filter, ratio: 0.5, layers: conv}",
            "axes.pruner[1].layers",
            "takes no options",
        ),
        ("{name: random, ratio: 0.5, layers: fc}", "axes.pruner[1].layers", "'fc' is not one of"),
        ("{name: random, ratio: 0.5, min_keep: 1.5}", "axes.pruner[1].min_keep", "less than 1"),
        ("{name: taylor, ratio: 0.5}", "axes.pruner[1].name", "renamed 'taylor_conv_oneshot'"),
    ],
)
def test_bad_pruner_options_and_retired_names(
    tmp_path: Path, entry: str, field: str, message: str
) -> None:
    text = MINIMAL.replace("- {name: l1_filter, ratio: 0.5}", "- " + entry)
    with pytest.raises(GridError) as info:
        load_grid(write(tmp_path, text))
    assert info.value.field == field
    assert message in str(info.value)


def test_registry_names_close_matches_and_retired_names() -> None:
    from nptm.trainables.registry import Registry, UnknownName

    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1)
    reg.register("beta", 2)
    assert reg["alpha"] == 1 and "beta" in reg and list(reg) == ["alpha", "beta"]
    with pytest.raises(UnknownName, match="unknown widget 'alpah'; did you mean 'alpha'"):
        reg["alpah"]
    with pytest.raises(KeyError, match="unknown widget 'zzz'; known: alpha, beta"):
        reg["zzz"]
    reg.retire("gamma", "was renamed 'beta'")
    with pytest.raises(UnknownName, match="widget 'gamma' was renamed 'beta'"):
        reg["gamma"]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha", 3)


def test_grid_validation_consults_the_model_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model registered the way built-ins are (an import path to its builder) is a valid
    grid value at once: what a plugin will do."""
    from nptm.trainables.catalog import MODELS, ModelInfo

    text = MINIMAL.replace("model: [resnet20]", "model: [tiny_resnet]")
    with pytest.raises(GridError, match="'tiny_resnet' is not a known model"):
        load_grid(write(tmp_path, text))
    info = ModelInfo(
        "tiny_resnet", "cifar_resnet", 4, 8, "nptm.trainables.models:build_cifar_resnet",
        "nptm.trainables.models:basic_block_convs",
    )  # fmt: skip
    monkeypatch.setitem(MODELS._entries, "tiny_resnet", info)
    load_grid(write(tmp_path, text))
    from nptm.trainables.models import build_model

    assert build_model("tiny_resnet", "digits").layer1[0].conv1.out_channels == 16
