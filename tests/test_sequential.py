"""The group-sequential t-tests of `nptm sweep --until-conclusive` (nptm.results.sequential):
the spending function against its formula, the boundaries against the t quantiles where they
are exact, and their type I error with repeated looks by a simulation of its own (another
generator than the boundaries' own), alone and with Holm over a family."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from nptm.results.sequential import boundaries, boundaries_at, holm_levels, holm_look, spent

ALPHA = 0.05
LOOKS, K = (3, 4, 5, 6), 6
STUDIES = 40_000


def binomial_bounds(p: float, n: int = STUDIES) -> tuple[float, float]:
    """The 99.9% range of a rate whose truth is p, over n simulated studies."""
    return sps.binom.ppf(0.0005, n, p) / n, sps.binom.ppf(0.9995, n, p) / n


def test_spending_is_the_obrien_fleming_type_function() -> None:
    # 2 - 2 Phi(1.959964 / sqrt(0.5)) = 2 - 2 Phi(2.771808) = 0.0055746
    assert spent(0.5, 0.05) == pytest.approx(0.0055746, abs=1e-6)
    assert spent(1.0, 0.05) == 0.05 and spent(1.5, 0.05) == 0.05 and spent(0.0, 0.05) == 0.0
    fractions = np.linspace(0.05, 1, 20)
    assert np.all(np.diff([spent(f, 0.05) for f in fractions]) > 0)


def test_one_look_at_all_seeds_is_the_fixed_t_test() -> None:
    assert boundaries((5,), 5, 0.05)[0] == pytest.approx(sps.t.isf(0.025, 4))
    # the first look is exact: its share of alpha at the t quantile
    first = boundaries(LOOKS, K, 0.05)[0]
    assert first == pytest.approx(sps.t.isf(spent(3 / 6, 0.05) / 2, 2))


def test_boundaries_of_earlier_looks_never_move() -> None:
    full = boundaries_at(LOOKS, K, holm_levels(ALPHA, 4))
    assert np.array_equal(boundaries_at(LOOKS[:2], K, holm_levels(ALPHA, 4)), full[:, :2])
    # a lower level is a higher bar, at every look; later looks lower it (more seeds)
    assert np.all(np.diff(full, axis=0) < 0) and np.all(np.diff(full, axis=1) < 0)
    with pytest.raises(ValueError, match="2 or more seeds, increasing"):
        boundaries((1, 3), 4, 0.05)


def _sequential_t(rng: np.random.Generator, studies: int, tests: int = 1) -> np.ndarray:
    """|t| at each look of `studies` x `tests` null tests on normal seeds of arbitrary mean
    and sd (the null at that mean): studies x looks x tests."""
    mean, sd = 0.3, 2.5  # the test is scale invariant: any null and any sd
    x = rng.normal(mean, sd, (studies, K, tests))
    out = []
    for n in LOOKS:
        seen = x[:, :n]
        t = (seen.mean(axis=1) - mean) / (seen.std(axis=1, ddof=1) / math.sqrt(n))
        out.append(np.abs(t))
    return np.stack(out, axis=1)


def test_type_one_error_with_repeated_looks_is_alpha() -> None:
    abs_t = _sequential_t(np.random.default_rng(7), STUDIES)[:, :, 0]
    crit = boundaries(LOOKS, K, ALPHA)
    rejected = (abs_t >= crit).any(axis=1).mean()
    low, high = binomial_bounds(ALPHA)
    assert low <= rejected <= high, rejected
    # each look spends its share of alpha, no more (the first exactly, later ones by
    # simulation, two Monte-Carlo errors short)
    first = np.argmax(abs_t >= crit, axis=1)
    any_ = (abs_t >= crit).any(axis=1)
    shares = np.diff([0.0, *(spent(n / K, ALPHA) for n in LOOKS)])
    for j, share in enumerate(shares):
        assert (any_ & (first == j)).mean() <= binomial_bounds(share)[1]
    # the same looks at the fixed test's boundary: type I error inflates
    naive = (abs_t >= sps.t.isf(ALPHA / 2, np.array(LOOKS) - 1)).any(axis=1).mean()
    assert naive > 1.5 * ALPHA


def test_holm_look_raises_the_level_of_the_others_at_the_same_look() -> None:
    # three tests; critical[r, i] at level alpha / (3 - r); test 0 passes the first level,
    # then test 1 the second; test 2 never passes
    critical = np.array([[4.0, 4.0, 4.0], [3.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    abs_t = np.array([[5.0, 3.5, 1.0], [3.5, 3.5, 3.5], [np.nan, 9.0, 9.0]])
    open_ = np.array([[True, True, True], [True, True, True], [True, True, False]])
    new = holm_look(abs_t, open_, np.array([0, 0, 1]), critical)
    assert new.tolist() == [
        [True, True, False],  # 5 >= 4; then 3.5 >= 3; then 1 < 2
        [False, False, False],  # nobody passes the first level: nobody is rejected
        [False, True, False],  # one rejected before: level alpha/2 (3.0); test 2 closed
    ]


def test_holm_over_looks_keeps_the_family_wise_error() -> None:
    tests = 4
    abs_t = _sequential_t(np.random.default_rng(11), STUDIES // 2, tests)
    table = boundaries_at(LOOKS, K, holm_levels(ALPHA, tests))  # levels x looks
    open_ = np.ones((len(abs_t), tests), dtype=bool)
    for j in range(len(LOOKS)):
        critical = np.repeat(table[:, j : j + 1], tests, axis=1)
        rejected = (~open_).sum(axis=1)
        open_ &= ~holm_look(abs_t[:, j], open_, rejected, critical)
    fwer = (~open_).any(axis=1).mean()
    assert fwer <= binomial_bounds(ALPHA, STUDIES // 2)[1], fwer
