"""Per-stage overhead of each executor: `nptm sweep` versus the training work it contains.

For each executor (`inline`; `train` with 1 and 2 DDP workers) a grid of K identical short
trials (digits, ResNet-20: pretrain 2 epochs -> magnitude 50% -> ft 1 epoch, seeds 0..K-1, so 3K
stages, 2K of them training) runs through `nptm sweep` in a subprocess with its own storage and
its own local Ray, one stage at a time (`max_concurrent: 1`), so the sweep's wall time is the
sum of its stages' times plus a fixed cost. Then the same command runs again: every stage is
done, so that second run is the fixed cost alone (Python and Ray start-up, MLflow, shutdown).

Figures per executor (training stages, i.e. pretrain/retrain):
- loop s: time inside the train loop (sum of the epochs table's `wall_s`: training + eval);
- in-stage s: `trials.wall_seconds` minus loop s (dataset load, model build, checkpoints, MACs);
- outside s: time between Tune suggesting the stage and the driver having recorded it, minus
  `trials.wall_seconds` (Tune scheduling, actor / Ray Train worker-group start, process-group
  set-up, teardown, the driver's Parquet + MLflow writes), from time stamps every process
  of the sweep writes (bench/sitetrace/sitecustomize.py, which wraps functions as their modules
  are imported; no product file is changed);
- overhead s = in-stage + outside; its share of a 30 s and a 5 min stage: o / (o + T).
The baseline is the bare training work: sweep wall (minus the fixed cost) / loop time.
Targets: inline <= 1 s per stage; train <= 5% of a 5-minute stage (<= 15 s).

    .venv/bin/python bench/overhead.py [--quick] [--json] [--trials K] [--executors ...]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import _common
import pandas as pd

TRACE_DIR = Path(__file__).resolve().parent / "sitetrace"
TARGET_INLINE_S = 1.0
TARGET_TRAIN_SHARE = 0.05  # of a 5-minute stage
SHARE_AT = (30.0, 300.0)
# What a Ray Train worker imports when its first stage arrives (torch, the train loop).
TRACED_IMPORT = "nptm.trainables.stage_runner"
EXECUTORS = {  # name -> (executor, workers, cpus per worker)
    "inline": ("inline", 1, 1.0),
    # 0.9: the Tune trial that drives a TorchTrainer takes 0.1 CPU, and 0.1 + 2 x 0.9 fits
    # this 2-core machine; either way each worker trains with one thread.
    "train-1w": ("train", 1, 0.9),
    "train-2w": ("train", 2, 0.9),
}
GRID = """\
name: {name}
data: {{val_fraction: 0.1}}
pretrain: {{epochs: 2, milestones: [1]}}
resources: {{executor: {executor}, workers_per_trial: {workers}, cpus_per_worker: {cpus},
            max_concurrent: 1}}
axes:
  dataset: digits
  model: resnet20
  pruner: [{{name: magnitude, ratio: 0.5}}]
  schedule: [ft]
  budget: 1
  seed: {seeds}
"""
TRAINING = ("pretrain", "retrain")


# -- pure helpers (tested in tests/test_bench_smoke.py) ---------------------------------------
def overhead_share(overhead_s: float, work_s: float) -> float:
    """Share of a stage's wall time that is overhead, for a stage with `work_s` of training."""
    return overhead_s / (overhead_s + work_s)


def in_stage_times(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """Per stage: wall_seconds, loop_s (sum of its epochs' wall_s) and in_stage_s (the rest)."""
    loop = epochs.groupby("stage_id")["wall_s"].sum()
    out = trials[["stage_id", "stage_kind", "wall_seconds"]].copy()
    out["loop_s"] = out["stage_id"].map(loop).fillna(0.0).astype(float)
    out["in_stage_s"] = out["wall_seconds"] - out["loop_s"]
    return out.set_index("stage_id")


def trace_phases(events: list[dict[str, Any]]) -> pd.DataFrame:
    """Per stage, seconds of each phase, from the time-stamp events of one sweep.

    Columns (NaN where a phase does not apply, e.g. Ray Train phases of an inline stage):
    schedule_s (suggest -> trainable entered), group_start_s (TorchTrainer.fit entered -> rank 0
    starts process-group set-up: controller, worker processes, imports), pg_s (process-group
    set-up on rank 0), dispatch_s (process group up -> rank 0's run_stage entered, which
    includes importing the train loop), stage_s (run_stage on rank 0), group_stop_s (rank 0's
    run_stage done -> fit returned),
    trial_exit_s (stage or fit done -> trainable returned), driver_s (trainable returned ->
    the driver has recorded the stage), total_s (suggest -> recorded); import_s: rank 0's
    import of nptm.trainables.stage_runner (torch, the train loop) within this stage, part of
    dispatch_s.
    """
    by_stage: dict[str, dict[str, float]] = defaultdict(dict)
    kinds: dict[str, str] = {}
    pg_by_pid: dict[int, list[tuple[str, float]]] = defaultdict(list)
    imports: dict[int, list[tuple[float, float]]] = defaultdict(list)  # of TRACED_IMPORT
    opened: dict[int, float] = {}
    rank0_pid: dict[str, int] = {}
    for e in sorted(events, key=lambda e: e["t"]):
        ev, sid = e["event"], e.get("stage")
        if ev in ("pg_enter", "pg_exit"):
            pg_by_pid[e["pid"]].append((ev, e["t"]))
            continue
        if ev in ("import_enter", "import_exit"):
            if e.get("module") == TRACED_IMPORT:
                if ev == "import_enter":
                    opened[e["pid"]] = e["t"]
                elif e["pid"] in opened:
                    imports[e["pid"]].append((opened.pop(e["pid"]), e["t"]))
            continue
        if sid is None:
            continue
        if e.get("kind"):
            kinds[sid] = e["kind"]
        if e.get("rank", 0) not in (0, -1):
            continue  # phases are timed on rank 0
        if ev == "worker_enter":
            rank0_pid[sid] = e["pid"]
        key = {"stage_enter": "stage_enter", "stage_exit": "stage_exit"}.get(ev, ev)
        by_stage[sid].setdefault(key, e["t"])  # first occurrence (retries aside)
        if ev in ("complete_exit", "trial_exit", "trainer_exit", "stage_exit"):
            by_stage[sid][key] = e["t"]  # last occurrence
    rows = []
    for sid, t in by_stage.items():
        if "suggest" not in t or "complete_exit" not in t:
            continue
        nan = float("nan")
        row = {"stage_id": sid, "stage_kind": kinds.get(sid), "suggested_at": t["suggest"]}
        row["schedule_s"] = t.get("trial_enter", nan) - t["suggest"]
        row["group_start_s"] = row["pg_s"] = row["dispatch_s"] = row["group_stop_s"] = nan
        row["import_s"] = nan
        if "trainer_enter" in t and sid in rank0_pid:
            pg = pg_by_pid.get(rank0_pid[sid], [])
            pg_in = next((x for ev, x in pg if ev == "pg_enter" and x >= t["trainer_enter"]), nan)
            pg_out = next((x for ev, x in pg if ev == "pg_exit" and x >= t["trainer_enter"]), nan)
            if pg_in == pg_in:  # a process group was set up (several workers)
                row["group_start_s"] = pg_in - t["trainer_enter"]
                row["pg_s"] = pg_out - pg_in
                row["dispatch_s"] = t.get("stage_enter", nan) - pg_out
            else:
                row["group_start_s"] = t["worker_enter"] - t["trainer_enter"]
                row["dispatch_s"] = t.get("stage_enter", nan) - t["worker_enter"]
            spans = [b - a for a, b in imports.get(rank0_pid[sid], []) if a >= t["trainer_enter"]]
            row["import_s"] = spans[0] if spans else 0.0
            row["group_stop_s"] = t["trainer_exit"] - t.get("stage_exit", nan)
            row["trial_exit_s"] = t.get("trial_exit", nan) - t["trainer_exit"]
        else:
            row["trial_exit_s"] = t.get("trial_exit", nan) - t.get("stage_exit", nan)
        row["stage_s"] = t.get("stage_exit", nan) - t.get("stage_enter", nan)
        row["driver_s"] = t["complete_exit"] - t.get("trial_exit", nan)
        row["total_s"] = t["complete_exit"] - t["suggest"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("stage_id") if rows else pd.DataFrame()


def summarise(
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    phases: pd.DataFrame,
    sweep_wall: float,
    fixed_wall: float,
) -> dict[str, Any]:
    """The figures of one executor's sweep (medians over its training stages)."""
    stages = in_stage_times(trials, epochs)
    train = stages[stages["stage_kind"].isin(TRAINING)]
    out: dict[str, Any] = {
        "stages": len(stages),
        "training_stages": len(train),
        "sweep_wall_s": sweep_wall,
        "fixed_s": fixed_wall,
        "loop_s_total": float(stages["loop_s"].sum()),
        "loop_s": float(train["loop_s"].median()),
        "in_stage_s": float(train["in_stage_s"].median()),
    }
    out["per_stage_wall_s"] = (sweep_wall - fixed_wall) / len(stages)
    out["wall_over_loop"] = (sweep_wall - fixed_wall) / out["loop_s_total"]
    if len(phases):
        joined = phases.join(stages[["wall_seconds"]], how="inner").sort_values("suggested_at")
        # The sweep's first stage also starts the first trial actor: a per-sweep cost, shown
        # apart (cold_start_s) and left out of the per-stage medians when others remain.
        out["cold_start_s"] = float(joined["schedule_s"].iloc[0])
        tp = joined[joined["stage_kind"].isin(TRAINING)]
        if len(tp) > 1 and tp.index[0] == joined.index[0]:
            tp = tp.iloc[1:]
        out["timed_training_stages"] = len(tp)
        outside = tp["total_s"] - tp["wall_seconds"]
        out["outside_s"] = float(outside.median())
        timed = stages.loc[tp.index]
        out["loop_s"] = float(timed["loop_s"].median())
        out["in_stage_s"] = float(timed["in_stage_s"].median())
        out["phases"] = {
            c: float(tp[c].median()) for c in tp.columns if c.endswith("_s") and tp[c].notna().any()
        }
        prune = joined[joined["stage_kind"] == "prune"]
        if len(prune):
            out["prune_outside_s"] = float((prune["total_s"] - prune["wall_seconds"]).median())
            out["prune_total_s"] = float(prune["total_s"].median())
    else:
        out["outside_s"] = out["cold_start_s"] = float("nan")
    out["overhead_s"] = out["in_stage_s"] + out["outside_s"]
    out["share"] = {f"{t:g}": overhead_share(out["overhead_s"], t) for t in SHARE_AT}
    return out


# -- running sweeps --------------------------------------------------------------------------
def run_sweep(
    workdir: Path, name: str, executor: str, trials: int, keep_trace: Path | None = None
) -> dict[str, Any]:
    ex, workers, cpus = EXECUTORS[executor]
    grid = workdir / f"{name}.yaml"
    seeds = "[" + ", ".join(str(s) for s in range(trials)) + "]"
    grid.write_text(GRID.format(name=name, executor=ex, workers=workers, cpus=cpus, seeds=seeds))
    storage = workdir / "runs"
    trace = workdir / "trace.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(TRACE_DIR), str(_common.ROOT)])
    env["NPTM_BENCH_TRACE"] = str(trace)
    cmd = [sys.executable, "-m", "nptm.orchestrator", "sweep", str(grid), "--storage", str(storage),
           "--no-report"]  # fmt: skip
    walls = []
    for attempt in ("run", "rerun"):
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=_common.ROOT, env=env, capture_output=True, text=True, timeout=3600
        )
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"nptm sweep ({executor}, {attempt}) failed:\n{proc.stderr[-3000:]}")
        if attempt == "run":
            events = [json.loads(line) for line in trace.read_text().splitlines() if line]
            if keep_trace is not None:
                keep_trace.mkdir(parents=True, exist_ok=True)
                shutil.copy(trace, keep_trace / f"{executor}.jsonl")
    base = storage / "sweeps" / name
    trials_df = pd.read_parquet(base / "stages")
    epochs_df = pd.read_parquet(base / "epochs")
    return summarise(trials_df, epochs_df, trace_phases(events), walls[0], walls[1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=3, help="K trials = 3K stages (default 3)")
    p.add_argument("--keep-trace", type=Path, help="copy each sweep's time stamps to DIR/")
    p.add_argument(
        "--executors", default=",".join(EXECUTORS), help="subset of " + str(list(EXECUTORS))
    )
    args = p.parse_args(argv)
    k = 1 if args.quick else args.trials
    names = [n.strip() for n in args.executors.split(",") if n.strip()]
    info = _common.machine()
    results: dict[str, Any] = {}
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"nptm-bench-{name}-") as d:
            results[name] = run_sweep(Path(d), f"bench-{name}", name, k, args.keep_trace)
    print(_common.machine_line(info))
    print(
        f"{k} trials = {3 * k} stages per executor, one stage at a time; medians over the "
        "training stages (pretrain 2 epochs, retrain 1 epoch; digits, ResNet-20) but the "
        "sweep's first, which also starts the first trial actor (cold start s)"
    )
    rows = []
    for name, r in results.items():
        rows.append(
            [name, r["stages"], r["sweep_wall_s"], r["fixed_s"], r["per_stage_wall_s"],
             r["cold_start_s"], r["loop_s"], r["in_stage_s"], r["outside_s"], r["overhead_s"],
             f"{r['share']['30']:.1%}", f"{r['share']['300']:.1%}", r["wall_over_loop"]]
        )  # fmt: skip
    print(
        _common.table(
            [
                "executor",
                "stages",
                "sweep s",
                "fixed s",
                "s/stage",
                "cold start s",
                "loop s",
                "in-stage s",
                "outside s",
                "overhead s",
                "of 30 s",
                "of 5 min",
                "wall/loop",
            ],
            rows,
        )
    )
    phase_names = ["schedule_s", "group_start_s", "pg_s", "dispatch_s", "import_s", "stage_s",
                   "group_stop_s", "trial_exit_s", "driver_s", "total_s"]  # fmt: skip
    print("\nwhere a training stage's time goes (median seconds, rank 0):")
    print(
        _common.table(
            ["executor", *[n[:-2] for n in phase_names]],
            [
                [n, *[r.get("phases", {}).get(c, float("nan")) for c in phase_names]]
                for n, r in results.items()
            ],
        )
    )
    verdicts = {}
    for name, r in results.items():
        if name == "inline":
            verdicts[name] = r["overhead_s"] <= TARGET_INLINE_S
            goal = f"<= {TARGET_INLINE_S:g} s/stage"
            got = f"{r['overhead_s']:.2f} s"
        else:
            verdicts[name] = r["share"]["300"] <= TARGET_TRAIN_SHARE
            goal = f"<= {TARGET_TRAIN_SHARE:.0%} of a 5-minute stage"
            got = f"{r['overhead_s']:.1f} s = {r['share']['300']:.1%}"
        _common.print_target(goal, got, verdicts[name], name)
    result = {"machine": info, "trials": k, "executors": results, "target_met": verdicts}
    _common.emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
