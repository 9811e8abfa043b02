"""`pretrain: {from: ...}`: a grid starts from existing weights instead of pre-training."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from nptm.orchestrator.planner import build_plan
from nptm.search_spaces import GridError, parse_grid
from nptm.trainables.models import build_model

GRID = """\
name: fromckpt
pretrain: {{from: {source}, epochs: 4, milestones: [2, 3]}}
resources: {{executor: inline}}
axes:
  dataset: {dataset}
  model: {model}
  pruner: [{{name: magnitude, ratio: 0.5}}]
  schedule: {schedules}
  budget: 1
  seed: {seeds}
"""


def grid(
    source: object, *, dataset="digits", model="resnet20", schedules="[ft, lrw, clr]", seeds="0"
):
    text = GRID.format(
        source=source, dataset=dataset, model=model, schedules=schedules, seeds=seeds
    )
    return parse_grid(yaml.safe_load(text), "g.yaml")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "resnet20-digits.pt"
    torch.save(build_model("resnet20", "digits", seed=5).state_dict(), path)
    return path


def test_plan_loads_instead_of_pretraining(checkpoint: Path, tmp_path: Path) -> None:
    checked = grid(checkpoint, seeds="[0, 1]")
    assert checked.start_weights.sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    plan = build_plan(checked)
    assert plan.planned_epochs()["pretrain"] == 0
    assert plan.naive_epochs()["pretrain"] == 0
    pretrains = [s for s in plan.stages.values() if s.kind == "pretrain"]
    # Both seeds start from the one file: one stage. A grid that states another recipe for
    # that file shares no stage with this one: every retraining is defined against the recipe.
    assert len(pretrains) == 1 and not pretrains[0].trains
    other_recipe = parse_grid(
        {**yaml.safe_load(GRID.format(source=checkpoint, dataset="digits", model="resnet20",
                                      schedules="[ft]", seeds="0")),
         "pretrain": {"from": str(checkpoint), "epochs": 8, "milestones": [4]}}
    )  # fmt: skip
    assert set(build_plan(other_recipe).stages).isdisjoint(plan.stages)
    # Other bytes, another stage.
    copy = tmp_path / "other.pt"
    torch.save(build_model("resnet20", "digits", seed=6).state_dict(), copy)
    ids = {s.id for s in build_plan(grid(copy)).stages.values() if s.kind == "pretrain"}
    assert ids.isdisjoint({pretrains[0].id})


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"schedules": "[ft, wr]"}, "axes.schedule[1]", "'wr' rewinds"),
        ({"model": "[resnet20, resnet32]"}, "pretrain.from", "2 (dataset, model) pairs"),
        ({"model": "resnet32"}, "pretrain.from", "Error(s) in loading state_dict"),
    ],
)
def test_refused_with_the_field(checkpoint: Path, change, field, message) -> None:
    with pytest.raises(GridError) as err:
        grid(checkpoint, **change)
    assert err.value.field == field and message in str(err.value)


def test_missing_file_and_pruned_artifact_refused(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(GridError, match=r"pretrain\.from: '.*nope\.pt': no such file"):
        grid(tmp_path / "nope.pt")
    pruned = tmp_path / "model.pt"
    payload = {"model": "resnet20", "dataset": "digits", "plans": [{"pruner": "magnitude"}]}
    torch.save({**payload, "state_dict": torch.load(checkpoint)}, pruned)
    with pytest.raises(GridError, match="is a pruned network"):
        grid(pruned)


def test_torchvision_weights_from_the_local_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(GridError) as err:
        grid("torchvision", dataset="imagenet", model="resnet18", schedules="[ft]")
    assert f"not in the local torch cache: {cached}" in str(err.value)
    cached.parent.mkdir(parents=True)
    torch.save(build_model("resnet18", "imagenet", seed=0).state_dict(), cached)
    checked = grid("torchvision", dataset="imagenet", model="resnet18", schedules="[ft]")
    assert checked.start_weights.sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()
    with pytest.raises(GridError, match="'resnet20' is not a torchvision model"):
        grid("torchvision")


@pytest.mark.slow
def test_ft_lrw_clr_retrain_from_a_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    """Every stage of the plan run as a worker runs it: the pretrain stage trains no epoch and
    records the loaded network's test accuracy, which the prune stage starts from."""
    from nptm.trainables.datasets import load_dataset, normalize
    from nptm.trainables.stage_runner import WorkerEnv, run_stage

    plan = build_plan(grid(checkpoint))
    env = WorkerEnv(storage=str(tmp_path / "store"))
    outcomes = {sid: run_stage(spec, env) for sid, spec in plan.stages.items()}
    by_kind = {o.kind: o for o in outcomes.values()}

    # Independent accuracy: the checkpoint's network on the normalised test images.
    bundle = load_dataset("digits", None)
    model = build_model("resnet20", "digits")
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    with torch.no_grad():
        predicted = model.eval()(normalize(bundle.test.images, bundle.info)).argmax(1)
    expected = (predicted == bundle.test.labels).double().mean().item()

    pretrain = by_kind["pretrain"]
    assert pretrain.status == "ok" and pretrain.epochs_run == 0 and not pretrain.epochs
    assert pretrain.test_acc == pytest.approx(expected, abs=1e-9)
    assert by_kind["prune"].acc_before_prune == pytest.approx(expected, abs=1e-9)
    retrains = [o for o in outcomes.values() if o.kind == "retrain"]
    assert sorted(plan.stages[o.stage_id].schedule for o in retrains) == ["clr", "ft", "lrw"]
    assert all(o.status == "ok" and o.epochs_run == 1 for o in retrains)


@pytest.mark.slow
def test_sweep_from_a_checkpoint_on_ray(
    checkpoint: Path, tmp_path: Path, ray_node, monkeypatch
) -> None:
    """A grid with `from` as `nptm sweep` runs it on Ray workers, its path relative to where
    nptm runs: no pre-training epoch anywhere in the stages table. One retrain, the rewinding
    one (ft, lrw and clr from a checkpoint: the test above)."""
    from tests.sweep_helpers import sweep_on, trials

    path = tmp_path / "g.yaml"
    path.write_text(GRID.format(source=checkpoint.name, dataset="digits", model="resnet20",
                                schedules="[lrw]", seeds="0"))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    result = sweep_on(ray_node, path, tmp_path / "store")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = trials(tmp_path / "store", "fromckpt").set_index("stage_kind")
    assert rows.loc["pretrain", "epochs_run"] == 0
    assert set(rows["status"]) == {"ok"} and rows.loc["retrain", "schedule"] == "lrw"
