"""Existing weights a grid starts from instead of pre-training (`pretrain: {from: ...}`).

The source is a file (local path or URI such as ``s3://bucket/key``) holding either a plain
state_dict or an nptm stage artifact (``stages/<id>/model.pt`` of an unpruned network), or
``torchvision``: the model's default torchvision weights, read from the local torch cache
(``$TORCH_HOME/hub/checkpoints``; nothing is downloaded). The pretrain stage that loads them
is identified by the file's SHA-256, so every grid starting from the same file shares it.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from nptm.trainables.storage import resolve_storage

TORCHVISION = "torchvision"
# What a weights file may be: a regular file (never a FIFO or a device, which are not even
# opened), not empty, at most this large (a VGG-16 state_dict is about 0.5 GiB), read within
# READ_TIMEOUT_S seconds, from a local path or a URI of these schemes (pyarrow's filesystems).
MAX_WEIGHTS_BYTES = 4 * 2**30
READ_TIMEOUT_S = 300.0
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")

_T = TypeVar("_T")


@dataclass(frozen=True)
class StartWeights:
    """A grid's `pretrain.from`, resolved when the grid is checked."""

    source: str  # what the grid says: a path, a URI or "torchvision"
    sha256: str  # of the file's bytes: the pretrain stage's identity


class StartWeightsError(ValueError):
    """Weights that cannot be used: missing, unreadable, pruned, or changed since planning."""


def torchvision_cache_path(model: str) -> Path:
    """Where torch keeps the default torchvision weights of `model` once downloaded."""
    import torch
    import torchvision

    url = torchvision.models.get_model_weights(model).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def source_file(source: str, model: str) -> str:
    """The file `source` names for `model` (the cache file for ``torchvision``)."""
    return str(torchvision_cache_path(model)) if source == TORCHVISION else source


def read_source(source: str, model: str, *, timeout: float = READ_TIMEOUT_S) -> bytes:
    """The bytes of the weights file `source` names (StartWeightsError saying why not)."""
    path = source_file(source, model)
    scheme = path.split("://", 1)[0].lower() if "://" in path else None
    if scheme is not None and scheme not in URI_SCHEMES:
        raise StartWeightsError(
            f"{scheme}:// is not a supported URI scheme (a local path, or "
            f"{', '.join(s + '://' for s in URI_SCHEMES)})"
        )
    if scheme in (None, "file"):
        local = path[len("file://") :] if scheme == "file" else path
        _check_local(local, source, model)
        return _within(timeout, path, lambda: _read_local(local))
    return _within(timeout, path, lambda: _read_remote(path))


def _missing(source: str, model: str, path: str) -> StartWeightsError:
    if source == TORCHVISION:
        return StartWeightsError(
            f"torchvision weights of {model!r} are not in the local torch cache: {path} "
            "(nptm never downloads them; copy the file there or set TORCH_HOME)"
        )
    return StartWeightsError(f"no such file: {path}")


def _check_local(path: str, source: str, model: str) -> None:
    """Refuse anything but a regular, readable, non-empty file of at most MAX_WEIGHTS_BYTES,
    from `os.stat` alone: a FIFO or a device (/dev/zero) is never opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _missing(source, model, path) from None
    except ValueError as err:  # an embedded NUL byte
        raise StartWeightsError(f"is not a valid path: {err}") from None
    except OSError as err:
        raise StartWeightsError(f"cannot be read: {err.strerror or err}") from None
    _check_stat(st.st_mode, st.st_size)
    if not os.access(path, os.R_OK):
        raise StartWeightsError("is not readable (permission denied)")


def _check_stat(mode: int, size: int) -> None:
    if not stat.S_ISREG(mode):
        kind = (
            "a directory" if stat.S_ISDIR(mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file"
        )  # fmt: skip
        raise StartWeightsError(f"is {kind}, not a regular weights file")
    _check_size(size)


def _check_size(size: int) -> None:
    if size == 0:
        raise StartWeightsError("is empty (0 bytes), not a weights file")
    if size > MAX_WEIGHTS_BYTES:
        raise StartWeightsError(
            f"is {size / 2**30:.1f} GiB, more than the {MAX_WEIGHTS_BYTES / 2**30:g} GiB a "
            "weights file may be"
        )


def _read_local(path: str) -> bytes:
    # O_NONBLOCK: should the path have become a FIFO since the stat, opening does not wait.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        _check_stat(st.st_mode, st.st_size)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_WEIGHTS_BYTES + 1)
    finally:
        os.close(fd)
    _check_size(len(data))
    return data


def _read_remote(path: str) -> bytes:
    import pyarrow.fs as pafs

    parent, name = os.path.split(path.rstrip("/"))
    try:
        fs, root, _ = resolve_storage(parent)
    except Exception as err:  # pyarrow's ArrowInvalid for a URI it cannot use, ...
        raise StartWeightsError(f"cannot be opened: {_first_line(err)}") from None
    where = f"{root}/{name}"
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.NotFound:
        raise StartWeightsError(f"no such file: {path}")
    if info.type != pafs.FileType.File:
        raise StartWeightsError(f"is a {info.type.name.lower()}, not a weights file")
    if info.size is not None:
        _check_size(info.size)
    with fs.open_input_stream(where) as f:
        data = f.read(MAX_WEIGHTS_BYTES + 1)
    _check_size(len(data))
    return data


def _within(timeout: float, path: str, read: Callable[[], _T]) -> _T:
    """`read()`, given up after `timeout` seconds (a hung mount or server): it runs on a
    daemon thread, left behind if it never returns."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = read()
        except BaseException as err:  # handed to the caller
            box["error"] = err

    thread = threading.Thread(target=run, name="nptm-read-weights", daemon=True)
    thread.start()
    thread.join(timeout if math.isfinite(timeout) else None)
    if thread.is_alive():
        raise StartWeightsError(f"reading {path} took more than {timeout:g} s; giving up")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_state_dict(data: bytes, expected_sha256: str | None = None) -> dict:
    """The state_dict in `data` (a state_dict, or an nptm artifact of an unpruned network)."""
    import torch

    if expected_sha256 is not None and sha256(data) != expected_sha256:
        raise StartWeightsError(
            f"the weights file changed since the sweep was planned (SHA-256 {sha256(data)}, "
            f"planned {expected_sha256})"
        )
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # EOFError, UnpicklingError, RuntimeError, KeyError, ...
        raise StartWeightsError(
            f"is not a file torch.save wrote ({type(err).__name__}: {_first_line(err)})"
        ) from None
    if not isinstance(payload, dict):
        raise StartWeightsError(f"holds a {type(payload).__name__}, not a state_dict")
    if "state_dict" in payload:  # an nptm stage artifact
        if payload.get("plans"):
            raise StartWeightsError("is a pruned network (its artifact lists pruning plans)")
        payload = payload["state_dict"]
    if not isinstance(payload, dict):
        raise StartWeightsError(f"holds a {type(payload).__name__}, not a state_dict")
    for key, value in payload.items():
        if not isinstance(value, torch.Tensor):
            raise StartWeightsError(f"entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise StartWeightsError(f"entry {key!r} holds NaN or infinite values")
    return payload
