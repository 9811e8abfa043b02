"""An `s3://` storage root end to end, on an S3-compatible server started here (moto's server
mode on 127.0.0.1, tests/s3_server.py): the sweep on the session's Ray node, its rerun from
the outcome index, `nptm report` and `nptm status`, and where everything lands in the bucket.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from nptm.results.store import SweepStore
from nptm.trainables.storage import resolve_storage
from tests.sweep_helpers import cli_in_process, plan_stage_ids, seed_stages, write_grid

pytestmark = pytest.mark.slow

MAGNITUDE = "{name: magnitude, ratio: 0.5}"


def _keys(fs: pafs.FileSystem, root: str) -> set[str]:
    selector = pafs.FileSelector(root, recursive=True)
    return {
        i.path.removeprefix(root + "/")
        for i in fs.get_file_info(selector)
        if i.type == pafs.FileType.File
    }


def test_sweep_report_and_status_on_s3(s3_server, ray_node, tiny_sweep, tmp_path: Path) -> None:
    bucket = s3_server.bucket("nptm-e2e")
    storage = s3_server.uri(f"{bucket}/runs")
    fs, root, _ = resolve_storage(storage)
    grid = write_grid(
        tmp_path / "ons3.yaml", name="ons3", pruners=(MAGNITUDE,), schedules="[ft]", budget="1"
    )
    # The session's pre-training and prune, uploaded: only the retrain trains here.
    seed = tmp_path / "seed"
    seeded = seed_stages(tiny_sweep.storage, seed, grid, kinds=("pretrain", "prune"))
    pafs.copy_files(
        str(seed / "stages"), f"{root}/stages",
        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
    )  # fmt: skip
    stage_ids = plan_stage_ids(grid)
    assert len(stage_ids) == 3 and len(seeded) == 2

    mlflow = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["sweep", str(grid), "--storage", storage, "--address", ray_node.address,
            "--mlflow-uri", mlflow]  # fmt: skip
    first = cli_in_process(argv)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "executed 1, reused 2" in first.stdout, first.stdout + first.stderr[-6000:]
    keys = _keys(fs, root)
    sweep = "sweeps/ons3"
    for sid in stage_ids:
        assert f"{sweep}/stages/{sid}.parquet" in keys and f"stages/{sid}/outcome.json" in keys
    # The sweep's own report, the snapshots and the outcome index: all in the bucket.
    assert {
        f"{sweep}/report/report.md",
        f"{sweep}/stages.parquet",
        f"{sweep}/epochs.parquet",
    } <= keys
    assert any(k.startswith("stages/_index/") for k in keys)
    snapshot = pq.read_table(f"{root}/{sweep}/stages.parquet", filesystem=fs)
    assert sorted(snapshot["stage_id"].to_pylist()) == sorted(stage_ids)
    assert set(snapshot["status"].to_pylist()) == {"ok"}

    # A rerun starts from one listing and the index: not one outcome.json is read.
    s3_server.requests()
    second = cli_in_process([*argv, "--no-report"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "executed 0, reused 3" in second.stdout, second.stdout
    reads = [p for m, p in s3_server.requests() if m == "GET" and p.endswith("/outcome.json")]
    assert reads == []

    out = tmp_path / "local-report"
    report = cli_in_process(["report", "ons3", "--storage", storage, "--out", str(out)])
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"{storage.split('?')[0]}/{sweep}/report/report.md" in report.stdout
    stored = fs.open_input_stream(f"{root}/{sweep}/report/report.md").read().decode()
    assert stored == (out / "report.md").read_text() and "ons3" in stored
    csvs = {k for k in _keys(fs, f"{root}/{sweep}/report") if k.endswith(".csv")}
    assert csvs == {p.name for p in out.glob("*.csv")} and csvs

    status = cli_in_process(["status", "ons3", "--storage", storage, "--json"])
    assert status.returncode == 0, status.stderr[-3000:]
    assert json.loads(status.stdout)["stages"] == 3
    assert len(SweepStore(storage, "ons3").read_stages()) == 3
