"""scikit-learn's seeded splits, kept on local disk once computed.

Importing scikit-learn costs a fresh process 1.5-2 s on 2 cores, and every Ray trial actor and
DDP worker is a fresh process that loads its dataset. The digits images and their train/test
split, and a stratified validation split, are pure functions of their inputs, the seed and
scikit-learn's version (read from the package metadata, without importing it): a process that
finds them in the cache reads a small .npz and never imports scikit-learn.

The cache is `$NPTM_CACHE_DIR`, else `$XDG_CACHE_HOME/nptm`, else `~/.cache/nptm`. Entries are
written atomically (`nptm.trainables.storage.atomic_write_bytes`), so concurrent workers never read
a partial one; an unreadable entry is computed again and replaced. A cache that cannot be
written is skipped: the arrays are computed every time, as without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from nptm.trainables.storage import atomic_write_bytes

Arrays = dict[str, np.ndarray]


def cache_dir() -> Path:
    if os.environ.get("NPTM_CACHE_DIR"):
        return Path(os.environ["NPTM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nptm"


def entry_path(name: str, key: dict[str, Any]) -> Path:
    """Where the arrays of `name` for `key` (JSON-able inputs of the computation) are kept."""
    keyed = {**key, "scikit-learn": version("scikit-learn"), "format": 1}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{name}-{digest}.npz"


def cached(name: str, key: dict[str, Any], compute: Callable[[], Arrays]) -> Arrays:
    """`compute()`'s arrays for `key`, read from the cache when an entry is there."""
    try:
        path = entry_path(name, key)
    except RuntimeError:  # no home directory to keep a cache in (Path.home)
        return compute()
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {k: stored[k] for k in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # absent, or unreadable: computed again and replaced below
    arrays = compute()
    entry = io.BytesIO()
    np.savez(entry, **arrays)
    with contextlib.suppress(OSError):  # a read-only or full disk: no cache, same arrays
        atomic_write_bytes(pafs.LocalFileSystem(), str(path), entry.getvalue())
    return arrays


def labels_digest(labels: np.ndarray) -> str:
    """A key for a split that depends on the labels (their values and order)."""
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    return hashlib.sha256(labels.tobytes()).hexdigest()
