"""Handlers of the `nptm` subcommands: parse-level arguments in, exit status out."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from nptm.orchestrator.errors import EXIT_FAILED, EXIT_OK, UsageError
from nptm.trainables.layout import EPOCHS_TABLE, STAGES_TABLE, Layout, check_name

__all__ = ["HANDLERS"]


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _load_plan(args: argparse.Namespace):
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import GridError, load_grid

    try:
        grid = load_grid(args.grid, args.overrides)
        return grid, build_plan(grid, confirm_large=getattr(args, "confirm_large", False))
    except GridError as err:
        raise UsageError(str(err)) from err


def validate(args: argparse.Namespace) -> int:
    _, plan = _load_plan(args)
    print(f"{args.grid}: ok ({plan.summary()['trials']} trials)")
    return EXIT_OK


def plan(args: argparse.Namespace) -> int:
    _, the_plan = _load_plan(args)
    if args.json:
        print_json(the_plan.summary())
    else:
        from nptm.orchestrator.render import render_plan

        print(render_plan(the_plan))
    return EXIT_OK


def sweep(args: argparse.Namespace) -> int:
    if args.dry_run:
        return plan(args)
    from nptm.orchestrator.sweep import SweepOptions, run_sweep

    grid, the_plan = _load_plan(args)
    summary = run_sweep(
        grid,
        the_plan,
        SweepOptions(
            storage=args.storage,
            address=args.address,
            mlflow_uri=args.mlflow_uri,
            data_root=args.data_root,
            log_models=args.log_models,
            max_retries=args.max_retries,
            min_free_gb=args.min_free_gb,
        ),
        on_start=_print_banner,
    )
    _print_summary(summary, args.storage)
    if summary.interrupted is not None:
        return 128 + summary.interrupted  # the shell's convention: 130 SIGINT, 143 SIGTERM
    if not args.no_report and summary.counts.get("ok"):
        from nptm.results.store import SweepStore

        store = SweepStore(args.storage, grid.name)
        report = _write_report(args, store)
        print(report.headline)
        print(f"\nreport: {_report_location(args, grid.name)}")
        _log_report(summary, store, report.markdown_path.parent)
    return EXIT_OK if summary.ok else EXIT_FAILED


def _log_report(summary, store, report_dir) -> None:
    """The report's files and the headline metrics on the sweep's MLflow parent run."""
    if summary.mlflow_degraded or not summary.mlflow_uri or not summary.mlflow_parent_run_id:
        return
    from nptm.results.mlflow_rows import headline_metrics
    from nptm.results.tracking import MlflowRecorder

    recorder = MlflowRecorder(summary.mlflow_uri, summary.sweep)
    recorder.log_sweep_artifacts(report_dir, "report")
    recorder.log_sweep_metrics(headline_metrics(store.read_stages()))


def _report_dir(args: argparse.Namespace, sweep_name: str) -> str:
    """The local directory a report is drawn in: `--out` if given, else the sweep's report
    directory on local storage, else a temporary directory (copied into storage after)."""
    out = getattr(args, "out", None)
    if out:
        return out
    layout = Layout(args.storage)
    if layout.local:
        return layout.report_dir(sweep_name)
    import atexit
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix=f"nptm-report-{sweep_name}-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # kept for the caller's use
    return tmp


def _write_report(args: argparse.Namespace, store, **options):
    """The sweep's report, in `<storage>/sweeps/<sweep>/report` whatever the storage (and in
    `--out` too, when given); returns the `nptm.results.report.Report` (its paths are local).
    `options`: `nptm.results.report.build_report`'s (margin, latex)."""
    from nptm.results.report import build_report
    from nptm.trainables.storage import replace_dir

    local = _report_dir(args, store.sweep)
    report = build_report(store, local, **options)
    replace_dir(local, store.fs, store.layout.report_dir(store.sweep))
    return report


def _report_location(args: argparse.Namespace, sweep_name: str) -> str:
    layout = Layout(args.storage)
    if layout.local:
        where = f"{layout.report_dir(sweep_name)}/report.md"
    else:
        where = layout.location("sweeps", sweep_name, "report", "report.md")
    out = getattr(args, "out", None)
    return where + (f" (local copy: {out}/report.md)" if out else "")


def _print_banner(start) -> None:
    """Where to watch the sweep, before its first stage (nptm.orchestrator.live.SweepStart)."""
    kinds = ", ".join(f"{n} {kind}" for kind, n in start.planned.items())
    lines = [f"sweep {start.sweep}: {sum(start.planned.values())} stages ({kinds}); "
             f"{start.to_run} to run"]  # fmt: skip
    if start.dashboard_url:
        state = "answers" if start.dashboard_answers else "not answering yet"
        where = "nptm's local Ray, up while the sweep runs" if start.dashboard_local else "cluster"
        lines.append(f"  Ray dashboard: {start.dashboard_url} ({where}; {state})")
        if start.token_auth:
            lines.append(
                f"    it asks for Ray's token: `ray get-auth-token` prints it "
                f"(read from {start.token_source})"
            )
    if start.mlflow_uri:
        down = " (unreachable: results go to Parquet only)" if start.mlflow_degraded else ""
        lines.append(f"  MLflow: {start.mlflow_uri}, experiment {start.experiment_name}{down}")
        if start.mlflow_command:
            lines.append(f"    UI: {start.mlflow_command}")
        if start.runs_url:
            lines.append(f"    runs: {start.runs_url}")
    lines.append(f"  results: {start.storage}")
    lines.append(f"  run record: {start.run_record} (`nptm status {start.sweep}`)")
    print("\n".join(lines), flush=True)


def _print_summary(summary, storage: str) -> None:
    nothing = "nothing finished" if summary.interrupted is not None else "nothing to do"
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items())) or nothing
    print(
        f"sweep {summary.sweep}: {counts}; executed {summary.executed}, reused {summary.reused} "
        f"in {summary.wall_seconds:.1f}s"
    )
    for sid, kind, error in summary.failures:
        print(f"  FAILED {kind} {sid}: {error}", file=sys.stderr)
    if summary.interrupted is not None:
        import signal

        not_run = summary.planned - summary.reused - summary.executed
        print(
            f"sweep {summary.sweep} INTERRUPTED by {signal.Signals(summary.interrupted).name}: "
            f"{not_run} of {summary.planned} stages did not run; rerun the same command to "
            "resume (finished stages are kept)",
            file=sys.stderr,
        )
    sweep_dir = Layout(storage).sweep_location(summary.sweep)
    print(f"results: {sweep_dir}/{{{STAGES_TABLE},{EPOCHS_TABLE}}}/*.parquet")
    if summary.dashboard_url:
        state = (
            "gone: nptm's local Ray stopped with the sweep"
            if summary.dashboard_local
            else "the cluster's, still up"
        )
        print(f"Ray dashboard ({state}): {summary.dashboard_url}")
    if summary.mlflow_uri:
        runs = (
            f"/#/experiments/{summary.mlflow_experiment_id}/runs"
            if summary.mlflow_experiment_id
            else ""
        )
        if summary.mlflow_uri.startswith("sqlite"):
            print(
                f"MLflow UI: mlflow ui --backend-store-uri {summary.mlflow_uri} --host 127.0.0.1 "
                f"--port 5000, then http://127.0.0.1:5000{runs}"
            )
        else:
            print(f"MLflow: {summary.mlflow_uri.rstrip('/')}{runs}")
    if summary.mlflow_degraded:
        print(
            "warning: MLflow was unreachable; everything is in Parquet. Fill MLflow later with "
            f"`nptm sync-mlflow {summary.sweep}`",
            file=sys.stderr,
        )


def inspect(args: argparse.Namespace) -> int:
    from nptm.orchestrator.render import render_inspect
    from nptm.trainables.catalog import IncompatibleError
    from nptm.trainables.inspect import inspect_model
    from nptm.trainables.plugins import PluginError, load_plugins

    if args.pruner is None and (args.ratio is not None or args.preset is not None):
        raise UsageError("--ratio/--preset need --pruner")
    try:
        load_plugins(args.plugin)
    except PluginError as err:
        raise UsageError(err.detail if err.index is None else f"--plugin: {err.detail}") from err
    try:
        result = inspect_model(
            args.dataset, args.model, pruner=args.pruner, ratio=args.ratio, preset=args.preset
        )
    except IncompatibleError as err:
        raise UsageError(str(err)) from err
    if args.json:
        print_json(result)
    else:
        print(render_inspect(result))
    return EXIT_OK


def schedules(args: argparse.Namespace) -> int:
    from nptm.orchestrator.render import render_curves
    from nptm.trainables.schedule_curves import per_epoch, plot_curves, schedule_curves

    try:
        result = schedule_curves(args.dataset, args.budget)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.plot:
        plot_curves(result, args.plot)
    if args.json:
        print_json(per_epoch(result))
    else:
        print(render_curves(result))
    return EXIT_OK


def _sweep_store(args: argparse.Namespace, *, planned: bool = False):
    """The sweep's store; refused when it has no results (`planned`: nor a saved plan)."""
    from nptm.results.run_record import PLAN_FILE, RunRecord
    from nptm.results.store import SweepStore

    try:
        store = SweepStore(args.storage, args.sweep)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if not store.stage_ids() and not (
        planned and RunRecord(store.layout, store.sweep).exists(PLAN_FILE)
    ):
        raise UsageError(f"no results for sweep {args.sweep!r} under {args.storage!r}")
    return store


def report(args: argparse.Namespace) -> int:
    result = _write_report(
        args,
        _sweep_store(args),
        margin=args.equivalence_margin / 100,  # points -> accuracy
        latex=args.latex,
    )
    print(result.headline)
    print(f"\nreport: {_report_location(args, args.sweep)}")
    if result.latex:
        print(f"LaTeX tables: {', '.join(p.name for p in result.latex)}")
    return EXIT_OK


def status(args: argparse.Namespace) -> int:
    from nptm.results.status import is_running, render_status, sweep_status

    store = _sweep_store(args, planned=True)  # a sweep that has only started has a plan
    clear = args.watch is not None and sys.stdout.isatty() and not args.json
    try:
        while True:
            result = sweep_status(store)
            if clear:
                print("\033[H\033[2J", end="")  # home, clear screen
            if args.json:
                print_json(result)
            else:
                print(render_status(result))
            if args.watch is None or not is_running(result):
                return EXIT_OK
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:  # Ctrl-C ends --watch; the sweep itself goes on
        return EXIT_OK


def best(args: argparse.Namespace) -> int:
    from nptm.results.best import best_runs, render_best

    by = [c.strip() for c in args.by.split(",") if c.strip()]
    if args.sweep is not None:
        _check_sweep_name(args.sweep)
    uri = _tracking_uri(args, existing=True)  # a query never creates an empty store
    try:
        df = best_runs(uri, sweep=args.sweep, metric=args.metric, by=by, top=args.top)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.json:
        print(df.to_json(orient="records", indent=2))
    else:
        print(render_best(df))
    return EXIT_OK


def sync_mlflow(args: argparse.Namespace) -> int:
    from nptm.results.tracking import sync_mlflow

    store = _sweep_store(args)  # refuse a bad or unknown sweep before creating any store
    uri = _tracking_uri(args)
    result = sync_mlflow(store, uri)
    print(
        f"sync-mlflow {args.sweep} -> {uri}: created {result.created}, updated {result.updated}, "
        f"unchanged {result.unchanged}"
    )
    return EXIT_OK


def _check_sweep_name(name: str) -> None:
    try:
        check_name("sweep", name)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _tracking_uri(args: argparse.Namespace, *, existing: bool = False) -> str:
    """The tracking URI to use; `existing`: refuse an embedded store that is not there yet
    (resolving the embedded default creates the storage root for sqlite to write into)."""
    from nptm.results.mlflow_uri import resolve_tracking_uri

    db = Layout(args.storage).mlflow_db
    if existing and not args.mlflow_uri and db is not None and not os.path.isfile(db):
        raise UsageError(f"no MLflow store at {db}; give --mlflow-uri")
    uri = resolve_tracking_uri(args.storage, args.mlflow_uri)
    if uri is None:
        raise UsageError(
            f"storage {args.storage!r} has no embedded MLflow store; give --mlflow-uri"
        )
    return uri


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "validate": validate,
    "plan": plan,
    "sweep": sweep,
    "inspect": inspect,
    "schedules": schedules,
    "report": report,
    "status": status,
    "best": best,
    "sync-mlflow": sync_mlflow,
}
