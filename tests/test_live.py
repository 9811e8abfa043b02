"""Below Ray: the sweep's stop signals, the banner's links, the dashboard check."""

from __future__ import annotations

import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from nptm.orchestrator.banner import SweepStart, url_answers
from nptm.orchestrator.signals import StopSignals, SweepInterrupted


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_is_noted_then_raised_at_the_next_check(sig, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TUNE_DISABLE_SIGINT_HANDLER", "0")  # restored afterwards
    before = signal.getsignal(sig)
    with StopSignals() as stop:
        assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"  # Tune keeps its hands off
        stop.check()  # nothing yet
        os.kill(os.getpid(), sig)  # noted, not raised: a Parquet write is never cut in half
        assert stop.signum == sig
        with pytest.raises(SweepInterrupted) as raised:
            stop.check()
        assert raised.value.signum == sig
        with pytest.raises(SweepInterrupted):  # a second signal stops at once
            os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is before  # handlers restored
    assert f"{signal.Signals(sig).name} received: stopping the sweep" in capsys.readouterr().err


def test_mlflow_links_go_to_the_experiments_runs_table() -> None:
    base = {"sweep": "s", "storage": "/r/sweeps/s", "run_record": "/r", "planned": {}, "to_run": 0}
    served = SweepStart(**base, mlflow_uri="http://127.0.0.1:5000/", experiment_id="7")
    assert served.mlflow.runs_url == "http://127.0.0.1:5000/#/experiments/7/runs"
    assert served.mlflow.command is None
    embedded = SweepStart(**base, mlflow_uri="sqlite:////r/mlflow.db", experiment_id="3")
    assert embedded.mlflow.command == (
        "mlflow ui --backend-store-uri sqlite:////r/mlflow.db --host 127.0.0.1 --port 5000"
    )
    assert embedded.mlflow.runs_url == "http://127.0.0.1:5000/#/experiments/3/runs"
    degraded = SweepStart(**base, mlflow_uri="sqlite:////r/mlflow.db")
    assert degraded.mlflow.runs_url is None


def test_url_answers_counts_any_http_status_and_not_a_closed_port() -> None:
    class Unauthorized(BaseHTTPRequestHandler):  # a dashboard behind token auth
        def do_GET(self) -> None:
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert url_answers(f"http://127.0.0.1:{server.server_port}", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert not url_answers(f"http://127.0.0.1:{server.server_port}", timeout=0.5)


# -- the addresses a browser reaches (nptm.orchestrator.public_urls) ---------------------------

PUBLIC = {
    "NPTM_PUBLIC_DASHBOARD_URL": "http://127.0.0.1:8265",
    "NPTM_PUBLIC_MLFLOW_URL": "http://127.0.0.1:5000/",
    "NPTM_PUBLIC_GRAFANA_URL": "http://127.0.0.1:3000",
}


def _banner(monkeypatch, tmp_path) -> str:
    """The start-up banner of a sweep driven inside a container: its dashboard and MLflow are
    at addresses only the compose network resolves."""
    from types import SimpleNamespace

    from nptm.orchestrator import banner
    from nptm.orchestrator.cluster import Cluster
    from nptm.orchestrator.public_urls import PublicUrls
    from nptm.trainables.layout import Layout

    probed: list[str] = []
    monkeypatch.setattr(banner, "url_answers", lambda url: probed.append(url) or True)
    cluster = Cluster("ray-head:6379", False, "http://172.18.0.4:8265", nodes=[])
    kinds = ("pretrain", "prune", "retrain")
    plan = SimpleNamespace(
        name="s", stages={k: SimpleNamespace(kind=SimpleNamespace(value=k)) for k in kinds}
    )
    recorder = SimpleNamespace(
        uri="http://mlflow:5000", experiment_name="nptm/s", experiment_id="7", degraded=False
    )
    record = SimpleNamespace(layout=Layout(str(tmp_path)), location=lambda: f"{tmp_path}/run")
    start = banner.sweep_start(plan, cluster, recorder, record, 0, PublicUrls.from_env())
    assert probed == ["http://172.18.0.4:8265"]  # checked where the driver reaches it
    return banner.banner(start) + "\n"


def test_banner_links_to_the_drivers_addresses_without_public_urls(monkeypatch, tmp_path) -> None:
    for name in PUBLIC:
        monkeypatch.delenv(name, raising=False)
    out = _banner(monkeypatch, tmp_path)
    assert "  Ray dashboard: http://172.18.0.4:8265 (cluster; answers)\n" in out
    assert "  MLflow: http://mlflow:5000, experiment nptm/s\n" in out
    assert "    runs: http://mlflow:5000/#/experiments/7/runs\n" in out
    assert "Grafana" not in out


def test_banner_and_summary_link_to_the_public_urls(monkeypatch, capsys, tmp_path) -> None:
    from nptm.orchestrator.commands import _print_summary
    from nptm.results.sink import SweepSummary

    for name, value in PUBLIC.items():
        monkeypatch.setenv(name, value)
    out = _banner(monkeypatch, tmp_path)
    assert "  Ray dashboard: http://127.0.0.1:8265 (cluster; answers)\n" in out
    assert "  Grafana: http://127.0.0.1:3000/d/nptm?var-sweep=s\n" in out
    assert (
        "  MLflow: http://127.0.0.1:5000 (nptm logs to http://mlflow:5000), experiment nptm/s\n"
        in out
    )
    assert "    runs: http://127.0.0.1:5000/#/experiments/7/runs\n" in out
    assert "172.18.0.4" not in out

    summary = SweepSummary(
        sweep="s", dashboard_url="http://127.0.0.1:8265", dashboard_local=False,
        mlflow_uri="http://mlflow:5000", mlflow_experiment_id="7",
        mlflow_public="http://127.0.0.1:5000", grafana_url="http://127.0.0.1:3000/d/nptm?var-sweep=s",
    )  # fmt: skip
    _print_summary(summary, str(tmp_path))
    out = capsys.readouterr().out
    assert "Ray dashboard (the cluster's, still up): http://127.0.0.1:8265\n" in out
    assert "Grafana: http://127.0.0.1:3000/d/nptm?var-sweep=s\n" in out
    assert "MLflow: http://127.0.0.1:5000/#/experiments/7/runs\n" in out
    assert "mlflow:5000" not in out


@pytest.mark.parametrize(
    ("value", "said"),
    [("127.0.0.1:5000", "is not an http:// or https:// URL"),
     ("http://nptm:hunter2@127.0.0.1:5000", "carries credentials")],
)  # fmt: skip
def test_a_public_url_that_is_no_plain_url_stops_the_sweep_before_ray(
    value: str, said: str, tmp_path
) -> None:
    from tests.sweep_helpers import cli_in_process, write_grid

    grid = write_grid(tmp_path / "g.yaml", name="g")
    argv = ["sweep", str(grid), "--storage", str(tmp_path / "runs")]
    result = cli_in_process(argv, env={"NPTM_PUBLIC_MLFLOW_URL": value})
    assert result.returncode == 2, result.stderr
    assert "nptm sweep: error: NPTM_PUBLIC_MLFLOW_URL" in result.stderr and said in result.stderr
    assert "hunter2" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written, no Ray started


# -- the driver's one monitor (nptm.orchestrator.monitor) -------------------------------------


def test_the_monitor_reads_the_searchers_counts_into_progress_json_and_the_line(
    tmp_path,
) -> None:
    """A stage's trial starts, reports an epoch and ends: progress.json lists it running with
    that epoch while it runs, and the terminal line counts stages by the searcher's states."""
    import io
    from types import SimpleNamespace

    from nptm.orchestrator.dag_search import DagSearcher
    from nptm.orchestrator.monitor import SweepMonitor, progress_line
    from nptm.orchestrator.planner import build_plan
    from nptm.results.run_record import DriverState, RunRecord
    from nptm.search_spaces import load_grid
    from nptm.trainables.layout import Layout
    from nptm.trainables.stage import StageOutcome
    from tests.sweep_helpers import write_grid

    plan = build_plan(load_grid(write_grid(tmp_path / "g.yaml")))  # 1 pretrain, 2 prunes, 6
    n = len(plan.stages)
    searcher = DagSearcher(
        plan.stages, set(), lambda spec, result: StageOutcome(spec.id, spec.kind, "ok"),
        lambda spec, outcome: None,
    )  # fmt: skip
    started, epochs = [], []
    sink = SimpleNamespace(
        summary=SimpleNamespace(sweep="tiny"),
        start_stage=started.append,
        recorder=SimpleNamespace(log_epoch=lambda sid, result: epochs.append(sid)),
    )
    record = RunRecord(Layout(str(tmp_path)), "tiny")
    line = io.StringIO()
    monitor = SweepMonitor(searcher, sink, record, StopSignals(), line)
    config = searcher.suggest("t1")
    trial = SimpleNamespace(config=config, trial_id="t1")
    pre = plan.stages[config["stage_id"]]

    monitor.on_trial_start(0, [], trial)
    result = {"epoch_done": 1, "epoch": 1, "test_acc": 0.25}
    searcher.on_trial_result("t1", result)
    monitor.on_trial_result(0, [], trial, result)
    monitor.write_progress(force=True)
    running = record.read_progress().running[pre.id]
    assert (running.epoch, running.epochs, running.test_acc) == (1, pre.epochs, 0.25)
    assert record.read_progress().epochs_done == 1 and started == [pre] and epochs == [pre.id]
    assert progress_line(searcher, 1).startswith(
        f"[nptm] stages done 0  running 1  pending {n - 1}  failed 0  skipped 0  |"
    )

    searcher.on_trial_complete("t1", result={})
    monitor.on_trial_complete(0, [], trial)
    monitor.finish(DriverState.FINISHED)
    progress = record.read_progress()
    assert progress.state == DriverState.FINISHED and progress.running == {}
    # The pretrain is done; its two prunes are runnable, none handed out.
    assert line.getvalue().startswith(f"[nptm] stages done 1  running 0  pending {n - 1}  ")
