"""`nptm best`: the best retraining cells (mean over seeds) or runs by a metric, from MLflow.

Runs are searched with `MlflowClient(uri).search_runs` (the client, not `mlflow.search_runs`,
because the latter reads the process-wide tracking URI), in the sweep's experiment or in every
``nptm/`` experiment: the prune and retrain stages' runs (tag ``nptm.stage_kind``), each read
back as its `stages` row. Each sweep's rows then go through the report's own definitions
(nptm.results.analysis): the final-round retrain runs with status ok, and cells of
`analysis.CELL` with the mean, sample sd and n over seeds of `cell_stats`, so the mean of
``test_acc`` of a cell is the report's headline cell.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

from nptm.results.analysis import cell_stats, final_round_retrain, sort_key, successful
from nptm.results.mlflow_rows import (
    EXPERIMENT_PREFIX,
    SUMMARY_METRICS,
    experiment_name,
    stage_id_of,
)
from nptm.results.schema import STAGES_COLUMNS, Column
from nptm.results.tables import text_table

# Every stage run but the pre-trainings, and none still running (the Parquet store has no row
# for a running stage, so the report does not see it either).
RUN_FILTER = "tags.\"nptm.stage_kind\" != 'pretrain' and tags.\"nptm.status\" != 'running'"
AGGS = ("mean", "none")
MODES = ("min", "max")
WIDTH = 100  # of the text table
# --where KEY=VALUE: key -> (column of a final-round run, value type). The shown axes, and
# ratio / preset, which the shown `target` joins.
FILTERS: dict[str, tuple[str, type]] = {
    "sweep": ("sweep", str),
    "dataset": ("dataset", str),
    "model": ("model", str),
    "structure": ("structure", str),
    "pruner": ("pruner", str),
    "target": ("target", str),
    "ratio": ("ratio", float),
    "preset": ("preset", str),
    "schedule": ("sched", str),
    "budget": ("budget", int),
    "seed": ("seed", int),
}
# Shown columns, in order, after the metric: a cell's (the report's CELL and the sweep), and a
# run's. `schedule` is the report's label: the schedule and its overrides, if any.
CELL_COLUMNS = ["pruner", "schedule", "target", "budget", "dataset", "model", "structure", "sweep"]
RUN_COLUMNS = [*CELL_COLUMNS[:4], "seed", *CELL_COLUMNS[4:], "stage_id", "run_id"]
# Names `--metric` refuses (MLflow holds the numeric axes as metrics too).
_NOT_METRICS = {c.param for c in STAGES_COLUMNS if c.axis and c.param} | {*RUN_COLUMNS, "sd", "n"}
_HIDDEN = ("structure",)  # the pruner names it; in --json only
_ID_CHARS = 8  # of a stage or run id in the text table
_PAGE = 1000


def mlflow_key(metric: str) -> str:
    """The MLflow key a stage's run holds `metric` under (a `stages` column's summary value,
    or an epoch series' latest value): the one place `best` names a metric in MLflow."""
    return SUMMARY_METRICS.get(metric, metric)


def default_mode(metric: str) -> str:
    """``min`` for a loss or an error (the name contains "loss" or "error"), else ``max``."""
    name = metric.lower()
    return "min" if "loss" in name or "error" in name else "max"


def parse_where(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as (key, typed value); ValueError naming the field and value."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key or not raw:
        raise ValueError(f"--where {text!r}: expected KEY=VALUE, e.g. pruner=l1_filter")
    if key not in FILTERS:
        raise ValueError(f"--where {text!r}: unknown key {key!r}; known: {sorted(FILTERS)}")
    kind = FILTERS[key][1]
    try:
        value = kind(raw)
    except ValueError:
        what = {int: "an integer", float: "a number"}[kind]
        raise ValueError(f"--where {key}: expected {what}, got {raw!r}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"--where {key}: expected a finite number, got {raw!r}")
    return key, value


def best_runs(
    uri: str,
    *,
    sweep: str | None = None,
    metric: str = "test_acc",
    mode: str | None = None,
    agg: str = "mean",
    by: Sequence[str] = (),
    where: Iterable[tuple[str, Any]] = (),
    top: int = 5,
) -> pd.DataFrame:
    """The `top` cells (`agg="mean"`: mean, sd, n over seeds) or runs (`agg="none"`) by
    `metric`, best first (`mode`: min or max, default `default_mode`), overall or within each
    group of the shown columns `by`. `where`: (key, value) pairs of `parse_where`; values of
    one key are alternatives, keys all apply.

    Columns: `by`, `metric` (the mean for cells), then sd and n (cells), and `CELL_COLUMNS`
    (cells) or `RUN_COLUMNS` (runs).
    """
    from mlflow import MlflowClient

    mode = mode or default_mode(metric)
    if mode not in MODES or agg not in AGGS:
        raise ValueError(f"mode must be one of {MODES} and agg one of {AGGS}: {mode!r}, {agg!r}")
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if metric in _NOT_METRICS:
        raise ValueError(f"metric {metric!r} is a grid axis or a shown column, not a result")
    shown = CELL_COLUMNS if agg == "mean" else RUN_COLUMNS[:-2]
    if unknown := [b for b in by if b not in shown]:
        raise ValueError(f"cannot group by {unknown[0]!r}; known: {shown}")
    stats = ["sd", "n"] if agg == "mean" else []
    rest = CELL_COLUMNS if agg == "mean" else RUN_COLUMNS
    columns = [*by, metric, *stats, *(c for c in rest if c not in by)]
    client = MlflowClient(tracking_uri=uri)
    runs, seen = _stages_frame(client, _experiments(client, uri, sweep), metric)
    if runs.empty:
        return pd.DataFrame(columns=columns)
    if mlflow_key(metric) not in seen:
        names = {mlflow_key(m): m for m in SUMMARY_METRICS}  # MLflow key -> the name to give
        known = sorted({names.get(k, k) for k in seen} - _NOT_METRICS)
        raise ValueError(f"metric {metric!r} is not recorded on any run; known: {known}")
    final = _per_sweep(runs, final_round_retrain)
    ok = _filtered(successful(final), final, where)
    ok = ok[ok[metric].notna()]
    if agg == "mean":
        rows = _per_sweep(ok, lambda sub: cell_stats(sub, metric))
        rows = rows.rename(columns={"mean": metric})
    else:
        rows = ok
    # The report's label (schedule and overrides) in place of the bare schedule.
    rows = rows.drop(columns="schedule", errors="ignore").rename(columns={"sched": "schedule"})
    rows = rows.reindex(columns=columns)
    best_first = rows.sort_values(metric, ascending=mode == "min", kind="stable")
    if not by:
        return best_first.head(top).reset_index(drop=True)
    grouped = best_first.groupby(list(by), dropna=False, sort=False).head(top)
    order = [*by, metric]
    # Groups in the report's order: pruners and schedules as the catalog lists them.
    grouped = grouped.sort_values(
        order, ascending=[True] * len(by) + [mode == "min"], key=sort_key, kind="stable"
    )
    return grouped.reset_index(drop=True)


def _filtered(
    ok: pd.DataFrame, final: pd.DataFrame, where: Iterable[tuple[str, Any]]
) -> pd.DataFrame:
    """The rows of `ok` that `where` selects; a value no final-round run has is refused."""
    wanted: dict[str, list[Any]] = {}
    for key, value in where:
        wanted.setdefault(key, []).append(value)
    for key, values in wanted.items():
        column = FILTERS[key][0]
        recorded = set(final[column].dropna())
        if missing := [v for v in values if v not in recorded]:
            known = ", ".join(sorted(map(str, recorded))) or "none"
            raise ValueError(
                f"--where {key}={missing[0]}: no final-round retrain run has it; recorded: {known}"
            )
        ok = ok[ok[column].isin(values)]
    return ok


def _per_sweep(
    frame: pd.DataFrame, analyse: Callable[[pd.DataFrame], pd.DataFrame]
) -> pd.DataFrame:
    """`analyse` on each sweep's rows apart (the report reads one sweep), concatenated."""
    parts = [analyse(sub).assign(sweep=name) for name, sub in frame.groupby("sweep", sort=True)]
    return pd.concat(parts, ignore_index=True) if parts else analyse(frame).assign(sweep=None)


# -- MLflow runs as `stages` rows ----------------------------------------------------------


def _experiments(client: Any, uri: str, sweep: str | None) -> dict[str, str]:
    """experiment id -> sweep name."""
    if sweep is not None:
        exp = client.get_experiment_by_name(experiment_name(sweep))
        if exp is None or exp.lifecycle_stage == "deleted":
            raise ValueError(f"no MLflow experiment {experiment_name(sweep)!r} at {uri}")
        return {exp.experiment_id: sweep}
    exps = client.search_experiments(filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'")
    return {e.experiment_id: e.name.removeprefix(EXPERIMENT_PREFIX) for e in exps}


def _stages_frame(
    client: Any, experiments: dict[str, str], metric: str
) -> tuple[pd.DataFrame, set[str]]:
    """The runs' `stages` rows (typed as the Parquet columns, plus run_id and `metric`), one
    per stage of a sweep, and every metric key the runs hold."""
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    token = None
    while experiments:
        page = client.search_runs(
            list(experiments), RUN_FILTER, max_results=_PAGE, page_token=token
        )
        for run in page:
            seen.update(run.data.metrics)
            records.append(_row(run, experiments[run.info.experiment_id], metric))
        token = page.token
        if not token:
            break
    extra = [] if metric in _STAGE_NAMES else [metric]
    frame = pd.DataFrame.from_records(records, columns=[*_FRAME_COLUMNS, *extra])
    # One run per stage: the newest (MLflow lists the newest first).
    frame = frame.drop_duplicates(["sweep", "stage_id"]).reset_index(drop=True)
    for col in STAGES_COLUMNS:
        frame[col.name] = _typed(frame[col.name], col)
    for name in extra:
        frame[name] = pd.to_numeric(frame[name], errors="coerce")
    return frame, seen


_STAGE_NAMES = {c.name for c in STAGES_COLUMNS}
_FRAME_COLUMNS = [c.name for c in STAGES_COLUMNS] + ["run_id"]


def _row(run: Any, sweep: str, metric: str) -> dict[str, Any]:
    """A run's `stages` row as MLflow holds it (params as text): each column from its param,
    else its metric, else its tag (nptm.results.mlflow_rows)."""
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    row: dict[str, Any] = {}
    for col in STAGES_COLUMNS:
        if col.param:
            row[col.name] = params.get(col.param)
        elif col.metric:
            row[col.name] = metrics.get(mlflow_key(col.name))
        elif col.tag:
            row[col.name] = tags.get(f"nptm.{col.name}")
    row |= {"sweep": sweep, "stage_id": stage_id_of(tags), "run_id": run.info.run_id}
    if metric not in _STAGE_NAMES:
        row[metric] = metrics.get(mlflow_key(metric))
    return row


def _typed(values: pd.Series, col: Column) -> pd.Series:
    """A column of MLflow's text (or float) values as its Parquet type; a value that is not
    one is null."""
    if pa.types.is_integer(col.type):
        numbers = pd.to_numeric(values, errors="coerce")
        return numbers.where(numbers % 1 == 0).astype("Int64")
    if pa.types.is_floating(col.type):
        return pd.to_numeric(values, errors="coerce")
    if pa.types.is_boolean(col.type):
        text = values.astype("string").str.lower()
        return text.map({"true": True, "false": False}, na_action="ignore").astype("boolean")
    if pa.types.is_list(col.type) and not col.param:  # a tag: the items joined by ","
        return values.map(lambda v: v.split(",") if isinstance(v, str) and v else [])
    return values.astype(object).where(values.notna(), None)  # text (a list param: JSON)


# -- the text table ------------------------------------------------------------------------


def render_best(df: pd.DataFrame, metric: str = "test_acc", mode: str | None = None) -> str:
    """`best_runs`' result as text at most `WIDTH` characters wide: a line naming what is
    ranked and the values every row shares, then a table of the columns that differ (ids
    shortened to their first characters; `--json` has them whole)."""
    if df.empty:
        return "no successful final-round retrain runs found"
    mode = mode or default_mode(metric)
    cells = "n" in df.columns
    what = f"mean {metric} over seeds per cell" if cells else f"{metric} of single runs"
    head = [f"{what}, {'lowest' if mode == 'min' else 'highest'} first"]
    numbers = {metric, "sd", "n"}
    shared = [
        c for c in df.columns
        if c not in numbers and len(df) > 1 and df[c].nunique(dropna=False) == 1
    ]  # fmt: skip
    if shared:
        head.append("all rows: " + ", ".join(f"{c}={_text(df[c].iat[0])}" for c in shared))
    shown = [c for c in df.columns if c not in shared and c not in _HIDDEN]
    rows = [
        [_text(v, ids=c in ("stage_id", "run_id")) for c, v in zip(shown, r, strict=True)]
        for r in df[shown].itertuples(index=False)
    ]
    headers = [c.removesuffix("_id") for c in shown]  # stage, run
    right = [i for i, c in enumerate(shown) if c in (*numbers, "budget", "seed")]
    table = text_table(*_fit(headers, rows, right), right=right)
    return "\n".join([*(_clip(line) for line in head), table])


def _text(value: Any, *, ids: bool = False) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)[:_ID_CHARS] if ids else str(value)


def _fit(
    headers: list[str], rows: list[list[str]], right: Sequence[int]
) -> tuple[list[str], list[list[str]]]:
    """Shorten the widest text column ("…") until the table is at most `WIDTH` wide."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    floor = [max(len(h), 4) for h in headers]
    while sum(widths) + 2 * (len(widths) - 1) > WIDTH:
        text = [i for i in range(len(widths)) if i not in right and widths[i] > floor[i]]
        if not text:
            break
        i = max(text, key=lambda j: widths[j])
        excess = sum(widths) + 2 * (len(widths) - 1) - WIDTH
        widths[i] = max(floor[i], widths[i] - excess)
        for r in rows:
            if len(r[i]) > widths[i]:
                r[i] = r[i][: widths[i] - 1] + "…"
    return headers, rows


def _clip(line: str) -> str:
    return line if len(line) <= WIDTH else line[: WIDTH - 1] + "…"
