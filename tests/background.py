"""Work that tests need finished, started ahead of them on a thread of its own: a sweep whose
processes mostly wait on each other runs while other tests fill the cores."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Background(threading.Thread, Generic[T]):
    """`work()` on a daemon thread; `result()` waits for it and returns its value, or raises
    what it raised (in every test that asks)."""

    def __init__(self, name: str, work: Callable[[], T]) -> None:
        super().__init__(name=name, daemon=True)
        self._work = work
        self._value: T | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._value = self._work()
        except BaseException as err:  # raised again in the tests that need the result
            self._error = err

    def result(self) -> T:
        self.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
