"""Low-rank fits of quantization error (compress.ops.lowrank) and the LoRALinear wrapper (export.lowrank): full rank
reconstructs, the activation-aware fits beat plain SVD on the output error with anisotropic inputs, the eigenvalue
floor keeps a rank-deficient covariance finite, and the wrapper computes base + B @ A with surgery that undoes."""

import pytest
import torch
from torch import nn

from compress.ops.lowrank import eigen_floor, eora_fit, output_error, qera_diag_fit, svd_fit
from compress.ops.quant import QuantSpec, dequantize, rtn
from export.lowrank import LoRALinear, adapters, unwrap, wrap


def _layer(seed=0, tokens=800, width=64, out=48, bits=3, rotate=True):
    """A weight, its 3-bit RTN error E = W - Wq, and inputs X (tokens, width) whose energy spans four orders of
    magnitude (as a real layer's inputs do), in channels that correlate (rotate) or not."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, width, generator=g)
    codes, scale, zero = rtn(W, QuantSpec(bits=bits, group_size=16, sym=True))
    Wq = dequantize(codes, scale.repeat_interleave(16, 1), zero.repeat_interleave(16, 1))
    mix = torch.linalg.qr(torch.randn(width, width, generator=g))[0] if rotate else torch.eye(width)
    loudness = torch.logspace(0, -2, width)  # standard deviations 1 .. 0.01
    X = (torch.randn(tokens, width, generator=g) * loudness) @ mix.T
    return W, W - Wq, X


def test_full_rank_svd_reconstructs_exactly():
    W, E, _ = _layer()
    A, B = svd_fit(E, min(E.shape))
    assert A.shape == (48, 64) and B.shape == (48, 48) and A.dtype == B.dtype == torch.float32
    assert (B @ A - E).abs().max() < 1e-5 * E.abs().max()


def test_full_rank_activation_aware_fits_reconstruct_on_full_rank_inputs():
    _, E, X = _layer()
    for fit in (eora_fit, qera_diag_fit):
        A, B = fit(E, X.T @ X, min(E.shape), X.shape[0])
        assert (B @ A - E).abs().max() < 1e-4 * E.abs().max(), fit.__name__


def test_svd_fit_is_the_best_weight_approximation():
    """Eckart-Young: the residual's Frobenius norm is the norm of the dropped singular values."""
    _, E, _ = _layer()
    S = torch.linalg.svdvals(E.double())
    A, B = svd_fit(E, 8)
    assert abs(float((E - B @ A).double().norm()) - float(S[8:].norm())) < 1e-5 * float(S.norm())
    assert (A.norm(dim=1) - B.norm(dim=0)).abs().max() < 1e-4  # singular values split evenly


@pytest.mark.parametrize(("rank", "gain"), [(4, 1.5), (8, 2), (16, 5)])
def test_activation_aware_fit_beats_svd_on_output_error(rank, gain):
    W, E, X = _layer()
    xtx = X.T @ X
    plain = output_error(E, *svd_fit(E, rank), xtx)
    eora = output_error(E, *eora_fit(E, xtx, rank, X.shape[0]), xtx)
    none = output_error(E, torch.zeros(1, 64), torch.zeros(48, 1), xtx)
    assert eora * gain < plain < none  # anisotropic inputs: the rank goes where they have energy
    # EoRA is the optimum: the output error left is the energy of the dropped singular values of E C^(1/2) * n
    lam, Q = torch.linalg.eigh(xtx.double())
    S = torch.linalg.svdvals(E.double() @ Q * lam.clamp_min(0).sqrt())
    assert abs(eora - float((S[rank:] ** 2).sum())) < 1e-4 * float((S**2).sum())
    # the diagonal form is no better than the exact one; with correlated channels it is no better than plain SVD
    diag = output_error(E, *qera_diag_fit(E, xtx, rank, X.shape[0]), xtx)
    assert eora * gain < diag
    assert abs(output_error(W, torch.zeros(1, 64), torch.zeros(48, 1), xtx)
               - float(((X.double() @ W.double().T) ** 2).sum())) < 1e-6 * float(((X @ W.T) ** 2).sum())


def test_diagonal_fit_matches_exact_on_uncorrelated_channels():
    _, E, X = _layer(rotate=False)
    xtx = X.T @ X
    plain = output_error(E, *svd_fit(E, 8), xtx)
    eora = output_error(E, *eora_fit(E, xtx, 8, X.shape[0]), xtx)
    diag = output_error(E, *qera_diag_fit(E, xtx, 8, X.shape[0]), xtx)
    assert eora <= diag < 1.2 * eora < 0.5 * plain  # sample correlations only: the diagonal is nearly all of C


def test_eigen_floor_keeps_rank_deficient_covariance_finite():
    """X spans 10 of 64 input directions: X^T X has 54 eigenvalues that are rounding noise (some negative). The fit
    drops them: finite, no larger than the weight error's scale, zero on the null space of X, and as good on X as
    the full rank allows."""
    _, E, X = _layer()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(500, 10, generator=g) @ torch.randn(10, 64, generator=g)  # (500, 64), rank 10
    xtx = X.T @ X
    lam = torch.linalg.eigvalsh(xtx.double() / 500)
    floor = eigen_floor(lam, torch.float32)
    assert floor == pytest.approx(64 * 2.0**-23 * float(lam.max()))
    assert int((lam > floor).sum()) == 10
    A, B = eora_fit(E, xtx, 16, 500)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert float((B @ A).norm()) <= float(E.norm())  # 1/sqrt of noise eigenvalues would blow this up
    null = torch.linalg.svd(X.double()).Vh[10:].float()  # (54, 64): directions X never takes
    assert float((A @ null.T).abs().max()) < 1e-4 * float(A.abs().max())
    assert (A[10:] == 0).all() and (B[:, 10:] == 0).all()  # only 10 directions: the rest is zero padding
    assert output_error(E, A, B, xtx) < 1e-6 * output_error(E, torch.zeros(1, 64), torch.zeros(48, 1), xtx)


@pytest.mark.parametrize("rank", [0, 49])
def test_rank_outside_range_is_refused(rank):
    _, E, X = _layer()
    with pytest.raises(ValueError, match=rf"rank {rank} is not in 1..min\(out, in\) = 48"):
        svd_fit(E, rank)
    with pytest.raises(ValueError, match=rf"rank {rank} is not in 1..min\(out, in\) = 48"):
        eora_fit(E, X.T @ X, rank, 800)


def test_eora_refuses_mismatched_covariance():
    _, E, X = _layer()
    with pytest.raises(ValueError, match=r"xtx \(63, 63\) with n = 800 does not fit E \(48, 64\)"):
        eora_fit(E, (X.T @ X)[:63, :63], 4, 800)


def test_lora_linear_adds_the_product_and_merges():
    g = torch.Generator().manual_seed(0)
    first, last = nn.Linear(8, 6), nn.Linear(6, 5, bias=False)
    model = nn.Sequential(first, nn.ReLU(), last)
    A0, B0 = torch.randn(3, 8, generator=g), torch.randn(6, 3, generator=g)
    A2, B2 = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    x = torch.randn(4, 8, generator=g)
    h = torch.relu(x @ (first.weight + B0 @ A0).T + first.bias)
    ref = h @ (last.weight + B2 @ A2).T
    wrappers = wrap(model, ["0", "2"], {"0": A0, "2": A2}, {"0": B0, "2": B2})
    assert isinstance(model[0], LoRALinear) and model[0].rank == 3 and model[2].rank == 2
    assert (model[0].in_features, model[0].out_features) == (8, 6)
    assert (model(x) - ref).abs().max() < 1e-5
    assert (wrappers["2"].merged() - (last.weight + B2 @ A2)).abs().max() < 1e-6
    assert list(adapters(model)) == ["0", "2"]
    with pytest.raises(ValueError, match="wrap: 0 already has a low-rank correction"):
        wrap(model, ["0"], {"0": A0}, {"0": B0})
    got = unwrap(model)
    assert list(got) == ["0", "2"] and torch.equal(got["0"][0], A0) and torch.equal(got["2"][1], B2)
    assert isinstance(model[0], nn.Linear) and not adapters(model)


def test_wrap_refuses_bad_shapes_and_non_linears_leaving_the_model_alone():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU())
    with pytest.raises(ValueError, match=r"wrap: 0: LoRALinear: A \(3, 7\) and B \(6, 3\) do not fit a linear 8 -> 6"):
        wrap(model, ["0"], {"0": torch.zeros(3, 7)}, {"0": torch.zeros(6, 3)})
    with pytest.raises(ValueError, match="wrap: 1 is a ReLU, not an nn.Linear or QuantLinear"):
        wrap(model, ["0", "1"], {"0": torch.zeros(3, 8)}, {"0": torch.zeros(6, 3)})
    assert isinstance(model[0], nn.Linear)
    with pytest.raises(TypeError, match="the base is a Identity"):
        LoRALinear.merged(_with_base(nn.Identity()))


def _with_base(base: nn.Module) -> LoRALinear:
    wrapper = LoRALinear(nn.Linear(2, 2), torch.zeros(1, 2), torch.zeros(2, 1))
    setattr(wrapper, "base", base)  # noqa: B010 (a wrong base on purpose, past the type checker)
    return wrapper


def test_wrapper_state_dict_keeps_the_base_names_and_loads_back():
    """Export reads the model's state dict: the base's tensors keep their stock names, the correction sits beside."""
    g = torch.Generator().manual_seed(0)
    first = nn.Linear(4, 3)
    model = nn.Sequential(first, nn.Linear(3, 2))
    wrap(model, ["0"], {"0": torch.randn(2, 4, generator=g)}, {"0": torch.randn(3, 2, generator=g)})
    state = model.state_dict()
    assert list(state) == ["0.weight", "0.bias", "0.lora_A.weight", "0.lora_B.weight", "1.weight", "1.bias"]
    assert torch.equal(state["0.weight"], first.weight) and state["0.weight"].shape == (3, 4)
    other = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    wrap(other, ["0"], {"0": torch.zeros(2, 4)}, {"0": torch.zeros(3, 2)})
    assert not other.load_state_dict(state, strict=True).missing_keys
    x = torch.randn(5, 4, generator=g)
    assert torch.equal(other(x), model(x))


@pytest.mark.parametrize("aware", [False, True])
def test_error_by_rank_is_the_fitted_corrections_error(aware):
    """The curve error_by_rank predicts from one SVD is what svd_fit / eora_fit leave at each rank; it falls with
    the rank and reaches zero at full rank."""
    from compress.ops.lowrank import error_by_rank

    W, E, X = _layer(seed=3)
    xtx, n = X.T @ X, X.shape[0]
    ranks = [0, 1, 4, 16, 48]
    curve = error_by_rank(E, ranks, xtx if aware else None, n)
    for r, predicted in zip(ranks, curve, strict=True):
        if r == 0:
            zero = torch.zeros(1, 64), torch.zeros(48, 1)
            fitted = output_error(E, *zero, xtx) / n if aware else float(E.double().square().sum())
        elif aware:
            fitted = output_error(E, *eora_fit(E, xtx, r, n), xtx) / n
        else:
            A, B = svd_fit(E, r)
            fitted = float((E - B @ A).double().square().sum())
        assert predicted == pytest.approx(fitted, rel=1e-3, abs=1e-6), r
    assert curve == sorted(curve, reverse=True) and curve[-1] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match=r"ranks \[49\] must lie in 0..48"):
        error_by_rank(E, [49])
