"""The `nptm` command line (the parser; each command's handler is in commands.py)."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence

from nptm.orchestrator.errors import EXIT_USAGE, Interrupted, UsageError
from nptm.orchestrator.signals import RaiseOnStopSignals
from nptm.trainables import __version__
from nptm.trainables.redact import (
    redact_text,
    redact_uri,
    storage_credentials_error,
    uri_credentials,
)

DEFAULT_STORAGE = "./nptm-runs"
MAX_RETRIES = 100  # --max-retries: Tune's -1 (retry forever) is not offered
MAX_GPUS, MAX_STAGES_PER_GPU = 100_000, 64  # nptm plan --gpus N --stages-per-gpu K

DESCRIPTION = """\
nptm runs neural-network pruning studies on a Ray cluster and reads out their answer.

A grid file names datasets, models, pruners with their ratios or presets, retraining
schedules (ft, lrw, wr, slr, clr, scratch), budgets and seeds. nptm expands it into a
deduplicated DAG of stages (pre-train -> prune -> retrain), runs them with Ray Tune (each
stage inline or as a Ray Train DDP worker group), keeps every stage in Parquet and MLflow,
and reports whether the retraining claims hold (schedules beat fine-tuning; random pruning
retrained well matches methodical pruning)."""

EPILOG = """\
a first session:
  nptm validate grid.yaml                   check the grid (exit 2 names the field at fault)
  nptm plan grid.yaml                       stages, epochs and GPU-hours before anything runs
  nptm sweep grid.yaml axes.seed=[0,1,2]    run it, here with a command-line override
  nptm status NAME --watch                  follow it (also: the Ray dashboard, the MLflow UI)
  nptm report NAME                          the claims' verdicts, tables and figures
  nptm best --sweep NAME                    the best settings, by MLflow

Exit status: 0 ok, 1 a sweep with failed stages, 2 a mistake in the input or environment
(nothing run), 128+N stopped by signal N (rerunning the same command resumes)."""

# A command-line override is KEY.PATH=VALUE; an option's value never looks like one (a path or
# URI holds '/' or ':' before any '=').
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*=")
GRID_COMMANDS = ("validate", "plan", "sweep")


def _grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", help="the grid file (YAML; search_spaces/*.yaml are shipped examples)")
    p.add_argument(
        "overrides", nargs="*", default=[], metavar="KEY.PATH=VALUE",
        help="change the grid without editing it, YAML-typed and checked like the file, e.g. "
        "axes.seed=[0,1,2,3,4] resources.gpus_per_worker=0.25 name=my-sweep; kept in the run "
        "record beside the grid file",
    )  # fmt: skip


def _storage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        default=os.environ.get("NPTM_STORAGE", DEFAULT_STORAGE),
        help="storage root: a local path or a URI every node can reach (s3://, gs://, ...); "
        "env NPTM_STORAGE (default %(default)s)",
    )


def _mlflow_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mlflow-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow tracking URI (env MLFLOW_TRACKING_URI); default: sqlite in the storage root",
    )


def _number_in(
    low: float, high: float, unit: str, *, low_closed: bool = False
) -> Callable[[str], float]:
    """An argparse type: a number between `low` and `high` (exclusive; `low` itself too with
    `low_closed`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (low <= value if low_closed else low < value) or not value < high:
            raise argparse.ArgumentTypeError(
                f"expected {unit} in {'[' if low_closed else '('}{low:g}, {high:g}), got {text!r}"
            )
        return value

    return parse


def _int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what} in [{low}, {high}], got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    # here, not at the top: pyarrow's import is slow, and `main` sets `nptm sweep`'s stop
    # handlers first
    from nptm.trainables.storage import DEFAULT_MIN_FREE_GB

    parser = argparse.ArgumentParser(
        prog="nptm",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nptm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "validate", help="check a grid file; exit 2 names the first mistake's field and value"
    )
    _grid_args(p)
    _plan_options(p)

    p = sub.add_parser("plan", help="expand a grid into trials, its stage DAG and GPU-hours")
    _grid_args(p)
    p.add_argument("--json", action="store_true", help="the plan's summary as JSON")
    p.add_argument(
        "--gpus", type=_int_in(1, MAX_GPUS, "GPUs"), metavar="N",
        help="forecast the sweep's wall time on N GPUs: its stages on their measured seconds "
        "per epoch, handed out as the sweep does (the longest remaining path first)",
    )  # fmt: skip
    p.add_argument(
        "--stages-per-gpu", type=_int_in(1, MAX_STAGES_PER_GPU, "stages per GPU"), metavar="K",
        help="with --gpus: stages sharing one GPU (default: as many as the grid's "
        "workers_per_trial x gpus_per_worker fit)",
    )  # fmt: skip
    _plan_options(p)
    _power_options(p)

    p = sub.add_parser("sweep", help="run a grid on Ray (a local Ray unless --address)")
    _grid_args(p)
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (env RAY_ADDRESS); default: start a local Ray",
    )
    _storage_arg(p)
    _mlflow_arg(p)
    p.add_argument(
        "--data-root",
        default=os.environ.get("NPTM_DATA"),
        help="dataset root on every node (env NPTM_DATA); overrides the grid's data.root",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (= nptm plan)")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    _plan_options(p)
    p.add_argument(
        "--log-models", action="store_true",
        help="log each retrained network as an MLflow model too",
    )  # fmt: skip
    p.add_argument(
        "--max-retries", type=_int_in(0, MAX_RETRIES, "retries"), default=2, metavar="N",
        help=f"retries of a stage whose trial failed, 0 to {MAX_RETRIES} (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--min-free-gb", type=_number_in(0, math.inf, "a size in GB", low_closed=True),
        default=DEFAULT_MIN_FREE_GB, metavar="GB",
        help="refuse to start with less free space on a local storage root (default %(default)g)",
    )  # fmt: skip
    p.add_argument(
        "--no-report", action="store_true", help="skip the report and its headline at the end"
    )
    _adaptive_options(p)

    p = sub.add_parser(
        "status", help="progress of a sweep against its plan: done, running, failures, ETA"
    )
    _sweep_arg(p)
    _storage_arg(p)
    p.add_argument("--json", action="store_true", help="the same as JSON")
    p.add_argument(
        "--watch", nargs="?", type=_number_in(0, math.inf, "seconds"), const=5.0, metavar="SECONDS",
        help="refresh every SECONDS (default 5) until the sweep's driver stops",
    )  # fmt: skip

    p = sub.add_parser("report", help="a sweep's answer: the claims' verdicts, tables and figures")
    _sweep_arg(p)
    _storage_arg(p)
    p.add_argument(
        "--out",
        metavar="DIR",
        help="also write a local copy here (the report always goes to "
        "<storage>/sweeps/<sweep>/report, local or object storage)",
    )
    p.add_argument("--latex", action="store_true", help="also write every table as a .tex file")
    p.add_argument(
        "--equivalence-margin", type=_number_in(0, 100, "accuracy points"), default=0.5,
        metavar="POINTS",
        help="claim 2's equivalence margin (TOST), in accuracy points (default %(default)g)",
    )  # fmt: skip

    p = sub.add_parser(
        "best", help="the best cells (mean over seeds) or runs by a metric, from MLflow",
        description="The best settings by a metric, from MLflow's runs of the final-round "
        "retraining stages that finished ok: by default each cell's mean over seeds (the "
        "report's headline cell: mean of --metric test_acc = its table's cell), with sd and n.",
    )  # fmt: skip
    p.add_argument("--sweep", help="only this sweep's runs (default: every sweep in the store)")
    _storage_arg(p)
    _mlflow_arg(p)
    p.add_argument("--metric", default="test_acc", help="rank by this metric (%(default)s)")
    p.add_argument(
        "--mode", choices=("min", "max"),
        help="min: lowest first, max: highest first; default: min for a metric whose name "
        "contains 'loss' or 'error', else max",
    )  # fmt: skip
    p.add_argument(
        "--agg", choices=("mean", "none"), default="mean",
        help="mean: rank cells (every axis but the seed) by their mean over seeds, with sd "
        "and n; none: rank single runs (default %(default)s: one lucky seed is not a setting)",
    )  # fmt: skip
    p.add_argument(
        "--where", action="append", default=[], metavar="KEY=VALUE",
        help="only these runs (repeatable; one key twice: either value): sweep, dataset, "
        "model, structure, pruner, target, ratio, preset, schedule, budget, seed",
    )  # fmt: skip
    p.add_argument(
        "--by", default="", metavar="COLUMNS",
        help="comma-separated shown columns (pruner, schedule, target, budget, dataset, model, "
        "structure, sweep; seed with --agg none): the best rows of each group",
    )  # fmt: skip
    p.add_argument(
        "--top", type=_int_in(1, 1_000_000, "rows"), default=5,
        help="how many rows, per group with --by (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="the rows as JSON")

    p = sub.add_parser("inspect", help="params and MACs of a model, before and after pruning")
    p.add_argument("--dataset", required=True, help="sets the input shape and class count")
    p.add_argument("--model", required=True, help="a model name (as in a grid's axes.model)")
    p.add_argument("--pruner", help="prune it with this pruner first")
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--ratio",
        type=_number_in(0, 1, "a ratio", low_closed=True),
        help="the pruner's ratio, in [0, 1)",
    )
    target.add_argument("--preset", help="the pruner's published preset (A, B, ...)")
    p.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE",
        help="import MODULE first, registering its models, datasets and pruners (repeatable; "
        "installed nptm entry points are always loaded)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="the counts as JSON")

    p = sub.add_parser(
        "schedules", help="lr and momentum of every retraining schedule (the paper's Figure 1)"
    )
    p.add_argument("--dataset", required=True, help="whose default recipe defines the curves")
    p.add_argument("--budget", type=int, required=True, help="retraining epochs")
    p.add_argument("--json", action="store_true", help="per-epoch values as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw every step of every curve")

    p = sub.add_parser(
        "sync-mlflow", help="fill MLflow from a sweep's Parquet tables (after an outage)"
    )
    _sweep_arg(p)
    _storage_arg(p)
    _mlflow_arg(p)
    return parser


def _sweep_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="the sweep's name (its grid's `name`)")


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--confirm-large", action="store_true", help="allow a grid above its max_trials")


def _adaptive_options(p: argparse.ArgumentParser) -> None:
    from nptm.orchestrator.adaptive import MAX_SEEDS

    g = p.add_argument_group(
        "adaptive seeds (--until-conclusive)",
        "after the grid's seeds, add seeds only where the report's confirmatory tests are "
        "still inconclusive, looking again after each (a group-sequential design whose "
        "verdicts stay valid however many looks: docs/reports.md, 'Adaptive seeds')",
    )
    g.add_argument(
        "--until-conclusive", action="store_true",
        help="once the grid's seeds have run, add seeds to the runs of the confirmatory tests "
        "still inconclusive, one look at a time, until each test has a verdict or --max-seeds "
        "seeds; every look is kept in the run record (looks.json) and the report",
    )  # fmt: skip
    g.add_argument(
        "--max-seeds", type=_int_in(1, MAX_SEEDS, "seeds"), metavar="K",
        help="the most seeds a confirmatory test gets, at least the grid's (default: twice "
        "the grid's seeds); the design spends its alpha over K seeds",
    )  # fmt: skip
    g.add_argument(
        "--seeds-per-look", type=_int_in(1, MAX_SEEDS, "seeds"), metavar="N",
        help="seeds added to the open tests at each look (default 1)",
    )  # fmt: skip


def _power_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "power (--power)",
        "the power of the report's confirmatory tests at the grid's seeds (exact noncentral t "
        "at Holm's first-step alpha; docs/reports.md)",
    )
    g.add_argument(
        "--power", action="store_true",
        help="print, per confirmatory test, the minimum detectable effect at the grid's seeds "
        "and the seeds needed for --effect",
    )  # fmt: skip
    g.add_argument(
        "--sd", type=_number_in(0, 100, "accuracy points"), default=0.15, metavar="POINTS",
        help="seed sd of one run's test accuracy, in points (default %(default)g)",
    )  # fmt: skip
    g.add_argument(
        "--correlation", type=float, default=0.0, metavar="RHO",
        help="correlation, in [0, 1], of two cells' paired differences within one seed "
        "(0: runs independent; 1: a seed moves every cell alike; default %(default)g)",
    )  # fmt: skip
    g.add_argument(
        "--effect", type=_number_in(0, 100, "accuracy points"), default=0.5, metavar="POINTS",
        help="true effect to detect: distance from each test's null, in points (default "
        "%(default)g)",
    )  # fmt: skip
    g.add_argument(
        "--target-power", type=_number_in(0, 1, "a probability"), default=0.8, metavar="P",
        help="power wanted (default %(default)g)",
    )  # fmt: skip
    g.add_argument(
        "--alpha", type=_number_in(0, 1, "a probability"), default=0.05, metavar="A",
        help="family-wise alpha of the confirmatory family (default %(default)g)",
    )  # fmt: skip
    g.add_argument(
        "--from-sweep", metavar="NAME",
        help="take each test's sd from this finished sweep's observed per-seed differences "
        "(under --storage) instead of --sd and --correlation",
    )  # fmt: skip
    _storage_arg(g)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line. Overrides may also stand after options
    (`nptm sweep grid.yaml --storage runs axes.seed=[0,1]`), which argparse alone refuses."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in GRID_COMMANDS:
        args.overrides += [a for a in extra if OVERRIDE.match(a)]
        extra = [a for a in extra if not OVERRIDE.match(a)]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _refuse_credentials(args: argparse.Namespace) -> None:
    """A storage URI with credentials in it (--storage, NPTM_STORAGE) is refused before
    anything runs (nptm.trainables.redact.storage_credentials_error says why and where they
    go instead). An MLflow URI may carry them (a database password, HTTP basic auth): it
    stays in this process, and nptm shows it redacted; given on the command line, a note
    says where else a command line shows."""
    refused = storage_credentials_error(getattr(args, "storage", None))
    if refused:
        raise UsageError(refused)
    uri = getattr(args, "mlflow_uri", None)
    if uri and uri != os.environ.get("MLFLOW_TRACKING_URI") and uri_credentials(uri):
        print(
            f"note: --mlflow-uri {redact_uri(uri)} carries credentials: nptm shows and stores "
            "it redacted, but a command line is visible to every user of this machine (ps) "
            "and in Ray's job list; MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_URI) keep them off it",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    first = next((w for w in words if not w.startswith("-")), None)
    if first != "sweep":
        return _main(words)
    # `nptm sweep`: a stop signal from the first moment ends it with 128 + N and a message,
    # not Python's or Ray's default (commands.sweep takes over once it runs).
    status: list[int] = []
    if argv is None:  # this process's own command line: it ends when nptm's work is done
        atexit.register(_exit_after_atexit, status)
    with RaiseOnStopSignals():
        try:
            status.append(_main(words))
        except Interrupted as err:
            name = signal.Signals(err.signum).name
            print(
                f"nptm {first}: INTERRUPTED by {name} before it began: nothing ran", file=sys.stderr
            )
            status.append(128 + err.signum)
    return status[0]


def _exit_after_atexit(status: list[int]) -> None:
    """The last exit handler of `nptm sweep` (registered before Ray's and MLflow's, so it runs
    after them): exit with the command's status now. What would follow is the interpreter's
    teardown of Ray's and torch's modules, seconds during which a SIGTERM would kill the
    process silently (the handlers are gone by then), for nothing left to do."""
    if not status:  # an unexpected error: Python's own exit, traceback and all
        return
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status[0])


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    from nptm.orchestrator.commands import HANDLERS

    try:
        _refuse_credentials(args)
        return HANDLERS[args.command](args)
    except UsageError as err:
        print(f"nptm {args.command}: error: {redact_text(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as err:  # handlers return their status: a plugin (or a library) ended it
        print(
            f"nptm {args.command}: error: SystemExit({err.code!r}) was raised inside the "
            "command, by a plugin or a library it runs; nothing is reported as done",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except BrokenPipeError:  # `nptm ... | head` stopped reading: no traceback, no flush error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
