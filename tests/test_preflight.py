"""A missing or incomplete data root is refused before the first stage (exit 2, nothing
written), by the check that runs where the stages will run (nptm.orchestrator.preflight,
nptm.trainables.data_check), and it agrees with the loaders it stands in for."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from torchvision import datasets as tv_datasets

from nptm.orchestrator.cluster import connect, disconnect
from nptm.orchestrator.errors import UsageError
from nptm.orchestrator.preflight import DataNeed, check_data_here, check_data_on_cluster
from nptm.trainables import data_check
from nptm.trainables.data_check import data_problems
from nptm.trainables.datasets import load_dataset
from tests.cifar_fixture import accept_checksums, write_cifar10
from tests.sweep_helpers import cli_in_process, restored_environ, write_grid

CIFAR10 = "cifar-10-batches-py"


@pytest.fixture
def cifar_grid(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.delenv("NPTM_DATA", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return write_grid(
        tmp_path / "c10.yaml", name="c10", datasets="cifar10",
        pruners=("{name: magnitude, ratio: 0.5}",), schedules="[ft]",
    )  # fmt: skip


def ray_sessions() -> set[Path]:
    return set((Path(os.environ["RAY_TMPDIR"]) / "ray").glob("session_2*"))


def test_sweep_without_data_is_refused_in_seconds_with_nothing_written(
    cifar_grid: Path, tmp_path: Path
) -> None:
    storage, before, started = tmp_path / "runs", ray_sessions(), time.time()
    result = cli_in_process(["sweep", str(cifar_grid), "--storage", str(storage)])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == (
        "nptm sweep: error: dataset 'cifar10': no data root was given; the data root must "
        f"hold {CIFAR10}/, extracted from https://www.cs.toronto.edu/~kriz/cifar-10-python."
        "tar.gz (or set data.download: true to download it there). Give one with --data-root "
        "DIR, NPTM_DATA=DIR or the grid's data.root\n"
    )
    empty = tmp_path / "data"
    empty.mkdir()
    result = cli_in_process(["sweep", str(cifar_grid), "--storage", str(storage)],
                            env={"NPTM_DATA": str(empty)})  # fmt: skip
    assert result.returncode == 2
    assert (
        f"dataset 'cifar10', data root '{empty}': {CIFAR10}/data_batch_1, {CIFAR10}/"
        f"data_batch_2, {CIFAR10}/data_batch_3 and 4 more are missing; the data root must hold"
    ) in result.stderr
    assert "Or point --data-root DIR, NPTM_DATA=DIR or the grid's data.root at a root" in (
        result.stderr
    )
    assert time.time() - started < 60  # measured: a few seconds, most of it imports
    assert not storage.exists()  # no storage root, run record or MLflow store
    assert ray_sessions() == before  # refused before a local Ray started


def test_validate_checks_a_data_root_it_is_given_here(cifar_grid: Path, tmp_path: Path) -> None:
    result = cli_in_process(["validate", str(cifar_grid)])  # no root anywhere: a note
    assert result.returncode == 0 and result.stdout == f"{cifar_grid}: ok (1 trials)\n"
    assert result.stderr.startswith("note: dataset 'cifar10': no data root was given;")
    assert result.stderr.endswith("; `nptm sweep` refuses to start without one\n")
    empty = str(tmp_path / "nowhere")
    result = cli_in_process(["validate", str(cifar_grid)], env={"NPTM_DATA": empty})
    assert result.returncode == 2
    assert f"nptm validate: error: dataset 'cifar10', data root '{empty}': it does not exist;" in (
        result.stderr
    )
    # The sweep will run on a cluster: there the data is checked when it starts.
    env = {"NPTM_DATA": empty, "RAY_ADDRESS": "127.0.0.1:6379"}
    assert cli_in_process(["validate", str(cifar_grid)], env=env).returncode == 0
    files = write_cifar10(tmp_path / "data", n_train=10, n_test=4)
    with accept_checksums(files):
        result = cli_in_process(["validate", str(cifar_grid)], env={"NPTM_DATA": str(files.root)})
    assert result.returncode == 0 and result.stderr == ""


def test_check_agrees_with_the_cifar_loader(tmp_path: Path) -> None:
    """For each state of a root, the check finds a problem exactly when the loader fails."""
    root = tmp_path / "data"
    folder = root / CIFAR10

    def agree(download: bool = False) -> list[str]:
        problems = data_problems(["cifar10"], str(root), download)
        try:
            load_dataset("cifar10", root, download=download)
            loads = True
        except (OSError, RuntimeError, ValueError):
            loads = False
        assert loads == (not problems), problems
        return problems

    assert "it does not exist" in agree()[0]
    files = write_cifar10(root, n_train=10, n_test=4)
    # Real files of another content: torchvision's own checksums refuse them.
    assert (
        f"{CIFAR10}/data_batch_1, {CIFAR10}/data_batch_2, {CIFAR10}/data_batch_3 and 4 more "
        "fail torchvision's checksum check"
    ) in agree()[0]
    with accept_checksums(files):
        assert agree() == []  # the fixture's root passes
        (folder / "test_batch").unlink()
        assert f"{CIFAR10}/test_batch is missing;" in agree()[0]
    assert data_problems(["cifar10"], None, True)  # a download needs a root to go to
    # The messages' names are torchvision's own.
    for name, cls in (("cifar10", tv_datasets.CIFAR10), ("cifar100", tv_datasets.CIFAR100)):
        assert data_check._CIFAR[name] == (cls.base_folder, cls.url)
    assert data_problems(["digits"], None, False) == []  # needs no root


def test_check_agrees_with_the_imagenet_loader(tmp_path: Path) -> None:
    def agree() -> list[str]:
        problems = data_problems(["imagenet"], str(tmp_path), False)
        try:
            load_dataset("imagenet", tmp_path)
            loads = True
        except (OSError, ValueError):
            loads = False
        assert loads == (not problems), problems
        return problems

    assert "train/ is missing;" in agree()[0]
    for part, classes in (("train", ("n01", "n02")), ("val", ("n01",))):
        for c in classes:
            (tmp_path / part / c).mkdir(parents=True)
            (tmp_path / part / c / "x.JPEG").write_bytes(b"")
    assert "train/ and val/ have different class folders (n02)" in agree()[0]
    (tmp_path / "val" / "n02").mkdir()
    assert "val/n02/ holds no image" in agree()[0]
    (tmp_path / "val" / "n02" / "y.png").write_bytes(b"")
    assert agree() == []
    assert "it cannot be downloaded" in data_problems(["imagenet"], str(tmp_path), True)[0]


@pytest.mark.slow
def test_cluster_check_runs_on_the_nodes_not_on_the_driver(
    cifar_grid: Path, tmp_path: Path, ray_node
) -> None:
    """This process accepts the fixture's checksums (accept_checksums patches torchvision here
    only); a node's worker process does not: the check that refuses them ran on the node."""
    files = write_cifar10(tmp_path / "data", n_train=10, n_test=4)
    need = DataNeed(("cifar10",), str(files.root), False, ())
    storage = tmp_path / "runs"
    with accept_checksums(files):
        check_data_here(need)  # passes here
        argv = ["sweep", str(cifar_grid), "--storage", str(storage), "--address",
                ray_node.address, "--data-root", str(files.root)]  # fmt: skip
        result = cli_in_process(argv)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("nptm sweep: error: on node 127.0.0.1: dataset 'cifar10', ")
    assert "fail torchvision's checksum check" in result.stderr
    assert not storage.exists()
    with restored_environ():
        connect(ray_node.address)
        try:  # the task wrapper alone: a root that holds nothing, one that may download
            with pytest.raises(UsageError, match=r"on node 127\.0\.0\.1: .*it does not exist"):
                check_data_on_cluster(DataNeed(("cifar10",), str(tmp_path / "none"), False, ()))
            check_data_on_cluster(DataNeed(("cifar10",), str(files.root), True, ()))
        finally:
            disconnect()
