"""GPU-hours of a plan: planned training epochs x seconds per epoch measured on one GPU.

The figures live in `orchestrator/gpu_figures.json`, written by `bench/gpu.py --write-figures`:
the GPU, the date, the torch version, and per (model, dataset) the seconds of one training
epoch over the dataset's whole training split (`DatasetInfo.train_size` samples) at the grid's
batch size. A stage trains `train_samples(dataset, val_fraction)` samples per epoch, so

    hours = planned epochs x seconds_per_epoch x train_samples / train_size / 3600

summed over (model, dataset). Training phase only: per-epoch evaluation is not counted. A pair
without a figure has unknown hours, and then so has the total: nothing is extrapolated.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIGURES_PATH = Path(__file__).with_name("gpu_figures.json")

Pair = tuple[str, str]  # (model, dataset)


@dataclass(frozen=True)
class GpuFigures:
    gpu: str | None  # e.g. "NVIDIA H200"; None until measured
    measured_on: str | None  # ISO date
    torch: str | None
    seconds_per_epoch: dict[Pair, float]


def read_figures(path: Path) -> GpuFigures:
    raw = json.loads(path.read_text())
    return GpuFigures(
        gpu=raw.get("gpu"),
        measured_on=raw.get("measured_on"),
        torch=raw.get("torch"),
        seconds_per_epoch={
            (r["model"], r["dataset"]): float(r["seconds_per_epoch"])
            for r in raw.get("seconds_per_epoch", [])
        },
    )


@functools.cache
def shipped_figures() -> GpuFigures:
    """The figures shipped with nptm (none measured: an empty table)."""
    if not FIGURES_PATH.is_file():
        return GpuFigures(None, None, None, {})
    return read_figures(FIGURES_PATH)


def train_samples(dataset: str, val_fraction: float) -> int:
    """Training samples per epoch after holding out the validation split."""
    from nptm.trainables.catalog import DATASETS

    n = DATASETS[dataset].train_size
    return n - round(val_fraction * n)


def epoch_seconds(
    model: str, dataset: str, val_fraction: float, figures: GpuFigures
) -> float | None:
    """Seconds of one training epoch of (model, dataset) with `val_fraction` held out, on the
    figures' GPU; None without a figure. GPU-hours and the stages' planned seconds
    (`nptm.orchestrator.stage_cost`) are both made of it."""
    from nptm.trainables.catalog import DATASETS

    per_epoch = figures.seconds_per_epoch.get((model, dataset))
    if per_epoch is None:
        return None
    return per_epoch * train_samples(dataset, val_fraction) / DATASETS[dataset].train_size


def gpu_hours(
    epochs_by_pair: dict[Pair, int], val_fraction: float, figures: GpuFigures
) -> dict[str, Any]:
    """Hours per (model, dataset) and in total; None where a pair has no figure."""
    pairs = []
    for (model, dataset), epochs in sorted(epochs_by_pair.items()):
        seconds = epoch_seconds(model, dataset, val_fraction, figures)
        hours = None if seconds is None else epochs * seconds / 3600
        pairs.append({"model": model, "dataset": dataset, "planned_epochs": epochs,
                      "seconds_per_epoch": figures.seconds_per_epoch.get((model, dataset)),
                      "hours": hours})  # fmt: skip
    unknown = [f"{p['model']}@{p['dataset']}" for p in pairs if p["hours"] is None]
    return {
        "gpu": figures.gpu,
        "measured_on": figures.measured_on,
        "total": None if unknown else sum(p["hours"] for p in pairs),
        "unknown": unknown,
        "pairs": pairs,
    }


def describe(hours: dict[str, Any]) -> str:
    """One line for `nptm plan`'s table."""
    if hours["total"] is not None:
        return (
            f"planned GPU-hours: {hours['total']:,.1f} on one {hours['gpu']} "
            f"(training phase, measured {hours['measured_on']})"
        )
    where = f" on {hours['gpu']}" if hours["gpu"] else ""
    missing = ", ".join(hours["unknown"])
    return f"planned GPU-hours: unknown (no per-epoch figure{where} for {missing})"
