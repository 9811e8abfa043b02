"""A plugin dataset whose loader fails in every stage while a marker file exists: what a
vanished network mount does to a sweep. Its error names a path that differs from stage to
stage (as a real one would: the shard, the process), so only a signature that ignores paths
and numbers sees one error.

`flaky_data_plugin(tmp_path)` writes the package, makes it importable (the sweep ships it to
Ray's workers: nptm.orchestrator.cluster.plugin_packages) and, on the way out, leaves the
registries, the default recipes and sys.modules as they were.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MODULE = "nptm_flaky_data"
DATASET = "flaky_digits"
ERROR = "Stale file handle"

_SOURCE = """\
import os
import uuid

import torch

from nptm.trainables import plugins
from nptm.trainables.catalog import DatasetInfo
from nptm.trainables.datasets import TensorSplit
from nptm.trainables.recipe import Recipe

BROKEN = {broken!r}  # while this file exists, every load fails


def load(_info, _root, _download):
    if os.path.exists(BROKEN):
        shard = f"/mnt/lab-nfs/digits/shard-{{os.getpid()}}-{{uuid.uuid4().hex[:8]}}.bin"
        raise OSError(116, "Stale file handle", shard)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (80, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.arange(80) % 4
    return TensorSplit(images[:64], labels[:64]), TensorSplit(images[64:], labels[64:])


plugins.register_dataset(
    DatasetInfo({dataset!r}, 1, 8, 4, 64, 16, (0.5,), (0.29,), True, flip=False,
                crop_padding=1, loader="{module}:load"),
    Recipe(epochs=1, lr=0.05, milestones=(), batch_size=16),
)
"""


@dataclass(frozen=True)
class FlakyPlugin:
    module: str
    dataset: str
    broken: Path  # remove it and the loader works

    def fix(self) -> None:
        self.broken.unlink()


@contextlib.contextmanager
def flaky_data_plugin(tmp_path: Path) -> Iterator[FlakyPlugin]:
    from nptm.trainables import catalog, recipe, registry

    broken = tmp_path / "nfs-is-down"
    broken.write_text("")
    package = tmp_path / "plugin" / MODULE
    package.mkdir(parents=True)
    source = _SOURCE.format(broken=str(broken), dataset=DATASET, module=MODULE)
    (package / "__init__.py").write_text(source)
    entries = dict(catalog.DATASETS._entries)
    recipes = dict(recipe.DEFAULT_RECIPES)
    sys.path.insert(0, str(package.parent))
    try:
        yield FlakyPlugin(MODULE, DATASET, broken)
    finally:
        sys.path.remove(str(package.parent))
        sys.modules.pop(MODULE, None)
        for ref in [r for r in registry._resolved if r.startswith(f"{MODULE}:")]:
            del registry._resolved[ref]  # the next test's module is another
        catalog.DATASETS._entries = entries
        recipe.DEFAULT_RECIPES.clear()
        recipe.DEFAULT_RECIPES.update(recipes)
