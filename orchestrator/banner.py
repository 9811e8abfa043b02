"""What a user sees as a sweep starts: where its dashboard, Grafana, MLflow runs and results
are (`SweepStart`, `banner`), the dashboard checked where the driver reaches it and shown where
a browser does (nptm.orchestrator.public_urls)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nptm.trainables.redact import redact_uri

if TYPE_CHECKING:
    from nptm.orchestrator.cluster import Cluster
    from nptm.orchestrator.planner import Plan
    from nptm.orchestrator.public_urls import PublicUrls
    from nptm.results.run_record import RunRecord
    from nptm.results.tracking import MlflowRecorder


@dataclass(frozen=True)
class MlflowLinks:
    """Where a browser finds a sweep's MLflow runs: `uri` is where nptm logs them (redacted),
    `public` the UI's address a browser opens (NPTM_PUBLIC_MLFLOW_URL)."""

    uri: str | None
    public: str | None = None
    experiment_id: str | None = None

    @property
    def ui(self) -> str | None:
        """The MLflow UI's base URL, or None when it must be started first (`command`)."""
        uri = self.public or self.uri or ""
        return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None

    @property
    def command(self) -> str | None:
        """The command that serves the UI of a store without a server (sqlite, files)."""
        if not self.uri or self.ui:
            return None
        return f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1 --port 5000"

    @property
    def runs_url(self) -> str | None:
        """The experiment's runs table: MLflow 3's UI otherwise opens an experiment on its
        GenAI overview ("Traces: 0")."""
        if self.experiment_id is None or not self.uri:
            return None
        return f"{self.ui or 'http://127.0.0.1:5000'}/#/experiments/{self.experiment_id}/runs"


@dataclass
class SweepStart:
    """Where a user watches the sweep that is starting (printed before its first stage)."""

    sweep: str
    storage: str  # the sweep's directory in storage
    run_record: str  # its run record (grid, plan, versions, progress)
    planned: dict[str, int]  # stages per kind
    to_run: int  # stages without a finished outcome yet
    dashboard_url: str | None = None  # where a browser opens it (NPTM_PUBLIC_DASHBOARD_URL)
    dashboard_local: bool = True  # nptm's own local Ray: gone when the sweep ends
    dashboard_answers: bool = False
    token_auth: bool = False
    token_source: str | None = None  # where the token comes from
    mlflow_uri: str | None = None
    experiment_name: str | None = None
    experiment_id: str | None = None
    mlflow_degraded: bool = False
    mlflow_public: str | None = None  # the UI where a browser opens it (NPTM_PUBLIC_MLFLOW_URL)
    grafana_url: str | None = None  # nptm's Grafana dashboard (NPTM_PUBLIC_GRAFANA_URL)
    notes: list[str] = field(default_factory=list)

    @property
    def mlflow(self) -> MlflowLinks:
        return MlflowLinks(self.mlflow_uri, self.mlflow_public, self.experiment_id)


def url_answers(url: str, timeout: float = 10.0) -> bool:
    """Whether an HTTP server answers at `url` within `timeout` seconds; any status counts
    (a dashboard behind token auth answers 401 to a request without the token)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


def sweep_start(
    plan: Plan,
    cluster: Cluster,
    recorder: MlflowRecorder,
    record: RunRecord,
    done: int,
    public: PublicUrls,
) -> SweepStart:
    """What the banner says of `plan`'s sweep, `done` of its stages already finished."""
    counts = Counter(spec.kind.value for spec in plan.stages.values())
    url = cluster.dashboard_url
    return SweepStart(
        sweep=plan.name,
        storage=record.layout.sweep_location(plan.name),
        run_record=record.location(),
        planned=dict(counts),
        to_run=len(plan.stages) - done,
        dashboard_url=public.dashboard or url,
        dashboard_local=cluster.started_here,
        dashboard_answers=bool(url) and url_answers(url),
        token_auth=cluster.token_auth,
        token_source=cluster.token_source,
        mlflow_uri=redact_uri(recorder.uri),  # shown: never a password
        experiment_name=recorder.experiment_name,
        experiment_id=recorder.experiment_id,
        mlflow_degraded=recorder.degraded,
        mlflow_public=public.mlflow,
        grafana_url=public.grafana_dashboard(plan.name),
    )


def banner(start: SweepStart) -> str:
    """Where to watch the sweep, printed before its first stage."""
    kinds = ", ".join(f"{n} {kind}" for kind, n in start.planned.items())
    lines = [f"sweep {start.sweep}: {sum(start.planned.values())} stages ({kinds}); "
             f"{start.to_run} to run"]  # fmt: skip
    if start.dashboard_url:
        state = "answers" if start.dashboard_answers else "not answering yet"
        where = "nptm's local Ray, up while the sweep runs" if start.dashboard_local else "cluster"
        lines.append(f"  Ray dashboard: {start.dashboard_url} ({where}; {state})")
        if start.token_auth:
            lines.append(
                f"    it asks for Ray's token: `ray get-auth-token` prints it "
                f"(read from {start.token_source})"
            )
    if start.grafana_url:
        lines.append(f"  Grafana: {start.grafana_url}")
    if start.mlflow_uri:
        down = " (unreachable: results go to Parquet only)" if start.mlflow_degraded else ""
        shown = start.mlflow_uri
        if start.mlflow_public:  # a browser's address; the driver's may be a container's name
            shown = f"{start.mlflow_public} (nptm logs to {start.mlflow_uri})"
        lines.append(f"  MLflow: {shown}, experiment {start.experiment_name}{down}")
        if start.mlflow.command:
            lines.append(f"    UI: {start.mlflow.command}")
        if start.mlflow.runs_url:
            lines.append(f"    runs: {start.mlflow.runs_url}")
    lines.append(f"  results: {start.storage}")
    lines.append(f"  run record: {start.run_record} (`nptm status {start.sweep}`)")
    return "\n".join(lines)
