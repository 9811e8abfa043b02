"""A sweep whose stages keep failing with the same error stops handing out stages and says so
once (nptm.orchestrator.failure_guard); the failures of a sweep are reported one line per
error."""

from __future__ import annotations

from pathlib import Path

import pytest

from nptm.orchestrator.failure_guard import (
    NO_ERROR_TEXT,
    FailureGuard,
    error_line,
    failure_lines,
    signature,
)
from nptm.results.sink import SweepSummary
from nptm.trainables.layout import Layout
from tests.flaky_plugin import ERROR, flaky_data_plugin
from tests.sweep_helpers import executions, plan_stage_ids, sweep_on, trials, write_grid

STALE = "OSError: [Errno 116] Stale file handle: '/mnt/nfs/shard-{}-{}.bin'"


def test_signature_ignores_what_differs_between_stages() -> None:
    first = signature(STALE.format(4411, "3fa9c2d1"))
    assert (
        first
        == signature(STALE.format(97, "00be11ef"))
        == ("OSError: [Errno <n>] Stale file handle: '<path>'")
    )
    assert first != signature("OSError: [Errno 28] No space left on device: '/scratch/x'")
    assert signature("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0)") == signature(
        "CUDA out of memory. Tried to allocate 512.00 MiB (GPU 3)"
    )
    assert error_line("ValueError: bad\nTraceback (most recent call last):\n ...") == (
        "ValueError: bad"
    )
    assert error_line(None) == NO_ERROR_TEXT


def test_stored_error_names_the_cause_behind_rays_wrappers() -> None:
    """A `train` stage fails as a WorkerGroupError whose message only says workers failed, a
    prune task as a RayTaskError: the stored error starts with what the rank or task raised."""
    import ray.exceptions
    import ray.train

    from nptm.orchestrator.trial import _root_cause

    stale = OSError(116, "Stale file handle", "/mnt/nfs/shard-7.bin")
    group = ray.train.WorkerGroupError("Training failed due to worker errors", {1: stale})
    assert _root_cause(group) is stale
    task = ray.exceptions.RayTaskError("_prune_task", "Traceback ...", stale)
    assert _root_cause(task) is stale
    plain = ValueError("bad")
    assert _root_cause(plain) is plain


def test_guard_trips_on_three_stages_or_on_every_stage_in_flight() -> None:
    guard = FailureGuard(threshold=3)
    busy = {"a", "b", "c", "d", "e"}  # other stages keep running meanwhile
    assert guard.failed("a", STALE.format(1, "aa11aa11"), busy) is None
    assert guard.failed("a", STALE.format(2, "bb22bb22"), busy) is None  # a retry: still one
    assert guard.failed("b", "ValueError: another error", busy) is None
    assert guard.failed("c", STALE.format(3, "cc33cc33"), busy) is None
    trip = guard.failed("d", STALE.format(4, "dd44dd44"), busy)
    assert trip is not None and trip.stages == ["a", "c", "d"]
    assert trip.error == STALE.format(1, "aa11aa11")  # as the first stage reported it
    assert guard.failed("e", STALE.format(5, "ee55ee55"), busy) is None  # trips once
    # Two stages are enough when nothing else is in flight: one slot, or every slot failing.
    guard = FailureGuard(threshold=3)
    assert guard.failed("a", STALE.format(1, "aa11aa11"), {"a"}) is None  # its retry decides
    assert guard.failed("b", STALE.format(2, "bb22bb22"), {"b", "c"}) is None  # c still runs
    assert guard.trip is None
    guard = FailureGuard(threshold=3)
    assert guard.failed("a", STALE.format(1, "aa11aa11"), {"a"}) is None
    assert guard.failed("b", STALE.format(2, "bb22bb22"), {"b"}).stages == ["a", "b"]


def test_failures_are_reported_once_per_error(tmp_path: Path) -> None:
    summary = SweepSummary("s", planned=12, executed=4)
    summary.failures = [
        ("p1", "pretrain", STALE.format(1, "aa11aa11")),
        ("p2", "pretrain", "ValueError: bad recipe"),
        ("p3", "pretrain", STALE.format(2, "bb22bb22")),
    ]
    lines = "\n".join(failure_lines(summary, Layout(str(tmp_path))))
    assert lines.count("Stale file handle") == 1
    assert "FAILED 2 stages with the same error: " + STALE.format(1, "aa11aa11") in lines
    assert "stages: pretrain p1, pretrain p3" in lines
    assert f"traceback: {tmp_path}/stages/p1/error.txt" in lines
    assert "  FAILED pretrain p2: ValueError: bad recipe" in lines


@pytest.mark.slow
def test_sweep_stops_when_its_stages_keep_failing_alike_and_resumes(
    tmp_path: Path, ray_node
) -> None:
    """Three independent pre-trainings (seeds 0-2, each pre-trained, pruned and retrained)
    on a dataset whose every load fails, one stage at a time (max_concurrent 1), one retry.

    Hand-worked: seed 0's pre-training fails, is retried and fails again (2 attempts; its
    prune and retrain are skipped). Seed 1's fails once: two stages have failed alike and
    nothing else is in flight, so the sweep stops: that retry is not run (1 attempt) and seed
    2's pre-training never starts. 3 attempts in all, 2 failed rows, 2 x 2 skipped, and 3
    stages without a row. Then, with the mount back, the same command completes the rest."""
    with flaky_data_plugin(tmp_path) as plugin:
        grid = write_grid(
            tmp_path / "flaky.yaml", name="flaky", datasets=plugin.dataset, seeds="[0, 1, 2]",
            pruners=("{name: magnitude, ratio: 0.5}",), schedules="[ft]", budget="1",
            pretrain_epochs=1, milestones="[]", max_concurrent=1,
            extra=f"plugins: [{plugin.module}]\n",
        )  # fmt: skip
        storage = tmp_path / "runs"
        result = sweep_on(ray_node, grid, storage, "--max-retries", "1")
        assert result.returncode == 1, result.stderr[-3000:]
        err = result.stderr
        assert err.count(ERROR) == 1, err[-3000:]  # one message names the error
        assert "Traceback" not in err and "Trial task failed" not in err
        assert "[nptm] 2 stages failed with the same error: starting no further stage" in err
        assert "sweep flaky STOPPED: 2 stages failed with the same error" in err
        # 2 failed, 4 skipped (their prunes and retrains), 3 never started
        assert "7 of 9 stages did not run: fix the cause, then rerun the same command" in err
        rows = trials(storage, "flaky")
        pretrain = rows[rows.stage_kind == "pretrain"].sort_values("seed")
        assert list(pretrain.status) == ["failed", "failed"]
        assert [executions(storage, sid) for sid in pretrain.stage_id] == [2, 1]
        assert sorted(rows.status) == ["failed"] * 2 + ["skipped"] * 4
        error_file = storage / "stages" / pretrain.stage_id.iloc[0] / "error.txt"
        assert f"traceback: {error_file}" in err and ERROR in error_file.read_text()
        assert not list(storage.glob("stages/*/outcome.json"))  # nothing marked finished

        plugin.fix()
        rerun = sweep_on(ray_node, grid, storage, "--max-retries", "1")
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        rows = trials(storage, "flaky")
        assert sorted(rows.stage_id) == sorted(plan_stage_ids(grid))
        assert set(rows.status) == {"ok"}
