"""Summary statistics for sweep reports: mean ± sd over seeds, Student-t intervals and their
reading, t-test and TOST equivalence p-values, and Holm's correction over a family of claims
(statsmodels: scipy has Benjamini-Hochberg's false_discovery_control, not Holm)."""

from __future__ import annotations

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


def t_pvalue(mean: np.ndarray | float, sd: np.ndarray | float, n: np.ndarray | int) -> np.ndarray:
    """Two-sided p-value of the one-sample t-test of mean = 0 (the test the interval of
    `t_half_width` inverts), elementwise; NaN where n < 2."""
    mean_arr = np.asarray(mean, dtype=float)
    n_arr = np.asarray(n, dtype=float)
    ok = n_arr >= 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean_arr / (np.asarray(sd, dtype=float) / np.sqrt(np.where(ok, n_arr, 1.0)))
    p = 2 * sps.t.sf(np.abs(t), np.where(ok, n_arr - 1, 1.0))
    return np.where(ok, p, np.nan)


def tost_paired(a: np.ndarray, b: np.ndarray, margin: float) -> float:
    """p-value of the paired two one-sided t-tests (TOST, statsmodels) that the mean of a - b
    lies within (-margin, +margin): small means equivalent. NaN with fewer than 2 pairs."""
    if len(a) < 2:
        return float("nan")
    from statsmodels.stats.weightstats import ttost_paired

    with np.errstate(divide="ignore", invalid="ignore"):
        p, _, _ = ttost_paired(np.asarray(a, float), np.asarray(b, float), -margin, margin)
    return float(p)


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment (statsmodels' multipletests) of one family of p-values;
    NaN entries (no test) are not members of the family and stay NaN."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    tested = ~np.isnan(p)
    if tested.any():
        out[tested] = multipletests(p[tested], method="holm")[1]
    return out


def holm_verdicts(claims: list[pd.DataFrame], alpha: float) -> None:
    """Adjust every test of `claims` (each table's ``p`` and, where present, ``p_tost``) as
    one family with Holm's method, in place: adds ``p_holm`` / ``p_tost_holm`` and sets
    ``verdict`` from them. Supported: the difference is significantly above 0, or (with a
    TOST) significantly within the equivalence margin; contradicted: significantly below 0
    and not equivalent; inconclusive otherwise."""
    columns = [(t, c) for t in claims for c in ("p", "p_tost") if c in t]
    if not columns:
        return
    sizes = [len(t) for t, _ in columns]
    flat = np.concatenate([t[c].to_numpy(dtype=float) for t, c in columns])
    adjusted = np.split(holm(flat), np.cumsum(sizes)[:-1])
    for (table, col), adj in zip(columns, adjusted, strict=True):
        table[f"{col}_holm"] = adj
    for table in claims:
        significant = table["p_holm"].to_numpy(dtype=float) < alpha
        mean = table["mean"].to_numpy(dtype=float)
        equivalent = (
            table["p_tost_holm"].to_numpy(dtype=float) < alpha
            if "p_tost_holm" in table
            else np.zeros(len(table), bool)
        )
        table["verdict"] = np.select(
            [significant & (mean > 0) | equivalent, significant & (mean < 0)],
            [SUPPORTED, CONTRADICTED],
            INCONCLUSIVE,
        )
