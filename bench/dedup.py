"""Planned versus naive training epochs of every shipped grid, and what they cost in device-hours.

Naive: every trial pre-trains and prunes its own network (`Plan.naive_epochs`); planned: the
deduplicated stage DAG (`Plan.planned_epochs`), where trials sharing a pre-training share the
stage. The ratio naive / planned is what deduplication saves.

Hours = training samples / samples-per-second of the model, per model and dataset. The default
samples/s are CPU figures of this repository's 2-core development VM, measured by
bench/throughput.py (nptm loop, 1 thread); a GPU figure MUST replace them for any real
estimate: pass `--samples-per-sec resnet56=9000 --samples-per-sec vgg16=7000 ...`
(model=value applies to every dataset, model@dataset=value to one). A (model, dataset) without
a figure is scaled from the nearest one by MACs per image (same model on CIFAR-10, else
ResNet-56 on CIFAR-10); the `source` column says which. Estimates count training samples only:
per-epoch evaluation (forward passes over val + test) adds roughly (val + test) / (3 x train),
about 11% on CIFAR; structured-pruned networks retrain faster than the dense speed assumed.

    .venv/bin/python bench/dedup.py [--quick] [--json] [--samples-per-sec MODEL[@DATASET]=N ...]
"""

from __future__ import annotations

import glob
from collections import defaultdict
from pathlib import Path
from typing import Any

import _common

from nptm.orchestrator.gpu_hours import train_samples

GRID_DIR = _common.ROOT / "search_spaces"
# bench/throughput.py --threads 1 (nptm loop, samples/s, training phase), CIFAR-10, CPU:
# 2-core AMD EPYC VM shared with other jobs, 2026-11-25. Replace with GPU figures for real
# estimates.
CPU_SAMPLES_PER_SEC: dict[tuple[str, str], float] = {
    ("resnet20", "cifar10"): 146.0,
    ("resnet56", "cifar10"): 42.0,
}
REFERENCE = ("resnet56", "cifar10")  # what an unmeasured pair is MAC-scaled from


def parse_rates(items: list[str]) -> dict[tuple[str, str | None], float]:
    """`model=value` or `model@dataset=value` -> {(model, dataset or None): samples/s}."""
    out: dict[tuple[str, str | None], float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = float("nan")
        if not sep or not key or not rate > 0:
            raise SystemExit(
                f"--samples-per-sec: {item!r} must read MODEL=N or MODEL@DATASET=N with N > 0"
            )
        model, _, dataset = key.partition("@")
        out[(model.strip(), dataset.strip() or None)] = rate
    return out


def epochs_by_pair(plan: Any) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """(planned, naive) training epochs per (model, dataset)."""
    planned = plan.planned_epochs_by_pair()
    naive: dict[tuple[str, str], int] = defaultdict(int)
    rounds = plan.grid.rounds
    for t in plan.trials:
        naive[(t.model, t.dataset)] += plan.grid.recipe(t.dataset).epochs + rounds * t.budget
    return dict(planned), dict(naive)


class Rates:
    """samples/s of (model, dataset): given, measured, or MAC-scaled from the nearest figure."""

    def __init__(self, given: dict[tuple[str, str | None], float]) -> None:
        self.known: dict[tuple[str, str], tuple[float, str]] = {
            k: (v, "CPU measured") for k, v in CPU_SAMPLES_PER_SEC.items()
        }
        self.given = given
        self._macs: dict[tuple[str, str], int] = {}

    def macs(self, model: str, dataset: str) -> int:
        if (model, dataset) not in self._macs:
            from nptm.trainables.macs import count_macs
            from nptm.trainables.models import build_model

            self._macs[(model, dataset)] = count_macs(build_model(model, dataset), dataset)
        return self._macs[(model, dataset)]

    def get(self, model: str, dataset: str) -> tuple[float, str]:
        for key in ((model, dataset), (model, None)):
            if key in self.given:
                return self.given[key], "given"
        if (model, dataset) in self.known:
            return self.known[(model, dataset)]
        base = (model, "cifar10")
        if base not in self.known and (model, None) not in self.given:
            base = REFERENCE
        rate, _ = self.get(*base)
        scaled = rate * self.macs(*base) / self.macs(model, dataset)
        return scaled, f"MAC-scaled from {base[0]}@{base[1]}"


def analyse(path: str, rates: Rates) -> dict[str, Any]:
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import load_grid

    grid = load_grid(path)
    plan = build_plan(grid, confirm_large=True)
    s = plan.summary()
    planned, naive = epochs_by_pair(plan)
    assert sum(planned.values()) == s["epochs"]["planned"], "per-model epochs disagree"
    assert sum(naive.values()) == s["epochs"]["naive"], "per-model epochs disagree"
    hours_planned = hours_naive = 0.0
    pairs = []
    for model, dataset in sorted(set(planned) | set(naive)):
        rate, source = rates.get(model, dataset)
        per_epoch = train_samples(dataset, grid.data.val_fraction)
        hp = planned.get((model, dataset), 0) * per_epoch / rate / 3600
        hn = naive.get((model, dataset), 0) * per_epoch / rate / 3600
        hours_planned += hp
        hours_naive += hn
        pairs.append(
            {"model": model, "dataset": dataset, "samples_per_s": rate, "source": source,
             "planned_hours": hp, "naive_hours": hn}
        )  # fmt: skip
    return {
        "grid": Path(path).name,
        "trials": s["trials"],
        "stages": sum(s["stages"].values()),
        "planned_epochs": s["epochs"]["planned"],
        "naive_epochs": s["epochs"]["naive"],
        "saved": 1 - s["epochs"]["planned"] / s["epochs"]["naive"],
        "naive_over_planned": s["epochs"]["naive"] / s["epochs"]["planned"],
        "planned_hours": hours_planned,
        "naive_hours": hours_naive,
        "pairs": pairs,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--samples-per-sec",
        action="append",
        default=[],
        metavar="MODEL[@DATASET]=N",
        help="training samples/s of a model (per device); repeatable",
    )
    args = p.parse_args(argv)
    rates = Rates(parse_rates(args.samples_per_sec))
    paths = sorted(glob.glob(str(GRID_DIR / "*.yaml")))
    if args.quick:
        paths = [q for q in paths if Path(q).name in ("quickstart.yaml", "paper_hrank_taylor.yaml")]
    results = [analyse(q, rates) for q in paths]
    info = _common.machine()
    print(_common.machine_line(info))
    headers = ["grid", "trials", "stages", "planned epochs", "naive epochs", "saved"]
    headers += ["naive/planned", "planned h", "naive h"]
    keys = ["grid", "trials", "stages", "planned_epochs", "naive_epochs", "saved"]
    keys += ["naive_over_planned", "planned_hours", "naive_hours"]
    rows = [[f"{r[k]:.0%}" if k == "saved" else r[k] for k in keys] for r in results]
    print(_common.table(headers, rows))
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        for pair in r["pairs"]:
            seen[(pair["model"], pair["dataset"])] = pair
    print("\nsamples/s behind the hours (device-hours at one device's speed):")
    print(
        _common.table(
            ["model", "dataset", "samples/s", "source"],
            [[m, d, v["samples_per_s"], v["source"]] for (m, d), v in sorted(seen.items())],
        )
    )
    if not args.samples_per_sec:
        print(
            "NOTE: these samples/s are CPU figures of a 2-core VM (bench/throughput.py); pass "
            "GPU figures with --samples-per-sec MODEL=N before trusting any hour above."
        )
    result = {"machine": info, "grids": results}
    _common.emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
