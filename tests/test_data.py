"""Datasets (real torchvision/scikit-learn loaders on fixture files) and the batch loaders."""

from __future__ import annotations

import os
import pickle
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import datasets as tv_datasets

from nptm.trainables.catalog import DATASETS
from nptm.trainables.datasets import download_lock_path, load_dataset, split_indices
from nptm.trainables.loaders import InMemoryLoader, crop_flip, make_loaders, order_seed
from tests.cifar_fixture import accept_checksums, write_cifar10, write_cifar100

CIFAR_INFO = DATASETS["cifar10"]


def _chw(images_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_hwc).permute(0, 3, 1, 2)


def _reference_normalize(img_u8: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """One image, one channel at a time."""
    out = torch.empty(img_u8.shape, dtype=torch.float32)
    for c in range(img_u8.shape[0]):
        out[c] = (img_u8[c].float() / 255 - mean[c]) / std[c]
    return out


# ------------------------------------------------------------------------------- CIFAR files


@pytest.mark.parametrize("writer", [write_cifar10, write_cifar100])
def test_cifar_loads_through_torchvision(tmp_path: Path, writer) -> None:
    files = writer(tmp_path, n_train=23, n_test=7)
    with accept_checksums(files):
        bundle = load_dataset(files.dataset, tmp_path)
    assert bundle.info is DATASETS[files.dataset] and bundle.in_memory and bundle.val is None
    for split, images, labels in (
        (bundle.train, files.train_images, files.train_labels),
        (bundle.test, files.test_images, files.test_labels),
    ):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape == (len(labels), 3, 32, 32)
        assert torch.equal(split.images, _chw(images))  # every pixel round-trips
        assert split.labels.tolist() == labels.tolist()


def test_fixture_files_have_the_official_pickle_layout(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_train=10, n_test=3)
    write_cifar100(tmp_path, n_train=4, n_test=2)
    # The dataset page's reader: pickle.load(fo, encoding="bytes").
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as fo:
        batch = pickle.load(fo, encoding="bytes")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (2, 3072)
    assert batch[b"batch_label"] == b"training batch 1 of 5"
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "rb") as fo:
        assert set(pickle.load(fo, encoding="bytes")) == {
            b"num_cases_per_batch",
            b"label_names",
            b"num_vis",
        }
    with open(tmp_path / "cifar-100-python" / "train", "rb") as fo:
        train = pickle.load(fo, encoding="bytes")
    assert set(train) == {b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"}
    with open(tmp_path / "cifar-100-python" / "meta", "rb") as fo:
        assert set(pickle.load(fo, encoding="bytes")) == {
            b"fine_label_names",
            b"coarse_label_names",
        }


def test_missing_cifar_files_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "cifar10" in msg and "download" in msg
    assert "cifar-10-batches-py/data_batch_1" in msg

    files = write_cifar100(tmp_path, n_train=5, n_test=2)
    (tmp_path / "cifar-100-python" / "test").unlink()
    with accept_checksums(files), pytest.raises(FileNotFoundError, match="cifar-100-python/test"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar10", None)


def test_torchvision_checksums_are_enforced(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_train=5, n_test=2)  # not the real archive: md5s differ
    with pytest.raises(RuntimeError, match="checksum"):
        load_dataset("cifar10", tmp_path)


def test_download_waits_for_the_lock_and_uses_no_network(tmp_path: Path, monkeypatch) -> None:
    files = write_cifar10(tmp_path, n_train=10, n_test=4)

    def no_network(*args, **kwargs):
        raise AssertionError("download attempted although the files are present")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", no_network)
    download_called = threading.Event()
    original = tv_datasets.CIFAR10.download

    def recording_download(self):
        download_called.set()
        return original(self)

    monkeypatch.setattr(tv_datasets.CIFAR10, "download", recording_download)
    result: dict[str, object] = {}

    def load() -> None:
        try:
            result["bundle"] = load_dataset("cifar10", tmp_path, download=True)
        except Exception as exc:  # reported by the assertions below
            result["error"] = exc

    with accept_checksums(files):
        other_trial = FileLock(str(download_lock_path(tmp_path, "cifar10")))
        with other_trial:
            thread = threading.Thread(target=load)
            thread.start()
            # torchvision's download() must not start while another process holds the lock.
            assert not download_called.wait(timeout=1.0)
        thread.join(timeout=60)
    assert download_called.is_set() and "error" not in result, result.get("error")
    assert torch.equal(result["bundle"].train.images, _chw(files.train_images))


def test_download_on_a_root_without_room_for_the_lock_still_loads_present_files(
    tmp_path: Path, monkeypatch
) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", no_network)
    files = write_cifar10(tmp_path, n_train=10, n_test=4)
    download_lock_path(tmp_path, "cifar10").mkdir()  # the lock file cannot be created
    with accept_checksums(files):
        bundle = load_dataset("cifar10", tmp_path, download=True)
    assert torch.equal(bundle.test.images, _chw(files.test_images))
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    # Files missing: a download is needed, so the lock must not be skipped.
    with accept_checksums(files), pytest.raises(IsADirectoryError):
        load_dataset("cifar10", tmp_path, download=True)


# -------------------------------------------------------------------------------------- digits


def test_digits_split_scaling_and_stratification() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    bundle = load_dataset("digits", None)
    assert len(bundle.train) == 1437 and len(bundle.test) == 360 and bundle.val is None
    assert bundle.train.images.shape == (1437, 1, 8, 8)
    assert bundle.train.images.dtype == torch.uint8 and bundle.test.labels.dtype == torch.int64

    # Documented scaling round(v * 255 / 16), here in float arithmetic: 0->0, 8->128, 16->255.
    expected = np.rint(digits.images * 255 / 16).astype(np.uint8)
    whole = Counter((img.tobytes(), int(y)) for img, y in zip(expected, digits.target, strict=True))
    loaded = Counter()
    for split in (bundle.train, bundle.test):
        for img, y in zip(split.images.numpy(), split.labels.tolist(), strict=True):
            loaded[(img[0].tobytes(), y)] += 1
    assert loaded == whole  # disjoint, complete, pixel-exact
    assert {0, 128, 255} <= set(np.unique(bundle.train.images.numpy()).tolist())

    # Stratified: each class's share of the 360 test images is its share of the data, +-1.
    totals = np.bincount(digits.target, minlength=10)
    test_counts = np.bincount(bundle.test.labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 360 * totals / totals.sum()) <= 1)

    # Fixed: the split is part of the dataset, the same on every load and for every split_seed.
    again = load_dataset("digits", None, val_fraction=0.2, split_seed=5)
    assert torch.equal(again.test.images, bundle.test.images)
    assert torch.equal(again.test.labels, bundle.test.labels)


def test_digits_catalog_statistics_match_the_data() -> None:
    train = load_dataset("digits", None).train.images.double() / 255
    info = DATASETS["digits"]
    assert info.mean[0] == pytest.approx(train.mean().item(), abs=5e-5)
    assert info.std[0] == pytest.approx(train.std(unbiased=False).item(), abs=5e-5)
    assert info.train_size == 1437 and info.test_size == 360


# ------------------------------------------------------------------------------ validation split


def test_validation_split_is_seeded_disjoint_and_stratified() -> None:
    full = load_dataset("digits", None).train
    bundle = load_dataset("digits", None, val_fraction=0.1, split_seed=3)
    assert len(bundle.val) == round(0.1 * 1437) and len(bundle.train) == 1437 - 144

    def rows(split) -> Counter:
        return Counter(
            (img.tobytes(), y)
            for img, y in zip(split.images.numpy(), split.labels.tolist(), strict=True)
        )

    assert rows(bundle.train) + rows(bundle.val) == rows(full)  # disjoint and complete
    totals = np.bincount(full.labels.numpy(), minlength=10)
    val_counts = np.bincount(bundle.val.labels.numpy(), minlength=10)
    assert np.all(np.abs(val_counts - 144 * totals / totals.sum()) <= 1)

    same = load_dataset("digits", None, val_fraction=0.1, split_seed=3)
    other = load_dataset("digits", None, val_fraction=0.1, split_seed=4)
    assert torch.equal(same.val.images, bundle.val.images)
    assert not torch.equal(other.val.images, bundle.val.images)


def test_split_indices_falls_back_when_stratifying_is_impossible() -> None:
    labels = np.array([0, 0, 0, 1, 2, 2])  # class 1 has a single sample
    keep, held = split_indices(labels, 0.5, seed=0)
    assert len(held) == 3 and sorted(np.concatenate([keep, held]).tolist()) == list(range(6))
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(labels, 0.01, seed=0)


def _sklearn_splits(val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The digits splits computed with scikit-learn directly, as nptm defines them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train, test = train_test_split(
        np.arange(len(digits.target)), test_size=360, random_state=0, stratify=digits.target
    )
    train, test = np.sort(train), np.sort(test)
    labels = digits.target[train]
    keep, held = train_test_split(
        np.arange(len(train)), test_size=round(val_fraction * len(train)), random_state=seed,
        stratify=labels,
    )  # fmt: skip
    return {"train": train[np.sort(keep)], "val": train[np.sort(held)], "test": test}


def test_splits_come_from_the_cache_as_scikit_learn_computes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sklearn.datasets import load_digits

    from nptm.trainables import split_cache

    monkeypatch.setenv("NPTM_CACHE_DIR", str(tmp_path))
    digits = load_digits()
    pixels = (digits.images.astype(np.int64) * 255 + 8) // 16
    want = _sklearn_splits(0.1, seed=3)

    def check(bundle) -> None:
        for name in ("train", "val", "test"):
            split = getattr(bundle, name)
            assert np.array_equal(split.labels.numpy(), digits.target[want[name]]), name
            assert np.array_equal(split.images.numpy()[:, 0], pixels[want[name]]), name

    check(load_dataset("digits", None, val_fraction=0.1, split_seed=3))  # computed, stored
    entries = sorted(tmp_path.glob("*.npz"))
    assert [p.name.split("-")[0] for p in entries] == ["digits", "split"]
    check(load_dataset("digits", None, val_fraction=0.1, split_seed=3))  # read back

    digits_entry = split_cache.entry_path("digits", {"test_size": 360, "seed": 0})
    assert digits_entry in entries
    digits_entry.write_bytes(b"PK\x03\x04 torn")  # an unreadable entry is recomputed
    check(load_dataset("digits", None, val_fraction=0.1, split_seed=3))
    with np.load(digits_entry) as stored:
        assert np.array_equal(stored["test"], want["test"])
    # Another seed is another entry, not the stored one.
    other = load_dataset("digits", None, val_fraction=0.1, split_seed=4)
    assert not torch.equal(other.val.labels, load_dataset("digits", None, val_fraction=0.1,
                                                          split_seed=3).val.labels)  # fmt: skip
    assert len(list(tmp_path.glob("split-*.npz"))) == 2


def test_a_warm_cache_spares_a_fresh_process_scikit_learn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the cache is for: a new worker process that loads digits (with a validation
    split) after another process did never imports scikit-learn."""
    import subprocess
    import sys

    monkeypatch.setenv("NPTM_CACHE_DIR", str(tmp_path))
    load_dataset("digits", None, val_fraction=0.1, split_seed=1)  # this process fills it
    code = (
        "import sys; from nptm.trainables.datasets import load_dataset; "
        "load_dataset('digits', None, val_fraction=0.1, split_seed=1); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[1], env=os.environ,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="dataset: unknown name 'mnist'"):
        load_dataset("mnist", None)
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", None, val_fraction=1.0)


# ------------------------------------------------------------------------------ augmentation


def _loop_crop_flip(images, oy, ox, flips, p) -> torch.Tensor:
    """Reference: pad and slice one sample at a time."""
    out = []
    for i in range(len(images)):
        c, h, w = images[i].shape
        padded = torch.zeros((c, h + 2 * p, w + 2 * p), dtype=images.dtype)
        padded[:, p : p + h, p : p + w] = images[i]
        crop = padded[:, int(oy[i]) : int(oy[i]) + h, int(ox[i]) : int(ox[i]) + w]
        out.append(torch.flip(crop, dims=[2]) if flips[i] else crop)
    return torch.stack(out)


def test_crop_flip_matches_a_per_sample_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 6, 5), dtype=torch.uint8, generator=gen)
    p = 2
    oy = torch.randint(0, 2 * p + 1, (64,), generator=gen)
    ox = torch.randint(0, 2 * p + 1, (64,), generator=gen)
    flips = torch.rand(64, generator=gen) < 0.5
    assert torch.equal(
        crop_flip(images, oy, ox, flips, p), _loop_crop_flip(images, oy, ox, flips, p)
    )
    # Offsets (p, p) without flip are the identity.
    centre = torch.full((64,), p)
    assert torch.equal(crop_flip(images, centre, centre, flips & False, p), images)


def _synthetic(n: int, info=CIFAR_INFO, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(
        0, 256, (n, info.in_channels, info.image_size, info.image_size), dtype=torch.uint8,
        generator=gen,
    )  # fmt: skip
    return images, torch.randint(0, info.num_classes, (n,), generator=gen)


def test_training_loader_output_matches_reference_pipeline() -> None:
    images, labels = _synthetic(50)
    loader = InMemoryLoader(
        images, labels, batch_size=16, train=True, info=CIFAR_INFO, device="cpu", seed=7
    )
    loader.set_epoch(3)
    batches = list(loader)
    assert len(batches) == len(loader) == 4 and [len(y) for _, y in batches] == [16, 16, 16, 2]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    idx, aug = loader.positions(), loader.augmentation()
    assert sorted(idx.tolist()) == list(range(50))  # one permutation, every sample once
    p = CIFAR_INFO.crop_padding
    assert aug.offsets_y.min() >= 0 and aug.offsets_y.max() <= 2 * p
    assert 0 < int(aug.flips.sum()) < 50  # flips on, some samples each way
    crops = _loop_crop_flip(images[idx], aug.offsets_y, aug.offsets_x, aug.flips, p)
    expected = torch.stack(
        [_reference_normalize(c, CIFAR_INFO.mean, CIFAR_INFO.std) for c in crops]
    )
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    assert torch.equal(y, labels[idx])

    # Another epoch: another order and other crops; the same epoch again: the same batches.
    loader.set_epoch(4)
    assert not torch.equal(loader.positions(), idx)
    loader.set_epoch(3)
    assert torch.equal(torch.cat([b[0] for b in loader]), x)


def test_no_flip_for_datasets_where_it_changes_the_label() -> None:
    info = DATASETS["digits"]
    assert not info.flip
    loader = InMemoryLoader(
        *_synthetic(200, info), batch_size=64, train=True, info=info, device="cpu", seed=0
    )
    aug = loader.augmentation()
    assert not aug.flips.any() and int(aug.offsets_x.max()) == 2 * info.crop_padding


def test_eval_loader_is_unaugmented_and_ordered() -> None:
    images, labels = _synthetic(37)
    loader = InMemoryLoader(
        images, labels, batch_size=10, train=False, info=CIFAR_INFO, device="cpu", seed=7
    )
    assert loader.augmentation() is None and len(loader) == 4
    for epoch in (0, 5):
        loader.set_epoch(epoch)
        x = torch.cat([b[0] for b in loader])
        y = torch.cat([b[1] for b in loader])
        expected = torch.stack(
            [_reference_normalize(img, CIFAR_INFO.mean, CIFAR_INFO.std) for img in images]
        )
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
        assert torch.equal(y, labels)


# ------------------------------------------------------------------------------- DDP sharding


class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("n", [40, 41])
def test_training_shards_match_distributed_sampler(n: int) -> None:
    images, labels = _synthetic(n)
    seed, world = 11, 2
    for epoch in (0, 1):
        shards = []
        for rank in range(world):
            loader = InMemoryLoader(
                images, labels, batch_size=8, train=True, info=CIFAR_INFO, device="cpu",
                seed=seed, rank=rank, world_size=world,
            )  # fmt: skip
            loader.set_epoch(epoch)
            sampler = DistributedSampler(
                _Sized(n), num_replicas=world, rank=rank, shuffle=True, seed=order_seed(seed)
            )
            sampler.set_epoch(epoch)
            assert loader.positions().tolist() == list(sampler)
            assert len(loader) == -(-len(sampler) // 8)
            shards.append(loader.positions().tolist())
        assert len(shards[0]) == len(shards[1]) == -(-n // world)
        assert set(shards[0]) | set(shards[1]) == set(range(n))
        overlap = set(shards[0]) & set(shards[1])
        assert len(overlap) == (0 if n % world == 0 else 1)  # one wrapped-around sample pads


def test_order_seeds_of_different_runs_do_not_collide() -> None:
    # DistributedSampler's seed + epoch would give seed 1, epoch 0 the order of seed 0, epoch 1.
    images, labels = _synthetic(30)

    def order(seed: int, epoch: int) -> list[int]:
        loader = InMemoryLoader(
            images, labels, batch_size=8, train=True, info=CIFAR_INFO, device="cpu", seed=seed
        )
        loader.set_epoch(epoch)
        return loader.positions().tolist()

    assert order(1, 0) != order(0, 1)


def test_eval_shards_partition_without_padding() -> None:
    images, labels = _synthetic(41)
    seen = []
    for rank in range(3):
        loader = InMemoryLoader(
            images, labels, batch_size=5, train=False, info=CIFAR_INFO, device="cpu", seed=0,
            rank=rank, world_size=3,
        )  # fmt: skip
        seen += torch.cat([y for _, y in loader]).tolist()
        assert loader.positions().tolist() == list(range(rank, 41, 3))
    assert Counter(seen) == Counter(labels.tolist())


# ---------------------------------------------------------------------- loaders and calibration


def test_make_loaders_and_calibration_batches_in_memory() -> None:
    bundle = load_dataset("digits", None, val_fraction=0.1)
    loaders = make_loaders(bundle, batch_size=100, device="cpu", seed=0)
    assert isinstance(loaders.train, InMemoryLoader) and loaders.train.train
    assert len(loaders.train) == -(-len(bundle.train) // 100)
    assert not loaders.val.train and not loaders.test.train

    batches = bundle.calibration_batches(3, 32, seed=1)
    assert [tuple(x.shape) for x, _ in batches] == [(32, 1, 8, 8)] * 3
    norm = {
        _reference_normalize(img, bundle.info.mean, bundle.info.std).numpy().tobytes(): y
        for img, y in zip(bundle.train.images, bundle.train.labels.tolist(), strict=True)
    }
    # Un-augmented, normalised training images (not validation ones) with their labels.
    for x, y in batches:
        for xi, yi in zip(x, y.tolist(), strict=True):
            assert norm.get(xi.numpy().tobytes()) == yi
    again = bundle.calibration_batches(3, 32, seed=1)
    other = bundle.calibration_batches(3, 32, seed=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    assert not torch.equal(batches[0][0], other[0][0])
    assert len(bundle.calibration_batches(2, 1000, seed=0)) == 2  # more than the split: wraps


def test_augmented_calibration_batches_are_random_crops_of_the_same_images() -> None:
    # HRank's rank estimate looks at augmented training images (random crop, flip).
    bundle = load_dataset("digits", None)
    plain = bundle.calibration_batches(2, 16, seed=3)
    aug = bundle.calibration_batches(2, 16, seed=3, augmented=True)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, aug, strict=True))
    by_bytes = {
        _reference_normalize(img, bundle.info.mean, bundle.info.std).numpy().tobytes(): img
        for img in bundle.train.images
    }
    moved = 0
    for (xp, _), (xa, _) in zip(plain, aug, strict=True):
        for p_img, a_img in zip(xp, xa, strict=True):
            source = by_bytes[p_img.numpy().tobytes()]  # the uint8 image behind the plain one
            padded = torch.nn.functional.pad(source, (1, 1, 1, 1))  # digits: padding 1, no flip
            crops = [
                _reference_normalize(padded[:, y : y + 8, x : x + 8], bundle.info.mean,
                                     bundle.info.std)
                for y in range(3) for x in range(3)
            ]  # fmt: skip
            assert any(torch.equal(a_img, c) for c in crops)
            moved += not torch.equal(a_img, p_img)
    assert moved > 0
    again = bundle.calibration_batches(2, 16, seed=3, augmented=True)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(aug, again, strict=True))


def _write_image_folder(root: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for part in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = root / part / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_path(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, per_class=5)
    bundle = load_dataset("imagenet", tmp_path, val_fraction=0.2, split_seed=0)
    assert not bundle.in_memory
    assert len(bundle.train) == 8 and len(bundle.val) == 2 and len(bundle.test) == 10
    val_labels = [bundle.val[i][1] for i in range(len(bundle.val))]
    assert sorted(val_labels) == [0, 1]  # stratified: one per class
    loaders = make_loaders(bundle, batch_size=4, device="cpu", seed=0, num_workers=0)
    assert len(loaders.train) == 2 and len(loaders.test) == 3
    x, y = next(iter(loaders.train))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64

    # Evaluation transforms are deterministic and follow the catalog's normalisation.
    first = torch.cat([b[0] for b in loaders.test])
    second = torch.cat([b[0] for b in loaders.test])
    assert torch.equal(first, second) and first.shape == (10, 3, 224, 224)
    # Resize(256)+CenterCrop(224) of a 40x30 image stretches it; the per-channel range of the
    # normalised values stays within what (0..1 - mean) / std allows.
    info = bundle.info
    for c in range(3):
        assert first[:, c].min() >= (0 - info.mean[c]) / info.std[c] - 1e-5
        assert first[:, c].max() <= (1 - info.mean[c]) / info.std[c] + 1e-5
    cal = bundle.calibration_batches(2, 3, seed=0)
    assert [tuple(b[0].shape) for b in cal] == [(3, 3, 224, 224)] * 2

    # Sharded training order of the DataLoader path matches the in-memory path's convention.
    shard = make_loaders(bundle, batch_size=2, device="cpu", seed=4, rank=1, world_size=2,
                         num_workers=0).train  # fmt: skip
    shard.set_epoch(2)
    reference = DistributedSampler(_Sized(8), num_replicas=2, rank=1, seed=order_seed(4))
    reference.set_epoch(2)
    assert list(shard.sampler) == list(reference)


def test_imagefolder_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="'val'"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="download"):
        load_dataset("imagenet", tmp_path, download=True)


def test_loader_rejects_bad_input() -> None:
    images, labels = _synthetic(10)
    with pytest.raises(ValueError, match="images_uint8"):
        InMemoryLoader(images.float(), labels, batch_size=4, train=True, info=CIFAR_INFO,
                       device="cpu", seed=0)  # fmt: skip
    with pytest.raises(ValueError, match="rank"):
        InMemoryLoader(images, labels, batch_size=4, train=True, info=CIFAR_INFO, device="cpu",
                       seed=0, rank=2, world_size=2)  # fmt: skip
    with pytest.raises(ValueError, match="images_uint8: 1 channels"):
        InMemoryLoader(images[:, :1], labels, batch_size=4, train=True, info=CIFAR_INFO,
                       device="cpu", seed=0)  # fmt: skip
