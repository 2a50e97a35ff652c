"""GPTQ (Frantar et al., 2022): quantize a linear layer's weight column by column, spreading each column's error
over the columns not yet quantized with the inverse Hessian of the layer's inputs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from compress.ops.quant import QuantSpec, dequantize, grid, quantize, rtn

DAMP_ESCALATION = (1.0, 10.0, 100.0, 1000.0)  # multiples of spec.damp tried before falling back to RTN


@dataclass
class Quantized:
    """Integer codes (out, in) int32, scale and zero (out, G), the group of each input column g_idx (in,) int32,
    and what had to be done to get there (dead columns, damping used, fallback)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    damp: float = 0.0
    dead_columns: int = 0
    fallback: str | None = None
    notes: list[str] = field(default_factory=list)

    def dequantize(self) -> torch.Tensor:
        """The quantized weight as float (out, in)."""
        gi = self.g_idx.long()
        return dequantize(self.codes, self.scale[:, gi], self.zero[:, gi])


def hessian(X: torch.Tensor) -> torch.Tensor:
    """H = 2/n X^T X from inputs X (tokens, in): (in, in) float32."""
    X = X.reshape(-1, X.shape[-1]).float()
    return 2.0 / X.shape[0] * (X.T @ X)


@contextmanager
def _one_thread() -> Iterator[None]:
    """LAPACK's Cholesky routines give other last bits on another number of threads (and MKL may change that number
    with the machine's load), which flips GPTQ codes downstream: run them on one thread, so the result depends on
    the inputs alone. The matrices are (in, in): milliseconds either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float] | None:
    """Upper Cholesky factor of (H + lambda I)^-1, escalating lambda from damp * mean(diag H); None if all fail."""
    with _one_thread():
        return _inverse_cholesky_escalating(H, damp)


def _inverse_cholesky_escalating(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float] | None:
    mean_diag = float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for mult in DAMP_ESCALATION:
        lam = damp * mult * mean_diag
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp * mult
    return None


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Quantize W (out, in) given H (in, in) from the layer's calibration inputs; computed on W's device (H must
    be there too), and the result is there."""
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    out_f, in_f = W.shape
    g = in_f if spec.group_size == -1 else spec.group_size
    if not (torch.isfinite(W).all() and torch.isfinite(H).all()):
        raise FloatingPointError("non-finite weight or Hessian")
    dead = torch.diag(H) == 0  # inputs that never fire: no information, weight has no effect on outputs
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    notes = [f"{int(dead.sum())} dead input columns zeroed"] if dead.any() else []

    n_groups = spec.groups(in_f)
    static = None
    if spec.act_order and spec.static_groups:  # group grids from the original column order, fixed up front
        static = [grid(W[:, s : s + g], spec.bits, spec.sym, spec.mse) for s in range(0, in_f, g)]

    perm = torch.argsort(torch.diag(H), descending=True) if spec.act_order else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]

    chol = _inverse_cholesky(H, spec.damp)
    if chol is None:  # last resort: round to nearest, recorded
        codes, scale, zero = rtn(W[:, torch.argsort(perm)], spec)
        return Quantized(codes, scale, zero, (torch.arange(in_f, device=W.device) // g).to(torch.int32),
                         dead_columns=int(dead.sum()), fallback="rtn: Cholesky failed at every damping", notes=notes)
    Hinv, damp_used = chol

    on = W.device  # computed where its inputs are (compress.device)
    codes = torch.zeros(out_f, in_f, dtype=torch.int32, device=on)
    scale = torch.zeros(out_f, n_groups, device=on)
    zero = torch.zeros(out_f, n_groups, device=on)
    g_idx = torch.zeros(in_f, dtype=torch.int32, device=on)  # in permuted order for now
    cur_s = cur_z = torch.empty(out_f, 0, device=on)  # the current group's grid (out, 1); set where a group starts
    for i1 in range(0, in_f, spec.block_size):
        i2 = min(i1 + spec.block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                gid = int(perm[col]) // g
                cur_s, cur_z = static[gid]
            elif col % g == 0:  # a new group starts: its grid from the (already updated) weights ahead
                gid = col // g
                cur_s, cur_z = grid(torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :g], spec.bits, spec.sym,
                                    spec.mse)
            scale[:, gid], zero[:, gid] = cur_s[:, 0], cur_z[:, 0]
            g_idx[col] = gid
            w = W1[:, i]
            q = quantize(w[:, None], cur_s, cur_z, spec.maxq)  # (out, 1)
            codes[:, col] = q[:, 0]
            err = (w - dequantize(q, cur_s, cur_z)[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    return Quantized(codes[:, inv], scale, zero, g_idx[inv], damp=damp_used, dead_columns=int(dead.sum()),
                     notes=notes + ([f"damping raised to {damp_used:g}"] if damp_used != spec.damp else []))
