"""Read a grid file: plain YAML only, every mistake reported as `GridError` before anything runs."""

from __future__ import annotations

import dataclasses
import os
import stat
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
_MAX_GRID_BYTES = 16 * 2**20  # a grid of 200,000 numbers is about 2 MB
# A grid nests a few levels (axes.pruner[0].ratio[0] is 5); composing YAML recurses per level,
# so a deeper file is refused as it is read, before Python's recursion limit is reached.
_MAX_DEPTH = 32
# Tags whose node must be a sequence or a mapping; every other allowed tag is a scalar's.
_COLLECTION_TAGS = {_CORE + "seq": yaml.SequenceNode, _CORE + "map": yaml.MappingNode}


def load_grid(path: str | Path, overrides: Sequence[str] = ()) -> CheckedGrid:
    """Read and validate the grid file at `path` (raises GridError naming field and value),
    with the command line's ``key.path=value`` `overrides` applied first
    (nptm.search_spaces.overrides): an override is checked like the same edit in the file."""
    source = str(path)
    try:
        text = _read_text(Path(path), source)
    except GridError:
        raise
    except FileNotFoundError:
        raise GridError(source, [("", "no such file")]) from None
    except IsADirectoryError:
        raise GridError(source, [("", "is a directory, not a grid file")]) from None
    except UnicodeDecodeError as err:
        raise GridError(source, [("", f"is not UTF-8 text ({err.reason})")]) from None
    except ValueError as err:  # an embedded NUL byte in the path
        raise GridError(source, [("", f"is not a valid path: {err}")]) from None
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


def _read_text(path: Path, source: str) -> str:
    """The file's text, once `os.stat` says it is a regular file of at most _MAX_GRID_BYTES: a
    FIFO would wait forever, /dev/zero never end."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(source)
    if not stat.S_ISREG(st.st_mode):
        raise GridError(source, [("", "is not a regular file (a FIFO, a device, ...)")])
    if st.st_size > _MAX_GRID_BYTES:
        raise GridError(
            source,
            [("", f"is {st.st_size:,} bytes; a grid file is at most {_MAX_GRID_BYTES:,}")],
        )
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never waits, should it have changed
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise GridError(source, [("", "is not a regular file (a FIFO, a device, ...)")])
        data = f.read(_MAX_GRID_BYTES + 1)
    if len(data) > _MAX_GRID_BYTES:
        raise GridError(source, [("", f"is more than {_MAX_GRID_BYTES:,} bytes")])
    return data.decode("utf-8")


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


class _TooDeep(Exception):
    def __init__(self, path: str, line: int) -> None:
        super().__init__(path)
        self.path, self.line = path, line


class _DepthLimitedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting past _MAX_DEPTH, naming the field path."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._steps: list[str] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if parent is None:
            step = ""
        elif isinstance(index, yaml.ScalarNode):
            step = f".{index.value}"
        elif isinstance(index, int):
            step = f"[{index}]"
        else:
            step = ".?" if index is not None else ""  # a mapping key (index None)
        self._steps.append(step)
        try:
            if len(self._steps) > _MAX_DEPTH:
                path = "".join(self._steps).lstrip(".") or "(top level)"
                raise _TooDeep(path, self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._steps.pop()


# libyaml's parser where PyYAML has it (5x faster on a long axis); its composer recurses in
# C, so the nesting is checked on the event stream first.
_FAST_LOADER = getattr(yaml, "CSafeLoader", None)


def _compose(text: str) -> yaml.Node | None:
    if _FAST_LOADER is None:
        return yaml.compose(text, Loader=_DepthLimitedLoader)
    _check_depth(yaml.parse(text, Loader=_FAST_LOADER))
    return yaml.compose(text, Loader=_FAST_LOADER)


def _check_depth(events: Any) -> None:
    """Raise _TooDeep at the first node nested past _MAX_DEPTH, from the parser's events
    (a loop, however deep the text): `_DepthLimitedLoader`'s check without its composer."""
    # per open collection: [is a mapping, key or index of the current item, expecting a key]
    frames: list[list[Any]] = []
    try:
        for event in events:
            _on_event(frames, event)
    except yaml.MarkedYAMLError as err:  # libyaml stops at 1,000 levels, scanning ahead
        if "nesting depth" not in str(err.problem):
            raise
        mark = err.problem_mark or err.context_mark
        raise _TooDeep(_event_path(frames), mark.line + 1 if mark else 0) from None


def _on_event(frames: list[list[Any]], event: yaml.Event) -> None:
    if isinstance(event, yaml.CollectionEndEvent):
        frames.pop()
        _next_item(frames)
        return
    if not isinstance(event, yaml.NodeEvent):
        return
    if len(frames) + 1 > _MAX_DEPTH:
        raise _TooDeep(_event_path(frames), event.start_mark.line + 1)
    if isinstance(event, yaml.CollectionStartEvent):
        if frames and frames[-1][0] and frames[-1][2]:
            frames[-1][1] = "?"  # a collection as a key
        frames.append([isinstance(event, yaml.MappingStartEvent), 0, True])
        return
    if frames and frames[-1][0] and frames[-1][2]:  # a mapping's key
        frames[-1][1] = event.value if isinstance(event, yaml.ScalarEvent) else "?"
    _next_item(frames)


def _next_item(frames: list[list[Any]]) -> None:
    """A node of the innermost collection is complete: its next key, value or item."""
    if not frames:
        return
    frame = frames[-1]
    if frame[0]:
        frame[2] = not frame[2]
    else:
        frame[1] += 1


def _event_path(frames: list[list[Any]]) -> str:
    """The field path of the node being added (of its mapping, for a key)."""
    steps = [f".{f[1]}" if f[0] else f"[{f[1]}]" for f in frames]
    if frames and frames[-1][0] and frames[-1][2]:  # the node is a key: its mapping's path
        steps.pop()
    return "".join(steps).lstrip(".") or "(top level)"


def _safe_yaml(text: str, source: str) -> Any:
    try:
        root = _compose(text)
    except _TooDeep as err:
        raise GridError(source, [(err.path, _too_deep(err.line))]) from None
    except RecursionError:  # not expected below _MAX_DEPTH; refused all the same
        raise GridError(source, [("", f"nests too deeply; {_too_deep(None)}")]) from None
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
    # Only core tags on nodes of their kind, scalars that construct, scalar keys and mappings
    # to merge are left: constructing gives plain mappings, lists and scalars.
    loader = (_FAST_LOADER or yaml.SafeLoader)("")
    try:
        return loader.construct_document(root)
    except (yaml.YAMLError, ValueError, TypeError, KeyError, RecursionError) as err:
        problem = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise GridError(source, [("", f"invalid YAML: {problem}")]) from None
    finally:
        loader.dispose()


def _too_deep(line: int | None) -> str:
    where = f" (line {line})" if line else ""
    return (
        f"nests deeper than {_MAX_DEPTH} levels{where}; a grid is a few levels deep "
        "(axes.pruner[0].ratio[0] is 5)"
    )


_CONSTRUCTOR = yaml.constructor.SafeConstructor()


def _scalar_problem(node: yaml.ScalarNode) -> str | None:
    """Why a scalar does not construct as its tag says (`!!bool maybe`, `!!int x`, a date
    such as 2020-13-45, an int of more digits than Python reads), or None."""
    if node.tag == _CORE + "str":
        return None
    construct = _CONSTRUCTOR.yaml_constructors.get(node.tag)
    try:
        construct(_CONSTRUCTOR, node)  # type: ignore[misc]
    except Exception as err:
        if node.tag == _CORE + "bool":
            return "a bool is true or false (or yes/no, on/off)"
        text = str(err).strip().splitlines()
        return text[-1] if text else type(err).__name__
    return None


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Refuse non-core tags, tags on nodes of another kind, scalars that do not construct,
    keys that are not scalars, merges of anything but mappings, duplicate keys and nesting
    (through aliases too) past _MAX_DEPTH, naming the field path and line."""
    count = 0
    stack: list[tuple[yaml.Node, str, int]] = [(root, "", 1)]
    while stack:
        node, path, depth = stack.pop()
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
        where = path or "(top level)"
        if depth > _MAX_DEPTH:  # aliases can nest what the text does not
            raise GridError(source, [(where, _too_deep(line))])
        if node.tag not in _ALLOWED_TAGS:
            tag = node.tag.replace(_CORE, "!!")
            raise GridError(
                source,
                [
                    (
                        where,
                        f"tag {tag!r} (line {line}) is not "
                        "allowed: a grid is plain YAML (mappings, lists, strings, "
                        "numbers, booleans, null)",
                    )
                ],
            )
        tag = node.tag.replace(_CORE, "!!")
        kind = _COLLECTION_TAGS.get(node.tag, yaml.ScalarNode)
        if not isinstance(node, kind) or node.tag == _CORE + "merge":
            raise GridError(
                source, [(where, f"tag {tag!r} (line {line}) does not fit a {_kind(node)}")]
            )
        if isinstance(node, yaml.ScalarNode):
            problem = _scalar_problem(node)
            if problem is not None:
                raise GridError(
                    source,
                    [(where, f"{node.value!r} (line {line}) is not a valid {tag}: {problem}")],
                )
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                child = f"{path}.{name}" if path else name
                key_line = key.start_mark.line + 1
                if not isinstance(key, yaml.ScalarNode):
                    raise GridError(
                        source,
                        [
                            (
                                where,
                                f"a key (line {key_line}) is a {_kind(key)}; keys of a grid "
                                "are plain names",
                            )
                        ],
                    )
                if key.tag == _CORE + "merge":
                    _check_merge(value, child, source)
                    stack.append((value, child, depth + 1))
                    continue
                if name in seen:
                    raise GridError(
                        source,
                        [(child, f"duplicate key (line {key_line}; first at line {seen[name]})")],
                    )
                seen[name] = key_line
                stack.append((key, child, depth + 1))
                stack.append((value, child, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(node.value))


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    return "list" if isinstance(node, yaml.SequenceNode) else "scalar"


def _check_merge(value: yaml.Node, path: str, source: str) -> None:
    """`<<:` merges a mapping, or a list of mappings, into the mapping it stands in."""
    items = value.value if isinstance(value, yaml.SequenceNode) else [value]
    for item in items:
        if not isinstance(item, yaml.MappingNode):
            line = item.start_mark.line + 1
            raise GridError(
                source,
                [
                    (
                        path,
                        f"merges a {_kind(item)} (line {line}); '<<' takes a mapping or a "
                        "list of mappings (usually aliases: <<: *defaults)",
                    )
                ],
            )
