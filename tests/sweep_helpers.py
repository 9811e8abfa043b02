"""Running `nptm` as a user would (a subprocess) and reading what a sweep left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd

NPTM = [sys.executable, "-m", "orchestrator"]
ROOT = Path(__file__).resolve().parents[1]

TINY_GRID = """\
name: {name}
data: {{val_fraction: 0.1}}
pretrain: {{epochs: {pretrain_epochs}, milestones: {milestones}}}
resources: {{executor: {executor}, workers_per_trial: {workers}, cpus_per_worker: {cpus}{limit}}}
axes:
  dataset: {datasets}
  model: resnet20
  pruner:
{pruners}
  schedule: {schedules}
  budget: {budget}
  seed: {seeds}
{extra}"""


def write_grid(
    path: Path,
    *,
    name: str = "tiny",
    executor: str = "inline",
    workers: int = 1,
    cpus: float = 1,
    datasets: str = "digits",
    pruners: tuple[str, ...] = ("{name: magnitude, ratio: 0.5}", "{name: l1_filter, ratio: 0.5}"),
    schedules: str = "[ft, clr, wr]",
    seeds: str = "0",
    extra: str = "",
    budget: str = "2",
    pretrain_epochs: int = 4,
    milestones: str = "[2, 3]",
    max_concurrent: int | None = None,
) -> Path:
    text = TINY_GRID.format(
        name=name,
        executor=executor,
        workers=workers,
        cpus=cpus,
        datasets=datasets,
        pruners="\n".join(f"    - {p}" for p in pruners),
        schedules=schedules,
        seeds=seeds,
        extra=textwrap.dedent(extra),
        budget=budget,
        pretrain_epochs=pretrain_epochs,
        milestones=milestones,
        limit="" if max_concurrent is None else f", max_concurrent: {max_concurrent}",
    )
    path.write_text(text)
    return path


def nptm(
    *args: str,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    **kw,
):
    """Run the CLI in a fresh process (each starts and stops its own local Ray)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full_env.pop("RAY_ADDRESS", None)  # never attach to a Ray the environment points at
    full_env.update(env or {})
    return subprocess.run(
        [*NPTM, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
        **kw,
    )


def trials(storage: Path, sweep: str = "tiny") -> pd.DataFrame:
    return pd.read_parquet(storage / "sweeps" / sweep / "trials")


def executions(storage: Path, stage_id: str) -> int:
    return len(list((storage / "stages" / stage_id).glob("exec-*")))


def mlflow_stage_runs(uri: str, sweep: str = "tiny") -> list:
    """Every MLflow run of the sweep that records a stage (the parent sweep run excluded)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(f"nptm/{sweep}")
    assert exp is not None, f"no MLflow experiment for {sweep}"
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs += [r for r in page if "nptm.trial_id" in r.data.tags]
        token = page.token
        if not token:
            return runs
