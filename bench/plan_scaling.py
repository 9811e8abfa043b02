"""`nptm.orchestrator.planner.build_plan` on 1k, 10k and 100k-trial grids: time and peak memory.

Each size runs in a fresh subprocess, so its peak resident memory (ru_maxrss) is its own. The
baseline is enumerating the same grid's trial keys alone (`nptm.search_spaces.expand.expand`): the
ratio says what building, hashing and deduplicating the stages costs on top of listing the
trials. Target: 100k trials in under 5 s.

    .venv/bin/python bench/plan_scaling.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from typing import Any

import _common

SIZES = (1_000, 10_000, 100_000)
QUICK_SIZES = (100, 1_000)
TARGET_100K_S = 5.0
SCHEDULES = ["ft", "lrw", "wr", "slr", "clr"]  # 5 schedules x 2 pruners x 2 models = 20
# trials = 20 x ratios x budgets x seeds
SHAPES: dict[int, tuple[int, int, int]] = {
    100: (5, 1, 1),
    1_000: (5, 2, 5),
    10_000: (10, 5, 10),
    100_000: (10, 20, 25),
}


def grid_data(n_trials: int) -> dict[str, Any]:
    """An in-memory grid of exactly `n_trials` trials (a key of SHAPES)."""
    if n_trials not in SHAPES:
        raise ValueError(f"n_trials: {n_trials} is not one of {sorted(SHAPES)}")
    n_ratios, n_budgets, n_seeds = SHAPES[n_trials]
    ratios = [round(0.05 + 0.9 * i / max(1, n_ratios - 1), 4) for i in range(n_ratios)]
    budgets = [8 * (i + 1) for i in range(n_budgets)]  # <= 160: lrw and wr need <= pretrain
    return {
        "name": f"bench-{n_trials}",
        "max_trials": n_trials,
        "axes": {
            "dataset": ["cifar10"],
            "model": ["resnet20", "resnet56"],
            "pruner": [
                {"name": "magnitude", "ratio": ratios},
                {"name": "random", "ratio": ratios},
            ],
            "schedule": SCHEDULES,
            "budget": budgets,
            "seed": list(range(n_seeds)),
        },
    }


def measure(n_trials: int, repeats: int = 3) -> dict[str, Any]:
    """Time expansion and build_plan for one grid size in this process (median of `repeats`;
    the memory figure is the first build's)."""
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import expand as ex
    from nptm.search_spaces import parse_grid

    t0 = time.perf_counter()
    grid = parse_grid(grid_data(n_trials), f"<bench {n_trials}>")
    parse_s = time.perf_counter() - t0
    expand_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        keys = ex.expand(grid.space, list(grid.includes))
        expand_times.append(time.perf_counter() - t0)
        assert len(keys) == n_trials, (len(keys), n_trials)
        del keys
    gc.collect()
    rss_before = _maxrss_mib()
    plan_times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        plan = build_plan(grid)
        plan_times.append(time.perf_counter() - t0)
        if i == 0:
            rss_after = _maxrss_mib()
            summary = plan.summary()
        del plan
        gc.collect()
    expand_s, plan_s = _common.median(expand_times), _common.median(plan_times)
    return {
        "trials": summary["trials"],
        "stages": sum(summary["stages"].values()),
        "parse_s": parse_s,
        "expand_s": expand_s,
        "plan_s": plan_s,
        "plan_s_max": max(plan_times),
        "maxrss_mib": rss_after,
        "plan_rss_mib": rss_after - rss_before,
    }


def _maxrss_mib() -> float:
    """Peak resident memory of this process. VmHWM starts afresh at exec; ru_maxrss would
    carry over the parent's peak (fork copies its resident pages), so it is the fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_child(n_trials: int, repeats: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(n_trials), "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.repeats)))
        return {}
    sizes = QUICK_SIZES if args.quick else SIZES
    info = _common.machine()
    rows, results = [], []
    for n in sizes:
        r = run_child(n, 1 if args.quick else 3)
        r["us_per_trial"] = r["plan_s"] / r["trials"] * 1e6
        r["plan_vs_expand"] = r["plan_s"] / r["expand_s"]
        results.append(r)
        rows.append(
            [
                f"{n:,}",
                r["stages"],
                r["expand_s"],
                r["plan_s"],
                r["plan_s_max"],
                r["us_per_trial"],
                r["plan_vs_expand"],
                r["plan_rss_mib"],
                r["maxrss_mib"],
            ]
        )
    print(_common.machine_line(info))
    print("build_plan: median of 3 builds per size, each size in its own process")
    print(
        _common.table(
            [
                "trials",
                "stages",
                "expand s",
                "build_plan s",
                "worst s",
                "us/trial",
                "x expand",
                "plan MiB",
                "peak RSS MiB",
            ],
            rows,
        )
    )
    largest = results[-1]
    scaling = largest["us_per_trial"] / results[0]["us_per_trial"]
    print(
        f"per-trial cost at {largest['trials']:,} vs {results[0]['trials']:,} trials: "
        f"{scaling:.2f}x (1.0 = linear)"
    )
    verdict = None
    if largest["trials"] == 100_000:
        verdict = largest["plan_s"] < TARGET_100K_S
        _common.print_target(
            f"100k trials < {TARGET_100K_S:g} s",
            f"{largest['plan_s']:.2f} s (median of 3; worst {largest['plan_s_max']:.2f} s)",
            verdict,
        )
    result = {"machine": info, "sizes": results, "scaling": scaling, "target_met": verdict}
    _common.emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
