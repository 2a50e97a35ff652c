"""Multiple-choice knapsack: equals brute force on small instances, never exceeds the budget, reports its rounding."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compress.search.base import Option, Unit, cost_range
from compress.search.knapsack import knapsack

option = st.tuples(st.integers(0, 40), st.floats(0, 10, allow_nan=False))
instance = st.lists(st.lists(option, min_size=1, max_size=4), min_size=1, max_size=5)


def _units(raw, scale=1.0):
    return [Unit(f"u{i}", tuple(Option(level=j, cost=c * scale, error=e) for j, (c, e) in enumerate(opts)))
            for i, opts in enumerate(raw)]


def _brute(units, budget):
    best = None
    for combo in itertools.product(*(range(len(u.options)) for u in units)):
        cost = sum(u.options[o].cost for u, o in zip(units, combo))
        if cost <= budget + 1e-9:
            err = sum(u.options[o].error for u, o in zip(units, combo))
            best = err if best is None else min(best, err)
    return best


@settings(max_examples=300, deadline=None)
@given(instance, st.floats(0, 1))
def test_equals_brute_force_with_integer_costs(raw, frac):
    units = _units(raw)
    lo, hi = cost_range(units)
    budget = lo + frac * (hi - lo)
    alloc = knapsack(units, budget)
    assert alloc.details["exact"] is True
    assert alloc.cost <= budget + 1e-9
    assert alloc.error == pytest.approx(_brute(units, budget), abs=1e-9)
    assert set(alloc.choice) == {u.name for u in units}


@settings(max_examples=200, deadline=None)
@given(instance, st.floats(0, 1))
def test_fractional_costs_stay_within_budget_and_bound_the_loss(raw, frac):
    units = _units(raw, scale=1.37)  # not integers: the budget is discretized
    lo, hi = cost_range(units)
    budget = lo + frac * (hi - lo)
    alloc = knapsack(units, budget, max_bins=64)
    best = _brute(units, budget)
    assert alloc.cost <= budget + 1e-9
    assert alloc.error >= best - 1e-9
    if alloc.details["exact"] is False:
        assert alloc.details["error_lower_bound"] <= best + 1e-9
        assert alloc.error - best <= alloc.details["discretization_loss"] + 1e-9


def test_picks_the_cheapest_error_reduction():
    # two layers, the second is 10x more sensitive: the spare budget goes to it
    units = [Unit("a", (Option(3, 30, 1.0), Option(4, 40, 0.5))),
             Unit("b", (Option(3, 30, 10.0), Option(4, 40, 5.0)))]
    alloc = knapsack(units, 70)
    assert alloc.levels(units) == {"a": 3, "b": 4} and alloc.error == 6.0 and alloc.cost == 70


@pytest.mark.parametrize("budget, message", [(59, "below the smallest possible total 60"),
                                             (81, "above the largest possible total 80")])
def test_budget_outside_the_range(budget, message):
    units = [Unit("a", (Option(3, 30, 1.0), Option(4, 40, 0.5)))] * 2
    with pytest.raises(ValueError, match=message):
        knapsack(units, budget)
