"""Summary statistics for sweep reports: mean ± sd over seeds, Student-t intervals and their
reading."""

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
