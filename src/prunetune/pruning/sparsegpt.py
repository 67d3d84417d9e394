"""SparseGPT / OBS math (Frantar & Alistarh, 2023), pure: a weight matrix and its layer-input Hessian in,
pruned-and-updated weights and the keep-mask out. Mirrors the reference `fasterprune` (block 128, 1% damping).

H = (1/n) sum_t x_t x_t^T over calibration tokens, (in, in). Everything here is float32 whatever the model
dtype: H sums hundreds of thousands of outer products and is then factorised (Cholesky of H and of H^-1);
bf16's 8-bit mantissa would lose the small eigenvalues that decide the updates and make the factorisation fail.
"""

from __future__ import annotations

from functools import cached_property

import torch

from prunetune.sparsity.patterns import n_pruned


def hessian_update(hessian: torch.Tensor, count: int, x: torch.Tensor) -> int:
    """Fold a batch of inputs (..., in) into the running mean `hessian` in place; returns the new token count.
    The activations may be bf16 (calibration dtype); they are upcast before the outer product (float32 sums)."""
    x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
    new = count + x.shape[0]
    hessian.mul_(count / new).addmm_(x.t(), x, alpha=1.0 / new)
    return new


def damped(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + percdamp * mean(diag H) * I, dead-column mask). Dead inputs (never active) get H_jj = 1 as in SparseGPT."""
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    return h, dead


def inverse_cholesky_upper(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, the quantity the OBS sweep reads rows of."""
    lower = torch.linalg.cholesky(hessian)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


class HessianFactors:
    """One layer input's Hessian, damped once, and its inverse Cholesky factor computed on first use.

    Modules that read the same input (q/k/v, gate/up) share one instance, so the (in, in) damping and the
    O(in^3) factorisation happen once per input, not once per module.
    """

    def __init__(self, hessian: torch.Tensor, percdamp: float = 0.01):
        self.hessian = hessian
        self.damped, self.dead = damped(hessian, percdamp)

    @cached_property
    def hinv_upper(self) -> torch.Tensor:
        return inverse_cholesky_upper(self.damped)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    mask: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    factors: HessianFactors | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OBS pruning sweep over columns; returns (new weight in the input dtype, keep-mask).

    - `mask` given: the pattern is fixed and only the kept weights are updated (OBS under a fixed mask).
    - else `prune_n:prune_m` > 0: N:M chosen adaptively per group by saliency w^2 / [H^-1]_jj^2.
    - else unstructured: in each block of `blocksize` columns, exactly floor(sparsity * numel) weights of lowest
      saliency (the reference picks by a threshold, which can take one more on ties).
    `factors` (from the same `hessian` and `percdamp`) skips the factorisation when it is shared.
    """
    factors = factors or HessianFactors(hessian, percdamp)
    rows, cols = weight.shape
    w = weight.detach().float().clone()  # (out, in)
    w[:, factors.dead] = 0
    hinv = factors.hinv_upper
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        fixed = None if mask is None else ~mask[:, i1:i2].to(w.device)
        prune1 = _block_choice(w1, torch.diag(hinv1), sparsity, prune_n, fixed)
        q1, err1 = _sweep_block(w1, hinv1, prune1, prune_n if fixed is None else 0, prune_m)
        w[:, i1:i2] = q1
        keep[:, i1:i2] = ~prune1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # propagate this block's error to the columns not yet visited
    w[~keep] = 0  # exact zeros regardless of float round-off in the sweep
    return w.to(weight.dtype), keep


def _block_choice(
    w1: torch.Tensor, d1: torch.Tensor, sparsity: float, prune_n: int, fixed: torch.Tensor | None
) -> torch.Tensor:
    """Prune-mask (out, count) of one column block before its sweep: the fixed mask, the lowest-saliency
    floor(sparsity * numel) weights (unstructured), or all False for N:M (chosen per group during the sweep)."""
    if fixed is not None:
        return fixed.clone()
    rows, count = w1.shape
    prune1 = torch.zeros(rows * count, dtype=torch.bool, device=w1.device)
    if prune_n == 0:
        saliency = (w1.pow(2) / d1.pow(2).unsqueeze(0)).flatten()
        k = n_pruned(rows * count, sparsity)
        if k:
            prune1[torch.sort(saliency, stable=True).indices[:k]] = True
    return prune1.view(rows, count)


def _sweep_block(
    w1: torch.Tensor, hinv1: torch.Tensor, prune1: torch.Tensor, prune_n: int, prune_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """OBS sweep of one block, column by column: zero the pruned weights of column i, spread the scaled
    error over the columns after it. Updates `w1` and `prune1` (N:M groups) in place; returns (q1, err1)."""
    q1 = torch.zeros_like(w1)
    err1 = torch.zeros_like(w1)
    d1 = torch.diag(hinv1)
    for i in range(w1.shape[1]):
        col = w1[:, i]
        if prune_n != 0 and i % prune_m == 0:
            sal = w1[:, i : i + prune_m].pow(2) / d1[i : i + prune_m].pow(2).unsqueeze(0)
            prune1.scatter_(1, i + torch.sort(sal, dim=1, stable=True).indices[:, :prune_n], True)
        q = col.clone()
        q[prune1[:, i]] = 0
        q1[:, i] = q
        err = (col - q) / d1[i]  # (out,)
        w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
        err1[:, i] = err
    return q1, err1
