"""Where a user's browser reaches the services of a sweep, when that is not where the driver
reaches them: in Compose or Kubernetes the driver logs to `http://mlflow:5000` and its Ray
dashboard is `http://<head's container address>:8265`, names no browser resolves, while the
user opens the published `http://127.0.0.1:5000` and `:8265`. The start-up banner and the
sweep's summary print these instead (docker-compose.yml sets them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from nptm.orchestrator.errors import UsageError

GRAFANA_DASHBOARD_UID = "nptm"  # the uid of deploy/grafana/nptm.json
# The environment variable of each address.
ENV = {
    "dashboard": "NPTM_PUBLIC_DASHBOARD_URL",
    "mlflow": "NPTM_PUBLIC_MLFLOW_URL",
    "grafana": "NPTM_PUBLIC_GRAFANA_URL",
}


@dataclass(frozen=True)
class PublicUrls:
    dashboard: str | None = None  # the Ray dashboard
    mlflow: str | None = None  # the MLflow UI
    grafana: str | None = None  # Grafana, with nptm's dashboard

    @classmethod
    def from_env(cls) -> PublicUrls:
        """The settings of this process's environment; UsageError for one that is no URL."""
        return cls(**{field: _url(name) for field, name in ENV.items()})

    def grafana_dashboard(self, sweep: str) -> str | None:
        """nptm's Grafana dashboard (deploy/grafana/nptm.json), showing `sweep`."""
        if self.grafana is None:
            return None
        return f"{self.grafana}/d/{GRAFANA_DASHBOARD_UID}?var-sweep={quote(sweep)}"


def _url(name: str) -> str | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and " " not in value
    except ValueError:  # e.g. an unclosed IPv6 bracket
        ok = False
    if not ok:
        raise UsageError(f"{name}: {value!r} is not an http:// or https:// URL")
    if parts.username or parts.password:  # printed on the terminal and in job logs
        raise UsageError(f"{name} carries credentials (user:password@): give the address only")
    return value.rstrip("/")
