"""No-op stages through the orchestrator on a local Ray: stages/s and driver cost per stage.

`nptm`: a real plan of 1,000 / 4,000 / 10,000 stages (digits, ResNet-20, 1 / 4 / 10 seeds,
each 1 pretrain, 9 prunes, 990 retrains) through `nptm.orchestrator.tuner.run_trials` itself, i.e.
DagSearcher + the same Tuner settings (reuse_actors, num_samples=-1, the plan through the
object store, TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1, per-trial placement group, progress
callback, experiment snapshots only at the end), with the trainable swapped for one that only
reports an ok outcome. Baselines, each in its own process and local Ray with the same CPUs:
- `tune-basic`: the same Tuner settings over the same number of no-op trials without the DAG
  searcher or the progress callback (what Tune alone costs);
- `ray-tasks`: the same number of no-op Ray tasks of 1 CPU each (Ray's own ceiling).
Driver CPU is the driver process's user + system time (resource.getrusage) during the run;
"Ray CPU" is the CPU time of the processes Ray started (raylet, GCS, workers); driver peak
RSS is the driver process's maximum resident set; "workers started" counts the Python worker
processes (`default_worker.py`, `ray::IDLE` while idle) the raylet started during the run,
polled every 0.1 s; "Tune state" is what Tune left under its storage path (experiment-state
snapshots, searcher and callback state, per-trial directories). Targets: >= 10 stages/s on
2 cores, and per-stage driver CPU and wall at 10,000 stages within 1.5x of those at 1,000.

    .venv/bin/python bench/scheduling.py [--quick] [--json] [--stages 1000|4000|10000]
        [--variants nptm,tune-basic,ray-tasks]
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
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import _common

TARGET = 10.0  # stages per second
VARIANTS = ("nptm", "tune-basic", "ray-tasks")
# n_stages -> (seeds, ratios, budgets): per seed 1 pretrain + R prunes + R * 5 schedules * B
# retrains
SHAPES = {100: (1, 9, 2), 1000: (1, 9, 22), 4000: (4, 9, 22), 10000: (10, 9, 22)}


def noop_grid(n_stages: int) -> dict[str, Any]:
    """An in-memory grid whose plan has exactly `n_stages` stages (a key of SHAPES)."""
    if n_stages not in SHAPES:
        raise ValueError(f"n_stages: {n_stages} is not one of {sorted(SHAPES)}")
    n_seeds, n_ratios, n_budgets = SHAPES[n_stages]
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
            "seed": list(range(n_seeds)),
        },
    }  # fmt: skip


def noop_trainable(config: dict[str, Any], **shared: Any) -> None:
    """Does nothing but end the way stage_trial ends: an ok outcome in its last report
    (`shared`: what `run_trials` passes along)."""
    from ray import tune

    from nptm.orchestrator.trial import OUTCOME, stage_id_of
    from nptm.trainables.stage import StageKind, StageOutcome, StageStatus
    from nptm.trainables.stage_index import outcome_json

    ok = StageOutcome(stage_id_of(config), StageKind.RETRAIN, StageStatus.OK)
    tune.report({OUTCOME: outcome_json(ok)})


class _Sink:
    """The result sink without Parquet or MLflow: counts the stages that ended."""

    def __init__(self) -> None:
        self.recorded = 0
        self.recorder = self  # the monitor logs epochs through sink.recorder
        self.summary = SimpleNamespace(sweep="bench")

    def record(self, *args: Any, **kwargs: Any) -> None:
        self.recorded += 1

    def start_stage(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_epoch(self, *args: Any, **kwargs: Any) -> None:
        pass


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


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class WorkerStarts:
    """Counts the Python worker processes Ray starts while inside: polls this driver's
    descendants (the raylet's children) for `default_worker.py` processes not seen before."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.seen: set[tuple[int, float]] = set()
        self.started = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _workers(self) -> set[tuple[int, float]]:
        import psutil

        found = set()
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if any("default_worker.py" in part for part in p.cmdline()):
                    found.add((p.pid, p.create_time()))
        return found

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            new = self._workers() - self.seen
            self.started += len(new)
            self.seen |= new

    def __enter__(self) -> WorkerStarts:
        self.seen = self._workers()  # already running before the sweep: not counted
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tune_state(ray_dir: Path) -> dict[str, Any]:
    """What Tune left under its storage path: bytes in all, the largest experiment-state
    snapshot, and the number of per-trial directories."""
    files = [p for p in ray_dir.rglob("*") if p.is_file()]
    snapshots = [p.stat().st_size for p in files if p.name.startswith("experiment_state")]
    experiments = [p for p in ray_dir.iterdir() if p.is_dir()] if ray_dir.is_dir() else []
    return {
        "tune_state_bytes": sum(p.stat().st_size for p in files),
        "experiment_state_bytes": max(snapshots, default=0),
        "trial_dirs": sum(1 for e in experiments for d in e.iterdir() if d.is_dir()),
    }


def run_variant(variant: str, n_stages: int, num_cpus: int) -> dict[str, Any]:
    """One variant in this process, with its own local Ray."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    from nptm.orchestrator.cluster import connect, disconnect
    from nptm.trainables.layout import Layout

    cluster = connect(None, num_cpus=num_cpus)
    try:
        with tempfile.TemporaryDirectory(prefix="nptm-bench-sched-") as root:
            cpu0, ray0 = _cpu_self(), _cpu_ray_processes()
            t0 = time.perf_counter()
            with WorkerStarts() as workers:
                done = {"nptm": _run_nptm, "tune-basic": _run_tune_basic, "ray-tasks": _run_tasks}[
                    variant
                ](n_stages, root, cluster)
            wall = time.perf_counter() - t0
            cpu, ray_cpu = _cpu_self() - cpu0, _cpu_ray_processes() - ray0
            state = tune_state(Path(Layout(root).ray_dir))
    finally:
        disconnect()
    return {
        "variant": variant,
        "stages": done,
        "wall_s": wall,
        "stages_per_s": done / wall,
        "driver_cpu_ms_per_stage": cpu / done * 1e3,
        "ray_cpu_ms_per_stage": ray_cpu / done * 1e3,
        "driver_peak_rss_mib": _peak_rss_mib(),
        "workers_started_per_100": workers.started / done * 100,
        **state,
    }


def _run_nptm(n_stages: int, root: str, cluster: Any) -> int:
    import nptm.orchestrator.tuner as tuner
    from nptm.orchestrator.dag_search import DagSearcher
    from nptm.orchestrator.monitor import SweepMonitor
    from nptm.orchestrator.planner import build_plan
    from nptm.orchestrator.signals import StopSignals
    from nptm.orchestrator.sweep import SweepOptions, _resolver, _runtime
    from nptm.results.run_record import RunRecord
    from nptm.search_spaces import parse_grid
    from nptm.trainables.artifacts import ArtifactStore
    from nptm.trainables.layout import Layout

    grid = parse_grid(noop_grid(n_stages), "<bench>")
    plan = build_plan(grid)
    assert len(plan.stages) == n_stages, len(plan.stages)
    sink = _Sink()
    artifacts = ArtifactStore(root)
    searcher = DagSearcher(plan.stages, set(), _resolver(artifacts), sink.record)
    runtime = _runtime(plan, SweepOptions(storage=root), artifacts)
    original = tuner.stage_trial
    tuner.stage_trial = noop_trainable  # run_trials builds its Tuner around this name
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the progress lines
            # The driver's monitor as a sweep runs it (progress.json), minus MLflow.
            record = RunRecord(Layout(root), grid.name)
            monitor = SweepMonitor(searcher, sink, record, StopSignals(), sys.stderr)
            tuner.run_trials(
                grid.name, searcher, monitor, runtime, grid.resources, cluster, artifacts, 2
            )
    finally:
        tuner.stage_trial = original
    return sink.recorded


def _run_tune_basic(n_stages: int, root: str, cluster: Any) -> int:
    from ray import tune

    from nptm.trainables.layout import Layout

    tuner = tune.Tuner(
        tune.with_resources(noop_trainable, lambda config: tune.PlacementGroupFactory(
            [{"CPU": 1.0}])),
        param_space={"i": tune.grid_search(list(range(n_stages)))},
        tune_config=tune.TuneConfig(num_samples=1, reuse_actors=True),
        run_config=tune.RunConfig(name="basic", storage_path=Layout(root).ray_dir, verbose=0),
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


def readme_row(r: dict[str, Any]) -> str:
    """One row of bench/README.md's scheduling table, for the nptm variant."""
    cells = [
        f"{r['stages']:,}", f"{r['wall_s']:.0f}", f"{r['stages_per_s']:.1f}",
        f"{r['driver_cpu_ms_per_stage']:.1f}", f"{r['ray_cpu_ms_per_stage']:.1f}",
        f"{r['driver_peak_rss_mib']:.0f}", f"{r['workers_started_per_100']:.1f}",
        f"{r['tune_state_bytes'] / 2**20:.2f}", f"{r['trial_dirs']:,}",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


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
             r["ray_cpu_ms_per_stage"], r["driver_peak_rss_mib"], r["workers_started_per_100"],
             r["tune_state_bytes"] / 2**20, r["trial_dirs"],
             base["stages_per_s"] / r["stages_per_s"] if base else float("nan")]
        )  # fmt: skip
    headers = ["variant", "stages", "wall s", "stages/s", "driver CPU ms/stage"]
    headers += ["Ray CPU ms/stage", "driver peak RSS MiB", "workers started /100 stages"]
    headers += ["Tune state MiB", "trial dirs", "nptm x"]
    print(_common.table(headers, rows))
    verdict = None
    if base:
        verdict = base["stages_per_s"] >= TARGET
        _common.print_target(f">= {TARGET:g} stages/s", f"{base['stages_per_s']:.2f}", verdict)
        print("README row: " + readme_row(base))
    result = {"machine": info, "stages": n, "variants": results, "target_met": verdict}
    _common.emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
