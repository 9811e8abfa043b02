"""Read a grid file: plain YAML only, every mistake reported as `GridError` before anything runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nptm.search_spaces.checks import CheckedGrid, check_grid
from nptm.search_spaces.errors import GridError, GridIssue, pydantic_issues, show
from nptm.search_spaces.overrides import apply_overrides, parse_override
from nptm.search_spaces.schema import Grid

__all__ = ["GridError", "load_grid", "parse_grid"]

_CORE = "tag:yaml.org,2002:"
# Tags a grid may contain (all implicit in ordinary YAML); anything else, such as
# !!python/object/apply, is refused before any value is constructed.
_ALLOWED_TAGS = frozenset(
    _CORE + t for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge", "timestamp")
)
# Anchors and aliases are fine, but a file whose aliases expand past this many nodes is an
# attack (a "billion laughs"), not a grid.
_MAX_NODES = 200_000


def load_grid(path: str | Path, overrides: Sequence[str] = ()) -> CheckedGrid:
    """Read and validate the grid file at `path` (raises GridError naming field and value),
    with the command line's ``key.path=value`` `overrides` applied first
    (nptm.search_spaces.overrides): an override is checked like the same edit in the file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GridError(source, [("", "no such file")]) from None
    except IsADirectoryError:
        raise GridError(source, [("", "is a directory, not a grid file")]) from None
    except UnicodeDecodeError as err:
        raise GridError(source, [("", f"is not UTF-8 text ({err.reason})")]) from None
    except OSError as err:
        raise GridError(source, [("", f"cannot be read: {err.strerror}")]) from None
    data = _safe_yaml(text, source)
    if not overrides:
        return parse_grid(data, source)
    try:
        read = lambda raw, where: _safe_yaml(raw, f"{source}: {where}")  # noqa: E731
        parsed = [parse_override(o, read) for o in overrides]
        data = apply_overrides(data, parsed)
    except GridIssue as issue:
        raise GridError(source, [(issue.field, issue.detail)]) from None
    grid = parse_grid(data, f"{source} (with overrides)")
    return dataclasses.replace(grid, source=source, overrides=tuple(overrides))


def parse_grid(data: Any, source: str = "<grid>") -> CheckedGrid:
    """Validate already-parsed grid data (a mapping); `source` names it in error messages."""
    if data is None:
        raise GridError(source, [("", "is empty; a grid needs at least 'name' and 'axes'")])
    if not isinstance(data, dict):
        raise GridError(
            source,
            [
                (
                    "",
                    f"the top level must be a mapping of grid keys "
                    f"(name, axes, ...), got {type(data).__name__} "
                    f"{show(data, 40)}",
                )
            ],
        )
    try:
        grid = Grid.model_validate(data)
    except ValidationError as exc:
        raise GridError(source, pydantic_issues(exc, Grid, data)) from None
    try:
        return check_grid(grid, data, source)
    except GridIssue as issue:
        raise GridError(source, [(issue.field, issue.detail)]) from None


def _safe_yaml(text: str, source: str) -> Any:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = err.problem or err.context or "invalid YAML"
        raise GridError(source, [("", f"{where}invalid YAML: {problem}")]) from None
    except yaml.YAMLError as err:
        raise GridError(source, [("", f"invalid YAML: {err}")]) from None
    if root is None:
        return None
    _check_nodes(root, source)
    # Only core tags are left, so safe_load constructs plain mappings, lists and scalars.
    return yaml.safe_load(text)


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Refuse non-core tags and duplicate keys, naming the field path and line."""
    count = 0
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        count += 1
        if count > _MAX_NODES:
            raise GridError(
                source,
                [
                    (
                        "",
                        f"expands to more than {_MAX_NODES:,} YAML nodes "
                        "(through aliases); refusing it",
                    )
                ],
            )
        line = node.start_mark.line + 1
        if node.tag not in _ALLOWED_TAGS:
            tag = node.tag.replace(_CORE, "!!")
            raise GridError(
                source,
                [
                    (
                        path or "(top level)",
                        f"tag {tag!r} (line {line}) is not "
                        "allowed: a grid is plain YAML (mappings, lists, strings, "
                        "numbers, booleans, null)",
                    )
                ],
            )
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                child = f"{path}.{name}" if path else name
                if isinstance(key, yaml.ScalarNode) and key.tag != _CORE + "merge":
                    if name in seen:
                        raise GridError(
                            source,
                            [
                                (
                                    child,
                                    f"duplicate key (line "
                                    f"{key.start_mark.line + 1}; first at line "
                                    f"{seen[name]})",
                                )
                            ],
                        )
                    seen[name] = key.start_mark.line + 1
                stack.append((key, child))
                stack.append((value, child))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
