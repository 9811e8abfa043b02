"""Plugins: entry points of an installed distribution and a grid's `plugins:` modules register
into the built-ins' registries; the example package of docs/plugins.md runs a sweep on Ray."""

from __future__ import annotations

import json
import re
import shlex
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from nptm.orchestrator.planner import build_plan
from nptm.search_spaces import GridError, parse_grid
from nptm.trainables import catalog, plugins, recipe
from tests.sweep_helpers import cli_in_process, sweep_on, trials

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "nptm_example_plugin"
GUIDE = ROOT / "docs" / "plugins.md"
PLUGIN_MODULES = ("nptm_example_plugin", "fake_nptm_plugin")


@pytest.fixture
def isolated_plugins(monkeypatch):
    """Registries, default recipes and imported plugin modules as they were before the test,
    so what a test registers does not leak into the rest of the session."""
    for registry in plugins.ENTRY_POINT_GROUPS.values():
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    monkeypatch.setattr(plugins, "_loaded_entry_points", set())
    recipes = dict(recipe.DEFAULT_RECIPES)
    yield monkeypatch
    recipe.DEFAULT_RECIPES.clear()
    recipe.DEFAULT_RECIPES.update(recipes)
    for name in list(sys.modules):
        if name.split(".")[0] in PLUGIN_MODULES:
            del sys.modules[name]


@pytest.fixture
def example_on_path(isolated_plugins):
    """The example package importable, as `PYTHONPATH=examples/nptm_example_plugin` makes it."""
    isolated_plugins.syspath_prepend(str(EXAMPLE))
    return isolated_plugins


# --- entry points of an installed distribution ------------------------------------------------

FAKE_MODULE = """\
from torch import nn

from nptm.trainables import plugins
from nptm.trainables.catalog import ModelInfo, ScheduleInfo


def build(_info, in_channels, num_classes):
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 8 * 8, num_classes),
    )


def convs(model):
    return ["0"]


def constant_lr(recipe, budget, steps_per_epoch, peak):
    return [0.01] * (budget * steps_per_epoch)


def register_mlp():
    plugins.register_model(ModelInfo("fake_mlp", "fake", 8, build="fake_nptm_plugin:build",
                                     prunable_convs="fake_nptm_plugin:convs"))


def register_constant():
    plugins.register_schedule(ScheduleInfo("fake_constant", "fake_nptm_plugin:constant_lr"))


def register_nothing():
    pass


def broken():
    raise RuntimeError("cannot reach the lab's model zoo")
"""


def install_fake_distribution(site: Path, entry_points: str) -> None:
    """A distribution as pip leaves it in site-packages: the module and its .dist-info."""
    (site / "fake_nptm_plugin.py").write_text(FAKE_MODULE)
    info = site / "fake_nptm_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-nptm-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


GOOD_ENTRY_POINTS = """\
    [nptm.models]
    fake_mlp = fake_nptm_plugin:register_mlp

    [nptm.schedules]
    fake_constant = fake_nptm_plugin:register_constant
"""

GRID = """\
name: plugged
pretrain: {{epochs: 2, milestones: [1]}}
axes:
  dataset: digits
  model: {model}
  pruner: [{{name: l1_filter, ratio: 0.5}}]
  schedule: {schedule}
  budget: 1
  seed: 0
"""


def test_entry_points_register_into_the_builtin_registries(isolated_plugins, tmp_path):
    install_fake_distribution(tmp_path, GOOD_ENTRY_POINTS)
    isolated_plugins.syspath_prepend(str(tmp_path))
    assert "fake_mlp" not in catalog.MODELS

    called = plugins.load_entry_points()

    assert called == ["nptm.models:fake_mlp", "nptm.schedules:fake_constant"]
    assert plugins.load_entry_points() == []  # once per process
    assert catalog.MODELS["fake_mlp"].family == "fake"
    # The names are as good as built-in ones: a grid validates and plans with them.
    checked = parse_grid(yaml.safe_load(GRID.format(model="fake_mlp", schedule="fake_constant")))
    kinds = sorted(s.kind for s in build_plan(checked).stages.values())
    assert kinds == ["pretrain", "prune", "retrain"]
    from nptm.trainables.models import build_model
    from nptm.trainables.schedules import lr_schedule

    assert build_model("fake_mlp", "digits")(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    lrs = lr_schedule("fake_constant", budget=3, steps_per_epoch=5, recipe=checked.recipe("digits"))
    assert list(lrs) == [0.01] * 15


def test_unknown_name_offers_plugin_and_builtin_names(isolated_plugins, tmp_path):
    install_fake_distribution(tmp_path, GOOD_ENTRY_POINTS)
    isolated_plugins.syspath_prepend(str(tmp_path))
    (tmp_path / "grid.yaml").write_text(GRID.format(model="fake_mpl", schedule="ft"))
    # The grid check loads the installed entry points itself before it looks names up.
    result = cli_in_process(["plan", str(tmp_path / "grid.yaml")])
    assert result.returncode == 2
    assert "axes.model: 'fake_mpl' is not a known model; did you mean 'fake_mlp'?" in result.stderr
    with pytest.raises(GridError, match="did you mean 'mobilenet_v2'"):
        parse_grid(yaml.safe_load(GRID.format(model="mobilenetv2", schedule="ft")))
    with pytest.raises(GridError, match="did you mean 'fake_constant'"):
        parse_grid(yaml.safe_load(GRID.format(model="fake_mlp", schedule="fake_constnt")))


@pytest.mark.parametrize(
    ("entry_point", "message"),
    [
        (
            "[nptm.models]\nzoo = fake_nptm_plugin:broken\n",
            "entry point 'zoo' = 'fake_nptm_plugin:broken' of group 'nptm.models' failed: "
            "RuntimeError: cannot reach the lab's model zoo",
        ),
        (
            "[nptm.models]\nfake_cnn = fake_nptm_plugin:register_nothing\n",
            "registered no model named 'fake_cnn'",
        ),
        (
            "[nptm.models]\nfake_mlp = fake_nptm_plugin:no_such_function\n",
            "failed: AttributeError",
        ),
    ],
)
def test_a_bad_entry_point_is_named(isolated_plugins, tmp_path, entry_point, message):
    install_fake_distribution(tmp_path, entry_point)
    isolated_plugins.syspath_prepend(str(tmp_path))
    with pytest.raises(plugins.PluginError, match=re.escape(message)):
        plugins.load_entry_points()
    (tmp_path / "grid.yaml").write_text(GRID.format(model="resnet20", schedule="ft"))
    result = cli_in_process(["plan", str(tmp_path / "grid.yaml")])
    assert result.returncode == 2 and message in result.stderr


def test_a_plugin_cannot_take_a_builtin_name(isolated_plugins):
    resnet = catalog.MODELS["resnet20"]
    with pytest.raises(plugins.PluginError, match="model 'resnet20' is already registered"):
        plugins.register_model(catalog.ModelInfo("resnet20", "mine", 8, 0, "m:build", "m:convs"))
    plugins.register_model(resnet)  # the same entry again: nothing changes
    assert catalog.MODELS["resnet20"] is resnet
    with pytest.raises(plugins.PluginError, match="reserved for the built-in"):
        plugins.register_schedule(catalog.ScheduleInfo("my_rewind", "m:lr", rewinds=True))
    with pytest.raises(plugins.PluginError, match="reserved for the built-in"):
        plugins.register_schedule(catalog.ScheduleInfo("my_wr", "m:lr", rewinds_weights=True))


# --- a grid's plugins: key ---------------------------------------------------------------------


def test_plugins_key_imports_before_names_are_checked(example_on_path, tmp_path):
    data = yaml.safe_load(GRID.format(model="tiny_cnn", schedule="ft"))
    with pytest.raises(GridError, match="'tiny_cnn' is not a known model"):
        parse_grid(data)
    data["plugins"] = ["nptm_example_plugin"]
    assert parse_grid(data).plugins == ("nptm_example_plugin",)
    data["axes"]["model"] = "tiny_cn"
    with pytest.raises(GridError, match="did you mean 'tiny_cnn'"):
        parse_grid(data)


def test_plugin_import_error_names_the_entry(example_on_path, tmp_path):
    text = GRID.format(model="resnet20", schedule="ft")
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"plugins: [nptm_example_plugin, nptm_exampel_plugin]\n{text}")
    result = cli_in_process(["plan", str(grid)])
    assert result.returncode == 2
    assert (
        "plugins[1]: module 'nptm_exampel_plugin' cannot be imported: ModuleNotFoundError"
        in result.stderr
    )
    grid.write_text(f"plugins: [nptm_example_plugin, nptm_example_plugin]\n{text}")
    result = cli_in_process(["plan", str(grid)])
    assert result.returncode == 2 and "plugins[1]: 'nptm_example_plugin' is listed twice" in (
        result.stderr
    )


# --- the example package and its guide ----------------------------------------------------------


def guide_files() -> dict[str, str]:
    """Each "File `PATH`:" code block of the guide, by PATH."""
    blocks = re.findall(r"File `([^`]+)`:\n\n```\w+\n(.*?)```\n", GUIDE.read_text(), re.S)
    return dict(blocks)


def guide_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", GUIDE.read_text(), re.S | re.M)


def test_guide_shows_the_example_package_file_by_file():
    files = guide_files()
    shipped = {
        str(p.relative_to(EXAMPLE)): p.read_text()
        for p in EXAMPLE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert files == shipped


def test_guide_grid_and_commands_work_as_written(example_on_path, tmp_path):
    grid = next(b for b in guide_blocks("yaml") if "axes:" in b)
    checked = parse_grid(yaml.safe_load(grid), "stripes.yaml")
    # One pre-training, one prune per pruner, one ft retrain per pruned network.
    kinds = sorted(s.kind for s in build_plan(checked).stages.values())
    assert kinds == ["pretrain", "prune", "prune", "retrain", "retrain"]
    (tmp_path / "stripes.yaml").write_text(grid)
    example_on_path.chdir(tmp_path)
    commands = [line for b in guide_blocks("sh") for line in b.splitlines() if " nptm " in line]
    results = {}
    for command in commands:
        env, nptm, *argv = shlex.split(command)
        # The fixture put the example on sys.path, as this PYTHONPATH does for a fresh process.
        assert (env, nptm) == ("PYTHONPATH=examples/nptm_example_plugin", "nptm")
        results[argv[0]] = cli_in_process([*argv, "--json"])
        assert results[argv[0]].returncode == 0, results[argv[0]].stderr
    assert sorted(results) == ["inspect", "plan"]
    assert json.loads(results["plan"].stdout)["stages"] == {"pretrain": 1, "prune": 2, "retrain": 2}
    inspected = json.loads(results["inspect"].stdout)

    # tiny_cnn on 1x12x12 inputs, 4 classes; convs 16 -> 32 -> 32 filters (3x3, no bias), a BN
    # (2 params per channel) after each, a 32 -> 4 linear. ratio 0.5 halves every conv.
    def params(w: int) -> int:
        return 1 * w * 9 + 2 * w + w * 2 * w * 9 + 4 * w + 2 * w * 2 * w * 9 + 4 * w + 2 * w * 4 + 4

    assert inspected["base"]["params"] == params(16) == 14_260
    assert inspected["pruned"]["params"] == params(8)


def test_l2_filter_removes_the_filters_of_smallest_norm(example_on_path):
    from nptm_example_plugin.pruners import l2_importance

    conv = torch.nn.Conv2d(1, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, -0.5, 1.0]).view(3, 1, 1, 1))
    model = torch.nn.Sequential(conv)
    assert l2_importance(model, ["0"])["0"].tolist() == [3.0, 0.5, 1.0]


@pytest.mark.slow
def test_example_plugin_sweeps_on_ray_workers(example_on_path, ray_node, tmp_path):
    """The guide's grid on a running Ray node that was started without the plugin on its path:
    the sweep ships the package (runtime_env py_modules) and every stage, run in a Ray
    worker process, builds tiny_cnn on stripes."""
    grid = tmp_path / "stripes.yaml"
    grid.write_text(next(b for b in guide_blocks("yaml") if "axes:" in b))
    result = sweep_on(ray_node, grid, tmp_path / "store")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = trials(tmp_path / "store", "stripes-demo")
    assert sorted(rows["stage_kind"]) == ["pretrain", "prune", "prune", "retrain", "retrain"]
    assert set(rows["status"]) == {"ok"}
    assert set(rows["model"]) == {"tiny_cnn"} and set(rows["dataset"]) == {"stripes"}
    assert set(rows.loc[rows["stage_kind"] == "prune", "pruner"]) == {"l2_filter", "magnitude"}
    # `node` is the Ray node id of the worker that ran the stage (not this driver's host).
    assert all(re.fullmatch(r"[0-9a-f]{56}", node) for node in rows["node"])
