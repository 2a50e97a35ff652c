"""The pruning maths on its own: scores, standardization, allocation under the budget, compensation."""

import pytest
import torch

from compress.ops.gptq import gptq_quantize, hessian
from compress.ops.importance import channel_scores, compensation_bias, group_scores, standardize
from compress.ops.quant import QuantSpec
from compress.ops.structure import LayerScores, global_threshold, uniform


def _stats(X):
    X = X.double()
    return (X * X).mean(0), X.var(0, unbiased=True), X.mean(0)


def test_channel_scores_match_formulas():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 7, generator=g)
    X = torch.randn(100, 7, generator=g) * torch.arange(1, 8)
    mean_sq, var, _ = _stats(X)
    Wd = W.double()
    torch.testing.assert_close(channel_scores("wifv", W, mean_sq, var), var * (Wd**2).sum(0))
    torch.testing.assert_close(channel_scores("ifv", W, mean_sq, var), var)
    torch.testing.assert_close(channel_scores("wifn", W, mean_sq, var), (Wd.abs() * mean_sq.sqrt()).mean(0))
    torch.testing.assert_close(channel_scores("wanda", W, mean_sq, var), (Wd.abs() * mean_sq.sqrt()).sum(0))


def test_group_scores_and_standardize():
    s = torch.arange(12, dtype=torch.float64)
    assert group_scores(s, 3).tolist() == [1.5, 5.5, 9.5]
    z = standardize(torch.tensor([1.0, 2.0, 3.0, 10.0]))
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std()) - 1) < 1e-6
    assert standardize(torch.tensor([4.0])).tolist() == [0.0]
    assert standardize(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]


def test_compensation_bias_restores_mean_output():
    """Removing channels R and adding W[:, R] @ mean[R] keeps the output at the mean input exactly."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 10, generator=g, dtype=torch.float64)
    X = torch.randn(500, 10, generator=g, dtype=torch.float64) + 3
    removed = torch.tensor([1, 4, 7])
    kept = torch.tensor([i for i in range(10) if i not in removed.tolist()])
    bias = compensation_bias(W, X.mean(0), removed)
    full = (X @ W.T).mean(0)
    pruned = (X[:, kept] @ W[:, kept].T).mean(0) + bias
    torch.testing.assert_close(pruned, full)
    # and without the bias the mean output is off by exactly that bias
    torch.testing.assert_close(full - (X[:, kept] @ W[:, kept].T).mean(0), bias)


def _layers(n=6, G=3, C=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [LayerScores(torch.randn(G, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64),
                        group_cost=50, channel_cost=3) for _ in range(n)]


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_global_threshold_meets_target_and_keeps_one_of_each(target):
    layers = _layers()
    keep = global_threshold(layers, target)
    total = sum(s.total for s in layers)
    kept = sum(k.kept_params(s) for k, s in zip(keep, layers))
    # within one unit of the largest cost of the budget
    assert abs((1 - kept / total) - target) <= 50 / total
    for k in keep:
        assert k.groups.sum() >= 1 and k.channels.sum() >= 1


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_global_threshold_rounds_dropped_channels_and_keeps_the_total(target):
    layers = _layers(n=8, C=64, seed=1)
    exact = global_threshold(layers, target)
    keep = global_threshold(layers, target, round_to=8)
    drops = [64 - int(k.channels.sum()) for k in keep]
    assert all(d % 8 == 0 for d in drops) and all(int(k.channels.sum()) >= 8 for k in keep)
    assert len(set(drops)) > 1  # still adaptive: layers differ
    # the total dropped stays within half a step of the threshold's, and attention groups are untouched
    assert abs(sum(drops) - sum(64 - int(k.channels.sum()) for k in exact)) <= 4
    assert all(torch.equal(a.groups, b.groups) for a, b in zip(keep, exact))
    for k, s in zip(keep, layers):  # each layer keeps its best channels
        if (~k.channels).any():
            assert s.channels[~k.channels].max() <= s.channels[k.channels].min()


def test_global_threshold_keeps_the_best_scores():
    layers = _layers(seed=3)
    keep = global_threshold(layers, 0.4)
    kept_scores = torch.cat([torch.cat([s.groups[k.groups], s.channels[k.channels]]) for s, k in zip(layers, keep)])
    dropped = torch.cat([torch.cat([s.groups[~k.groups], s.channels[~k.channels]]) for s, k in zip(layers, keep)])
    # every dropped unit scores below every kept unit, except the per-layer forced best ones
    forced = torch.cat([torch.stack([s.groups.max(), s.channels.max()]) for s in layers])
    free_kept = kept_scores[~torch.isin(kept_scores, forced)]
    assert dropped.max() <= free_kept.min()


def test_uniform_same_widths_everywhere():
    layers = _layers()
    keep = uniform(layers, 0.3, round_to=8)
    assert len({(int(k.groups.sum()), int(k.channels.sum())) for k in keep}) == 1
    k, s = keep[0], layers[0]
    assert int(k.groups.sum()) == 3 - round(0.3 * 3)
    assert (40 - int(k.channels.sum())) % 8 == 0
    # the lowest-scored channels go
    assert s.channels[~k.channels].max() <= s.channels[k.channels].min()


def test_cfsp_keep_ratios_meet_the_mean_and_follow_importance():
    from compress.ops.importance import cfsp_keep_ratios

    scores = torch.tensor([0.05, 0.30, 0.10, 0.02, 0.20])
    for keep, temperature in [(0.6, 1.0), (0.9, 3.0), (0.5, 0.1)]:
        r = cfsp_keep_ratios(scores, keep, temperature)
        assert float(r.mean()) == pytest.approx(keep, abs=1e-9)
        assert float(r.max()) <= 1.0 + 1e-12
        assert r.argsort().tolist() == scores.argsort().tolist()


def test_cfsp_channel_scores_follow_activation_and_weight():
    from compress.ops.importance import cfsp_channel_scores

    g = torch.Generator().manual_seed(0)
    down, up, gate = torch.randn(8, 6, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    act = torch.ones(6)
    base = cfsp_channel_scores(down, up, gate, act)
    act2 = act.clone()
    act2[3] = 4.0  # a louder channel scores higher
    assert cfsp_channel_scores(down, up, gate, act2)[3] > base[3]
    up2 = up.clone()
    up2[1] *= 10  # a heavier up_proj row scores higher
    assert cfsp_channel_scores(down, up2, gate, act)[1] > base[1]


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=64, sym=True),
                                  QuantSpec(bits=3, group_size=32, sym=False, act_order=True)])
def test_gptq_result_does_not_depend_on_the_thread_count(spec):
    """LAPACK's Cholesky inverse differs in its last bits between 1 and 2 threads (it flipped scales here before the
    inversion was pinned to one thread); the result must depend on W and H alone."""
    g = torch.Generator().manual_seed(0)
    X, W = torch.randn(4096, 384, generator=g), torch.randn(256, 384, generator=g)
    H = hessian(X)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(gptq_quantize(W, H, spec))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0].codes, results[1].codes)
    assert torch.equal(results[0].scale, results[1].scale) and torch.equal(results[0].zero, results[1].zero)
    assert torch.get_num_threads() == before
