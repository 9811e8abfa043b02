"""Schemas of the two Parquet tables every sweep writes (schema version 1).

Both tables live under ``<storage>/sweeps/<sweep>/`` as one Parquet file per stage, so each
directory is a Parquet dataset that pandas, pyarrow and DuckDB read directly, e.g.
``SELECT * FROM read_parquet('<storage>/sweeps/<sweep>/trials/*.parquet')``.

Conventions: accuracies are fractions in [0, 1] (reports print them as percentages);
reductions are the fraction removed (``params_reduction = 1 - params / base_params``);
timestamps are ``timestamp[us, UTC]``; a column with null = yes may be null, every other column is
required in each row.

``trials`` — one row per stage run per sweep
--------------------------------------------
========================== ================== ===== ===============================================
column                     type               null  meaning
========================== ================== ===== ===============================================
schema_version             int16              no    version of this schema (1)
sweep                      string             no    sweep name
trial_id                   string             no    content hash of the stage (StageSpec.id)
stage_kind                 string             no    pretrain | prune | retrain
parent_ids                 list<string>       no    ids of the stages this one consumed
round                      int32              no    iterative pruning round, 1-based
dataset                    string             no    dataset name
model                      string             no    model name
pruner                     string             yes   pruner (prune/retrain stages)
structured                 bool               yes   the pruner removes whole filters
ratio                      double             yes   target sparsity / filter ratio
preset                     string             yes   published filter-pruning configuration
pruner_options             string             yes   JSON object of an unstructured pruner's
                                                    options (layers, min_keep), "{}" if none
schedule                   string             yes   retraining schedule (ft, lrw, wr, slr, clr,
                                                    ...)
budget_epochs              int32              yes   retraining budget in epochs
overrides                  string             yes   JSON object of schedule overrides ("{}" if
                                                    none)
lr_override                double             yes   learning rate override, if any
val_fraction               double             yes   share of the training set held out for
                                                    validation
precision                  string             yes   fp32 | bf16 (autocast of forward passes)
seed                       int64              no    seed of the whole chain
achieved_sparsity          double             yes   share of prunable weights that are zero
params                     int64              yes   parameters of the (pruned) model
macs                       int64              yes   multiply-accumulates per image
nonzero_params             int64              yes   non-zero parameters
base_params                int64              yes   parameters of the unpruned model
base_macs                  int64              yes   MACs of the unpruned model
params_reduction           double             yes   1 - params / base_params (nonzero for
                                                    unstructured)
macs_reduction             double             yes   1 - macs / base_macs
emptied_layers             int32              yes   Conv2d/Linear layers left with no weight by
                                                    pruning (names in the prune stage's outcome)
acc_before_prune           double             yes   test accuracy of the model that was pruned
acc_after_prune            double             yes   test accuracy right after pruning
test_acc                   double             yes   test accuracy after the final epoch: THE
                                                    headline
test_loss                  double             yes   test loss after the final epoch
best_val_epoch             int32              yes   epoch with the best validation accuracy
test_acc_at_best_val       double             yes   test accuracy at best_val_epoch (model
                                                    selection)
best_test_acc_over_epochs  double             yes   max test accuracy over epochs (optimistic;
                                                    never the headline)
epochs_run                 int32              yes   epochs actually run
wall_seconds               double             yes   wall time of the stage
device_hours               double             yes   accelerator (or CPU-worker) hours used
status                     string             no    ok | diverged | failed | skipped
error                      string             yes   error text of a failed stage
node                       string             yes   Ray node id that ran the stage (else host)
executor                   string             yes   inline (Tune trial actor) | train (Ray Train) |
                                                    task (a prune stage of a train sweep)
workers                    int32              yes   data-parallel workers
mlflow_run_id              string             yes   MLflow run of this stage, if recorded
reused                     bool               no    outcome taken from an earlier run of the stage
nptm_version               string             yes   versions of the software that ran the stage
torch_version              string             yes
ray_version                string             yes
started_at                 timestamp[us,UTC]  yes   start of the stage
ended_at                   timestamp[us,UTC]  yes   end of the stage
========================== ================== ===== ===============================================

``epochs`` — one row per stage per epoch
----------------------------------------
========================== ================== ===== ===============================================
column                     type               null  meaning
========================== ================== ===== ===============================================
schema_version             int16              no    version of this schema (1)
sweep                      string             no    sweep name
trial_id                   string             no    stage id (joins trials.trial_id)
stage_kind                 string             no    pretrain | prune | retrain
epoch                      int32              no    epoch index as reported by the training loop
lr                         double             yes   learning rate used in the epoch
train_loss, train_acc      double             yes   training loss / accuracy
val_loss, val_acc          double             yes   validation loss / accuracy (if a split exists)
test_loss, test_acc        double             yes   test loss / accuracy after the epoch
wall_s                     double             yes   wall time of the epoch
samples                    int64              yes   training samples seen in the epoch
========================== ================== ===== ===============================================

`validate_row(table, row)` turns a dict into a row of either table: unknown keys and missing
required columns are errors naming the column; values are type-checked and normalised
(``overrides`` may be given as a dict; timestamps as aware datetimes or ISO-8601 strings).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1

TableName = Literal["trials", "epochs"]
STAGE_KINDS = ("pretrain", "prune", "retrain")
STATUSES = ("ok", "diverged", "failed", "skipped")
# What pruning did to the network, as every trial row of its lineage carries it.
PRUNE_OUTCOME_COLUMNS = (
    "achieved_sparsity",
    "params",
    "macs",
    "nonzero_params",
    "base_params",
    "base_macs",
    "params_reduction",
    "macs_reduction",
    "emptied_layers",
    "acc_before_prune",
    "acc_after_prune",
)
TIMESTAMP = pa.timestamp("us", tz="UTC")


class SchemaError(ValueError):
    """A row that does not fit its table's schema."""


def _f(name: str, typ: pa.DataType, nullable: bool = True) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


_STR, _F64, _I32, _I64 = pa.string(), pa.float64(), pa.int32(), pa.int64()

TRIALS_SCHEMA = pa.schema(
    [
        _f("schema_version", pa.int16(), False),
        _f("sweep", _STR, False),
        _f("trial_id", _STR, False),
        _f("stage_kind", _STR, False),
        _f("parent_ids", pa.list_(_STR), False),
        _f("round", _I32, False),
        _f("dataset", _STR, False),
        _f("model", _STR, False),
        _f("pruner", _STR),
        _f("structured", pa.bool_()),
        _f("ratio", _F64),
        _f("preset", _STR),
        _f("pruner_options", _STR),
        _f("schedule", _STR),
        _f("budget_epochs", _I32),
        _f("overrides", _STR),
        _f("lr_override", _F64),
        _f("val_fraction", _F64),
        _f("precision", _STR),
        _f("seed", _I64, False),
        _f("achieved_sparsity", _F64),
        _f("params", _I64),
        _f("macs", _I64),
        _f("nonzero_params", _I64),
        _f("base_params", _I64),
        _f("base_macs", _I64),
        _f("params_reduction", _F64),
        _f("macs_reduction", _F64),
        _f("emptied_layers", _I32),
        _f("acc_before_prune", _F64),
        _f("acc_after_prune", _F64),
        _f("test_acc", _F64),
        _f("test_loss", _F64),
        _f("best_val_epoch", _I32),
        _f("test_acc_at_best_val", _F64),
        _f("best_test_acc_over_epochs", _F64),
        _f("epochs_run", _I32),
        _f("wall_seconds", _F64),
        _f("device_hours", _F64),
        _f("status", _STR, False),
        _f("error", _STR),
        _f("node", _STR),
        _f("executor", _STR),
        _f("workers", _I32),
        _f("mlflow_run_id", _STR),
        _f("reused", pa.bool_(), False),
        _f("nptm_version", _STR),
        _f("torch_version", _STR),
        _f("ray_version", _STR),
        _f("started_at", TIMESTAMP),
        _f("ended_at", TIMESTAMP),
    ],
    metadata={"nptm.table": "trials", "nptm.schema_version": str(SCHEMA_VERSION)},
)

EPOCHS_SCHEMA = pa.schema(
    [
        _f("schema_version", pa.int16(), False),
        _f("sweep", _STR, False),
        _f("trial_id", _STR, False),
        _f("stage_kind", _STR, False),
        _f("epoch", _I32, False),
        _f("lr", _F64),
        _f("train_loss", _F64),
        _f("train_acc", _F64),
        _f("val_loss", _F64),
        _f("val_acc", _F64),
        _f("test_loss", _F64),
        _f("test_acc", _F64),
        _f("wall_s", _F64),
        _f("samples", _I64),
    ],
    metadata={"nptm.table": "epochs", "nptm.schema_version": str(SCHEMA_VERSION)},
)

SCHEMAS: dict[str, pa.Schema] = {"trials": TRIALS_SCHEMA, "epochs": EPOCHS_SCHEMA}

# Columns holding a fraction in [0, 1]; a value outside is almost surely a percentage.
_FRACTION_COLUMNS = frozenset(
    {
        "acc_before_prune",
        "acc_after_prune",
        "test_acc",
        "test_acc_at_best_val",
        "best_test_acc_over_epochs",
        "train_acc",
        "val_acc",
        "achieved_sparsity",
    }
)
_ENUMS: dict[str, tuple[str, ...]] = {"stage_kind": STAGE_KINDS, "status": STATUSES}
_INT_RANGES = {pa.int16(): 2**15, pa.int32(): 2**31, pa.int64(): 2**63}


def empty_table(table: TableName) -> pa.Table:
    return SCHEMAS[table].empty_table()


def validate_row(table: TableName, row: Mapping[str, Any]) -> dict[str, Any]:
    """Check `row` against `table`'s schema and return it normalised, with every column.

    ``schema_version`` defaults to the current version; any other missing column becomes null
    if it is nullable and is an error otherwise.
    """
    if table not in SCHEMAS:
        raise SchemaError(f"unknown table {table!r}; known: {sorted(SCHEMAS)}")
    schema = SCHEMAS[table]
    unknown = [k for k in row if schema.get_field_index(k) < 0]
    if unknown:
        raise SchemaError(
            f"{table} row: unknown column {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more: {unknown[1:]})" if len(unknown) > 1 else "")
        )
    out: dict[str, Any] = {}
    for field in schema:
        name = field.name
        value = row.get(name)
        if name == "schema_version" and value is None:
            value = SCHEMA_VERSION
        if _is_null(value) or (_is_nan(value) and not pa.types.is_floating(field.type)):
            # NaN outside a float column can only mean "missing" (pandas' null for ints).
            if not field.nullable:
                what = "missing" if name not in row else "null"
                raise SchemaError(f"{table} row: column {name!r} is required but {what}")
            out[name] = None
            continue
        out[name] = _convert(table, name, field.type, value)
    if out["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(
            f"{table} row: schema_version {out['schema_version']} is not {SCHEMA_VERSION}"
        )
    return out


def rows_to_table(table: TableName, rows: list[Mapping[str, Any]]) -> pa.Table:
    """Validate `rows` and build an Arrow table with exactly the schema."""
    valid = [validate_row(table, r) for r in rows]
    return pa.Table.from_pylist(valid, schema=SCHEMAS[table])


def _is_null(value: Any) -> bool:
    if value is None:
        return True
    # pandas.NA / NaT arrive when rows come from a DataFrame.
    return type(value).__name__ in ("NAType", "NaTType")


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _bad(table: str, name: str, expected: str, value: Any) -> SchemaError:
    return SchemaError(
        f"{table} row: column {name!r} expects {expected}, got {type(value).__name__} {value!r}"
    )


def _convert(table: str, name: str, typ: pa.DataType, value: Any) -> Any:
    if pa.types.is_integer(typ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # int columns come back as float from pandas when null
            else:
                raise _bad(table, name, "an integer", value)
        value = int(value)
        limit = _INT_RANGES[typ]
        if not -limit <= value < limit:
            raise _bad(table, name, f"an integer that fits {typ}", value)
        return value
    if pa.types.is_floating(typ):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _bad(table, name, "a number", value)
        value = float(value)
        if name in _FRACTION_COLUMNS and not math.isnan(value) and not 0.0 <= value <= 1.0:
            raise SchemaError(
                f"{table} row: column {name!r} is a fraction in [0, 1], got {value!r} "
                "(percentages must be divided by 100)"
            )
        return value
    if pa.types.is_boolean(typ):
        if isinstance(value, np.bool_):
            value = bool(value)
        if not isinstance(value, bool):
            raise _bad(table, name, "a bool", value)
        return value
    if pa.types.is_list(typ):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise _bad(table, name, "a list of strings", value)
        items = list(value)
        if not all(isinstance(v, str) for v in items):
            raise _bad(table, name, "a list of strings", value)
        return items
    if pa.types.is_timestamp(typ):
        return _to_utc(table, name, value)
    # string
    if name == "overrides":
        return _overrides_json(table, value)
    if not isinstance(value, str):
        raise _bad(table, name, "a string", value)
    if name in _ENUMS and value not in _ENUMS[name]:
        raise SchemaError(
            f"{table} row: column {name!r} must be one of {list(_ENUMS[name])}, got {value!r}"
        )
    return value


def _overrides_json(table: str, value: Any) -> str:
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise _bad(table, "overrides", "a JSON object", value) from err
    elif isinstance(value, Mapping):
        parsed = dict(value)
    else:
        raise _bad(table, "overrides", "a JSON object (str or dict)", value)
    if not isinstance(parsed, dict):
        raise _bad(table, "overrides", "a JSON object", value)
    return json.dumps(parsed, sort_keys=True, separators=(",", ":"))


def _to_utc(table: str, name: str, value: Any) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as err:
            raise _bad(table, name, "an ISO-8601 timestamp", value) from err
    if not isinstance(value, datetime):
        raise _bad(table, name, "a timezone-aware datetime", value)
    if value.tzinfo is None or value.utcoffset() is None:
        raise SchemaError(f"{table} row: column {name!r} needs a timezone, got naive {value!r}")
    if hasattr(value, "to_pydatetime"):  # pandas.Timestamp; drops sub-microsecond digits
        value = value.to_pydatetime(warn=False)
    return value.astimezone(UTC)
