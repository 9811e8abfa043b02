"""The DAG searcher: stages become runnable exactly when their parents are done."""

from __future__ import annotations

from pathlib import Path

from ray.tune.search import Searcher

from orchestrator.dag_search import DONE, FAILED, PENDING, SKIPPED, DagSearcher
from orchestrator.planner import build_plan
from search_spaces import load_grid
from tests.sweep_helpers import write_grid


def _searcher(tmp_path: Path, outcomes: dict[str, str], done: set[str] = frozenset()):
    plan = build_plan(load_grid(write_grid(tmp_path / "g.yaml", seeds="[0, 1]")))
    finished: list[tuple[str, str]] = []

    def resolve(spec, result, error):
        status = outcomes.get(spec.kind, "ok")
        return status, ({"status": status} if status != "failed" else None), None

    def on_finish(spec, status, outcome, detail):
        finished.append((spec.id, status))

    return plan, DagSearcher(plan.stages, set(done), {}, resolve, on_finish), finished


def _drain(searcher: DagSearcher) -> list[str]:
    """Run every suggested stage to completion, one at a time; return the order."""
    order, n = [], 0
    while True:
        n += 1
        config = searcher.suggest(f"t{n}")
        if config == Searcher.FINISHED:
            return order
        assert config is not None, "nothing runnable although nothing is running"
        order.append(config["stage"]["id"])
        searcher.on_trial_complete(f"t{n}", result={"finished": 1})


def test_every_stage_runs_once_after_its_parents(tmp_path: Path) -> None:
    plan, searcher, _ = _searcher(tmp_path, {})
    order = _drain(searcher)
    assert sorted(order) == sorted(plan.stages)
    position = {sid: i for i, sid in enumerate(order)}
    for sid, spec in plan.stages.items():
        assert all(position[p] < position[sid] for p in spec.parents)
    assert all(state == DONE for state in searcher.state.values())


def test_no_barrier_a_retrain_may_start_before_other_pretrains(tmp_path: Path) -> None:
    _, searcher, _ = _searcher(tmp_path, {})
    first = searcher.suggest("a")["stage"]  # a pretrain; the other seed's pretrain is ready too
    searcher.on_trial_complete("a", result={"finished": 1})
    kinds = []
    for name in ("b", "c"):
        kinds.append(searcher.suggest(name)["stage"]["kind"])
    assert first["kind"] == "pretrain" and "prune" in kinds  # released by its own parent only


def test_failed_stage_skips_its_descendants_only(tmp_path: Path) -> None:
    plan, searcher, finished = _searcher(tmp_path, {"prune": "failed"})
    _drain(searcher)
    states = searcher.state
    assert {states[s] for s, spec in plan.stages.items() if spec.kind == "pretrain"} == {DONE}
    assert {states[s] for s, spec in plan.stages.items() if spec.kind == "prune"} == {FAILED}
    assert {states[s] for s, spec in plan.stages.items() if spec.kind == "retrain"} == {SKIPPED}
    assert sum(1 for _, status in finished if status == SKIPPED) == 12  # 2 seeds x 6 retrains


def test_finished_stages_are_not_suggested_again(tmp_path: Path) -> None:
    plan, _, _ = _searcher(tmp_path, {})
    pretrains = {s for s, spec in plan.stages.items() if spec.kind == "pretrain"}
    _, searcher, _ = _searcher(tmp_path, {}, done=pretrains)
    order = _drain(searcher)
    assert not pretrains & set(order) and len(order) == len(plan.stages) - len(pretrains)


def test_corrupt_parent_is_recomputed_before_the_child(tmp_path: Path) -> None:
    plan, searcher, _ = _searcher(tmp_path, {})
    prune = next(s for s, spec in plan.stages.items() if spec.kind == "prune")
    done = {s for s in plan.stages if s != prune and plan.stages[s].kind == "pretrain"} | {prune}
    _, searcher, _ = _searcher(tmp_path, {}, done=done)
    child = next(s for s, spec in plan.stages.items() if spec.parents[:1] == (prune,))
    # Run until the child is suggested, then report its parent's artifact as corrupt.
    n = 0
    while True:
        n += 1
        config = searcher.suggest(f"t{n}")
        if config["stage"]["id"] == child:
            break
        searcher.on_trial_complete(f"t{n}", result={"finished": 1})
    searcher.on_trial_complete(f"t{n}", result={"corrupt_parent": prune})
    assert searcher.state[prune] == PENDING and searcher.state[child] == PENDING
    order = _drain(searcher)
    assert order.index(prune) < order.index(child)
