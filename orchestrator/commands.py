"""Handlers of the `nptm` subcommands: parse-level arguments in, exit status out."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from nptm.orchestrator.errors import EXIT_FAILED, EXIT_OK, UsageError
from nptm.trainables.layout import EPOCHS_TABLE, STAGES_TABLE, Layout, check_sweep_name
from nptm.trainables.redact import redact_uri

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
    from nptm.orchestrator.preflight import validate_data

    grid, plan = _load_plan(args)
    notes = validate_data(grid, plan)  # refuses a data root given here that lacks the data
    print(f"{args.grid}: ok ({plan.summary()['trials']} trials)")
    for note in notes:
        print(f"note: {note}; `nptm sweep` refuses to start without one", file=sys.stderr)
    return EXIT_OK


def plan(args: argparse.Namespace) -> int:
    gpus, per_gpu = getattr(args, "gpus", None), getattr(args, "stages_per_gpu", None)
    if per_gpu is not None and gpus is None:
        raise UsageError(f"--stages-per-gpu {per_gpu} needs --gpus N")
    _, the_plan = _load_plan(args)
    power = _power(args, the_plan) if getattr(args, "power", False) else None  # not on sweep
    wall = None
    if gpus is not None:  # the DAG searcher's own order, replayed (imports Ray Tune)
        from nptm.orchestrator.makespan import forecast

        wall = forecast(the_plan, gpus, per_gpu)
    if args.json:
        summary = the_plan.summary()
        if power is not None:
            summary["power"] = power[0].to_dict(orient="records")
        if wall is not None:
            summary["forecast"] = wall
        print_json(summary)
    else:
        from nptm.orchestrator.render import render_plan

        print(render_plan(the_plan))
        if wall is not None:
            from nptm.orchestrator.makespan import describe_forecast

            print(describe_forecast(wall))
        if power is not None:
            print(f"\n{power[1]}")
    return EXIT_OK


def _power(args: argparse.Namespace, the_plan):
    """`nptm plan --power`: the confirmatory tests' power table and its text."""
    from nptm.results import power

    if not 0 <= args.correlation <= 1:
        raise UsageError(f"--correlation must be in [0, 1], got {args.correlation:g}")
    settings = power.PowerSettings(
        effect=args.effect,
        sd=args.sd,
        correlation=args.correlation,
        power=args.target_power,
        alpha=args.alpha,
    )
    design = power.plan_design(the_plan)
    if args.from_sweep:
        from nptm.results.api import load_sweep

        try:
            stages = load_sweep(args.storage, args.from_sweep).stages
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(str(err)) from err
        sds = power.observed_sds(stages, design)
        source = (
            f"observed over the seeds of sweep {args.from_sweep!r} under {args.storage!r} "
            "(an sd from few seeds is itself uncertain)"
        )
    else:
        sds = power.modelled_sds(design, settings)
        source = (
            f"sd * sqrt(2 * (rho + (1 - rho) / cells)) with a run's seed sd {settings.sd:g} "
            f"points and rho = {settings.correlation:g} (--sd, --correlation): retraining's "
            "noise only, where random masks drawn per seed (seeds.random_masks: per_seed) add "
            "their draws to claim 2's sd (--from-sweep measures them)"
        )
    table = power.power_table(design, sds, settings)
    text = power.render_power(table, settings, source)
    if not args.from_sweep and settings.correlation < 1 and len(table):
        text += "\n" + power.worst_case(settings, len(table), int(table["seeds"].min()))
    return table, text


def sweep(args: argparse.Namespace) -> int:
    if args.dry_run:
        return plan(args)
    import signal

    from nptm.orchestrator.errors import Interrupted
    from nptm.orchestrator.signals import RaiseOnStopSignals

    # Before the slow imports: SIGINT / SIGTERM at any moment end the command with 128 + N and
    # a message (inside run_sweep, its orderly stop takes over).
    ran: list[str] = []  # the sweep's name, once run_sweep returned
    with RaiseOnStopSignals() as stop:
        try:
            return _sweep(args, stop, ran)
        except Interrupted as err:
            signum = err.signum
        except KeyboardInterrupt as err:  # run_sweep's, for a stop before its first stage
            cause = err.__cause__
            signum = cause.signum if isinstance(cause, Interrupted) else signal.SIGINT
        except SystemExit as err:  # Ray's SIGTERM handler (sys.exit(15)), set by ray.init
            if err.code != signal.SIGTERM:
                raise
            signum = signal.SIGTERM
    name = signal.Signals(signum).name
    if ran:
        print(
            f"sweep {ran[0]} INTERRUPTED by {name} after its stages ran: every stage is kept; "
            f"`nptm report {ran[0]}` writes its report",
            file=sys.stderr,
        )
    else:
        print(
            f"sweep {args.grid} INTERRUPTED by {name}: rerun the same command to resume "
            "(finished stages are kept)",
            file=sys.stderr,
        )
    return 128 + signum  # the shell's convention: 130 SIGINT, 143 SIGTERM


def _sweep(args: argparse.Namespace, stop, ran: list[str]) -> int:
    from nptm.orchestrator.signals import ray_sigterm_handler_off

    grid, the_plan = _load_plan(args)
    # From here a signal is noted, not raised in the middle of ray.init; the sweep's orderly
    # stop acts on it (signals.RaiseOnStopSignals.deferring).
    with stop.deferring(), ray_sigterm_handler_off():
        summary = _run(args, grid, the_plan)
    stop.install()  # at the OS level too (Ray's C++ core sets a handler of its own)
    ran.append(grid.name)
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


def _run(args: argparse.Namespace, grid, the_plan):
    """The sweep, or with --until-conclusive its rounds of added seeds
    (nptm.orchestrator.adaptive); its last `SweepSummary`."""
    from nptm.orchestrator.sweep import SweepOptions, run_sweep

    options = SweepOptions(
        storage=args.storage,
        address=args.address,
        mlflow_uri=args.mlflow_uri,
        data_root=args.data_root,
        log_models=args.log_models,
        max_retries=args.max_retries,
        min_free_gb=args.min_free_gb,
    )
    if not args.until_conclusive:
        if args.max_seeds is not None or args.seeds_per_look is not None:
            raise UsageError("--max-seeds and --seeds-per-look need --until-conclusive")
        return run_sweep(the_plan, options, on_start=_print_banner)
    from nptm.orchestrator.adaptive import AdaptiveOptions, run_until_conclusive

    adaptive = AdaptiveOptions(args.max_seeds, args.seeds_per_look or 1, args.confirm_large)
    return run_until_conclusive(grid, the_plan, options, adaptive, on_start=_print_banner)


def _log_report(summary, store, report_dir) -> None:
    """The report's files and the headline metrics on the sweep's MLflow run."""
    if summary.mlflow_degraded or not summary.mlflow_uri or not summary.mlflow_sweep_run_id:
        return
    from nptm.results.mlflow_rows import headline_metrics
    from nptm.results.tracking import MlflowRecorder

    recorder = MlflowRecorder(summary.mlflow_uri, summary.sweep)
    recorder.log_sweep_artifacts(report_dir, "report")
    recorder.log_sweep_metrics(headline_metrics(store.read_stages()))


def _report_dir(args: argparse.Namespace, sweep_name: str) -> str:
    """The local directory a report is drawn in: the sweep's report directory on local
    storage, else (or with `--out`, which may hold anything else) a fresh temporary directory,
    copied into storage (and `--out`) after."""
    layout = Layout(args.storage)
    if layout.local and not getattr(args, "out", None):
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
    out = getattr(args, "out", None)
    if out:  # the report's own files: nothing else of `--out` reaches storage
        report = _copy_report(report, local, out)
    return report


def _copy_report(report, local: str, out: str):
    """Copy the report drawn in `local` into `out` (its other files stay); the same Report
    with its paths in `out`."""
    import dataclasses
    import shutil
    from pathlib import Path

    shutil.copytree(local, out, dirs_exist_ok=True)

    def moved(path: Path) -> Path:
        return Path(out) / Path(path).relative_to(local)

    return dataclasses.replace(
        report,
        markdown_path=moved(report.markdown_path),
        figures=[moved(p) for p in report.figures],
        latex=[moved(p) for p in report.latex],
    )


def _report_location(args: argparse.Namespace, sweep_name: str) -> str:
    layout = Layout(args.storage)
    if layout.local:
        where = f"{layout.report_dir(sweep_name)}/report.md"
    else:
        where = layout.location("sweeps", sweep_name, "report", "report.md")
    out = getattr(args, "out", None)
    return where + (f" (local copy: {out}/report.md)" if out else "")


def _print_banner(start) -> None:
    from nptm.orchestrator.banner import banner

    print(banner(start), flush=True)


def _print_summary(summary, storage: str) -> None:
    nothing = "nothing finished" if summary.interrupted is not None else "nothing to do"
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items())) or nothing
    print(
        f"sweep {summary.sweep}: {counts}; executed {summary.executed}, reused {summary.reused} "
        f"in {summary.wall_seconds:.1f}s"
    )
    from nptm.orchestrator.failure_guard import failure_lines

    for line in failure_lines(summary, Layout(storage)):  # one per error, however many stages
        print(line, file=sys.stderr)
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
    if summary.grafana_url:
        print(f"Grafana: {summary.grafana_url}")
    if summary.mlflow_uri:
        from nptm.orchestrator.banner import MlflowLinks

        uri = redact_uri(summary.mlflow_uri)  # shown: never a password
        mlflow = MlflowLinks(uri, summary.mlflow_public, summary.mlflow_experiment_id)
        if mlflow.command:
            print(f"MLflow UI: {mlflow.command}, then {mlflow.runs_url or 'http://127.0.0.1:5000'}")
        else:
            print(f"MLflow: {mlflow.runs_url or mlflow.ui}")
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
    from nptm.trainables.recipe import MAX_EPOCHS
    from nptm.trainables.schedule_curves import per_epoch, plot_curves, schedule_curves

    if args.budget > MAX_EPOCHS:  # its curves are arrays of budget x steps
        raise UsageError(
            f"--budget: {args.budget} is more than the {MAX_EPOCHS:,} epochs one run may train"
        )
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
    from nptm.results.status import skipped_lines

    store = _sweep_store(args)
    result = _write_report(
        args,
        store,
        margin=args.equivalence_margin / 100,  # points -> accuracy
        latex=args.latex,
    )
    print(result.headline)
    print(f"\nreport: {_report_location(args, args.sweep)}")
    if result.latex:
        print(f"LaTeX tables: {', '.join(p.name for p in result.latex)}")
    # Damaged or foreign files the report left out (nptm.results.store: SweepStore.skipped).
    skipped = skipped_lines([d.to_dict() for d in store.skipped])
    if skipped:
        print("\n".join(skipped))
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
            time.sleep(min(args.watch, 86_400.0))  # --watch 1e300 is "rarely", not an error
    except KeyboardInterrupt:  # Ctrl-C ends --watch; the sweep itself goes on
        return EXIT_OK


def best(args: argparse.Namespace) -> int:
    from nptm.results.best import best_runs, parse_where, render_best

    by = [c.strip() for c in args.by.split(",") if c.strip()]
    if args.sweep is not None:
        _check_sweep_name(args.sweep)
    try:
        where = [parse_where(text) for text in args.where]  # before opening any store
        uri = _tracking_uri(args, existing=True)  # a query never creates an empty store
        query = {"metric": args.metric, "mode": args.mode, "agg": args.agg}
        df = best_runs(uri, sweep=args.sweep, by=by, where=where, top=args.top, **query)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.json:
        print(df.to_json(orient="records", indent=2))
    else:
        print(render_best(df, args.metric, args.mode))
    return EXIT_OK


def sync_mlflow(args: argparse.Namespace) -> int:
    from nptm.results.tracking import sync_mlflow

    store = _sweep_store(args)  # refuse a bad or unknown sweep before creating any store
    uri = _tracking_uri(args)
    result = sync_mlflow(store, uri)
    print(
        f"sync-mlflow {args.sweep} -> {redact_uri(uri)}: created {result.created}, "
        f"updated {result.updated}, "
        f"unchanged {result.unchanged}"
    )
    return EXIT_OK


def _check_sweep_name(name: str) -> None:
    try:
        check_sweep_name(name)
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
