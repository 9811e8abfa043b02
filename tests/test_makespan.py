"""Longest-path-first order of the DAG searcher, the makespan simulator and `nptm plan --gpus`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.search import Searcher

from nptm.orchestrator.cli import main
from nptm.orchestrator.dag_search import DagSearcher
from nptm.orchestrator.gpu_hours import GpuFigures, shipped_figures
from nptm.orchestrator.makespan import simulate
from nptm.orchestrator.planner import build_plan
from nptm.orchestrator.stage_cost import START_SECONDS, longest_paths, stage_costs
from nptm.orchestrator.trial import stage_id_of
from nptm.orchestrator.trial_scheduler import NewestPendingFirst
from nptm.search_spaces import load_grid
from nptm.trainables.stage import StageKind, StageOutcome
from tests.sweep_helpers import ROOT, write_grid

# a(10) -> b(1) -> d(5);  a -> c(2) -> e(20);  f(3) -> g(4);  h(8).  Plan order a..h.
EDGES = {"a": (), "b": ("a",), "c": ("a",), "d": ("b",), "e": ("c",), "f": (), "g": ("f",),
         "h": ()}  # fmt: skip
COST = {"a": 10.0, "b": 1.0, "c": 2.0, "d": 5.0, "e": 20.0, "f": 3.0, "g": 4.0, "h": 8.0}
STAGES = {
    sid: SimpleNamespace(id=sid, parents=p, kind=StageKind.PRUNE, epochs=0)
    for sid, p in EDGES.items()
}


def _searcher(order: str = "critical_path", cost: dict[str, float] = COST) -> DagSearcher:
    ok = lambda spec, result: StageOutcome(spec.id, spec.kind, "ok")  # noqa: E731
    return DagSearcher(STAGES, set(), ok, lambda *a: None, cost=cost, order=order)


def _one_at_a_time(searcher: DagSearcher) -> list[str]:
    order = []
    while (config := searcher.suggest(str(len(order)))) != Searcher.FINISHED:
        order.append(stage_id_of(config))
        searcher.on_trial_complete(str(len(order) - 1), result={})
    return order


def test_longest_paths_by_hand() -> None:
    # d 5, e 20, b 1+5, c 2+20, a 10+22, g 4, f 3+4, h 8
    expected = {"a": 32, "b": 6, "c": 22, "d": 5, "e": 20, "f": 7, "g": 4, "h": 8}
    assert longest_paths(STAGES, COST) == expected
    with pytest.raises(ValueError, match="before its parent"):
        longest_paths(dict(reversed(STAGES.items())), COST)


def test_the_longest_remaining_path_goes_first_ties_in_plan_order() -> None:
    # Ready a 32, f 7, h 8 -> a; then c 22 (b 6) -> c; e 20; h 8; f 7 (g 4 ready); b 6 (d 5); d; g
    assert _one_at_a_time(_searcher()) == ["a", "c", "e", "h", "f", "b", "d", "g"]
    # FIFO: roots in plan order, children appended as they become ready.
    assert _one_at_a_time(_searcher("fifo")) == ["a", "f", "h", "b", "c", "g", "d", "e"]
    # All paths equal (zero costs): plan order among the ready.
    assert _one_at_a_time(_searcher(cost=dict.fromkeys(COST, 0.0))) == [
        "a", "b", "c", "d", "e", "f", "g", "h",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="order"):
        _searcher("lifo")


def test_rank_of_a_handed_out_trial() -> None:
    searcher = _searcher()
    searcher.suggest("t1")  # a
    assert searcher.rank_of("t1") == (-32.0, 0) and searcher.rank_of("nobody") is None
    fifo = _searcher("fifo")
    fifo.suggest("t1")
    assert fifo.rank_of("t1") is None


def test_simulated_schedule_by_hand() -> None:
    # 2 slots, longest path first: a 0-10, h 0-8; f 8-11; c 10-12; b 11-12; at 12 both end:
    # e 12-32, d 12-17; g 17-21. Makespan 32 = the critical path a-c-e; work 53 / 2 = 26.5.
    s = simulate(STAGES, COST, slots=2)
    assert s.start == {"a": 0, "h": 0, "f": 8, "c": 10, "b": 11, "e": 12, "d": 12, "g": 17}
    assert s.makespan == 32 and s.critical_path == 32 and s.work == 53
    assert s.lower_bound == 32 and s.ratio == 1
    # FIFO: a 0-10, f 0-3; h 3-11; g 10-14; b 11-12; c 12-14; d 14-19, e 14-34.
    fifo = simulate(STAGES, COST, slots=2, order="fifo")
    assert fifo.start == {"a": 0, "f": 0, "h": 3, "g": 10, "b": 11, "c": 12, "d": 14, "e": 14}
    assert fifo.makespan == 34
    # One slot: the work end to end; unlimited: the critical path.
    assert simulate(STAGES, COST, slots=1).makespan == 53
    assert simulate(STAGES, COST, slots=8).makespan == 32


@pytest.mark.parametrize(
    "grid", ["paper_hrank_taylor", "paper_cifar_unstructured", "paper_imagenet_resnet50"]
)
def test_never_worse_than_fifo_on_shipped_grids(grid: str) -> None:
    plan = build_plan(load_grid(str(ROOT / "search_spaces" / f"{grid}.yaml")))
    cost = stage_costs(plan.stages, plan.grid.resources).cost
    for slots in (8, 64, 512):
        cp, fifo = (simulate(plan.stages, cost, slots, o) for o in ("critical_path", "fifo"))
        assert cp.lower_bound <= cp.makespan <= fifo.makespan * (1 + 1e-12)
        assert sorted(cp.start) == sorted(plan.stages)


# -- planned seconds ---------------------------------------------------------------------------
def _chains(tmp_path: Path, executor: str = "inline", workers: int = 1) -> Path:
    """Two seeds x (pretrain 4 epochs -> prune -> ft 2 epochs): two chains of three stages."""
    return write_grid(
        tmp_path / "chains.yaml", executor=executor, workers=workers,
        pruners=("{name: magnitude, ratio: 0.5}",), schedules="[ft]", seeds="[0, 1]",
    )  # fmt: skip


def _epoch_s() -> float:
    """Seconds of one digits epoch of ResNet-20 with 10% held out (1,293 of 1,437 images)."""
    return shipped_figures().seconds_per_epoch[("resnet20", "digits")] * 1293 / 1437


def test_stage_costs_are_start_up_plus_epochs_times_measured_seconds(tmp_path: Path) -> None:
    plan = build_plan(load_grid(str(_chains(tmp_path, "train", workers=2))))
    costs = stage_costs(plan.stages, plan.grid.resources)
    assert costs.timed
    epochs = {"pretrain": 4, "prune": 0, "retrain": 2}
    for sid, spec in plan.stages.items():  # 2 DDP workers halve the epochs' seconds
        want = START_SECONDS["train"] + epochs[spec.kind] * _epoch_s() / 2
        assert costs.cost[sid] == pytest.approx(want)


def test_stage_costs_without_a_figure_are_mac_samples(tmp_path: Path) -> None:
    plan = build_plan(load_grid(str(_chains(tmp_path))))
    unmeasured = GpuFigures(None, None, None, {})
    assert stage_costs(plan.stages, figures=unmeasured, timed_only=True).cost == {}
    costs = stage_costs(plan.stages, figures=unmeasured)
    assert not costs.timed and costs.unmeasured == ("resnet20@digits",)
    by_kind = {spec.kind: costs.cost[sid] for sid, spec in plan.stages.items()}
    assert by_kind["prune"] == 0 and by_kind["retrain"] * 2 == by_kind["pretrain"] > 0


# -- nptm plan --gpus --------------------------------------------------------------------------
def _forecast(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["forecast"]


def test_plan_gpus_forecasts_the_wall_time(tmp_path: Path, capsys) -> None:
    grid = str(_chains(tmp_path))
    chain = 3 * START_SECONDS["inline"] + 6 * _epoch_s()  # one seed's three stages
    one = _forecast([grid, "--gpus", "1"], capsys)  # gpus_per_worker 0: one stage per GPU
    assert one["parallel_stages"] == 1 and one["wall_hours"] * 3600 == pytest.approx(2 * chain)
    assert one["gpu_hours_reserved"] == pytest.approx(one["wall_hours"])
    two = _forecast([grid, "--gpus", "2"], capsys)  # the two chains side by side
    assert two["wall_hours"] * 3600 == pytest.approx(chain)
    assert two["lower_bound_hours"] == pytest.approx(two["wall_hours"])
    packed = _forecast([grid, "--gpus", "1", "--stages-per-gpu", "2"], capsys)
    assert packed["parallel_stages"] == 2 and packed["wall_hours"] == two["wall_hours"]
    # A stage of 2 workers x 1 GPU takes 2 GPUs: 5 GPUs hold 2 such stages.
    big = _forecast([grid, "resources.gpus_per_worker=1", "resources.executor=train",
                     "resources.workers_per_trial=2", "--gpus", "5"], capsys)  # fmt: skip
    assert big["parallel_stages"] == 2 and big["stages_per_gpu"] is None
    assert main(["plan", grid, "--gpus", "2"]) == 0
    assert "forecast on 2 GPUs, 1 stage per GPU (2 at once):" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "0"], "argument --gpus: expected GPUs in [1, 100000], got '0'"),
        (["--gpus", "two"], "argument --gpus: expected a whole number, got 'two'"),
        (["--gpus", "1", "--stages-per-gpu", "0"], "argument --stages-per-gpu: expected"),
        (["--stages-per-gpu", "2"], "--stages-per-gpu 2 needs --gpus N"),
        (["resources.gpus_per_worker=1", "resources.executor=train",
          "resources.workers_per_trial=2", "--gpus", "1"],
         "--gpus 1: a stage of this grid takes 2 GPUs"),
        (["resources.gpus_per_worker=1", "resources.executor=train",
          "resources.workers_per_trial=2", "--gpus", "4", "--stages-per-gpu", "2"],
         "--stages-per-gpu 2: a stage of this grid takes 2 GPUs"),
    ],
)  # fmt: skip
def test_plan_gpus_bad_values_exit_2(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    grid = str(_chains(tmp_path))
    try:
        status = main(["plan", grid, *args])
    except SystemExit as err:  # argparse's own refusal
        status = err.code
    assert status == 2
    assert message in capsys.readouterr().err


# -- the trial scheduler keeps the order ------------------------------------------------------
def test_a_freed_actor_goes_to_the_first_in_order_of_the_newest_batch() -> None:
    ranks = {"old": (-9.0, 0), "n1": (-1.0, 1), "n2": (-5.0, 2), "n3": (-3.0, 3)}
    scheduler = NewestPendingFirst(30.0, SimpleNamespace(stopped=False, rank_of=ranks.get))
    trials = {t: SimpleNamespace(trial_id=t, status="PENDING") for t in ranks}
    controller = SimpleNamespace(get_live_trials=lambda: list(trials.values()))
    now = time.monotonic()
    # "old" waits behind a newer batch (within its patience) although it ranks first; of the
    # batch, taken from the searcher together, n2 ranks first.
    scheduler._added = {"old": now - 5.0, "n1": now - 0.3, "n2": now - 0.2, "n3": now - 0.1}
    assert scheduler.choose_trial_to_run(controller) is trials["n2"]
    scheduler._added["old"] = now - 60.0  # past its patience: it goes first
    assert scheduler.choose_trial_to_run(controller) is trials["old"]
    # No order from the searcher: the newest, as before.
    scheduler.searcher = SimpleNamespace(stopped=False, rank_of=lambda trial_id: None)
    scheduler._added["old"] = now - 5.0
    assert scheduler.choose_trial_to_run(controller) is trials["n3"]
