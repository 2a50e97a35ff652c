"""Hessian-based structured pruning of a linear layer's input columns, with a closed-form least-squares refit.

With calibration inputs X (tokens, in) and H = X^T X, removing input structures (a key-value group's attention
dims, an MLP channel) from y = X W^T and refitting the kept columns K optimally gives

    W'_K = W H[:, K] H[K, K]^-1          (the least-squares solution of min ||X W^T - X_K W'_K^T||)

Which structures to remove is decided greedily by optimal brain surgeon (ZipLM-style): at each step remove the
structure S whose removal, with the remaining weights updated optimally, adds the least output error

    cost(S) = tr(W_S (Hinv_SS)^-1 W_S^T),   then  W -= W_S (Hinv_SS)^-1 Hinv_S: ,  Hinv -= Hinv_:S (Hinv_SS)^-1 Hinv_S:

One greedy pass yields a nested removal order, so every sparsity level of a layer comes from the same pass; each
level's weights are then the exact least-squares refit above for its kept set.

An optional bias column (`with_bias`) appends a constant input of 1: the refit then also moves the layer's bias,
which absorbs the mean of the removed inputs (what FLAP's bias compensation does, here fitted jointly).
"""

from __future__ import annotations

import torch


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I in float64; dead inputs (zero rows) become well-posed."""
    H = H.to(torch.float64).clone()
    diag = torch.diagonal(H)
    scale = float(diag.mean()) if float(diag.mean()) > 0 else 1.0
    diag += damp * scale
    return H


def augment(xtx: torch.Tensor, total: torch.Tensor, n: int) -> torch.Tensor:
    """[X 1]^T [X 1] from X^T X, the column sums and the token count: (in + 1, in + 1) float64."""
    d = xtx.shape[0]
    H = torch.empty(d + 1, d + 1, dtype=torch.float64, device=xtx.device)
    H[:d, :d] = xtx.to(torch.float64)
    H[:d, d] = H[d, :d] = total.to(torch.float64)
    H[d, d] = float(n)
    return H


def removal_order(W: torch.Tensor, H: torch.Tensor, size: int, n_remove: int, n_structures: int | None = None,
                  per_step: int = 1) -> list[int]:
    """Indices of the first `n_remove` structures to remove, in order (OBS greedy with weight updates).

    W (out, in) and H (in, in) damped; structure s is columns [s * size, (s + 1) * size); columns past
    `n_structures * size` (a bias column) are never removed. `per_step` structures (the cheapest) are removed
    together per update, which divides the number of (in x in) updates; 1 is the exact greedy order."""
    W = W.to(torch.float64).clone()
    n_struct = n_structures if n_structures is not None else W.shape[1] // size
    if n_remove > n_struct - 1:
        raise ValueError(f"cannot remove {n_remove} of {n_struct} structures (at least one stays)")
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H.to(torch.float64)))
    alive = torch.ones(n_struct, dtype=torch.bool, device=W.device)
    order: list[int] = []
    while len(order) < n_remove:
        if size == 1:
            cost = W[:, :n_struct].pow(2).sum(0) / torch.diagonal(Hinv)[:n_struct]
        else:
            cost = torch.full((n_struct,), float("inf"), dtype=torch.float64, device=W.device)
            for s in alive.nonzero().flatten().tolist():
                sl = slice(s * size, (s + 1) * size)
                cost[s] = torch.einsum("oi,ij,oj->", W[:, sl], torch.linalg.inv(Hinv[sl, sl]), W[:, sl])
        cost[~alive] = float("inf")
        k = min(per_step, n_remove - len(order))
        chosen = cost.topk(k, largest=False).indices.sort().values
        cols = structure_columns(chosen, size)
        M = torch.linalg.inv(Hinv[cols][:, cols])  # (k * size, k * size)
        row = M @ Hinv[cols, :]  # (k * size, in)
        W -= W[:, cols] @ row
        Hinv -= Hinv[:, cols] @ row
        W[:, cols] = 0
        alive[chosen] = False
        order += chosen[cost[chosen].argsort()].tolist()  # cheapest first within the step
    return order


def refit(W: torch.Tensor, H: torch.Tensor, keep_cols: torch.Tensor) -> torch.Tensor:
    """Least-squares weights for the kept columns: W H[:, K] H[K, K]^-1, (out, |K|) float64 (H damped)."""
    W = W.to(torch.float64)
    H = H.to(torch.float64)
    HKK = H[keep_cols][:, keep_cols]
    rhs = H[keep_cols] @ W.T  # (|K|, out)
    L = torch.linalg.cholesky(HKK)
    return torch.cholesky_solve(rhs, L).T.contiguous()


def structure_columns(structures: torch.Tensor, size: int) -> torch.Tensor:
    """Column indices of structures (sorted): (k,) -> (k * size,)."""
    return (structures[:, None] * size + torch.arange(size, device=structures.device)).reshape(-1)


def output_error(W: torch.Tensor, H: torch.Tensor, keep_cols: torch.Tensor, W_kept: torch.Tensor) -> float:
    """||X W^T - X_K W_kept^T||_F^2 from H = X^T X: the output error of a pruned, refitted layer."""
    W = W.to(torch.float64)
    D = -W.clone()
    D[:, keep_cols] += W_kept.to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", D, H.to(torch.float64), D))
