"""Grid -> trials -> deduplicated stage DAG.

Every trial is a chain of stages::

    pretrain(dataset, model, seed, recipe, val_fraction)
      -> prune(pruner, ratio | preset, seed, round 1)
        -> retrain(schedule, budget, overrides, seed)        # the trial's result when k = 1
          -> prune(round 2, cumulative ratio) -> retrain -> ... (k = iterative.rounds)

Seeds: by default (`seeds.pretrain: per_trial`) every seed of the axis pre-trains and prunes
its own network. With `seeds.pretrain: shared` one network per (dataset, model) is pre-trained
with `seeds.shared_seed` and pruned once per methodical pruner target, and the seed axis varies
the retraining (data order, augmentation, scratch's initialisation) and a random pruner's mask:
each seed draws its own (`seeds.random_masks: per_seed`, as rerunning the authors' scripts
does), unless `seeds.random_masks: shared` prunes it once too. Prune and retrain stages of a
seed other than the shared one keep the shared network's train/validation split (`split_seed`).

`scratch_e` and `scratch_b` train for a length of their own (T, and T x base MACs / pruned
MACs), computed here at plan time, so their stages and trials carry that many epochs as their
budget whatever the budget axis says.

A stage's id is a content hash of what determines its output, its parents' ids included, so
trials that share a pre-trained model (or a pruned one) share the stage: 3 seeds x 4 pruner
settings x 6 schedules need 3 pre-training runs, not 72. `scratch` is a retrain schedule like
the others; its stage hangs off the prune stage because it needs the pruned architecture.

Iterative pruning (k rounds, unstructured pruners only): round i prunes the previous round's
retrained model to the cumulative sparsity 1 - (1 - r) ** (i / k), so round k reaches the
trial's ratio r, and each round retrains with the trial's schedule and budget.

Weight rewinding (`wr`) at budget t restores pre-training's weights after T - t epochs, so
the pretrain stage lists every such epoch in `keep_epochs`, and a `wr` retrain stage names the
pretrain stage as its second parent (`parents == (prune_id, pretrain_id)`): that is the
checkpoint it reads, in every round. `lrw` only replays the recipe's lr and needs no extra
checkpoint. What to keep is not part of the pretrain stage's identity: when a later grid asks a
finished pre-training for an epoch it did not keep, the sweep runs that stage again, and it
re-makes just the missing weights from the nearest full training state it kept
(`nptm.trainables.stage_runner.kept_state_epochs`), keeping its outcome.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from nptm.orchestrator.gpu_hours import GpuFigures, gpu_hours, shipped_figures
from nptm.search_spaces import expand
from nptm.search_spaces.checks import CheckedGrid, run_length_problem
from nptm.search_spaces.errors import GridError
from nptm.search_spaces.expand import TrialKey
from nptm.trainables.catalog import FULL_LENGTH_SCHEDULES, PRUNERS, SCHEDULES
from nptm.trainables.recipe import Recipe
from nptm.trainables.schedules import rewind_epoch, run_epochs
from nptm.trainables.stage import StageKind, StageSpec

__all__ = ["Plan", "Trial", "build_plan", "cumulative_ratio"]

# Digits kept of a computed cumulative ratio, so its hash cannot depend on the platform's pow().
_RATIO_DIGITS = 12


@dataclass(frozen=True, slots=True)
class Trial:
    """One point of the grid (its `key`) and the stages that produce its result.

    The key's fields read as the trial's own: ``trial.budget`` is ``trial.key.budget``.
    """

    key: TrialKey
    stage_id: str  # the final retrain stage: the trial's result
    chain: tuple[str, ...]  # pretrain, prune 1, retrain 1, ..., prune k, retrain k

    def __getattr__(self, name: str) -> Any:
        if name == "key":  # not set yet (copy, unpickling): no recursion into the key
            raise AttributeError(name)
        return getattr(self.key, name)

    def params(self) -> dict[str, Any]:
        """Flat axis values, overrides by name (for results tables and run names)."""
        axes = self.key._asdict()
        overrides = axes.pop("overrides")
        axes.pop("pruner_options")  # in the pruner label; see nptm.results.analysis
        return axes | dict(overrides)


def cumulative_ratio(ratio: float, round_: int, rounds: int) -> float:
    """Sparsity after round `round_` of `rounds` equal-fraction prunes toward `ratio`."""
    if round_ == rounds:
        return ratio  # exactly the trial's ratio, whatever pow() rounds to
    return round(1.0 - (1.0 - ratio) ** (round_ / rounds), _RATIO_DIGITS)


class Plan:
    """The deduplicated stage DAG of a grid and the trials it serves."""

    def __init__(
        self, grid: CheckedGrid, stages: dict[str, StageSpec], trials: list[Trial]
    ) -> None:
        self.grid = grid
        self.stages = stages  # topological order: parents before children
        self.trials = trials

    @property
    def name(self) -> str:
        return self.grid.name

    @cached_property
    def _children(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for sid, spec in self.stages.items():
            for parent in spec.parents:
                out[parent].append(sid)
        return out

    def children(self, stage_id: str) -> list[str]:
        """Ids of the stages that read `stage_id`'s output, in plan order."""
        if stage_id not in self.stages:
            raise KeyError(stage_id)
        return list(self._children.get(stage_id, ()))

    def count_by_kind(self) -> dict[str, int]:
        counts = Counter(spec.kind for spec in self.stages.values())
        return {kind.value: counts.get(kind, 0) for kind in StageKind}

    def planned_epochs(self) -> dict[str, int]:
        """Training epochs per kind over the unique stages (prune: 0)."""
        out = {kind.value: 0 for kind in StageKind}
        for spec in self.stages.values():
            out[spec.kind] += spec.epochs
        return out

    def planned_epochs_by_pair(self) -> dict[tuple[str, str], int]:
        """Training epochs per (model, dataset) over the unique stages."""
        out: Counter[tuple[str, str]] = Counter()
        for spec in self.stages.values():
            out[(spec.model, spec.dataset)] += spec.epochs
        return dict(out)

    def gpu_hours(self, figures: GpuFigures | None = None) -> dict[str, Any]:
        """Planned GPU-hours from measured seconds per epoch (orchestrator/gpu_hours.py)."""
        return gpu_hours(
            self.planned_epochs_by_pair(),
            self.grid.data.val_fraction,
            shipped_figures() if figures is None else figures,
        )

    def naive_epochs(self) -> dict[str, int]:
        """Epochs per kind if every trial pre-trained and pruned its own model."""
        rounds = self.grid.rounds
        per_dataset = Counter(t.dataset for t in self.trials)
        pretrain = sum(self.grid.recipe(ds).epochs * n for ds, n in per_dataset.items())
        if self.grid.start_weights is not None:  # loaded, not trained
            pretrain = 0
        return {
            "pretrain": pretrain,
            "prune": 0,
            "retrain": sum(rounds * t.budget for t in self.trials),
        }

    def summary(self) -> dict[str, Any]:
        planned, naive = self.planned_epochs(), self.naive_epochs()
        return {
            "sweep": self.name,
            "trials": len(self.trials),
            "stages": self.count_by_kind(),
            "epochs": {
                "planned": sum(planned.values()),
                "naive": sum(naive.values()),
                "planned_by_kind": planned,
                "naive_by_kind": naive,
            },
            "rounds": self.grid.rounds,
            "executor": self.grid.resources.executor,
            "gpu_hours": self.gpu_hours(),
        }


def build_plan(grid: CheckedGrid, *, confirm_large: bool = False) -> Plan:
    """Expand a checked grid (`nptm.search_spaces.load_grid`) into trials and their stage DAG.

    Raises GridError when the grid has more than `max_trials` trials and `confirm_large` is
    not set (the CLI's --confirm-large).
    """
    space, includes = grid.space, list(grid.includes)
    n = expand.count(space, includes)
    if n > grid.max_trials and not confirm_large:
        raise GridError(
            grid.source,
            [
                (
                    "max_trials",
                    f"the grid expands to {n:,} trials, more than "
                    f"max_trials = {grid.max_trials:,}; "
                    "raise max_trials in the grid or confirm with --confirm-large "
                    "(build_plan(grid, confirm_large=True))",
                )
            ],
        )
    return _Builder(grid).build(expand.expand(space, includes))


class _Builder:
    """Builds stages once per distinct key; children reuse their parents' ids."""

    def __init__(self, grid: CheckedGrid) -> None:
        self.grid = grid
        self.rounds = grid.rounds
        self.stages: dict[str, StageSpec] = {}
        self.memo: dict[tuple[Any, ...], StageSpec] = {}
        self.keep: dict[str, set[int]] = defaultdict(set)
        self.macs: dict[tuple[Any, ...], tuple[int, int]] = {}  # (base, pruned) per target

    def _add(self, key: tuple[Any, ...], make: Any) -> StageSpec:
        spec = self.memo.get(key)
        if spec is None:
            spec = make()
            self.memo[key] = spec
            self.stages.setdefault(spec.id, spec)
        return spec

    def _pretrain_seed(self, k: TrialKey) -> int:
        """Seed of the pre-training and pruning a trial retrains from (see `seeds.pretrain`)."""
        seeds = self.grid.seeds
        return seeds.shared_seed if seeds.pretrain == "shared" else k.seed

    def build(self, keys: list[TrialKey]) -> Plan:
        grid = self.grid
        recipes = {ds: grid.recipe(ds) for ds in {k.dataset for k in keys}}
        val_fraction = grid.data.val_fraction
        precision = grid.resources.precision
        start = grid.start_weights
        trials = []
        seen: set[TrialKey] = set()
        for k in keys:
            recipe = recipes[k.dataset]
            seed = self._pretrain_seed(k)
            pre = self._add(
                ("pretrain", k.dataset, k.model, seed),
                lambda k=k, recipe=recipe, seed=seed: StageSpec(
                    StageKind.PRETRAIN,
                    k.dataset,
                    k.model,
                    seed,
                    recipe,
                    val_fraction=val_fraction,
                    precision=precision,
                    start_from=None if start is None else start.source,
                    start_sha256=None if start is None else start.sha256,
                ),
            )
            if k.schedule in FULL_LENGTH_SCHEDULES:
                # scratch_e / scratch_b train a length of their own: the trial's budget is it,
                # and trials that differ only in the budget axis are one trial.
                k = k._replace(budget=self._full_length(k, recipe))
                if k in seen:
                    continue
            seen.add(k)
            chain = [pre.id]
            parent = pre
            for r in range(1, self.rounds + 1):
                parent = self._prune(k, recipe, parent, r)
                chain.append(parent.id)
                parent = self._retrain(k, recipe, parent, pre)
                chain.append(parent.id)
            if SCHEDULES[k.schedule].rewinds_weights:
                self.keep[pre.id].add(rewind_epoch(recipe, k.budget))
            trials.append(Trial(k, stage_id=parent.id, chain=tuple(chain)))
        for sid, epochs in self.keep.items():
            self.stages[sid] = dataclasses.replace(
                self.stages[sid], keep_epochs=tuple(sorted(epochs))
            )
        return Plan(grid, self.stages, trials)

    def _prune(self, k: TrialKey, recipe: Recipe, parent: StageSpec, r: int) -> StageSpec:
        ratio = k.ratio
        if ratio is not None and not PRUNERS[k.pruner].structured:
            ratio = cumulative_ratio(ratio, r, self.rounds)
        seed = self._prune_seed(k, r)
        return self._add(
            ("prune", parent.id, k.pruner, ratio, k.preset, k.pruner_options, seed, r),
            lambda: StageSpec(
                StageKind.PRUNE,
                k.dataset,
                k.model,
                seed,
                recipe,
                val_fraction=parent.val_fraction,
                parents=(parent.id,),
                pruner=k.pruner,
                ratio=ratio,
                preset=k.preset,
                pruner_options=k.pruner_options,
                round=r,
                split_seed=self._split_seed(k, seed),
                precision=parent.precision,
            ),
        )

    def _prune_seed(self, k: TrialKey, r: int) -> int:
        """Seed of a trial's round-`r` prune stage. Round 1 of a shared pre-training prunes
        the one shared network with the shared seed, except a random mask drawn per seed."""
        seeds = self.grid.seeds
        per_seed_mask = seeds.random_masks == "per_seed" and PRUNERS[k.pruner].random_mask
        return k.seed if r > 1 or per_seed_mask else self._pretrain_seed(k)

    def _full_length(self, k: TrialKey, recipe: Recipe) -> int:
        """Epochs of a scratch_e / scratch_b trial, known exactly at plan time.

        A pruned network's MACs follow from the model and the preset or ratio alone: every
        structured pruner keeps the filter counts `filter_counts` derives from them, whatever
        the weights, and a masked layer keeps its dense MACs. So they are counted on a freshly
        built model, once per (dataset, model, preset | ratio).
        """
        if k.schedule == "scratch_e" or not PRUNERS[k.pruner].structured:
            # Unstructured pruning leaves the MACs unchanged: Scratch-B is Scratch-E.
            return run_epochs(k.schedule, k.budget, recipe, base_macs=1, pruned_macs=1)
        key = (k.dataset, k.model, k.ratio, k.preset)
        if key not in self.macs:
            import torch  # only grids with scratch_b pay for importing it

            from nptm.trainables.inspect import inspect_model

            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # batch-1 passes of a small model: more threads only wait
            try:
                counts = inspect_model(k.dataset, k.model, k.pruner, k.ratio, k.preset)
            finally:
                torch.set_num_threads(threads)
            self.macs[key] = (counts["base"]["macs"], counts["pruned"]["macs"])
        base, pruned = self.macs[key]
        epochs = run_epochs(k.schedule, k.budget, recipe, base_macs=base, pruned_macs=pruned)
        # T x base / pruned MACs can outgrow what one run survives: refused, nothing run
        problem = run_length_problem(recipe, k.dataset, epochs, self.grid.data.val_fraction)
        if problem is not None:
            target = f"ratio {k.ratio}" if k.ratio is not None else f"preset {k.preset!r}"
            raise GridError(
                self.grid.source,
                [
                    (
                        "axes.schedule",
                        f"'scratch_b' retrains {k.model} pruned by {k.pruner} ({target}) for "
                        f"T x base / pruned MACs = {problem}; exclude "
                        f"{{schedule: scratch_b, pruner: {k.pruner}}} or lower pretrain.epochs",
                    )
                ],
            )
        return epochs

    def _split_seed(self, k: TrialKey, stage_seed: int) -> int | None:
        """The pre-training's split seed where a stage's own seed differs from it."""
        seed = self._pretrain_seed(k)
        return None if seed == stage_seed else seed

    def _retrain(self, k: TrialKey, recipe: Recipe, parent: StageSpec, pre: StageSpec) -> StageSpec:
        # Weight rewinding (wr) also reads the pretrain stage's checkpoint at epoch T - budget.
        parents = (parent.id, pre.id) if SCHEDULES[k.schedule].rewinds_weights else (parent.id,)
        return self._add(
            ("retrain", parents, k.schedule, k.budget, k.overrides, k.seed),
            lambda: StageSpec(
                StageKind.RETRAIN,
                k.dataset,
                k.model,
                k.seed,
                recipe,
                val_fraction=parent.val_fraction,
                parents=parents,
                pruner=k.pruner,
                ratio=parent.ratio,
                preset=k.preset,
                pruner_options=k.pruner_options,
                round=parent.round,
                schedule=k.schedule,
                budget=k.budget,
                overrides=k.overrides,
                split_seed=self._split_seed(k, k.seed),
                precision=parent.precision,
            ),
        )
