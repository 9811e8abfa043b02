"""Grid axes -> trials: the cross product, `exclude` rules and `include` additions.

The product is walked over value *indices*, and an exclude rule is precompiled into, for each
dimension it constrains, the set of value indices it matches. That makes three things cheap:
expanding 100k trials, counting a grid without expanding it (exclusion depends only on the
dimensions some rule constrains), and listing which combinations of a few dimensions survive
exclusion (what the compatibility checks need) without walking the seeds and overrides.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any, NamedTuple

# Dimension order of the product; override axes follow, sorted by name.
DATASET, MODEL, TARGET, SCHEDULE, BUDGET, SEED = range(6)
BASE_DIMS: tuple[str, ...] = ("dataset", "model", "target", "schedule", "budget", "seed")
# Rule keys that constrain one component of the `target` dimension.
TARGET_KEYS: dict[str, int] = {"pruner": 0, "ratio": 1, "preset": 2}


class Target(NamedTuple):
    """One pruner setting: a pruner with a ratio or a preset (and its options, sorted)."""

    pruner: str
    ratio: float | None
    preset: str | None
    options: tuple[tuple[str, Any], ...] = ()


class TrialKey(NamedTuple):
    """The identity of a trial (overrides: sorted (name, value) pairs)."""

    dataset: str
    model: str
    pruner: str
    ratio: float | None
    preset: str | None
    schedule: str
    budget: int
    seed: int
    overrides: tuple[tuple[str, Any], ...]
    pruner_options: tuple[tuple[str, Any], ...] = ()  # sorted (name, value); see Target


@dataclass(frozen=True)
class Dim:
    name: str  # "dataset", ..., "seed", or an override name such as "lr"
    values: tuple[Any, ...]
    paths: tuple[str, ...]  # where each value is written in the grid file


@dataclass(frozen=True)
class Rule:
    """A compiled exclude rule: for each dimension it constrains, the value indices it matches."""

    matches: tuple[tuple[int, frozenset[int]], ...]


def same_value(a: Any, b: Any) -> bool:
    """YAML-value equality without Python's True == 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


@dataclass
class Space:
    dims: list[Dim]
    rules: list[Rule] = field(default_factory=list)

    @property
    def override_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dims[len(BASE_DIMS) :])

    def dim_index(self, key: str) -> int | None:
        """The dimension a rule key constrains (None: no axis has that key)."""
        if key in TARGET_KEYS:
            return TARGET
        for i, d in enumerate(self.dims):
            if d.name == key and d.name != "target":
                return i
        return None

    def matching(self, key: str, value: Any) -> frozenset[int]:
        """Indices of the values of `key`'s dimension that `value` matches."""
        i = self.dim_index(key)
        if i is None:
            return frozenset()
        values = self.dims[i].values
        if i == TARGET:
            c = TARGET_KEYS[key]
            return frozenset(j for j, t in enumerate(values) if same_value(t[c], value))
        return frozenset(j for j, v in enumerate(values) if same_value(v, value))

    def compile_rule(self, rule: dict[str, Any]) -> Rule:
        """Compile an exclude rule whose keys are all rule keys of this space."""
        by_dim: dict[int, frozenset[int]] = {}
        for key, value in rule.items():
            i = self.dim_index(key)
            if i is None:
                raise ValueError(f"no axis has key {key!r}")
            ok = self.matching(key, value)
            by_dim[i] = by_dim[i] & ok if i in by_dim else ok
        return Rule(tuple(sorted(by_dim.items())))

    def _rule_dims(self) -> list[int]:
        return sorted({d for r in self.rules for d, _ in r.matches})

    def _rules_at(self, dims: Sequence[int]) -> list[tuple[tuple[int, frozenset[int]], ...]]:
        """The rules with dimensions replaced by their position in `dims`."""
        pos = {d: k for k, d in enumerate(dims)}
        return [tuple((pos[d], ok) for d, ok in r.matches) for r in self.rules]

    def _walk(self, dims: Sequence[int]) -> Iterator[tuple[int, ...]]:
        """Value-index combinations of `dims` (which include every rule dimension) that no
        exclude rule removes."""
        rules = self._rules_at(dims)
        for idx in product(*(range(len(self.dims[d].values)) for d in dims)):
            if not any(all(idx[p] in ok for p, ok in r) for r in rules):
                yield idx

    def survivor_indices(self, wanted: Sequence[int]) -> set[tuple[int, ...]]:
        """Value-index combinations of the `wanted` dimensions that some non-excluded trial
        has (so a check can name the grid entry at fault)."""
        dims = sorted(set(wanted) | set(self._rule_dims()))
        pos = [dims.index(w) for w in wanted]
        return {tuple(idx[p] for p in pos) for idx in self._walk(dims)}

    def count(self) -> int:
        """Trials of the product that survive exclusion, without expanding the product."""
        rule_dims = self._rule_dims()
        free = math.prod(len(d.values) for i, d in enumerate(self.dims) if i not in rule_dims)
        kept = sum(1 for _ in self._walk(rule_dims)) if rule_dims else 1
        return kept * free

    def contains(self, key: TrialKey) -> bool:
        """Whether `key` is a trial of the product that no exclude rule removes."""
        if tuple(k for k, _ in key.overrides) != self.override_names:
            return False
        values = (
            key.dataset,
            key.model,
            Target(key.pruner, key.ratio, key.preset, key.pruner_options),
            key.schedule,
            key.budget,
            key.seed,
            *(v for _, v in key.overrides),
        )
        idx = []
        for d, v in zip(self.dims, values, strict=True):
            hit = [j for j, x in enumerate(d.values) if _same_component(x, v)]
            if not hit:
                return False
            idx.append(hit[0])
        return not any(all(idx[d] in ok for d, ok in r.matches) for r in self.rules)

    def iter_trials(self) -> Iterator[TrialKey]:
        """Every surviving trial of the product, in axis order (the first axis varies slowest)."""
        names = self.override_names
        n_base = len(BASE_DIMS)
        values = [d.values for d in self.dims]
        rules = [r.matches for r in self.rules]
        for idx in product(*(range(len(v)) for v in values)):
            if rules and any(all(idx[d] in ok for d, ok in m) for m in rules):
                continue
            t: Target = values[TARGET][idx[TARGET]]
            yield TrialKey(
                values[DATASET][idx[DATASET]],
                values[MODEL][idx[MODEL]],
                t.pruner,
                t.ratio,
                t.preset,
                values[SCHEDULE][idx[SCHEDULE]],
                values[BUDGET][idx[BUDGET]],
                values[SEED][idx[SEED]],
                tuple((name, values[n_base + k][idx[n_base + k]]) for k, name in enumerate(names)),
                t.options,
            )


def _same_component(a: Any, b: Any) -> bool:
    if isinstance(a, Target):
        return all(same_value(x, y) for x, y in zip(a[:3], b[:3], strict=True)) and a[3] == b[3]
    return same_value(a, b)


def expand(space: Space, includes: Iterable[TrialKey]) -> list[TrialKey]:
    """Surviving product trials, then the `include` trials not already present."""
    trials = list(space.iter_trials())
    seen = set(trials)
    for key in includes:
        if key not in seen:
            seen.add(key)
            trials.append(key)
    return trials


def count(space: Space, includes: Iterable[TrialKey]) -> int:
    """len(expand(space, includes)), computed without expanding the product."""
    extra = {key for key in includes if not space.contains(key)}
    return space.count() + len(extra)
