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
import os
from dataclasses import dataclass
from pathlib import Path

from nptm.trainables.storage import read_bytes, resolve_storage

TORCHVISION = "torchvision"


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


def read_source(source: str, model: str) -> bytes:
    path = source_file(source, model)
    parent, name = os.path.split(path.rstrip("/"))
    fs, root, _ = resolve_storage(parent or ".")
    data = read_bytes(fs, f"{root}/{name}")
    if data is None:
        where = (
            f"torchvision weights of {model!r} are not in the local torch cache: {path} "
            "(nptm never downloads them; copy the file there or set TORCH_HOME)"
            if source == TORCHVISION
            else f"no such file: {path}"
        )
        raise StartWeightsError(where)
    return data


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
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise StartWeightsError(f"holds a {type(payload).__name__}, not a state_dict")
    if "state_dict" in payload:  # an nptm stage artifact
        if payload.get("plans"):
            raise StartWeightsError("is a pruned network (its artifact lists pruning plans)")
        payload = payload["state_dict"]
    return payload
