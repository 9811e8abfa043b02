"""How long a plan takes on S identical slots: the DAG searcher's own order, replayed on the
stages' planned seconds (`nptm.orchestrator.stage_cost`).

`simulate` drives a real `DagSearcher` (either order) through a discrete-event loop: whenever
a slot is free it asks the searcher for a stage, which then holds the slot for its planned
seconds; stages that end at the same moment all report before free slots are filled. No
schedule beats the lower bound max(critical path, total work / S). `forecast` is what
`nptm plan --gpus N` prints: the wall time of the grid on N GPUs. bench/makespan.py checks the
simulation against a Tune run on a Ray cluster.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nptm.orchestrator.dag_search import DagSearcher
from nptm.orchestrator.errors import UsageError
from nptm.orchestrator.stage_cost import longest_paths, stage_costs
from nptm.orchestrator.trial import stage_id_of
from nptm.trainables.stage import StageOutcome, StageSpec, StageStatus

if TYPE_CHECKING:
    from nptm.orchestrator.gpu_hours import GpuFigures
    from nptm.orchestrator.planner import Plan


@dataclass(frozen=True)
class Schedule:
    makespan: float  # when the last stage ends, in the costs' unit
    start: dict[str, float]  # stage id -> when it started
    slots: int
    work: float  # sum of the stages' costs
    critical_path: float  # the costliest chain of stages

    @property
    def lower_bound(self) -> float:
        return max(self.critical_path, self.work / self.slots)

    @property
    def ratio(self) -> float:
        """Makespan over the lower bound (1 for an empty or free plan)."""
        return self.makespan / self.lower_bound if self.lower_bound else 1.0


def simulate(
    stages: Mapping[str, StageSpec],
    cost: Mapping[str, float],
    slots: int,
    order: str = "critical_path",
) -> Schedule:
    """Every stage of `stages` run on `slots` identical slots in the order a `DagSearcher` of
    `order` hands them out, each for `cost[stage]`."""
    if slots < 1:
        raise ValueError(f"slots: {slots} must be at least 1")
    searcher = DagSearcher(dict(stages), set(), _ok, _ignore, cost=cost, order=order)
    running: list[tuple[float, int, str]] = []  # (end, start sequence, trial id)
    start: dict[str, float] = {}
    now, n = 0.0, 0
    while True:
        while len(running) < slots:
            config = searcher.suggest(str(n))
            if not isinstance(config, dict):  # None (wait for an end) or FINISHED
                break
            sid = stage_id_of(config)
            start[sid] = now
            heapq.heappush(running, (now + cost[sid], n, str(n)))
            n += 1
        if not running:
            break
        now = running[0][0]
        while running and running[0][0] == now:
            searcher.on_trial_complete(heapq.heappop(running)[2], result={})
    path = longest_paths(stages, cost)
    return Schedule(now, start, slots, math.fsum(cost.values()), max(path.values(), default=0.0))


def _ok(spec: StageSpec, result: dict | None) -> StageOutcome:
    return StageOutcome(spec.id, spec.kind, StageStatus.OK)


def _ignore(*args: Any) -> None:
    pass


def parallel_stages(
    resources: Any, gpus: int, stages_per_gpu: int | None
) -> tuple[int, int | None]:
    """(stages of a grid that run at once on `gpus` GPUs, stages per GPU). `stages_per_gpu`
    defaults to as many as the grid's workers_per_trial x gpus_per_worker lets share one; a
    stage that takes more than one GPU takes ceil(workers x gpus) of them (None per GPU)."""
    per_stage = resources.workers_per_trial * resources.gpus_per_worker
    if per_stage <= 1:
        if stages_per_gpu is None:
            stages_per_gpu = max(1, math.floor(1 / per_stage + 1e-9)) if per_stage else 1
        return gpus * stages_per_gpu, stages_per_gpu
    whole = math.ceil(per_stage - 1e-9)
    where = "(resources.workers_per_trial x gpus_per_worker)"
    if stages_per_gpu not in (None, 1):
        raise UsageError(
            f"--stages-per-gpu {stages_per_gpu}: a stage of this grid takes {whole} GPUs {where}"
        )
    if gpus < whole:
        raise UsageError(f"--gpus {gpus}: a stage of this grid takes {whole} GPUs {where}")
    return gpus // whole, None


def forecast(
    plan: Plan, gpus: int, stages_per_gpu: int | None = None, figures: GpuFigures | None = None
) -> dict[str, Any]:
    """The wall time of `plan` on `gpus` GPUs as the sweep's searcher would order it."""
    res = plan.grid.resources
    slots, per_gpu = parallel_stages(res, gpus, stages_per_gpu)
    out: dict[str, Any] = {"gpus": gpus, "parallel_stages": slots, "stages_per_gpu": per_gpu}
    costs = stage_costs(plan.stages, res, figures, timed_only=True)
    if not costs.timed:
        return out | {"wall_hours": None, "unmeasured": list(costs.unmeasured)}
    s = simulate(plan.stages, costs.cost, slots)
    return out | {
        "wall_hours": s.makespan / 3600,
        "gpu_hours_reserved": gpus * s.makespan / 3600,
        "lower_bound_hours": s.lower_bound / 3600,
        "critical_path_hours": s.critical_path / 3600,
        "work_per_slot_hours": s.work / slots / 3600,
        "unmeasured": [],
    }


def describe_forecast(f: dict[str, Any]) -> str:
    """`nptm plan --gpus`'s lines."""
    where = f"on {f['gpus']:,} GPUs"
    if f["stages_per_gpu"] is not None:
        where += f", {f['stages_per_gpu']} stage{'s' if f['stages_per_gpu'] > 1 else ''} per GPU"
    where += f" ({f['parallel_stages']:,} at once)"
    if f["wall_hours"] is None:
        return f"forecast {where}: unknown (no per-epoch figure for {', '.join(f['unmeasured'])})"
    lines = [
        f"forecast {where}: {f['wall_hours']:,.1f} h wall, "
        f"{f['gpu_hours_reserved']:,.0f} GPU-hours reserved; no order beats "
        f"{f['lower_bound_hours']:,.1f} h (the longest chain of stages "
        f"{f['critical_path_hours']:,.1f} h, all stages over {f['parallel_stages']:,} slots "
        f"{f['work_per_slot_hours']:,.1f} h)"
    ]
    if (f["stages_per_gpu"] or 1) > 1:
        lines.append(
            "  stages sharing a GPU are taken to run at one stage's measured speed (bench/gpu.py: "
            "4 ResNet-56 stages on one H200 ran 3.59x the stages per hour of one)"
        )
    return "\n".join(lines)
