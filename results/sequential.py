"""Group-sequential one-sample t-tests: the confirmatory tests looked at again as seeds are
added (`nptm sweep --until-conclusive`, docs/reports.md "Adaptive seeds").

A test is looked at after n_1 < n_2 < ... seeds, at most `max_seeds` = K. At look j it
rejects when |t_j| >= c_j, t_j its one-sample t statistic over n_j seeds (df = n_j - 1). The
critical values spend the test's alpha over the looks by the Lan-DeMets O'Brien-Fleming-type
function of the information fraction f = n / K,

    alpha*(f) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(f)),    alpha*(1) = alpha,

so that P_H0(|t_j| >= c_j, no rejection before) = alpha*(f_j) - alpha*(f_{j-1}): the test's
type I error over all its looks is alpha*(f_last) <= alpha, whatever look it stops at. Early
looks spend little (with 3 of K = 6 seeds, 0.0056 of alpha 0.05), so a comparison decided at
the first look is decided by a large margin, and the last look keeps most of alpha.

c_1 is exact (the t quantile). Later ones need the joint null law of (t_1, ..., t_j); for
normal data it is free of the mean and the sd (a t statistic is scale invariant), so it is
simulated once: PATHS paths of standard normal seeds from a fixed generator, drawn one seed at
a time (a shorter look history's statistics are a prefix of a longer one's, so a test's
earlier boundaries never move). Each later look is given two Monte-Carlo standard errors less
than its share of alpha, so the boundary errs conservative (bench/power.py measures it).

Multiplicity: Holm's procedure carried into a group-sequential design as the graphical
approach of Maurer & Bretz (2013) does: at every look each open test of the family of m is
tested at alpha / (m - r), r the tests rejected so far (at this look or before), with its
boundary for that level over its whole look history; a rejection raises the others' level at
the same look (`holm_look`). A rejected test stops.

Repeated confidence intervals (Jennison & Turnbull 1989): mean ± c_j(alpha) · sd / sqrt(n)
at every look cover the truth at all looks at once with probability >= 1 - alpha, so the
interval at the look a test stopped at is valid whatever made it stop.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
from scipy import stats as sps

PATHS = 2**19  # Monte-Carlo paths of the joint null law (MC error of alpha: ~1% relative)
MC_SEED = 20210503  # a fixed generator: every run of nptm computes the same boundaries
MC_MARGIN = 2.0  # standard errors of the Monte-Carlo count each later look gives up


def spent(fraction: float, alpha: float) -> float:
    """alpha*(f): the type I error a test may have spent once it has seen `fraction` of its
    largest number of seeds (Lan-DeMets O'Brien-Fleming type, two-sided)."""
    if fraction <= 0:
        return 0.0
    if fraction >= 1:
        return alpha
    z = sps.norm.isf(alpha / 2)
    return float(2 * sps.norm.sf(z / math.sqrt(fraction)))


def boundaries(seeds: tuple[int, ...], max_seeds: int, alpha: float) -> np.ndarray:
    """The critical |t| at each look of a test looked at after `seeds[0] < seeds[1] < ...`
    seeds of at most `max_seeds`, at level `alpha` (inf where a look may spend nothing)."""
    return boundaries_at(tuple(seeds), int(max_seeds), (float(alpha),))[0]


@functools.lru_cache(maxsize=256)
def boundaries_at(seeds: tuple[int, ...], max_seeds: int, alphas: tuple[float, ...]) -> np.ndarray:
    """`boundaries` at each level of `alphas` at once (len(alphas) x len(seeds)), from one
    simulation of the null."""
    if any(n < 2 for n in seeds) or any(b <= a for a, b in itertools.pairwise(seeds)):
        raise ValueError(f"looks need 2 or more seeds, increasing: {seeds}")
    out = np.full((len(alphas), len(seeds)), np.inf)
    fractions = [min(n / max_seeds, 1.0) for n in seeds]
    # each look's share of alpha: what alpha*(f) allows now less what earlier looks spent
    shares = np.array([np.diff([0.0, *(spent(f, a) for f in fractions)]) for a in alphas])
    first = shares[:, 0] > 0
    out[first, 0] = sps.t.isf(shares[first, 0] / 2, seeds[0] - 1)
    paths = [_null_statistics(max(max_seeds, seeds[-1]))[n - 2] for n in seeds]
    alive = np.ones((len(alphas), PATHS), dtype=bool)
    for j in range(1, len(seeds)):
        alive &= paths[j - 1][None, :] < out[:, j - 1 : j]  # no rejection up to look j - 1
        for a in range(len(alphas)):
            count = shares[a, j] * PATHS
            k = math.floor(count - MC_MARGIN * math.sqrt(count))
            candidates = paths[j][alive[a]]
            if k <= 0 or len(candidates) == 0:
                continue  # out stays inf: this look rejects nothing
            k = min(k, len(candidates))  # the k-th largest: k paths at or over it
            out[a, j] = np.partition(candidates, len(candidates) - k)[len(candidates) - k]
    return out


@functools.lru_cache(maxsize=2)
def _null_statistics(max_n: int) -> tuple[np.ndarray, ...]:
    """|t| of every simulated path after n = 2, ..., max_n seeds (float32: 2 MiB each)."""
    rng = np.random.default_rng(MC_SEED)
    mean = np.zeros(PATHS)
    m2 = np.zeros(PATHS)  # Welford's running sum of squared deviations
    out = []
    for n in range(1, max_n + 1):
        x = rng.standard_normal(PATHS)  # one seed of every path: prefixes agree
        delta = x - mean
        mean += delta / n
        m2 += delta * (x - mean)
        if n >= 2:
            t = np.abs(mean) * math.sqrt(n) / np.sqrt(m2 / (n - 1))
            out.append(t.astype(np.float32))
    return tuple(out)


def holm_levels(alpha: float, tests: int) -> tuple[float, ...]:
    """Holm's levels alpha / (m - r) for r = 0, ..., m - 1 rejections so far."""
    return tuple(alpha / (tests - r) for r in range(tests))


def holm_look(
    abs_t: np.ndarray, open_: np.ndarray, rejected: np.ndarray, critical: np.ndarray
) -> np.ndarray:
    """The tests one look rejects, for studies (rows) of a family of m tests (columns).

    `abs_t`: |t| of each test now (NaN: no test); `open_`: the tests not rejected before;
    `rejected`: per study, how many were; `critical[r, i]`: test i's critical |t| at this look
    at Holm's level alpha / (m - r). Tests over their boundary at the study's level are
    rejected together, which raises the level of the others; until none is left over it."""
    new = np.zeros(abs_t.shape, dtype=bool)
    m = abs_t.shape[1]
    while True:
        r = np.minimum(rejected + new.sum(axis=1), m - 1)
        over = open_ & ~new & (np.nan_to_num(abs_t, nan=-1.0) >= critical[r])
        if not over.any():
            return new
        new |= over
