"""Summary statistics for sweep reports: mean ± sd over seeds and paired Student-t intervals."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps


@dataclass(frozen=True)
class PairedCI:
    """Mean of paired differences with a two-sided Student-t confidence interval.

    With fewer than two differences the interval is undefined: `half_width`, `low` and
    `high` are NaN.
    """

    mean: float
    sd: float
    n: int
    half_width: float
    low: float
    high: float
    level: float = 0.95

    @property
    def defined(self) -> bool:
        return not math.isnan(self.half_width)


def _finite(values: Iterable[float]) -> np.ndarray:
    arr = np.asarray(list(values), dtype=float)
    return arr[~np.isnan(arr)]


def mean_std_n(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (ddof=1), n) of the non-NaN values.

    n = 0 gives (nan, nan, 0); n = 1 gives (value, nan, 1).
    """
    arr = _finite(values)
    n = int(arr.size)
    mean = float(arr.mean()) if n else math.nan
    sd = float(arr.std(ddof=1)) if n > 1 else math.nan
    return mean, sd, n


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


def paired_ci(differences: Iterable[float], level: float = 0.95) -> PairedCI:
    """Mean of `differences` (e.g. acc_A - acc_B per seed) with its t interval."""
    mean, sd, n = mean_std_n(differences)
    half = float(t_half_width(sd, n, level)) if n >= 2 else math.nan
    return PairedCI(mean, sd, n, half, mean - half, mean + half, level)


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


def verdict(low: float, high: float, n: int) -> str:
    """Reading of a CI of a difference claimed to be positive."""
    if n < 2 or math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if low > 0:
        return SUPPORTED
    if high < 0:
        return CONTRADICTED
    return INCONCLUSIVE
