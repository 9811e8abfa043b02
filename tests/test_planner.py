"""Planner: grid expansion against a naive reference, stage sharing, hashes and epoch counts."""

from __future__ import annotations

import functools
import itertools
import json
import math
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from nptm.orchestrator.gpu_hours import describe, read_figures, shipped_figures
from nptm.orchestrator.planner import Plan, build_plan, cumulative_ratio
from nptm.orchestrator.render import render_plan
from nptm.search_spaces import GridError, load_grid
from nptm.trainables.catalog import PRUNERS
from nptm.trainables.inspect import inspect_model
from nptm.trainables.recipe import DEFAULT_RECIPES
from nptm.trainables.stage import StageSpec

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def plan_of(tmp_path: Path, text: str, name: str = "grid.yaml", **kw: Any) -> Plan:
    return build_plan(load_grid(write(tmp_path, text, name)), **kw)


def reference_trials(
    raw: dict[str, Any], length: Callable[[dict[str, Any]], int] | None = None
) -> set[tuple[Any, ...]]:
    """A deliberately naive expansion of the raw YAML: nested loops, dict matching.

    `length(trial)` gives the epochs of a scratch_e / scratch_b trial, which replace its budget.
    """

    def listify(v: Any) -> list[Any]:
        return v if isinstance(v, list) else [v]

    axes = raw["axes"]
    targets = []
    for entry in listify(axes["pruner"]):
        if "ratio" in entry:
            targets += [{"pruner": entry["name"], "ratio": r} for r in listify(entry["ratio"])]
        else:
            targets += [{"pruner": entry["name"], "preset": p} for p in listify(entry["preset"])]
    ov_names = sorted(axes.get("overrides", {}))
    ov_values = [listify(axes["overrides"][n]) for n in ov_names]
    out = set()
    for ds, model, tgt, sched, budget, seed, *ovs in itertools.product(
        listify(axes["dataset"]),
        listify(axes["model"]),
        targets,
        listify(axes["schedule"]),
        listify(axes["budget"]),
        listify(axes["seed"]),
        *ov_values,
    ):
        trial = {
            "dataset": ds,
            "model": model,
            **tgt,
            "schedule": sched,
            "budget": budget,
            "seed": seed,
            **dict(zip(ov_names, ovs, strict=True)),
        }
        if any(
            all(k in trial and trial[k] == v for k, v in rule.items())
            for rule in raw.get("exclude", [])
        ):
            continue
        if trial["schedule"] in ("scratch_e", "scratch_b"):
            assert length is not None
            trial["budget"] = length(trial)
        out.add(_key(trial, ov_names))
    for inc in raw.get("include", []):
        out.add(_key(inc, sorted(k for k in inc if k == "lr")))
    return out


def _key(t: dict[str, Any], ov_names: list[str]) -> tuple[Any, ...]:
    ratio = t.get("ratio")
    return (
        t["dataset"],
        t["model"],
        t["pruner"],
        None if ratio is None else float(ratio),
        t.get("preset"),
        t["schedule"],
        t["budget"],
        t["seed"],
        tuple((n, float(t[n])) for n in ov_names),
    )


def plan_keys(plan: Plan) -> set[tuple[Any, ...]]:
    return {
        (t.dataset, t.model, t.pruner, t.ratio, t.preset, t.schedule, t.budget, t.seed, t.overrides)
        for t in plan.trials
    }


GRID = """\
name: small
axes:
  dataset: [cifar10]
  model: [resnet56, resnet110]
  pruner:
    - {name: magnitude, ratio: [0.5, 0.9]}
    - {name: l1_filter, preset: [A, B]}
  schedule: [ft, wr, clr]
  budget: [40, 160]
  seed: [0, 1, 2]
"""


def test_expansion_count_is_the_product(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, GRID)
    # 2 models x (2 ratios + 2 presets) x 3 schedules x 2 budgets x 3 seeds
    assert len(plan.trials) == 2 * 4 * 3 * 2 * 3 == 144
    assert plan_keys(plan) == reference_trials(yaml.safe_load(GRID))
    assert len(plan_keys(plan)) == len(plan.trials)  # no duplicates


def test_ratio_list_expands_per_value(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, GRID)
    ratios = {t.ratio for t in plan.trials if t.pruner == "magnitude"}
    presets = {t.preset for t in plan.trials if t.pruner == "l1_filter"}
    assert ratios == {0.5, 0.9}
    assert presets == {"A", "B"}
    assert all(t.preset is None for t in plan.trials if t.pruner == "magnitude")
    assert all(t.ratio is None for t in plan.trials if t.pruner == "l1_filter")


def test_exclude_and_include(tmp_path: Path) -> None:
    text = GRID + textwrap.dedent(
        """\
        exclude:
          - {schedule: wr, budget: 160}
          - {pruner: magnitude, ratio: 0.9, model: resnet110}
        include:
          - {dataset: cifar10, model: resnet110, pruner: magnitude, ratio: 0.9,
             schedule: clr, budget: 40, seed: 0}
          - {dataset: cifar10, model: resnet56, pruner: magnitude, ratio: 0.5,
             schedule: ft, budget: 40, seed: 0}
        """
    )
    plan = plan_of(tmp_path, text)
    # wr@160: 2 models x 4 targets x 3 seeds = 24 trials; magnitude 0.9 on resnet110:
    # 3 schedules x 2 budgets x 3 seeds = 18, of which wr@160 (3 seeds) is already counted.
    # The first include puts one excluded trial back; the second is already in the grid.
    assert len(plan.trials) == 144 - 24 - (18 - 3) + 1
    assert plan_keys(plan) == reference_trials(yaml.safe_load(text))
    assert not any(t.schedule == "wr" and t.budget == 160 for t in plan.trials)
    back = [
        t for t in plan.trials if (t.model, t.pruner, t.ratio) == ("resnet110", "magnitude", 0.9)
    ]
    assert [(t.schedule, t.budget, t.seed) for t in back] == [("clr", 40, 0)]
    assert plan.trials[-1] is back[0]  # includes come after the product


def test_overrides_axis(tmp_path: Path) -> None:
    text = GRID + "  overrides:\n    lr: [0.1, 0.05]\n"
    base, plan = plan_of(tmp_path, GRID, "a.yaml"), plan_of(tmp_path, text, "b.yaml")
    assert len(plan.trials) == 2 * len(base.trials)
    assert {t.overrides for t in plan.trials} == {(("lr", 0.1),), (("lr", 0.05),)}
    assert plan_keys(plan) == reference_trials(yaml.safe_load(text))
    # The override is a retraining setting: pretrain and prune stages are shared.
    counts, base_counts = plan.count_by_kind(), base.count_by_kind()
    assert counts["pretrain"] == base_counts["pretrain"] == 2 * 3
    assert counts["prune"] == base_counts["prune"] == 2 * 3 * 4
    assert counts["retrain"] == 2 * base_counts["retrain"]
    spec = plan.stages[plan.trials[0].stage_id]
    assert spec.override_dict == dict(plan.trials[0].overrides)
    assert {t.params()["lr"] for t in plan.trials} == {0.1, 0.05}


def test_include_with_an_override_not_on_the_axes(tmp_path: Path) -> None:
    text = GRID + (
        "include:\n  - {dataset: cifar10, model: resnet56, pruner: magnitude, "
        "ratio: 0.5, schedule: ft, budget: 40, seed: 0, lr: 0.01}\n"
    )
    plan = plan_of(tmp_path, text)
    assert len(plan.trials) == 145
    assert plan.trials[-1].overrides == (("lr", 0.01),)


def test_stage_dag_structure(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, GRID)
    seen: set[str] = set()
    for sid, spec in plan.stages.items():
        assert spec.id == sid
        assert all(p in seen for p in spec.parents), "parents come before children"
        seen.add(sid)
        for parent in spec.parents:
            assert sid in plan.children(parent)
    for sid in plan.stages:
        assert all(sid in plan.stages[c].parents for c in plan.children(sid))
    with pytest.raises(KeyError):
        plan.children("0" * 16)
    for t in plan.trials:
        pre, prune, retrain = (plan.stages[s] for s in t.chain)
        assert t.stage_id == retrain.id == t.chain[-1]
        assert (pre.kind, prune.kind, retrain.kind) == ("pretrain", "prune", "retrain")
        assert (pre.dataset, pre.model, pre.seed) == (t.dataset, t.model, t.seed)
        assert prune.parents == (pre.id,)
        assert (prune.pruner, prune.ratio, prune.preset) == (t.pruner, t.ratio, t.preset)
        assert (retrain.schedule, retrain.budget, retrain.seed) == (t.schedule, t.budget, t.seed)
        # wr also reads the pretrain checkpoint; every other schedule only the pruned model
        expected = (prune.id, pre.id) if t.schedule == "wr" else (prune.id,)
        assert retrain.parents == expected


def test_stage_counts_are_shared(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, GRID)
    assert plan.count_by_kind() == {
        "pretrain": 2 * 3,  # models x seeds
        "prune": 2 * 3 * 4,  # ... x pruner settings
        "retrain": 144,
    }


def test_scratch_hangs_off_the_prune(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, GRID.replace("[ft, wr, clr]", "[ft, scratch]"))
    for t in plan.trials:
        if t.schedule == "scratch":
            (parent,) = plan.stages[t.stage_id].parents
            assert plan.stages[parent].kind == "prune"


SHARED_A = """\
name: sweep-a
data: {val_fraction: 0.1}
resources: {executor: inline}
axes:
  dataset: [digits]
  model: [resnet20]
  pruner:
    - {name: magnitude, ratio: 0.9}
    - {name: random, ratio: 0.9}
  schedule: [ft, lrw]
  budget: [10]
  seed: [0, 1]
"""

# Same pre-training, written in another key order, with other pruners/schedules/resources.
SHARED_B = """\
axes:
  seed: [1, 2]
  schedule: [clr, wr]
  budget: [15, 5]
  pruner:
    - {ratio: 0.9, name: magnitude}
    - {name: l1_filter, ratio: 0.5}
  model: resnet20
  dataset: digits
resources: {cpus_per_worker: 2, executor: train, workers_per_trial: 2}
max_trials: 100
data: {download: false, val_fraction: 0.1}
name: sweep-b
"""


def _ids(plan: Plan, kind: str) -> dict[tuple[Any, ...], str]:
    out = {}
    for sid, s in plan.stages.items():
        if s.kind == kind:
            out[(s.dataset, s.model, s.seed, s.pruner, s.ratio, s.preset)] = sid
    return out


def test_grids_share_pretrain_and_prune_stages(tmp_path: Path) -> None:
    a, b = plan_of(tmp_path, SHARED_A, "a.yaml"), plan_of(tmp_path, SHARED_B, "b.yaml")
    pre_a, pre_b = _ids(a, "pretrain"), _ids(b, "pretrain")
    common = pre_a.keys() & pre_b.keys()
    assert len(common) == 1  # seed 1
    assert all(pre_a[k] == pre_b[k] for k in common)
    assert set(pre_a.values()) & set(pre_b.values()) == {pre_a[k] for k in common}
    prune_a, prune_b = _ids(a, "prune"), _ids(b, "prune")
    # magnitude 0.9 on seed 1's model is the same stage in both sweeps
    key = ("digits", "resnet20", 1, "magnitude", 0.9, None)
    assert prune_a[key] == prune_b[key]
    assert set(prune_a.values()) & set(prune_b.values()) == {prune_a[key]}


def test_key_order_does_not_change_ids(tmp_path: Path) -> None:
    reordered = yaml.safe_load(GRID)
    reordered = {k: reordered[k] for k in reversed(list(reordered))}
    reordered["axes"] = {k: reordered["axes"][k] for k in reversed(list(reordered["axes"]))}
    reordered["axes"]["pruner"] = [
        dict(reversed(list(e.items()))) for e in reordered["axes"]["pruner"]
    ]
    text = yaml.safe_dump(reordered, sort_keys=False)
    assert text.index("axes") < text.index("name")
    a, b = plan_of(tmp_path, GRID, "a.yaml"), plan_of(tmp_path, text, "b.yaml")
    assert list(a.stages) == list(b.stages)
    assert [t.stage_id for t in a.trials] == [t.stage_id for t in b.trials]


def test_recipe_change_changes_pretrain_and_all_descendants(tmp_path: Path) -> None:
    a = plan_of(tmp_path, SHARED_A, "a.yaml")
    b = plan_of(tmp_path, SHARED_A + "pretrain: {lr: 0.05}\n", "b.yaml")
    assert len(a.stages) == len(b.stages)
    assert set(a.stages).isdisjoint(b.stages)
    # ... and so does the held-out share, which changes what pre-training sees
    c = plan_of(tmp_path, SHARED_A.replace("val_fraction: 0.1", "val_fraction: 0.2"), "c.yaml")
    assert set(a.stages).isdisjoint(c.stages)
    # while resources and the sweep name do not
    d = plan_of(
        tmp_path,
        SHARED_A.replace("sweep-a", "other").replace(
            "{executor: inline}", "{executor: train, gpus_per_worker: 0.5}"
        ),
        "d.yaml",
    )
    assert list(a.stages) == list(d.stages)


def test_ids_do_not_depend_on_the_process(tmp_path: Path) -> None:
    path = write(tmp_path, GRID)
    code = (
        "import sys; from search_spaces import load_grid; "
        "from nptm.orchestrator.planner import build_plan; "
        f"print(' '.join(build_plan(load_grid({str(path)!r})).stages))"
    )
    outputs = set()
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            check=True,
        )
        outputs.add(out.stdout)
    assert len(outputs) == 1
    assert outputs.pop().split() == list(plan_of(tmp_path, GRID, "again.yaml").stages)


def test_planned_and_naive_epochs(tmp_path: Path) -> None:
    text = """\
    name: epochs
    axes:
      dataset: digits
      model: resnet20
      pruner:
        - {name: magnitude, ratio: 0.9}
        - {name: random, ratio: 0.9}
      schedule: [ft, clr]
      budget: [10, 20]
      seed: [0, 1]
    """
    plan = plan_of(tmp_path, text)
    s = plan.summary()
    # 2 targets x 2 schedules x 2 budgets x 2 seeds = 16 trials; digits pre-trains 30 epochs.
    assert s["trials"] == 16
    assert s["stages"] == {"pretrain": 2, "prune": 4, "retrain": 16}
    # planned: 2 pre-training runs x 30 + 8 retrains x 10 + 8 retrains x 20
    assert s["epochs"]["planned"] == 2 * 30 + 8 * 10 + 8 * 20 == 300
    # naive: every trial pre-trains (30) and retrains (its budget)
    assert s["epochs"]["naive"] == 16 * 30 + 8 * 10 + 8 * 20 == 720
    assert s["epochs"]["planned_by_kind"] == {"pretrain": 60, "prune": 0, "retrain": 240}
    assert s["sweep"] == "epochs"
    json.dumps(s)  # JSON-ready for `nptm plan --json`
    from nptm.orchestrator.render import render_plan

    table = render_plan(plan)
    for needle in ("'epochs'", "16 trials", "pretrain", "prune", "retrain", "300", "720"):
        assert needle in table


SHARED = """\
name: shared
data: {val_fraction: 0.1}
seeds: {pretrain: shared, shared_seed: 7}
axes:
  dataset: digits
  model: [resnet20, resnet32]
  pruner:
    - {name: magnitude, ratio: 0.9}
    - {name: random, ratio: [0.5, 0.9]}
  schedule: [ft, wr]
  budget: [10, 20]
  seed: [0, 1, 2]
"""


def test_shared_pretrain_plans_one_pretraining_per_model(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, SHARED)
    # 2 models x 3 targets x 2 schedules x 2 budgets x 3 seeds = 72 trials.
    assert len(plan.trials) == 72
    assert plan.count_by_kind() == {
        "pretrain": 2,  # one per (dataset, model), whatever the seeds
        # magnitude: one per pre-trained network (pruning is shared too); random: one mask
        # per network, ratio and seed (2 x 2 x 3), as rerunning the authors' scripts draws
        "prune": 2 + 12,
        "retrain": 72,  # every seed retrains
    }
    # planned: 2 x 30 pre-training epochs + 36 retrains x 10 + 36 x 20; naive: 72 x 30 + same
    assert plan.planned_epochs() == {"pretrain": 60, "prune": 0, "retrain": 1080}
    for t in plan.trials:
        pre, prune, retrain = (plan.stages[s] for s in t.chain)
        assert pre.seed == 7 and pre.split_seed is None
        if t.pruner == "magnitude":
            assert prune.seed == 7 and prune.split_seed is None
        else:  # the retraining seed draws the mask, on the shared network's split
            assert prune.seed == t.seed and prune.split_seed == 7
        assert retrain.seed == t.seed
        # a retraining seed keeps the shared network's train/validation split
        assert retrain.data_split_seed == 7 and retrain.split_seed == 7
    one_mask = plan_of(
        tmp_path, SHARED.replace("shared_seed: 7", "shared_seed: 7, random_masks: shared"), "c.yaml"
    )
    assert one_mask.count_by_kind() == {"pretrain": 2, "prune": 2 * 3, "retrain": 72}
    for t in one_mask.trials:
        prune = one_mask.stages[t.chain[1]]
        assert prune.seed == 7 and prune.split_seed is None
    # per_trial (the default) pre-trains and prunes once per seed, as before
    own = plan_of(tmp_path, SHARED.replace("pretrain: shared", "pretrain: per_trial"), "b.yaml")
    assert own.count_by_kind() == {"pretrain": 2 * 3, "prune": 2 * 3 * 3, "retrain": 72}
    assert all(s.split_seed is None for s in own.stages.values())


def test_shared_seed_equal_to_a_trial_seed_is_the_same_stage(tmp_path: Path) -> None:
    shared = plan_of(tmp_path, SHARED.replace("shared_seed: 7", "shared_seed: 0"))
    own = plan_of(tmp_path, SHARED.replace("pretrain: shared", "pretrain: per_trial"), "b.yaml")
    seed0 = {t.stage_id for t in own.trials if t.seed == 0}
    assert seed0 == {t.stage_id for t in shared.trials if t.seed == 0}


def test_precision_is_recorded_and_part_of_the_identity(tmp_path: Path) -> None:
    fp32 = plan_of(tmp_path, SHARED)
    bf16 = plan_of(tmp_path, SHARED + "resources: {precision: bf16}\n", "b.yaml")
    assert {s.precision for s in fp32.stages.values()} == {"fp32"}
    assert {s.precision for s in bf16.stages.values()} == {"bf16"}
    assert not set(fp32.stages) & set(bf16.stages)


def test_scratch_e_and_scratch_b_lengths_are_known_at_plan_time(tmp_path: Path) -> None:
    text = """\
    name: scratch
    axes:
      dataset: cifar10
      model: resnet56
      pruner:
        - {name: l1_filter, preset: B}
        - {name: magnitude, ratio: 0.9}
      schedule: [ft, scratch, scratch_e, scratch_b]
      budget: [40, 72]
      seed: [0]
    """
    plan = plan_of(tmp_path, text)
    lengths = {(t.pruner, t.schedule): set() for t in plan.trials}
    for t in plan.trials:
        lengths[(t.pruner, t.schedule)].add(t.budget)
        assert plan.stages[t.stage_id].budget == t.budget
    # ResNet-56-B keeps 90,907,264 of 125,485,696 MACs (see test_schedules):
    # int(160 * 125,485,696 / 90,907,264) = 220. Unstructured pruning keeps the MACs: 160.
    assert lengths == {
        ("l1_filter", "ft"): {40, 72},
        ("l1_filter", "scratch"): {40, 72},
        ("l1_filter", "scratch_e"): {160},
        ("l1_filter", "scratch_b"): {220},
        ("magnitude", "ft"): {40, 72},
        ("magnitude", "scratch"): {40, 72},
        ("magnitude", "scratch_e"): {160},
        ("magnitude", "scratch_b"): {160},
    }
    # 2 targets x (2 schedules x 2 budgets + scratch_e + scratch_b) = 12 trials, one stage each
    assert len(plan.trials) == 12 and plan.count_by_kind()["retrain"] == 12
    # planned retraining epochs: per target 40 + 72 (ft) + 40 + 72 (scratch) + E + B
    assert plan.planned_epochs()["retrain"] == (224 + 160 + 220) + (224 + 160 + 160) == 1148


def test_keep_epochs_for_weight_rewinding(tmp_path: Path) -> None:
    text = """\
    name: wr
    axes:
      dataset: digits
      model: resnet20
      pruner: [{name: magnitude, ratio: 0.9}]
      schedule: [wr, lrw, ft]
      budget: [10, 20]
      seed: [0]
    """
    plan = plan_of(tmp_path, text)
    (pre,) = [s for s in plan.stages.values() if s.kind == "pretrain"]
    assert DEFAULT_RECIPES["digits"].epochs == 30
    assert pre.keep_epochs == (30 - 20, 30 - 10) == (10, 20)
    # lrw needs no checkpoint: without wr nothing is kept
    no_wr = plan_of(tmp_path, text.replace("[wr, lrw, ft]", "[lrw, ft]"), "b.yaml")
    (pre2,) = [s for s in no_wr.stages.values() if s.kind == "pretrain"]
    assert pre2.keep_epochs == ()
    assert pre2.id == pre.id  # what to keep is not part of the identity


@pytest.mark.parametrize("rounds", [2, 3])
def test_iterative_rounds_chain(tmp_path: Path, rounds: int) -> None:
    text = f"""\
    name: iter
    iterative: {{rounds: {rounds}}}
    axes:
      dataset: digits
      model: resnet20
      pruner: [{{name: magnitude, ratio: [0.5, 0.9]}}]
      schedule: [clr, wr]
      budget: [10]
      seed: [0]
    """
    plan = plan_of(tmp_path, text)
    for t in plan.trials:
        stages = [plan.stages[s] for s in t.chain]
        assert len(stages) == 1 + 2 * rounds
        assert [s.kind for s in stages] == ["pretrain"] + ["prune", "retrain"] * rounds
        pre = stages[0]
        for i in range(rounds):
            prune, retrain = stages[1 + 2 * i], stages[2 + 2 * i]
            assert prune.round == i + 1
            assert prune.parents == (stages[2 * i].id,)  # the previous retrain (or pretrain)
            assert retrain.parents[0] == prune.id
            if t.schedule == "wr":
                assert retrain.parents == (prune.id, pre.id)
            assert (retrain.schedule, retrain.budget) == (t.schedule, t.budget)
            assert prune.ratio == pytest.approx(1 - (1 - t.ratio) ** ((i + 1) / rounds), abs=1e-11)
        assert stages[-2].ratio == t.ratio  # the last round reaches the target exactly
        assert t.stage_id == stages[-1].id
    s = plan.summary()
    # 2 ratios x 2 schedules: every round of every trial is its own retrain stage; round-1
    # prunes are shared by the two schedules.
    assert s["stages"] == {"pretrain": 1, "prune": 2 + 4 * (rounds - 1), "retrain": 4 * rounds}
    assert s["epochs"]["naive"] == 4 * (30 + rounds * 10)
    assert s["epochs"]["planned"] == 30 + 4 * rounds * 10


def test_cumulative_ratio() -> None:
    assert cumulative_ratio(0.9, 1, 1) == 0.9
    assert cumulative_ratio(0.9, 3, 3) == 0.9
    assert cumulative_ratio(0.9, 1, 3) == pytest.approx(1 - 0.1 ** (1 / 3), abs=1e-11)
    # equal keep-fraction per round: (1 - s_i) / (1 - s_{i-1}) is constant
    r = [0.0] + [cumulative_ratio(0.96, i, 4) for i in range(1, 5)]
    keep = [(1 - r[i]) / (1 - r[i - 1]) for i in range(1, 5)]
    assert keep == pytest.approx([0.04**0.25] * 4, rel=1e-9)


def test_max_trials_needs_confirmation(tmp_path: Path) -> None:
    grid = load_grid(write(tmp_path, GRID + "max_trials: 100\n"))
    with pytest.raises(GridError) as info:
        build_plan(grid)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'grid.yaml'}: max_trials: ")
    assert "144 trials" in message and "max_trials = 100" in message
    assert "--confirm-large" in message
    assert len(build_plan(grid, confirm_large=True).trials) == 144


def test_max_trials_counts_after_exclude_and_include(tmp_path: Path) -> None:
    text = GRID + textwrap.dedent(
        """\
        max_trials: 120
        exclude: [{schedule: wr, budget: 160}]
        include:
          - {dataset: cifar10, model: resnet56, pruner: magnitude, ratio: 0.5,
             schedule: wr, budget: 160, seed: 0}
        """
    )
    # 144 - 24 + 1 = 121 trials: exactly at the cap plans, one above it is refused
    assert len(plan_of(tmp_path, text.replace("max_trials: 120", "max_trials: 121")).trials) == 121
    with pytest.raises(GridError, match="121 trials, more than max_trials = 120"):
        plan_of(tmp_path, text, "b.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_grid_matches_reference_expansion(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    plan = build_plan(load_grid(path))

    @functools.cache
    def macs(dataset: str, model: str, ratio: Any, preset: Any) -> tuple[int, int]:
        # the same filter counts whichever structured pruner removes the filters
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            counts = inspect_model(dataset, model, "random_filter", ratio, preset)
        finally:
            torch.set_num_threads(threads)
        return counts["base"]["macs"], counts["pruned"]["macs"]

    def length(trial: dict[str, Any]) -> int:
        # Liu et al.'s Scratch-E / Scratch-B, rounded as main_B.py: int(T * base / pruned)
        epochs = plan.grid.recipe(trial["dataset"]).epochs
        if trial["schedule"] == "scratch_e" or not PRUNERS[trial["pruner"]].structured:
            return epochs
        base, pruned = macs(trial["dataset"], trial["model"], trial.get("ratio"),
                            trial.get("preset"))  # fmt: skip
        return int(epochs * (base / pruned))

    assert plan_keys(plan) == reference_trials(raw, length)
    s = plan.summary()
    shared = raw.get("seeds", {}).get("pretrain") == "shared"
    shared_seed = raw.get("seeds", {}).get("shared_seed", 0)
    models_seeds = {(t.dataset, t.model, shared_seed if shared else t.seed) for t in plan.trials}
    assert s["stages"]["pretrain"] == len(models_seeds)
    assert s["stages"]["retrain"] == len(plan.trials) * plan.grid.rounds
    naive = sum(
        plan.grid.recipe(t.dataset).epochs + plan.grid.rounds * t.budget for t in plan.trials
    )
    assert s["epochs"]["naive"] == naive


@pytest.mark.scale
def test_plans_100k_trials(tmp_path: Path) -> None:
    ratios = [round(0.035 * i, 3) for i in range(1, 26)]  # 25 sparsities up to 0.875
    text = f"""\
    name: big
    max_trials: 100000
    axes:
      dataset: cifar10
      model: [resnet20, resnet32, resnet56, resnet110]
      pruner: [{{name: magnitude, ratio: {ratios}}}]
      schedule: [ft, lrw, wr, slr, clr]
      budget: [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
      seed: {list(range(20))}
    """
    start = time.perf_counter()
    plan = plan_of(tmp_path, text)
    elapsed = time.perf_counter() - start
    print(f"\nplanned {len(plan.trials):,} trials / {len(plan.stages):,} stages in {elapsed:.2f} s")
    assert len(plan.trials) == 4 * 25 * 5 * 10 * 20 == 100_000
    assert plan.count_by_kind() == {"pretrain": 4 * 20, "prune": 4 * 20 * 25, "retrain": 100_000}
    assert math.isclose(
        plan.summary()["epochs"]["planned"], 80 * 160 + 100_000 / 10 * sum(range(10, 101, 10))
    )


def test_structured_ratio_is_not_made_cumulative(tmp_path: Path) -> None:
    # rounds > 1 is refused for structured pruners; with one round the ratio is used as given
    plan = plan_of(
        tmp_path, GRID.replace("{name: l1_filter, preset: [A, B]}", "{name: l1_filter, ratio: 0.3}")
    )
    assert PRUNERS["l1_filter"].structured
    prunes = {
        s.ratio for s in plan.stages.values() if s.kind == "prune" and s.pruner == "l1_filter"
    }
    assert prunes == {0.3}


@pytest.mark.parametrize(
    "rules",
    [
        [],
        [{"seed": 1}],
        [{"seed": 1, "lr": 0.05}, {"pruner": "magnitude", "schedule": "ft"}],
        [{"ratio": 0.9, "budget": 40}, {"preset": "B", "seed": 2, "model": "resnet110"}],
    ],
)
def test_count_without_expanding_matches_expansion(tmp_path: Path, rules: list) -> None:
    from nptm.search_spaces import expand

    text = GRID + "  overrides:\n    lr: [0.1, 0.05]\n"
    raw = yaml.safe_load(text) | {"exclude": rules}
    grid = load_grid(write(tmp_path, yaml.safe_dump(raw)))
    plan = build_plan(grid)
    assert expand.count(grid.space, list(grid.includes)) == len(plan.trials)
    assert plan_keys(plan) == reference_trials(raw)


# -- GPU-hours ---------------------------------------------------------------------------------
HOURS_GRID = """\
name: hours
data: {{val_fraction: {val}}}
axes:
  dataset: digits
  model: [resnet20, resnet32]
  pruner: [{{name: magnitude, ratio: 0.5}}]
  schedule: [ft]
  budget: [10, 20]
  seed: [0]
"""


def _figures(tmp_path: Path, rows: list[dict[str, Any]]) -> Any:
    path = tmp_path / "gpu_figures.json"
    path.write_text(json.dumps({"gpu": "Test GPU", "measured_on": "2026-01-02", "torch": "2.x",
                                "seconds_per_epoch": rows}))  # fmt: skip
    return read_figures(path)


def test_plan_table_says_gpu_hours_of_the_shipped_figures(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, HOURS_GRID.format(val=0))
    assert render_plan(plan).splitlines()[-1] == describe(plan.gpu_hours(shipped_figures()))


def test_gpu_hours_are_planned_epochs_times_seconds_per_epoch(tmp_path: Path) -> None:
    figures = _figures(
        tmp_path,
        [{"model": "resnet20", "dataset": "digits", "batch": 64, "seconds_per_epoch": 12.0},
         {"model": "resnet32", "dataset": "digits", "batch": 64, "seconds_per_epoch": 18.0}],
    )  # fmt: skip
    # Per model: one 30-epoch digits pre-training + retrains of 10 and 20 epochs = 60 epochs.
    plan = plan_of(tmp_path, HOURS_GRID.format(val=0))
    assert plan.planned_epochs_by_pair() == {("resnet20", "digits"): 60, ("resnet32", "digits"): 60}
    hours = plan.gpu_hours(figures)
    assert hours["gpu"] == "Test GPU" and hours["measured_on"] == "2026-01-02"
    assert hours["unknown"] == []
    assert [p["hours"] for p in hours["pairs"]] == pytest.approx([60 * 12 / 3600, 60 * 18 / 3600])
    assert hours["total"] == pytest.approx(0.2 + 0.3)
    assert describe(hours) == (
        "planned GPU-hours: 0.5 on one Test GPU (training phase, measured 2026-01-02)"
    )
    # A held-out validation split shortens every epoch: 1,437 digits - round(143.7) = 1,293.
    held = plan_of(tmp_path, HOURS_GRID.format(val=0.1), name="val.yaml").gpu_hours(figures)
    assert held["total"] == pytest.approx(0.5 * 1293 / 1437)


def test_gpu_hours_unknown_without_a_figure(tmp_path: Path) -> None:
    figures = _figures(
        tmp_path, [{"model": "resnet20", "dataset": "digits", "seconds_per_epoch": 12.0}]
    )
    plan = plan_of(tmp_path, HOURS_GRID.format(val=0))
    hours = plan.gpu_hours(figures)
    assert hours["total"] is None  # one pair unmeasured: no invented total
    assert hours["unknown"] == ["resnet32@digits"]
    assert hours["pairs"][0]["hours"] == pytest.approx(0.2)
    assert hours["pairs"][1]["hours"] is None
    assert describe(hours) == (
        "planned GPU-hours: unknown (no per-epoch figure on Test GPU for resnet32@digits)"
    )
    json.dumps(plan.summary())  # `nptm plan --json` carries it
    assert "gpu_hours" in plan.summary()


def test_pruner_options_reach_the_prune_stage_and_its_identity(tmp_path: Path) -> None:
    text = """\
    name: opts
    axes:
      dataset: [digits]
      model: [resnet20]
      pruner:
        - {name: magnitude, ratio: 0.5}
        - {name: magnitude, ratio: 0.5, layers: conv+linear}
        - {name: l1_filter, ratio: 0.5}
      schedule: [ft]
      budget: [5]
      seed: [0]
    """
    plan = plan_of(tmp_path, text)
    prunes = [s for s in plan.stages.values() if s.kind == "prune"]
    assert len(prunes) == 3  # the two magnitude entries are different stages
    options = sorted(s.pruner_options for s in prunes)
    assert options == [
        (),
        (("layers", "conv"), ("min_keep", 0.0)),
        (("layers", "conv+linear"), ("min_keep", 0.0)),
    ]
    for spec in prunes:
        ident = spec.identity()
        assert ("pruner_options" in ident) == (spec.pruner == "magnitude")
        assert StageSpec.from_dict(spec.to_dict()) == spec
    assert {t.pruner_options for t in plan.trials if t.pruner == "l1_filter"} == {()}


def test_changed_definitions_get_new_stage_ids(tmp_path: Path) -> None:
    """clr, hrank and the C/D presets compute something else than before their revision 2:
    their stages carry the revision, so a storage root never hands back an old result."""
    text = """\
    name: revs
    axes:
      dataset: [cifar10]
      model: [resnet56]
      pruner:
        - {name: l1_filter, preset: [B, C]}
        - {name: hrank, preset: hrank-paper}
      schedule: [ft, clr]
      budget: [40]
      seed: [0]
    """
    plan = plan_of(tmp_path, text)
    revision = {
        (s.kind, s.pruner, s.preset, s.schedule): s.identity().get("revision")
        for s in plan.stages.values()
        if s.kind != "pretrain"
    }
    assert revision[("prune", "l1_filter", "B", None)] is None
    assert revision[("prune", "l1_filter", "C", None)] == 2
    assert revision[("prune", "hrank", "hrank-paper", None)] == 2
    assert revision[("retrain", "l1_filter", "B", "ft")] is None
    assert revision[("retrain", "l1_filter", "B", "clr")] == 2
