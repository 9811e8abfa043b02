"""Grid errors: one line per mistake, `FILE: FIELD.PATH: what is wrong with VALUE`."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError


class GridError(ValueError):
    """A grid file that cannot be run. `str(err)` is the readable message, one line per issue."""

    def __init__(self, source: str, issues: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.issues = list(issues)  # (field path, what is wrong)
        lines = [
            f"{source}: {field}: {detail}" if field else f"{source}: {detail}"
            for field, detail in self.issues
        ]
        super().__init__("\n".join(lines))

    @property
    def field(self) -> str:
        """Field path of the first issue ('' when it concerns the file as a whole)."""
        return self.issues[0][0] if self.issues else ""


class GridIssue(Exception):
    """One mistake found by the checks; the loader adds the file name and raises GridError."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def show(value: Any, limit: int = 80) -> str:
    """A value as it would be quoted in a message: strings quoted, long ones cut."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """'; did you mean 'x'?' for a close match, else the list of allowed choices."""
    choices = sorted(choices)
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f" (allowed: {', '.join(choices)})" if choices else ""


def field_path(loc: Sequence[str | int], raw: Any = None) -> str:
    """('axes', 'pruner', 1, 'ratio') -> 'axes.pruner[1].ratio'.

    With the raw YAML data, an index into a value that was written as a scalar (an axis may
    be `seed: 0`) is dropped, so the path names what the user wrote.
    """
    out = ""
    node = raw
    for part in loc:
        if isinstance(part, int):
            if raw is not None and not isinstance(node, list):
                continue
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out


def pydantic_issues(
    exc: ValidationError,
    model: type[BaseModel],
    raw: Any,
    prefix: Sequence[str | int] = (),
) -> list[tuple[str, str]]:
    """Translate pydantic's errors into (field path, detail) pairs naming the bad value."""
    issues: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        kind, value = err["type"], err.get("input")
        if loc and loc[-1] == "[key]":  # a mapping key of the wrong type
            issues.append(
                (field_path(prefix + loc[:-2], raw), f"key {show(loc[-2])} should be a string")
            )
            continue
        path = field_path(tuple(prefix) + loc, raw)
        if kind == "missing":
            detail = "required key is missing"
        elif kind == "extra_forbidden":
            detail = "unknown key" + did_you_mean(loc[-1], allowed_keys(model, loc[:-1]))
        elif kind == "too_short" and isinstance(value, list | dict) and not value:
            detail = f"{show(value)} is empty; give at least one value"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            detail = f"{show(value)} should be a mapping"
        elif kind == "list_type":
            detail = f"{show(value)} should be a list"
        elif kind == "literal_error":
            allowed = [
                s.strip("'") for s in err["ctx"]["expected"].replace(" or ", ", ").split(", ")
            ]
            detail = f"{show(value)} is not one of {', '.join(map(repr, allowed))}"
            close = difflib.get_close_matches(str(value), allowed, n=1)
            detail += f"; did you mean {close[0]!r}?" if close else ""
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if msg.startswith("Input should be "):
                detail = f"{show(value)} should be {msg.removeprefix('Input should be ')}"
            else:
                detail = f"{show(value)}: {msg[0].lower()}{msg[1:]}"
        issues.append((path, detail))
    return issues


def allowed_keys(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """Keys of the pydantic model found at `loc` inside `model` (for did-you-mean)."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            args = typing.get_args(tp)
            tp = args[0] if args else Any
        elif isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        else:
            return []
    tp = _unwrap(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _unwrap(tp: Any) -> Any:
    """Strip Annotated[...] and `| None` down to the type that holds the fields."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp
