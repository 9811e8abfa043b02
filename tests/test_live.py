"""nptm.orchestrator.live below Ray: stop signals, the banner's links, the dashboard check."""

from __future__ import annotations

import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from nptm.orchestrator.live import StopSignals, SweepInterrupted, SweepStart, url_answers


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
    assert served.runs_url == "http://127.0.0.1:5000/#/experiments/7/runs"
    assert served.mlflow_command is None
    embedded = SweepStart(**base, mlflow_uri="sqlite:////r/mlflow.db", experiment_id="3")
    assert embedded.mlflow_command == (
        "mlflow ui --backend-store-uri sqlite:////r/mlflow.db --host 127.0.0.1 --port 5000"
    )
    assert embedded.runs_url == "http://127.0.0.1:5000/#/experiments/3/runs"
    assert SweepStart(**base, mlflow_uri="sqlite:////r/mlflow.db").runs_url is None  # degraded


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
