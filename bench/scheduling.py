"""1,000 no-op stages through the orchestrator on a local Ray: stages/s and driver CPU per stage.

`nptm`: a real plan of 1,000 stages (digits, ResNet-20: 1 pretrain, 9 prune, 990 retrain)
through `orchestrator.sweep._tune` itself, i.e. DagSearcher + the same Tuner settings
(reuse_actors, num_samples=-1, TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1, per-trial placement
group, progress callback), with the trainable swapped for one that only reports `finished`.
Baselines, each in its own process and local Ray with the same CPUs:
- `tune-basic`: the same Tuner settings over the same number of no-op trials without the DAG
  searcher or the progress callback (what Tune alone costs);
- `ray-tasks`: the same number of no-op Ray tasks of 1 CPU each (Ray's own ceiling).
Driver CPU is the driver process's user + system time (resource.getrusage) during the run;
"Ray CPU" is the CPU time of the processes Ray started (raylet, GCS, workers). Target:
>= 5 stages/s on 2 cores.

    .venv/bin/python bench/scheduling.py [--quick] [--json] [--stages 1000] [--variants ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import _common

TARGET = 5.0  # stages per second
VARIANTS = ("nptm", "tune-basic", "ray-tasks")
# n_stages -> (ratios, budgets): 1 pretrain + R prunes + R * 5 schedules * B retrains
SHAPES = {1000: (9, 22), 100: (9, 2)}


def noop_grid(n_stages: int) -> dict[str, Any]:
    """An in-memory grid whose plan has exactly `n_stages` stages (a key of SHAPES)."""
    if n_stages not in SHAPES:
        raise ValueError(f"n_stages: {n_stages} is not one of {sorted(SHAPES)}")
    n_ratios, n_budgets = SHAPES[n_stages]
    return {
        "name": f"bench-sched-{n_stages}",
        "max_trials": n_stages,
        "axes": {
            "dataset": ["digits"],
            "model": ["resnet20"],
            "pruner": [{"name": "magnitude", "ratio": [round(0.1 * (i + 1), 2)
                                                       for i in range(n_ratios)]}],
            "schedule": ["ft", "lrw", "wr", "slr", "clr"],
            "budget": list(range(1, n_budgets + 1)),
            "seed": [0],
        },
    }  # fmt: skip


def noop_trainable(config: dict[str, Any]) -> None:
    """Does nothing but end the way stage_trial ends."""
    from ray import tune

    tune.report({"finished": 1})


class _Outcomes:
    """Stands in for the ArtifactStore: every stage finished ok."""

    def __init__(self, root: str) -> None:
        from trainables.layout import Layout

        self.layout = Layout(root)

    def read_outcome(self, stage_id: str) -> Any:
        from trainables.stage import StageKind, StageOutcome, StageStatus

        return StageOutcome(stage_id, StageKind.RETRAIN, StageStatus.OK)

    def read_error(self, stage_id: str) -> None:
        return None


class _Sink:
    def __init__(self) -> None:
        self.recorded = 0

    def record(self, *args: Any, **kwargs: Any) -> None:
        self.recorded += 1


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_ray_processes() -> float:
    import psutil

    total = 0.0
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def run_variant(variant: str, n_stages: int, num_cpus: int) -> dict[str, Any]:
    """One variant in this process, with its own local Ray."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    from orchestrator.cluster import connect, disconnect

    cluster = connect(None, num_cpus=num_cpus)
    try:
        with tempfile.TemporaryDirectory(prefix="nptm-bench-sched-") as root:
            cpu0, ray0 = _cpu_self(), _cpu_ray_processes()
            t0 = time.perf_counter()
            done = {"nptm": _run_nptm, "tune-basic": _run_tune_basic, "ray-tasks": _run_tasks}[
                variant
            ](n_stages, root, cluster)
            wall = time.perf_counter() - t0
            cpu, ray_cpu = _cpu_self() - cpu0, _cpu_ray_processes() - ray0
    finally:
        disconnect()
    return {
        "variant": variant,
        "stages": done,
        "wall_s": wall,
        "stages_per_s": done / wall,
        "driver_cpu_ms_per_stage": cpu / done * 1e3,
        "ray_cpu_ms_per_stage": ray_cpu / done * 1e3,
    }


def _run_nptm(n_stages: int, root: str, cluster: Any) -> int:
    import orchestrator.sweep as sweep
    from orchestrator.planner import build_plan
    from search_spaces import parse_grid

    grid = parse_grid(noop_grid(n_stages), "<bench>")
    plan = build_plan(grid)
    assert len(plan.stages) == n_stages, len(plan.stages)
    sink = _Sink()
    opts = sweep.SweepOptions(storage=root)
    original = sweep.stage_trial
    sweep.stage_trial = noop_trainable  # _tune builds its Tuner around this name
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the progress lines
            sweep._tune(grid, plan, opts, cluster, _Outcomes(root), sink, set())
    finally:
        sweep.stage_trial = original
    return sink.recorded


def _run_tune_basic(n_stages: int, root: str, cluster: Any) -> int:
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(noop_trainable, lambda config: tune.PlacementGroupFactory(
            [{"CPU": 1.0}])),
        param_space={"i": tune.grid_search(list(range(n_stages)))},
        tune_config=tune.TuneConfig(num_samples=1, reuse_actors=True),
        run_config=tune.RunConfig(name="basic", storage_path=f"{root}/_ray", verbose=0),
    )  # fmt: skip
    results = tuner.fit()
    return len(results)


def _run_tasks(n_stages: int, root: str, cluster: Any) -> int:
    import ray

    @ray.remote(num_cpus=1)
    def noop(i: int) -> int:
        return i

    return len(ray.get([noop.remote(i) for i in range(n_stages)]))


def run_child(variant: str, n_stages: int, num_cpus: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(_common.ROOT)
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--stages", str(n_stages),
         "--num-cpus", str(num_cpus)],
        capture_output=True, text=True, env=env, timeout=3600,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=1000, help=f"one of {sorted(SHAPES)}")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args.child, args.stages, args.num_cpus)))
        return {}
    n = 100 if args.quick else args.stages
    info = _common.machine()
    results = {v: run_child(v, n, args.num_cpus) for v in args.variants.split(",") if v.strip()}
    print(_common.machine_line(info))
    print(
        f"{n:,} no-op stages, local Ray with {args.num_cpus} CPUs, each variant in its own process"
    )
    base = results.get("nptm")
    rows = []
    for v, r in results.items():
        rows.append(
            [v, r["stages"], r["wall_s"], r["stages_per_s"], r["driver_cpu_ms_per_stage"],
             r["ray_cpu_ms_per_stage"],
             base["stages_per_s"] / r["stages_per_s"] if base else float("nan")]
        )  # fmt: skip
    headers = ["variant", "stages", "wall s", "stages/s", "driver CPU ms/stage"]
    headers += ["Ray CPU ms/stage", "nptm x"]
    print(_common.table(headers, rows))
    verdict = None
    if base:
        verdict = base["stages_per_s"] >= TARGET
        _common.print_target(f">= {TARGET:g} stages/s", f"{base['stages_per_s']:.2f}", verdict)
    result = {"machine": info, "stages": n, "variants": results, "target_met": verdict}
    _common.emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
