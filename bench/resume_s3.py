"""Resume and reads of a 10,000-stage sweep on object storage (a local S3-compatible server:
moto's server mode on 127.0.0.1, tests/s3_server.py, which logs every request it answers).

A real plan of N stages (digits, ResNet-20: 1 pretrain, 9 or 99 prunes, the rest retrains) is stored
as if it had run, without training: each stage's outcome.json (small, two epochs) and its rows
in the sweep's per-stage Parquet files, written as the driver writes them (`stage_rows` +
`SweepStore.write_stage`). Then, each in seconds and requests the server answered:
- sweep start (`nptm.orchestrator.sweep._finished_stages`): one read of outcome.json per stage
  as before the index (`per-stage reads`), the first start that builds the index (`rebuild`),
  and a start with the index (`indexed`);
- compaction of the per-stage files into the snapshots (`SweepStore.compact`), whole and
  after 100 more stages;
- reading the stages table from the snapshot vs from the per-stage files alone.
`seconds` is wall time; `client_cpu_s` the CPU time of this process (nptm's side): the
server is Python too, on the same cores, and answers a listing of 1,000 keys far slower than
S3 does, so on a small machine `seconds` is mostly the server's.

`--start-only` stores the outcomes only (no table rows: a third of the PUTs) and measures
the index rebuild and the indexed start (and, apart, its two parts: the listing of `stages/`
and the index read), nothing else: minutes instead of a quarter hour. The bucket then holds
a third of the keys, which moto scans at every listing page.

    .venv/bin/python bench/resume_s3.py [--quick] [--json] [--stages 10000] [--start-only]
"""

from __future__ import annotations

import collections
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _common

# n_stages -> (ratios, budgets): 1 pretrain + R prunes + R * 5 schedules * B retrains
SHAPES = {10_000: (99, 20), 1_000: (9, 22), 100: (9, 2)}
TARGET_START_S = 10.0  # "a rerun of a 10,000-stage sweep starts in seconds"
THREADS = 16


def plan_of(n_stages: int) -> Any:
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import parse_grid

    if n_stages not in SHAPES:
        raise ValueError(f"--stages: {n_stages} is not one of {sorted(SHAPES)}")
    n_ratios, n_budgets = SHAPES[n_stages]
    grid = {
        "name": f"bench-resume-{n_stages}",
        "max_trials": n_stages,
        "axes": {
            "dataset": ["digits"],
            "model": ["resnet20"],
            "pruner": [{"name": "magnitude",
                        "ratio": [round((i + 1) / (n_ratios + 1), 3) for i in range(n_ratios)]}],
            "schedule": ["ft", "lrw", "wr", "slr", "clr"],
            "budget": list(range(1, n_budgets + 1)),
            "seed": [0],
        },
    }  # fmt: skip
    plan = build_plan(parse_grid(grid, "<bench>"))
    assert len(plan.stages) == n_stages, len(plan.stages)
    return grid["name"], plan


def fake_outcome(spec: Any) -> Any:
    from nptm.trainables.stage import EpochMetrics, StageOutcome

    epochs = tuple(EpochMetrics(e, 0.1, 1.0, 0.5, None, None, 1.1, 0.6, 0.5, 100) for e in (1, 2))
    return StageOutcome(
        spec.id, spec.kind, "ok", test_acc=0.6, epochs_run=2, epochs=epochs,
        started_at=time.time() - 5, ended_at=time.time(), attempts=1,
    )  # fmt: skip


def populate(
    server: Any, bucket: str, storage: str, sweep: str, specs: list[Any], rows: bool = True
) -> None:
    """Every stage's outcome.json (and a pre-training's rewind checksums) and, with `rows`,
    its table rows, as nptm writes them, each sent in one PUT (boto3: pyarrow uploads in three
    requests)."""
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nptm.results.schema import rows_to_table
    from nptm.results.sink import stage_rows
    from nptm.trainables.artifacts import checksum_name, rewind_name
    from nptm.trainables.layout import EPOCHS_TABLE, STAGES_TABLE, Layout
    from nptm.trainables.stage_index import outcome_json

    s3 = boto3.client("s3", endpoint_url=f"http://{server.endpoint}", region_name="us-east-1")
    layout = Layout(storage)
    prefix = f"{bucket}/"

    def put(path: str, data: bytes) -> None:
        s3.put_object(Bucket=bucket, Key=path.removeprefix(prefix), Body=data)

    def parquet(table: str, rows: list[dict]) -> bytes:
        buf = pa.BufferOutputStream()
        pq.write_table(rows_to_table(table, rows), buf)
        return buf.getvalue().to_pybytes()

    def one(spec: Any) -> None:
        outcome = fake_outcome(spec)
        put(layout.stage_file(spec.id, "outcome.json"), outcome_json(outcome).encode())
        for e in spec.keep_epochs:
            put(layout.stage_file(spec.id, checksum_name(rewind_name(e))), b"0" * 64)
        if not rows:
            return
        row, epochs = stage_rows(sweep, spec, outcome, reused=False, executor="inline")
        keys = {"sweep": sweep, "stage_id": spec.id, "stage_kind": spec.kind.value}
        put(layout.table_file(sweep, EPOCHS_TABLE, spec.id),
            parquet(EPOCHS_TABLE, [{**keys, **e} for e in epochs]))  # fmt: skip
        put(layout.table_file(sweep, STAGES_TABLE, spec.id), parquet(STAGES_TABLE, [row]))

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(one, specs))


def per_stage_reads(plan: Any, storage: str) -> dict[str, Any]:
    """What `_finished_stages` did before the index: one outcome read per stage (and a
    checksum probe per rewind checkpoint), one after another."""
    from nptm.trainables.artifacts import ArtifactStore, rewind_name

    artifacts = ArtifactStore(storage)
    done: dict[str, Any] = {}
    for sid, spec in plan.stages.items():
        if any(p not in done for p in spec.parents):
            continue
        outcome = artifacts.read_outcome(sid)
        if outcome is None or not outcome.status.finished:
            continue
        if not all(artifacts.exists(sid, rewind_name(e)) for e in spec.keep_epochs):
            continue
        done[sid] = outcome
    return done


def measure(server: Any, label: str, fn: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    server.requests()  # from here
    t0, cpu0 = time.perf_counter(), time.process_time()
    value = fn()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    methods = collections.Counter(m for m, _ in server.requests())
    row = {"step": label, "seconds": seconds, "client_cpu_s": cpu,
           "requests": sum(methods.values()), **methods}  # fmt: skip
    return row, value


def run(n_stages: int, start_only: bool = False) -> dict[str, Any]:
    import nptm.results.store as store_mod
    from nptm.orchestrator.sweep import _finished_stages
    from nptm.results.store import SweepStore
    from nptm.trainables.artifacts import ArtifactStore
    from nptm.trainables.layout import STAGES_TABLE
    from nptm.trainables.stage_index import StageIndex, list_stage_files
    from tests.s3_server import S3Server

    os.environ.update(S3Server.env)
    sweep, plan = plan_of(n_stages)
    with (
        tempfile.TemporaryDirectory(prefix="nptm-bench-s3-") as tmp,
        S3Server(Path(tmp) / "moto.log") as server,
    ):
        bucket = server.bucket("bench")
        storage = server.uri(f"{bucket}/runs")
        rows = []
        specs = list(plan.stages.values())
        row, _ = measure(
            server,
            "populate" + (": outcomes only" if start_only else ""),
            lambda: populate(server, bucket, storage, sweep, specs, rows=not start_only),
        )
        rows.append(row)
        if not start_only:
            row, old = measure(
                server, "start: per-stage reads", lambda: per_stage_reads(plan, storage)
            )
            rows.append(row)
            assert len(old) == n_stages
        row, rebuilt = measure(server, "start: rebuild index",
                               lambda: _finished_stages(plan, ArtifactStore(storage)))  # fmt: skip
        rows.append(row)
        row, indexed = measure(server, "start: indexed",
                               lambda: _finished_stages(plan, ArtifactStore(storage)))  # fmt: skip
        rows.append(row)
        assert len(rebuilt) == len(indexed) == n_stages
        if start_only:
            # The indexed start's two parts: the listing of stages/ and the index files.
            layout = ArtifactStore(storage).layout
            row, _ = measure(server, "  its listing of stages/", lambda: list_stage_files(layout))
            rows.append(row)
            row, _ = measure(server, "  its index read", lambda: StageIndex(layout).entries())
            rows.append(row)
            return {"stages": n_stages, "steps": rows, "machine": _common.machine()}

        row, _ = measure(server, "compact: whole", lambda: SweepStore(storage, sweep).compact())
        rows.append(row)
        # 100 stages written again after the snapshot (a sweep that went on), then compacted.
        more = list(plan.stages.values())[: min(100, n_stages)]
        populate(server, bucket, storage, sweep, more)
        row, _ = measure(server, f"compact: +{len(more)} stages",
                         lambda: SweepStore(storage, sweep).compact())  # fmt: skip
        rows.append(row)

        read = lambda: SweepStore(storage, sweep).read_table(STAGES_TABLE)  # noqa: E731
        row, snap = measure(server, "read stages: snapshot", read)
        rows.append(row)
        store_mod.COMPACT_AFTER_FILES = 10**9  # read the per-stage files, write nothing
        fs = SweepStore(storage, sweep)
        fs.fs.delete_file(fs.snapshot_path(STAGES_TABLE))
        row, files = measure(server, "read stages: per-stage files", read)
        rows.append(row)
        assert snap.num_rows == files.num_rows == n_stages
        assert snap.equals(files), "the snapshot is not the per-stage files' table"

    by = {r["step"]: r for r in rows}

    def ratio(a: str, b: str, key: str) -> float:
        return by[a][key] / max(by[b][key], 1e-9)

    return {
        "stages": n_stages,
        "steps": rows,
        "start_speedup": ratio("start: per-stage reads", "start: indexed", "seconds"),
        "start_request_ratio": ratio("start: per-stage reads", "start: indexed", "requests"),
        "read_speedup": ratio("read stages: per-stage files", "read stages: snapshot", "seconds"),
        "read_request_ratio": ratio(
            "read stages: per-stage files", "read stages: snapshot", "requests"
        ),
        "machine": _common.machine(),
    }


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=10_000, choices=sorted(SHAPES))
    p.add_argument("--start-only", action="store_true", help="outcomes only; start steps only")
    args = p.parse_args()
    n = 100 if args.quick else args.stages
    result = run(n, args.start_only)
    print(_common.machine_line(result["machine"]))
    headers = [
        "step",
        "seconds",
        "client_cpu_s",
        "requests",
        "GET",
        "HEAD",
        "PUT",
        "POST",
        "DELETE",
    ]
    print(_common.table(headers, [[r.get(h, 0) for h in headers] for r in result["steps"]]))
    if not args.start_only:
        print(
            f"sweep start, indexed vs per-stage reads: {result['start_speedup']:.1f}x faster, "
            f"{result['start_request_ratio']:.0f}x fewer requests"
        )
        print(
            f"stages table, snapshot vs per-stage files: {result['read_speedup']:.1f}x faster, "
            f"{result['read_request_ratio']:.0f}x fewer requests"
        )
    indexed = next(r for r in result["steps"] if r["step"] == "start: indexed")
    _common.print_target(
        f"start of a {n:,}-stage rerun < {TARGET_START_S:g} s",
        f"{indexed['seconds']:.2f} s, {indexed['requests']} requests",
        indexed["seconds"] < TARGET_START_S,
    )
    _common.emit(result, args.json)


if __name__ == "__main__":
    main()
