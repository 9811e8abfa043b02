"""Summary statistics for sweep reports: mean ± sd over seeds, Student-t intervals and their
reading, t-test and TOST equivalence p-values, Holm's family-wise and Benjamini-Hochberg's
false-discovery-rate adjustments, and verdicts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import stats as sps


def t_half_width(sd: np.ndarray | float, n: np.ndarray | int, level: float = 0.95) -> np.ndarray:
    """Half-width t_{(1+level)/2, n-1} * sd / sqrt(n), elementwise; NaN where n < 2."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    sd_arr = np.asarray(sd, dtype=float)
    n_arr = np.asarray(n, dtype=float)
    ok = n_arr >= 2
    dof = np.where(ok, n_arr - 1, 1.0)
    crit = sps.t.ppf(0.5 + level / 2, dof)
    half = crit * sd_arr / np.sqrt(np.where(ok, n_arr, 1.0))
    return np.where(ok, half, np.nan)


def grouped_ci(
    frame: pd.DataFrame, keys: list[str], column: str, level: float = 0.95
) -> pd.DataFrame:
    """Per group of `keys`: mean, sd, n, half_width, low, high of `column` (vectorised)."""
    out = (
        frame.groupby(keys, dropna=False, sort=True, observed=True)[column]
        .agg(mean="mean", sd="std", n="count")
        .reset_index()
    )
    out["n"] = out["n"].astype(int)
    out["half_width"] = t_half_width(out["sd"].to_numpy(), out["n"].to_numpy(), level)
    out["low"] = out["mean"] - out["half_width"]
    out["high"] = out["mean"] + out["half_width"]
    return out


SUPPORTED, INCONCLUSIVE, CONTRADICTED = "supported", "inconclusive", "contradicted"


def with_verdict(cis: pd.DataFrame) -> pd.DataFrame:
    """Add ``verdict``: the reading of each interval of a difference claimed to be positive
    (supported above 0, contradicted below 0, inconclusive otherwise and when n < 2)."""
    cis["verdict"] = np.select(
        [cis["n"] < 2, cis["low"] > 0, cis["high"] < 0],
        [INCONCLUSIVE, SUPPORTED, CONTRADICTED],
        INCONCLUSIVE,
    )
    return cis


def t_pvalue(
    mean: np.ndarray | float,
    sd: np.ndarray | float,
    n: np.ndarray | int,
    null: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Two-sided p-value of the one-sample t-test of mean = `null` (the test the interval of
    `t_half_width` inverts), elementwise; NaN where n < 2."""
    mean_arr = np.asarray(mean, dtype=float) - np.asarray(null, dtype=float)
    n_arr = np.asarray(n, dtype=float)
    ok = n_arr >= 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean_arr / (np.asarray(sd, dtype=float) / np.sqrt(np.where(ok, n_arr, 1.0)))
    p = 2 * sps.t.sf(np.abs(t), np.where(ok, n_arr - 1, 1.0))
    return np.where(ok, p, np.nan)


def tost_pvalue(
    mean: np.ndarray | float, sd: np.ndarray | float, n: np.ndarray | int, margin: float
) -> np.ndarray:
    """p-value of the two one-sided t-tests (TOST) that a mean lies within (-margin, +margin),
    from the mean, sd and n of the values (the paired differences): the larger of the two
    one-sided p-values, as statsmodels' `ttost_paired` computes it from the pairs (vectorised
    here: the report runs thousands of them). Small means equivalent; NaN where n < 2."""
    mean_arr = np.asarray(mean, dtype=float)
    n_arr = np.asarray(n, dtype=float)
    ok = n_arr >= 2
    dof = np.where(ok, n_arr - 1, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.asarray(sd, dtype=float) / np.sqrt(np.where(ok, n_arr, 1.0))
        p_low = sps.t.sf((mean_arr + margin) / se, dof)  # H0: mean <= -margin
        p_high = sps.t.cdf((mean_arr - margin) / se, dof)  # H0: mean >= +margin
    return np.where(ok, np.maximum(p_low, p_high), np.nan)


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of one family of p-values, or of each row of a 2-D array
    (one family per row); NaN entries (no test) are not members of a family and stay NaN.
    The k-th smallest of m p-values times (m - k + 1), made monotone, capped at 1: as
    statsmodels' ``multipletests(method="holm")``, vectorised over families (statsmodels runs
    a garbage collection on every call, 0.3 s each in a process holding large frames)."""

    def sorted_rows(p: np.ndarray) -> np.ndarray:
        factor = np.arange(p.shape[1], 0, -1)
        return np.minimum(1.0, np.maximum.accumulate(p * factor, axis=1))

    return _per_family(pvalues, sorted_rows)


def benjamini_hochberg(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg's false-discovery-rate adjustment (q-values) of one family of
    p-values, or of each row of a 2-D array (scipy's ``false_discovery_control``); NaN
    entries stay NaN."""
    return _per_family(pvalues, lambda p: sps.false_discovery_control(p, axis=1, method="bh"))


def _per_family(
    pvalues: np.ndarray, adjust_sorted: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """`adjust_sorted` (rows of p-values in ascending order, no NaN) applied to every row of
    `pvalues` over its non-NaN entries, rows of the same family size at once."""
    p = np.asarray(pvalues, dtype=float)
    rows = np.atleast_2d(p)
    order = np.argsort(rows, axis=1, kind="stable")  # NaN last
    ranked = np.take_along_axis(rows, order, axis=1)
    sizes = (~np.isnan(rows)).sum(axis=1)
    adjusted = np.full_like(ranked, np.nan)
    for m in np.unique(sizes[sizes > 0]):
        same = sizes == m
        adjusted[same, :m] = adjust_sorted(ranked[same, :m])
    out = np.empty_like(adjusted)
    np.put_along_axis(out, order, adjusted, axis=1)
    return out.reshape(p.shape)


def adjust_within(
    frame: pd.DataFrame, column: str, by: list[str], adjust: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """`adjust` (holm, benjamini_hochberg) applied to `column` within each group of `by` (each
    group one family; all rows one family when `by` is empty), in the rows' order."""
    values = frame[column].to_numpy(dtype=float)
    if not by or not len(frame):
        return adjust(values)
    groups = frame.groupby(by, dropna=False, sort=False, observed=True)
    row, col = groups.ngroup().to_numpy(), groups.cumcount().to_numpy()
    matrix = np.full((row.max() + 1, col.max() + 1), np.nan)
    matrix[row, col] = values
    return adjust(matrix)[row, col]


def directional_verdict(
    mean: np.ndarray, null: np.ndarray | float, p_adjusted: np.ndarray, alpha: float
) -> np.ndarray:
    """The verdict of a claim that a difference exceeds `null`, from its two-sided test's
    adjusted p-value: supported when significant and above the null, contradicted when
    significant and below it, inconclusive otherwise (and without a test)."""
    significant = np.asarray(p_adjusted, dtype=float) < alpha
    above = np.asarray(mean, dtype=float) > np.asarray(null, dtype=float)
    return np.select(
        [significant & above, significant & ~above], [SUPPORTED, CONTRADICTED], INCONCLUSIVE
    )
