"""Evolutionary allocation: never over budget, the parent's fitness never worsens, an interrupted search resumes to
the same result, and a saved state from a different search is refused."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compress.search.base import Option, Unit, cost_range
from compress.errors import CompressError, InputError
from compress.search.evolution import EvolutionSettings, ResumeError, evolve
from compress.search.knapsack import knapsack

QUIET = dict(log=lambda *_: None)
option = st.tuples(st.integers(1, 30), st.floats(0, 5, allow_nan=False))


def _units(raw):
    return [Unit(f"u{i}", tuple(Option(level=j, cost=c, error=e) for j, (c, e) in enumerate(opts)))
            for i, opts in enumerate(raw)]


def _batch(one):
    """A batch fitness (what `evolve` calls) from a one-candidate function."""
    return lambda candidates, stage: [one(c, stage) for c in candidates]


def _one_fitness(units, calls=None):
    """Additive errors plus an interaction term (what a knapsack cannot see), a little noisier on few tokens."""
    def f(choice, stage):
        if calls is not None:
            calls.append(stage)
        errs = [u.options[choice[u.name]].error for u in units]
        base = sum(errs) + 0.3 * max(errs) * min(errs)
        return base * (1.0 + (0.05 if stage == 0 else 0.0) * ((hash(tuple(choice.values())) % 7) - 3) / 3)
    return f


def _fitness(units, calls=None):
    return _batch(_one_fitness(units, calls))


@settings(max_examples=60, deadline=None)  # units with one option: the ones an override pins
@given(st.lists(st.lists(option, min_size=1, max_size=4), min_size=2, max_size=6), st.floats(0, 1), st.integers(0, 5))
def test_never_over_budget_and_parent_never_worsens(raw, frac, seed):
    units = _units(raw)
    lo, hi = cost_range(units)
    budget = lo + frac * (hi - lo)
    start = knapsack(units, budget).choice
    alloc = evolve(units, budget, _fitness(units), start,
                   EvolutionSettings(generations=8, offspring=6, survivors=(2,), seed=seed), **QUIET)
    assert alloc.cost <= budget + 1e-9
    fits = [h["fitness"] for h in alloc.details["history"]]
    assert all(b <= a for a, b in zip(fits, fits[1:]))
    assert alloc.error == fits[-1] == _one_fitness(units)(alloc.choice, 1)


def test_the_search_improves_a_poor_start():
    """From the cheapest allocation (every unit at its lowest level) under a budget that allows more, the search
    raises units and ends with a lower error than it started with (the pass tier cannot assert this: from the
    knapsack's start on the tiny model, whether any offspring beats it depends on the CPU's last bits)."""
    units, budget = _instance()
    start = {u.name: 0 for u in units}
    fitness = _one_fitness(units)
    alloc = evolve(units, budget, _batch(lambda c, _stage: fitness(c, 1)), start,
                   EvolutionSettings(generations=10, offspring=6, survivors=(2,), seed=0), **QUIET)
    assert alloc.cost <= budget + 1e-9
    assert alloc.error < fitness(start, 1)
    assert alloc.details["history"][-1]["fitness"] < alloc.details["history"][0]["fitness"]


def _instance():
    raw = [[(c * k, e / k) for k in (2, 3, 4, 8)] for c, e in [(10, 5.0), (10, 1.0), (30, 2.0), (30, 4.0), (20, 3.0)]]
    units = _units(raw)
    return units, 3.0 * sum(u.options[0].cost / 2 for u in units)  # an average of 3 "bits"


def test_interrupted_search_resumes_to_the_same_result(tmp_path):
    units, budget = _instance()
    start = knapsack(units, budget).choice
    cfg = EvolutionSettings(generations=12, offspring=6, survivors=(2,), seed=3)
    whole = evolve(units, budget, _fitness(units), start, cfg, **QUIET)

    calls = []

    def dies_halfway(choice, stage):
        if len(calls) > 40:
            raise KeyboardInterrupt
        return _one_fitness(units, calls)(choice, stage)

    state = tmp_path / "evo.json"
    with pytest.raises(KeyboardInterrupt):
        evolve(units, budget, _batch(dies_halfway), start, cfg, state_path=state, **QUIET)
    assert state.exists()
    resumed = evolve(units, budget, _fitness(units), start, cfg, state_path=state, **QUIET)
    assert resumed.details["resumed_from"] and 0 < resumed.details["resumed_from"] < 12
    assert resumed.choice == whole.choice and resumed.error == whole.error
    assert [h["fitness"] for h in resumed.details["history"]] == [h["fitness"] for h in whole.details["history"]]


def test_a_different_search_is_refused(tmp_path):
    units, budget = _instance()
    start = knapsack(units, budget).choice
    state = tmp_path / "evo.json"
    cfg = EvolutionSettings(generations=2, offspring=4, survivors=(2,))
    evolve(units, budget, _fitness(units), start, cfg, state_path=state, identity={"recipe": "a", "data": "x"}, **QUIET)
    with pytest.raises(ResumeError, match=r"\(what changed: recipe\)"):
        evolve(units, budget, _fitness(units), start, cfg, state_path=state, identity={"recipe": "b", "data": "x"},
               **QUIET)
    with pytest.raises(ResumeError, match="what changed: budget") as err:
        evolve(units, budget - 1, _fitness(units), knapsack(units, budget - 1).choice, cfg, state_path=state,
               identity={"recipe": "a", "data": "x"}, **QUIET)
    assert isinstance(err.value, InputError) and err.value.exit_code == 2  # the CLI says it, no traceback
    state.write_text('{"identity": {"recipe": "a"')  # damaged by hand: refused by name, not a JSON traceback
    with pytest.raises(ResumeError, match=r"evo.json: saved search state is unreadable .*delete it"):
        evolve(units, budget, _fitness(units), start, cfg, state_path=state, identity={"recipe": "a", "data": "x"},
               **QUIET)


@pytest.mark.parametrize("broken", [float("nan"), float("-inf")])
def test_candidates_with_non_finite_fitness_are_never_selected_and_are_counted(broken):
    """-inf would win every comparison, nan none; both mean a variant overflowed, so neither may become the parent,
    and a finite better candidate still wins beside them."""
    units, budget = _instance()
    start = {u.name: min(range(len(u.options)), key=lambda k: u.options[k].cost) for u in units}  # room to improve
    good = _one_fitness(units)
    bad = lambda choice, stage: broken if choice != start and hash(tuple(choice.values())) % 2 else good(choice, stage)  # noqa: E731
    cfg = EvolutionSettings(generations=6, offspring=6, survivors=(2,), seed=1)
    res = evolve(units, budget, _batch(bad), start, cfg, **QUIET)
    assert res.details["non_finite_evaluations"] > 0
    fits = [h["fitness"] for h in res.details["history"]]
    assert all(math.isfinite(f) for f in fits) and all(b <= a for a, b in zip(fits, fits[1:]))
    assert sum(h["accepted"] for h in res.details["history"][1:]) > 0  # finite improvements were still taken
    with pytest.raises(CompressError, match="starting allocation's fitness is nan"):
        evolve(units, budget, _batch(lambda c, s: float("nan")), start, cfg, **QUIET)


@settings(max_examples=80, deadline=None)  # units with one option: the ones an override pins
@given(st.lists(st.lists(option, min_size=1, max_size=4), min_size=2, max_size=7), st.floats(0, 1), st.integers(0, 9))
def test_mutants_fit_the_budget_and_leave_no_untouched_unit_that_could_still_rise(raw, frac, seed):
    import random

    from compress.search.evolution import _mutate, _sorted_options

    units = _sorted_options(_units(raw))
    lo, hi = cost_range(units)
    budget = lo + frac * (hi - lo)
    parent = [k for k in knapsack(units, budget).choice.values()]
    rng = random.Random(seed)
    cost = lambda c: sum(u.options[o].cost for u, o in zip(units, c))  # noqa: E731
    for _ in range(20):
        child = _mutate(units, parent, budget, rng, 3)
        if child is None:
            continue
        assert cost(child) <= budget + 1e-9 and child != parent
        assert all(0 <= o < len(u.options) for u, o in zip(units, child))
        risen_only = [i for i in range(len(units)) if child[i] == parent[i] and child[i] < len(units[i].options) - 1]
        # a unit the mutation did not touch is raised by the fill whenever one more level fits
        assert all(cost(child) + units[i].options[child[i] + 1].cost - units[i].options[child[i]].cost > budget + 1e-9
                   for i in risen_only)


def test_fitness_is_asked_for_whole_batches_and_must_answer_each_candidate():
    """The start alone on the last stage, then per generation all offspring on stage 0 and the survivors on the last:
    the batches an executor may spread over workers."""
    units, budget = _instance()
    start = knapsack(units, budget).choice
    batches = []
    one = _one_fitness(units)

    def fitness(candidates, stage):
        batches.append((len(candidates), stage))
        return [one(c, stage) for c in candidates]

    cfg = EvolutionSettings(generations=3, offspring=6, survivors=(2,), seed=0)
    res = evolve(units, budget, fitness, start, cfg, **QUIET)
    assert batches == [(1, 1)] + [(6, 0), (2, 1)] * 3
    assert res.details["evaluations"] == 1 + 3 * (6 + 2)
    with pytest.raises(CompressError, match="fitness gave 1 scores for 6 candidates"):
        evolve(units, budget, lambda cs, stage: [1.0] if stage == 0 else [1.0] * len(cs), start, cfg, **QUIET)
