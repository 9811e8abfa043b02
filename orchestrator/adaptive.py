"""`nptm sweep GRID --until-conclusive`: the grid's sweep, then seeds added only to the
confirmatory tests still inconclusive, one look at a time, until each has a verdict or
`max_seeds` seeds (the group-sequential design of nptm.results.adaptive).

Every round is an ordinary `run_sweep` of the grid plus the added trials, which are the
trials of the open tests' arms at the next seeds, added to the checked grid as include trials
(copies of its own checked trials with another seed: a grid file's include entry cannot state
an unstructured pruner's options, these keep them). Stage ids are content hashes, so a new
seed reuses the shared pre-training and prune stages like any other seed. Each look is kept
in the run record's looks.json, the added trials in it. Rerunning the same command after an
interruption takes the same looks again from the same stored rows (the boundaries come from a
fixed generator), so it adds the same seeds and resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nptm.orchestrator.errors import UsageError

if TYPE_CHECKING:  # the CLI's parser imports this module: Ray and pandas only when it runs
    import pandas as pd

    from nptm.orchestrator.sweep import SweepOptions
    from nptm.results.adaptive import Design

MAX_SEEDS = 50  # --max-seeds: the null simulation holds 2 MiB per seed


@dataclass(frozen=True)
class AdaptiveOptions:
    """`nptm sweep --until-conclusive`'s options."""

    max_seeds: int | None = None  # the most seeds a test gets; None: twice the grid's
    per_look: int = 1  # seeds added at each look
    confirm_large: bool = False  # allow the added trials beyond the grid's max_trials


def run_until_conclusive(
    grid: Any,
    plan: Any,
    opts: SweepOptions,
    adaptive: AdaptiveOptions,
    on_start: Callable[[Any], None] | None = None,
    say: Callable[[str], None] = print,
) -> Any:
    """Sweep `plan` (of the checked `grid`), look, add seeds to the open tests, sweep again,
    until no test is open or the design's last look. Returns the last round's
    `nptm.results.sink.SweepSummary`; a round that did not finish every stage ok (stopped,
    failed stages) ends the loop before its look: rerunning the command resumes it."""
    from nptm.orchestrator.cluster import held_connection, plugin_packages
    from nptm.orchestrator.lease import hold
    from nptm.orchestrator.planner import build_plan
    from nptm.orchestrator.preflight import check_data_here, data_need
    from nptm.orchestrator.sweep import run_sweep
    from nptm.results.adaptive import arm_rows, look_lines, looks_record, open_tests, take_look
    from nptm.results.run_record import LOOKS_FILE, RunRecord
    from nptm.trainables.layout import Layout

    design = _design(grid, plan, adaptive)
    planned = design.planned()
    say(f"until conclusive: {design.describe()}")
    record = RunRecord(Layout(opts.storage), grid.name)
    _refuse_another_design(record, design)
    looks: list[dict[str, Any]] = []
    next_seed = max(t.seed for t in plan.trials) + 1
    if opts.address is None:  # refused before a local Ray starts, as a plain sweep is
        check_data_here(data_need(grid, plan, opts.data_root))
    modules = plugin_packages(list(grid.plugins))
    lease = hold(opts.storage, grid.name)  # one driver across the rounds: each run_sweep re-enters
    with lease, held_connection(opts.address, num_cpus=opts.num_cpus, py_modules=modules):
        while True:
            summary = run_sweep(plan, opts, on_start=on_start)
            if not summary.ok:
                say(f"look {len(looks) + 1} not taken: the sweep did not finish every stage ok")
                return summary
            ok = _final_ok(opts.storage, grid.name, plan)
            look = take_look(ok, design, looks)
            still = open_tests(look)
            j = len(looks)
            more = planned[j + 1] - planned[j] if len(still) and j + 1 < len(planned) else 0
            keys: list[Any] = []
            if more:
                seeds = list(range(next_seed, next_seed + more))
                keys = _new_trials(plan, arm_rows(ok, still), seeds)
                runs = [_trial_record(k) for k in keys if k.seed == seeds[0]]
                look["added"] = {"seeds": seeds, "runs": len(runs), "trials": runs}
            looks.append(look)
            record.write_json(LOOKS_FILE, looks_record(grid.name, design, looks))
            say("\n".join(look_lines(look)))
            if not keys:
                return summary
            next_seed += more
            grid = dataclasses.replace(grid, includes=(*grid.includes, *keys))
            plan = build_plan(grid, confirm_large=True)  # its size was checked up front


def _design(grid: Any, plan: Any, adaptive: AdaptiveOptions) -> Design:
    """The design of the grid's seeds and the options; refuses one the grid cannot run."""
    from nptm.results.adaptive import Design, arm_cells
    from nptm.results.confirmatory import TEST, paired_differences
    from nptm.results.power import plan_final_ok
    from nptm.search_spaces.schema import SEED_LIMIT

    first = len(set(grid.grid.axes.seed))
    k = 2 * first if adaptive.max_seeds is None else adaptive.max_seeds
    if not first <= k <= MAX_SEEDS:
        raise UsageError(
            f"--max-seeds {k}: a test gets between the grid's {first} seeds and {MAX_SEEDS}"
        )
    planned_ok = plan_final_ok(plan)
    tests = paired_differences(planned_ok)[TEST].drop_duplicates()
    if tests.empty:
        raise UsageError(
            f"--until-conclusive: the grid {grid.name!r} makes no confirmatory test (it lacks "
            "the paired runs the claims compare: docs/reports.md)"
        )
    worst = len(plan.trials) + len(arm_cells(planned_ok, tests)) * (k - first)
    if worst > grid.max_trials and not adaptive.confirm_large:
        raise UsageError(
            f"--until-conclusive: with {k} seeds for every confirmatory test the sweep may "
            f"grow to {worst:,} trials, more than max_trials = {grid.max_trials:,}; raise "
            "max_trials in the grid or confirm with --confirm-large"
        )
    if max(t.seed for t in plan.trials) + k - first >= SEED_LIMIT:
        raise UsageError("--until-conclusive: the added seeds would pass the largest seed")
    return Design(first, k, adaptive.per_look)


def _trial_record(key: Any) -> dict[str, Any]:
    """An added trial in looks.json, less its seed (it gets each added seed)."""
    out = key._asdict()
    del out["seed"]
    return {**out, "overrides": dict(key.overrides), "pruner_options": dict(key.pruner_options)}


def _refuse_another_design(record: Any, design: Design) -> None:
    """A sweep that has looked under one design cannot go on under another: choosing the
    design after seeing results is what alpha spending rules out."""
    from nptm.results.adaptive import design_of

    earlier = record.read_looks()
    try:
        before = design_of(earlier) if earlier is not None and earlier["looks"] else design
    except (TypeError, ValueError):  # a damaged record: written anew
        before = design
    if before != design:
        raise UsageError(
            f"--until-conclusive: sweep {record.sweep!r} has looked under another design "
            f"({before.describe()}); rerun it with the same --max-seeds and --seeds-per-look, "
            "or give the grid another name"
        )


def _final_ok(storage: str, sweep: str, plan: Any) -> pd.DataFrame:
    """The plan's successful final-round retrain rows, as the report reads them."""
    from nptm.results.analysis import final_round_retrain, successful
    from nptm.results.store import SweepStore

    stages = SweepStore(storage, sweep).read_stages()
    return successful(final_round_retrain(stages[stages["stage_id"].isin(set(plan.stages))]))


def _new_trials(plan: Any, rows: pd.DataFrame, seeds: list[int]) -> list[Any]:
    """The trials of `rows` (final retrain rows of `plan`, any seed) at each of `seeds`."""
    key_of = {t.stage_id: t.key for t in plan.trials}
    runs = {key_of[sid]._replace(seed=-1) for sid in rows["stage_id"]}
    ordered = sorted(runs, key=repr)  # a stable order: the same include trials every rerun
    return [key._replace(seed=s) for s in seeds for key in ordered]
