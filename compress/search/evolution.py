"""Evolutionary allocation (EvoPress-style): a (1 + lambda) search over one level per unit under a cost budget.

Each generation draws `offspring` candidates from the parent with a level-switch mutation (raise some units, lower
others, keep the total cost within the budget) and selects in stages: every offspring is scored on few tokens, the
best `survivors[k]` go on to the next stage's larger token set, and the last stage compares the finalists with the
parent on the same tokens. The parent is replaced only by a strictly better candidate, so the parent's fitness on the
final stage's fixed tokens never worsens. The search is seeded and saves its state after every generation; started
again with the same state file it resumes where it stopped and reaches the same result as an uninterrupted run.

Fitness is asked for a batch at a time (all offspring of a stage, or all finalists), in a fixed order, so an executor
may score a batch anywhere without changing the result.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compress.atomic import write_text_atomic
from compress.errors import CompressError, InputError
from compress.progress import tqdm
from compress.search.base import Allocation, Fitness, Unit, check_budget, total
from compress.search.variants import fingerprint


@dataclass(frozen=True)
class EvolutionSettings:
    generations: int = 50
    offspring: int = 16
    survivors: tuple[int, ...] = (4,)  # how many go on from each stage but the last; len + 1 = number of stages
    max_switches: int = 3  # units raised per mutation (each raise is paid for by lowering others)
    seed: int = 0


    @classmethod
    def from_config(cls, config, seed: int) -> EvolutionSettings:
        """From a recipe's evolution settings (generations, offspring, survivors, max_switches) and the run seed."""
        return cls(generations=config.generations, offspring=config.offspring, survivors=tuple(config.survivors),
                   max_switches=config.max_switches, seed=seed)


class ResumeError(InputError, ValueError):
    """A saved search state that does not belong to this search."""


def _mutate(units: list[Unit], parent: list[int], budget: float, rng: random.Random,
            max_switches: int) -> list[int] | None:
    """Raise 1..max_switches random units by one level, lower random others until the cost fits the budget, then
    raise untouched units (random order) while they still fit, so that candidates use the budget they are given."""
    child = list(parent)
    step = lambda i, d: units[i].options[child[i] + d].cost - units[i].options[child[i]].cost  # noqa: E731
    raisable = [i for i, u in enumerate(units) if child[i] < len(u.options) - 1]
    if not raisable:
        return None
    raised = rng.sample(raisable, min(len(raisable), rng.randint(1, max_switches)))
    cost = sum(u.options[o].cost for u, o in zip(units, child, strict=True))
    for i in raised:
        cost += step(i, 1)
        child[i] += 1
    lowerable = [i for i, u in enumerate(units) if child[i] > 0 and i not in raised]
    rng.shuffle(lowerable)
    lowered = set()
    while cost > budget and lowerable:
        i = lowerable.pop()
        cost += step(i, -1)
        child[i] -= 1
        lowered.add(i)
        if child[i] > 0:  # may be lowered again
            lowerable.insert(rng.randrange(len(lowerable) + 1), i)
    if cost > budget + 1e-9:
        return None
    fill = [i for i, u in enumerate(units) if i not in lowered and i not in raised and child[i] < len(u.options) - 1]
    rng.shuffle(fill)
    for i in fill:
        if cost + step(i, 1) <= budget:
            cost += step(i, 1)
            child[i] += 1
    return None if child == parent else child


def _sorted_options(units: list[Unit]) -> list[Unit]:
    """Options in order of cost, so that a higher index always means a more expensive level."""
    return [Unit(u.name, tuple(sorted(u.options, key=lambda o: (o.cost, -o.error))), u.members) for u in units]


def evolve(units: list[Unit], budget: float, fitness: Fitness, start: dict[str, int],
           settings: EvolutionSettings = EvolutionSettings(), state_path: Path | None = None,
           identity: dict | None = None, log: Callable[[str], None] = print) -> Allocation:
    """Search from `start` (an allocation within the budget, e.g. the knapsack's) for the least fitness.

    `identity` describes what the search depends on (recipe, data, model); a saved state with a different identity
    is refused with the keys that changed."""
    check_budget(units, budget)
    ordered = _sorted_options(units)
    # remap[i][o]: the sorted position of unit i's original option o
    remap = [[ou.options.index(o) for o in u.options] for u, ou in zip(units, ordered, strict=True)]
    back = [{s: k for k, s in enumerate(r)} for r in remap]
    parent = [remap[i][start[u.name]] for i, u in enumerate(units)]
    if total(units, start) > budget + 1e-9:
        raise ValueError("the starting allocation is over the budget")
    n_stages = len(settings.survivors) + 1
    to_choice = lambda c: {u.name: back[i][o] for i, (u, o) in enumerate(zip(units, c, strict=True))}  # noqa: E731
    identity = {**(identity or {}), "settings": settings.__dict__ | {"survivors": list(settings.survivors)},
                "budget": budget, "units": [u.name for u in units], "start": start}
    rng = random.Random(settings.seed)
    non_finite = 0

    def score(batch: list[list[int]], stage: int) -> list[float]:
        """One fitness per candidate, asked for in one call. A candidate whose fitness is not finite (a variant that
        overflows) is never selected; such evaluations are counted."""
        nonlocal non_finite
        values = fitness([to_choice(c) for c in batch], stage)
        if len(values) != len(batch):
            raise CompressError(f"evolution: fitness gave {len(values)} scores for {len(batch)} candidates")
        non_finite += sum(not math.isfinite(v) for v in values)
        return [v if math.isfinite(v) else math.inf for v in values]

    state = _load_state(state_path, identity)
    if state:
        parent, parent_fit, gen0, history, evaluations = (state["parent"], state["fitness"], state["generation"],
                                                          state["history"], state["evaluations"])
        rng.setstate(_tuplify(state["rng"]))
        log(f"evolution: resuming at generation {gen0} (fitness {parent_fit:.6g})")
    else:
        (parent_fit,), gen0, evaluations = fitness([to_choice(parent)], n_stages - 1), 0, 1
        if not math.isfinite(parent_fit):
            raise CompressError(f"evolution: the starting allocation's fitness is {parent_fit}; the variants it "
                                "assembles produce non-finite outputs")
        history = [{"generation": 0, "fitness": parent_fit, "accepted": True, "seconds": 0.0}]
    t_start = time.perf_counter()
    for gen in tqdm(range(gen0 + 1, settings.generations + 1), desc="evolution", unit="gen",
                    initial=gen0, total=settings.generations):
        t0 = time.perf_counter()
        children: list[list[int]] = []
        tries = 0
        while len(children) < settings.offspring and tries < 50 * settings.offspring:
            tries += 1
            child = _mutate(ordered, parent, budget, rng, settings.max_switches)
            if child is not None and child not in children:
                children.append(child)
        finalists = children
        for stage, keep in enumerate(settings.survivors):
            scored = sorted(zip(score(finalists, stage), range(len(finalists)), strict=True))
            evaluations += len(finalists)
            finalists = [finalists[k] for _, k in scored[:keep]]
        final = list(zip(score(finalists, n_stages - 1), finalists, strict=True))
        evaluations += len(final)
        best_fit, best = min(final, key=lambda t: t[0], default=(float("inf"), None))
        accepted = False
        if best is not None and best_fit < parent_fit:
            parent, parent_fit, accepted = best, best_fit, True
        history.append({"generation": gen, "fitness": parent_fit, "best_offspring": best_fit, "accepted": accepted,
                        "offspring": len(children), "seconds": round(time.perf_counter() - t0, 2)})
        log(f"evolution: generation {gen}: best offspring {best_fit:.6g}, parent {parent_fit:.6g}"
            f"{' (accepted)' if accepted else ''}")
        _save_state(state_path, {"identity": identity, "generation": gen, "parent": parent, "fitness": parent_fit,
                                 "history": history, "evaluations": evaluations, "rng": rng.getstate()})
    choice = to_choice(parent)
    return Allocation(choice=choice, cost=total(units, choice), budget=budget, method="evolution", error=parent_fit,
                      details={"generations": settings.generations, "evaluations": evaluations,
                               "seconds_this_run": round(time.perf_counter() - t_start, 1), "history": history,
                               "start_fitness": history[0]["fitness"], "resumed_from": gen0 or None,
                               "non_finite_evaluations": non_finite})


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _load_state(path: Path | None, identity: dict) -> dict | None:
    if path is None or not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        saved = state["identity"]
        missing = [k for k in ("parent", "fitness", "generation", "history", "evaluations", "rng") if k not in state]
        if missing:
            raise KeyError(", ".join(missing))
    except (ValueError, KeyError, TypeError) as err:
        raise ResumeError(f"{path}: saved search state is unreadable ({err}); delete it to start over") from None
    changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if changed:
        raise ResumeError(f"{path}: saved search state is for a different search (what changed: {', '.join(changed)}); "
                          "delete it to start over")
    return state


def _save_state(path: Path | None, state: dict) -> None:
    if path is None:
        return
    write_text_atomic(path, json.dumps(state))


def evolve_saved(units: list[Unit], budget: float, fitness: Fitness, start: dict[str, int],
                 settings: EvolutionSettings, folder: Path | None, identity: dict) -> tuple[Allocation, dict]:
    """`evolve` with its state saved in `folder` (one file per search: identity, settings, budget and start, so the
    same search resumes and another starts its own), and the summary a pass report shows."""
    search_id = fingerprint(identity, settings.__dict__, budget, start)
    alloc = evolve(units, budget, fitness, start, settings,
                   state_path=None if folder is None else folder / f"evolution-{search_id[:16]}.json",
                   identity=identity, log=lambda *_: None)
    hist = alloc.details["history"]
    return alloc, {"generations": settings.generations, "evaluations": alloc.details["evaluations"],
                   "start_kl": round(hist[0]["fitness"], 6), "final_kl": round(alloc.error, 6),
                   "accepted": sum(h["accepted"] for h in hist[1:]), "resumed_from": alloc.details["resumed_from"],
                   "seconds": alloc.details["seconds_this_run"],
                   "non_finite_evaluations": alloc.details["non_finite_evaluations"],
                   "kl_by_generation": [round(h["fitness"], 6) for h in hist]}
