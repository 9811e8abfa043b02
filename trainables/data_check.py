"""Will the stages find their data? The check a sweep runs before its first stage, where the
stages will run (nptm.orchestrator.preflight), so that a missing or incomplete data root is one
message in seconds instead of every stage failing after its retries.

Each dataset entry names its own check (`nptm.trainables.catalog.DatasetInfo.check`):
`(info, root, download) -> None` when its loader will find the data under `root`, else a
sentence saying what is missing and how to get it. The built-in checks follow the loaders'
own path, cheaply: CIFAR's files with torchvision's checksums (what torchvision's constructor
verifies), ImageNet's `train/` and `val/` class folders as `ImageFolder` finds them, without
listing every image. A dataset without a check (digits, a generated plugin dataset) needs no
data root and is not checked.

Runs on the driver and, as a Ray task, on a cluster's nodes: torch-free, and torchvision is
imported only by the checks that read its datasets' definitions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from nptm.trainables.catalog import DATASETS, DatasetInfo
from nptm.trainables.registry import resolve

# How a user names the data root: what a message about it tells them to set.
ROOT_SETTINGS = "--data-root DIR, NPTM_DATA=DIR or the grid's data.root"
_LISTED = 3  # missing files named in a message; the rest are counted
# torchvision's CIFAR10/CIFAR100 base_folder and url, for messages that need no file read.
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def data_problems(
    datasets: Iterable[str],
    root: str | None,
    download: bool,
    plugins: Sequence[str] = (),
) -> list[str]:
    """One message per dataset of `datasets` whose loader would not find its data under
    `root` (with `download` as the grid's data.download); [] when every one would.

    `plugins`: the grid's plugin modules, imported first (on a cluster node the task that runs
    this may not have imported them yet).
    """
    from nptm.trainables.plugins import load_plugins

    load_plugins(plugins)
    problems = []
    for name in dict.fromkeys(datasets):
        problem = dataset_problem(DATASETS[name], root, download)
        if problem is not None:
            problems.append(problem)
    return problems


def dataset_problem(info: DatasetInfo, root: str | None, download: bool) -> str | None:
    """The message for one dataset, naming it, the root looked at and how to fix it; None if
    its data is there (or it needs none)."""
    if not info.check:
        return None
    try:
        problem = resolve(info.check)(info, root, download)
    except Exception as err:  # a plugin's check that breaks is reported, not raised
        problem = f"its check {info.check!r} failed: {type(err).__name__}: {err}"
    if problem is None:
        return None
    if root is None:
        return (
            f"dataset {info.name!r}: no data root was given; {problem}. Give one with "
            f"{ROOT_SETTINGS}"
        )
    return (
        f"dataset {info.name!r}, data root {root!r}: {problem}. Or point {ROOT_SETTINGS} at a "
        "root that holds it"
    )


def _directory_problem(root: str) -> str | None:
    if not os.path.exists(root):
        return "it does not exist"
    if not os.path.isdir(root):
        return "it is not a directory"
    return None


def _listing(paths: list[str]) -> str:
    shown = ", ".join(paths[:_LISTED])
    return shown if len(paths) <= _LISTED else f"{shown} and {len(paths) - _LISTED} more"


def check_cifar(info: DatasetInfo, root: str | None, download: bool) -> str | None:
    """CIFAR-10/100: the extracted python version (`cifar-10-batches-py/`, `cifar-100-python/`)
    whose every file passes torchvision's checksum, as torchvision's constructor checks it.
    With download, missing or damaged files are fine (the stages fetch them): only a root is
    needed. torchvision (seconds to import) is read only for a root that exists."""
    folder, url = _CIFAR[info.name]
    get = f"the data root must hold {folder}/, extracted from {url}" + (
        "" if download else " (or set data.download: true to download it there)"
    )
    if root is None:
        return get
    problem = _directory_problem(root)
    if problem is not None and not download:
        return f"{problem}; {get}"
    if download:
        return None  # torchvision downloads what is missing or fails its checksum
    from torchvision import datasets
    from torchvision.datasets.utils import check_integrity

    cls = datasets.CIFAR10 if info.name == "cifar10" else datasets.CIFAR100
    files = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    missing = [f"{folder}/{f}" for f, _ in files if not Path(root, folder, f).is_file()]
    if missing:
        return f"{_listing(missing)} {'is' if len(missing) == 1 else 'are'} missing; {get}"
    damaged = [
        f"{folder}/{f}" for f, md5 in files if not check_integrity(Path(root, folder, f), md5)
    ]
    if damaged:
        return (
            f"{_listing(damaged)} {'fails' if len(damaged) == 1 else 'fail'} torchvision's "
            f"checksum check (a partial or different file); delete {folder}/ and extract "
            f"{url} again"
        )
    return None


def check_imagenet(info: DatasetInfo, root: str | None, download: bool) -> str | None:
    """ImageNet: `train/` and `val/` with the same class folders, each holding at least one
    image, as `torchvision.datasets.ImageFolder` finds them (one scan of each folder, stopping
    at its first image: cheap even on a network file system)."""
    layout = (
        "the data root must hold train/ and val/ with one folder of images per class "
        "(train/n01440764/*.JPEG, ...)"
    )
    if download:
        return f"it cannot be downloaded (data.download: true): set data.download: false; {layout}"
    if root is None:
        return layout
    problem = _directory_problem(root)
    if problem is not None:
        return f"{problem}; {layout}"
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    classes = {}
    for part in ("train", "val"):
        path = Path(root, part)
        if not path.is_dir():
            return f"{part}/ is missing; {layout}"
        try:
            classes[part] = find_classes(path)[0]
        except FileNotFoundError:
            return f"{part}/ has no class folders; {layout}"
        empty = [c for c in classes[part] if not _has_image(path / c, IMG_EXTENSIONS)]
        if empty:
            verb = "holds" if len(empty) == 1 else "hold"
            return f"{_listing([f'{part}/{c}/' for c in empty])} {verb} no image; {layout}"
    if classes["train"] != classes["val"]:
        only = sorted(set(classes["train"]) ^ set(classes["val"]))
        return f"train/ and val/ have different class folders ({_listing(only)}); {layout}"
    return None


def _has_image(folder: Path, extensions: tuple[str, ...]) -> bool:
    """Whether `folder` (or a folder under it, as ImageFolder walks them) holds an image."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(extensions) for f in files):
            return True
    return False
