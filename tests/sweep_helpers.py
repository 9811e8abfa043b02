"""Running `nptm` as a user would (a subprocess) and reading what a sweep left behind."""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pandas as pd

from tests.ports import free_port

NPTM = [sys.executable, "-m", "nptm.orchestrator"]
ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

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
    console: bool = False,
    **kw,
):
    """Run the CLI in a fresh process: `python -m nptm.orchestrator`, or with `console` the
    installed `nptm` script. Kept for what needs a process of its own (the entry points, a
    driver that gets killed); everything else calls `sweep_in_process`."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full_env.pop("RAY_ADDRESS", None)  # never attach to a Ray the environment points at
    full_env.update(env or {})
    command = [str(Path(sys.executable).parent / "nptm")] if console else NPTM
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
        **kw,
    )


@dataclass
class DashboardProbe:
    """What the banner's dashboard line said, and whether the URL answered HTTP (any status:
    without the token, Ray's dashboard answers 401) while the sweep was still running."""

    url: str | None = None
    answered_while_running: bool = False


def nptm_probing_dashboard(
    *args: str,
    cwd: Path,
    timeout: float = 600,
    started: Callable[[subprocess.Popen], None] | None = None,
):
    """`nptm ARGS` from the console script, as `nptm(..., console=True)`; as soon as its
    start-up banner names the Ray dashboard, a request to that URL is made while the sweep
    still runs. `started` is handed the process once it runs. Returns (the
    CompletedProcess, a DashboardProbe)."""
    import re
    import tempfile
    import urllib.error
    import urllib.request

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    probe, out_lines = DashboardProbe(), []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "nptm"), *args], cwd=cwd, env=env, text=True,
            stdout=subprocess.PIPE, stderr=err,
        )  # fmt: skip
        if started is not None:
            started(proc)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out_lines.append(line)
                found = probe.url is None and re.search(r"Ray dashboard: (http://\S+)", line)
                if found:
                    probe.url = found.group(1)
                    try:
                        urllib.request.urlopen(probe.url, timeout=10).close()
                        answered = True
                    except urllib.error.HTTPError:
                        answered = True
                    except OSError:
                        answered = False
                    probe.answered_while_running = answered and proc.poll() is None
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
        err.seek(0)
        result = subprocess.CompletedProcess(proc.args, rc, "".join(out_lines), err.read())
    return result, probe


def cli_in_process(argv: list[str], env: dict[str, str] | None = None) -> CliResult:
    """`nptm ARGV` in this process, as a user's shell would see it: exit code, stdout, and
    stderr with the warnings nptm logs (a fresh process prints them there). The environment
    is restored afterwards: nptm sets process-wide defaults (Tune's pending-trial limit,
    MLflow's HTTP retries) that must not leak into the next sweep."""
    import logging

    from nptm.orchestrator.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)  # what logging's last resort does in a fresh process
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        with restored_environ(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            os.environ.update(env or {})
            rc = main(argv)
    finally:
        logging.getLogger().removeHandler(handler)
    return CliResult(rc, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def restored_environ() -> Iterator[None]:
    """Puts the process environment back as it was, key by key: another thread that starts a
    process meanwhile never sees it empty."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@functools.cache
def _migrated_empty_mlflow_db() -> Path:
    """An empty MLflow sqlite store, made by MLflow itself once per session: a new store runs
    every schema migration (seconds on 2 cores), a copy of this one costs nothing."""
    from mlflow import MlflowClient

    directory = Path(tempfile.mkdtemp(prefix="nptm-mlflow-template-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def empty_mlflow_store(storage: Path) -> str:
    """Give `storage` the embedded MLflow store a first sweep would create there (unless it
    has one); returns its tracking URI. `tiny_sweep` still has nptm create its own."""
    db = storage / "mlflow.db"
    if not db.exists():
        storage.mkdir(parents=True, exist_ok=True)
        shutil.copy(_migrated_empty_mlflow_db(), db)
    return f"sqlite:///{db}"


def sweep_on(node, grid: Path, storage: Path, *args: str, env: dict[str, str] | None = None):
    """`nptm sweep GRID` in this process, joined to the running Ray `node` (a
    tests.ray_cluster.RayCluster). Its embedded MLflow store starts as `empty_mlflow_store`."""
    if "--mlflow-uri" not in args:
        empty_mlflow_store(storage)
    argv = ["sweep", str(grid), "--storage", str(storage), "--address", node.address, "--no-report"]
    return cli_in_process([*argv, *args], env=env)


def seed_stages(
    source: Path, storage: Path, grid: Path, kinds: tuple[str, ...] = ("pretrain",)
) -> list[str]:
    """Copy into `storage` the finished stages of `source` (a sweep's storage root) that
    `grid`'s plan shares with it, of the given kinds: the sweep then reuses them, as it
    would reuse a colleague's stages in shared storage. Returns the copied stage ids."""
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import load_grid
    from nptm.trainables.artifacts import ArtifactStore, rewind_name

    copied, have = [], ArtifactStore(str(source))
    for sid, spec in build_plan(load_grid(grid)).stages.items():
        if spec.kind in kinds and (source / "stages" / sid / "outcome.json").is_file():
            # A pre-training is reusable only with every rewind checkpoint `grid` needs.
            missing = [e for e in spec.keep_epochs if not have.exists(sid, rewind_name(e))]
            assert not missing, f"{source} lacks rewind epochs {missing} of {sid}"
            shutil.copytree(source / "stages" / sid, storage / "stages" / sid)
            copied.append(sid)
    assert copied, f"no stage of {grid} to reuse from {source}"
    return copied


def copy_storage(source: Path, storage: Path) -> Path:
    """A finished sweep's whole storage root (stages, tables, MLflow store), copied."""
    shutil.copytree(source, storage)
    return storage


class _FaultInjector(threading.Thread):
    """Injects `fault()` from a thread of its own as soon as `ready()` holds (see
    `with_fault`)."""

    def __init__(
        self, ready: Callable[[], bool], fault: Callable[[], None], timeout: float
    ) -> None:
        super().__init__(name="fault-injector", daemon=True)
        self.ready, self.fault, self.timeout = ready, fault, timeout
        self.ended = threading.Event()
        self.injected: list[BaseException | None] = []  # None: injected; else what it raised

    def run(self) -> None:
        deadline = time.time() + self.timeout
        while time.time() < deadline and not self.ended.is_set():
            if self.ready():
                try:
                    self.fault()
                    self.injected.append(None)
                except BaseException as err:  # raised in the caller's thread by with_fault
                    self.injected.append(err)
                return
            time.sleep(0.2)


def with_fault(
    sweep: Callable[[], T],
    log: Callable[[T], str],
    *,
    ready: Callable[[], bool],
    fault: Callable[[], None],
    timeout: float = 600,
) -> T:
    """`sweep()` (a sweep in this process, a driver or a Ray job in another), with `fault()`
    (kill a server, a node, send a signal) injected from a thread as soon as `ready()` holds.
    Returns what `sweep()` returned; fails if it ended before the fault (`log` of its result
    says why), or raises what the fault raised."""
    injector = _FaultInjector(ready, fault, timeout)
    injector.start()
    try:
        result = sweep()
    finally:
        injector.ended.set()
        injector.join()
    assert injector.injected, "the sweep ended before the fault: " + log(result)[-3000:]
    if injector.injected[0] is not None:
        raise injector.injected[0]
    return result


def sweep_with_fault(
    node,
    grid: Path,
    storage: Path,
    *args: str,
    env: dict[str, str] | None = None,
    ready: Callable[[], bool],
    fault: Callable[[], None],
    timeout: float = 600,
) -> CliResult:
    """`sweep_on(node, grid, storage, *args)` `with_fault`."""
    return with_fault(
        lambda: sweep_on(node, grid, storage, *args, env=env),
        lambda result: result.stderr, ready=ready, fault=fault, timeout=timeout,
    )  # fmt: skip


def trials(storage: Path, sweep: str = "tiny") -> pd.DataFrame:
    return pd.read_parquet(storage / "sweeps" / sweep / "stages")


def executions(storage: Path, stage_id: str) -> int:
    """How many times the stage was started (first run, retries, resumes and refused attempts
    all count): the `attempts` of its row in the `stages` table of whichever sweep recorded it
    last; 0 if none did."""
    import pyarrow.parquet as pq

    rows = [
        pq.read_table(path, columns=["attempts"])["attempts"][0].as_py() or 0
        for path in storage.glob(f"sweeps/*/stages/{stage_id}.parquet")
    ]
    return max(rows, default=0)


def mlflow_stage_runs(uri: str, sweep: str = "tiny") -> list:
    """Every MLflow run of the sweep that records a stage (the parent sweep run excluded)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(f"nptm/{sweep}")
    assert exp is not None, f"no MLflow experiment for {sweep}"
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs += [r for r in page if "nptm.stage_id" in r.data.tags]
        token = page.token
        if not token:
            return runs


def plan_stage_ids(grid: Path) -> set[str]:
    """Every stage id of the grid's plan: what a complete sweep must have recorded."""
    from nptm.orchestrator.planner import build_plan
    from nptm.search_spaces import load_grid

    return set(build_plan(load_grid(grid)).stages)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 over an sqlite store, in its own process group.

    Entering starts it without waiting (start-up takes tens of seconds on a busy machine);
    `wait()` blocks until /health answers. `kill()` ends the whole group with SIGKILL, as a
    crashed server would; leaving the context kills whatever is still running.
    """

    def __init__(self, db: Path, log: Path) -> None:
        self.db = db
        self.log = log
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        if not self.db.exists():  # a store MLflow made: the server runs no schema migration
            shutil.copy(_migrated_empty_mlflow_db(), self.db)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server",
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.db}",
                 "--default-artifact-root", (self.db.parent / "mlartifacts").as_uri()],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        return self

    def wait(self, timeout: float = 240) -> str:
        import urllib.request

        assert self.proc is not None
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.uri
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"mlflow server did not come up: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its group: the server's workers too
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextlib.contextmanager
def watched_concurrency():
    """While inside, the DAG searcher and Tune's trial table of in-process sweeps are watched;
    yields `{"handed_out": n, "tune_running": m}`, filled in as the sweep runs: the most
    stages handed out to Tune at once, and the most trials Tune had RUNNING at once."""
    from nptm.orchestrator.dag_search import RUNNING, DagSearcher
    from nptm.orchestrator.monitor import SweepMonitor

    peaks = {"handed_out": 0, "tune_running": 0}
    suggest, step_end = DagSearcher.suggest, SweepMonitor.on_step_end

    def watched_suggest(self, trial_id):
        config = suggest(self, trial_id)
        peaks["handed_out"] = max(peaks["handed_out"], self.count(RUNNING))
        return config

    def watched_step_end(self, iteration, trials, **info):
        running = sum(1 for t in trials if t.status == "RUNNING")
        peaks["tune_running"] = max(peaks["tune_running"], running)
        return step_end(self, iteration, trials, **info)

    DagSearcher.suggest = watched_suggest
    SweepMonitor.on_step_end = watched_step_end
    try:
        yield peaks
    finally:
        DagSearcher.suggest, SweepMonitor.on_step_end = suggest, step_end
