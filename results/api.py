"""Open a finished (or running) sweep's tables from Python: `load_sweep(storage, name)`.

    from nptm.results.api import load_sweep

    sweep = load_sweep("runs", "quickstart")
    sweep.stages          # pandas: one row per stage (columns: docs/results.md)
    sweep.epochs          # pandas: one row per epoch of every stage
    sweep.stages_table    # the same tables as pyarrow.Table (for DuckDB, Polars, ...)
    sweep.epochs_table

Everything is read through `nptm.results.store.SweepStore`, so a sweep written under an older
schema version reads in the current layout. Each table is read once, on first use; call
`load_sweep` again to see stages finished since.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import pandas as pd
import pyarrow as pa

from nptm.results.store import SweepStore
from nptm.trainables.layout import EPOCHS_TABLE, STAGES_TABLE

__all__ = ["Sweep", "load_sweep"]


@dataclass(frozen=True)
class Sweep:
    """One sweep's `stages` and `epochs` tables, as pandas and as Arrow."""

    store: SweepStore

    @property
    def name(self) -> str:
        return self.store.sweep

    @cached_property
    def stages_table(self) -> pa.Table:
        return self.store.read_table(STAGES_TABLE)

    @cached_property
    def epochs_table(self) -> pa.Table:
        return self.store.read_table(EPOCHS_TABLE)

    @cached_property
    def stages(self) -> pd.DataFrame:
        return self.store.read_stages()

    @cached_property
    def epochs(self) -> pd.DataFrame:
        return self.store.read_epochs()


def load_sweep(storage: str | os.PathLike[str], name: str) -> Sweep:
    """The sweep `name` under the storage root `storage` (a local path or a URI such as
    ``s3://bucket/prefix``, as `nptm sweep --storage` takes). Raises ValueError for a name
    that cannot be a sweep's, and FileNotFoundError when the sweep has no stored stage."""
    store = SweepStore(storage, name)
    if not store.stage_ids():
        raise FileNotFoundError(f"no results for sweep {name!r} under {str(storage)!r}")
    return Sweep(store)
