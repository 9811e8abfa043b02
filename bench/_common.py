"""Helpers shared by the benchmark scripts: argument parsing, the machine line, tables."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` from a checkout, without an install
    sys.path.insert(0, str(ROOT))


def parser(description: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick (seconds, for the smoke test) and --json."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: finishes in seconds")
    p.add_argument(
        "--json", action="store_true", help="also print the figures as one JSON line at the end"
    )
    return p


def machine() -> dict[str, Any]:
    """What the figures were measured on; the load average tells whether the host was busy."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):  # not every platform has a load average
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(info: dict[str, Any] | None = None) -> str:
    info = info or machine()
    return "machine: " + ", ".join(f"{k}={v}" for k, v in info.items())


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *([_fmt(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_target(goal: str, measured: str, met: bool, name: str | None = None) -> None:
    """One line: the target, what was measured against it, and whether it was met."""
    label = "target" if name is None else f"target {name}"
    print(f"{label}: {goal} -> {measured}, {'met' if met else 'MISSED'}")


def emit(result: dict[str, Any], as_json: bool) -> None:
    """Print the machine-readable figures (one line, prefixed) when --json was given."""
    if as_json:
        print("json: " + json.dumps(result, sort_keys=True, default=str))


def parse_json_line(stdout: str) -> dict[str, Any]:
    """The figures a benchmark printed with --json (the inverse of `emit`)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("json: "):
            return json.loads(line[len("json: ") :])
    raise ValueError("no 'json: ' line in the benchmark's output")
