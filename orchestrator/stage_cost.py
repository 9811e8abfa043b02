"""Planned seconds of each stage, and the longest path of them below it (its critical path).

The DAG searcher hands out the ready stage with the longest remaining path first
(`nptm.orchestrator.dag_search`), and the makespan forecast (`nptm.orchestrator.makespan`)
replays that order; both read the costs made here.

A stage costs a fixed start-up (`START_SECONDS`, per executor: Ray Train's TorchTrainer for
`train`, the reused trial actor for `inline`; bench/overhead.py) plus its training epochs x
the seconds of one epoch of its (model, dataset) on the GPU of the per-epoch figures
(`gpu_hours.epoch_seconds`, what GPU-hours are made of), divided by its DDP workers (ideal
data parallelism). A prune trains no epoch: its start-up alone.

Where a (model, dataset) of the plan has no figure, every stage of the plan costs its epochs x
MACs per sample x training samples instead, with no start-up: one unit across the plan, good
for ordering its stages, but not a time (`StageCosts.timed` is False).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nptm.orchestrator.gpu_hours import GpuFigures, epoch_seconds, shipped_figures, train_samples
from nptm.trainables.stage import StageSpec

if TYPE_CHECKING:
    from nptm.search_spaces.schema import ResourcesSection

# Seconds a stage takes besides its epochs. train: ~20 s of Ray Train start-up per stage
# (bench/overhead.py: 21 s on 2 cores; faster on a GPU node's many cores); inline: 0.2 s.
START_SECONDS = {"train": 20.0, "inline": 0.2}


@dataclass(frozen=True)
class StageCosts:
    cost: dict[str, float]  # stage id -> planned seconds (MAC-samples where not `timed`)
    unmeasured: tuple[str, ...]  # "model@dataset" without a per-epoch figure

    @property
    def timed(self) -> bool:
        """The costs are seconds: every (model, dataset) of the plan has a figure."""
        return not self.unmeasured


def stage_costs(
    stages: Mapping[str, StageSpec],
    resources: ResourcesSection | None = None,
    figures: GpuFigures | None = None,
    *,
    timed_only: bool = False,
) -> StageCosts:
    """Planned cost of every stage (see the module's docstring); O(stages). `timed_only`: no
    proxy where a figure is missing (no costs then, and no model built)."""
    from nptm.search_spaces.schema import ResourcesSection

    res = ResourcesSection() if resources is None else resources
    figures = shipped_figures() if figures is None else figures
    splits = {(s.model, s.dataset, s.val_fraction) for s in stages.values()}
    per_epoch = {k: epoch_seconds(*k, figures) for k in splits}
    unmeasured = tuple(sorted({f"{m}@{d}" for (m, d, _), s in per_epoch.items() if s is None}))
    start, workers = START_SECONDS[res.executor], res.workers_per_trial
    if unmeasured and timed_only:
        return StageCosts({}, unmeasured)
    if unmeasured:
        per_epoch = {(m, d, v): macs_per_sample(m, d) * train_samples(d, v) for m, d, v in splits}
        start, workers = 0.0, 1
    cost = {
        sid: start + s.epochs * per_epoch[(s.model, s.dataset, s.val_fraction)] / workers
        for sid, s in stages.items()
    }
    return StageCosts(cost, unmeasured)


@functools.cache
def macs_per_sample(model: str, dataset: str) -> int:
    """MACs of one forward pass of the unpruned model (builds it: imports torch)."""
    from nptm.trainables.macs import count_macs
    from nptm.trainables.models import build_model

    return count_macs(build_model(model, dataset), dataset)


def longest_paths(stages: Mapping[str, StageSpec], cost: Mapping[str, float]) -> dict[str, float]:
    """Each stage's cost plus the costliest chain of its descendants, in one pass over the
    stages in reverse plan order (the plan lists parents before children): O(stages + edges).
    """
    path: dict[str, float] = {}
    below: dict[str, float] = dict.fromkeys(stages, 0.0)  # costliest chain under each stage
    for sid in reversed(stages):
        path[sid] = cost[sid] + below[sid]
        for parent in stages[sid].parents:
            if parent in path:
                raise ValueError(f"stage {sid} is listed before its parent {parent}")
            if parent in below and path[sid] > below[parent]:
                below[parent] = path[sid]
    return path
