"""Rank-based allocation (layer-wise mixed precision): the most important layers get the wider setting."""

from __future__ import annotations

from collections.abc import Sequence


def assign_by_rank(importance: list[float], sizes: list[int], average: float, choices: Sequence[int]) -> list[int]:
    """Bits per layer meeting `average` (weighted by `sizes`) with the two choices that bracket it: layers in
    order of importance take the higher width while the weighted average stays within the budget.

    Returns one width per layer; the weighted average never exceeds `average`."""
    options = sorted(set(choices))
    lo = max((c for c in options if c <= average), default=None)
    hi = min((c for c in options if c >= average), default=None)
    if lo is None or hi is None:
        raise ValueError(f"average {average} is outside the choices {options}")
    bits = [lo] * len(importance)
    if hi == lo:
        return bits
    budget = average * sum(sizes)
    used = lo * sum(sizes)
    for i in sorted(range(len(importance)), key=lambda j: (-importance[j], j)):
        extra = (hi - lo) * sizes[i]
        if used + extra > budget + 1e-9:
            break
        bits[i] = hi
        used += extra
    return bits
