"""Power, family-wise type I error and interval coverage of the report's confirmatory tests,
by simulation on a shipped grid's real plan.

Each simulated study is a finished sweep of the grid: the stages table its plan would store
(`nptm.results.power.plan_stages`, the sink's own rows) read by `final_round_retrain`, with a
test accuracy drawn for every final retrain run from a model with known truth (points):

    acc = 90 + network[pretrain stage] + mask[prune stage] + gap[pruner] + effect[schedule]
          + hetero[(dataset, model, target, pruner), schedule] + budget trend
          + shared[seed, schedule] + noise[run]

- noise ~ N(0, seed_sd), one per run: the seed sd of a cell; shared ~ N(0, shared_sd), one per
  (seed, schedule) and common to every cell of the seed (the correlation rho of two cells'
  paired differences is shared_sd^2 / (seed_sd^2 + shared_sd^2));
- network ~ N(0, network_sd) per pre-trained network and mask ~ N(0, mask_sd) per pruned one:
  drawn per stage, so a grid with `seeds.pretrain: shared` has one network and one methodical
  mask for every seed (fixed offsets, centred within each pruner) and, by default
  (`seeds.random_masks: per_seed`), one random mask per seed (noise), and a `per_trial` grid
  draws everything per seed;
- effect: `effect` for lrw, slr and clr, 0 for the other schedules; hetero ~ N(0, hetero_sd),
  0 for ft and centred over each pruner's networks, so the pooled truth of claim 1 is
  exactly `effect`; gap: 0 for methodical pruners, `claim2 - effect` for random ones, so the
  pooled truth of claim 2 (random + clr − methodical + ft) is exactly `claim2`.

The studies are analysed in one call of the report's own functions
(`nptm.results.confirmatory.confirmatory_tests` with ``by=["study"]``, as `claim_tables`
calls it with no key). Figures: per test, the rate of "supported" (power), of false verdicts
(a verdict where the truth is at the null, or "contradicted" where it is above) and the
coverage of the reported 95% interval; per setting, the family-wise rate of studies with any
false verdict; next to the power, the exact noncentral-t prediction of `nptm plan --power`
(at Holm's first step: a lower bound).

`--part looks` reads the same model drawn at K seeds with `nptm sweep --until-conclusive`'s
group-sequential design (bench/power_looks.py): type I error with the looks, power, seeds and
GPU-hours used against the fixed design of equal power.

    .venv/bin/python bench/power.py [--quick] [--json] [--grid search_spaces/paper_cifar_pfec.yaml]
                                    [--studies 1000] [--seed 0] [--part fixed|looks|all]
                                    [--max-seeds K]
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import _common
import numpy as np
import pandas as pd
from scipy import stats as sps

LEVEL = 0.95
MARGIN = 0.005  # the report's default equivalence margin, 0.5 points
TARGET_POWER, TARGET_FWER, COVERAGE = 0.8, 0.05, (0.93, 0.97)
COLUMNS = ["dataset", "model", "structure", "target", "budget", "pruner", "schedule", "sched",
           "variant", "seed"]  # fmt: skip  # what the claims' analysis reads, besides test_acc


@dataclass(frozen=True)
class Setting:
    """One simulated world, in accuracy points."""

    name: str
    effect: float  # claim 1's truth: lrw, slr, clr − ft
    claim2: float  # claim 2's truth: random + clr − methodical + ft
    seed_sd: float = 0.15
    shared_sd: float = 0.0
    mask_sd: float = 0.3
    network_sd: float = 1.0
    hetero_sd: float = 0.2
    seeds: int | None = None  # None: the grid's

    @property
    def correlation(self) -> float:
        total = self.seed_sd**2 + self.shared_sd**2
        return self.shared_sd**2 / total if total else 0.0

    @property
    def run_sd(self) -> float:
        return math.hypot(self.seed_sd, self.shared_sd)


@dataclass
class Design:
    """The final-round `ok` frame of one study (the analysis' columns) and, per row, the
    codes the simulation draws by."""

    ok: pd.DataFrame
    codes: dict[str, np.ndarray]
    sizes: dict[str, int]
    fixed_mask: np.ndarray  # per prune stage: shared by several seeds
    mask_pruner: np.ndarray  # per prune stage: its pruner's code
    unit_group: np.ndarray  # per (unit, schedule): the code of its (pruner, schedule)
    unit_ft: np.ndarray  # per (unit, schedule): the schedule is ft


def load_design(
    grid_path: str, seeds: int | None = None, overrides: tuple[str, ...] = ()
) -> Design:
    """The study layout of a grid's plan (with `seeds` seeds 0..n-1 instead of the grid's, and
    command-line `overrides`)."""
    from nptm.orchestrator.planner import build_plan
    from nptm.results.power import plan_final_ok
    from nptm.search_spaces import load_grid

    overrides = [*overrides]
    if seeds is not None:
        overrides.append(f"axes.seed=[{','.join(map(str, range(seeds)))}]")
    plan = build_plan(load_grid(grid_path, overrides), confirm_large=True)
    final = plan_final_ok(plan)
    prune = {sid: spec for sid, spec in plan.stages.items() if spec.kind == "prune"}
    pretrain_of = final["prune_id"].map({sid: spec.parents[0] for sid, spec in prune.items()})
    codes: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}

    def code(name: str, keys: pd.DataFrame | pd.Series) -> pd.Index:
        if isinstance(keys, pd.DataFrame):
            keys = pd.Series(list(map(tuple, keys.to_numpy())), index=keys.index)
        codes[name], uniques = pd.factorize(keys)
        sizes[name] = len(uniques)
        return pd.Index(uniques)

    code("pretrain", pretrain_of.fillna(final["model"]))
    masks = code("mask", final["prune_id"])
    units = code("unit_sched", final[["dataset", "model", "target", "pruner", "schedule"]])
    code("seed_sched", final[["seed", "schedule"]])
    pruner_codes = {p: i for i, p in enumerate(sorted(set(final["pruner"])))}
    seeds_per_mask = final.groupby("prune_id")["seed"].nunique()
    mask_pruner_of = final.drop_duplicates("prune_id").set_index("prune_id")["pruner"]
    ok = final[COLUMNS].reset_index(drop=True)
    for col in COLUMNS:
        if ok[col].dtype == object:
            ok[col] = ok[col].astype("category")  # fast group-bys over 1,000 stacked studies
    return Design(
        ok=ok,
        codes=codes,
        sizes=sizes,
        fixed_mask=(seeds_per_mask.reindex(masks) > 1).to_numpy(),
        mask_pruner=np.array([pruner_codes[mask_pruner_of[m]] for m in masks]),
        unit_group=pd.factorize(pd.Series([(u[3], u[4]) for u in units]))[0],
        unit_ft=np.array([u[4] == "ft" for u in units]),
    )


def _centred(draws: np.ndarray, groups: np.ndarray, where: np.ndarray) -> np.ndarray:
    """`draws` (studies x items) minus, for the items in `where`, their group's mean."""
    out = draws.copy()
    for g in np.unique(groups[where]):
        cols = where & (groups == g)
        out[:, cols] -= out[:, cols].mean(axis=1, keepdims=True)
    return out


def simulate(design: Design, setting: Setting, studies: int, rng: np.random.Generator):
    """Test accuracies (0-1), studies x runs, and the truth (0-1) per confirmatory claim."""
    from nptm.results.confirmatory import LARGE_LR_SCHEDULES, RANDOM_VS_METHODICAL

    ok, c, n = design.ok, design.codes, design.sizes
    s = setting
    random_pruners = {rnd for rnd, _ in RANDOM_VS_METHODICAL.values()}
    schedule = ok["schedule"].astype(str).to_numpy()
    pruner = ok["pruner"].astype(str).to_numpy()
    fixed = 90.0 + np.where(np.isin(schedule, LARGE_LR_SCHEDULES), s.effect, 0.0)
    fixed += np.where(np.isin(pruner, list(random_pruners)), s.claim2 - s.effect, 0.0)
    budget = ok["budget"].to_numpy(dtype=float)
    fixed += 0.5 * np.log2(budget / np.nanmin(budget))  # longer retraining: higher accuracy

    network = rng.normal(0, s.network_sd, (studies, n["pretrain"]))
    mask = rng.normal(0, s.mask_sd, (studies, n["mask"]))
    mask = _centred(mask, design.mask_pruner, design.fixed_mask)
    hetero = rng.normal(0, s.hetero_sd, (studies, n["unit_sched"])) * ~design.unit_ft
    hetero = _centred(hetero, design.unit_group, ~design.unit_ft)
    shared = rng.normal(0, s.shared_sd, (studies, n["seed_sched"]))
    acc = (
        fixed
        + network[:, c["pretrain"]]
        + mask[:, c["mask"]]
        + hetero[:, c["unit_sched"]]
        + shared[:, c["seed_sched"]]
        + rng.normal(0, s.seed_sd, (studies, len(ok)))
    )
    return acc / 100, {"claim 1": s.effect / 100, "claim 2": s.claim2 / 100}


def stacked(design: Design, acc: np.ndarray, first_study: int = 0) -> pd.DataFrame:
    """`studies` copies of the study's rows, one `study` key each, with the drawn accuracies."""
    studies, runs = acc.shape
    take = np.tile(np.arange(runs), studies)
    frame = design.ok.iloc[take].reset_index(drop=True)
    frame["study"] = np.repeat(np.arange(first_study, first_study + studies), runs)
    frame["test_acc"] = acc.ravel()
    return frame


def analyse(frame: pd.DataFrame) -> pd.DataFrame:
    """The report's confirmatory family, per study."""
    from nptm.results.confirmatory import confirmatory_tests

    return confirmatory_tests(frame, LEVEL, MARGIN, by=["study"])


def run_setting(
    design: Design, setting: Setting, studies: int, rng: np.random.Generator, chunk: int = 250
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per test: power, false-verdict rate, coverage; and the setting's family-wise rate."""
    parts, truths = [], {}
    started = time.perf_counter()
    for first in range(0, studies, chunk):
        acc, truths = simulate(design, setting, min(chunk, studies - first), rng)
        parts.append(analyse(stacked(design, acc, first)))
    seconds = time.perf_counter() - started
    conf = pd.concat(parts, ignore_index=True)
    return summarise(conf, truths, setting), {"seconds": seconds, "studies": studies}


def summarise(conf: pd.DataFrame, truths: dict[str, float], setting: Setting) -> pd.DataFrame:
    """Per test (claim, structure, comparison) over the studies; `fwer`: per setting, the
    share of studies with any false verdict, repeated on every row."""
    from nptm.results.power import directional_power

    truth = conf["claim"].map(truths)
    at_null = np.isclose(truth, conf["null"])
    false = np.where(at_null, conf["verdict"] != "inconclusive", conf["verdict"] == "contradicted")
    conf = conf.assign(
        truth=truth,
        supported=conf["verdict"] == "supported",
        false=false,
        covered=(conf["low"] <= truth) & (truth <= conf["high"]),
    )
    fwer = conf.groupby("study")["false"].any().mean()
    m = conf.groupby("study").size().iloc[0]
    out = (
        conf.groupby(["claim", "structure", "comparison"], sort=False)
        .agg(
            truth=("truth", "first"),
            null=("null", "first"),
            cells=("cells", "median"),
            seeds=("n", "median"),
            power=("supported", "mean"),
            false_rate=("false", "mean"),
            coverage=("covered", "mean"),
        )
        .reset_index()
    )
    out["fwer"] = fwer
    # nptm plan --power's prediction (first Holm step) from the setting's run sd and rho.
    from nptm.results.power import pooled_sd

    out["predicted"] = [
        directional_power(
            (r.truth - r.null) * 100,
            pooled_sd(setting.run_sd, int(r.cells), setting.correlation),
            int(r.seeds),
            TARGET_FWER / m,
        )
        if r.truth > r.null
        else float("nan")
        for r in out.itertuples()
    ]
    return out


def settings_for(grid_seeds: int, tests: int) -> list[Setting]:
    """The null and +0.5-point worlds with independent runs (rho 0), a little of the seed
    noise shared by a seed's cells (rho 0.1) and all of it (rho 1); the last also at the
    seeds the first Holm step needs for power 0.8 and at one seed fewer."""
    from nptm.results.power import pooled_sd, seeds_needed

    sd, rho = 0.15, 0.1
    null, half = {"effect": 0.0, "claim2": -MARGIN * 100}, {"effect": 0.5, "claim2": 0.0}
    some = {"seed_sd": sd * math.sqrt(1 - rho), "shared_sd": sd * math.sqrt(rho)}
    shared = {"seed_sd": 0.0, "shared_sd": sd}
    out = [
        Setting("null, rho 0", **null),
        Setting("+0.5, rho 0", **half),
        Setting("null, rho 0.1", **null, **some),
        Setting("+0.5, rho 0.1", **half, **some),
        Setting("null, rho 1", **null, **shared),
        Setting("+0.5, rho 1", **half, **shared),
    ]
    need = seeds_needed(0.5, pooled_sd(sd, 1, 1.0), TARGET_FWER / tests, TARGET_POWER)
    for seeds in sorted({need - 1, need} - {grid_seeds} if need else set()):
        out.append(replace(out[-1], name=f"+0.5, rho 1, {seeds} seeds", seeds=seeds))
    return out


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--grid", default=str(_common.ROOT / "search_spaces/paper_cifar_pfec.yaml"))
    p.add_argument("--studies", type=int, default=1000, help="simulated studies per setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--part", choices=["fixed", "looks", "all"], default="all",
        help="fixed: the grid's seeds as planned; looks: seeds added where inconclusive "
        "(bench/power_looks.py); all: both",
    )  # fmt: skip
    p.add_argument("--max-seeds", type=int, help="the looks' K (default: twice the grid's)")
    args = p.parse_args()
    studies = 40 if args.quick else args.studies
    rng = np.random.default_rng(args.seed)
    print(_common.machine_line())
    result: dict[str, Any] = {"grid": args.grid, "studies": studies}
    if args.part in ("fixed", "all"):
        _fixed(args, studies, rng, result)
    if args.part in ("looks", "all"):
        _looks(args, studies, rng, result)
    _common.emit(result, args.json)


def _fixed(args: Any, studies: int, rng: np.random.Generator, result: dict[str, Any]) -> None:
    """The report's fixed-sample family at the grid's seeds (and at the seeds rho 1 needs)."""
    started = time.perf_counter()
    designs = {None: load_design(args.grid)}
    grid_seeds = int(designs[None].ok["seed"].nunique())
    probe = analyse(stacked(designs[None], simulate(designs[None], Setting("", 0, 0), 1, rng)[0]))
    settings = settings_for(grid_seeds, len(probe))
    print(
        f"grid {args.grid}: {len(designs[None].ok)} final retrain runs per study, {grid_seeds} "
        f"seeds, {len(probe)} confirmatory tests; {studies} studies per setting"
    )
    rows = []
    result["settings"] = {}
    for setting in settings:
        if setting.seeds not in designs:
            designs[setting.seeds] = load_design(args.grid, setting.seeds)
        table, info = run_setting(designs[setting.seeds], setting, studies, rng)
        result["settings"][setting.name] = {
            **info,
            "fwer": float(table["fwer"].iloc[0]),
            "tests": table.drop(columns="fwer").to_dict(orient="records"),
        }
        for r in table.itertuples():
            rows.append(
                [setting.name, f"{r.claim} {r.comparison}", int(r.seeds), int(r.cells),
                 (r.truth - r.null) * 100, r.power, r.predicted, r.false_rate, r.coverage,
                 r.fwer, info["seconds"]]
            )  # fmt: skip
    wall = time.perf_counter() - started
    headers = ["setting", "test", "seeds", "cells", "truth - null (pp)", "power",
               "nct first step", "false verdicts", "coverage", "FWER", "setting s"]  # fmt: skip
    print(_common.table(headers, rows))
    print(f"wall time: {wall:.1f} s for {len(settings)} settings x {studies} studies")
    result["wall_s"] = wall
    _targets(result, grid_seeds)


def _looks(args: Any, studies: int, rng: np.random.Generator, result: dict[str, Any]) -> None:
    """Seeds added where inconclusive: the group-sequential design against the fixed one."""
    sys.modules.setdefault("power", sys.modules[__name__])  # power_looks imports this module
    import power_looks as pl

    started = time.perf_counter()
    first = int(load_design(args.grid).ok["seed"].nunique())
    k = args.max_seeds or 2 * first
    design = load_design(args.grid, k)
    tests = pl.family(design)
    looks = list(range(first, k + 1))
    costs = pl.arm_costs(args.grid, load_design(args.grid), tests, first)
    print(
        f"\nadding seeds where inconclusive (--until-conclusive): looks at {looks} seeds of "
        f"{len(tests)} tests; GPU-hours of the grid as planned {costs.base_hours:,.0f}, of "
        f"one seed for every test's arms {costs.hours[-1]:,.0f} (shipped figures)"
    )
    rows, out = [], {}
    for setting in pl.settings(first):
        table, info = pl.sequential_setting(design, tests, setting, studies, rng, looks, costs)
        off = table[~np.isclose(table["truth"], table["null"])]
        fixed = (None, math.nan, math.nan)
        if len(off):
            seq_power = float(off["power"].min())
            n, power = pl.fixed_equal_power(args.grid, setting, seq_power, first, k, studies, rng)
            fixed = (n, power, pl.plan_hours(args.grid, n) if n else math.nan)
        out[setting.name] = {**info, "fixed_equal_power": fixed,
                             "tests": table.to_dict(orient="records")}  # fmt: skip
        for r in table.itertuples():
            rows.append(
                [setting.name, f"{r.claim} {r.comparison}", (r.truth - r.null) * 100, r.power,
                 r.false_rate, r.coverage, r.seeds, info["fwer"], info["naive_fwer"],
                 info["hours"], fixed[0] or "-", fixed[1], fixed[2], info["seconds"]]
            )  # fmt: skip
    headers = ["setting", "test", "truth - null (pp)", "power", "false verdicts",
               "RCI coverage", "mean seeds", "FWER", "FWER naive looks", "E[GPU-h]",
               "fixed seeds, equal power", "fixed power", "fixed GPU-h", "setting s"]  # fmt: skip
    print(_common.table(headers, rows))
    wall = time.perf_counter() - started
    print(f"wall time: {wall:.1f} s for {len(out)} settings x {studies} studies")
    result["looks"] = {"max_seeds": k, "looks": looks, "settings": out, "wall_s": wall,
                       "base_hours": costs.base_hours}  # fmt: skip
    fwer = max(v["fwer"] for name, v in out.items() if name.startswith("null"))
    bound = sps.binom.ppf(0.999, studies, TARGET_FWER) / studies
    _common.print_target(
        f"family-wise false verdicts with looks under the null <= {TARGET_FWER} (Monte-Carlo "
        f"bound {bound:.3f})",
        f"max {fwer:.3f}",
        fwer <= bound,
        "looks_fwer",
    )


def _targets(result: dict[str, Any], grid_seeds: int) -> None:
    s = result["settings"]
    claim1 = [t for t in s["+0.5, rho 0"]["tests"] if t["claim"] == "claim 1"]
    worst = min(t["power"] for t in claim1)
    _common.print_target(
        f"claim-1 power >= {TARGET_POWER} at +0.5 points, seed sd 0.15, rho 0, {grid_seeds} seeds",
        f"min {worst:.3f}",
        worst >= TARGET_POWER,
        "power",
    )
    for name in ("+0.5, rho 0.1", "+0.5, rho 1", *(k for k in s if k.startswith("+0.5, rho 1, "))):
        tests = [t for t in s[name]["tests"] if t["claim"] == "claim 1"]
        print(f"  not a target, {name}: claim-1 power min {min(t['power'] for t in tests):.3f}")
    fwer = max(v["fwer"] for k, v in s.items() if k.startswith("null"))
    studies = result["studies"]
    bound = sps.binom.ppf(0.999, studies, TARGET_FWER) / studies  # Monte-Carlo error
    _common.print_target(
        f"family-wise false verdicts under the null <= {TARGET_FWER} (+ Monte-Carlo error: "
        f"<= {bound:.3f}, the binomial 99.9% bound at {studies} studies)",
        f"max {fwer:.3f}",
        fwer <= bound,
        "fwer",
    )
    cover = [t["coverage"] for v in s.values() for t in v["tests"]]
    low, high = COVERAGE
    _common.print_target(
        f"coverage of the 95% intervals in [{low}, {high}]",
        f"{min(cover):.3f} to {max(cover):.3f}",
        low <= min(cover) and max(cover) <= high,
        "coverage",
    )


if __name__ == "__main__":
    main()
