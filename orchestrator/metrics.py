"""nptm's own metrics of a running sweep, exported through Ray's metrics API.

The driver records them with `ray.util.metrics`; the metrics agent of its Ray node serves them
on the node's Prometheus export port (`ray start --metrics-export-port`, `MetricsExportPort` of
`ray.nodes()`), beside Ray's own, so a Prometheus that scrapes Ray (Ray's service discovery
file `<ray temp dir>/prom_metrics_service_discovery.json`) has them too. Ray puts `ray_` before
every name: `nptm_stages` is queried as `ray_nptm_stages`
(`Metric.exported`). deploy/grafana/nptm.json draws them.

Ray's agent forgets a gauge that is not recorded again within two of its report intervals
(2 x 10 s by default), so `publish` records every gauge again, every `interval` seconds: the
gauges of a stage that ended age out on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nptm.orchestrator.dag_search import DagSearcher, StageState
from nptm.results.run_record import RunningStage

PUBLISH_INTERVAL_S = 1.0  # within any report interval of the agent (1 s at least)
_SWEEP = ("sweep",)
_STAGE = ("sweep", "kind", "stage")  # stage: StageSpec.display_name (label + short id)


@dataclass(frozen=True)
class Metric:
    name: str  # as recorded; Prometheus stores `exported`
    description: str
    tags: tuple[str, ...]

    @property
    def exported(self) -> str:
        """The name a PromQL query uses: Ray's `ray_` prefix."""
        return f"ray_{self.name}"


STAGES = Metric(
    "nptm_stages",
    "Stages of the sweep's plan by kind and state (pending, running, done, failed, skipped)",
    ("sweep", "kind", "state"),
)
# A gauge, not a Ray Counter: the driver of `nptm sweep --until-conclusive` (or a notebook)
# runs several sweeps in one process, and a Counter adds up there across every sweep.
EPOCHS = Metric("nptm_epochs_done", "Training epochs this driver saw finish", _SWEEP)
EPOCHS_PLANNED = Metric("nptm_epochs_planned", "Training epochs of the sweep's plan", _SWEEP)
EPOCHS_REMAINING = Metric(
    "nptm_epochs_remaining", "Training epochs of the stages not finished, failed or skipped", _SWEEP
)
EPOCHS_PER_SECOND = Metric(
    "nptm_epochs_per_second", "Training epochs per second since the driver started", _SWEEP
)
ETA = Metric("nptm_eta_seconds", "Seconds left at the pace so far (0 when nothing is left)", _SWEEP)
STAGE_EPOCH = Metric("nptm_stage_epoch", "Epochs a running stage has finished", _STAGE)
STAGE_TEST_ACCURACY = Metric(
    "nptm_stage_test_accuracy_ratio", "Test accuracy of a running stage's latest epoch", _STAGE
)
METRICS = (
    STAGES, EPOCHS, EPOCHS_PLANNED, EPOCHS_REMAINING, EPOCHS_PER_SECOND, ETA, STAGE_EPOCH,
    STAGE_TEST_ACCURACY,
)  # fmt: skip


class SweepMetrics:
    """The metrics above, recorded from the DAG searcher's counts (`DagSearcher.count`), its
    pace and the running stages the driver's monitor keeps (nptm.orchestrator.monitor), which
    calls `publish` every `interval` seconds and at the end. O(running stages) per record,
    whatever the size of the plan."""

    def __init__(
        self, sweep: str, searcher: DagSearcher, interval: float = PUBLISH_INTERVAL_S
    ) -> None:
        from ray.util import metrics

        def made(m: Metric) -> Any:
            return metrics.Gauge(m.name, m.description, m.tags).set_default_tags({"sweep": sweep})

        self._ray = {m: made(m) for m in METRICS}
        self.searcher = searcher
        self.interval = interval
        self._kinds = sorted({spec.kind.value for spec in searcher.stages.values()})
        self._planned = sum(spec.epochs for spec in searcher.stages.values())

    def publish(self, running: dict[str, RunningStage]) -> None:
        """Record every gauge now."""
        s, ray = self.searcher, self._ray
        for kind in self._kinds:
            for state in StageState:
                ray[STAGES].set(s.count(state, kind), {"kind": kind, "state": state.value})
        remaining = s.remaining_epochs()
        rate, eta = s.pace()
        ray[EPOCHS].set(s.epochs_done)
        ray[EPOCHS_PLANNED].set(self._planned)
        ray[EPOCHS_REMAINING].set(remaining)
        ray[EPOCHS_PER_SECOND].set(rate)
        ray[ETA].set(0.0 if not remaining else eta)  # None (nothing trained yet): not set
        for sid, stage in running.items():
            tags = {"kind": stage.kind, "stage": s.stages[sid].display_name}
            ray[STAGE_EPOCH].set(stage.epoch, tags)
            ray[STAGE_TEST_ACCURACY].set(stage.test_acc, tags)  # None: not set
