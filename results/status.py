"""`nptm status`: stage counts by kind and status, and the failed stages with their errors; with
the sweep's run record (nptm.results.run_record), done/planned per kind, the stages running now, the
driver's state, its rate in epochs/s and an ETA."""

from __future__ import annotations

import math
import time
from typing import Any

import pandas as pd

from nptm.results.run_record import DriverState, PlannedStage, Progress, RunRecord
from nptm.results.schema import AXIS_COLUMNS, STAGE_KINDS, STATUSES
from nptm.results.store import SweepStore
from nptm.results.tables import text_table
from nptm.trainables.stage import StageStatus

_FAILED = (StageStatus.FAILED, StageStatus.DIVERGED)
# progress.json is rewritten every few seconds while the driver runs: a minute of silence
# means it was killed or lost its storage.
STALE_AFTER_S = 60.0


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


def sweep_status(store: SweepStore, *, now: float | None = None) -> dict[str, Any]:
    """Counts of stored stages by stage_kind × status, and every failed or diverged stage;
    with the sweep's run record (nptm.results.run_record), its progress against the saved plan.

    Returns ``{"sweep", "stages", "counts": {kind: {status: n}}, "by_status": {status: n},
    "failed": [{"stage_id", "stage_kind", "status", "error", ...}], "plan": ... | None,
    "skipped": [{"file", "reason", "moved_to", "stage_id"}]}`` (JSON-serialisable); ``plan`` is
    `plan_progress`' result, None for a sweep without a saved plan (written by older versions)
    or whose plan.json was refused; ``skipped`` names every file the reads refused (a damaged
    or foreign per-stage file, snapshot, plan.json or progress.json: nptm.trainables.storage.
    Damaged), whose rows or figures are missing from the rest.
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
    record = RunRecord(store.layout, store.sweep)
    planned = record.read_plan()
    progress = None if planned is None else record.read_progress()
    return {
        "sweep": store.sweep,
        "stages": len(stages),
        "counts": counts,
        "by_status": by_status,
        "failed": failed,
        "plan": None
        if planned is None
        else plan_progress(
            planned,
            dict(zip(stages["stage_id"], stages["status"], strict=True)),
            progress,
            time.time() if now is None else now,
        ),
        "skipped": [d.to_dict() for d in (*store.skipped, *record.damaged)],
    }


def plan_progress(
    planned: dict[str, PlannedStage],
    stored: dict[str, str],
    progress: Progress | None,
    now: float,
) -> dict[str, Any]:
    """A sweep's progress against its plan.

    `stored`: stage id -> status of the stages in the Parquet stages table (finished, in any
    status). done = stored ∩ planned, less the stages running now. The ETA divides the epochs
    still to train (planned epochs of unfinished stages, less the epochs the running ones have
    finished) by the driver's rate so far (progress.json: epochs finished since it started).
    """
    # A stage running again (a rerun retries failed stages) is not done whatever it stored.
    running_now = {} if progress is None else progress.running
    finished = {sid: st for sid, st in stored.items() if sid in planned and sid not in running_now}
    kinds = [k for k in STAGE_KINDS if any(s.kind == k for s in planned.values())]
    kinds += sorted({s.kind for s in planned.values()} - set(kinds))
    by_kind = {k: {"planned": 0, "done": 0, **dict.fromkeys(STATUSES, 0)} for k in kinds}
    for sid, stage in planned.items():
        row = by_kind[stage.kind]
        row["planned"] += 1
        if sid in finished:
            row["done"] += 1
            row[finished[sid]] = row.get(finished[sid], 0) + 1
    running = [
        {"stage_id": sid, "kind": r.kind, "label": r.label, "epoch": r.epoch,
         "epochs": r.epochs, "started_at": r.started_at}
        for sid, r in sorted(running_now.items(), key=lambda kv: (kv[1].started_at, kv[0]))
    ]  # fmt: skip
    remaining = sum(s.epochs for sid, s in planned.items() if sid not in finished)
    remaining -= sum(min(r.epoch, r.epochs) for sid, r in running_now.items() if sid in planned)
    out: dict[str, Any] = {
        "planned": len(planned),
        "done": sum(row["done"] for row in by_kind.values()),
        "by_kind": by_kind,
        "running": running,
        "remaining_epochs": remaining,
        "driver": None,
        "epochs_per_s": None,
        "eta_s": None,
    }
    if progress is None:
        return out
    elapsed = progress.updated_at - progress.started_at
    rate = progress.epochs_done / elapsed if elapsed > 0 and progress.epochs_done > 0 else None
    silent = max(0.0, now - progress.updated_at)
    live = progress.state == DriverState.RUNNING
    out["driver"] = {
        "state": progress.state.value,
        "pid": progress.pid,
        "host": progress.host,
        "started_at": progress.started_at,
        "updated_at": progress.updated_at,
        "seconds_since_update": silent,
        "may_be_gone": live and silent > STALE_AFTER_S,
    }
    out["epochs_per_s"] = rate
    if live and rate and remaining > 0:
        out["eta_s"] = remaining / rate
    return out


def render_status(d: dict[str, Any], *, max_failures: int = 20, max_running: int = 20) -> str:
    """Plain-text rendering of `sweep_status`' result."""
    lines = _stored_lines(d) if d.get("plan") is None else _plan_lines(d["sweep"], d["plan"])
    lines += _running_lines(d["plan"], max_running) if d.get("plan") else []
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
    lines += skipped_lines(d.get("skipped", []))
    return "\n".join(lines)


def skipped_lines(skipped: list[dict[str, Any]]) -> list[str]:
    """One line per file a read refused (`sweep_status`' ``skipped``), and what becomes of it."""
    if not skipped:
        return []
    lines = ["", f"skipped {len(skipped)} damaged or foreign file(s):"]
    for s in skipped:
        aside = s.get("moved_to")
        where = f" (set aside as {aside.rsplit('/', 1)[-1]})" if aside else ""
        lines.append(f"  skipped {s['file']}: {s['reason']}{where}")
    lines.append(
        "  the next `nptm sweep` of this grid records their stages again (from the outcomes, "
        "or by running them) and writes the run record anew"
    )
    return lines


def is_running(d: dict[str, Any]) -> bool:
    """Whether `sweep_status`' result shows a driver at work (what `--watch` waits out)."""
    driver = (d.get("plan") or {}).get("driver")
    return bool(driver and driver["state"] == DriverState.RUNNING and not driver["may_be_gone"])


def _stored_lines(d: dict[str, Any]) -> list[str]:
    """Counts of the stored stages (a sweep without a saved plan)."""
    statuses = list(STATUSES)
    rows = [
        [kind, *(c.get(s, 0) for s in statuses), sum(c.values())] for kind, c in d["counts"].items()
    ]
    rows.append(["all", *(d["by_status"].get(s, 0) for s in statuses), d["stages"]])
    lines = [f"sweep {d['sweep']}: {d['stages']} stages stored", ""]
    lines.append(text_table(["stage", *statuses, "total"], rows))
    return lines


def _plan_lines(sweep: str, p: dict[str, Any]) -> list[str]:
    """Done of planned per kind, and the driver's state."""
    statuses = list(STATUSES)
    rows = [
        [kind, f"{r['done']}/{r['planned']}", *(r.get(s, 0) for s in statuses)]
        for kind, r in p["by_kind"].items()
    ]
    totals = [sum(r.get(s, 0) for r in p["by_kind"].values()) for s in statuses]
    rows.append(["all", f"{p['done']}/{p['planned']}", *totals])
    share = f" ({100 * p['done'] / p['planned']:.1f}%)" if p["planned"] else ""
    lines = [f"sweep {sweep}: {p['done']} of {p['planned']} planned stages done{share}"]
    driver = p["driver"]
    if driver is None:
        lines.append("driver: no progress recorded")
    else:
        ago = _duration(driver["seconds_since_update"])
        lines.append(
            f"driver: {driver['state']} (pid {driver['pid']} on {driver['host']}), "
            f"last heard from {ago} ago"
        )
        if driver["may_be_gone"]:
            lines.append(
                f"WARNING: the driver says it is running but has been silent for {ago} "
                f"(> {STALE_AFTER_S:g} s): it may be gone; rerunning the same `nptm sweep` "
                "resumes the sweep"
            )
    lines += ["", text_table(["stage", "done/planned", *statuses], rows, total=True)]
    return lines


def _running_lines(p: dict[str, Any], max_running: int) -> list[str]:
    """The stages running now, the rate and the ETA."""
    lines = [""]
    running = p["running"]
    if running:
        lines.append(f"running ({len(running)}):")
        rows = [[r["label"], f"epoch {r['epoch']}/{r['epochs']}"] for r in running[:max_running]]
        lines += ["  " + line for line in text_table(["stage", "progress"], rows).splitlines()]
        if len(running) > max_running:
            lines.append(f"  ... and {len(running) - max_running} more (see --json)")
    rate, eta = p["epochs_per_s"], p["eta_s"]
    speed = "rate: unknown yet" if rate is None else f"rate: {rate:.3g} epochs/s"
    todo = f"{p['remaining_epochs']} planned epochs to go"
    lines.append(f"{speed}; {todo}" + ("" if eta is None else f"; ETA {_duration(eta)}"))
    return lines


def _duration(seconds: float) -> str:
    """1h02m / 3m05s / 12s."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
