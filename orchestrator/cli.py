"""The `nptm` command line. Handlers import their machinery lazily so `--help` stays fast."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence

from nptm.orchestrator import __version__
from nptm.orchestrator.errors import EXIT_USAGE, UsageError
from nptm.trainables.storage import DEFAULT_MIN_FREE_GB

DEFAULT_STORAGE = "./nptm-runs"


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
    parser = argparse.ArgumentParser(prog="nptm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nptm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a grid file; exit 2 on the first mistake")
    p.add_argument("grid")

    p = sub.add_parser("plan", help="expand a grid into trials and its deduplicated stage DAG")
    p.add_argument("grid")
    p.add_argument("--json", action="store_true")
    p.add_argument("--confirm-large", action="store_true", help="allow grids above max_trials")

    p = sub.add_parser("sweep", help="run a grid on Ray (local by default)")
    p.add_argument("grid")
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
    p.add_argument("--confirm-large", action="store_true")
    p.add_argument("--log-models", action="store_true", help="log final models to MLflow")
    p.add_argument("--max-retries", type=int, default=2, help="retries of a failed stage")
    p.add_argument(
        "--min-free-gb", type=float, default=DEFAULT_MIN_FREE_GB,
        help="refuse to start with less free space on a local storage root (default %(default)g)",
    )  # fmt: skip
    p.add_argument("--no-report", action="store_true", help="skip the closing headline table")

    p = sub.add_parser("inspect", help="params and MACs of a model, before and after pruning")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--pruner")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=float)
    target.add_argument("--preset")
    p.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE",
        help="import MODULE first, registering its models, datasets and pruners (repeatable; "
        "installed nptm entry points are always loaded)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "schedules", help="lr and momentum of every retraining schedule (the paper's Figure 1)"
    )
    p.add_argument("--dataset", required=True, help="whose default recipe defines the curves")
    p.add_argument("--budget", type=int, required=True, help="retraining epochs")
    p.add_argument("--json", action="store_true", help="per-epoch values as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw every step of every curve")

    p = sub.add_parser("report", help="the schedule-vs-pruner analysis of a sweep")
    p.add_argument("sweep")
    _storage_arg(p)
    p.add_argument(
        "--out",
        help="also write a local copy here (the report always goes to "
        "<storage>/sweeps/<sweep>/report, local or object storage)",
    )
    p.add_argument("--latex", action="store_true", help="also write every table as a .tex file")
    p.add_argument(
        "--equivalence-margin", type=_number_in(0, 100, "accuracy points"), default=0.5,
        metavar="POINTS",
        help="claim 2's equivalence margin (TOST), in accuracy points (default %(default)g)",
    )  # fmt: skip

    p = sub.add_parser("best", help="best runs from MLflow")
    p.add_argument("--sweep")
    _storage_arg(p)
    _mlflow_arg(p)
    p.add_argument("--metric", default="test_acc")
    p.add_argument("--by", default="", help="comma-separated params to group by")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "status", help="progress of a sweep against its plan: done, running, failures, ETA"
    )
    p.add_argument("sweep")
    _storage_arg(p)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--watch", nargs="?", type=_number_in(0, math.inf, "seconds"), const=5.0, metavar="SECONDS",
        help="refresh every SECONDS (default 5) until the sweep's driver stops",
    )  # fmt: skip

    p = sub.add_parser("sync-mlflow", help="fill MLflow from a sweep's Parquet tables")
    p.add_argument("sweep")
    _storage_arg(p)
    _mlflow_arg(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nptm.orchestrator.commands import HANDLERS

    try:
        return HANDLERS[args.command](args)
    except UsageError as err:
        print(f"nptm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
