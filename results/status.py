"""`nptm status`: stage counts by kind and status, and the failed stages with their errors."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from results.schema import AXIS_COLUMNS, STAGE_KINDS, STATUSES
from results.store import SweepStore
from results.tables import text_table
from trainables.stage import StageStatus

_FAILED = (StageStatus.FAILED, StageStatus.DIVERGED)


def _plain(value: Any) -> Any:
    """JSON-friendly scalar (numpy/pandas values, NaN/NA -> None, timestamps -> ISO)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def sweep_status(store: SweepStore) -> dict[str, Any]:
    """Counts of stored stages by stage_kind × status, and every failed or diverged stage.

    Returns ``{"sweep", "stages", "counts": {kind: {status: n}}, "by_status": {status: n},
    "failed": [{"stage_id", "stage_kind", "status", "error", ...}]}`` (JSON-serialisable).
    """
    stages = store.read_stages()
    counts = {kind: dict.fromkeys(STATUSES, 0) for kind in STAGE_KINDS}
    for (kind, status), n in stages.groupby(["stage_kind", "status"]).size().items():
        counts.setdefault(kind, dict.fromkeys(STATUSES, 0))[status] = int(n)
    by_status = {s: sum(c.get(s, 0) for c in counts.values()) for s in STATUSES}
    bad = stages[stages["status"].isin(_FAILED)].sort_values(
        ["stage_kind", "stage_id"], kind="stable"
    )
    failed = [
        {
            "stage_id": r["stage_id"],
            "stage_kind": r["stage_kind"],
            "status": r["status"],
            "error": _plain(r["error"]),
            **{k: _plain(r[k]) for k in AXIS_COLUMNS},
            "node": _plain(r["node"]),
            "ended_at": _plain(r["ended_at"]),
        }
        for _, r in bad.iterrows()
    ]
    return {
        "sweep": store.sweep,
        "stages": len(stages),
        "counts": counts,
        "by_status": by_status,
        "failed": failed,
    }


def render_status(d: dict[str, Any], *, max_failures: int = 20) -> str:
    """Plain-text rendering of `sweep_status`' result."""
    statuses = list(STATUSES)
    rows = [
        [kind, *(c.get(s, 0) for s in statuses), sum(c.values())] for kind, c in d["counts"].items()
    ]
    rows.append(["all", *(d["by_status"].get(s, 0) for s in statuses), d["stages"]])
    lines = [f"sweep {d['sweep']}: {d['stages']} stages stored", ""]
    lines.append(text_table(["stage", *statuses, "total"], rows))
    failed = d["failed"]
    if failed:
        lines += ["", f"failed or diverged stages ({len(failed)}):"]
        for f in failed[:max_failures]:
            what = "/".join(
                str(f[k]) for k in ("model", "pruner", "schedule") if f.get(k) is not None
            )
            error = (f["error"] or "(no error text)").strip().splitlines()
            first = error[-1] if error else ""  # the last line of a traceback names the error
            lines.append(f"  {f['stage_id']}  {f['stage_kind']:<8} {f['status']:<8} {what}")
            lines.append(f"      {first[:300]}")
        if len(failed) > max_failures:
            lines.append(f"  ... and {len(failed) - max_failures} more (see --json)")
    return "\n".join(lines)
