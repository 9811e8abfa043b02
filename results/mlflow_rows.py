"""A stage's rows as MLflow sees them (pure: no client, no I/O).

One experiment per sweep, ``nptm/<sweep>``, its runs all at the top level: one run per stage
(tag ``nptm.role=stage``), found again by its tag ``nptm.stage_id`` (``nptm.trial_id`` on runs
recorded before schema version 2), and the sweep's own run (``nptm.role=sweep``). Params,
metrics and tags come from the column declarations in nptm.results.schema: per-epoch curves
under ``epoch/``, a stage's one-off values under ``summary/``, numeric axes as metrics too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from nptm.results.schema import EPOCHS_COLUMNS, STAGES_COLUMNS
from nptm.trainables.layout import check_sweep_name
from nptm.trainables.stage import StageKind, StageStatus, stage_label, target_label

EXPERIMENT_PREFIX = "nptm/"
# MLflow's UI shows an experiment of this kind as training runs, not GenAI evaluations.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
ROLE_TAG, SWEEP_ROLE, STAGE_ROLE = "nptm.role", "sweep", "stage"  # which run records what
STAGE_ID_TAG = "nptm.stage_id"
MODEL_ID_TAG = "nptm.model_id"  # the MLflow logged model of a stage's final weights
LEGACY_STAGE_ID_TAG = "nptm.trial_id"  # runs recorded before schema version 2
RUN_STATUS = {
    StageStatus.OK: "FINISHED",
    StageStatus.DIVERGED: "FAILED",
    StageStatus.FAILED: "FAILED",
    StageStatus.SKIPPED: "KILLED",
}
# column -> MLflow name
PARAMS = {c.name: c.param for c in STAGES_COLUMNS if c.param}
AXIS_METRICS = {c.name: c.metric for c in STAGES_COLUMNS if c.metric and c.axis}
SUMMARY_METRICS = {c.name: c.metric for c in STAGES_COLUMNS if c.metric and not c.axis}
EPOCH_METRICS = {c.name: c.metric for c in EPOCHS_COLUMNS if c.metric}
TAGS = tuple(c.name for c in STAGES_COLUMNS if c.tag)
# Tags a stage's run carries only in some outcomes: cleared when a re-record drops them.
OUTCOME_TAGS = ("nptm.error", "nptm.diverged", "nptm.node")
RUNNING_STATUS_TAG = "running"  # nptm.status of a run whose stage is running now
MAX_PARAM_LEN, MAX_TAG_LEN = 6000, 8000  # mlflow.utils.validation limits
_ERROR_TAIL = 4000  # characters of an error kept in its tag


def experiment_name(sweep: str) -> str:
    return EXPERIMENT_PREFIX + check_sweep_name(sweep)


def sweep_run_name(sweep: str) -> str:
    """The sweep's own run, named as a stage's run is (kind first, then what it is)."""
    return f"sweep/{sweep}"


def stage_id_of(tags: Mapping[str, str]) -> str | None:
    """The stage a run records, under the current tag or the one before schema version 2."""
    return tags.get(STAGE_ID_TAG) or tags.get(LEGACY_STAGE_ID_TAG)


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as flat MLflow params (``a.b``); lists as JSON, None left out."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten_params(value, name + ".")
        elif value is not None:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def clip(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ms(ts: datetime | None) -> int | None:
    return None if ts is None else int(ts.timestamp() * 1000)


def row_hash(row: Mapping[str, Any], epochs: list[Mapping[str, Any]]) -> str:
    """Fingerprint of a stage's normalised rows (mlflow_run_id excluded: it points back)."""
    payload = {
        "stage": {k: v for k, v in row.items() if k != "mlflow_run_id"},
        "epochs": [dict(e) for e in epochs],
    }
    text = json.dumps(payload, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot fingerprint {type(value).__name__}")


def run_name(row: Mapping[str, Any]) -> str:
    """The stage's label (`nptm.trainables.stage.stage_label`) from its stored row."""
    return stage_label(
        kind=row["stage_kind"],
        dataset=row["dataset"],
        model=row["model"],
        pruner=row["pruner"],
        target=target_label(row["ratio"], row["preset"]),
        schedule=row["schedule"],
        budget=row["budget_epochs"],
        seed=row["seed"],
    )


def stage_params(row: Mapping[str, Any]) -> dict[str, str]:
    params = {name: str(row[col]) for col, name in PARAMS.items() if row[col] is not None}
    if row["overrides"]:
        for key, value in json.loads(row["overrides"]).items():
            params[f"override.{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return params


def stage_tags(row: Mapping[str, Any]) -> dict[str, str]:
    """``nptm.<column>`` for every tagged column (empty values left out), and
    ``nptm.diverged`` on a diverged stage."""
    tags = {f"nptm.{col}": _tag_value(col, row[col]) for col in TAGS}
    if row["status"] == StageStatus.DIVERGED:
        tags["nptm.diverged"] = "true"
    return {k: v for k, v in tags.items() if v is not None and v != ""}


def _tag_value(column: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    if column == "error":
        return value[-_ERROR_TAIL:]  # the end of a traceback names the error
    return str(value)


def stage_metrics(
    row: Mapping[str, Any], epochs: list[Mapping[str, Any]], start_ms: int
) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp ms, step) for the numeric axes, the per-epoch series and the
    summary metrics: axes at step 0 (known when the stage starts), summaries at the last
    epoch's step (what the final model measured there)."""
    points = {(key, step): (value, start_ms) for key, value, step in axis_points(row)}
    elapsed_s, ts = 0.0, start_ms - 1
    for e in epochs:
        elapsed_s += e["wall_s"] or 0.0
        ts = max(start_ms + int(elapsed_s * 1000), ts + 1)  # strictly increasing
        for col, key in EPOCH_METRICS.items():
            if e[col] is not None:
                points[(key, e["epoch"])] = (float(e[col]), ts)
    last_step = epochs[-1]["epoch"] if epochs else 0
    end_ms = max(ms(row["ended_at"]) or 0, ts + 1)
    for col, key in SUMMARY_METRICS.items():
        if row[col] is not None:
            points[(key, last_step)] = (float(row[col]), end_ms)
    return [(k, v, t, step) for (k, step), (v, t) in points.items()]


def axis_points(row: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(key, value, step 0) of the stage's numeric grid axes (ratio, budget, seed)."""
    return [(key, float(row[col]), 0) for col, key in AXIS_METRICS.items() if row[col] is not None]


def epoch_points(epoch: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(key, value, step) of one epoch's metrics as the train loop reports them live (the
    `epochs` table's column names; anything else in the report is left out)."""
    step = int(epoch["epoch"])
    return [
        (key, float(epoch[col]), step)
        for col, key in EPOCH_METRICS.items()
        if isinstance(epoch.get(col), int | float)
    ]


def headline_metrics(stages: Any) -> dict[str, float]:
    """The sweep's summary metrics for its own run, from its `stages` table (pandas): stage
    counts by status, the best final test accuracy, and the mean final test accuracy of each
    cell of the report's headline table (`nptm.results.analysis.CELL`: final-round ok retrain
    stages), ``test_acc_mean/<dataset>/<model>/<structure>/<target>/b<budget>/<pruner>/<sched>``
    as a metric key (`metric_key`)."""
    from nptm.results.analysis import CELL, cell_stats, final_round_retrain

    out: dict[str, float] = {
        f"stages_{status}": float(n) for status, n in stages["status"].value_counts().items()
    }
    retrain = stages[stages["stage_kind"] == StageKind.RETRAIN]
    acc = retrain.loc[retrain["status"] == StageStatus.OK, "test_acc"].dropna()
    if len(acc):
        out["test_acc_max"] = float(acc.max())
    final = final_round_retrain(stages)
    ok = final[(final["status"] == StageStatus.OK) & final["test_acc"].notna()]
    for cell in cell_stats(ok, "test_acc").itertuples(index=False):
        labels = dict(zip(CELL, cell, strict=False))  # the cell's columns come first
        labels["budget"] = f"b{labels['budget']:g}"
        out[metric_key("test_acc_mean", *labels.values())] = float(cell.mean)
    return out


# What a label may hold that an MLflow key may not ("=", "+", JSON of overrides, options).
_KEY_CHARS = str.maketrans(
    {"=": ":", "+": "-", ",": " ", "[": " ", "/": "_"} | dict.fromkeys('{}]"')
)


def metric_key(*parts: Any) -> str:
    """An MLflow metric key of `parts` joined by "/": each part with the characters MLflow
    refuses in a key mapped or dropped (``clr {"lr":0.05}`` -> ``clr lr:0.05``)."""
    cleaned = [
        re.sub(r"[^\w.\- :]", "_", " ".join(str(p).translate(_KEY_CHARS).split())) for p in parts
    ]
    return "/".join(cleaned)[:250]
