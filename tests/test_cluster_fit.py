"""`check_fit`: a stage is accepted exactly when Ray can place its trial actor and its worker
group on the cluster's nodes (Ray Train spreads a group's workers across nodes)."""

from __future__ import annotations

import itertools

import pytest

from nptm.orchestrator.cluster import Cluster, check_fit, stage_bundles
from nptm.orchestrator.errors import UsageError
from nptm.orchestrator.tuner import _max_concurrent
from nptm.search_spaces.schema import ResourcesSection


def _cluster(*cpus: float, gpus: tuple[float, ...] = ()) -> Cluster:
    nodes = [{"CPU": c, **({"GPU": gpus[i]} if i < len(gpus) else {})} for i, c in enumerate(cpus)]
    return Cluster(address="test", started_here=False, dashboard_url=None, nodes=nodes)


def _train(workers: int, cpus: float, gpus: float = 0.0) -> ResourcesSection:
    return ResourcesSection(
        executor="train", workers_per_trial=workers, cpus_per_worker=cpus, gpus_per_worker=gpus
    )


def _fits(cluster: Cluster, resources: ResourcesSection, kind: str = "retrain") -> bool:
    try:
        check_fit(cluster, resources, {kind})
    except UsageError:
        return False
    return True


def _brute_force(nodes: list[dict[str, float]], bundles: list[dict[str, float]]) -> bool:
    """Every assignment of bundles to nodes: does one respect every node's resources?"""
    for assignment in itertools.product(range(len(nodes)), repeat=len(bundles)):
        used = [dict.fromkeys(("CPU", "GPU"), 0.0) for _ in nodes]
        for bundle, n in zip(bundles, assignment, strict=True):
            for r, a in bundle.items():
                used[n][r] += a
        if all(
            used[n][r] <= nodes[n].get(r, 0.0) + 1e-9
            for n in range(len(nodes))
            for r in ("CPU", "GPU")
        ):
            return True
    return False


def test_a_group_larger_than_any_node_is_accepted_across_nodes() -> None:
    # 2 workers x 1 CPU + the 0.1-CPU trial actor: no 1-CPU node holds the group, two do
    # (the trial actor beside a worker would need 1.1: so a third node or a bigger one).
    assert not _fits(_cluster(1, 1), _train(2, 1))
    assert _fits(_cluster(1.1, 1), _train(2, 1))
    assert _fits(_cluster(1, 1, 1), _train(2, 1))
    assert _fits(_cluster(2, 2), _train(3, 1))  # 2.1 + 1: no single node holds 3.1


def test_a_worker_bigger_than_every_node_is_refused_whatever_the_total() -> None:
    cluster = _cluster(1, 1, 1, 1)  # 4 CPUs in all
    with pytest.raises(UsageError, match=r"a worker \(CPU=2\) fits no node"):
        check_fit(cluster, _train(1, 2), {"retrain"})


def test_the_total_is_named_when_the_cluster_is_too_small() -> None:
    with pytest.raises(UsageError, match=r"CPU needs 4\.1 but the cluster has 2") as err:
        check_fit(_cluster(2), _train(4, 1), {"pretrain", "retrain"})
    assert "pretrain stages cannot be scheduled" in str(err.value)


def test_gpus_are_counted_per_node() -> None:
    # Two 1-GPU nodes hold a 2-worker group of 1 GPU each; one 2-GPU worker fits neither.
    assert _fits(_cluster(4, 4, gpus=(1, 1)), _train(2, 1, 1))
    assert not _fits(_cluster(4, 4, gpus=(1, 1)), _train(1, 1, 2))
    assert not _fits(_cluster(8, gpus=(1,)), _train(2, 1, 1))


def test_prune_stages_need_one_worker_only() -> None:
    assert _fits(_cluster(1.1), _train(4, 1), kind="prune")


@pytest.mark.parametrize(
    "cpus", [(1,), (1, 1), (1.5, 1.5), (2, 0.5), (1.1, 1, 1), (0.5, 0.5, 0.5), (3,), (2.5, 1)]
)
@pytest.mark.parametrize("workers,per_worker", [(1, 1), (2, 1), (3, 1), (2, 0.5), (3, 0.75)])
def test_check_fit_agrees_with_every_assignment_of_bundles_to_nodes(
    cpus: tuple[float, ...], workers: int, per_worker: float
) -> None:
    cluster, res = _cluster(*cpus), _train(workers, per_worker)
    trial, worker_bundles = stage_bundles("retrain", res)
    assert _fits(cluster, res) == _brute_force(cluster.nodes, [trial, *worker_bundles])


@pytest.mark.parametrize(
    "node", [{"CPU": 2}, {"CPU": 1.1}, {"CPU": 4.5}, {"CPU": 8, "GPU": 2}, {"CPU": 3, "GPU": 1}]
)
@pytest.mark.parametrize(
    "res",
    [
        _train(1, 1),
        _train(2, 1),
        _train(1, 0.5),
        _train(1, 1, 0.5),
        ResourcesSection(executor="inline", cpus_per_worker=0.25),
        ResourcesSection(executor="inline", cpus_per_worker=1, gpus_per_worker=1),
    ],
)
def test_a_local_ray_holds_no_more_trials_than_stages_fit_at_once(
    node: dict[str, float], res: ResourcesSection
) -> None:
    # Each trial Tune holds asks for an actor; on a node nptm started, only as many as can run.
    local = Cluster(address="local", started_here=True, dashboard_url=None, nodes=[node])
    trial, workers = stage_bundles("retrain", res)
    fit = max((k for k in range(1, 40) if _brute_force([node], [trial, *workers] * k)), default=1)
    assert _max_concurrent(local, res) == fit
    capped = res.model_copy(update={"max_concurrent": 1})
    assert _max_concurrent(local, capped) == 1


def test_a_cluster_keeps_the_grids_cap_only() -> None:
    # A cluster may grow (its autoscaler scales on pending placement groups): no cap of nptm's.
    res = _train(1, 1)
    assert _max_concurrent(_cluster(2), res) is None
    assert _max_concurrent(_cluster(2), res.model_copy(update={"max_concurrent": 5})) == 5
