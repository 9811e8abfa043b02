"""An nptm plugin: the `tiny_cnn` model, the `stripes` dataset and the `l2_filter` pruner.

Importing this package registers all three (what a grid's `plugins:` key does); the entry
points of its pyproject.toml call the same functions.
"""

from nptm.trainables import plugins
from nptm.trainables.catalog import DatasetInfo, ModelInfo, PrunerInfo
from nptm.trainables.recipe import Recipe
from nptm_example_plugin.data import STRIPES_MEAN, STRIPES_STD, TEST_SIZE, TRAIN_SIZE

TINY_CNN = ModelInfo(
    name="tiny_cnn",
    family="example",
    min_image_size=8,  # one stride-2 conv, then global pooling
    build="nptm_example_plugin.models:build_tiny_cnn",
    prunable_convs="nptm_example_plugin.models:prunable_convs",
)
STRIPES = DatasetInfo(
    name="stripes",
    in_channels=1,
    image_size=12,
    num_classes=4,
    train_size=TRAIN_SIZE,
    test_size=TEST_SIZE,
    mean=STRIPES_MEAN,
    std=STRIPES_STD,
    in_memory=True,  # generated as uint8 tensors, held on the training device
    flip=False,  # a flip turns a "/" stripe into a "\" one: it changes the label
    crop_padding=1,
    loader="nptm_example_plugin.data:load_stripes",
)
STRIPES_RECIPE = Recipe(epochs=10, lr=0.05, milestones=(5, 8), batch_size=32)
L2_FILTER = PrunerInfo(
    name="l2_filter",
    structured=True,
    needs_data=False,
    importance="nptm_example_plugin.pruners:l2_importance",
)


def register_model() -> None:
    plugins.register_model(TINY_CNN)


def register_dataset() -> None:
    plugins.register_dataset(STRIPES, STRIPES_RECIPE)


def register_pruner() -> None:
    plugins.register_pruner(L2_FILTER)


register_model()
register_dataset()
register_pruner()
