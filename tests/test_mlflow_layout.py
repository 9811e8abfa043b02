"""MLflow as a lab browses a finished sweep, on the session's `mlflow server`: every stage a
top-level run of the sweep's experiment (rows of the runs table that the UI, rendered by
headless Chromium, and the REST API filter by tags and numeric metrics), and with
`--log-models` each retrained network an MLflow logged model of its run, which
`mlflow.pytorch.load_model` gives back at the test accuracy its stage recorded.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.sweep_helpers import ROOT, seed_stages, sweep_on, trials, write_grid

pytestmark = pytest.mark.slow

# The grid: the tiny sweep's, ft only: 1 pre-training, 2 prunes (ratio 0.5), 2 retrains.
PRUNERS = ("magnitude", "l1_filter")
STAGES = {
    "retrain": [f"retrain/digits/resnet20/{p}/ratio=0.5/ft/b2/s0" for p in PRUNERS],
    "prune": [f"prune/digits/resnet20/{p}/ratio=0.5/s0" for p in PRUNERS],
    "pretrain": ["pretrain/digits/resnet20/s0"],
}


@pytest.fixture(scope="module")
def sweep(tiny_sweep, ray_node, mlflow_server, tmp_path_factory) -> SimpleNamespace:
    """The grid swept with --log-models into the server. Its stages are the tiny sweep's
    (stage ids are content hashes): reused, hence recorded and their networks logged as a run
    records them, with no training here."""
    tmp = tmp_path_factory.mktemp("layout")
    grid = write_grid(tmp / "layout.yaml", name="layout", schedules="[ft]")
    storage = tmp / "runs"
    seeded = seed_stages(tiny_sweep.storage, storage, grid, kinds=("pretrain", "prune", "retrain"))
    assert len(seeded) == 5
    uri = mlflow_server.wait()
    result = sweep_on(ray_node, grid, storage, "--mlflow-uri", uri, "--log-models")
    assert result.returncode == 0, result.stderr[-3000:]
    name = urllib.parse.quote("nptm/layout")
    (experiment,) = _rest(uri, f"experiments/get-by-name?experiment_name={name}").values()
    return SimpleNamespace(uri=uri, storage=storage, experiment_id=experiment["experiment_id"])


def _rest(uri: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", data, headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_rest_search_filters_stage_runs_by_tags_and_numeric_metrics(sweep) -> None:
    def count(query: str) -> int:
        body = {"experiment_ids": [sweep.experiment_id], "filter": query, "max_results": 100}
        return len(_rest(sweep.uri, "runs/search", body).get("runs", []))

    # 5 stages beside the sweep's own run.
    assert count("tags.nptm.sweep = 'layout' and tags.nptm.role = 'stage'") == 5
    assert count("tags.nptm.role = 'sweep' and attributes.run_name = 'sweep/layout'") == 1
    assert count("metrics.ratio >= 0.5") == 4  # the prunes and retrains; a pre-training has none
    assert count("metrics.ratio >= 0.5 and metrics.budget > 1") == 2  # the retrains
    assert count("metrics.ratio > 0.5") == 0


def _chromium() -> str:
    # Debian's `chromium`, which the README's test command installs.
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path is not None, "no Chromium: apt-get install chromium"
    return path


def _headless():
    """bench/screenshots.py's Chromium command line: one definition of the flags."""
    spec = importlib.util.spec_from_file_location(
        "bench_screenshots", ROOT / "bench/screenshots.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.headless


def test_runs_table_lists_the_stage_runs_a_filter_selects(sweep, tmp_path: Path) -> None:
    """The runs table rendered by Chromium, filtered as a lab filters it (a param and a numeric
    metric): the retrains are rows of their own, no other run is shown."""
    query = "params.stage_kind = 'retrain' and metrics.budget > 1"
    url = (
        f"{sweep.uri}/#/experiments/{sweep.experiment_id}/runs"
        f"?searchFilter={urllib.parse.quote(query)}&workflowType=machine_learning"
    )
    cmd = _headless()(_chromium(), tmp_path / "profile", 15000, "--dump-dom", url)
    for _ in range(3):  # a page that ran out of its time budget on a busy machine: again
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
        if all(name in dom for name in STAGES["retrain"]):
            break
    shown = [name for names in STAGES.values() for name in names if name in dom]
    assert shown == STAGES["retrain"], dom[-3000:]
    assert "sweep/layout" not in dom


def test_retrained_networks_load_back_at_their_test_accuracy(sweep, monkeypatch) -> None:
    """Each retrain's logged model, found as a user finds it, evaluated on the digits test
    split as the stage evaluated it (masks of magnitude pruning, the narrower layers of
    l1_filter): the accuracy its row recorded."""
    import mlflow
    import mlflow.pytorch

    from nptm.trainables.datasets import load_dataset
    from nptm.trainables.loaders import make_loaders
    from nptm.trainables.train_loop import evaluate

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep.uri)
    models = mlflow.search_logged_models(experiment_ids=[sweep.experiment_id], output_format="list")
    rows = trials(sweep.storage, "layout")
    retrains = rows[rows.stage_kind == "retrain"].set_index("stage_id")
    assert sorted(m.tags["nptm.stage_id"] for m in models) == sorted(retrains.index)
    test = make_loaders(load_dataset("digits", None), batch_size=64, device="cpu", seed=0).test
    for logged in models:
        row = retrains.loc[logged.tags["nptm.stage_id"]]
        assert logged.source_run_id == row.mlflow_run_id
        network = mlflow.pytorch.load_model(logged.model_uri)
        assert evaluate(network, test, "cpu")[1] == pytest.approx(row.test_acc), row.pruner
