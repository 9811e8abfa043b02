"""The `nptm` command line (the parser; each command's handler is in commands.py)."""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence

from nptm.orchestrator import __version__
from nptm.orchestrator.errors import EXIT_USAGE, UsageError
from nptm.trainables.storage import DEFAULT_MIN_FREE_GB

DEFAULT_STORAGE = "./nptm-runs"

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


def _number_in(low: float, high: float, unit: str) -> Callable[[str], float]:
    """An argparse type: a number strictly between `low` and `high`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low < value < high:
            raise argparse.ArgumentTypeError(
                f"expected {unit} in ({low:g}, {high:g}), got {text!r}"
            )
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
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
    _plan_options(p)

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
        "--log-models", action="store_true", help="log each final model to MLflow as well"
    )
    p.add_argument(
        "--max-retries", type=int, default=2, metavar="N",
        help="retries of a stage whose trial failed (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--min-free-gb", type=float, default=DEFAULT_MIN_FREE_GB, metavar="GB",
        help="refuse to start with less free space on a local storage root (default %(default)g)",
    )  # fmt: skip
    p.add_argument(
        "--no-report", action="store_true", help="skip the report and its headline at the end"
    )

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

    p = sub.add_parser("best", help="the best runs by a metric, from MLflow")
    p.add_argument("--sweep", help="only this sweep's runs (default: every sweep in the store)")
    _storage_arg(p)
    _mlflow_arg(p)
    p.add_argument("--metric", default="test_acc", help="rank by this metric (%(default)s)")
    p.add_argument(
        "--by", default="", metavar="PARAMS",
        help="comma-separated params to group by: the best run of each group",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=5, help="how many rows (default %(default)s)")
    p.add_argument("--json", action="store_true", help="the rows as JSON")

    p = sub.add_parser("inspect", help="params and MACs of a model, before and after pruning")
    p.add_argument("--dataset", required=True, help="sets the input shape and class count")
    p.add_argument("--model", required=True, help="a model name (as in a grid's axes.model)")
    p.add_argument("--pruner", help="prune it with this pruner first")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=float, help="the pruner's ratio")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from nptm.orchestrator.commands import HANDLERS

    try:
        return HANDLERS[args.command](args)
    except UsageError as err:
        print(f"nptm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `nptm ... | head` stopped reading: no traceback, no flush error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
