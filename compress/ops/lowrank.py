"""Low-rank corrections of a linear layer's weight error E = W - Wq (out, in): a pair A (rank, in), B (out, rank)
with B @ A close to E, so that y = x Wq^T + (x A^T) B^T comes close to x W^T.

- svd_fit (LoRC, ZeroQuant-V2): the best rank-r approximation of E itself, min ||E - BA||_F (Eckart-Young).
- eora_fit (EoRA, GPTQModel `gptqmodel/eora/`): the best rank-r approximation of the layer's OUTPUT error,
  min ||X (E - BA)^T||_F over calibration inputs X (tokens, in). With C = X^T X / n = Q diag(l) Q^T this is the SVD
  of E Q diag(sqrt l), mapped back by diag(1/sqrt l) Q^T: it spends the rank where the inputs have energy. This is
  also QERA's exact closed form (arXiv 2410.06040, which writes the same square root of C as R^(1/2)).
- qera_diag_fit (QERA's approximate form, LQER's scaling): the same with C replaced by its diagonal, so no
  eigendecomposition is needed; exact when the input channels are uncorrelated.

Numerics: every factorization runs in float64 (an fp32 eigendecomposition of a covariance whose eigenvalues span
1e6 or more loses the small ones, and 1/sqrt(l) amplifies that loss); results are returned in float32 on E's
device. The singular values are split evenly, B = U_r sqrt(S_r) and A = sqrt(S_r) V_r^T (...), so that A and B have
the same scale when they are trained afterwards."""

from __future__ import annotations

import torch


def svd_fit(E: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` SVD of the weight error E (out, in): A (rank, in), B (out, rank) float32 minimizing ||E - BA||_F.
    Raises ValueError when rank is not in 1..min(out, in)."""
    _check_rank(E, rank)
    U, S, Vh = torch.linalg.svd(E.to(torch.float64), full_matrices=False)  # (out, k), (k,), (k, in); k = min(out, in)
    root = S[:rank].sqrt()
    B = U[:, :rank] * root  # (out, rank)
    A = root[:, None] * Vh[:rank]  # (rank, in)
    return A.float(), B.float()


def eigen_floor(l: torch.Tensor, accumulated: torch.dtype) -> float:
    """The smallest eigenvalue of an (in, in) covariance kept as signal: in * eps(accumulated) * max(l), the
    numerical-rank tolerance (as numpy's matrix_rank) at the precision the covariance was summed in (float32 for
    the capture engine's X^T X). Eigenvalues below it, zero or negative ones included, are rounding noise: inputs
    have no energy there, so the fit leaves those directions out rather than dividing by their square root."""
    return l.numel() * torch.finfo(accumulated).eps * max(float(l.max()), 0.0)


def eora_fit(E: torch.Tensor, xtx: torch.Tensor, rank: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware rank-`rank` fit of E (out, in) from xtx = sum over n tokens of x x^T (in, in): A (rank, in),
    B (out, rank) float32 minimizing ||X (E - BA)^T||_F. C = xtx / n is eigendecomposed in float64; eigenvalues below
    eigen_floor(l, xtx.dtype) are dropped (B @ A is then zero on those input directions). When fewer than `rank`
    directions remain, A and B are padded with zero rows / columns (same shapes; the output error is already the
    least possible). Raises ValueError for a rank outside 1..min(out, in), an xtx that is not (in, in) or n < 1."""
    _check_rank(E, rank)
    if xtx.shape != (E.shape[1], E.shape[1]) or n < 1:
        raise ValueError(f"eora_fit: xtx {tuple(xtx.shape)} with n = {n} does not fit E {tuple(E.shape)}: "
                         f"xtx must be (in, in) and n >= 1")
    C = xtx.to(torch.float64) / n  # (in, in)
    C = (C + C.T) / 2  # exactly symmetric, as eigh assumes
    l, Q = torch.linalg.eigh(C)  # (in,), (in, in); ascending
    keep = l > eigen_floor(l, xtx.dtype)
    l, Q = l[keep], Q[:, keep]  # (k,), (in, k)
    root = l.sqrt()
    A, B = _fit_scaled(E.to(torch.float64) @ Q * root, rank)  # fit of E Q diag(sqrt l): (rank, k), (out, rank)
    A = (A / root) @ Q.T  # (rank, in): back from the eigenspace
    return A.float(), B.float()


def qera_diag_fit(E: torch.Tensor, xtx: torch.Tensor, rank: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """QERA's approximate closed form: the output-error fit with C = xtx / n replaced by its diagonal, s = sqrt of
    the mean squared input per channel (in,): SVD of E diag(s), mapped back by diag(1/s). Channels whose mean square
    is below eigen_floor get no correction. Shapes, dtypes and errors as eora_fit."""
    _check_rank(E, rank)
    if xtx.shape != (E.shape[1], E.shape[1]) or n < 1:
        raise ValueError(f"qera_diag_fit: xtx {tuple(xtx.shape)} with n = {n} does not fit E {tuple(E.shape)}: "
                         f"xtx must be (in, in) and n >= 1")
    d = xtx.diagonal().to(torch.float64) / n  # (in,) mean squared input per channel
    keep = d > eigen_floor(d, xtx.dtype)
    s, inverse = torch.zeros_like(d), torch.zeros_like(d)  # (in,) sqrt of the mean square, and its inverse
    s[keep] = d[keep].sqrt()
    inverse[keep] = 1 / s[keep]
    A, B = _fit_scaled(E.to(torch.float64) * s, rank)  # (rank, in), (out, rank)
    A = A * inverse
    return A.float(), B.float()


def error_by_rank(E: torch.Tensor, ranks: list[int], xtx: torch.Tensor | None = None, n: int = 1) -> list[float]:
    """The error the best rank-r correction of E (out, in) leaves, for each r in `ranks` (0 allowed: no correction),
    from one SVD in float64: without xtx, ||E - BA||_F^2 (svd_fit's optimum: the tail of E's squared singular
    values); with xtx = X^T X over n tokens, the mean output error per token ||X (E - BA)^T||_F^2 / n at eora_fit's
    optimum (the tail of E Q diag(sqrt l)'s squared singular values; the directions eigen_floor drops add the same
    small amount to every rank and are left out). Raises ValueError for a rank outside 0..min(out, in)."""
    k = min(E.shape)
    if any(not 0 <= r <= k for r in ranks):
        raise ValueError(f"error_by_rank: ranks {ranks} must lie in 0..{k} for E of shape {tuple(E.shape)}")
    M = E.to(torch.float64)
    if xtx is not None:
        C = xtx.to(torch.float64) / n
        l, Q = torch.linalg.eigh((C + C.T) / 2)  # (in,), (in, in)
        keep = l > eigen_floor(l, xtx.dtype)
        M = M @ Q[:, keep] * l[keep].sqrt()  # (out, kept)
    S2 = torch.linalg.svdvals(M) ** 2  # descending
    tail = torch.cat([S2.flip(0).cumsum(0).flip(0), S2.new_zeros(1)])  # tail[r] = sum of S2[r:]
    return [float(tail[min(r, S2.numel())]) for r in ranks]


def output_error(E: torch.Tensor, A: torch.Tensor, B: torch.Tensor, xtx: torch.Tensor) -> float:
    """||X (E - BA)^T||_F^2 = tr((E - BA) xtx (E - BA)^T) from xtx = X^T X (in, in), in float64: the squared output
    error a correction leaves, summed over the tokens of X."""
    R = E.to(torch.float64) - B.to(torch.float64) @ A.to(torch.float64)  # (out, in)
    return float(((R @ xtx.to(torch.float64)) * R).sum())


def _fit_scaled(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` SVD of M (out, k) in float64 with the singular values split evenly: A (rank, k), B (out, rank),
    zero-padded when M has fewer than `rank` singular values."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # (out, m), (m,), (m, k); m = min(out, k)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    A = M.new_zeros(rank, M.shape[1])
    B = M.new_zeros(M.shape[0], rank)
    A[:r] = root[:, None] * Vh[:r]
    B[:, :r] = U[:, :r] * root
    return A, B


def _check_rank(E: torch.Tensor, rank: int) -> None:
    if E.dim() != 2:
        raise ValueError(f"low-rank fit: E must be (out, in), got {tuple(E.shape)}")
    if not 1 <= rank <= min(E.shape):
        raise ValueError(f"low-rank fit: rank {rank} is not in 1..min(out, in) = {min(E.shape)} for E {tuple(E.shape)}")
