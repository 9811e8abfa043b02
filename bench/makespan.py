"""Makespan of the shipped paper grids on S slots: FIFO against longest-path-first, simulated,
then the simulation checked against a Tune run on a Ray cluster.

1. Simulated (`nptm.orchestrator.makespan.simulate`, which drives the sweep's own DagSearcher):
   every `search_spaces/paper_*.yaml` plan on 8, 64 and 512 identical slots (stages at once),
   each stage holding a slot for its planned seconds (`nptm.orchestrator.stage_cost`: epochs x
   the measured seconds per epoch of `orchestrator/gpu_figures.json`, + the executor's start-up,
   20 s for `train`), handed out in the order the stages became runnable (`fifo`, the searcher
   before) or the longest remaining path first (`critical_path`, the searcher now). Against the
   lower bound LB = max(critical path, total work / S), and a tighter one, LB+ (below). A grid
   with an unmeasured (model, dataset) is costed in MAC-samples for every stage: its ratios
   stand, its hours are not given.
2. Real: a `ray.cluster_utils.Cluster` of `--nodes` nodes declaring 8 GPUs in all (no GPU
   needed) runs a reduced PFEC plan through Tune as `nptm.orchestrator.tuner.run_trials` does (the
   DagSearcher with the sweep's costs, the NewestPendingFirst scheduler, actor reuse, the trial
   cap, one trial bundle for every kind), its trainable swapped for one that sleeps its stage's
   planned seconds on a scaled clock (the simulated critical-path makespan = `--target-s`
   seconds). The grid runs `executor: inline` at 0.5 GPU per stage (the trial actor holds its
   share itself, so the declared GPUs make the 16 slots; start-up 0.2 s) with
   `resources.max_concurrent` = the slots, as bench/README.md advises for a cluster. Measured
   makespan (first stage start to last stage end, as the stages saw them) against the
   simulated one: target within 10 %. "Actor wait" is how long a stage, once handed out,
   waited for a trial actor: Ray's start of an actor is not scaled with the clock.

LB+: no stage can run before its earliest start E_i (the longest chain of its ancestors), so at
any time t at most min(c_i, max(0, t - E_i)) of stage i can be done, and the makespan is at
least t + (the work left at t) / S; LB+ is the largest of these over t in {E_i}, and LB.

    .venv/bin/python bench/makespan.py [--quick] [--json] [--slots 8,64,512] [--no-cluster]
        [--orders critical_path[,fifo]] [--nodes 4] [--gpus-per-node 2] [--target-s 90]
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import _common
import numpy as np

GRIDS = sorted((_common.ROOT / "search_spaces").glob("paper_*.yaml"))
QUICK_GRIDS = ("paper_hrank_taylor.yaml", "paper_imagenet_resnet50.yaml")
SLOTS = (8, 64, 512)
QUICK_SLOTS = (8, 64)
ORDERS = ("fifo", "critical_path")
TARGET_GRID, TARGET_SLOTS, TARGET_RATIO = "paper_cifar_pfec.yaml", 64, 1.05
TOLERANCE = 0.10  # measured vs simulated makespan of the real run
# The real run's plan: PFEC with one seed, three schedules (the longest, scratch_b, among them)
# and two budgets, 63 stages (--quick: one budget, 43): few, so that Tune's own cost per stage
# on a 2-core machine stays small beside the scaled stages.
REAL_GRID = "paper_cifar_pfec.yaml"
REAL_AXES = ["axes.seed=[0]", "axes.schedule=[ft,clr,scratch_b]", "axes.budget=[40,152]"]
QUICK_REAL_AXES = ["axes.seed=[0]", "axes.schedule=[ft,clr,scratch_b]", "axes.budget=[40]"]
GPU_SHARE = 0.5  # the paper grids' gpus_per_worker: two stages per GPU
SLEEP_ENV = "NPTM_BENCH_SLEEP_SECONDS"  # JSON file: stage id -> seconds to sleep


def load_plan(path: Path, overrides: list[str] | None = None) -> Any:
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import load_grid

    return build_plan(load_grid(str(path), overrides or []), confirm_large=True)


def release_bound(stages: dict[str, Any], cost: dict[str, float], slots: int) -> float:
    """LB+ of the module's docstring, without LB (stages in plan order)."""
    earliest: dict[str, float] = {}
    for sid, spec in stages.items():
        earliest[sid] = max((earliest[p] + cost[p] for p in spec.parents), default=0.0)
    e = np.fromiter((earliest[s] for s in stages), float, len(stages))
    c = np.fromiter((cost[s] for s in stages), float, len(stages))
    work = c.sum()
    return max(
        (t + (work - np.clip(t - e, 0.0, c).sum()) / slots for t in np.unique(e)), default=0.0
    )


def simulated(path: Path, slots: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per slot count: makespans of both orders and the bounds."""
    from nptm.orchestrator.makespan import simulate
    from nptm.orchestrator.stage_cost import stage_costs

    plan = load_plan(path)
    costs = stage_costs(plan.stages, plan.grid.resources)
    rows = []
    for s in slots:
        runs = {order: simulate(plan.stages, costs.cost, s, order) for order in ORDERS}
        cp = runs["critical_path"]
        tight = max(cp.lower_bound, release_bound(plan.stages, costs.cost, s))
        rows.append(
            {"grid": path.name, "stages": len(plan.stages), "slots": s, "timed": costs.timed,
             "lower_bound_h": cp.lower_bound / 3600 if costs.timed else None,
             "makespan_h": cp.makespan / 3600 if costs.timed else None,
             "fifo": runs["fifo"].ratio, "critical_path": cp.ratio,
             "cp_over_fifo": cp.makespan / runs["fifo"].makespan,
             "tight_over_lb": tight / cp.lower_bound, "cp_over_tight": cp.makespan / tight}
        )  # fmt: skip
    return rows


# -- the real run --------------------------------------------------------------------------------
def sleep_stage(config: dict[str, Any]) -> None:
    """Stands in for `nptm.orchestrator.trial.stage_trial`: sleeps the stage's seconds."""
    from ray import tune

    from nptm.orchestrator.trial import stage_id_of

    t0 = time.time()
    seconds = json.loads(Path(os.environ[SLEEP_ENV]).read_text())[stage_id_of(config)]
    time.sleep(max(0.0, seconds - (time.time() - t0)))
    tune.report({"finished": 1, "t0": t0, "t1": time.time()})


def run_tune(plan: Any, cost: dict[str, float], slots: int, order: str, storage: str) -> Any:
    """The plan through Tune as `nptm.orchestrator.tuner.run_trials` runs it (DagSearcher with the
    sweep's costs, NewestPendingFirst, actor reuse, the trial cap, one trial bundle for every
    kind), its stages sleeping. Per stage: when it was handed out, and its (start, end) as its
    trainable saw them."""
    from ray import tune

    from nptm.orchestrator.cluster import stage_bundles
    from nptm.orchestrator.dag_search import DagSearcher
    from nptm.orchestrator.trial import stage_id_of
    from nptm.orchestrator.trial_scheduler import NewestPendingFirst
    from nptm.trainables.stage import StageOutcome, StageStatus

    spans: dict[str, tuple[float, float]] = {}
    handed: dict[str, float] = {}

    def resolve(spec: Any, result: dict | None) -> StageOutcome:
        if result and "t0" in result:
            spans[spec.id] = (result["t0"], result["t1"])
        return StageOutcome(spec.id, spec.kind, StageStatus.OK if result else StageStatus.FAILED)

    searcher = DagSearcher(plan.stages, set(), resolve, lambda *a: None, cost=cost, order=order)
    suggest = searcher.suggest

    def timed_suggest(trial_id: str) -> Any:
        config = suggest(trial_id)
        if isinstance(config, dict):
            handed[stage_id_of(config)] = time.time()
        return config

    searcher.suggest = timed_suggest  # type: ignore[method-assign]
    bundle, _ = stage_bundles("retrain", plan.grid.resources)
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(slots + 2))  # as run_trials
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "inf")
    tuner = tune.Tuner(
        tune.with_resources(sleep_stage, tune.PlacementGroupFactory([bundle])),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=NewestPendingFirst(searcher=searcher),
            num_samples=-1,
            reuse_actors=True,
            max_concurrent_trials=slots,
        ),
        run_config=tune.RunConfig(name=f"makespan-{order}", storage_path=storage, verbose=0),
    )
    # Tune's per-trial lines, and its end-of-run metrics scan (no result files, as in a sweep)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        tuner.fit()
    if len(spans) != len(plan.stages):
        raise RuntimeError(f"{len(plan.stages) - len(spans)} stages did not run")
    return SimpleNamespace(spans=spans, handed=handed)


def real(
    axes: list[str], nodes: int, gpus_per_node: int, target_s: float, orders: list[str]
) -> dict[str, Any]:
    """Part 2 of the module's docstring."""
    from ray.cluster_utils import Cluster

    from nptm.orchestrator.cluster import connect, disconnect
    from nptm.orchestrator.makespan import simulate
    from nptm.orchestrator.stage_cost import stage_costs

    slots = int(nodes * gpus_per_node / GPU_SHARE)
    overrides = [
        *axes,
        "resources.executor=inline",
        "resources.cpus_per_worker=0.5",
        f"resources.gpus_per_worker={GPU_SHARE}",
        f"resources.max_concurrent={slots}",
    ]
    plan = load_plan(_common.ROOT / "search_spaces" / REAL_GRID, overrides)
    cost = stage_costs(plan.stages, plan.grid.resources).cost
    sims = {o: simulate(plan.stages, cost, slots, o) for o in {*orders, "critical_path"}}
    scale = target_s / sims["critical_path"].makespan
    out: dict[str, Any] = {
        "grid": REAL_GRID, "overrides": overrides, "stages": len(plan.stages), "nodes": nodes,
        "slots": slots, "scale": scale, "runs": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nptm-bench-makespan-") as tmp:
        sleep_file = Path(tmp) / "seconds.json"
        sleep_file.write_text(json.dumps({sid: c * scale for sid, c in cost.items()}))
        os.environ[SLEEP_ENV] = str(sleep_file)  # before the nodes start: their workers read it
        t0 = time.perf_counter()
        node = {"num_cpus": slots // nodes, "num_gpus": gpus_per_node}
        head = {**node, "include_dashboard": False}
        ray_cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
        for _ in range(nodes - 1):
            ray_cluster.add_node(**node)
        out["cluster_start_s"] = time.perf_counter() - t0
        try:
            connect(ray_cluster.address)
            for order in orders:
                t0 = time.perf_counter()
                run = run_tune(plan, cost, slots, order, f"{tmp}/{order}")
                wall = time.perf_counter() - t0
                starts = [s for s, _ in run.spans.values()]
                measured = max(e for _, e in run.spans.values()) - min(starts)
                # Handed out by the searcher, then waiting for a trial actor to take it.
                waits = [run.spans[sid][0] - t for sid, t in run.handed.items()]
                sim = sims[order].makespan * scale
                out["runs"].append(
                    {"order": order, "simulated_s": sim, "measured_s": measured,
                     "error": measured / sim - 1, "tune_wall_s": wall,
                     "actor_wait_median_s": float(np.median(waits)),
                     "actor_wait_max_s": max(waits), "loadavg_1m": os.getloadavg()[0]}
                )  # fmt: skip
        finally:
            disconnect()
            ray_cluster.shutdown()
    return out


def token_auth() -> None:
    """Ray 2.60's token authentication as nptm's client presents it (`connect`), with a token
    of the bench's own cluster: set before this process first uses Ray, which reads it once."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def print_simulated(rows: list[dict[str, Any]]) -> None:
    headers = ["grid", "stages", "slots", "LB h", "makespan h", "FIFO / LB"]
    headers += ["critical path / LB", "critical path / FIFO", "LB+ / LB", "critical path / LB+"]
    table = [
        [r["grid"].removesuffix(".yaml"), r["stages"], r["slots"],
         "-" if r["lower_bound_h"] is None else r["lower_bound_h"],
         "-" if r["makespan_h"] is None else r["makespan_h"],
         *(f"{r[k]:.3f}" for k in ("fifo", "critical_path", "cp_over_fifo", "tight_over_lb",
                                   "cp_over_tight"))]
        for r in rows
    ]  # fmt: skip
    print(_common.table(headers, table))


def print_real(res: dict[str, Any]) -> None:
    print(
        f"\nreal run: {res['grid']} {' '.join(res['overrides'])}: {res['stages']} stages on "
        f"{res['nodes']} nodes, {res['slots']} slots; 1 planned s = {res['scale'] * 1e3:.3f} "
        f"ms; cluster start {res['cluster_start_s']:.0f} s"
    )
    headers = ["order", "simulated s", "measured s", "measured / simulated - 1"]
    headers += ["actor wait median s", "actor wait max s", "Tune wall s", "load avg"]
    rows = [
        [r["order"], r["simulated_s"], r["measured_s"], f"{r['error']:+.1%}",
         r["actor_wait_median_s"], r["actor_wait_max_s"], r["tune_wall_s"], r["loadavg_1m"]]
        for r in res["runs"]
    ]  # fmt: skip
    print(_common.table(headers, rows))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--slots", help="slot counts, comma-separated (default 8,64,512)")
    p.add_argument("--no-cluster", action="store_true", help="the simulated table only")
    p.add_argument(
        "--orders", help="orders of the real run, comma-separated (default critical_path)"
    )
    p.add_argument("--nodes", type=int, help="nodes of the real run's cluster (4; quick 2)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (8 / nodes: 16 slots)")
    p.add_argument("--target-s", type=float, help="simulated makespan of the real run (90 s)")
    args = p.parse_args(argv)
    if not args.no_cluster:
        token_auth()
    slots = tuple(int(s) for s in args.slots.split(",")) if args.slots else None
    slots = slots or (QUICK_SLOTS if args.quick else SLOTS)
    info = _common.machine()
    print(_common.machine_line(info))
    grids = [g for g in GRIDS if not args.quick or g.name in QUICK_GRIDS]
    rows = [row for g in grids for row in simulated(g, slots)]
    print_simulated(rows)
    never_worse = all(r["cp_over_fifo"] <= 1 + 1e-9 for r in rows)
    _common.print_target("critical path never worse than FIFO", f"{len(rows)} rows", never_worse)
    result: dict[str, Any] = {"machine": info, "simulated": rows, "never_worse": never_worse}
    for r in rows:
        if r["grid"] == TARGET_GRID and r["slots"] == TARGET_SLOTS:
            met = r["critical_path"] <= TARGET_RATIO
            goal = f"{TARGET_GRID} on {TARGET_SLOTS} slots <= {TARGET_RATIO}x LB"
            _common.print_target(goal, f"{r['critical_path']:.3f}x", met)
            result["target_met"] = met
    if not args.no_cluster:
        nodes = args.nodes or (2 if args.quick else 4)
        res = real(
            QUICK_REAL_AXES if args.quick else REAL_AXES,
            nodes,
            args.gpus_per_node or max(1, 8 // nodes),
            args.target_s or (30.0 if args.quick else 90.0),
            args.orders.split(",") if args.orders else ["critical_path"],
        )
        print_real(res)
        worst = max(abs(r["error"]) for r in res["runs"])
        goal = f"measured makespan within {TOLERANCE:.0%} of the simulated one"
        _common.print_target(goal, f"worst {worst:+.1%}", worst <= TOLERANCE)
        result["real"] = res
    _common.emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
