"""`nptm best`: the best retraining runs recorded in MLflow, overall or per group of params.

Runs are searched with `MlflowClient(uri).search_runs` (the client, not `mlflow.search_runs`,
because the latter reads the process-wide tracking URI): successful retrain stages only
(tags ``nptm.stage_kind = 'retrain'`` and ``nptm.status = 'ok'``), in the sweep's experiment
or in every ``nptm/`` experiment.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from nptm.results.mlflow_rows import EXPERIMENT_PREFIX, PARAMS, experiment_name, stage_id_of
from nptm.results.schema import AXIS_COLUMNS
from nptm.results.tables import text_table

RUN_FILTER = "tags.\"nptm.stage_kind\" = 'retrain' and tags.\"nptm.status\" = 'ok'"
SHOWN_PARAMS = tuple(PARAMS[c] for c in AXIS_COLUMNS)
_PAGE = 1000


def _experiments(client: Any, uri: str, sweep: str | None) -> dict[str, str]:
    """experiment id -> sweep name."""
    if sweep is not None:
        exp = client.get_experiment_by_name(experiment_name(sweep))
        if exp is None or exp.lifecycle_stage == "deleted":
            raise ValueError(f"no MLflow experiment {experiment_name(sweep)!r} at {uri}")
        return {exp.experiment_id: sweep}
    exps = client.search_experiments(filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'")
    return {e.experiment_id: e.name.removeprefix(EXPERIMENT_PREFIX) for e in exps}


def _runs_frame(client: Any, experiments: dict[str, str]) -> pd.DataFrame:
    records: list[dict[str, Any]] = []
    token = None
    while experiments:
        page = client.search_runs(
            list(experiments), RUN_FILTER, max_results=_PAGE, page_token=token
        )
        for run in page:
            rec: dict[str, Any] = {
                "sweep": experiments.get(run.info.experiment_id),
                "stage_id": stage_id_of(run.data.tags),
                "run_id": run.info.run_id,
            }
            rec |= {f"params.{k}": v for k, v in run.data.params.items()}
            rec |= {f"metrics.{k}": v for k, v in run.data.metrics.items()}
            records.append(rec)
        token = page.token
        if not token:
            break
    return pd.DataFrame.from_records(records)


def best_runs(
    uri: str,
    *,
    sweep: str | None = None,
    metric: str = "test_acc",
    by: list[str] | None = None,
    top: int = 5,
) -> pd.DataFrame:
    """The `top` runs by `metric` (descending), overall or within each group of params `by`.

    Columns: the `by` params, `metric`, the identifying params, sweep, stage_id, run_id.
    Params are MLflow's strings (e.g. ratio "0.5", budget "40").
    """
    from mlflow import MlflowClient

    by = list(by or [])
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    client = MlflowClient(tracking_uri=uri)
    runs = _runs_frame(client, _experiments(client, uri, sweep))
    shown = [p for p in SHOWN_PARAMS if p not in by]
    columns = [*by, metric, *shown, "sweep", "stage_id", "run_id"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    metric_col = f"metrics.{metric}"
    if metric_col not in runs:
        known = sorted(c.removeprefix("metrics.") for c in runs if c.startswith("metrics."))
        raise ValueError(f"metric {metric!r} is not recorded on any run; known: {known}")
    missing = [b for b in by if f"params.{b}" not in runs]
    if missing:
        known = sorted(c.removeprefix("params.") for c in runs if c.startswith("params."))
        raise ValueError(f"cannot group by {missing[0]!r}: no run has that param; known: {known}")
    for name in (*by, *shown):
        if f"params.{name}" not in runs:
            runs[f"params.{name}"] = None
    runs = runs.rename(columns={f"params.{p}": p for p in (*by, *shown)})
    runs = runs.rename(columns={metric_col: metric})
    runs = runs[runs[metric].notna()].sort_values(metric, ascending=False, kind="stable")
    if by:
        runs = runs.groupby(by, dropna=False, sort=False).head(top)
        runs = runs.sort_values(
            [*by, metric], ascending=[True] * len(by) + [False], key=_natural, kind="stable"
        )
    else:
        runs = runs.head(top)
    return runs[columns].reset_index(drop=True)


def _natural(col: pd.Series) -> pd.Series:
    """Params are strings: order "2" before "10" when every value is a number."""
    numbers = pd.to_numeric(col, errors="coerce")
    return numbers if numbers.notna().sum() == col.notna().sum() else col


def render_best(df: pd.DataFrame) -> str:
    """Plain-text table of `best_runs`' result."""
    if df.empty:
        return "no successful retrain runs found"

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [[fmt(v) for v in r] for r in df.itertuples(index=False)]
    return text_table(list(df.columns), rows)
