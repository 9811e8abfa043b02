"""Command-line overrides of a grid: ``key.path=value`` with a YAML-typed value, applied to the
parsed file before validation, so an override is checked like the same edit in the file.

    axes.seed=[0,1,2,3,4]            a list
    resources.gpus_per_worker=0.25   a number
    pretrain.cifar10.lr=0.05         a mapping created on the way where the file has none
    axes.pruner[0].ratio=[0.5,0.9]   an element of a list
    name=quickstart-5seeds           the sweep's name too
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

from nptm.search_spaces.errors import GridIssue, show

__all__ = ["apply_overrides", "parse_override"]

_STEP = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")

Path_ = tuple[str | int, ...]


def parse_override(text: str, parse_value: Any) -> tuple[Path_, Any]:
    """``'axes.seed=[0,1]'`` -> ``(('axes', 'seed'), [0, 1])``; `parse_value` reads the YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise GridIssue(f"override {text!r}", "expected KEY.PATH=VALUE, e.g. axes.seed=[0,1,2]")
    path: list[str | int] = []
    pos = 0
    while pos < len(key):
        m = _STEP.match(key, pos)
        # a.b[0].c: a key after the first follows a dot; the path starts with a key
        dotted = key.startswith(".", pos)
        if m is None or (m[1] is not None and dotted != bool(path)) or (not path and m[2]):
            raise GridIssue(f"override {text!r}", f"{key!r} is not a key path (a.b[0].c)")
        path.append(m[1] if m[1] is not None else int(m[2]))
        pos = m.end()
    return tuple(path), parse_value(raw, f"override {key}")


def apply_overrides(data: Any, overrides: Sequence[tuple[Path_, Any]]) -> dict[str, Any]:
    """A copy of the grid data with each override set, in order (a later one wins)."""
    out = copy.deepcopy(data) if isinstance(data, dict) else {}
    for path, value in overrides:
        node: Any = out
        for i, step in enumerate(path[:-1]):
            node = _child(node, step, path[: i + 1], path[i + 1])
        _set(node, path[-1], value, path)
    return out


def _child(node: Any, step: str | int, where: Path_, next_step: str | int) -> Any:
    if isinstance(step, int):
        _check_index(node, step, where)
        return node[step]
    if not isinstance(node, dict):
        raise GridIssue(_name(where[:-1]), f"{show(node)} is not a mapping; cannot set {step!r}")
    if node.get(step) is None:  # a section the file leaves out (or null): created empty
        node[step] = [] if isinstance(next_step, int) else {}
    return node[step]


def _set(node: Any, step: str | int, value: Any, path: Path_) -> None:
    if isinstance(step, int):
        _check_index(node, step, path)
    elif not isinstance(node, dict):
        raise GridIssue(_name(path[:-1]), f"{show(node)} is not a mapping; cannot set {step!r}")
    node[step] = value


def _check_index(node: Any, index: int, where: Path_) -> None:
    if not isinstance(node, list):
        raise GridIssue(_name(where[:-1]), f"{show(node)} is not a list; cannot index [{index}]")
    if index >= len(node):
        raise GridIssue(_name(where), f"index {index} is past the list's {len(node)} entries")


def _name(path: Path_) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out or "(top level)"
