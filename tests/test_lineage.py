"""Reuse that is never wrong: real stages (digits, in this process) driven by the sweep's own
start-up check (`_finished_stages`) and DAG searcher, as a rerun of `nptm sweep` drives them.

- Adding work never re-runs finished work whose inputs did not change (a `wr` budget added to a
  finished grid runs the new retraining and re-makes one checkpoint, nothing else).
- No stage mixes artifacts of two runs of its parent: each child records the SHA-256 of what it
  read, and a parent re-made with other bytes has every stage below it run again. A noise hook
  makes the pre-training non-deterministic on purpose, so the CPU's bit-determinism cannot
  hide the defect; without it the same re-made parent runs nothing below it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nptm.orchestrator.dag_search import DagSearcher
from nptm.orchestrator.planner import build_plan
from nptm.orchestrator.sweep import _finished_stages
from nptm.orchestrator.trial import stage_id_of
from nptm.search_spaces import load_grid
from nptm.trainables import stage_runner
from nptm.trainables.artifacts import ArtifactStore
from nptm.trainables.stage_runner import WorkerEnv, kept_state_epochs, run_stage, state_name
from tests.sweep_helpers import write_grid

pytestmark = pytest.mark.slow  # trains real (digits) stages


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Real stages in this process, as a 1-CPU trial runs them."""


def _plan(tmp_path: Path, schedules: str):
    grid = write_grid(
        tmp_path / f"{schedules.strip('[]').replace(', ', '-')}.yaml",
        pruners=("{name: magnitude, ratio: 0.5}",), schedules=schedules, budget="1",
        pretrain_epochs=2, milestones="[1]",
    )  # fmt: skip
    return build_plan(load_grid(grid))


def _rerun(plan, storage: str) -> list[str]:
    """What a rerun of the sweep executes, in order: the stages the start-up check does not
    take as finished, and any the searcher sends back, each run to completion in turn."""
    store = ArtifactStore(storage)
    done = _finished_stages(plan, store)

    def resolve(spec, result):
        return store.read_outcome(spec.id)

    searcher = DagSearcher(plan.stages, set(done), resolve, lambda *a: None, outcomes=done)
    executed = []
    for n in range(100):
        config = searcher.suggest(f"t{n}")
        if not isinstance(config, dict):
            return executed
        sid = stage_id_of(config)
        run_stage(plan.stages[sid], WorkerEnv(storage=storage))
        executed.append(sid)
        searcher.on_trial_complete(f"t{n}", {"finished": 1})
    raise AssertionError("the rerun did not end")


def _ids(plan) -> dict[str, str]:
    """Stage id by a name a reader can check: pretrain, prune, ft, wr."""
    return {spec.schedule or spec.kind.value: sid for sid, spec in plan.stages.items()}


def _lose_pretraining(storage: str, plan) -> None:
    """The pre-training's outcome and every kept state are gone: it must train from epoch 0."""
    store = ArtifactStore(storage)
    pre = _ids(plan)["pretrain"]
    store.invalidate(pre)
    for epoch in kept_state_epochs(2):
        store.delete(pre, state_name(epoch))


def _assert_one_lineage(plan, storage: str) -> None:
    """Every stage read exactly the bytes its parents hold now."""
    store = ArtifactStore(storage)
    outcomes = {sid: store.read_outcome(sid) for sid in plan.stages}
    for sid, spec in plan.stages.items():
        for parent in spec.parents:
            held = outcomes[parent].artifacts
            read = {k: v for k, v in outcomes[sid].consumed.items() if k.startswith(parent)}
            assert read and all(held[k.split("/")[1]] == v for k, v in read.items()), sid


def test_a_wr_budget_added_to_a_finished_grid_runs_only_the_new_work(tmp_path: Path) -> None:
    storage = str(tmp_path / "runs")
    first = _plan(tmp_path, "[ft]")
    assert _rerun(first, storage) == list(first.stages)  # pretrain, prune, ft
    later = _plan(tmp_path, "[ft, wr]")
    ids = _ids(later)
    assert set(first.stages) < set(later.stages)  # the same three stages, and wr
    # Hand-worked: the pre-training re-makes its missing rewind epoch (2 - 1 = 1) from its
    # kept state, keeping its outcome and model; then the one new stage. Prune and ft: nothing.
    assert _rerun(later, storage) == [ids["pretrain"], ids["wr"]]
    remade = ArtifactStore(storage).read_outcome(ids["pretrain"])
    assert remade.rewind_epochs_remade == [1]
    assert ArtifactStore(storage).attempts(ids["prune"]) == 1
    assert ArtifactStore(storage).attempts(ids["ft"]) == 1
    _assert_one_lineage(later, storage)
    assert _rerun(later, storage) == []


def test_a_pre_training_re_made_with_the_same_bytes_runs_nothing_below_it(
    tmp_path: Path,
) -> None:
    storage = str(tmp_path / "runs")
    plan = _plan(tmp_path, "[ft, wr]")
    _rerun(plan, storage)
    _lose_pretraining(storage, plan)
    assert _rerun(plan, storage) == [_ids(plan)["pretrain"]]  # bit-identical on the CPU
    _assert_one_lineage(plan, storage)


def test_a_pre_training_re_made_with_other_bytes_runs_every_stage_below_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = str(tmp_path / "runs")
    plan = _plan(tmp_path, "[ft, wr]")
    ids = _ids(plan)
    _rerun(plan, storage)
    before = ArtifactStore(storage).read_outcome(ids["pretrain"]).artifacts["model"]

    # The noise hook: from now on a network is initialised differently on every build, as
    # a GPU's re-run can differ from the first run.
    build = stage_runner.build_model

    def noisy_build(*args, **kwargs):
        model = build(*args, **kwargs)
        unseeded = torch.Generator()
        unseeded.seed()  # from the OS's entropy: differs on every call
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=unseeded) * 1e-3)
        return model

    monkeypatch.setattr(stage_runner, "build_model", noisy_build)
    _lose_pretraining(storage, plan)
    executed = _rerun(plan, storage)
    assert ArtifactStore(storage).read_outcome(ids["pretrain"]).artifacts["model"] != before
    # Hand-worked: the pre-training, then the prune of its new network, then both retrains.
    assert executed[:2] == [ids["pretrain"], ids["prune"]]
    assert sorted(executed[2:]) == sorted([ids["ft"], ids["wr"]])
    _assert_one_lineage(plan, storage)


def test_a_parent_payload_swapped_with_its_checksum_is_refused(tmp_path: Path) -> None:
    """A payload and its checksum file both replaced (here the prune's model by the ft
    stage's, same architecture) pass the checksum, but not the parent's recorded lineage: the
    child refuses them, naming the producer, which the sweep then re-makes."""
    from nptm.trainables.artifacts import CorruptArtifactError, checksum_name

    storage = str(tmp_path / "runs")
    plan = _plan(tmp_path, "[ft]")
    _rerun(plan, storage)
    ids = _ids(plan)
    stages = tmp_path / "runs" / "stages"
    for name in ("model.pt", checksum_name("model")):
        (stages / ids["prune"] / name).write_bytes((stages / ids["ft"] / name).read_bytes())
    with pytest.raises(CorruptArtifactError, match="not the payload") as err:
        run_stage(plan.stages[ids["ft"]], WorkerEnv(storage=storage))
    assert err.value.stage_id == ids["prune"] and err.value.name == "model"
