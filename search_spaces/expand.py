"""Grid axes -> trials: the cross product, `exclude` rules and `include` additions.

The product is walked over value *indices*, and an exclude rule is precompiled into, for each
dimension it constrains, the set of value indices it matches; the rules together become one bit
mask per value (bit k: rule k matches it), and values with equal masks one class. That makes
three things cheap: expanding 100k trials, counting a grid without expanding it (a walk over
the classes of the dimensions some rule constrains, never over the product), and listing which
combinations of a few dimensions survive exclusion (what the compatibility checks need)
without walking the seeds and overrides. Rule values are looked up in a per-dimension index,
so compiling R rules over axes of N values costs R + N, not R x N.
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
    # value indexes and the compiled rules, built on first use (see `_compiled`)
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def override_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dims[len(BASE_DIMS) :])

    def size(self) -> int:
        """Trials of the product before any exclude rule: arithmetic, nothing is walked."""
        return math.prod(len(d.values) for d in self.dims)

    def dim_index(self, key: str) -> int | None:
        """The dimension a rule key constrains (None: no axis has that key)."""
        if key in TARGET_KEYS:
            return TARGET
        for i, d in enumerate(self.dims):
            if d.name == key and d.name != "target":
                return i
        return None

    def _index(self, i: int, component: int | None = None) -> dict[Any, list[int]]:
        """Value (or Target component) -> the indices holding it, of dimension `i`."""
        key = ("index", i, component)
        index = self._cache.get(key)
        if index is None:
            index = {}
            for j, v in enumerate(self.dims[i].values):
                k = _key(v if component is None else v[component])
                if k is not None:
                    index.setdefault(k, []).append(j)
            self._cache[key] = index
        return index

    def matching(self, key: str, value: Any) -> frozenset[int]:
        """Indices of the values of `key`'s dimension that `value` matches."""
        i = self.dim_index(key)
        k = _key(value)
        if i is None or k is None:
            return frozenset()
        return frozenset(self._index(i, TARGET_KEYS[key] if i == TARGET else None).get(k, ()))

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

    def _compiled(self) -> _Compiled:
        """The rules as bit masks: bit k of `masks[d][j]` is set when rule k matches value j of
        dimension d (every value of a dimension the rule leaves free), so a trial is excluded
        exactly when the AND of its values' masks over the rule dimensions is not 0. Values of
        a dimension with equal masks form one class: the walks below go over classes (and
        settle the last dimension from the rules' value sets), so their cost follows the
        number of rules, never the axes' product."""
        key = (id(self.rules), len(self.rules))
        cached = self._cache.get("rules")
        if cached is not None and cached[0] == key:
            return cached[1]
        rules = [dict(r.matches) for r in self.rules]
        full = (1 << len(rules)) - 1
        rule_dims = sorted({d for r in rules for d in r})
        masks: dict[int, list[int]] = {}
        classes: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        free: dict[int, int] = {}
        for d in rule_dims:
            free[d] = sum(1 << k for k, r in enumerate(rules) if d not in r)
            m = [free[d]] * len(self.dims[d].values)
            for k, r in enumerate(rules):
                if d in r:
                    bit = 1 << k
                    for j in r[d]:
                        m[j] |= bit
            masks[d] = m
            groups: dict[int, list[int]] = {}
            for j, mask in enumerate(m):
                groups.setdefault(mask, []).append(j)
            classes[d] = [(mask, tuple(members)) for mask, members in groups.items()]
        compiled = _Compiled(full, rule_dims, masks, classes, free, rules)
        self._cache["rules"] = (key, compiled)
        return compiled

    def _classes(self, d: int) -> list[tuple[int, tuple[int, ...]]]:
        c = self._compiled()
        if d in c.classes:
            return c.classes[d]
        return [(c.full, tuple(range(len(self.dims[d].values))))]

    def _excluded_in(self, d: int, acc: int) -> int:
        """How many values of rule dimension `d` complete a combination whose rules so far
        are `acc` into an excluded one: the union of the value sets of those rules."""
        c = self._compiled()
        if acc & c.free[d]:  # a rule that matches already and leaves `d` free
            return len(self.dims[d].values)
        hit: set[int] = set()
        while acc:
            low = acc & -acc
            hit.update(c.rules[low.bit_length() - 1][d])
            acc ^= low
        return len(hit)

    def survivor_indices(self, wanted: Sequence[int]) -> set[tuple[int, ...]]:
        """Value-index combinations of the `wanted` dimensions that some non-excluded trial
        has (so a check can name the grid entry at fault)."""
        c = self._compiled()
        wanted = list(wanted)
        classes = [self._classes(d) for d in wanted]
        # the other rule dimensions: only whether some completion survives matters
        others = sorted(
            (d for d in c.rule_dims if d not in wanted), key=lambda d: len(c.classes[d])
        )
        found: set[tuple[int, ...]] = set()
        chosen: list[int] = []
        survives: dict[tuple[int, int], bool] = {}

        def completes(j: int, acc: int) -> bool:
            if not acc:
                return True
            if j == len(others):
                return False
            if (j, acc) not in survives:
                d = others[j]
                if j == len(others) - 1:
                    ok = self._excluded_in(d, acc) < len(self.dims[d].values)
                else:
                    ok = any(completes(j + 1, acc & mask) for mask, _ in c.classes[d])
                survives[j, acc] = ok
            return survives[j, acc]

        def walk(i: int, acc: int) -> None:
            if not acc:  # no rule can match any more: every completion survives
                found.add((*chosen, *[_ALL] * (len(wanted) - i)))
            elif i == len(wanted):
                if completes(0, acc):
                    found.add(tuple(chosen))
            else:
                for ci, (mask, _) in enumerate(classes[i]):
                    chosen.append(ci)
                    walk(i + 1, acc & mask)
                    chosen.pop()

        walk(0, c.full)
        out: set[tuple[int, ...]] = set()
        for combo in found:
            out.update(
                product(
                    *(
                        range(len(self.dims[d].values)) if ci == _ALL else classes[i][ci][1]
                        for i, (d, ci) in enumerate(zip(wanted, combo, strict=True))
                    )
                )
            )
        return out

    def count(self) -> int:
        """Trials of the product that survive exclusion, without expanding the product."""
        c = self._compiled()
        dims = sorted(c.rule_dims, key=lambda d: len(c.classes[d]))  # the most classes last
        sizes = [len(self.dims[d].values) for d in dims]
        rest = [math.prod(sizes[i:]) for i in range(len(sizes) + 1)]
        free = math.prod(len(d.values) for i, d in enumerate(self.dims) if i not in c.masks)
        memo: dict[tuple[int, int], int] = {}

        def walk(i: int, acc: int) -> int:
            if not acc:
                return rest[i]
            if i == len(dims) - 1:
                return sizes[i] - self._excluded_in(dims[i], acc)
            if (i, acc) not in memo:
                memo[i, acc] = sum(
                    len(members) * walk(i + 1, acc & mask) for mask, members in c.classes[dims[i]]
                )
            return memo[i, acc]

        return walk(0, c.full) * free if dims else self.size()

    def contains(self, key: TrialKey) -> bool:
        """Whether `key` is a trial of the product that no exclude rule removes."""
        if tuple(k for k, _ in key.overrides) != self.override_names:
            return False
        target = (_key(key.pruner), _key(key.ratio), _key(key.preset), key.pruner_options)
        found = self._targets().get(target)
        if found is None:
            return False
        idx = []
        values = (key.dataset, key.model, None, key.schedule, key.budget, key.seed,
                  *(v for _, v in key.overrides))  # fmt: skip
        for i, v in enumerate(values):
            hit = [found] if i == TARGET else self._index(i).get(_key(v))
            if not hit:
                return False
            idx.append(hit[0])
        c = self._compiled()
        acc = c.full
        for d in c.rule_dims:
            acc &= c.masks[d][idx[d]]
        return not acc

    def _targets(self) -> dict[Any, int]:
        index = self._cache.get("targets")
        if index is None:
            index = {}
            for j, t in enumerate(self.dims[TARGET].values):
                index.setdefault((_key(t.pruner), _key(t.ratio), _key(t.preset), t.options), j)
            self._cache["targets"] = index
        return index

    def iter_trials(self) -> Iterator[TrialKey]:
        """Every surviving trial of the product, in axis order (the first axis varies slowest)."""
        names = self.override_names
        n_base = len(BASE_DIMS)
        values = [d.values for d in self.dims]
        c = self._compiled()
        checks = [(d, c.masks[d]) for d in c.rule_dims]
        for idx in product(*(range(len(v)) for v in values)):
            if checks:
                acc = c.full
                for d, m in checks:
                    acc &= m[idx[d]]
                if acc:
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


_ALL = -1  # in a survivor walk: every value of the dimension


@dataclass(frozen=True)
class _Compiled:
    full: int  # every rule's bit
    rule_dims: list[int]  # the dimensions some rule constrains
    masks: dict[int, list[int]]  # per rule dimension: each value's mask
    classes: dict[int, list[tuple[int, tuple[int, ...]]]]  # per rule dimension: (mask, values)
    free: dict[int, int]  # per rule dimension: the rules that leave it free
    rules: list[dict[int, frozenset[int]]]  # per rule: its value set of each dimension it names


def _key(value: Any) -> Any:
    """A dict key with `same_value`'s equality (True is not 1); None if unhashable."""
    try:
        hash(value)
    except TypeError:
        return None
    return (isinstance(value, bool), value)


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
