"""Grid checks that run code (nptm.search_spaces.dry_run): a plugin function that does not fit
its kind's signature, and structured pruning that cannot prune a model, are refused by
`nptm validate` with exit 2; nptm's own models and pruners prune together."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from nptm.trainables import catalog, plugins, recipe, registry
from nptm.trainables.pruners.feasibility import structured_problem
from tests.sweep_helpers import cli_in_process

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nptm_example_plugin"

HEADER = """\
import torch
from torch import nn

from nptm.trainables import plugins
from nptm.trainables.catalog import DatasetInfo, ModelInfo, PrunerInfo, ScheduleInfo
from nptm.trainables.recipe import Recipe


class Residual(nn.Module):
    # stem -> conv1 -> conv2, and conv2's output is added to the stem's: they share channels.
    def __init__(self, c, k, out=None):
        super().__init__()
        self.stem = nn.Conv2d(c, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, out or k)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.conv2(torch.relu(self.conv1(x)))
        return self.head(x.mean((2, 3)))


def build(info, c, k):
    return Residual(c, k)


def block_internal(model):
    return ["conv1"]


def model(name, build="build", convs="block_internal"):
    plugins.register_model(
        ModelInfo(name, "test", 8, build=f"{__name__}:{build}",
                  prunable_convs=f"{__name__}:{convs}")
    )


def l1(model, names, batches, seed):
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().abs().sum((1, 2, 3)) for n in names}


def pruner(name, importance):
    plugins.register_pruner(PrunerInfo(name, True, False, importance=f"{__name__}:{importance}"))
"""

GRID = """\
name: dry
plugins: [{module}]
pretrain: {{epochs: 2, milestones: [1]}}
axes:
  dataset: {dataset}
  model: {model}
  pruner: [{{name: {pruner}, ratio: 0.5}}]
  schedule: [{schedule}]
  budget: 1
  seed: 0
"""


@pytest.fixture
def plugin_grid(tmp_path, monkeypatch):
    """Writes a plugin module (HEADER + `body`) and a grid naming it; the registries, the
    default recipes, sys.path and the imported modules are as before after the test."""
    for reg in plugins.ENTRY_POINT_GROUPS.values():
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))
    monkeypatch.setattr(registry, "_resolved", {})
    recipes = dict(recipe.DEFAULT_RECIPES)  # plugins.py holds the dict itself: restore in place
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(name: str, body: str | None, module: str | None = None, **axes: str) -> Path:
        """A grid `name`.yaml; with a `body`, of its own plugin module, else of `module`."""
        if body is not None:
            module = f"nptm_dry_{name}"
            (tmp_path / f"{module}.py").write_text(HEADER + textwrap.dedent(body))
            written.append(module)
        axes = {"dataset": "digits", "model": "resnet20", "pruner": "l1_filter",
                "schedule": "ft", **axes}  # fmt: skip
        grid = tmp_path / f"{name}.yaml"
        grid.write_text(GRID.format(module=module, **axes))
        return grid

    yield write
    recipe.DEFAULT_RECIPES.clear()
    recipe.DEFAULT_RECIPES.update(recipes)
    for module in [*written, *(m for m in sys.modules if m.startswith("nptm_example_plugin"))]:
        sys.modules.pop(module, None)


def validate(grid: Path):
    return cli_in_process(["validate", str(grid)])


# --- (b) plugin functions that do not fit their signature --------------------------------


@pytest.mark.parametrize(
    ("case", "body", "axes", "expected"),
    [
        (
            "build_args",
            """
            def build_two(info, c):
                return Residual(c, 10)
            model("two_args", build="build_two")
            """,
            {"model": "two_args"},
            [
                "axes.model: plugin model 'two_args': 'nptm_dry_build_args:build_two' must be "
                "build(info, in_channels, num_classes) -> nn.Module, but it cannot be called "
                "with the 3 arguments nptm passes: too many positional arguments",
            ],
        ),
        (
            "logits",
            """
            def build_seven(info, c, k):
                return Residual(c, k, out=7)
            model("seven", build="build_seven")
            """,
            {"model": "seven"},
            [
                "plugin model 'seven': 'nptm_dry_logits:build_seven' must be build(info, ",
                "on images of shape (2, 1, 8, 8) its model returns (2, 7), not (2, 10)",
            ],
        ),
        (
            "convs",
            """
            def head(model):
                return ["conv1", "head"]
            model("headed", convs="head")
            """,
            {"model": "headed"},
            [
                "plugin model 'headed': 'nptm_dry_convs:head' must be prunable_convs(model) -> "
                "[names of the model's Conv2d modules], but 'head' is no Conv2d of the model",
            ],
        ),
        (
            "importance_args",
            """
            def two(model, names):
                return {}
            pruner("two_filter", "two")
            """,
            {"pruner": "two_filter"},
            [
                "axes.pruner[0].name: plugin pruner 'two_filter': 'nptm_dry_importance_args:two'"
                " must be importance(model, conv_names, batches, seed) -> {conv name: one score "
                "per filter}, but it cannot be called with the 4 arguments nptm passes",
            ],
        ),
        (
            "scores",
            """
            def few(model, names, batches, seed):
                return {n: torch.ones(2) for n in names}
            pruner("few_filter", "few")
            """,
            {"pruner": "few_filter"},
            [
                "plugin pruner 'few_filter': 'nptm_dry_scores:few' must be importance(",
                "but conv 'layer1.0.conv1' has 16 filters and got scores of shape (2,)",
            ],
        ),
        (
            "schedule",
            """
            def flat(recipe, budget, steps):
                return [0.01] * (budget * steps)
            plugins.register_schedule(ScheduleInfo("flat", f"{__name__}:flat"))
            """,
            {"schedule": "flat"},
            [
                "axes.schedule[0]: plugin schedule 'flat': 'nptm_dry_schedule:flat' must be "
                "lr(recipe, budget, steps_per_epoch, peak) -> [lr of each of budget x "
                "steps_per_epoch steps], but it cannot be called with the 4 arguments",
            ],
        ),
        (
            "loader",
            """
            def load(info, root):
                raise AssertionError("a grid check never loads data")
            plugins.register_dataset(
                DatasetInfo("blobs", 1, 8, 10, 64, 16, (0.5,), (0.3,), True, flip=False,
                            crop_padding=1, loader=f"{__name__}:load"),
                Recipe(epochs=2, lr=0.05, milestones=(1,)),
            )
            """,
            {"dataset": "blobs"},
            [
                "axes.dataset: plugin dataset 'blobs': 'nptm_dry_loader:load' must be "
                "loader(info, root, download) -> (train, test) TensorSplits, but it cannot be "
                "called with the 3 arguments nptm passes",
            ],
        ),
    ],
)
def test_plugin_function_that_does_not_fit_is_refused(plugin_grid, case, body, axes, expected):
    result = validate(plugin_grid(case, body, **axes))
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("nptm validate: error: ") and f"{case}.yaml: " in result.stderr
    for fragment in expected:
        assert fragment in result.stderr, result.stderr


def test_fitting_plugins_and_the_example_package_validate(plugin_grid, monkeypatch, tmp_path):
    ok = plugin_grid("fits", 'model("fitting")\npruner("own_l1", "l1")\n', model="fitting")
    assert validate(ok).returncode == 0
    own = plugin_grid("own", None, "nptm_dry_fits", pruner="own_l1")  # on resnet20
    assert validate(own).returncode == 0
    monkeypatch.syspath_prepend(str(EXAMPLE))  # the fixture forgets the package afterwards
    grid = tmp_path / "stripes.yaml"
    grid.write_text(
        GRID.format(module="nptm_example_plugin", dataset="stripes", model="tiny_cnn",
                    pruner="l2_filter", schedule="ft")
    )  # fmt: skip
    result = validate(grid)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{grid}: ok (1 trials)\n"


# --- (c) structured pruning that cannot prune the model ------------------------------------


def test_pruning_residual_coupled_convs_is_refused_naming_the_layer(plugin_grid):
    body = """
    def with_conv2(model):
        return ["conv1", "conv2"]  # conv2 feeds the residual add: its channels are the stem's
    model("coupled", convs="with_conv2")
    model("internal")
    pruner("own_l1", "l1")
    """
    result = validate(plugin_grid("coupled", body, model="coupled"))
    assert result.returncode == 2
    assert (
        "coupled.yaml: axes.pruner[0].ratio: pruner 'l1_filter' (ratio 0.5) cannot prune model "
        "'coupled' built for 'digits': removed_channels['conv2'] would also remove output "
        "channels of ['stem'] (channels joined by a residual connection)" in result.stderr
    ), result.stderr
    assert "leave such convs out of the model's 'nptm_dry_coupled:with_conv2'" in result.stderr
    assert "remove it or exclude {model: coupled, pruner: l1_filter}" in result.stderr
    # A plugin pruner takes the same path.
    module = "nptm_dry_coupled"
    own = validate(plugin_grid("own", None, module, model="coupled", pruner="own_l1"))
    assert own.returncode == 2 and "pruner 'own_l1' (ratio 0.5) cannot prune" in own.stderr
    # The block-internal conv alone can go; unstructured pruning has no coupling to mind.
    assert validate(plugin_grid("internal", None, module, model="internal")).returncode == 0
    masked = plugin_grid("masked", None, module, model="coupled", pruner="magnitude")
    assert validate(masked).returncode == 0


@pytest.mark.parametrize(
    ("family", "presets"),
    [
        ("cifar", False),
        # Every preset of the 55- and 109-conv ResNets, and ImageNet-sized models (seconds
        # each, torchvision's import too): the slow tier.
        pytest.param("cifar", True, marks=pytest.mark.slow),
        pytest.param("torchvision", False, marks=pytest.mark.slow),
    ],
)
def test_every_builtin_model_prunes_with_the_builtin_pruners(family: str, presets: bool) -> None:
    """What the grid check takes on trust (dry_run._plugin_involved): each built-in model,
    at a ratio and at each of its presets, goes through the prune stage's surgery."""
    dataset = "imagenet" if family == "torchvision" else "cifar10"
    # Built-in models only: plugin models other tests registered in this process are not.
    names = [n for n, m in catalog.MODELS.items() if m.build.startswith("nptm.") and (
        (m.family == "torchvision") == (family == "torchvision"))]  # fmt: skip
    assert names
    for name in names:
        targets = [(None, p) for p in catalog.presets_of(name)] if presets else [(0.5, None)]
        for ratio, preset in targets:
            assert structured_problem(name, dataset, "l1_filter", ratio, preset) is None
