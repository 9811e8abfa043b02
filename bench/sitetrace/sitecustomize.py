"""Time stamps of a sweep's phases, for bench/overhead.py; inert unless NPTM_BENCH_TRACE is set.

bench/overhead.py puts this directory first on PYTHONPATH of the `nptm sweep` it starts, so
every Python process of that sweep (the driver, Ray's workers, the Tune trial actors, the Ray
Train workers) imports it at start-up. It wraps a few functions as their modules are imported,
without touching the files, and appends one JSON line per event to the file NPTM_BENCH_TRACE
names: {"t": unix time, "pid", "event", ...}.

Events: proc_start (cmdline) in every process, proc_title (its cmdline 5 s later, once Ray
has named it); suggest / complete_enter / complete_exit
(DagSearcher, driver); trial_enter / trial_exit (the Tune trainable); trainer_enter /
trainer_exit (TorchTrainer.fit around a stage); pg_enter / pg_exit
(torch.distributed.init_process_group); worker_enter / worker_exit (each DDP rank's function);
stage_enter / stage_exit (nptm.trainables.stage_runner.run_stage); import_enter / import_exit
(module) around the import of each patched module.
"""

from __future__ import annotations

import functools
import importlib.abc
import json
import os
import sys
import time

_PATH = os.environ.get("NPTM_BENCH_TRACE")


def record(event: str, **fields: object) -> None:
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **fields})
    fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())  # one small O_APPEND write: lines never interleave
    finally:
        os.close(fd)


def _cmdline() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return " ".join(sys.argv)[:200]


def _stage(config: dict) -> dict:
    """A Tune trial's config names its stage only; a Ray Train rank's holds the whole stage."""
    if "stage_id" in config:
        return {"stage": config["stage_id"]}
    stage = config.get("stage", {})
    return {"stage": stage.get("id"), "kind": stage.get("kind")}


def _wrap(module: object, name: str, enter: str, exit_: str, fields) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        info = fields(*args, **kwargs)
        record(enter, **info)
        try:
            return original(*args, **kwargs)
        finally:
            record(exit_, **info)

    setattr(module, name, wrapper)  # same module and name: pickled by reference as before


def _patch_trial(m: object) -> None:
    _wrap(m, "stage_trial", "trial_enter", "trial_exit", lambda config, **_: _stage(config))
    _wrap(
        m,
        "_run_torch_trainer",
        "trainer_enter",
        "trainer_exit",
        lambda spec, runtime: {"stage": spec.id, "kind": spec.kind},
    )
    _wrap(
        m,
        "_train_worker",
        "worker_enter",
        "worker_exit",
        lambda config: {**_stage(config), "rank": _rank()},
    )


def _patch_stage_runner(m: object) -> None:
    _wrap(
        m,
        "run_stage",
        "stage_enter",
        "stage_exit",
        lambda spec, env, report=None: {"stage": spec.id, "kind": spec.kind, "rank": env.rank},
    )


def _rank() -> int:
    try:
        import ray.train

        return ray.train.get_context().get_world_rank()
    except Exception:
        return -1


def _patch_dag(m: object) -> None:
    cls = m.DagSearcher
    suggest, complete = cls.suggest, cls.on_trial_complete

    def traced_suggest(self, trial_id):
        out = suggest(self, trial_id)
        if isinstance(out, dict):
            record("suggest", **_stage(out), trial=trial_id)
        return out

    def traced_complete(self, trial_id, result=None, error=False):
        sid = self.trial_stage.get(trial_id)
        record("complete_enter", stage=sid, trial=trial_id)
        try:
            return complete(self, trial_id, result, error)
        finally:
            record("complete_exit", stage=sid, trial=trial_id)

    cls.suggest, cls.on_trial_complete = traced_suggest, traced_complete


def _patch_dist(m: object) -> None:
    _wrap(m, "init_process_group", "pg_enter", "pg_exit", lambda *a, **k: {})


_PATCHES = {
    "nptm.orchestrator.trial": _patch_trial,
    "nptm.trainables.stage_runner": _patch_stage_runner,
    "nptm.orchestrator.dag_search": _patch_dag,
    "torch.distributed": _patch_dist,
}


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the patched modules with the other finders, then patches them once executed."""

    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def patched_exec(module):
            record("import_enter", module=name)
            exec_module(module)
            record("import_exit", module=name)
            _PATCHES[name](module)

        spec.loader.exec_module = patched_exec
        return spec


def _title_later() -> None:
    """Ray renames its processes (ray::ClassName) once they know their role: record it."""
    import threading

    timer = threading.Timer(5.0, lambda: record("proc_title", cmd=_cmdline()))
    timer.daemon = True
    timer.start()


if _PATH:
    record("proc_start", cmd=_cmdline())
    sys.meta_path.insert(0, _Finder())
    _title_later()
