"""Where a batch of candidate evaluations runs: the seam a later change fans out to several workers.

An executor maps a function over a batch and returns the results in the batch's order. `LocalExecutor` runs them one
after another in this process; a distributed one (each worker holding its own copy of the model) must return the same
values in the same order, so a search's result does not depend on where its candidates were scored."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Executor(Protocol):
    def map(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]: ...


class LocalExecutor:
    """Each item in order, in this process (the model under search is shared, so one at a time)."""

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
        return [fn(item) for item in items]
