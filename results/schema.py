"""The two Parquet tables every sweep writes, each column declared once.

Every column is a `Column`: name, Arrow type, nullability, meaning, and how it appears in
MLflow. The Arrow schemas (`STAGES_SCHEMA`, `EPOCHS_SCHEMA`), the column reference in
docs/results.md (`python -m nptm.results.schema` prints it; a test keeps the file current) and the
MLflow mapping (nptm.results.mlflow_rows) are all derived from these lists.

Both tables live under ``<storage>/sweeps/<sweep>/`` as one Parquet file per stage (see
nptm.trainables.layout), so each directory is a Parquet dataset that pandas, pyarrow and DuckDB read
directly, e.g. ``SELECT * FROM read_parquet('<storage>/sweeps/<sweep>/stages/*.parquet')``.

`rows_to_table(table, rows)` is the one check of a row: Arrow converts each column to its type
(a value it cannot convert is an error naming the column and the value); unknown columns,
missing required ones, enum values, fractions outside [0, 1] and naive timestamps are refused
here as well; ``overrides`` may be given as a dict and timestamps as ISO-8601 strings.

Version 2 renamed the table ``trials`` to ``stages`` and its key ``trial_id`` to ``stage_id``,
and added ``attempts``; nptm.results.store still reads version 1. Version 3 added
``nesterov``, ``momentum_min`` and ``momentum_max``; rows of earlier versions read with them
null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa

from nptm.trainables.layout import EPOCHS_TABLE, STAGES_TABLE
from nptm.trainables.stage import StageKind, StageStatus

SCHEMA_VERSION = 3

TableName = Literal["stages", "epochs"]
TIMESTAMP = pa.timestamp("us", tz="UTC")
_STR, _F64, _I32, _I64, _BOOL = pa.string(), pa.float64(), pa.int32(), pa.int64(), pa.bool_()


class SchemaError(ValueError):
    """A row that does not fit its table's schema."""


@dataclass(frozen=True)
class Column:
    """One Parquet column and its MLflow counterparts."""

    name: str
    type: pa.DataType
    nullable: bool
    doc: str
    values: tuple[str, ...] = ()  # the allowed values of an enum column
    fraction: bool = False  # a share in [0, 1]; a value above 1 is almost surely a percentage
    axis: bool = False  # a grid axis: identifies the stage in `status` and `best` listings
    lineage: bool = False  # what pruning did: a retrain row without it takes its prune parent's
    param: str | None = None  # logged as this MLflow param
    metric: str | None = None  # logged as this MLflow metric (epochs: step = epoch)
    tag: bool = False  # logged as the MLflow tag nptm.<name>

    @property
    def field(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=self.nullable)


def _c(name: str, typ: pa.DataType, nullable: bool, doc: str, **kw: Any) -> Column:
    """A column; a numeric grid axis is also the MLflow metric of its param's name (MLflow
    compares params as text: ``metrics.ratio > 0.5`` filters, ``params.ratio > 0.5`` cannot)."""
    numeric = pa.types.is_integer(typ) or pa.types.is_floating(typ)
    if kw.get("axis") and numeric and kw.get("param"):
        kw.setdefault("metric", kw["param"])
    return Column(name, typ, nullable, doc, **kw)


# MLflow's charts group metrics by the prefix before "/": sections of prefixes in name order,
# then one of the metrics without (the numeric axes). So the curves lead, the summaries follow.
EPOCH_PREFIX, SUMMARY_PREFIX = "epoch/", "summary/"


def _measure(name: str, typ: pa.DataType, doc: str, **kw: Any) -> Column:
    """A value measured each epoch: nullable, and the MLflow metric ``epoch/<name>``."""
    return Column(name, typ, True, doc, metric=EPOCH_PREFIX + name, **kw)


def _summary(name: str, typ: pa.DataType, doc: str, **kw: Any) -> Column:
    """A value measured once per stage: nullable, and the MLflow metric ``summary/<name>``."""
    return Column(name, typ, True, doc, metric=SUMMARY_PREFIX + name, **kw)


# The values the stage_kind and status columns hold, in the enums' order.
STAGE_KINDS: tuple[str, ...] = tuple(k.value for k in StageKind)
STATUSES: tuple[str, ...] = tuple(s.value for s in StageStatus)


def _one_of(values: tuple[str, ...]) -> str:
    return ", ".join(values[:-1]) + " or " + values[-1]


STAGES_COLUMNS: tuple[Column, ...] = (
    _c("schema_version", pa.int16(), False, f"version of this schema ({SCHEMA_VERSION})"),
    _c("sweep", _STR, False, "sweep name", tag=True),
    _c("stage_id", _STR, False, "content hash of the stage (StageSpec.id)"),
    _c(
        "stage_kind",
        _STR,
        False,
        _one_of(STAGE_KINDS),
        values=STAGE_KINDS,
        param="stage_kind",
        tag=True,
    ),
    _c("parent_ids", pa.list_(_STR), False, "ids of the stages this one consumed", tag=True),
    _c("round", _I32, False, "iterative pruning round, 1-based", param="round"),
    _c("dataset", _STR, False, "dataset name", axis=True, param="dataset", tag=True),
    _c("model", _STR, False, "model name", axis=True, param="model", tag=True),
    _c("pruner", _STR, True, "pruner (prune/retrain stages)", axis=True, param="pruner", tag=True),
    _c("structured", _BOOL, True, "the pruner removes whole filters", param="structured"),
    _c("ratio", _F64, True, "target sparsity / filter ratio", axis=True, param="ratio"),
    _c("preset", _STR, True, "published filter-pruning configuration", axis=True, param="preset"),
    _c(
        "target",
        _STR,
        True,
        "the pruning target as one label: ratio=0.5 or preset=B (StageSpec.target)",
        param="target",
        tag=True,
    ),
    _c(
        "pruner_options",
        _STR,
        True,
        'JSON object of an unstructured pruner\'s options (layers, min_keep), "{}" if none',
        axis=True,
        param="pruner_options",
    ),
    _c(
        "schedule",
        _STR,
        True,
        "retraining schedule (ft, lrw, wr, slr, clr, ...)",
        axis=True,
        param="schedule",
        tag=True,
    ),
    _c("budget_epochs", _I32, True, "retraining budget in epochs", axis=True, param="budget"),
    _c(
        "overrides",
        _STR,
        True,
        'JSON object of schedule overrides ("{}" if none); MLflow: one param override.<key> each',
        param="overrides",
    ),
    _c("lr_override", _F64, True, "learning rate override, if any", param="lr_override"),
    _c(
        "val_fraction",
        _F64,
        True,
        "share of the training set held out for validation",
        param="val_fraction",
    ),
    _c("precision", _STR, True, "fp32 | bf16 (autocast of forward passes)", param="precision"),
    _c("seed", _I64, False, "seed of the whole chain", axis=True, param="seed"),
    # The recipe the stage trains with, as its schedule resolves it (prune stages: epochs 0).
    _c(
        "epochs",
        _I32,
        True,
        "training epochs the stage runs (StageSpec.epochs)",
        param="epochs",
    ),
    _c(
        "lr_peak",
        _F64,
        True,
        "highest learning rate of the stage's schedule (overrides applied)",
        param="lr_peak",
    ),
    _c(
        "milestones",
        pa.list_(_I32),
        True,
        "lr-drop epochs of the pre-training recipe every schedule is defined against",
        param="milestones",
    ),
    _c("batch_size", _I32, True, "global batch of one optimizer step", param="batch_size"),
    _c("weight_decay", _F64, True, "SGD weight decay", param="weight_decay"),
    _c(
        "momentum",
        _F64,
        True,
        "SGD momentum of the recipe (clr cycles it: momentum_min, momentum_max)",
        param="momentum",
    ),
    _c(
        "momentum_min",
        _F64,
        True,
        "lowest SGD momentum of any step (clr: 0.85; else the recipe's momentum)",
        param="momentum_min",
    ),
    _c(
        "momentum_max",
        _F64,
        True,
        "highest SGD momentum of any step (clr: 0.95; else the recipe's momentum)",
        param="momentum_max",
    ),
    _c(
        "nesterov",
        _BOOL,
        True,
        "SGD with Nesterov momentum (the recipe's nesterov, where momentum > 0)",
        param="nesterov",
    ),
    _summary(
        "achieved_sparsity",
        _F64,
        "share of prunable weights that are zero",
        fraction=True,
        lineage=True,
    ),
    _summary("params", _I64, "parameters of the (pruned) model", lineage=True),
    _summary("macs", _I64, "multiply-accumulates per image", lineage=True),
    _summary("nonzero_params", _I64, "non-zero parameters", lineage=True),
    _summary("base_params", _I64, "parameters of the unpruned model", lineage=True),
    _summary("base_macs", _I64, "MACs of the unpruned model", lineage=True),
    _summary("params_reduction", _F64, "1 - params / base_params", lineage=True),
    _summary("macs_reduction", _F64, "1 - macs / base_macs", lineage=True),
    _summary(
        "emptied_layers",
        _I32,
        "Conv2d/Linear layers left with no weight by pruning (names in the prune outcome)",
        lineage=True,
    ),
    _summary(
        "acc_before_prune",
        _F64,
        "test accuracy of the model that was pruned",
        fraction=True,
        lineage=True,
    ),
    _summary(
        "acc_after_prune", _F64, "test accuracy right after pruning", fraction=True, lineage=True
    ),
    _summary("test_acc", _F64, "test accuracy after the final epoch: THE headline", fraction=True),
    _summary("test_loss", _F64, "test loss after the final epoch"),
    _summary("best_val_epoch", _I32, "epoch with the best validation accuracy"),
    _summary(
        "test_acc_at_best_val",
        _F64,
        "test accuracy at best_val_epoch (model selection)",
        fraction=True,
    ),
    _summary(
        "best_test_acc_over_epochs",
        _F64,
        "max test accuracy over epochs (optimistic; never the headline)",
        fraction=True,
    ),
    _summary("epochs_run", _I32, "epochs actually run"),
    _summary("wall_seconds", _F64, "wall time of the stage"),
    _summary("device_hours", _F64, "accelerator (or CPU-worker) hours used"),
    _c("status", _STR, False, _one_of(STATUSES), values=STATUSES, tag=True),
    _c("error", _STR, True, "error text of a failed or skipped stage", tag=True),
    _c("node", _STR, True, "Ray node id that ran the stage (else host)", tag=True),
    _c(
        "executor",
        _STR,
        True,
        "inline (Tune trial actor), train (Ray Train) or task (a prune stage of a train sweep)",
        tag=True,
    ),
    _c("workers", _I32, True, "data-parallel workers"),
    _c("attempts", _I32, True, "times the stage was started (retries and resumes included)"),
    _c("mlflow_run_id", _STR, True, "MLflow run of this stage, if recorded"),
    _c("reused", _BOOL, False, "outcome taken from an earlier run of the stage", tag=True),
    _c("nptm_version", _STR, True, "nptm version that ran the stage"),
    _c("git_commit", _STR, True, "git commit of nptm's checkout, if it runs from one", tag=True),
    _c("torch_version", _STR, True, "torch version that ran the stage"),
    _c("ray_version", _STR, True, "Ray version that ran the stage"),
    _c("started_at", TIMESTAMP, True, "start of the stage"),
    _c("ended_at", TIMESTAMP, True, "end of the stage"),
)

EPOCHS_COLUMNS: tuple[Column, ...] = (
    _c("schema_version", pa.int16(), False, f"version of this schema ({SCHEMA_VERSION})"),
    _c("sweep", _STR, False, "sweep name"),
    _c("stage_id", _STR, False, "stage id (joins stages.stage_id)"),
    _c("stage_kind", _STR, False, _one_of(STAGE_KINDS), values=STAGE_KINDS),
    _c("epoch", _I32, False, "epoch index as reported by the training loop"),
    _measure("lr", _F64, "learning rate of the epoch's last step"),
    _measure("train_loss", _F64, "training loss"),
    _measure("train_acc", _F64, "training accuracy", fraction=True),
    _measure("val_loss", _F64, "validation loss (if a split exists)"),
    _measure("val_acc", _F64, "validation accuracy", fraction=True),
    _measure("test_loss", _F64, "test loss after the epoch"),
    _measure("test_acc", _F64, "test accuracy after the epoch", fraction=True),
    _measure("wall_s", _F64, "wall time of the epoch"),
    _measure("samples", _I64, "training samples seen in the epoch"),
)

COLUMNS: dict[str, tuple[Column, ...]] = {
    STAGES_TABLE: STAGES_COLUMNS,
    EPOCHS_TABLE: EPOCHS_COLUMNS,
}


def _schema(table: str) -> pa.Schema:
    return pa.schema(
        [c.field for c in COLUMNS[table]],
        metadata={"nptm.table": table, "nptm.schema_version": str(SCHEMA_VERSION)},
    )


STAGES_SCHEMA = _schema(STAGES_TABLE)
EPOCHS_SCHEMA = _schema(EPOCHS_TABLE)
SCHEMAS: dict[str, pa.Schema] = {STAGES_TABLE: STAGES_SCHEMA, EPOCHS_TABLE: EPOCHS_SCHEMA}
# Version 1 named the key column trial_id (and the stages table "trials").
LEGACY_KEY = "trial_id"

AXIS_COLUMNS = tuple(c.name for c in STAGES_COLUMNS if c.axis)
LINEAGE_COLUMNS = tuple(c.name for c in STAGES_COLUMNS if c.lineage)


# -- the one check of a row ---------------------------------------------------------------------


def rows_to_table(table: TableName, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """`rows` as an Arrow table with exactly `table`'s schema; SchemaError names the first
    column (and value) that does not fit. Missing nullable columns become null;
    ``schema_version`` defaults to the current version."""
    if table not in COLUMNS:
        raise SchemaError(f"unknown table {table!r}; known: {sorted(COLUMNS)}")
    names = set(SCHEMAS[table].names)
    for row in rows:
        unknown = [k for k in row if k not in names]
        if unknown:
            more = f" (and {len(unknown) - 1} more: {unknown[1:]})" if len(unknown) > 1 else ""
            raise SchemaError(f"{table} row: unknown column {unknown[0]!r}{more}")
    arrays = [_column_array(table, col, rows) for col in COLUMNS[table]]
    return pa.Table.from_arrays(arrays, schema=SCHEMAS[table])


def _column_array(table: str, col: Column, rows: Sequence[Mapping[str, Any]]) -> pa.Array:
    values = [_prepare(table, col, row) for row in rows]
    try:
        array = pa.array(values, type=col.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
        raise _first_misfit(table, col, values) or SchemaError(
            f"{table} row: column {col.name!r}: {err}"
        ) from None
    if col.values:
        bad = [v for v in values if v is not None and v not in col.values]
        if bad:
            raise SchemaError(
                f"{table} row: column {col.name!r} must be one of {list(col.values)}, "
                f"got {bad[0]!r}"
            )
    if col.fraction:
        bad = [v for v in values if v is not None and not math.isnan(v) and not 0 <= v <= 1]
        if bad:
            raise SchemaError(
                f"{table} row: column {col.name!r} is a fraction in [0, 1], got {bad[0]!r} "
                "(percentages must be divided by 100)"
            )
    return array


def _first_misfit(table: str, col: Column, values: list[Any]) -> SchemaError | None:
    for value in values:
        try:
            pa.array([value], type=col.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            return _bad(table, col, value)
    return None


def _bad(table: str, col: Column, value: Any) -> SchemaError:
    return SchemaError(
        f"{table} row: column {col.name!r} expects {col.type}, got {type(value).__name__} {value!r}"
    )


def _prepare(table: str, col: Column, row: Mapping[str, Any]) -> Any:
    """What Arrow cannot decide for itself: nulls (pandas' NA, NaN outside float columns),
    required columns, lossy conversions Arrow would make silently, and the two columns that
    accept a second spelling (overrides as a dict, timestamps as ISO-8601 text)."""
    value = row.get(col.name)
    if col.name == "schema_version" and value is None:
        value = SCHEMA_VERSION
    is_float = pa.types.is_floating(col.type)
    if _is_null(value) or (isinstance(value, float) and math.isnan(value) and not is_float):
        if not col.nullable:
            what = "missing" if col.name not in row else "null"
            raise SchemaError(f"{table} row: column {col.name!r} is required but {what}")
        return None
    if col.name == "schema_version" and value != SCHEMA_VERSION:
        raise SchemaError(f"{table} row: schema_version {value} is not {SCHEMA_VERSION}")
    if pa.types.is_integer(col.type) and isinstance(value, float) and not value.is_integer():
        raise _bad(table, col, value)  # Arrow would truncate 10.5 to 10
    if pa.types.is_list(col.type) and isinstance(value, str | bytes):
        raise _bad(table, col, value)  # Arrow would split "p0" into ["p", "0"]
    if pa.types.is_timestamp(col.type):
        return _to_utc(table, col, value)
    if col.name == "overrides":
        return _overrides_json(table, col, value)
    return value


def _is_null(value: Any) -> bool:
    # pandas.NA / NaT arrive when rows come from a DataFrame.
    return value is None or type(value).__name__ in ("NAType", "NaTType")


def _overrides_json(table: str, col: Column, value: Any) -> str:
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
    if not isinstance(parsed, Mapping):
        raise SchemaError(
            f"{table} row: column {col.name!r} expects a JSON object, got "
            f"{type(value).__name__} {value!r}"
        )
    return json.dumps(dict(parsed), sort_keys=True, separators=(",", ":"))


def _to_utc(table: str, col: Column, value: Any) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise SchemaError(
                f"{table} row: column {col.name!r} expects an ISO-8601 timestamp, got {value!r}"
            ) from None
    if not isinstance(value, datetime):
        raise _bad(table, col, value)
    if value.tzinfo is None or value.utcoffset() is None:
        # Arrow would read a naive time as UTC, silently shifting every local time.
        raise SchemaError(f"{table} row: column {col.name!r} needs a timezone, got {value!r}")
    if hasattr(value, "to_pydatetime"):  # pandas.Timestamp; drops sub-microsecond digits
        value = value.to_pydatetime(warn=False)
    return value.astimezone(UTC)


# -- the column reference -----------------------------------------------------------------------


def reference() -> str:
    """docs/results.md: both tables, one line per column, and their MLflow counterparts."""
    out = [
        "# Results tables",
        "",
        "Generated from `results/schema.py` by `python -m nptm.results.schema > docs/results.md`;",
        "do not edit by hand.",
        "",
        f"Schema version {SCHEMA_VERSION}. Accuracies are fractions in [0, 1] (reports print "
        "percentages); reductions are the fraction removed; timestamps are "
        "`timestamp[us, UTC]`. Null = yes: the column may be null; every other column is "
        "required in each row. MLflow: `param:` / `metric:` name what the column is logged as "
        "on the stage's run; `tag` is the tag `nptm.<column>`. An `epoch/` metric is a curve, "
        "one point per epoch (step = epoch); a `summary/` metric one point per stage, at its "
        "last epoch's step; a numeric grid axis is a metric as well as a param, so MLflow can "
        "filter on it (`metrics.ratio > 0.5`).",
    ]
    titles = {
        STAGES_TABLE: "one row per stage run per sweep",
        EPOCHS_TABLE: "one row per stage per epoch (metrics: step = epoch)",
    }
    for table, columns in COLUMNS.items():
        out += ["", f"## `{table}`: {titles[table]}", ""]
        out.append("| column | type | null | meaning | MLflow |")
        out.append("|---|---|---|---|---|")
        for c in columns:
            mlflow = [
                f"param:{c.param}" if c.param else "",
                f"metric:{c.metric}" if c.metric else "",
            ]
            mlflow.append("tag" if c.tag else "")
            cell = ", ".join(m for m in mlflow if m)
            out.append(
                f"| {c.name} | {c.type} | {'yes' if c.nullable else 'no'} | {c.doc} | {cell} |"
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
