"""Rank-based bit allocation: never over budget, the important layers get the wider width."""

from hypothesis import given, settings
from hypothesis import strategies as st

from compress.search.ranking import assign_by_rank


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.integers(1, 1000)), min_size=1, max_size=40),
    st.sampled_from([[2, 3, 4, 8], [3, 4], [2, 8], [4]]),
    st.floats(0, 1),
)
def test_assignment_within_budget_and_ordered(layers, choices, frac):
    importance = [imp for imp, _ in layers]
    sizes = [n for _, n in layers]
    lo, hi = min(choices), max(choices)
    average = lo + frac * (hi - lo)
    bits = assign_by_rank(importance, sizes, average, choices)
    assert sum(b * n for b, n in zip(bits, sizes)) <= average * sum(sizes) + 1e-6
    assert all(b in choices for b in bits)
    assert len(set(bits)) <= 2  # the two widths that bracket the average
    wide = max(bits)
    for i, b in enumerate(bits):  # nobody strictly more important than a wide layer is left narrow
        if b == wide and len(set(bits)) == 2:
            assert all(bits[j] == wide for j in range(len(bits)) if importance[j] > importance[i])


def test_exact_average_on_equal_sizes():
    bits = assign_by_rank([0.9, 0.1, 0.5, 0.3], [10] * 4, 3.5, [2, 3, 4, 8])
    assert bits == [4, 3, 4, 3]
