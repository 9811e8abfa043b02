"""The train loop: learning, exact resume, seeding, divergence, sparsity, DDP equivalence."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.utils import prune
from torch.optim.optimizer import register_optimizer_step_pre_hook

from nptm.trainables.catalog import DATASETS
from nptm.trainables.datasets import DataBundle, TensorSplit, load_dataset, normalize
from nptm.trainables.loaders import make_loaders
from nptm.trainables.recipe import default_recipe
from nptm.trainables.schedules import lr_schedule
from nptm.trainables.train_loop import Diverged, EpochMetrics, evaluate, fit

RECIPE = default_recipe("digits")  # momentum 0.9, nesterov, weight decay 5e-4


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_dataset("digits", None)


@pytest.fixture(scope="module")
def few_digits(digits: DataBundle) -> DataBundle:
    """400 training and 100 test images: enough for the tests that compare runs."""
    keep = np.arange(400)
    return replace(digits, train=digits.train.subset(keep), test=digits.test.subset(keep[:100]))


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Every test here: tiny steps that two threads would make up to 50x slower."""


def small_cnn(seed: int, bn: bool = True, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), norm(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(32, 10),
    )  # fmt: skip


def run(model, bundle, *, epochs, seed=0, batch_size=128, lr=0.05, **kwargs):
    loaders = make_loaders(bundle, batch_size=batch_size, device="cpu", seed=seed)
    lrs = kwargs.pop("lrs", None)
    if lrs is None:
        lrs = np.full(epochs * len(loaders.train), lr)
    return fit(model, loaders, lrs, RECIPE, epochs=epochs, device="cpu", seed=seed, **kwargs)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_learns_digits(digits: DataBundle) -> None:
    seen: list[EpochMetrics] = []
    result = run(small_cnn(0), digits, epochs=3, batch_size=64, lr=0.1, on_epoch=seen.append)
    h = result.history
    assert seen == h and [m.epoch for m in h] == [1, 2, 3]
    assert h[-1].train_loss < h[0].train_loss
    assert result.test_acc > 0.4  # chance is 0.1
    assert result.test_acc == h[-1].test_acc and result.test_loss == h[-1].test_loss
    assert all(m.samples == 1437 and m.val_acc is None for m in h)
    assert result.best_val_epoch is None and result.test_acc_at_best_val is None
    assert result.best_test_acc_over_epochs == max(m.test_acc for m in h)
    assert result.samples_per_second > 0 and result.train_seconds >= sum(m.train_s for m in h)


def test_matches_a_reference_sgd_loop(few_digits: DataBundle) -> None:
    """Per-step lr, momentum, nesterov and the weight-decay override, against torch's SGD."""
    epochs = 2
    loaders = make_loaders(few_digits, batch_size=256, device="cpu", seed=3)
    steps = len(loaders.train)
    lrs = np.linspace(0.2, 0.01, epochs * steps)
    model = small_cnn(1, bn=False)
    reference = small_cnn(1, bn=False)
    fit(model, loaders, lrs, RECIPE, epochs=epochs, device="cpu", seed=3, weight_decay=0.01)

    opt = torch.optim.SGD(
        reference.parameters(), lr=1.0, momentum=RECIPE.momentum, nesterov=True, weight_decay=0.01
    )
    for epoch in range(epochs):
        loaders.train.set_epoch(epoch)
        for i, (x, y) in enumerate(loaders.train):
            opt.param_groups[0]["lr"] = lrs[epoch * steps + i]
            opt.zero_grad()
            nn.functional.cross_entropy(reference(x), y).backward()
            opt.step()
    assert_same_weights(model, reference)


def test_resume_is_bit_identical(few_digits: DataBundle, tmp_path: Path) -> None:
    # Dropout draws from the global RNG: the resumed run must draw what the straight run drew.
    straight = small_cnn(2, dropout=0.3)
    full = run(straight, few_digits, epochs=4, seed=5)

    saved: dict[int, Path] = {}

    def checkpoint(epoch: int, state: dict) -> None:
        saved[epoch] = tmp_path / f"epoch{epoch}.pt"
        torch.save(state, saved[epoch])

    class Interrupted(Exception):
        pass

    def interrupt_after_two(m: EpochMetrics) -> None:
        if m.epoch == 2:
            raise Interrupted  # as if the worker died right after the second checkpoint

    loaders = make_loaders(few_digits, batch_size=128, device="cpu", seed=5)
    lrs = np.full(4 * len(loaders.train), 0.05)
    with pytest.raises(Interrupted):
        fit(small_cnn(2, dropout=0.3), loaders, lrs, RECIPE, epochs=4, device="cpu", seed=5,
            checkpoint=checkpoint, on_epoch=interrupt_after_two)  # fmt: skip
    assert sorted(saved) == [1, 2]

    state = torch.load(saved[2], weights_only=True)
    assert state["epoch"] == 2 and {"model", "optimizer", "rng", "history"} <= set(state)
    resumed = small_cnn(99, dropout=0.3)  # whatever the init: the state overrides it
    loaders = make_loaders(few_digits, batch_size=128, device="cpu", seed=5)
    result = fit(resumed, loaders, lrs, RECIPE, epochs=4, device="cpu", seed=5,
                 resume_state=state)  # fmt: skip
    assert_same_weights(resumed, straight)
    assert [m.epoch for m in result.history] == [1, 2, 3, 4]
    for a, b in zip(result.history, full.history, strict=True):
        assert (a.train_loss, a.train_acc, a.test_loss, a.test_acc) == (
            b.train_loss, b.train_acc, b.test_loss, b.test_acc,
        )  # fmt: skip


def test_same_seed_same_run_other_seed_other_run(few_digits: DataBundle) -> None:
    a, b, c = (small_cnn(0, dropout=0.3) for _ in range(3))
    ra = run(a, few_digits, epochs=2, seed=1)
    rb = run(b, few_digits, epochs=2, seed=1)
    run(c, few_digits, epochs=2, seed=2)
    assert_same_weights(a, b)
    assert [asdict(m) | {"wall_s": 0, "train_s": 0} for m in ra.history] == [
        asdict(m) | {"wall_s": 0, "train_s": 0} for m in rb.history
    ]
    assert not torch.equal(a[0].weight, c[0].weight)  # other data order and crops


def test_divergence_stops_within_the_epoch(few_digits: DataBundle) -> None:
    loaders = make_loaders(few_digits, batch_size=32, device="cpu", seed=0)
    steps = len(loaders.train)
    lrs = np.full(steps, 0.05)
    lrs[4] = 1e30  # step 4 itself still has a finite loss; the weights it produces do not
    calls: list[object] = []
    with pytest.raises(Diverged) as err:
        fit(small_cnn(0, bn=False), loaders, lrs, RECIPE, epochs=1, device="cpu", seed=0,
            on_epoch=calls.append, checkpoint=lambda e, s: calls.append(e))  # fmt: skip
    assert err.value.epoch == 0 and err.value.step == 5 < steps
    assert not np.isfinite(err.value.loss) and calls == []


def test_lr_schedule_length_is_checked(few_digits: DataBundle) -> None:
    loaders = make_loaders(few_digits, batch_size=128, device="cpu", seed=0)
    steps = len(loaders.train)
    with pytest.raises(
        ValueError, match=rf"lr_per_step: {2 * steps - 1} values.*epochs=2 x {steps}"
    ):
        fit(small_cnn(0), loaders, np.full(2 * steps - 1, 0.1), RECIPE, epochs=2, device="cpu",
            seed=0)  # fmt: skip
    with pytest.raises(ValueError, match="rank 0 of 2"):
        sharded = make_loaders(few_digits, batch_size=128, device="cpu", seed=0, world_size=2)
        fit(small_cnn(0), sharded, np.full(len(sharded.train), 0.1), RECIPE, epochs=1,
            device="cpu", seed=0)  # fmt: skip


def test_masked_model_stays_sparse(few_digits: DataBundle) -> None:
    model = small_cnn(0)
    targets = [(model[0], 0.5), (model[3], 0.8), (model[9], 0.6)]
    for module, amount in targets:
        prune.random_unstructured(module, "weight", amount=amount)
    masks = [m.weight_mask.clone() for m, _ in targets]
    before = [m.weight_orig.detach().clone() for m, _ in targets]
    run(model, few_digits, epochs=2, lr=0.1)
    for (module, amount), mask, w0 in zip(targets, masks, before, strict=True):
        assert torch.equal(module.weight_mask, mask)
        zeros = module.weight == 0
        assert torch.equal(zeros, mask == 0)  # exactly the pruned entries, nothing revived
        assert zeros.float().mean().item() == pytest.approx(amount, abs=1 / zeros.numel())
        assert not torch.equal(module.weight_orig[mask.bool()], w0[mask.bool()])  # it trained


def test_model_selection_uses_the_validation_split() -> None:
    bundle = load_dataset("digits", None, val_fraction=0.2, split_seed=0)
    result = run(small_cnn(0), bundle, epochs=4, lr=0.03)
    h = result.history
    assert all(m.val_acc is not None for m in h)
    best = max(range(4), key=lambda i: (h[i].val_acc, -h[i].val_loss, -i))
    assert result.best_val_epoch == best + 1
    assert result.test_acc_at_best_val == h[best].test_acc
    assert result.test_acc == h[-1].test_acc


def test_evaluate_covers_the_whole_split(few_digits: DataBundle) -> None:
    model = small_cnn(4)
    model.train()
    loaders = make_loaders(few_digits, batch_size=33, device="cpu", seed=0)  # 100 = 3 x 33 + 1
    loss, acc = evaluate(model, loaders.test, "cpu")
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        logits = model(normalize(few_digits.test.images, few_digits.info))
    labels = few_digits.test.labels
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert acc == int((logits.argmax(1) == labels).sum()) / len(labels)


# --------------------------------------------------------------------------------------- DDP

DDP_B = 8  # per-worker batch of two workers: the global batch is 2 * DDP_B
DDP_EPOCHS = 2
DDP_INFO = replace(DATASETS["digits"], crop_padding=0)  # no augmentation: flip is off already


def _ddp_bundle() -> DataBundle:
    gen = torch.Generator().manual_seed(0)
    n_train, n_test = 4 * DDP_B, 7  # two steps of 2 x B; an odd test split

    def split(n: int) -> TensorSplit:
        images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen)
        return TensorSplit(images, torch.randint(0, 10, (n,), generator=gen))

    return DataBundle(DDP_INFO, split(n_train), None, split(n_test))


def _ddp_fit(model: nn.Module, rank: int, world: int) -> tuple:
    """Fit with the GLOBAL batch 2 * DDP_B and the lr curve the train loop would get for it."""
    loaders = make_loaders(
        _ddp_bundle(), batch_size=2 * DDP_B, device="cpu", seed=4, rank=rank, world_size=world
    )
    lrs = lr_schedule("slr", budget=DDP_EPOCHS, steps_per_epoch=len(loaders.train), recipe=RECIPE)
    calls: list[int] = []
    result = fit(
        model, loaders, lrs, RECIPE, epochs=DDP_EPOCHS, device="cpu", seed=4,
        on_epoch=lambda m: calls.append(m.epoch), checkpoint=lambda e, s: calls.append(-e),
    )  # fmt: skip
    return result, loaders, calls, lrs


def _ddp_worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    # A file store: no port picked in advance that another process of the suite could take
    # before rank 0 binds it, and no store server thread in rank 0 to outlive its peer.
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        model = small_cnn(0, bn=False)
        model.load_state_dict(torch.load(f"{out}/init.pt", weights_only=True))
        result, loaders, calls, lrs = _ddp_fit(model, rank, world)
        torch.save(
            {
                "model": model.state_dict(),
                "steps": len(loaders.train),
                "rank_batch": loaders.train.batch_size,
                "lrs": torch.from_numpy(lrs),
                "positions": loaders.train.positions(),
                "history": [asdict(m) for m in result.history],
                "calls": calls,
            },
            f"{out}/rank{rank}.pt",
        )
        dist.barrier()  # neither rank tears down the group while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes of torch.distributed
def test_ddp_two_workers_equal_one_worker_at_the_same_global_batch(tmp_path: Path) -> None:
    """The recipe's batch is the global batch: 2 workers take half of it each and run the same
    steps at the same lr as 1 worker, with the same updates. Without BatchNorm: BN would
    normalise each worker's half batch with its own statistics, which is not the big batch's
    forward pass, so the gradients would legitimately differ."""
    init = small_cnn(123, bn=False)
    torch.save(init.state_dict(), tmp_path / "init.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    single = small_cnn(0, bn=False)
    single.load_state_dict(init.state_dict())
    result, loaders, _, single_lrs = _ddp_fit(single, 0, 1)
    # Same number of optimizer steps per epoch (32 samples / global batch 16 = 2) and the same
    # lr at every step; each worker's share of a step is half the global batch.
    assert len(loaders.train) == 2 and loaders.train.batch_size == 2 * DDP_B
    for r in ranks:
        assert r["steps"] == 2 and r["rank_batch"] == DDP_B
        assert torch.equal(r["lrs"], torch.from_numpy(single_lrs))
    assert len(set(single_lrs.tolist())) > 1  # a curve that changes between steps
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["model"][k], v, rtol=0, atol=1e-6)
        assert torch.equal(ranks[0]["model"][k], ranks[1]["model"][k])
    assert not torch.equal(single[0].weight, init[0].weight)

    # The two shards are disjoint and together are exactly the single worker's epoch.
    shard0, shard1 = (r["positions"].tolist() for r in ranks)
    assert not set(shard0) & set(shard1)
    assert sorted(shard0 + shard1) == sorted(loaders.train.positions().tolist())
    # Step k of the two workers covers the same samples as step k of the single worker.
    single_order = loaders.train.positions().tolist()
    for k in range(2):
        both = shard0[k * DDP_B : (k + 1) * DDP_B] + shard1[k * DDP_B : (k + 1) * DDP_B]
        assert sorted(both) == sorted(single_order[k * 2 * DDP_B : (k + 1) * 2 * DDP_B])

    # Metrics are global and identical on both ranks; the test split (7) is not padded.
    for e in range(DDP_EPOCHS):
        h0, h1, hs = ranks[0]["history"][e], ranks[1]["history"][e], asdict(result.history[e])
        for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "samples"):
            assert h0[key] == h1[key]
            assert h0[key] == pytest.approx(hs[key], abs=1e-6)
        assert h0["samples"] == 4 * DDP_B
    # Rank 0 alone checkpoints; every rank reports the epoch (Ray Train's report is a barrier).
    assert ranks[0]["calls"] == [-1, 1, -2, 2] and ranks[1]["calls"] == [1, 2]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_global_batch_gives_the_same_steps_and_lrs_for_any_worker_count(
    digits: DataBundle, world: int
) -> None:
    """1,437 digits at a global batch of 64: ceil(1437 / 64) = 23 steps per epoch for 1, 2, 4
    or 8 workers, each rank taking 64 / W samples per step; the lr of every step is the same."""
    per_rank = [
        make_loaders(digits, batch_size=64, device="cpu", seed=0, rank=r, world_size=world)
        for r in range(world)
    ]
    assert {len(ld.train) for ld in per_rank} == {23}
    assert {ld.train.batch_size for ld in per_rank} == {64 // world}
    # One epoch of all ranks together visits every training image (at most W - 1 repeats).
    seen = torch.cat([ld.train.positions() for ld in per_rank])
    assert set(seen.tolist()) == set(range(1437)) and len(seen) - 1437 < world
    lrs = lr_schedule("slr", budget=3, steps_per_epoch=len(per_rank[0].train), recipe=RECIPE)
    one = lr_schedule("slr", budget=3, steps_per_epoch=23, recipe=RECIPE)
    assert np.array_equal(lrs, one)


def test_global_batch_must_split_over_the_workers(digits: DataBundle) -> None:
    with pytest.raises(ValueError, match=r"batch_size: 64 .*world_size=3"):
        make_loaders(digits, batch_size=64, device="cpu", seed=0, rank=0, world_size=3)


def test_clr_lr_and_momentum_reach_the_optimizer_at_every_step(few_digits: DataBundle) -> None:
    from nptm.trainables.schedules import lr_schedule, momentum_schedule

    loaders = make_loaders(few_digits, batch_size=64, device="cpu", seed=0)
    steps, epochs = len(loaders.train), 2
    lrs = lr_schedule("clr", budget=epochs, steps_per_epoch=steps, recipe=RECIPE)
    moms = momentum_schedule("clr", budget=epochs, steps_per_epoch=steps, recipe=RECIPE)
    seen: list[tuple[float, float]] = []

    def record(opt: torch.optim.Optimizer, *_: object) -> None:
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))

    handle = register_optimizer_step_pre_hook(record)
    try:
        fit(small_cnn(0), loaders, lrs, RECIPE, epochs=epochs, device="cpu", seed=0,
            momentum_per_step=moms)  # fmt: skip
    finally:
        handle.remove()
    # the reference: torch's OneCycleLR as the authors build it, stepped once per batch
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=RECIPE.lr, total_steps=epochs * steps, div_factor=100, final_div_factor=100,
        pct_start=0.1,
    )  # fmt: skip
    expected = []
    for _ in range(epochs * steps):
        expected.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        opt.step()
        sched.step()
    np.testing.assert_allclose(np.array(seen), np.array(expected), rtol=1e-12, atol=0)
