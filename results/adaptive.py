"""Adding seeds only where the confirmatory tests are still inconclusive (`nptm sweep GRID
--until-conclusive`): the look at a sweep's rows, and which runs get the next seeds.

A look runs the report's confirmatory family (nptm.results.confirmatory) on the stored rows of
the sweep as planned so far and decides each still open test by the group-sequential rule of
nptm.results.sequential: Lan-DeMets O'Brien-Fleming-type alpha spending over the design's
largest number of seeds, Holm over the family. A test rejected at a look stops with its verdict;
the others get the next seeds on every run of their two arms (`arm_cells`), and nothing else
does. A look is a JSON-ready dict (`take_look`); the driver (nptm.orchestrator.adaptive) keeps
them in the run record's looks.json and the report reads them back. Pure pandas, torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from nptm.results.confirmatory import (
    CELL,
    CLAIM_1,
    RANDOM_VS_METHODICAL,
    TEST,
    paired_differences,
    pooled_tests,
)
from nptm.results.sequential import boundaries_at, holm_levels, holm_look
from nptm.results.stats import CONTRADICTED, INCONCLUSIVE, SUPPORTED

FORMAT = 1  # of looks.json
DEFAULT_MARGIN = 0.005  # claim 2's margin, as the report's default (0.5 points)
ARM = ["structure", *CELL, "schedule"]  # one run of a test's arm, less its seed


@dataclass(frozen=True)
class Design:
    """The group-sequential design: looks after `first` seeds (the grid's), then every
    `per_look` more, up to `max_seeds`; family-wise `alpha`; claim 2's `margin` (0-1)."""

    first: int
    max_seeds: int
    per_look: int = 1
    alpha: float = 0.05
    margin: float = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.max_seeds or self.per_look < 1:
            raise ValueError(f"a design needs 1 <= first <= max_seeds and per_look >= 1: {self}")

    def planned(self) -> list[int]:
        """The seeds of a test at each planned look."""
        out = [self.first]
        while out[-1] < self.max_seeds:
            out.append(min(out[-1] + self.per_look, self.max_seeds))
        return out

    def describe(self) -> str:
        return (
            f"group-sequential t-tests over seeds, looks at {self.planned()} seeds; "
            f"Lan-DeMets O'Brien-Fleming-type alpha spending over {self.max_seeds} seeds; Holm "
            f"over the family at alpha {self.alpha:g}; claim 2's margin "
            f"{self.margin * 100:g} points"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def take_look(ok: pd.DataFrame, design: Design, earlier: Sequence[dict[str, Any]]) -> dict:
    """The next look at `ok` (the sweep's successful final-round retrain rows as planned so
    far, as `nptm.results.analysis.final_round_retrain` gives them), after the `earlier` looks
    (their records, oldest first): per test of the family, its state and statistics. A test
    decided at an earlier look keeps that look's record."""
    now = pooled_tests(paired_differences(ok), 1 - design.alpha, design.margin)
    now = now.set_index(TEST)
    if earlier:
        family = [tuple(t[k] for k in TEST) for t in earlier[0]["tests"]]
        before = {tuple(t[k] for k in TEST): t for t in earlier[-1]["tests"]}
    else:
        family = list(now.index)
        before = {}
    m = len(family)
    levels = holm_levels(design.alpha, m) if m else ()
    decided = [before.get(k, {}).get("verdict", INCONCLUSIVE) != INCONCLUSIVE for k in family]
    abs_t = np.full((1, m), np.nan)
    critical = np.full((m, m), np.inf)  # [r, i]: test i's boundary at level alpha / (m - r)
    histories: list[list[int]] = []
    for i, key in enumerate(family):
        history = list(before.get(key, {}).get("looks", []))
        row = now.loc[key] if key in now.index else None
        n = 0 if row is None else int(row["n"])
        if not decided[i] and n >= 2 and (not history or n > history[-1]) and row["sd"] > 0:
            history.append(n)
            critical[:, i] = boundaries_at(tuple(history), design.max_seeds, levels)[:, -1]
            abs_t[0, i] = abs(row["mean"] - row["null"]) / (row["sd"] / math.sqrt(n))
        histories.append(history)
    open_ = ~np.array(decided, dtype=bool)[None, :]
    new = holm_look(abs_t, open_, np.array([sum(decided)]), critical)[0]
    rejected = sum(decided) + int(new.sum())
    look = len(earlier) + 1
    tests = []
    for i, key in enumerate(family):
        if decided[i]:
            tests.append(before[key])
            continue
        r = min(rejected - int(new[i]), m - 1)  # the others rejected: this test's Holm level
        tests.append(_test_record(key, now, histories[i], design, levels[r], critical[r, i],
                                  look if new[i] else None, abs_t[0, i]))  # fmt: skip
    return {"look": look, "tests": tests}


def _test_record(
    key: tuple,
    now: pd.DataFrame,
    history: list[int],
    design: Design,
    level: float,
    critical: float,
    decided_at: int | None,
    abs_t: float,
) -> dict[str, Any]:
    row = now.loc[key] if key in now.index else None
    record: dict[str, Any] = dict(zip(TEST, key, strict=True))
    n = 0 if row is None else int(row["n"])
    mean, sd, null = (np.nan,) * 3 if row is None else (row["mean"], row["sd"], row["null"])
    # repeated confidence interval: the level-alpha boundary of the test's own looks
    rci = np.nan
    if history and history[-1] == n:
        rci = boundaries_at(tuple(history), design.max_seeds, (design.alpha,))[0, -1]
    half = rci * sd / math.sqrt(n) if n else np.nan
    verdict = INCONCLUSIVE
    if decided_at is not None:
        verdict = SUPPORTED if mean > null else CONTRADICTED
    record.update(
        cells=None if row is None else int(row["cells"]),
        seeds=n,
        mean=mean,
        sd=sd,
        null=null if row is not None else None,
        t=(mean - null) / (sd / math.sqrt(n)) if n >= 2 and sd > 0 else np.nan,
        level=level,
        critical=critical,
        low=mean - half,
        high=mean + half,
        verdict=verdict,
        decided_at=decided_at,
        looks=history,
    )
    if math.isnan(abs_t):
        record["critical"] = np.nan  # not tested at this look (under 2 seeds, or no new seed)
    return {k: _json_number(v) for k, v in record.items()}


def _json_number(value: Any) -> Any:
    """NaN and inf as null (strict JSON), numpy scalars as Python numbers."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def open_tests(look: dict[str, Any]) -> pd.DataFrame:
    """The tests still inconclusive after `look` (TEST columns)."""
    rows = [{k: t[k] for k in TEST} for t in look["tests"] if t["verdict"] == INCONCLUSIVE]
    return pd.DataFrame(rows, columns=TEST)


def arm_cells(ok: pd.DataFrame, tests: pd.DataFrame) -> pd.DataFrame:
    """The runs, less their seed (`ARM`: structure, cell, schedule), of both arms of every
    cell that enters one of `tests` (TEST columns): what a new seed of those tests retrains.

    Claim 1 (schedule s − ft on a cell): the cell with s and with ft. Claim 2 (random + clr −
    methodical + ft): the methodical pruner's cell with ft and the random pruner with clr at
    the same (dataset, model, target, budget). Only cells the test uses (a pair in every
    seed of the test, as `nptm.results.confirmatory.seed_means` keeps) are counted."""
    diffs = paired_differences(ok).merge(tests[TEST].drop_duplicates(), on=TEST)
    if diffs.empty:
        return pd.DataFrame(columns=ARM)
    seeds = diffs.groupby(TEST, observed=True)["seed"].transform("nunique")
    per_cell = diffs.groupby([*TEST, *CELL], observed=True)["seed"].transform("nunique")
    cells = diffs[per_cell == seeds].drop_duplicates([*TEST, *CELL])
    claim_1 = cells[cells["claim"] == CLAIM_1]
    claim_2 = cells[cells["claim"] != CLAIM_1]
    random_of = {s: rnd for s, (rnd, _) in RANDOM_VS_METHODICAL.items()}
    parts = [
        claim_1.assign(schedule=claim_1["schedule"]),
        cells.assign(schedule="ft"),  # arm B of both claims: the cell's pruner with ft
        claim_2.assign(pruner=claim_2["structure"].map(random_of), schedule="clr"),
    ]
    out = pd.concat([p[ARM] for p in parts], ignore_index=True).drop_duplicates()
    return out.sort_values(ARM, kind="stable").reset_index(drop=True)


def arm_rows(ok: pd.DataFrame, tests: pd.DataFrame) -> pd.DataFrame:
    """The rows of `ok` (every seed) that are runs of `arm_cells(ok, tests)`."""
    plain = ok[ok["variant"] == ""]
    return plain.merge(arm_cells(ok, tests), on=ARM)


def seeds_per_cell(ok: pd.DataFrame) -> pd.DataFrame:
    """How many seeds each run of the confirmatory arms got (`ARM` + `seeds`), for the
    report: the runs without schedule overrides of the schedules the claims compare."""
    plain = ok[(ok["variant"] == "") & ok["schedule"].isin(["ft", "lrw", "slr", "clr"])]
    out = plain.groupby(ARM, observed=True)["seed"].nunique().rename("seeds").reset_index()
    return out.sort_values(ARM, kind="stable").reset_index(drop=True)


def look_lines(look: dict[str, Any]) -> list[str]:
    """A look in words: each test's state, and the seeds it added."""
    lines = [f"look {look['look']}:"]
    for t in look["tests"]:
        name = f"  {t['claim']}, {t['structure']}, {t['comparison']}:"
        if t["decided_at"] is not None and t["decided_at"] < look["look"]:
            lines.append(f"{name} {t['verdict']} at look {t['decided_at']}")
        elif t["t"] is None or t["critical"] is None:
            lines.append(f"{name} {t['verdict']}, not tested at {t['seeds']} seeds")
        else:
            lines.append(
                f"{name} {t['verdict']}, |t| {abs(t['t']):.2f} vs {t['critical']:.2f} at "
                f"{t['seeds']} seeds (level {t['level']:.4g})"
            )
    added = look.get("added")
    if added:
        seeds = ", ".join(map(str, added["seeds"]))
        plural = "s" if len(added["seeds"]) > 1 else ""
        lines.append(
            f"  added seed{plural} {seeds} to {added['runs']} runs of the open tests' arms"
        )
    else:
        open_ = sum(t["verdict"] == INCONCLUSIVE for t in look["tests"])
        lines.append("  no seed added: " + ("the design's last look" if open_ else "all decided"))
    return lines


ANSWER = [*TEST, "cells", "seeds", "mean", "sd", "null", "t", "level", "critical", "low", "high",
          "verdict", "decided_at"]  # fmt: skip


def answer_table(record: dict[str, Any]) -> pd.DataFrame:
    """An adaptive sweep's answer: every test of the family as its last look left it."""
    last = record["looks"][-1]["tests"] if record["looks"] else []
    out = pd.DataFrame([{c: t.get(c) for c in ANSWER} for t in last], columns=ANSWER)
    numbers = ["mean", "sd", "null", "t", "level", "critical", "low", "high"]
    return out.astype(dict.fromkeys(numbers, float))


def looks_table(record: dict[str, Any]) -> pd.DataFrame:
    """One row per look: the tests open at it and their seeds, the verdicts it reached, and
    the seeds and runs it added."""
    rows = []
    for look in record["looks"]:
        at = [t for t in look["tests"] if t["decided_at"] in (None, look["look"])]
        seeds = sorted({t["seeds"] for t in at})
        decided = [
            f"{t['claim']} {t['comparison']} ({t['structure']}): {t['verdict']}"
            for t in at
            if t["decided_at"] == look["look"]
        ]
        added = look.get("added") or {}
        rows.append({
            "look": look["look"],
            "tests": len(at),
            "seeds": "–".join(map(str, dict.fromkeys([seeds[0], seeds[-1]]))) if seeds else "",
            "decided": "; ".join(decided),
            "added_seeds": ", ".join(map(str, added.get("seeds", []))),
            "added_runs": added.get("runs", 0),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["look", "tests", "seeds", "decided", "added_seeds",
                                       "added_runs"])  # fmt: skip


def looks_record(sweep: str, design: Design, looks: list[dict[str, Any]]) -> dict[str, Any]:
    """looks.json's content."""
    return {"format": FORMAT, "sweep": sweep, "design": design.to_dict(), "looks": looks}


def design_of(record: dict[str, Any]) -> Design:
    return Design(**record["design"])
