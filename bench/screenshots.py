"""Screenshots of a sweep, for the README: the Ray dashboard while it runs (jobs, actors with
their trial names) and the MLflow UI (the experiment's runs table, a finished retrain's
metrics tab), taken with headless Chromium into docs/img/.

Not a test. It starts `nptm sweep` on a small digits grid in the background (local Ray, the
embedded sqlite MLflow store, everything under a temporary directory), `mlflow ui` on that
store, shoots the dashboard once a stage is running and MLflow once a retrain has finished,
then stops what it started. tests/test_mlflow_layout.py drives Chromium with the same flags
(`headless`).

    .venv/bin/python bench/screenshots.py [--out docs/img] [--grid GRID] [--keep]

Needs Chromium (Debian/Ubuntu: `apt-get install chromium`; or give its path with
--chromium). The sweep's Ray runs with a private temp dir, on 127.0.0.1 only, with token
authentication off (RAY_AUTH_MODE=disabled; a local Ray 2.60 turns it on by default): under
token auth the dashboard asks the browser for the token, which a headless command line cannot
type (its login is a POST with an Authorization header that sets a cookie).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small enough for a few minutes on 2 cores, long enough that stages are running (and MLflow
# runs have partial curves) while the pages are shot.
GRID = """\
name: screenshots
data: {val_fraction: 0.1}
pretrain: {epochs: 12, milestones: [6, 9]}
resources: {executor: inline, workers_per_trial: 1, cpus_per_worker: 1}
axes:
  dataset: digits
  model: resnet20
  pruner:
    - {name: magnitude, ratio: 0.9}
    - {name: random, ratio: 0.9}
  schedule: [ft, clr]
  budget: 20
  seed: 0
"""
DASHBOARD_LINE = re.compile(r"Dashboard head http address: ([0-9.]+:[0-9]+)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    p.add_argument("--grid", type=Path, help="grid to sweep (default: a small digits grid)")
    p.add_argument("--chromium", default=None, help="Chromium binary (default: found on PATH)")
    p.add_argument("--size", default="1600,1000", help="browser window, W,H (default %(default)s)")
    p.add_argument(
        "--render-ms", type=int, default=30000,
        help="virtual time the pages' JS gets before each shot (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary sweep directory")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines as they happen, also in a log

    chromium = args.chromium or next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    if chromium is None:
        print("no Chromium found: apt-get install chromium, or give --chromium", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nptm-shot-", dir="/tmp"))  # short: Ray socket paths
    print(f"working under {work}")
    deadline = time.time() + args.timeout
    try:
        shots = run(args, chromium, work, deadline)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for path, what in shots:
        print(f"{path}: {what}")
    return 0 if shots else 1


def run(args: argparse.Namespace, chromium: str, work: Path, deadline: float) -> list:
    grid = args.grid or work / "screenshots.yaml"
    if args.grid is None:
        grid.write_text(GRID)
    storage = work / "runs"
    (work / "ray").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(work)  # this sweep's Ray session, found below, apart from others
    env["RAY_AUTH_MODE"] = "disabled"  # this Ray only, loopback only: see the module doc
    sweep_log = work / "sweep.log"
    shots: list[tuple[Path, str]] = []
    with (
        started([str(BIN / "nptm"), "sweep", str(grid), "--storage", str(storage)], env, sweep_log)
        as sweep,
    ):  # fmt: skip
        sweep_name = _grid_name(grid)
        db = storage / "mlflow.db"
        wait_for(lambda: db.is_file(), deadline, "the sweep's MLflow store", sweep)
        port = free_port()
        ui_cmd = [str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{db}",
                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
        with started(ui_cmd, env, work / "mlflow-ui.log"):
            ui = f"http://127.0.0.1:{port}"
            wait_for(lambda: http_ok(f"{ui}/health"), deadline, "mlflow ui", None)
            exp_id = wait_for(
                lambda: experiment_id(ui, f"nptm/{sweep_name}"), deadline, "the experiment", sweep
            )
            # The dashboard while a stage runs (it ends with the sweep's local Ray).
            wait_for(lambda: stage_run(ui, exp_id, finished=False), deadline, "a stage", sweep)
            dashboard = wait_for(lambda: dashboard_address(work), deadline, "Ray dashboard", sweep)
            dash = f"http://{dashboard}"
            wait_for(lambda: http_ok(dash), deadline, "the Ray dashboard", sweep)
            print(f"Ray dashboard {dash}")
            pages = [
                ("ray-jobs.png", f"{dash}/#/jobs", "Ray dashboard: jobs"),
                ("ray-actors.png", f"{dash}/#/actors", "Ray dashboard: actors (trial names)"),
            ]
            job = driver_job(dash)
            if job:  # the sweep's driver: its tasks and actors, with their names
                pages.append(("ray-job.png", f"{dash}/#/jobs/{job}", f"Ray dashboard: job {job}"))
            shots += shoot_pages(args, chromium, work, pages)
            # MLflow once a retrain has finished: its curves whole, its summary logged.
            run_id = wait_for(
                lambda: stage_run(ui, exp_id, finished=True), deadline, "a retrain", sweep
            )
            print(f"MLflow UI {ui}: experiment {exp_id}, run {run_id}")
            mode = "?workflowType=machine_learning"  # the UI's "Model training" side
            pages = [
                ("mlflow-runs.png", f"{ui}/#/experiments/{exp_id}/runs{mode}",
                 "MLflow: the runs table, one row per stage beside the sweep's run"),
                ("mlflow-run-chart.png",
                 f"{ui}/#/experiments/{exp_id}/runs/{run_id}/model-metrics{mode}",
                 f"MLflow: metrics tab of retrain run {run_id}, curves (epoch/) first"),
            ]  # fmt: skip
            shots += shoot_pages(args, chromium, work, pages)
    print(f"sweep log: {sweep_log}" if args.keep else "sweep stopped")
    return shots


@contextlib.contextmanager
def started(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`cmd` in its own process group, output to `log`; interrupted and reaped on exit (a
    sweep ends its MLflow runs and its local Ray on SIGINT)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            for sig, wait in ((signal.SIGINT, 60), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                if proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)


def shoot_pages(
    args: argparse.Namespace, chromium: str, work: Path, pages: list[tuple[str, str, str]]
) -> list[tuple[Path, str]]:
    """Each (file name, URL, what) shot into `args.out`; the shots taken."""
    shots = []
    for name, url, what in pages:
        path = args.out / name
        if shoot(chromium, url, path, args.size, args.render_ms, work / "chromium"):
            shots.append((path, what))
        else:
            print(f"warning: no screenshot of {url}", file=sys.stderr)
    return shots


def wait_for(
    probe: Callable[[], object], deadline: float, what: str, proc: subprocess.Popen | None = None
) -> object:
    """Poll `probe` until it returns something truthy; fail if `proc` ends first."""
    while time.time() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            value = probe()
            if value:
                return value
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the sweep ended (exit {proc.returncode}) before {what} was ready")
        time.sleep(1)
    raise SystemExit(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return False


def api(ui: str, path: str, query: dict | None = None, body: dict | None = None) -> dict:
    url = f"{ui}/api/2.0/mlflow/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def experiment_id(ui: str, name: str) -> str | None:
    try:
        return api(ui, "experiments/get-by-name", {"experiment_name": name})["experiment"][
            "experiment_id"
        ]
    except urllib.error.HTTPError:
        return None  # not created yet


def stage_run(ui: str, exp_id: str, *, finished: bool) -> str | None:
    """A stage's run that is RUNNING; with `finished`, a retrain's that has ended with at least
    3 epochs logged (whole curves, and its summary)."""
    query = "tags.`nptm.role` = 'stage' and attributes.status = 'RUNNING'"
    if finished:
        query = "tags.`nptm.stage_kind` = 'retrain' and attributes.status = 'FINISHED'"
    body = {"experiment_ids": [exp_id], "filter": query, "max_results": 50}
    for run in api(ui, "runs/search", body=body).get("runs", []):
        run_id = run["info"]["run_id"]
        key = {"run_id": run_id, "metric_key": "epoch/test_acc"}
        if not finished or len(api(ui, "metrics/get-history", key).get("metrics", [])) >= 3:
            return run_id
    return None


def driver_job(dash: str) -> str | None:
    """Id of the running job (the sweep's driver) as the dashboard's job API lists it."""
    try:
        with urllib.request.urlopen(f"{dash}/api/jobs/", timeout=10) as r:
            jobs = json.load(r)
    except (urllib.error.URLError, TimeoutError, ValueError):
        return None
    running = [j.get("job_id") for j in jobs if j.get("status") == "RUNNING" and j.get("job_id")]
    return running[0] if running else None


def dashboard_address(work: Path) -> str | None:
    """host:port of the dashboard of the Ray session under `work` (its log names it)."""
    for log in sorted(work.glob("ray/session_*/logs/dashboard.log")):
        found = DASHBOARD_LINE.search(log.read_text(errors="replace"))
        if found:
            return found.group(1)
    return None


def headless(chromium: str, profile: Path, render_ms: int, *flags: str) -> list[str]:
    """Headless Chromium on a JS app: `--virtual-time-budget` lets the page run that long (in
    virtual time) to fetch and draw its data before the output; `profile` is a throwaway
    user-data dir; nothing is fetched but the page (no sync, updates or first-run calls)."""
    return [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
        f"--virtual-time-budget={render_ms}", *flags,
    ]  # fmt: skip


def shoot(chromium: str, url: str, path: Path, size: str, render_ms: int, profile: Path) -> bool:
    """One screenshot of `url` (`headless`). A server slowed down by the sweep can stall a
    page: one retry."""
    path.unlink(missing_ok=True)
    flags = ("--hide-scrollbars", f"--window-size={size}", f"--screenshot={path}", url)
    cmd = headless(chromium, profile, render_ms, *flags)
    for attempt in (1, 2):
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            print(f"warning: Chromium timed out on {url} (try {attempt})", file=sys.stderr)
            continue
        if result.returncode == 0 and path.is_file():
            return True
    return False


def _grid_name(grid: Path) -> str:
    import yaml

    return yaml.safe_load(grid.read_text())["name"]


if __name__ == "__main__":
    sys.exit(main())
