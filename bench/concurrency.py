"""How many stages of one sweep run at the same moment: eight retrains runnable at once.

The grid of tests/test_faults.py's concurrency test (digits, ResNet-20, one magnitude prune,
four schedules x two budgets = eight retrains, 0.25 CPU per stage, max_concurrent 8) runs on a
local Ray through `nptm sweep` in this process. Three figures, from the least to the most
dependent on the machine:
- handed out: the most stages the DAG searcher had handed to Tune at once (the test asserts 8);
- Tune running: the most trials Tune had RUNNING at once (a trial runs once its actor booted);
- overlap: the most stage executions running at the same instant, from each stage's own
  started_at / ended_at in the Parquet table.
How many overlap depends on how fast the machine boots Tune's worker processes: while seven
actors boot on a busy 2-core machine, the first one may finish stages alone. Target: overlap
>= 2 on 2 cores.

    .venv/bin/python bench/concurrency.py [--json]    (--quick: the same run)
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import _common

TARGET_OVERLAP = 2
GRID = """\
name: conc
data: {{val_fraction: 0.1}}
pretrain: {{epochs: 2, milestones: [1]}}
resources: {{executor: inline, workers_per_trial: 1, cpus_per_worker: 0.25, max_concurrent: 8}}
axes:
  dataset: digits
  model: resnet20
  pruner: [{{name: magnitude, ratio: 0.5}}]
  schedule: [ft, slr, clr, scratch]
  budget: [1, 2]
  seed: 0
"""


def peak_overlap(windows: list[tuple[float, float]]) -> int:
    """The most (start, end) windows open at one instant; one ending as another starts at
    the same time stamp does not count as overlapping."""
    events = sorted([(a, 1) for a, _ in windows] + [(b, -1) for _, b in windows])
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def run(storage: Path) -> dict[str, Any]:
    import pandas as pd

    from nptm.orchestrator.cli import main
    from tests.sweep_helpers import watched_concurrency  # the same watch the test suite uses

    grid = storage.parent / "conc.yaml"
    grid.write_text(GRID.format())
    with watched_concurrency() as peaks, contextlib.redirect_stdout(io.StringIO()):
        rc = main(["sweep", str(grid), "--storage", str(storage), "--no-report"])
    assert rc == 0, f"the sweep failed (exit {rc})"
    rows = pd.read_parquet(storage / "sweeps" / "conc" / "stages")
    retrain = rows[rows.stage_kind == "retrain"]
    windows = [(r.started_at.timestamp(), r.ended_at.timestamp()) for r in retrain.itertuples()]
    return {**peaks, "overlap": peak_overlap(windows), "retrains": len(retrain)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    info = _common.machine()
    with tempfile.TemporaryDirectory(prefix="nptm-bench-conc-") as d:
        res = run(Path(d) / "runs")
    print(_common.machine_line(info))
    headers = ["retrains", "handed out", "Tune running", "overlap"]
    print(
        _common.table(
            headers, [[res[k] for k in ("retrains", "handed_out", "tune_running", "overlap")]]
        )
    )
    _common.print_target(
        f"overlap >= {TARGET_OVERLAP}", str(res["overlap"]), res["overlap"] >= TARGET_OVERLAP
    )
    result = {"machine": info, **res}
    _common.emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
