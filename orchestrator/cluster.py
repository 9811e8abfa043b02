"""Connecting to Ray, and checking that a sweep can run on what the cluster has."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nptm.orchestrator.errors import UsageError

log = logging.getLogger(__name__)

# A Tune trial that only drives a TorchTrainer needs a sliver of CPU: the workers do the work.
DRIVER_TRIAL_CPUS = 0.1
AUTH_HINT = (
    "Ray 2.60 clusters use token authentication: give this client the cluster's token with "
    "RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file> (the head keeps it in "
    "~/.ray/auth_token) and RAY_AUTH_MODE=token (nptm sets the mode when it finds a token)"
)
# Ray Train settings for a local Ray that nptm starts itself (a cluster keeps its own): one
# machine has nothing to preempt, so the per-stage PreemptionWatcher actor (one more Python
# process per stage) is not started; and the controller polls its workers every 0.25 s instead
# of 2 s, so a finished stage's worker group is released sooner.
LOCAL_RAY_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}


@dataclass(frozen=True)
class Cluster:
    address: str
    started_here: bool
    dashboard_url: str | None
    nodes: list[dict[str, float]]  # resources of each alive node
    token_auth: bool = False  # the cluster asks for Ray's token (dashboard included)
    token_source: str | None = None  # where this driver's token comes from

    @property
    def multi_node(self) -> bool:
        return len(self.nodes) > 1


_held: Cluster | None = None  # the connection `held_connection` keeps open, if any


@contextlib.contextmanager
def held_connection(
    address: str | None, *, num_cpus: int | None = None, py_modules: list[str] | None = None
) -> Iterator[Cluster]:
    """One connection for several sweeps in this process (`nptm sweep --until-conclusive`
    sweeps once per look): `connect` inside returns it and `disconnect` leaves it open. A
    local Ray is started once, not at every look, and no look's Tune run starts while the
    trial actors of the look before are still being torn down by a driver's shutdown."""
    global _held
    _held = connect(address, num_cpus=num_cpus, py_modules=py_modules)
    try:
        yield _held
    finally:
        _held = None
        disconnect()


def connect(
    address: str | None, *, num_cpus: int | None = None, py_modules: list[str] | None = None
) -> Cluster:
    """Start a local Ray (no address) or join the cluster at `address`. `py_modules`
    (package directories) are shipped to every worker through Ray's runtime_env. Inside
    `held_connection`, its connection."""
    import ray

    if _held is not None:
        return _held

    # Keep worker processes quiet on the terminal: nptm prints its own progress.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if py_modules:
        kwargs["runtime_env"] = {"py_modules": py_modules}
    keep_credentials_out_of_runtime_env()
    try:
        if address:
            _use_token_auth()
            ctx = ray.init(address=address, **kwargs)
        else:
            # "local" always starts a fresh cluster: never attach by accident to another
            # Ray on this machine. Its processes inherit this environment (credentials
            # included: AWS_*, for the storage, reach the stages that way).
            for name, value in LOCAL_RAY_TRAIN_ENV.items():
                os.environ.setdefault(name, value)
            with _loopback_node():
                ctx = ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    **kwargs,
                )
    except Exception as err:  # ray raises ConnectionError, RuntimeError, auth errors...
        # A missing or wrong token surfaces as a plain ConnectionError after Ray's retries.
        hint = f" Check the address, and the token: {AUTH_HINT}." if address else ""
        raise UsageError(f"cannot connect to Ray at {address or 'local'}: {err}.{hint}") from err
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    dashboard = getattr(ctx, "dashboard_url", None)
    token_auth = _token_auth_enabled()
    return Cluster(
        address=ctx.address_info.get("address", address or "local"),
        started_here=not address,
        dashboard_url=f"http://{dashboard}" if dashboard else None,
        nodes=nodes,
        token_auth=token_auth,
        token_source=_token_source() if token_auth else None,
    )


# Ray's switch for "this machine's address is the loopback" (named after the platforms where
# it is the default): the node address that every server of a node binds to.
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_CREDENTIAL_VAR = re.compile(r"^AWS_|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY")


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """While inside, a Ray node started here takes 127.0.0.1 as its address, so that
    everything it serves (GCS, raylet, object manager, dashboard agent, runtime-env agent,
    the Prometheus metrics export, the autoscaler's and dashboard's metrics) listens on the
    loopback only. Ray's default is the machine's outward address, and some of them (the
    metrics export among them) then listen on 0.0.0.0: open to the network for the whole
    sweep. A one-machine Ray needs nothing outside. A user who set LOOPBACK_SWITCH keeps
    Ray's own choice."""
    import ray._private.ray_constants as ray_constants

    if LOOPBACK_SWITCH in os.environ or not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER  # read by ray._private.services at each call
    os.environ[LOOPBACK_SWITCH] = "0"  # the node's processes, started meanwhile, agree
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        os.environ.pop(LOOPBACK_SWITCH, None)


def keep_credentials_out_of_runtime_env() -> None:
    """Stop Ray from copying credentials out of this process's environment into runtime
    environments.

    Ray Tune gives every trial actor the driver's AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN and AWS_SECURITY_TOKEN as the actor's runtime_env `env_vars`, and each
    node's runtime-env agent writes every runtime env it creates to its log in clear
    (``<ray temp dir>/session_*/logs/runtime_env_agent.log``, readable by every user of the
    machine). Credentials reach the stages through each node's own environment instead: a
    local Ray that nptm starts inherits this process's, and a cluster's nodes have theirs
    (their environment, an AWS profile or an instance role). Ray Train's list of variables
    it forwards is cleared of credentials alike (it names none in Ray 2.60)."""
    for module in ("ray.tune.execution.class_cache", "ray.train.v2._internal.constants"):
        try:
            names = getattr(importlib.import_module(module), "ENV_VARS_TO_PROPAGATE", None)
        except ImportError:  # another Ray version: nothing of the kind to change
            continue
        if isinstance(names, set):
            names.difference_update({n for n in names if _CREDENTIAL_VAR.search(n.upper())})


def _token_auth_enabled() -> bool:
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        return bool(is_token_auth_enabled())
    except Exception:  # a private module: absent or changed in another Ray version
        return os.environ.get("RAY_AUTH_MODE") == "token"


def token_file() -> Path:
    """The file Ray reads the cluster token from when RAY_AUTH_TOKEN is unset."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()


def _token_source() -> str:
    """Where Ray reads the token from, in its order of precedence (RAY_AUTH_TOKEN, then
    RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token); `ray get-auth-token` prints it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the environment variable RAY_AUTH_TOKEN"
    return str(token_file())


def plugin_packages(modules: list[str]) -> list[str]:
    """Directories of the top-level packages of a grid's plugin modules (already imported by
    the grid check), for Ray's runtime_env `py_modules`: workers on every node import them
    from there. A single-file module has no directory to ship: it must be installed on every
    node, as must a package that is found through an entry point only (docs/plugins.md)."""
    import sys

    dirs: list[str] = []
    for module in modules:
        top = sys.modules.get(module.split(".")[0])
        paths = list(getattr(top, "__path__", []))
        if len(paths) == 1 and paths[0] not in dirs:  # namespace packages span several
            dirs.append(paths[0])
        elif not paths:
            log.warning("plugin module %r is not a package: install it on every Ray node", module)
    return dirs


def _use_token_auth() -> None:
    """Present the cluster token when one is configured.

    Ray 2.60 clusters require a token; a client whose RAY_AUTH_MODE is unset does not send
    the one it has. Token auth stays on: this never disables it.
    """
    if "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN") or token_file().is_file()
    ):
        os.environ["RAY_AUTH_MODE"] = "token"


def disconnect() -> None:
    """Shut this process's Ray connection down, unless `held_connection` holds it."""
    import ray

    if _held is None and ray.is_initialized():
        ray.shutdown()


def stage_bundles(kind: str, resources: Any) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(Tune trial actor bundle, DDP worker bundles) that a stage of `kind` asks for."""
    worker = {"CPU": float(resources.cpus_per_worker), "GPU": float(resources.gpus_per_worker)}
    if resources.executor == "inline":
        return worker, []
    trial = {"CPU": DRIVER_TRIAL_CPUS, "GPU": 0.0}
    workers = 1 if kind == "prune" else resources.workers_per_trial  # a prune: one Ray task
    return trial, [dict(worker) for _ in range(workers)]


def check_fit(cluster: Cluster, resources: Any, kinds: set[str]) -> None:
    """Refuse, with the shortfall, any stage whose trial actor and workers cannot be placed.

    Without this check Ray Tune waits forever, silently, for a placement that cannot happen.
    Placement as Ray makes it: the Tune trial actor is one bundle on one node, and Ray
    Train's worker group one bundle per worker under the (soft) PACK strategy, so a group
    that no single node holds spreads across nodes. A stage fits when some node holds the
    trial bundle and the nodes, that bundle taken, hold every worker bundle.
    """
    for kind in sorted(kinds):
        trial, workers = stage_bundles(kind, resources)
        if _placeable(cluster.nodes, trial, workers):
            continue
        need = _total([trial, *workers])
        have = _total(cluster.nodes)
        if not any(_holds(node, trial) for node in cluster.nodes):
            short = f"the trial ({_fmt(trial)}) fits no node"
        elif workers and not any(_holds(node, workers[0]) for node in cluster.nodes):
            short = f"a worker ({_fmt(workers[0])}) fits no node"
        else:
            lacking = [
                f"{r} needs {a:g} but the cluster has {have.get(r, 0.0):g}"
                for r, a in need.items()
                if a > have.get(r, 0.0) + 1e-9
            ]
            short = ", ".join(lacking) or "the nodes hold fewer workers than the group has"
        nodes = "; ".join(_fmt(node, ("CPU", "GPU")) or "-" for node in cluster.nodes)
        raise UsageError(
            f"{kind} stages cannot be scheduled: the trial ({_fmt(trial)}) plus "
            f"{len(workers)} worker(s) of ({_fmt(workers[0]) if workers else '-'}) cannot be "
            f"placed on the cluster's nodes ({nodes}): {short}; lower "
            "resources.workers_per_trial / cpus_per_worker / gpus_per_worker or add nodes"
        )


def _placeable(
    nodes: list[dict[str, float]], trial: dict[str, float], workers: list[dict[str, float]]
) -> bool:
    """Whether the trial bundle and the (identical) worker bundles fit the nodes: for
    identical bundles, the count a node holds is exact, so trying each node for the trial
    bundle decides the question."""
    for i, host in enumerate(nodes):
        if not _holds(host, trial):
            continue
        left = {r: host.get(r, 0.0) - a for r, a in trial.items()}
        others = [left if j == i else node for j, node in enumerate(nodes)]
        if not workers or sum(_count(node, workers[0]) for node in others) >= len(workers):
            return True
    return False


def _holds(node: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(node.get(r, 0.0) + 1e-9 >= a for r, a in bundle.items())


def _count(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of `bundle` the node holds."""
    asks = [node.get(r, 0.0) / a for r, a in bundle.items() if a > 0]
    return int(min(asks) + 1e-9) if asks else 1 << 30


def _total(bundles: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for res, amount in bundle.items():
            total[res] = total.get(res, 0.0) + amount
    return total


def _fmt(bundle: dict[str, float], keys: tuple[str, ...] | None = None) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in bundle.items() if v and (keys is None or k in keys))
