"""Name -> entry tables for the kinds of things a grid names: datasets, models, pruners,
presets, schedules.

A `Registry` is a read-only mapping once its built-ins are registered (nptm.trainables.catalog), so
`name in REG`, `REG[name]`, `sorted(REG)` work as on a dict. Looking up an unknown name raises
`UnknownName`, whose message offers the closest known name. A name that was renamed can be
`retire`d: looking it up then names its successor instead of a guess.

Entries refer to their code by import path ("package.module:attribute", the format of a Python
entry point) and `resolve` imports it on first use. The registries therefore stay free of torch
and torchvision, and a later plugin mechanism can register entries the same way the built-ins
do.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

E = TypeVar("E")

__all__ = ["Registry", "UnknownName", "close_match", "resolve"]


class UnknownName(KeyError, ValueError):
    """A name no registry entry has. `str(err)` is the readable message."""

    def __init__(self, kind: str, name: object, message: str) -> None:
        super().__init__(message)
        self.kind, self.name, self.message = kind, name, message

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


def close_match(word: object, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(str(word), sorted(choices), n=1, cutoff=0.6)
    return close[0] if close else None


class Registry(Mapping[str, E], Generic[E]):
    """Entries of one kind by name, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, E] = {}
        self._retired: dict[str, str] = {}  # old name -> why, naming the successor

    def register(self, name: str, entry: E) -> E:
        if name in self._entries or name in self._retired:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def retire(self, old: str, reason: str) -> None:
        """Refuse `old` from now on with `reason` (which names what to use instead)."""
        if old in self._entries:
            raise ValueError(f"{self.kind} {old!r} is registered; it cannot be retired")
        self._retired[old] = reason

    def unknown_reason(self, name: object) -> str:
        """Why `name` is not an entry: retired (and its successor), or the closest name."""
        if isinstance(name, str) and name in self._retired:
            return f"{self.kind} {name!r} {self._retired[name]}"
        close = close_match(name, list(self._entries))
        if close is not None:
            return f"unknown {self.kind} {name!r}; did you mean {close!r}?"
        return f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}"

    def __getitem__(self, name: str) -> E:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownName(self.kind, name, self.unknown_reason(name)) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


_resolved: dict[str, Any] = {}


def resolve(ref: str) -> Any:
    """The object an import path "package.module:attribute" names (imported once)."""
    obj = _resolved.get(ref)
    if obj is None:
        module, _, attr = ref.partition(":")
        if not module or not attr:
            raise ValueError(f"import path {ref!r} is not of the form 'package.module:attribute'")
        obj = getattr(importlib.import_module(module), attr)
        _resolved[ref] = obj
    return obj
