"""The allocation interface shared by every budget allocator (knapsack, evolution) and every pass that uses one.

A `Unit` is something that takes one setting: a layer, or a group of modules that must share it (fused q/k/v,
fused gate/up). Each unit offers `Option`s: a level (bits, a kept width, ...), its cost (bits or parameters) and its
measured error. An allocator picks one option per unit so that the summed cost stays within a budget, and returns
an `Allocation` that records how it was found. A search that measures candidates on the model calls a `Fitness` with
a batch of them at once (the seam where an executor spreads evaluations over workers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# fitness(candidates, stage) -> one score per candidate, lower is better; a candidate maps each unit's name to an index
# into its options, `stage` indexes the token sets of a staged search (0 = fewest tokens)
Fitness = Callable[[list[dict[str, int]], int], list[float]]


@dataclass(frozen=True)
class Option:
    level: Any  # what the pass applies: a bit width, a kept width, a sparsity level
    cost: float  # in the budget's unit (bits, parameters, bytes); >= 0
    error: float = 0.0  # measured error of this option (lower is better); used by the knapsack


@dataclass(frozen=True)
class Unit:
    name: str
    options: tuple[Option, ...]
    members: tuple[str, ...] = ()  # the modules that share this unit's setting

    def __post_init__(self):
        if not self.options:
            raise ValueError(f"unit {self.name}: no options")
        if any(o.cost < 0 for o in self.options):
            raise ValueError(f"unit {self.name}: negative cost")


@dataclass
class Allocation:
    choice: dict[str, int]  # unit name -> index into its options
    cost: float
    budget: float
    method: str
    error: float  # summed option errors (knapsack) or fitness (evolution)
    details: dict = field(default_factory=dict)  # how it was found: discretization, generations, evaluations, ...

    def levels(self, units: list[Unit]) -> dict[str, Any]:
        return {u.name: u.options[self.choice[u.name]].level for u in units}


def cost_range(units: list[Unit]) -> tuple[float, float]:
    """The smallest and largest total cost any allocation can have."""
    return (sum(min(o.cost for o in u.options) for u in units), sum(max(o.cost for o in u.options) for u in units))


def check_budget(units: list[Unit], budget: float, what: str = "budget") -> None:
    """A budget no allocation can meet is an input error: say the range that can be met."""
    lo, hi = cost_range(units)
    if budget < lo - 1e-9 * max(1.0, abs(lo)):
        raise ValueError(f"{what} {budget:g} is below the smallest possible total {lo:g} (every unit at its "
                         f"cheapest option)")
    if budget > hi + 1e-9 * max(1.0, abs(hi)):
        raise ValueError(f"{what} {budget:g} is above the largest possible total {hi:g} (every unit at its "
                         f"most expensive option)")


def total(units: list[Unit], choice: dict[str, int], attr: str = "cost") -> float:
    return float(sum(getattr(u.options[choice[u.name]], attr) for u in units))
