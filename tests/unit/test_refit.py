"""Hessian group pruning with least-squares refit: the refit is the least-squares solution, the OBS cost of removing
a structure is exactly the output error its refitted removal adds, and the greedy order beats magnitude pruning."""

import pytest
import torch

from compress.ops.refit import augment, damped, output_error, refit, removal_order, structure_columns


def _problem(seed=0, tokens=600, width=48, out=20):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g, dtype=torch.float64) * 0.3
    X = torch.randn(tokens, width, generator=g, dtype=torch.float64) @ (torch.eye(width, dtype=torch.float64) + mix)
    X[:, :4] *= 5  # a few loud inputs
    W = torch.randn(out, width, generator=g, dtype=torch.float64)
    return X, W


def test_refit_is_the_least_squares_solution():
    X, W = _problem()
    keep = torch.tensor([0, 3, 5, 8, 13, 21, 34, 40])
    W_kept = refit(W, damped(X.T @ X, 1e-12), keep)
    ref = torch.linalg.lstsq(X[:, keep], X @ W.T).solution.T
    assert W_kept.shape == (20, 8)
    assert (W_kept - ref).abs().max() < 1e-8
    err = ((X @ W.T - X[:, keep] @ W_kept.T) ** 2).sum()
    assert abs(output_error(W, X.T @ X, keep, W_kept) - float(err)) < 1e-6 * float(err)


@pytest.mark.parametrize("size", [1, 6])
def test_first_obs_removal_is_the_cheapest_refitted_removal(size):
    """The greedy's first pick removes the structure whose removal, refit included, adds the least output error."""
    X, W = _problem(seed=1)
    H = damped(X.T @ X, 1e-12)
    n = W.shape[1] // size
    errors = []
    for s in range(n):
        keep = structure_columns(torch.tensor([t for t in range(n) if t != s]), size)
        errors.append(output_error(W, X.T @ X, keep, refit(W, H, keep)))
    assert removal_order(W, H, size, 1)[0] == min(range(n), key=errors.__getitem__)


def test_greedy_order_beats_magnitude_pruning_at_every_level():
    X, W = _problem(seed=2)
    H = damped(X.T @ X, 1e-6)
    width = W.shape[1]
    order = removal_order(W, H, 1, width - 1)
    magnitude = (W.pow(2).sum(0) * torch.diagonal(X.T @ X)).argsort().tolist()  # weakest first
    assert sorted(order) == sorted(set(order)) and len(order) == width - 1
    for n_removed in (8, 16, 24, 32, 40):
        ours = torch.tensor(sorted(set(range(width)) - set(order[:n_removed])))
        theirs = torch.tensor(sorted(set(range(width)) - set(magnitude[:n_removed])))
        e_ours = output_error(W, X.T @ X, ours, refit(W, H, ours))
        e_theirs = output_error(W, X.T @ X, theirs, refit(W, H, theirs))
        assert e_ours <= e_theirs * 1.001, n_removed


def test_several_per_step_stays_close_to_the_exact_greedy():
    X, W = _problem(seed=3, width=96)
    H = damped(X.T @ X, 1e-6)
    exact, fast = removal_order(W, H, 1, 60), removal_order(W, H, 1, 60, per_step=4)
    errs = []
    for order in (exact, fast):
        keep = torch.tensor(sorted(set(range(96)) - set(order)))
        errs.append(output_error(W, X.T @ X, keep, refit(W, H, keep)))
    assert errs[1] < 1.05 * errs[0]


def test_bias_column_absorbs_the_removed_mean_and_is_never_removed():
    X, W = _problem(seed=4)
    X = X + 3.0  # inputs with a large mean
    n, width = X.shape
    H = augment(X.T @ X, X.sum(0), n)
    ones = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    assert torch.allclose(H, ones.T @ ones)
    W_b = torch.cat([W, torch.zeros(W.shape[0], 1, dtype=torch.float64)], 1)
    Hd = damped(H, 1e-12)
    order = removal_order(W_b, Hd, 1, width - 1, n_structures=width)
    assert sorted(order) == sorted(set(order)) and max(order) < width  # the bias column is never a candidate
    keep = torch.tensor(sorted(set(range(width)) - set(order[:24])))
    with_bias = refit(W_b, Hd, torch.cat([keep, torch.tensor([width])]))
    without = refit(W, damped(X.T @ X, 1e-12), keep)
    e_bias = ((X @ W.T - X[:, keep] @ with_bias[:, :-1].T - with_bias[:, -1]) ** 2).sum()
    e_plain = ((X @ W.T - X[:, keep] @ without.T) ** 2).sum()
    assert e_bias < e_plain
    residual = X @ W.T - X[:, keep] @ with_bias[:, :-1].T - with_bias[:, -1]
    assert residual.mean(0).abs().max() < 1e-6  # the mean output is restored exactly


def test_removal_order_refuses_removing_everything():
    X, W = _problem()
    with pytest.raises(ValueError, match="at least one stays"):
        removal_order(W, damped(X.T @ X, 0.01), 1, W.shape[1])
