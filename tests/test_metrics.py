"""nptm's metrics (nptm.orchestrator.metrics): scraped from Ray by a real Prometheus while a
sweep runs, and the queries of nptm's Grafana dashboard (deploy/grafana/nptm.json)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nptm.orchestrator.metrics import METRICS
from nptm.orchestrator.planner import build_plan
from nptm.orchestrator.public_urls import GRAFANA_DASHBOARD_UID
from nptm.search_spaces import load_grid
from tests.ports import free_port
from tests.sweep_helpers import seed_stages, sweep_on, write_grid

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "nptm.json"
# Debian's `prometheus` package, which the README's test command installs: promtool too.
PROMETHEUS = shutil.which("prometheus") or "prometheus"
PROMTOOL = shutil.which("promtool") or "promtool"
MAGNITUDE = "{name: magnitude, ratio: 0.5}"


@contextlib.contextmanager
def prometheus(targets: list[str], tmp: Path) -> Iterator[str]:
    """A Prometheus on 127.0.0.1 that scrapes `targets` every second, its data in `tmp`;
    yields its URL once it is ready."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    with open(tmp / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address={url[7:]}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(
            lambda: _answers(f"{url}/-/ready"), 60, lambda: (tmp / "prometheus.log").read_text()
        )
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for(ready: Any, timeout: float, why: Any) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, why()
        time.sleep(0.5)


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """The instant vector Prometheus' HTTP API answers to `promql`."""
    api = f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(api, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.slow
def test_prometheus_scrapes_a_sweeps_metrics_from_the_ray_node(
    ray_node, tiny_sweep, tmp_path: Path
) -> None:
    """The pre-training and the prune reused, a 2-epoch retrain run: Prometheus, scraping the
    node's metrics export port, ends with every stage done by kind, the plan's 4 + 2 training
    epochs of which none remains, and the 2 this run trained."""
    grid = write_grid(tmp_path / "prom.yaml", name="prom", pruners=(MAGNITUDE,), schedules="[ft]")
    storage = tmp_path / "runs"
    seed_stages(tiny_sweep.storage, storage, grid, kinds=("pretrain", "prune"))
    port = ray_node.cluster.head_node.metrics_export_port
    with prometheus([f"127.0.0.1:{port}"], tmp_path) as url:
        result = sweep_on(ray_node, grid, storage)
        assert result.returncode == 0, result.stderr[-3000:]
        # Gauges leave Ray's export ~20 s after the driver; last_over_time keeps their last value.
        stages = 'sum by (kind, state) (last_over_time(ray_nptm_stages{sweep="prom"}[10m]))'
        states = ("pending", "running", "done", "failed", "skipped")
        expected_stages = {
            (kind, state): float(state == "done")  # one stage of each kind, all done
            for kind in ("pretrain", "prune", "retrain")
            for state in states
        }
        expected_epochs = {
            "ray_nptm_epochs_done": 2.0,  # the retrain's budget: the pre-training is reused
            "ray_nptm_epochs_planned": 4.0 + 2.0,  # pretrain.epochs + the retrain's budget
            "ray_nptm_epochs_remaining": 0.0,
        }
        epochs = {n: f'sum(last_over_time({n}{{sweep="prom"}}[10m]))' for n in expected_epochs}
        seen: dict[str, Any] = {}

        def landed() -> bool:  # Ray's agent exports on its own clock: wait for the end state
            rows = query(url, stages)
            seen["stages"] = {(r["metric"]["kind"], r["metric"]["state"]): float(r["value"][1])
                              for r in rows}  # fmt: skip
            seen["epochs"] = {
                name: [float(r["value"][1]) for r in query(url, q)] for name, q in epochs.items()
            }
            return seen["stages"] == expected_stages and seen["epochs"] == {
                name: [value] for name, value in expected_epochs.items()
            }

        wait_for(landed, 90, lambda: f"Prometheus holds {seen}")
        print(f"\n{stages}\n-> {sorted(seen['stages'].items())}")
        print("\n".join(f"{q}\n-> {seen['epochs'][n]}" for n, q in epochs.items()))
        # A running stage's series (those Prometheus saw) name it as the dashboard does.
        kinds = {s.display_name: s.kind.value for s in build_plan(load_grid(grid)).stages.values()}
        for row in query(url, 'last_over_time(ray_nptm_stage_epoch{sweep="prom"}[10m])'):
            assert kinds.get(row["metric"]["stage"]) == row["metric"]["kind"], row["metric"]


@pytest.mark.slow
def test_compose_prometheus_config_is_valid() -> None:
    config = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    out = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# -- nptm's Grafana dashboard -----------------------------------------------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}  # fmt: skip


def metric_names(promql: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names (of matchers and of by/without/on/ignoring clauses) or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)  # string literals
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)  # label matchers, ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(?!\s*\()", text)
    return {m.group(1) for m in found if m.group(1).lower() not in PROMQL_WORDS}


def test_metric_names_are_read_out_of_promql() -> None:
    assert metric_names(
        'sum by (kind, state) (rate(ray_a_total{sweep=~"$sweep", x="by"}[$__rate_interval]))'
        " / on (kind) group_left ignoring (y) ray_b offset 5m > bool 0.5 or vector(1)"
    ) == {"ray_a_total", "ray_b"}


def test_grafana_dashboard_queries_only_the_metrics_nptm_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == GRAFANA_DASHBOARD_UID  # the banner's link opens it
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    (sweeps,) = re.findall(r"label_values\((\w+),\s*sweep\)", variables["sweep"]["definition"])
    used = set().union(*map(metric_names, exprs)) | {sweeps}
    exported = {m.exported for m in METRICS}
    assert used <= exported, f"not exported by nptm: {used - exported}"
    assert used == exported, f"exported but never drawn: {exported - used}"
    assert all('sweep=~"$sweep"' in e for e in exprs), "a panel ignores the sweep selector"
