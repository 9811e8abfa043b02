"""bench/gpu.py: refuses without a GPU, and its dry run (CPU, tiny sizes, the same code paths as
on the GPU) writes every section with figures consistent with each other."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.lane import LaneJob, lane

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_refuses_without_cuda_and_writes_nothing(tmp_path: Path) -> None:
    out = _run(str(tmp_path / "out"))
    assert out.returncode == 2, out.stderr
    assert "no CUDA device is visible" in out.stderr and "--dry-run" in out.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_cannot_write_figures(tmp_path: Path) -> None:
    out = _run(str(tmp_path / "out"), "--dry-run", "--write-figures")
    assert out.returncode == 2
    assert "--write-figures" in out.stderr


def _dry_run(job: LaneJob) -> tuple[subprocess.CompletedProcess[str], Path]:
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", str(job.tmp)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
        env=job.env | {"PYTHON": sys.executable},
    )  # fmt: skip
    return proc, job.tmp


@pytest.mark.slow
@lane(_dry_run)
def test_dry_run_writes_every_section(lane_result) -> None:
    proc, out = lane_result
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "gpu.json").read_text())
    assert res["dry_run"] is True
    for section in ("throughput", "epoch_seconds", "packing", "ddp", "compile"):
        assert "error" not in res[section] and "skipped" not in res[section], section

    t = res["throughput"]
    assert set(t["samples_per_s"]) == {"nptm", "nptm-bf16", "nptm-host-data", "ref-w0"}
    assert all(_positive(v) for v in t["samples_per_s"].values())
    assert t["ratio"] == pytest.approx(t["samples_per_s"]["nptm"] / t["samples_per_s"]["ref-w0"])
    assert t["met"] == (t["ratio"] >= 3.0)
    assert all(_positive(b["samples_per_s"]) for b in t["bare"].values())
    assert _positive(res["compile"]["samples_per_s"])

    (row,) = res["epoch_seconds"]["rows"]
    assert (row["model"], row["dataset"], row["batch"]) == ("resnet20", "cifar10", 4)
    assert row["steps_per_epoch"] == math.ceil(50_000 / 4)
    # seconds/epoch = steps per epoch x seconds per step = steps x batch / samples/s
    assert row["seconds_per_epoch"] == pytest.approx(
        row["steps_per_epoch"] * row["batch"] / row["samples_per_s"]
    )
    figures = json.loads((out / "gpu_figures.json").read_text())
    assert figures["seconds_per_epoch"] == [
        {k: row[k] for k in ("model", "dataset", "batch", "seconds_per_epoch")}
    ]

    p = res["packing"]
    assert p["ray"] in ("ray not installed", "installed (not used by this script)")
    for key, n in (("alone", 1), ("packed", 2)):
        run = p[key]
        assert run["processes"] == n and run["stages"] >= n and run["all_ok"]
        assert run["stages_per_hour"] == pytest.approx(run["stages"] / run["window_s"] * 3600)
        util = run["gpu_util"]
        assert util["source"] in ("nvml", "nvidia-smi", "unavailable")
        assert (util["samples"] == 0) == (util["source"] == "unavailable")
    assert p["packed_over_alone"] == pytest.approx(
        p["packed"]["stages_per_hour"] / p["alone"]["stages_per_hour"]
    )

    d = res["ddp"]
    assert d["backend"] == "gloo" and d["all_reduce_ok"] and d["ddp_step_ok"]
    assert d["stage"]["status"] == "ok"
    assert d["outside_loop_s"] == pytest.approx(d["stage"]["stage_wall_s"] - d["stage"]["loop_s"])

    md = (out / "gpu.md").read_text()
    assert proc.stdout.rstrip().endswith(md.rstrip())  # the summary is printed last
    assert "| throughput | nptm / ref-w0 (target >= 3x) |" in md
