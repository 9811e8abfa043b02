"""Checks of a sweep's environment before its first stage: will the stages find their data?

A missing or incomplete data root would otherwise fail every stage, each after its retries.
The check (nptm.trainables.data_check) runs where the stages will run: on this machine for a
local Ray, before Ray starts; on every node of a cluster that can run stages (a Ray task that
asks for no CPU), before anything is written. `nptm validate` runs it on this machine when a
data root is given and the sweep would run here too (no RAY_ADDRESS); a grid without any data
root only gets a note there, since `nptm sweep --data-root DIR` may still give one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nptm.orchestrator.errors import UsageError

log = logging.getLogger(__name__)

CLUSTER_CHECK_TIMEOUT_S = 120.0  # a node's first task starts a worker process: seconds


@dataclass(frozen=True)
class DataNeed:
    """What the stages of a plan will load: these datasets from this root."""

    datasets: tuple[str, ...]  # those whose entry names a check (the others need no root)
    root: str | None
    download: bool
    plugins: tuple[str, ...]  # imported first where the check runs


def data_root(override: str | None, grid: Any) -> str | None:
    """The data root the stages get: `override` (--data-root / NPTM_DATA) over the grid's
    data.root; a local path made absolute (workers do not share this working directory)."""
    root = override or grid.data.root  # an empty NPTM_DATA gives none (not the working dir)
    if not root:
        return None
    return str(Path(root).expanduser().resolve()) if "://" not in root else root


def data_need(grid: Any, plan: Any, override: str | None) -> DataNeed:
    """The datasets of every stage of `plan` (finished ones too: a rerun checks the same)."""
    from nptm.trainables.catalog import DATASETS

    datasets = sorted({spec.dataset for spec in plan.stages.values()})
    return DataNeed(
        datasets=tuple(d for d in datasets if DATASETS[d].check),
        root=data_root(override, grid),
        download=grid.data.download,
        plugins=tuple(grid.plugins),
    )


def check_data_here(need: DataNeed) -> None:
    """Raise UsageError naming each dataset the stages would not find on this machine."""
    from nptm.trainables.data_check import data_problems

    if need.datasets:
        problems = data_problems(need.datasets, need.root, need.download, need.plugins)
        if problems:
            raise UsageError("\n".join(problems))


def check_data_on_cluster(need: DataNeed, timeout_s: float = CLUSTER_CHECK_TIMEOUT_S) -> None:
    """The same check on every alive node of the connected Ray cluster that can run a stage,
    as a Ray task pinned to the node; raise UsageError naming the nodes and what they lack. A
    node that does not answer within `timeout_s` is only warned about."""
    if not need.datasets:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from nptm.trainables.data_check import data_problems

    task = ray.remote(data_problems)
    refs = {}  # ref -> the node's address
    for node in ray.nodes():
        if not node.get("Alive") or node.get("Resources", {}).get("CPU", 0) <= 0:
            continue  # stages need CPU: a node without (a bare head) never runs one
        pinned = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ref = task.options(
            name="nptm_data_check", num_cpus=0, scheduling_strategy=pinned, max_retries=0
        ).remote(need.datasets, need.root, need.download, need.plugins)
        refs[ref] = node["NodeManagerAddress"]
    if not refs:  # an autoscaling cluster with no worker up yet: nowhere to look
        log.warning("no node of the cluster can run a stage yet: the data root is not checked")
        return
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    answers: list[tuple[str, list[str]]] = []
    for ref, address in refs.items():
        if ref not in ready:
            log.warning("node %s did not run the data check within %.0f s", address, timeout_s)
            continue
        try:
            answers.append((address, ray.get(ref)))
        except Exception as err:  # e.g. a plugin that cannot be imported there
            cause = getattr(err, "cause", None) or err  # a RayTaskError's own is a traceback
            answers.append((address, [f"the data check could not run there: {cause!r}"]))
    problems = _by_node(answers)
    if problems:
        raise UsageError("\n".join(problems))


def _by_node(answers: list[tuple[str, list[str]]]) -> list[str]:
    """Each problem once, with the nodes (their addresses) it was found on."""
    nodes: dict[str, set[str]] = {}
    for address, problems in answers:
        for problem in problems:
            nodes.setdefault(problem, set()).add(address)
    return [
        f"on node{'s' if len(where) > 1 else ''} {', '.join(sorted(where))}: {problem}"
        for problem, where in nodes.items()
    ]


def validate_data(grid: Any, plan: Any, environ: Mapping[str, str] = os.environ) -> list[str]:
    """`nptm validate`'s data check: with a data root (NPTM_DATA or data.root) and no Ray
    cluster to run on (RAY_ADDRESS), raise UsageError for what the stages would not find here.
    Without a data root, return the datasets that need one, as notes: `nptm sweep` refuses to
    start unless `--data-root` gives one."""
    need = data_need(grid, plan, environ.get("NPTM_DATA"))
    if need.root is None:
        from nptm.trainables.data_check import data_problems

        return data_problems(need.datasets, None, need.download, need.plugins)
    if not environ.get("RAY_ADDRESS"):
        check_data_here(need)
    return []
