"""Multiple-choice knapsack (ROCKET-style): one option per unit, minimal summed error, total cost within the budget.

Solved exactly by dynamic programming over the budget in integer steps. When the costs share a common step (bits
of equally sized layers) the step is their greatest common divisor and the result is exact; otherwise the budget is
cut into `max_bins` steps, costs are rounded up (so the result never exceeds the true budget) and a second pass with
costs rounded down gives a lower bound on the best error: the gap between the two is the discretization loss,
reported with the result.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from compress.search.base import Allocation, Unit, check_budget, total

MAX_BINS = 200_000


def _common_step(costs: list[float], budget: float, max_bins: int) -> int | None:
    """The gcd of integer costs when it makes the budget fit in max_bins steps; None when costs are not integers."""
    if not all(float(c).is_integer() for c in costs):
        return None
    g = 0
    for c in costs:
        g = math.gcd(g, int(c))
    g = max(g, 1)
    return g if budget / g <= max_bins else None


def _solve(weights: list[np.ndarray], errors: list[np.ndarray], capacity: int) -> tuple[float, list[int]]:
    """min sum errors s.t. sum weights <= capacity; weights are non-negative integers. Returns (error, choice)."""
    best = np.zeros(capacity + 1)  # best[c]: least error of the units so far within capacity c
    picks = np.empty((len(weights), capacity + 1), dtype=np.int16)
    for u, (w, e) in enumerate(zip(weights, errors, strict=True)):
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=np.int16)
        for o in range(len(w)):
            wo = int(w[o])
            if wo > capacity:
                continue
            cand = best[: capacity + 1 - wo] + e[o]
            better = cand < new[wo:]
            new[wo:][better] = cand[better]
            pick[wo:][better] = o
        best, picks[u] = new, pick
    if not np.isfinite(best[capacity]):
        return math.inf, []
    choice, c = [], capacity
    for u in range(len(weights) - 1, -1, -1):
        o = int(picks[u, c])
        choice.append(o)
        c -= int(weights[u][o])
    return float(best[capacity]), choice[::-1]


def _cheapest(unit: Unit) -> int:
    """Index of the unit's cheapest option (ties: the lower error, then the first)."""
    return min(range(len(unit.options)), key=lambda o: (unit.options[o].cost, unit.options[o].error))


def knapsack(units: list[Unit], budget: float, max_bins: int = MAX_BINS) -> Allocation:
    """The allocation with the least summed error whose total cost is <= budget (exact up to the reported
    discretization)."""
    check_budget(units, budget)
    costs = [o.cost for u in units for o in u.options]
    errors = [np.array([o.error for o in u.options], dtype=np.float64) for u in units]
    step = _common_step(costs, budget, max_bins)
    if step is not None:
        weights = [np.array([int(o.cost) // step for o in u.options]) for u in units]
        err, choice = _solve(weights, errors, int(budget // step))
        details: dict[str, object] = {"exact": True, "step": step, "bins": int(budget // step)}
    else:
        step_f = Fraction(budget) / max_bins if budget > 0 else Fraction(1)
        up = [np.array([math.ceil(Fraction(o.cost) / step_f) for o in u.options]) for u in units]
        down = [np.array([math.floor(Fraction(o.cost) / step_f) for o in u.options]) for u in units]
        capacity = math.floor(Fraction(budget) / step_f)
        err, choice = _solve(up, errors, capacity)
        lower, _ = _solve(down, errors, capacity)
        if not choice:  # rounding up made the cheapest allocation overflow: the budget is tight at the minimum
            choice = [_cheapest(u) for u in units]
            err = float(sum(e[o] for e, o in zip(errors, choice, strict=True)))
        details = {"exact": False, "step": float(step_f), "bins": capacity, "error_lower_bound": lower,
                   "discretization_loss": err - lower}
    picked = {u.name: o for u, o in zip(units, choice, strict=True)}
    return Allocation(choice=picked, cost=total(units, picked), budget=budget, method="knapsack",
                      error=total(units, picked, "error"), details=details)
