"""The DAG searcher: stages become runnable exactly when their parents are done."""

from __future__ import annotations

from pathlib import Path

from ray.tune.search import Searcher

from nptm.orchestrator.dag_search import DONE, FAILED, PENDING, SKIPPED, DagSearcher, StageState
from nptm.orchestrator.planner import build_plan
from nptm.orchestrator.trial import stage_id_of
from nptm.search_spaces import load_grid
from nptm.trainables.stage import StageOutcome
from tests.sweep_helpers import write_grid


def _searcher(tmp_path: Path, outcomes: dict[str, str], done: set[str] = frozenset()):
    plan = build_plan(load_grid(write_grid(tmp_path / "g.yaml", seeds="[0, 1]")))
    finished: list[tuple[str, str]] = []

    def resolve(spec, result):
        return StageOutcome(stage_id=spec.id, kind=spec.kind, status=outcomes.get(spec.kind, "ok"))

    def on_finish(spec, outcome):
        finished.append((spec.id, outcome.status))

    return plan, DagSearcher(plan.stages, set(done), resolve, on_finish), finished


def _drain(searcher: DagSearcher) -> list[str]:
    """Run every suggested stage to completion, one at a time; return the order."""
    order, n = [], 0
    while True:
        n += 1
        config = searcher.suggest(f"t{n}")
        if config == Searcher.FINISHED:
            return order
        assert config is not None, "nothing runnable although nothing is running"
        order.append(stage_id_of(config))
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
    plan, searcher, _ = _searcher(tmp_path, {})
    first = stage_id_of(searcher.suggest("a"))  # a pretrain; the other seed's is ready too
    searcher.on_trial_complete("a", result={"finished": 1})
    kinds = []
    for name in ("b", "c"):
        kinds.append(plan.stages[stage_id_of(searcher.suggest(name))].kind)
    assert plan.stages[first].kind == "pretrain" and "prune" in kinds  # released by its parent


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
        if stage_id_of(config) == child:
            break
        searcher.on_trial_complete(f"t{n}", result={"finished": 1})
    searcher.on_trial_complete(f"t{n}", result={"corrupt_parent": prune})
    assert searcher.state[prune] == PENDING and searcher.state[child] == PENDING
    order = _drain(searcher)
    assert order.index(prune) < order.index(child)


def _recount(searcher: DagSearcher) -> tuple[dict[StageState, int], int]:
    """Brute force: stages per state and epochs left, from the per-stage states."""
    counts = {p: sum(1 for s in searcher.state.values() if s == p) for p in StageState}
    left = sum(
        searcher.stages[sid].epochs
        for sid, st in searcher.state.items()
        if st in (PENDING, StageState.RUNNING)
    )
    return counts, left


def test_counters_match_a_recount_at_every_step(tmp_path: Path) -> None:
    """Counts per state and epochs left are kept incrementally; after every suggestion and
    completion (ok, failed with skipped descendants, damaged parent requeued) they equal a
    recount of the per-stage states."""
    plan, searcher, _ = _searcher(tmp_path, {"prune": "failed"})
    plan2, searcher2, _ = _searcher(tmp_path, {})
    assert sum(s.epochs for s in plan.stages.values()) > 0

    def check(s: DagSearcher) -> None:
        counts, left = _recount(s)
        assert {p: s.count(p) for p in StageState} == counts
        assert s.remaining_epochs() == left

    # Two trials in flight at a time, so RUNNING is non-trivial.
    for s in (searcher, searcher2):
        check(s)
        running: list[str] = []
        n, requeued = 0, False
        while True:
            n += 1
            config = s.suggest(f"t{n}")
            check(s)
            if config == Searcher.FINISHED:
                break
            if config is not None:
                running.append(f"t{n}")
                if len(running) < 2:
                    continue
            trial = running.pop(0)
            sid = s.trial_stage[trial]
            parents = s.stages[sid].parents
            if not requeued and s.stages[sid].kind == "retrain" and parents:
                requeued = True
                s.on_trial_complete(trial, result={"corrupt_parent": parents[0]})
            else:
                s.on_trial_complete(trial, result={"finished": 1})
            check(s)
        assert s.count(PENDING) == s.count(StageState.RUNNING) == 0 and s.remaining_epochs() == 0
    assert searcher.count(SKIPPED) == 12 and searcher.count(FAILED) == 4  # 2 seeds x 2 prunes
    assert searcher2.count(DONE) == len(plan2.stages)


# -- lineage: no stage mixes two runs of its parent -------------------------------------------
def _lineage_searcher(tmp_path: Path):
    """A plan (1 pretrain, 2 prunes, 6 retrains) whose every stage is finished, each having
    read its parents' payloads as `made` (stage id -> the sha its model has) says; the pretrain
    is to run again (say its model was lost). `resolve` gives a re-run stage the sha `made`
    holds for it when it completes."""
    plan = build_plan(load_grid(write_grid(tmp_path / "g.yaml")))
    pre = next(s for s, spec in plan.stages.items() if spec.kind == "pretrain")
    made = {sid: f"sha-{sid}" for sid in plan.stages}

    def outcome(sid: str) -> StageOutcome:
        spec = plan.stages[sid]
        consumed = {f"{p}/model": made[p] for p in spec.parents}
        return StageOutcome(
            stage_id=sid, kind=spec.kind, status="ok",
            artifacts={"model": made[sid]}, consumed=consumed or None,
        )  # fmt: skip

    stored = {sid: outcome(sid) for sid in plan.stages}
    ran: list[str] = []

    def resolve(spec, result):
        ran.append(spec.id)
        return outcome(spec.id)

    done = set(plan.stages) - {pre}
    searcher = DagSearcher(plan.stages, done, resolve, lambda *a: None, outcomes=stored)
    return plan, pre, searcher, made, ran


def test_a_re_made_parent_with_the_same_bytes_runs_nothing_below_it(tmp_path: Path) -> None:
    _, pre, searcher, _, ran = _lineage_searcher(tmp_path)
    assert _drain(searcher) == [pre] and ran == [pre]


def test_a_re_made_parent_with_other_bytes_runs_every_stage_below_it(tmp_path: Path) -> None:
    plan, pre, searcher, made, _ = _lineage_searcher(tmp_path)
    made[pre] = "sha-of-another-run"  # a GPU re-made the network differently
    # Each prune re-made from the new network holds other bytes too.
    for sid, spec in plan.stages.items():
        if spec.kind == "prune":
            made[sid] += "-again"
    order = _drain(searcher)
    assert sorted(order) == sorted(plan.stages)  # 1 + 2 + 6: everything ran once
    assert all(
        order.index(p) < order.index(sid) for sid, spec in plan.stages.items() for p in spec.parents
    )
    # Every stage now holds what its parents hold: one run of each parent below each child.
    for sid, spec in plan.stages.items():
        for p in spec.parents:
            assert searcher.outcomes[sid].read_current(p, searcher.outcomes[p])


def test_a_child_that_read_a_replaced_payload_runs_again(tmp_path: Path) -> None:
    plan, pre, searcher, made, _ = _lineage_searcher(tmp_path)
    prune = next(s for s, spec in plan.stages.items() if spec.kind == "prune")
    child = next(s for s, spec in plan.stages.items() if spec.parents[:1] == (prune,))
    assert _drain(searcher) == [pre]
    # The prune is re-made with other bytes while its child (finished on the old ones) is
    # requeued for another reason and completes having read the old model.
    searcher.outcomes[prune] = StageOutcome(
        stage_id=prune, kind="prune", status="ok", artifacts={"model": "new"}
    )
    searcher._set(child, PENDING)
    searcher.ready.append(child)
    assert stage_id_of(searcher.suggest("x1")) == child
    searcher.on_trial_complete("x1", {"finished": 1})  # read sha-<prune>: stale
    assert searcher.state[child] == PENDING
    made[prune] = "new"
    assert stage_id_of(searcher.suggest("x2")) == child
    searcher.on_trial_complete("x2", {"finished": 1})
    assert searcher.state[child] == DONE
